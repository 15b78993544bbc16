"""The wired pipeline: Engine.classify/generate against the stages called by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from icl_engine.core.choices import Calibration, SelectionMethod
from icl_engine.core.data import Dataset, TaskKind, make_records
from icl_engine.core.embed import get_embedder
from icl_engine.core.index import ExampleIndex
from icl_engine.core.pipeline import Engine, PipelineConfig
from icl_engine.core.prompt import Template
from icl_engine.core.score import normalize, score_brute_force

from conftest import CountingTokenizer, make_tiny_lm
from numerics import assert_probs_close

TEXTS = ["a wonderful film", "great acting and a moving story", "a dull boring film", "terrible plot and bad acting",
         "the movie was great", "a boring waste of time", "wonderful acting", "bad film"]
LABELS = ["positive", "positive", "negative", "negative", "positive", "negative", "positive", "negative"]
TEMPLATE = Template(instruction="Sentiment of movie reviews.", input_format="Review: {input}\nSentiment:",
                    output_format=" {output}", verbalizers={"positive": "great", "negative": "terrible bad"})


@pytest.fixture(scope="module")
def parts(tiny_tokenizer, tmp_path_factory):
    lm = make_tiny_lm(tiny_tokenizer)
    ds = Dataset("tiny", TaskKind.CLASSIFICATION, make_records(zip(TEXTS, LABELS)), ("negative", "positive"))
    emb = get_embedder("hashing:64")
    folder = tmp_path_factory.mktemp("idx") / "tiny"
    ExampleIndex.build(ds, emb).save(folder)
    return lm, emb, folder


def engine(parts, **kw) -> Engine:
    lm, emb, folder = parts
    cfg = PipelineConfig(index=str(folder), template=TEMPLATE, **kw)
    return Engine.load(cfg, lm=lm, embedder=emb)


def test_classify_equals_brute_force_on_the_assembled_prompt(parts):
    eng = engine(parts, k=3)
    assert eng.prefix is not None  # the instruction is cached once
    preds = eng.classify(["a great moving film", "boring and bad"])
    for q, p in zip(["a great moving film", "boring and bad"], preds):
        recs = {r.id: r for r in eng.index.records}
        prompt = eng.builder.assemble([recs[d.id] for d in p.demos], q)
        labels = [eng.builder.label_ids(lab) for lab in eng.index.labels]
        ref = np.exp(normalize(score_brute_force(eng.lm, [prompt.ids], labels)))[0]  # no prefix, no batching
        assert_probs_close(list(p.probs.values()), list(ref), p.log_scores, eng.lm)
        assert p.label == eng.index.labels[int(np.argmax(ref))]
        assert p.prompt_tokens == len(prompt.ids) and len(p.demos) == 3
        # most similar demonstration is nearest the query
        assert p.demos[-1].score == max(d.score for d in p.demos)


def test_leave_one_out_and_methods(parts):
    eng = engine(parts, k=3)
    own = eng.index.records[0]
    [p] = eng.classify([own.input], exclude_ids=[own.id])
    assert own.id not in [d.id for d in p.demos]
    assert all(d.text != own.input for d in p.demos)
    [z] = eng.classify(["a film"], method=SelectionMethod.ZERO)
    assert z.demos == []
    r1 = eng.classify(["a film"], method="random")
    r2 = eng.classify(["a film"], method="random")
    assert [d.id for d in r1[0].demos] == [d.id for d in r2[0].demos]  # seeded


@pytest.mark.parametrize("cal", [Calibration.CONTEXTUAL, Calibration.PMI])
def test_calibration_changes_probabilities_and_stays_normalised(parts, cal):
    plain = engine(parts, k=2).classify(["a great film"])[0]
    calibrated = engine(parts, k=2, calibration=cal).classify(["a great film"])[0]
    assert sum(calibrated.probs.values()) == pytest.approx(1.0)
    assert calibrated.probs != pytest.approx(plain.probs)


def test_budget_limits_demonstrations(parts):
    eng = engine(parts, k=8, budget=60)
    [p] = eng.classify(["a film"])
    assert p.prompt_tokens + max(len(eng.builder.label_ids(lab)) for lab in eng.index.labels) <= 60
    assert len(p.demos) < 8


def test_generation_pipeline(tiny_tokenizer, tmp_path):
    lm = make_tiny_lm(tiny_tokenizer)
    ds = Dataset("g", TaskKind.GENERATION, make_records([("name: a, food: b", "a serves b"), ("name: c", "c is here"),
                                                          ("name: d, area: e", "d is in e")]), ())
    emb = get_embedder("hashing:64")
    ExampleIndex.build(ds, emb).save(tmp_path / "g")
    eng = Engine.load(PipelineConfig(index=str(tmp_path / "g"), k=2, max_new_tokens=5), lm=lm, embedder=emb)
    [g] = eng.generate(["name: a, area: e"])
    assert isinstance(g.output, str) and len(g.demos) == 2 and g.input == "name: a, area: e"


def test_config_round_trip_and_validation(tmp_path):
    cfg = PipelineConfig(index="x", template=TEMPLATE, method="mmr", calibration="pmi", k=4)
    cfg.save(tmp_path / "c.json")
    assert PipelineConfig.load(tmp_path / "c.json") == cfg
    with pytest.raises(ValueError, match="k"):
        PipelineConfig(index="x", k=-1)
    with pytest.raises(ValueError, match="dtype"):
        PipelineConfig(index="x", dtype="int3")


def test_each_query_is_tokenized_once_in_one_call(parts):
    """Budgets and assembly reuse one batched tokenization of the queries (tokenizing
    each query once per use, one call each, cost three times the work)."""
    eng = engine(parts, k=3)
    queries = ["a great moving film", "boring and bad", "wonderful"]
    eng.classify(queries)  # warm: demonstrations and labels tokenized and cached
    tok = eng.builder.tokenizer
    counting = eng.builder.tokenizer = CountingTokenizer(tok)
    calls = counting.calls
    try:
        preds = eng.classify(queries)
    finally:
        eng.builder.tokenizer = tok
    assert calls == [[TEMPLATE.format_input(q) for q in queries]]
    assert [p.label for p in preds] == [p.label for p in eng.classify(queries)]


def test_prepare_stream_on_cpu_is_a_no_op():
    from icl_engine.core.evaluate import prepare_stream

    with prepare_stream(torch.device("cpu"))() as ctx:
        assert ctx is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_prepare_stream_on_cuda_is_its_own():
    """The prepare thread's GPU work must not queue behind the LM's forward on the default stream."""
    from icl_engine.core.evaluate import prepare_stream

    with prepare_stream(torch.device("cuda"))():
        assert torch.cuda.current_stream() != torch.cuda.default_stream()
    assert torch.cuda.current_stream() == torch.cuda.default_stream()


def test_overlap_pipelines_chunks_in_one_thread(parts):
    """With overlap, chunk i+1 is prepared and launched before chunk i is collected (on a GPU
    the LM is still scoring chunk i then), all in the calling thread; the predictions are those
    of plain chunks."""
    import threading

    from icl_engine.core.evaluate import classify_chunks

    eng = engine(parts, k=2, batch_size=4)
    texts = TEXTS + TEXTS[:2]  # chunks of 4, 4 and 2
    plain = [p for _, batch in classify_chunks(eng, texts, 4, overlap=False) for p in batch]
    calls = []

    def spy(name):
        f = getattr(eng, name)

        def call(x, *a, **kw):
            assert threading.current_thread() is threading.main_thread()
            out = f(x, *a, **kw)
            size = {"prepare": lambda: len(x), "launch": lambda: len(x.prompts),
                    "collect": lambda: len(x.prepared.prompts)}[name]()
            calls.append(f"{name}{size}")
            return out
        return call

    for name in ("prepare", "launch", "collect"):
        setattr(eng, name, spy(name))
    piped = [p for _, batch in classify_chunks(eng, texts, 4, overlap=True) for p in batch]
    assert calls == ["prepare4", "launch4", "prepare4", "launch4", "collect4",
                     "prepare2", "launch2", "collect4", "collect2"]
    assert [p.label for p in piped] == [p.label for p in plain]
    assert [p.probs for p in piped] == [p.probs for p in plain]


def test_evaluate_chunks_and_overlap_do_not_change_results(parts):
    """Chunks of the configured batch size, and preparing the next chunk in a thread, give the
    predictions of one engine call over all queries (within float32 rounding: only padding and
    batch composition differ). Demonstrations may differ only between equally similar records
    (the tiny hashing index has many exact ties)."""
    from icl_engine.core.evaluate import evaluate

    eng = engine(parts, k=3, batch_size=5)
    queries = [f"{t} {w}" for w in ("really", "truly", "quite", "so", "very", "", "!", "?") for t in TEXTS][:60]
    test = Dataset("q", TaskKind.CLASSIFICATION, make_records((q, "positive") for q in queries), ("negative", "positive"))
    sizes = []
    prepare = eng.prepare
    eng.prepare = lambda texts, *a, **kw: sizes.append(len(texts)) or prepare(texts, *a, **kw)
    default = evaluate(eng, test, progress=False)
    assert sizes == [40, 20]  # CHUNK_BATCHES = 8 LM batches of the configured size (at least 32)
    threaded = evaluate(eng, test, progress=False, chunk=20, overlap=True)
    assert sizes[2:] == [20, 20, 20]
    ref = eng.classify(queries)
    same = 0
    for run in (default, threaded):
        for p, r in zip(run["predictions"], ref):
            if p["demo_ids"] != [d.id for d in r.demos]:
                continue
            same += 1
            assert p["label"] == r.label
            assert_probs_close(list(p["probs"].values()), list(r.probs.values()), r.log_scores, eng.lm)
    assert same >= 0.9 * 2 * len(queries)
    with pytest.raises(ValueError, match="chunk"):
        evaluate(eng, test, progress=False, chunk=0)


def test_evaluate_drops_each_chunks_predictions_and_keeps_its_numbers(parts):
    """evaluate() keeps each query's output row and counts, not its Prediction (a dozen objects,
    8 of them Demos, that a long run left for the full garbage collections to walk): a chunk's
    Predictions are gone two chunks later, and the output is what the Predictions say."""
    import gc
    import weakref

    from icl_engine.core.evaluate import evaluate, fewer_demos

    eng = engine(parts, k=12)  # more than the 8 records: every query is short of demonstrations
    queries = [f"{t} {w}" for w in ("really", "so", "very", "") for t in TEXTS][:30]
    test = Dataset("q", TaskKind.CLASSIFICATION, make_records((q, "positive") for q in queries), ("negative", "positive"))
    chunks, finish = [], eng.finish

    def tracked(prepared):
        preds = finish(prepared)
        assert all(r() is None for done in chunks[:-1] for r in done)  # refcounts alone free them
        chunks.append([weakref.ref(p) for p in preds] + [weakref.ref(d) for p in preds for d in p.demos])
        return preds

    eng.finish = tracked
    enabled = gc.isenabled()
    gc.disable()
    try:
        out = evaluate(eng, test, progress=False, chunk=8)
    finally:
        eng.finish = finish
        if enabled:
            gc.enable()
    assert len(chunks) == 4
    ref = eng.classify(queries)
    assert [p["label"] for p in out["predictions"]] == [p.label for p in ref]
    assert [p["demo_ids"] for p in out["predictions"]] == [[d.id for d in p.demos] for p in ref]
    assert out["mean_prompt_tokens"] == float(np.mean([p.prompt_tokens for p in ref]))
    assert out["fewer_demos"] == fewer_demos(ref, 12) and out["fewer_demos"]["queries"] == len(queries)
    assert out["fewer_demos"]["short"] == sum(p.short for p in ref) > 0


@pytest.mark.slow
def test_engine_runs_without_faiss():
    """A GPU machine may lack faiss: the engine, evaluate and the LM load without it (only
    loading an index from disk needs it)."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['faiss'] = None; sys.modules['gguf'] = None\n"
            "import icl_engine.core.pipeline, icl_engine.core.evaluate, icl_engine.core.lm, icl_engine.core.data, icl_engine.core.embed\n"
            "try:\n    import icl_engine.core.index\nexcept ImportError:\n    print('index needs faiss')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "index needs faiss"
