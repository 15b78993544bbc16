"""experiments/: each quick mode runs end to end with a tiny random Llama and writes valid
outputs; the pieces they rest on (counting estimator, nested prefixes, logistic regression,
baselines) are checked against references. The notebook runs with the real SmolLM2 (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from icl_engine.core.data import Dataset, TaskKind, make_records
from icl_engine.studies import bounds as B
from icl_engine.studies.experiments import (
    ExperimentError,
    GenerationConfig,
    LinearConfig,
    RetrievalConfig,
    bow_logreg,
    knn_vote,
    run,
)
from icl_engine.studies.experiments.baselines import fit_logreg
from icl_engine.studies.experiments.common import encode, log_grid
from icl_engine.studies.experiments.generation import counting_tv, output_tokens

from conftest import SENTIMENT_ROWS, make_tiny_lm, make_tiny_model, make_tiny_tokenizer, sentiment_template, shared_data
from numerics import assert_probs_close, assert_scores_close

REPO = Path(__file__).resolve().parents[1]
VERDICTS = {"consistent", "not consistent", "inconclusive", "n/a"}


@pytest.fixture(scope="module")
def tiny_lm():
    # 2048 positions so the generation grid (up to N = 128 demos) fits; conftest's autouse
    # one_thread fixture keeps the tiny model fast on a busy machine
    return make_tiny_lm(make_tiny_tokenizer(), max_position_embeddings=2048)


def _strict_json(path: Path) -> dict:
    def no_nan(x):
        raise AssertionError(f"non-JSON constant {x} in {path.name}")

    return json.loads(path.read_text(), parse_constant=no_nan)


def _check_outputs(out: Path, res: dict, experiment: str) -> dict:
    saved = _strict_json(out / "results.json")
    for key in ("experiment", "settings", "seed", "machine", "wall_time_s", "curves", "verdicts", "plots",
                "theory_table"):
        assert key in saved, key
    assert saved["experiment"] == experiment == res["experiment"]
    assert saved["wall_time_s"] > 0 and saved["machine"]["cpu_count"]
    assert saved["curves"], "no curves"
    for c in saved["curves"]:
        k = len(c["n"])
        assert len(c["mean"]) == len(c["low"]) == len(c["high"]) == k >= 1
        assert c["verdict"] in VERDICTS
        assert {"slope", "ci_low", "ci_high", "n_min", "n_max", "n_points", "n_draws"} <= set(c["fit"])
        for m, lo, hi in zip(c["mean"], c["low"], c["high"]):
            if lo is not None and m is not None:
                assert lo - 1e-12 <= m <= hi + 1e-12
    assert sum(saved["verdicts"].values()) == len(saved["curves"])
    for name in saved["plots"]:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, name
    report = (out / "report.md").read_text()
    assert "## Verdicts" in report and "slope" in report and "→ **" in report
    return saved


# ----------------------------------------------------------------------------- quick modes


@pytest.mark.slow
def test_linear_quick_mode_writes_valid_outputs(tmp_path, tiny_lm):
    out = tmp_path / "linear"
    res = run("linear", quick=True, out=out, lm=tiny_lm, seed=0)
    saved = _check_outputs(out, res, "linear")
    cfg = LinearConfig.preset(quick=True)
    assert saved["settings"]["draws"] == cfg.draws >= 10 and saved["settings"]["orders"] >= 2
    groups = {c["group"] for c in saved["curves"]}
    assert {"disagreement_in_context", "icl_error", "reference_error"} <= groups
    dis = [c for c in saved["curves"] if c["group"] == "disagreement_in_context"]
    assert len(dis) == len(cfg.dims) and all(c["predicted"] == -1.0 for c in dis)
    assert set(saved["scaling"]) == {"disagreement_in_context", "reference_error"}
    for s in saved["scaling"].values():
        assert s["verdict"] in VERDICTS and len(s["normalised"]) == len(cfg.dims)
    assert any("scaling" in p for p in saved["plots"])
    # same seed, same numbers
    again = run("linear", quick=True, out=tmp_path / "again", lm=tiny_lm, seed=0, dims=(2,))
    assert again["curves"][0]["mean"] == res["curves"][0]["mean"]


@pytest.mark.slow
def test_linear_retrieval_regime_beyond_the_budget(tmp_path, tiny_lm):
    out = tmp_path / "lin_retrieval"
    res = run("linear", quick=True, out=out, lm=tiny_lm, dims=(2, 3), n_grid=(2, 4, 8, 16), budget=80, k=3,
              draws=3, orders=2, retrieval_orders=2, n_test=4, n_boot=200)
    saved = _check_outputs(out, res, "linear")
    ret = [c for c in saved["curves"] if c["group"] == "disagreement_retrieval"]
    assert ret and all(c["predicted"] == -0.5 for c in ret)
    assert all(n > saved["per_dim"][c["name"].split("d=")[1].split()[0]]["n_ctx"] for c in ret for n in c["n"])
    assert "bounded context: k = 3 nearest" in (out / "report.md").read_text()


@pytest.mark.slow
def test_generation_quick_mode_writes_valid_outputs(tmp_path, tiny_lm):
    out = tmp_path / "generation"
    res = run("generation", quick=True, out=out, lm=tiny_lm)
    saved = _check_outputs(out, res, "generation")
    assert saved["settings"]["vocab_sizes"] == [4, 16, 64]
    assert saved["n_grid_used"] == list(GenerationConfig.preset(quick=True).n_grid)
    names = {c["name"] for c in saved["curves"]}
    for v in (4, 16, 64):
        assert {f"LM TV mean V'={v}", f"LM TV max V'={v}", f"counting TV mean V'={v}", f"mass outside V'={v}"} <= names
    for c in saved["curves"]:
        vals = np.array(c["mean"], dtype=float)
        assert np.all((vals >= 0) & (vals <= 1 + 1e-9))
        if c["group"] == "count_tv_mean":  # the estimator with a known rate falls with N
            assert c["fit"]["slope"] < -0.2
    assert set(saved["scaling"]) == {"LM TV mean", "counting TV mean"}


@pytest.mark.slow
def test_retrieval_quick_mode_with_baseline_stand_ins(tmp_path):
    data_dir = shared_data("snips_intents.jsonl").parent
    out = tmp_path / "retrieval"
    res = run("retrieval", quick=True, out=out, predict=knn_vote(4), reference=bow_logreg(),
              data_dir=str(data_dir))
    saved = _check_outputs(out, res, "retrieval")
    assert "BASELINE" in saved["predictor"] and "BASELINE" in (out / "report.md").read_text()
    assert set(saved["tasks"]) == {"rotten_tomatoes", "snips_intents"}
    rt = saved["tasks"]["rotten_tomatoes"]
    assert rt["n_grid"][0] == 16 and rt["n_grid"][-1] == rt["pool"] == 11752
    assert all(f"retrieval_{t}.png" in saved["plots"] for t in saved["tasks"])


def test_retrieval_asks_a_fixed_reference_once_per_dataset(tmp_path):
    data_dir = shared_data("snips_intents.jsonl").parent
    calls = []
    inner = bow_logreg()

    def reference(pool, test):  # trained once: answers do not depend on the pool
        calls.append(len(pool))
        return inner(pool, test)

    reference.fixed = True
    res = run("retrieval", quick=True, out=tmp_path / "r", predict=knn_vote(4), reference=reference,
              data_dir=str(data_dir), datasets=("snips_intents",), n_points=3, draws=2)
    assert len(calls) == 1 and set(res["tasks"]) == {"snips_intents"}
    assert "trained once" in (tmp_path / "r" / "report.md").read_text()


# ----------------------------------------------------------------------------- cached rows

_GOOD, _BAD = ("great", "wonderful", "fine", "lovely", "superb"), ("dull", "boring", "terrible", "awful", "weak")
_NOUNS = ("film", "movie", "plot", "acting")


@pytest.fixture(scope="module")
def tiny_rt(tmp_path_factory):
    """A 40-review Rotten Tomatoes stand-in (the built-in's file names) and 4 test reviews."""
    root = tmp_path_factory.mktemp("tiny_rt")
    train = [(f"a {a} {n}", lab) for words, lab in ((_GOOD, "positive"), (_BAD, "negative")) for a in words
             for n in _NOUNS]
    test = [("a great story", "positive"), ("the plot was dull", "negative"), ("lovely acting", "positive"),
            ("a weak and awful movie", "negative")]
    for name, rows in (("train", train), ("test", test)):
        (root / f"rotten_tomatoes_{name}.jsonl").write_text(
            "".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows))
    return root


def _engine_predictor(lm, k: int):
    from icl_engine.studies.experiments.retrieval import engine_predictor

    return engine_predictor(lm, k=k, embedder="hashing:64", template=sentiment_template())


def _is_subsequence(short: list[str], long: list[str]) -> bool:
    it = iter(long)
    return all(line in it for line in short)


def test_retrieval_cached_rows_use_k_per_n_and_leave_the_exact_report_alone(tmp_path, tiny_lm, tiny_rt):
    kw = dict(quick=True, predict=_engine_predictor(tiny_lm, 2), reference=bow_logreg(), data_dir=str(tiny_rt),
              datasets=("rotten_tomatoes",), n_min=4, n_points=3, draws=2, n_test=4, k=2, n_boot=200)
    plain = run("retrieval", out=tmp_path / "plain", **kw)
    res = run("retrieval", out=tmp_path / "rows", cached=True, cached_k_max=8, cached_same_k=True,
              cached_dtype="float32", **kw)
    saved = _check_outputs(tmp_path / "rows", res, "retrieval")
    task = saved["tasks"]["rotten_tomatoes"]
    assert task["n_grid"] == [4, 13, 40]
    assert task["k"] == {"cached_many_shot": [4, 8, 8], "cached_same_k": [2, 2, 2]}
    assert {r["label"] for r in saved["rows"].values()} == {"cached many-shot", "cached same-k"}
    assert "kNN-min(N, 8), cached scoring" in saved["rows"]["cached_many_shot"]["predictor"]
    for key, label in (("cached_many_shot", "cached many-shot"), ("cached_same_k", "cached same-k")):
        mine = {c["group"]: c for c in saved["curves"] if c["group"].endswith(key)}
        assert set(mine) == {f"disagreement_{key}", f"prob_tv_{key}", f"error_{key}"}
        assert mine[f"disagreement_{key}"]["name"] == f"disagreement {label} rotten_tomatoes"
        assert mine[f"disagreement_{key}"]["predicted"] == mine[f"prob_tv_{key}"]["predicted"] == -0.5
        assert mine[f"error_{key}"]["verdict"] == "n/a"
    assert "retrieval_rotten_tomatoes_cached.png" in saved["plots"]
    report = (tmp_path / "rows" / "report.md").read_text()
    assert "## Cached rows" in report and "k = [4, 8, 8] at N = [4, 13, 40]" in report
    # the exact predictor's curves, raw values and report lines are those of a run without rows
    by_name = {c["name"]: c for c in res["curves"]}
    assert all(by_name[c["name"]] == c for c in plain["curves"])
    assert all(np.array_equal(res["raw"]["rotten_tomatoes"][k], v) for k, v in plain["raw"]["rotten_tomatoes"].items())
    before = [ln for ln in plain["report"].splitlines() if not ln.startswith("Machine ")]
    assert _is_subsequence(before, report.splitlines())
    assert "Cached" not in plain["report"] and "rows" not in plain and "k" not in plain["tasks"]["rotten_tomatoes"]


def test_cached_predictor_at_one_demonstration_is_exact_and_its_subset_cache_is_the_pool_cache(tmp_path, tiny_lm):
    """k = 1: a cached demonstration is exactly what the prompt holds (kvcache.py), so the cached
    predictor's probabilities are exact scoring's, to float32 rounding. Any k: the cache of the
    retrieved records answers as a cache of the whole pool does."""
    from icl_engine.core.config import EngineSpec, QueryOptions
    from icl_engine.core.embed import get_embedder
    from icl_engine.core.index import ExampleIndex
    from icl_engine.core.kvcache import KVCache, build_kv_cache
    from icl_engine.core.pipeline import Engine
    from icl_engine.studies.experiments.retrieval import cached_predictor

    pool = Dataset("tiny", TaskKind.CLASSIFICATION, make_records(SENTIMENT_ROWS), ("negative", "positive"))
    texts = ["a great movie", "the plot was dull and boring", "great film", "a terrible film with great acting"]
    test = Dataset("tiny:test", TaskKind.CLASSIFICATION, make_records([(t, "positive") for t in texts]), pool.labels)
    emb = get_embedder("hashing:64")
    engine = Engine.from_parts(EngineSpec(index="tiny"), ExampleIndex.build(pool, emb), emb, tiny_lm, sentiment_template())
    exact = engine.classify(texts, QueryOptions(k=1))
    _, want = _engine_predictor(tiny_lm, 1)(pool, test)
    labels, got = cached_predictor(tiny_lm, k=1, embedder=emb, template=sentiment_template(), dtype="float32")(pool, test)
    assert_probs_close(got, want, [p.log_scores for p in exact], tiny_lm)
    assert list(labels) == [pool.labels[i] for i in np.argmax(want, 1)]
    build_kv_cache(tiny_lm, engine.builder, engine.index, tmp_path / "kv", dtype="float32")
    engine.use_kv_cache(KVCache.load(tmp_path / "kv", lm=tiny_lm, builder=engine.builder, index=engine.index))
    for k, k_max in ((3, None), (1, 8)):  # fixed k; many-shot k = min(12, 8)
        predict = cached_predictor(tiny_lm, k=k, k_max=k_max, embedder=emb, template=sentiment_template(),
                                   dtype="float32")
        whole = engine.classify(texts, QueryOptions(k=predict.k_for(len(pool)), scoring="cached"))
        _, got = predict(pool, test)
        assert_probs_close(got, [[p.probs[lab] for lab in pool.labels] for p in whole],
                           [p.log_scores for p in whole], tiny_lm)


def test_cached_rows_need_the_engine_predictor(tmp_path, tiny_rt):
    with pytest.raises(ExperimentError, match="cached rows need the engine predictor"):
        run("retrieval", quick=True, out=tmp_path, predict=knn_vote(2), reference=bow_logreg(),
            data_dir=str(tiny_rt), datasets=("rotten_tomatoes",), cached=True)
    with pytest.raises(ExperimentError, match="cached_dtype"):
        RetrievalConfig(cached_dtype="float16")
    with pytest.raises(ExperimentError, match="cached_k_max"):
        RetrievalConfig(cached_k_max=0)


def test_run_rejects_bad_requests(tmp_path, tiny_lm):
    with pytest.raises(ExperimentError, match="unknown experiment"):
        run("nope", quick=True, out=tmp_path)
    with pytest.raises(ExperimentError, match="predict="):
        run("retrieval", quick=True, out=tmp_path)
    with pytest.raises(ExperimentError, match="unknown setting"):
        run("linear", quick=True, out=tmp_path, lm=tiny_lm, drawz=3)
    with pytest.raises(ExperimentError, match="draws"):
        LinearConfig(draws=0)
    with pytest.raises(ExperimentError, match="vocab_sizes"):
        GenerationConfig(vocab_sizes=(1,))
    with pytest.raises(ExperimentError, match="datasets"):
        RetrievalConfig(datasets=("imdb",))


# ----------------------------------------------------------------------------- the pieces


@pytest.mark.slow
def test_counting_estimator_slope_is_minus_one_half():
    """Empirical frequencies: TV ∝ sqrt(V' m / N). The fitter must see -1/2 on this curve."""
    m, V, draws = 2, 8, 20
    grid = (64, 128, 256, 512, 1024, 2048, 4096)
    tv = np.zeros((draws, len(grid)))
    for r in range(draws):
        rng = np.random.default_rng(r)
        targets = rng.dirichlet(np.full(V, 4.0), size=m)  # no vanishing probabilities
        ctx = rng.integers(m, size=grid[-1])
        toks = np.array([rng.choice(V, p=targets[c]) for c in ctx])
        tv[r] = counting_tv(ctx, toks, targets, grid).mean(axis=1)
    fit = B.fit_slope(grid, tv, n_boot=1000)
    assert -0.6 < fit.slope < -0.4
    assert B.verdict(fit, -0.5) is B.Verdict.CONSISTENT


def test_counting_tv_exact_values():
    targets = np.array([[0.5, 0.5], [1.0, 0.0]])
    ctx = np.array([0, 0, 0, 0])
    toks = np.array([0, 0, 0, 1])
    tv = counting_tv(ctx, toks, targets, [2, 4])
    # N=2: context 0 saw (0, 0) -> TV 0.5; context 1 unseen -> uniform -> TV 0.5
    assert tv.tolist() == [[0.5, 0.5], [0.25, 0.5]]


def test_nested_prefix_scores_match_brute_force(tiny_lm):
    """The linear experiment extends a cached prefix demo block by demo block; the label
    scores must equal scoring each full prompt from scratch."""
    from icl_engine.core.score import compute_prefix, score_brute_force, score_continuations
    from icl_engine.studies.experiments.linear import _Render

    R = _Render(tiny_lm.tokenizer, LinearConfig())
    rng = np.random.default_rng(0)
    X, y = np.round(rng.normal(size=(6, 2)), 1), np.array([0, 1, 0, 1, 1, 0])
    demos = R.demos(X, y)
    assert demos[0] == R.query(X[0]) + R.label_ids[0] + R.nl  # pieces, exactly as scored
    queries = [R.query(x) for x in np.round(rng.normal(size=(3, 2)), 1)]
    p2 = compute_prefix(tiny_lm, ids=R.start + demos[0] + demos[1])
    p6 = compute_prefix(tiny_lm, ids=[t for d in demos[2:] for t in d], base=p2)
    fast = score_continuations(tiny_lm, queries, R.label_ids, prefix=p6)
    full = [R.start + [t for d in demos for t in d] + q for q in queries]
    slow = score_brute_force(tiny_lm, full, R.label_ids)
    assert_scores_close(fast, slow, tiny_lm)


def test_fit_logreg_binary_and_multiclass():
    rng = np.random.default_rng(0)
    w = np.array([1.0, -2.0, 0.5])
    X = rng.normal(size=(400, 3))
    y = (X @ w > 0).astype(int)
    model = fit_logreg(X, y, 2, l2=1e-3)
    assert np.mean(model.predict(X) == y) > 0.97
    cos = model.W[:, 1] @ w / np.linalg.norm(model.W[:, 1]) / np.linalg.norm(w)
    assert cos > 0.98
    assert np.allclose(model.proba(X).sum(1), 1)
    # a one-class pool predicts that class
    assert set(fit_logreg(X[:5], np.ones(5, int), 2).predict(X).tolist()) == {1}
    centres = np.array([[3, 0], [0, 3], [-3, -3]])
    Xm = np.vstack([c + rng.normal(size=(50, 2)) for c in centres])
    ym = np.repeat([0, 1, 2], 50)
    assert np.mean(fit_logreg(Xm, ym, 3).predict(Xm) == ym) > 0.95


def test_knn_vote_and_bow_logreg():
    recs = make_records([("good fun film", "pos"), ("great fun movie", "pos"), ("awful dull plot", "neg"),
                         ("dull boring plot", "neg"), ("fun good acting", "pos")])
    pool = Dataset("toy", TaskKind.CLASSIFICATION, recs, ("neg", "pos"))
    test = Dataset("toy", TaskKind.CLASSIFICATION, make_records([("fun film", "pos"), ("dull plot", "neg")]),
                   ("neg", "pos"))
    labels, probs = knn_vote(k=3)(pool, test)
    assert labels == ["pos", "neg"] and probs.shape == (2, 2) and np.allclose(probs.sum(1), 1)
    labels, probs = bow_logreg()(pool, test)
    assert labels == ["pos", "neg"] and np.allclose(probs.sum(1), 1)


def test_output_tokens_are_single_tokens(tiny_lm):
    tok = tiny_lm.tokenizer
    outs = output_tokens(tok, 64)
    assert len({i for _, i in outs}) == len(outs) >= 64
    assert all(encode(tok, text) == [i] for text, i in outs)
    with pytest.raises(ExperimentError, match="single-token"):
        output_tokens(tok, 10_000)


def test_log_grid():
    assert log_grid(16, 11752, 8)[0] == 16 and log_grid(16, 11752, 8)[-1] == 11752
    assert log_grid(4, 4, 3) == (4,)
    g = log_grid(1, 1000, 4)
    assert g == (1, 10, 100, 1000)


# ----------------------------------------------------------------------------- notebook


def test_bounds_notebook_is_valid_and_stored_without_outputs():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(REPO / "notebooks" / "bounds.ipynb", as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code)
    source = "\n".join(c.source for c in code)
    assert 'run("linear", quick=QUICK' in source and 'run("generation", quick=QUICK' in source


def _execute_notebook(out: Path, env: dict) -> None:
    nbformat = pytest.importorskip("nbformat")
    import os

    from nbclient import NotebookClient

    nb = nbformat.read(REPO / "notebooks" / "bounds.ipynb", as_version=4)
    client = NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO / "notebooks")}})
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits the environment: parameters travel this way
    try:
        client.execute()
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 4  # linear and generation plots
    for exp in ("linear", "generation"):
        assert _strict_json(out / exp / "results.json")["experiment"] == exp


@pytest.mark.slow
def test_bounds_notebook_executes_with_a_tiny_lm_folder(tmp_path):
    """The notebook's LM parameter (ICL_BOUNDS_LM) takes any model folder: a tiny random Llama
    saved to disk keeps this run fast."""
    folder = tmp_path / "tiny-lm"
    tok = make_tiny_tokenizer()
    make_tiny_model(len(tok), max_position_embeddings=2048).save_pretrained(folder)
    tok.save_pretrained(folder)
    _execute_notebook(tmp_path, {"ICL_BOUNDS_LM": str(folder), "ICL_BOUNDS_OUT": str(tmp_path),
                                 "ICL_NUM_THREADS": "1"})


@pytest.mark.slow
@pytest.mark.heavy
def test_bounds_notebook_executes_with_smollm2(tmp_path):
    """The notebook as shipped: quick linear and generation with the packaged SmolLM2
    (8 min measured on a shared, loaded 2-core machine with ICL_NUM_THREADS=1)."""
    _execute_notebook(tmp_path, {"ICL_BOUNDS_OUT": str(tmp_path)})
