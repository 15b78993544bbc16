"""The Ray front end: embedding a pool on a Ray cluster (Ray Data + an actor pool), for data that
outgrows one process. Optional (`pip install 'icl-engine[ray]'`): without Ray, asking for it is
one line, RayMissingError, saying how to install it. Nothing in the core imports this module.

    dataset, vectors = read_and_embed("s3://bucket/train.jsonl", embedder="all-MiniLM-L6-v2",
                                      options=RayOptions(workers=4))
    index = ExampleIndex.from_vectors(dataset, vectors, canonical_name("all-MiniLM-L6-v2"))

How: Ray Data reads the file in blocks (JSONL, CSV/TSV, Parquet; a local path or any URL pyarrow
/ fsspec can open), an actor pool embeds the text column (each actor loads the embedder once, in
its constructor, and keeps it for every batch), and the driver collects rows and vectors in file
order (preserve_order). The driver then parses the rows exactly as the single-process loader
parses the file (data.load_dataset(rows=...)), so the ids, the errors and the index are the same.
A built-in dataset name is loaded on the driver and only its texts go through the pool.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .data import BUILTIN_DATASETS, DataError, Dataset, load_dataset, pick_fields

__all__ = ["RayMissingError", "RayOptions", "INSTALL_HINT", "require_ray", "init_ray", "read_and_embed", "embed_texts",
           "classify_shards", "EmbedActor", "ClassifyActor"]

INSTALL_HINT = "pip install 'icl-engine[ray]'"
VECTOR = "__icl_vector"  # the column the actors add: float32 [d] per row
_READERS = {".jsonl": "json", ".json": "json", ".ndjson": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}


class RayMissingError(ValueError):
    """--ray was asked for and Ray is not installed (or too old)."""


@dataclass
class RayOptions:
    address: str | None = None  # a running cluster ("auto", "ray://host:10001"); None: local, started here
    workers: int = 2  # actors in the embedding pool, each with its own copy of the model
    batch_size: int = 256  # rows per batch sent to an actor
    cpus_per_worker: float = 1.0  # Ray CPUs each actor reserves (and its torch threads, at least 1)
    embedding_cache: bool = True  # actors read/write the on-disk embedding cache (off: embed everything, for timing)

    def __post_init__(self):
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"workers must be an integer >= 1, got {self.workers!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if not self.cpus_per_worker > 0:
            raise ValueError(f"cpus_per_worker must be > 0, got {self.cpus_per_worker!r}")


def require_ray():
    """The `ray` module with Ray Data, or RayMissingError with the install command."""
    try:
        import ray
        import ray.data  # noqa: F401 - the [data] extra (pyarrow, pandas)
    except ImportError as e:
        raise RayMissingError(f"--ray needs Ray with Ray Data, which is not installed ({e.name}): "
                              f"{INSTALL_HINT}") from None
    return ray


def init_ray(options: RayOptions):
    """Connect to `options.address`, or start a local Ray sized for the pool (one CPU more for
    the read tasks), unless this process is connected already (e.g. a test session's Ray)."""
    ray = require_ray()
    if not ray.is_initialized():
        local = None if options.address else max(os.cpu_count() or 1, int(options.workers * options.cpus_per_worker) + 1)
        ray.init(address=options.address, num_cpus=local, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # rows come back in file order
    ray.data.DataContext.get_current().enable_progress_bars = False  # our own lines, not Ray's bars
    return ray


class EmbedActor:
    """One actor of the pool: loads the embedder once, then embeds batch after batch."""

    def __init__(self, embedder: str, text_field: str, threads: int, cache: bool = True):
        import torch

        from .embed import get_embedder

        torch.set_num_threads(threads)  # its share of the machine, not every core per actor
        self.embedder = get_embedder(embedder, **({} if cache else {"cache_dir": False}))
        self.text_field = text_field

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [text_of(v) for v in batch[self.text_field]]
        batch[VECTOR] = self.embedder.encode(texts, show_progress=False)  # [b, d]
        return batch


def text_of(value) -> str:
    """The text the loader will read from a cell (it strips; an integer becomes its digits);
    anything else gets "" here and is refused by the loader with its one-line error."""
    value = plain(value)
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    return value.strip() if isinstance(value, str) else ""


def plain(value):
    """A Ray Data cell as the JSON reader would give it: numpy scalars and arrays to Python."""
    if isinstance(value, np.ndarray):
        return [plain(v) for v in value.tolist()]
    return value.item() if isinstance(value, np.generic) else value


def _read(ray, source: str, options: RayOptions):
    kind = _READERS.get(Path(source.split("?")[0]).suffix.lower())
    if kind is None:
        raise DataError(f"{source}: --ray reads .jsonl, .csv, .tsv and .parquet files")
    if "://" not in source:  # a local file: Ray's workers may run elsewhere than the current directory
        if not Path(source).exists():
            raise DataError(f"{source}: no such file")
        source = str(Path(source).resolve())
    blocks = {"override_num_blocks": _blocks(options), "file_extensions": None}  # one file still feeds every actor
    if kind == "json":
        return ray.data.read_json(source, lines=True, **blocks)
    if kind == "parquet":
        return ray.data.read_parquet(source, **blocks)
    import pyarrow.csv

    delimiter = "\t" if source.lower().endswith(".tsv") else ","
    return ray.data.read_csv(source, parse_options=pyarrow.csv.ParseOptions(delimiter=delimiter), **blocks)


def _blocks(options: RayOptions) -> int:
    return 4 * options.workers  # a few blocks per actor: the pool stays busy while blocks finish unevenly


def _embed(ds, embedder: str, text_field: str, options: RayOptions):
    import ray.data

    return ds.map_batches(EmbedActor, fn_constructor_kwargs={"embedder": embedder, "text_field": text_field,
                                                             "threads": max(1, int(options.cpus_per_worker)),
                                                             "cache": options.embedding_cache},
                          compute=ray.data.ActorPoolStrategy(size=options.workers), batch_size=options.batch_size,
                          num_cpus=options.cpus_per_worker, batch_format="numpy")


def embed_texts(texts: Sequence[str], embedder: str, options: RayOptions) -> np.ndarray:
    """Embed `texts` with the actor pool; float32 [n, d] in the order of `texts`."""
    ray = init_ray(options)
    items = ray.data.from_items([{"text": t} for t in texts], override_num_blocks=_blocks(options))
    rows = _embed(items, embedder, "text", options).take_all()
    return np.stack([r[VECTOR] for r in rows]).astype(np.float32, copy=False)


def read_and_embed(source: str, *, embedder: str, options: RayOptions, text_field: str | None = None,
                   label_field: str | None = None, id_field: str | None = None) -> tuple[Dataset, np.ndarray]:
    """Read `source` with Ray Data and embed it with the actor pool -> (dataset, vectors [n, d]),
    vectors[i] belonging to dataset.records[i], as the single-process build would make them."""
    if source in BUILTIN_DATASETS:
        dataset = load_dataset(source, text_field=text_field, label_field=label_field, id_field=id_field)
        return dataset, embed_texts([r.input for r in dataset.records], embedder, options)
    ray = init_ray(options)
    ds = _read(ray, source, options)
    tf, _ = pick_fields(ds.columns(), text_field, label_field, source)  # the loader checks them again
    rows, by_text = [], {}
    for row in _embed(ds, embedder, tf, options).take_all():
        vector = row.pop(VECTOR)
        row = {k: plain(v) for k, v in row.items()}
        rows.append(row)
        by_text.setdefault(text_of(row.get(tf)), vector)
    dataset = load_dataset(source, text_field=text_field, label_field=label_field, id_field=id_field, rows=rows)
    return dataset, np.stack([by_text[r.input] for r in dataset.records]).astype(np.float32, copy=False)


class ClassifyActor:
    """One actor of the labelling pool: loads the engine (LM, index, embedder) once, then labels
    whole shards and writes each one itself, atomically (shards.write_shard)."""

    def __init__(self, config: dict, parts: str, threads: int):
        import torch

        from .pipeline import Engine, PipelineConfig

        torch.set_num_threads(threads)
        self.engine, self.parts = Engine.load(PipelineConfig.from_dict(config)), Path(parts)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from .shards import prediction_rows, write_shard

        done = []
        for shard, start, texts in zip(batch["shard"], batch["start"], batch["texts"]):
            write_shard(self.parts, int(shard), prediction_rows(self.engine, plain(texts), int(start)))
            done.append(len(texts))
        return {"shard": batch["shard"], "n": np.array(done)}


def classify_shards(config, texts: Sequence[str], shards: Sequence[tuple[int, int, int]], parts: Path,
                    options: RayOptions):
    """Label `shards` [(shard, start, stop)] of `texts` with a pool of engines, each shard written
    into `parts` by its actor; yields each finished shard's number of texts (for progress)."""
    from .index import index_path

    ray = init_ray(options)
    config_dict = config.to_dict()  # with absolute paths: an actor's working directory is not ours
    config_dict.update(index=str(index_path(config.index, config.indexes_dir).resolve()), indexes_dir=None)
    for key in ("lm", "soft_prompt"):
        if config_dict.get(key) and Path(config_dict[key]).exists():
            config_dict[key] = str(Path(config_dict[key]).resolve())
    items = ray.data.from_items([{"shard": s, "start": a, "texts": list(texts[a:b])} for s, a, b in shards],
                                override_num_blocks=min(len(shards), _blocks(options)))
    done = items.map_batches(ClassifyActor, fn_constructor_kwargs={
        "config": config_dict, "parts": str(Path(parts).resolve()), "threads": max(1, int(options.cpus_per_worker))},
        compute=ray.data.ActorPoolStrategy(size=options.workers), batch_size=1, num_cpus=options.cpus_per_worker,
        batch_format="numpy")
    for row in done.iter_rows():
        yield int(row["n"])
