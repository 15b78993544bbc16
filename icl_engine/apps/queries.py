"""Queries behind the front ends: classify, generate, evaluate, label whole files, the demo. Each
takes a PipelineConfig (the engine it names comes from the process's one engine cache,
engines.ENGINES, and its options travel with the call) or a loaded Engine, and returns JSON-ready
dicts. The inputs are checked before the model libraries are imported (seconds), so a mistake
costs a fraction of a second."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.choices import DEFAULT_LM
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


def run_demo(*, n: int = 200, k: int = 8, lm: str = DEFAULT_LM, indexes_dir: Path | None = None) -> dict:
    """Build (once) the built-in Rotten Tomatoes index, then compare zero-shot, random-k and kNN-k
    on `n` held-out reviews with the packaged LM -> {index, rows (one per method), example}."""
    from ..core.evaluate import evaluate
    from ..core.pipeline import Engine

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
