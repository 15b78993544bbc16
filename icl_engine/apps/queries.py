"""Queries behind the front ends: classify, generate, evaluate, label whole files, the demo. Each
takes a PipelineConfig (the engine it names comes from the process's one engine cache,
engines.ENGINES, and its options travel with the call) or a loaded Engine, and returns JSON-ready
dicts. The inputs are checked before the model libraries are imported (seconds), so a mistake
costs a fraction of a second."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.choices import DEFAULT_LM, SelectionMethod
from ..core.config import EngineSpec, PipelineConfig, QueryOptions
from ..core.data import is_blank, load_dataset
from ..core.engines import get_engine
from ..core.index import ExampleIndex, index_path
from ..core.prompt import Template
from . import ray_jobs
from .indexes import build_index

if TYPE_CHECKING:  # the model libraries load with the first engine (checks before that stay fast)
    from ..core.pipeline import Engine

__all__ = ["load", "make_config", "classify", "generate", "evaluate_file", "classify_file", "generate_file", "run_demo"]

def make_config(name: str, *, template: Path | None = None, soft_prompt: Path | None = None,
                indexes_dir: Path | None = None, **kw) -> PipelineConfig:
    return PipelineConfig(
        index=name, indexes_dir=str(indexes_dir) if indexes_dir else None,
        template=Template.from_json(template) if template else None,
        soft_prompt=str(soft_prompt) if soft_prompt else None, **kw)


def load(index: str, **spec) -> "Engine":
    """The engine over index `index` (a name under the indexes dir, or a folder) with the other
    EngineSpec fields given (lm, soft_prompt, anchors, ...), from the process's engine cache:
    loaded once, then the same object."""
    return get_engine(EngineSpec(index=index, **spec))


def _options(engine: Engine | PipelineConfig) -> QueryOptions:
    """A config's own options; a loaded engine's defaults."""
    return engine.options if isinstance(engine, EngineSpec) else engine.defaults


def classify(engine: Engine | PipelineConfig, text: str) -> dict:
    if is_blank(text):
        raise ValueError("the query is empty")
    [pred] = get_engine(engine).classify([text], _options(engine))
    return asdict(pred)


def generate(engine: Engine | PipelineConfig, input: str) -> dict:
    if is_blank(input):
        raise ValueError("the input is empty")
    [gen] = get_engine(engine).generate([input], _options(engine))
    return asdict(gen)


def evaluate_file(engine: Engine | PipelineConfig, test: str, *, limit=None, text_field=None,
                  label_field=None, ray: "ray_jobs.RayOptions | None" = None) -> dict:
    """Evaluate on a test file. `ray`: the queries are answered by the Ray engine pool
    (ray_jobs.PoolLabeller; a config, not a loaded engine); the metrics are the same."""
    config = engine if isinstance(engine, EngineSpec) else None
    if ray is not None and config is None:
        raise ValueError("evaluating on Ray takes a PipelineConfig (each actor loads its own engine)")
    # the test file is checked before an LM loads (seconds to minutes): a mistake there fails fast;
    # the index's label list: a test label the index does not know is refused by the loader
    index = engine.index if config is None else ExampleIndex.load(index_path(config.index, config.indexes_dir))
    test_set = load_dataset(test, kind=index.kind, text_field=text_field, label_field=label_field,
                            labels=index.labels or None)
    from ..core.evaluate import evaluate

    if ray is not None:
        return evaluate(ray_jobs.PoolLabeller(config, index, ray), test_set, config.options, limit=limit)
    return evaluate(get_engine(engine), test_set, _options(engine), limit=limit)


def classify_file(config: PipelineConfig, source: str, out: Path, *, text_field: str | None = None,
                  shard_size: int | None = None, ray: "ray_jobs.RayOptions | None" = None) -> dict:
    """Label every text of a JSONL/CSV/Parquet file into `out`, resumably, in one process or on a
    Ray actor pool of engines (shards.py); returns a summary (the labels are in `out`)."""
    from . import shards

    return shards.classify_file(config, source, out, text_field=text_field, shard_size=shard_size, ray=ray)


def generate_file(config: PipelineConfig, source: str, out: Path, *, text_field: str | None = None,
                  shard_size: int | None = None, ray: "ray_jobs.RayOptions | None" = None) -> dict:
    """An output (and its demonstration ids) for every input of a JSONL/CSV/Parquet file, into
    `out`, resumably, in one process or on the Ray engine pool (shards.py); returns a summary."""
    from . import shards

    return shards.generate_file(config, source, out, text_field=text_field, shard_size=shard_size, ray=ray)


# The pool is what fits 3 minutes on 2 cores: the anchors cost one LM pass over every record
DEMO_POOL, DEMO_N, DEMO_WEIGHT = 1000, 100, 0.5


def run_demo(*, n: int = DEMO_N, k: int = 8, pool: int = DEMO_POOL, lm: str = DEFAULT_LM,
             indexes_dir: Path | None = None) -> dict:
    """The engine in a few minutes on real data: an index over `pool` built-in Rotten Tomatoes
    training reviews (built once), kNN prompting's anchors over it with their linear readout
    (built once), then on the first `n` reviews of the test split: zero-shot, kNN-k ICL, the
    readout alone, and kNN-k ICL mixed half and half with the readout (the mechanism the Rotten
    Tomatoes protocol selects on validation: docs/approximation.md) -> {index, anchors, rows, example}."""
    from ..core.evaluate import evaluate
    from ..core.knn_prompt import AnchorConfig, Anchors, build_anchors
    from ..core.progress import Progress
    from ..core.readout import LinearReadout, fit_readout

    name = f"rotten_tomatoes-{pool}"
    folder = index_path(name, indexes_dir)
    try:
        index, built = ExampleIndex.load(folder), False
    except (ValueError, FileNotFoundError):
        build_index(f"rotten_tomatoes:train[{pool}@0]", name, indexes_dir=indexes_dir, force=folder.exists())
        index, built = ExampleIndex.load(folder), True
    spec = {"lm": lm, "indexes_dir": str(indexes_dir) if indexes_dir else None, "fit": False}
    engine = load(name, **spec)
    anchors_dir = folder / "demo-anchors"  # inside the demo's own index folder: nothing else is written
    try:
        anchors = Anchors.load(anchors_dir, lm=engine.lm, builder=engine.builder, index=index,
                               index_version=index.version)
        readout, anchors_built = LinearReadout.load(anchors_dir, anchors), False
    except (ValueError, FileNotFoundError):
        with Progress(len(index), "anchors", unit="records") as bar:
            anchors = build_anchors(engine.lm, engine.builder, index, AnchorConfig(), index_version=index.version,
                                    progress=lambda done, _: bar.update(done - bar.done))
        anchors.save(anchors_dir, replace=True)
        readout, anchors_built = fit_readout(anchors), True
        readout.save(anchors_dir)
    reader = load(name, **spec, anchors=str(anchors_dir))  # the same LM and index, with the anchors
    test = load_dataset("rotten_tomatoes:test")
    rows = [evaluate(engine, test, method="zero", k=0, limit=n), evaluate(engine, test, method="knn", k=k, limit=n),
            evaluate(reader, test, anchor_weight=1.0, anchor_readout="linear", limit=n)]
    rows[2]["k"] = 0  # the readout alone scores no demonstrations: it reads the query's anchor features
    rows.append(mixture(rows[1], rows[2], DEMO_WEIGHT))
    [example] = engine.classify([test[0].input], dataclasses.replace(engine.defaults, method=SelectionMethod.KNN, k=k))
    return {"index": {"path": str(folder), "count": index.manifest["count"], "built": built,
                      "data": f"rotten_tomatoes:train[{pool}@0]"},
            "anchors": {"path": str(anchors_dir), "built": anchors_built, "trained_parameters": int(readout.weight.size + readout.bias.size),
                        "labelled_records": len(index)},
            "rows": rows, "example": {"input": test[0].input, "gold": test[0].output, "prediction": asdict(example)}}


def mixture(icl: dict, readout: dict, weight: float) -> dict:
    """kNN ICL's label probabilities mixed with the readout's (weight on the readout), from two
    evaluations of the same queries: what the engine computes for anchor_weight=weight, without
    scoring the prompts a second time. Same keys as an evaluation."""
    from ..core.metrics import accuracy, confusion_matrix, macro_f1

    labels = icl["labels"]
    preds = []
    for a, b in zip(icl["predictions"], readout["predictions"], strict=True):
        probs = {lab: (1 - weight) * a["probs"][lab] + weight * b["probs"][lab] for lab in labels}
        preds.append({**a, "label": max(labels, key=probs.__getitem__), "probs": probs})
    seconds = icl["seconds"] + readout["seconds"]
    gold, guess = [p["gold"] for p in preds], [p["label"] for p in preds]
    metrics = {"accuracy": accuracy(gold, guess), "macro_f1": macro_f1(gold, guess, labels),
               "confusion_matrix": confusion_matrix(gold, guess, labels).tolist()}
    return {**icl, **metrics, "method": f"{icl['answered_by']} + readout weight={weight:g}",
            "answered_by": f"{icl['answered_by']} + readout weight={weight:g}", "predictions": preds,
            "seconds": seconds, "queries_per_s": len(preds) / seconds}
