"""Queries behind the front ends: classify, generate, evaluate, label whole files, the demo. Each
takes a PipelineConfig (the engine it names comes from the process's one engine cache,
engines.ENGINES, and its options travel with the call) or a loaded Engine, and returns JSON-ready
dicts."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from ..core.choices import DEFAULT_LM
from ..core.data import load_dataset
from ..core.engines import get_engine
from ..core.evaluate import evaluate
from ..core.index import ExampleIndex, index_path
from ..core.pipeline import Engine, PipelineConfig, QueryOptions
from ..core.prompt import Template
from . import ray_jobs, shards
from .indexes import build_index

__all__ = ["make_config", "classify", "generate", "evaluate_file", "classify_file", "generate_file", "run_demo"]

def make_config(name: str, *, template: Path | None = None, soft_prompt: Path | None = None,
                indexes_dir: Path | None = None, **kw) -> PipelineConfig:
    return PipelineConfig(
        index=name, indexes_dir=str(indexes_dir) if indexes_dir else None,
        template=Template.from_json(template) if template else None,
        soft_prompt=str(soft_prompt) if soft_prompt else None, **kw)


def _options(engine: Engine | PipelineConfig) -> QueryOptions:
    """A config's own options; a loaded engine's defaults."""
    return engine.defaults if isinstance(engine, Engine) else engine.options


def classify(engine: Engine | PipelineConfig, text: str) -> dict:
    if not text.strip():
        raise ValueError("the query is empty")
    [pred] = get_engine(engine).classify([text], _options(engine))
    return asdict(pred)


def generate(engine: Engine | PipelineConfig, input: str) -> dict:
    if not input.strip():
        raise ValueError("the input is empty")
    [gen] = get_engine(engine).generate([input], _options(engine))
    return asdict(gen)


def evaluate_file(engine: Engine | PipelineConfig, test: str, *, limit=None, text_field=None,
                  label_field=None, ray: "ray_jobs.RayOptions | None" = None) -> dict:
    """Evaluate on a test file. `ray`: the queries are answered by the Ray engine pool
    (ray_jobs.PoolLabeller; a config, not a loaded engine); the metrics are the same."""
    # the test file is checked before an LM loads (seconds to minutes): a mistake there fails fast
    index = engine.index if isinstance(engine, Engine) else ExampleIndex.load(index_path(engine.index,
                                                                                          engine.indexes_dir))
    # the index's label list: a test label the index does not know is refused by the loader
    test_set = load_dataset(test, kind=index.kind, text_field=text_field, label_field=label_field,
                            labels=index.labels or None)
    if ray is not None:
        if isinstance(engine, Engine):
            raise ValueError("evaluating on Ray takes a PipelineConfig (each actor loads its own engine)")
        return evaluate(ray_jobs.PoolLabeller(engine, index, ray), test_set, engine.options, limit=limit)
    return evaluate(get_engine(engine), test_set, _options(engine), limit=limit)


def classify_file(config: PipelineConfig, source: str, out: Path, *, text_field: str | None = None,
                  shard_size: int = 256, ray: "ray_jobs.RayOptions | None" = None) -> dict:
    """Label every text of a JSONL/CSV/Parquet file into `out`, resumably, in one process or on a
    Ray actor pool of engines (shards.py); returns a summary (the labels are in `out`)."""
    return shards.classify_file(config, source, out, text_field=text_field, shard_size=shard_size, ray=ray)


def generate_file(config: PipelineConfig, source: str, out: Path, *, text_field: str | None = None,
                  shard_size: int = 256, ray: "ray_jobs.RayOptions | None" = None) -> dict:
    """An output (and its demonstration ids) for every input of a JSONL/CSV/Parquet file, into
    `out`, resumably, in one process or on the Ray engine pool (shards.py); returns a summary."""
    return shards.generate_file(config, source, out, text_field=text_field, shard_size=shard_size, ray=ray)


def run_demo(*, n: int = 200, k: int = 8, lm: str = DEFAULT_LM, indexes_dir: Path | None = None) -> dict:
    """Build (once) the built-in Rotten Tomatoes index, then compare zero-shot, random-k and kNN-k
    on `n` held-out reviews with the packaged LM -> {index, rows (one per method), example}."""
    name = "rotten_tomatoes"
    folder = index_path(name, indexes_dir)
    try:
        index = ExampleIndex.load(folder)
        built = False
    except (ValueError, FileNotFoundError):
        build_index("rotten_tomatoes:train", name, indexes_dir=indexes_dir)
        index, built = ExampleIndex.load(folder), True
    engine = Engine.load(PipelineConfig(index=name, indexes_dir=str(indexes_dir) if indexes_dir else None, lm=lm),
                         index=index)
    test = load_dataset("rotten_tomatoes:test")
    rows = [evaluate(engine, test, method=m, k=0 if m == "zero" else k, limit=n) for m in ("zero", "random", "knn")]
    [example] = engine.classify([test[0].input])
    return {"index": {"path": str(folder), "count": index.manifest["count"], "built": built}, "rows": rows,
            "example": {"input": test[0].input, "gold": test[0].output, "prediction": asdict(example)}}
