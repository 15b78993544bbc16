"""The library functions behind the CLI: one per command, returning JSON-ready dicts, plus the
plain-text formatters. Nothing here parses flags or prints."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .data import load_dataset
from .embed import DEFAULT_EMBEDDER, get_embedder
from .evaluate import evaluate, format_table
from .index import ExampleIndex, IndexConfig, IndexType, index_path
from .lm import DEFAULT_LM
from .pipeline import TEMPLATE_FILE, Engine, PipelineConfig, index_template
from .prompt import Template
from .select import SelectionMethod, select_demonstrations

__all__ = [
    "DEFAULT_EMBEDDER", "DEFAULT_LM", "build_index", "index_info", "search", "make_config", "classify",
    "generate", "evaluate_file", "run_demo", "format_info", "format_hits", "format_prediction",
    "format_generation", "format_eval", "SENTIMENT_TEMPLATE", "tune", "finetune_reference", "compare",
    "bounds_theory", "bounds_run", "engine_predictor",
]

# The built-in Rotten Tomatoes data comes with its prompt template.
SENTIMENT_TEMPLATE = Template(
    instruction="Classify the sentiment of each movie review as positive or negative.",
    input_format="Review: {input}\nSentiment:",
    output_format=" {output}",
    separator="\n\n",
)
SNIPS_LABELS = ("add_to_playlist", "book_restaurant", "get_weather", "play_music", "rate_book", "search_creative_work",
                "search_screening_event")
INTENT_TEMPLATE = Template(
    instruction="Classify the intent of each utterance.",
    input_format="Utterance: {input}\nIntent:",
    output_format=" {output}",
    separator="\n\n",
    # plain words, not identifiers: "add to playlist" rather than "add_to_playlist"
    verbalizers={lab: lab.replace("_", " ") for lab in SNIPS_LABELS},
)
_BUILTIN_TEMPLATES = {"rotten_tomatoes": SENTIMENT_TEMPLATE, "snips_intents": INTENT_TEMPLATE}


def _write_json_atomic(path: Path, obj) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def build_index(data: str, name: str, *, text_field=None, label_field=None, embedder: str = DEFAULT_EMBEDDER,
                index_type: IndexType = IndexType.FLAT, template: Path | None = None,
                indexes_dir: Path | None = None) -> dict:
    """Load `data`, embed it and save the index as `name`; returns the manifest."""
    dataset = load_dataset(data, text_field=text_field, label_field=label_field)
    tpl = Template.from_json(template) if template else _BUILTIN_TEMPLATES.get(str(data).split(":")[0])
    index = ExampleIndex.build(dataset, get_embedder(embedder), IndexConfig(index_type=IndexType(index_type)))
    folder = index_path(name, indexes_dir)
    index.save(folder)
    if tpl is not None:  # a default template for this index; the index itself never formats
        _write_json_atomic(folder / TEMPLATE_FILE, tpl.to_dict())
    return index_info(name, indexes_dir=indexes_dir)


def index_info(name: str, *, indexes_dir: Path | None = None) -> dict:
    folder = index_path(name, indexes_dir)
    index = ExampleIndex.load(folder)
    return {"name": name, "path": str(folder), **index.manifest}


def search(name: str, query: str, *, k: int = 8, mmr_lambda: float | None = None,
           indexes_dir: Path | None = None) -> list[dict]:
    index = ExampleIndex.load(index_path(name, indexes_dir))
    embedder = get_embedder(index.manifest["embedder"])
    [qv] = embedder.encode([query])
    method = SelectionMethod.KNN if mmr_lambda is None else SelectionMethod.MMR
    sel = select_demonstrations(index, qv, method=method, k=k, query_text=query,
                                mmr_lambda=1.0 if mmr_lambda is None else mmr_lambda)
    # most similar first for display (prompt order puts it last)
    rows = [{"id": index.records[i].id, "score": float(s), "text": index.records[i].input,
             "label": index.records[i].output} for i, s in zip(sel.ids, sel.scores)]
    return sorted(rows, key=lambda r: -r["score"])


def make_config(name: str, *, template: Path | None = None, soft_prompt: Path | None = None,
                indexes_dir: Path | None = None, **kw) -> PipelineConfig:
    return PipelineConfig(
        index=name, indexes_dir=str(indexes_dir) if indexes_dir else None,
        template=Template.from_json(template) if template else None,
        soft_prompt=str(soft_prompt) if soft_prompt else None, **kw)


def classify(config: PipelineConfig, text: str) -> dict:
    if not text.strip():
        raise ValueError("the query is empty")
    [pred] = Engine.load(config).classify([text])
    return asdict(pred)


def generate(config: PipelineConfig, input: str) -> dict:
    if not input.strip():
        raise ValueError("the input is empty")
    [gen] = Engine.load(config).generate([input])
    return asdict(gen)


def evaluate_file(config: PipelineConfig, test: str, *, limit=None, text_field=None, label_field=None) -> dict:
    engine = Engine.load(config)
    # the index's label list: a test label the index does not know is refused by the loader
    test_set = load_dataset(test, kind=engine.index.kind, text_field=text_field, label_field=label_field,
                            labels=engine.index.labels or None)
    return evaluate(engine, test_set, limit=limit)


def run_demo(*, n: int = 200, k: int = 8, lm: str = DEFAULT_LM, indexes_dir: Path | None = None) -> str:
    """Build (once) the built-in Rotten Tomatoes index, then compare zero-shot, random-k and kNN-k
    on `n` held-out reviews with the packaged LM; returns a printable report."""
    name = "rotten_tomatoes"
    folder = index_path(name, indexes_dir)
    lines = []
    try:
        index = ExampleIndex.load(folder)
        lines.append(f"index: reusing {folder} ({index.manifest['count']} reviews)")
    except (ValueError, FileNotFoundError):
        info = build_index("rotten_tomatoes:train", name, indexes_dir=indexes_dir)
        index = ExampleIndex.load(folder)
        lines.append(f"index: built {folder} ({info['count']} reviews)")
    engine = Engine.load(PipelineConfig(index=name, indexes_dir=str(indexes_dir) if indexes_dir else None, lm=lm),
                         index=index)
    test = load_dataset("rotten_tomatoes:test")
    rows = [evaluate(engine, test, method=m, k=0 if m == "zero" else k, limit=n) for m in ("zero", "random", "knn")]
    example = engine.classify([test[0].input])[0]
    lines += ["", format_table(rows), "", f"example: {test[0].input!r} (gold: {test[0].output})",
              format_prediction(asdict(example))]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- formatting


def format_info(info: dict) -> str:
    keys = ["name", "path", "count", "kind", "labels", "embedder", "dim", "index_type", "created"]
    return "\n".join(f"{k:>10}: {info[k]}" for k in keys if k in info)


def format_hits(hits: list[dict]) -> str:
    return "\n".join(f"{h['score']:.3f}  [{h['label']}]  {h['text']}" for h in hits)


def format_prediction(p: dict) -> str:
    probs = "  ".join(f"{lab}={x:.3f}" for lab, x in p["probs"].items())
    lines = [f"label: {p['label']}   ({probs}; {p['prompt_tokens']} prompt tokens)"]
    lines += [f"  demo {d['score']:.3f} [{d['output']}] {d['input']}" for d in p["demos"]]
    return "\n".join(lines)


def format_generation(g: dict) -> str:
    lines = [g["text"], f"({g['prompt_tokens']} prompt tokens)"]
    lines += [f"  demo {d['score']:.3f} {d['input']} -> {d['output']}" for d in g["demos"]]
    return "\n".join(lines)


def format_eval(r: dict) -> str:
    out = [format_table([r]), f"{r['seconds']:.1f} s"]
    if "confusion_matrix" in r:
        width = max(len(lab) for lab in r["labels"])
        out.append("confusion (rows gold, columns predicted):")
        out += [f"  {lab:>{width}}  " + " ".join(f"{c:5d}" for c in row) for lab, row in zip(r["labels"], r["confusion_matrix"])]
    return "\n".join(out)


# ----------------------------------------------------------------------------- soft prompts, reference, report


def _training_parts(name: str, indexes_dir, lm_name: str, template: Path | None):
    from .lm import load_lm
    from .prompt import PromptBuilder

    folder = index_path(name, indexes_dir)
    index = ExampleIndex.load(folder)
    lm = load_lm(lm_name)
    tpl = Template.from_json(template) if template else index_template(folder, index.kind)
    return index, lm, PromptBuilder(tpl, lm.tokenizer, index.labels)


def tune(name: str, *, out: Path, method: str, n_virtual: int = 20, k: int | None = None, steps: int | None = None,
         epochs: int = 3, lr: float | None = None, batch_size: int = 8, seed: int = 0, init: str | None = None,
         init_text: str | None = None, train_pool: int | None = None, lm: str = DEFAULT_LM,
         template: Path | None = None, indexes_dir: Path | None = None) -> dict:
    """Train a soft prompt (prompt tuning, prefix tuning or IPT) on an index's records, LM frozen."""
    from .train.loop import TrainSettings
    from .train.soft_prompt import SoftPromptConfig, train_soft_prompt

    index, model, builder = _training_parts(name, indexes_dir, lm, template)
    cfg = SoftPromptConfig(method=method, n_virtual=n_virtual, k=k, init=init, init_text=init_text,
                           train=TrainSettings(epochs=epochs, max_steps=steps, lr=lr, batch_size=batch_size, seed=seed))
    pool = index.dataset.subsample(train_pool, seed) if train_pool else index.dataset
    result = train_soft_prompt(model, pool, cfg, builder=builder, index=index, out=Path(out))
    return {"out": str(result.out), **result.metrics}


def finetune_reference(name: str, *, out: Path, lora: bool = False, epochs: int = 1, steps: int | None = None,
                       lr: float | None = None, batch_size: int = 8, seed: int = 0, train_pool: int | None = None,
                       lm: str = DEFAULT_LM, template: Path | None = None, indexes_dir: Path | None = None) -> dict:
    """Fine-tune the base LM on an index's records (full, or LoRA): the reference ICL approximates."""
    from .train.finetune import FinetuneConfig, finetune
    from .train.loop import TrainSettings

    index, model, builder = _training_parts(name, indexes_dir, lm, template)
    cfg = FinetuneConfig(method="lora" if lora else "full",
                         train=TrainSettings(epochs=epochs, max_steps=steps, lr=lr, batch_size=batch_size, seed=seed))
    pool = index.dataset.subsample(train_pool, seed) if train_pool else index.dataset
    result = finetune(model, pool, cfg, builder=builder, out=Path(out))
    return {"out": str(result.out), **result.metrics}


def compare(name: str, test: str, *, out: Path, reference: Path | None = None, methods=None, seeds: int = 3,
            k: int = 4, train_pool: int | None = None, test_limit: int | None = None, steps: int | None = None,
            threads: int | None = None, lm: str = DEFAULT_LM, template: Path | None = None,
            indexes_dir: Path | None = None) -> dict:
    """The approximation report: every method against the fine-tuned reference on one test set."""
    from .studies import compare as cmp

    index = ExampleIndex.load(index_path(name, indexes_dir))
    test_set = load_dataset(test, kind=index.kind, labels=index.labels or None)
    kw = {"soft_train": dataclasses.replace(cmp.default_soft_train(), max_steps=steps)} if steps else {}
    return cmp.run_compare(
        index_path(name, indexes_dir), test_set, out=Path(out), reference=reference, methods=methods, seeds=seeds,
        k=k, lm=lm, train_pool=train_pool or cmp.DEFAULT_TRAIN_POOL, test_limit=test_limit or cmp.DEFAULT_TEST_LIMIT,
        template=Template.from_json(template) if template else None, threads=threads, **kw)


def bounds_theory(*, eps: float, delta: float, V: int, m: int, l: int, d: int, c: float = 1.0) -> list[dict]:
    from .studies.bounds import theory_table

    return theory_table(eps, delta, V=V, m=m, l=l, d=d, c=c)


def bounds_run(experiment: str, *, out: Path, quick: bool = False, seed: int = 0, lm: str = DEFAULT_LM,
               k: int = 4, reference: Path | None = None, template: Path | None = None,
               settings: dict | None = None) -> dict:
    """One bound-validation experiment. `retrieval` uses the engine (kNN-k over an index of each
    pool, default embedder and LM) against a reference: a fine-tuned LM folder when given, else a
    bag-of-words logistic-regression probe trained on each pool (labelled as such in the report).
    `settings` override fields of the experiment's preset (e.g. {"draws": 2})."""
    settings = dict(settings or {})
    from .studies import experiments
    from .lm import load_lm

    model = load_lm(lm)
    if experiments.Experiment(experiment) is not experiments.Experiment.RETRIEVAL:
        return experiments.run(experiment, quick=quick, out=Path(out), lm=model, seed=seed, **settings)
    tpl = Template.from_json(template) if template else None
    predict = engine_predictor(model, k=k, template=tpl)
    if reference:
        from .adapters import load_finetuned

        ref = engine_predictor(load_finetuned(reference), k=0, template=tpl)
        ref.fixed = True  # trained once: the report says the reference does not move with N
    else:
        ref = experiments.bow_logreg()
    return experiments.run(experiment, quick=quick, out=Path(out), lm=model, seed=seed, predict=predict,
                           reference=ref, k=k, **settings)


def engine_predictor(lm, *, k: int, embedder: str = DEFAULT_EMBEDDER, template: Template | None = None):
    """(pool, test) -> (labels, probs [q, L]): the ICL engine with kNN-k demonstrations from an
    in-memory index of `pool` (k = 0: zero-shot, e.g. for a fine-tuned reference). The template:
    `template`, else the built-in one for the pool's dataset name, else the task default."""
    from .pipeline import Engine, PipelineConfig

    emb = get_embedder(embedder)

    def predict(pool, test):
        index = ExampleIndex.build(pool, emb)
        tpl = template or _BUILTIN_TEMPLATES.get(pool.name.split(":")[0].split("_train")[0]) or Template.default(pool.kind)
        cfg = PipelineConfig(index=pool.name, lm=lm.name, k=k, method="knn" if k else "zero")
        engine = Engine.from_parts(cfg, index, emb, lm, tpl)
        preds = engine.classify([r.input for r in test])
        return [p.label for p in preds], np.array([[p.probs[lab] for lab in index.labels] for p in preds])

    predict.__name__ = f"icl_engine ({lm.name}, {'kNN-%d' % k if k else 'zero-shot'}, embedder {emb.name})"
    return predict
