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

Labelling (classify-file, generate-file, eval --ray) runs on a second kind of pool: long-lived
engine actors (EngineActor, Ray's ActorPool), each holding an EngineCache, kept for the session
so that every later job reuses their loaded LMs; each shard of texts is one task
(run_shards). They are ended before a Ray Data job, which needs their CPUs.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..core.data import PACKAGED, DataError, Dataset, load_dataset, pick_fields

__all__ = ["RayMissingError", "RayOptions", "INSTALL_HINT", "require_ray", "init_ray", "read_and_embed", "embed_texts",
           "embed_to_file", "EmbedActor", "Job", "EngineActor", "engine_actors", "close_engine_pools", "remote_config", "run_shards",
           "user_error", "PoolLabeller", "WRITE_ROWS"]

INSTALL_HINT = "pip install 'icl-engine[ray]'"
VECTOR = "__icl_vector"  # the column the actors add: float32 [d] per row
WRITE_ROWS = 4096  # embed_to_file: vectors the driver holds before appending them to the file
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


# An INFO line of Ray's C++ logging: "[2026-12-05 19:09:02,246 I 31622 31622] logging.cc:303: ..."
_NATIVE_INFO = re.compile(r"^\[[^\]]* I \d+ \d+\] ")


@contextmanager
def _native_info_dropped(enabled: bool):
    """Ray's C++ core writes to file descriptor 2 itself, past Python's logging; even with its
    level at fatal it says so in an INFO line ("Set ray log level ... to 3"). While Ray starts,
    fd 2 goes to a temporary file; its INFO lines are dropped and anything else is written back."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines = tmp.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not _NATIVE_INFO.match(line)))
            sys.stderr.flush()


def init_ray(options: RayOptions):
    """Connect to `options.address`, or start a local Ray sized for the pool (one CPU more for
    the read tasks), unless this process is connected already (e.g. a test session's Ray)."""
    ray = require_ray()
    if not ray.is_initialized():
        local = None if options.address else max(os.cpu_count() or 1, int(options.workers * options.cpus_per_worker) + 1)
        # Ray's own INFO/WARNING lines (its start-up line, the token-authentication notice) and its
        # C++ core's log lines (a notice about actor restarts) would come before our progress and a
        # one-line `error:`; its errors still reach the user as exceptions. ICL_DEBUG shows them.
        quiet = not os.environ.get("ICL_DEBUG")
        if quiet:
            os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
        with _native_info_dropped(quiet):
            ray.init(address=options.address, num_cpus=local, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.ERROR)
    # Ray Data logs each execution's plan (and a failed read's traceback) to the console; its
    # session log file keeps them, the terminal shows our progress lines and one `error:` line
    for handler in logging.getLogger("ray.data").handlers:
        if "File" not in type(handler).__name__:
            handler.setLevel(logging.CRITICAL)
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # rows come back in file order
    ray.data.DataContext.get_current().enable_progress_bars = False  # our own lines, not Ray's bars
    return ray


class EmbedActor:
    """One actor of the pool: loads the embedder once, then embeds batch after batch."""

    def __init__(self, embedder: str, text_field: str, threads: int, cache: bool = True):
        from ..core.embed import get_embedder

        self.embedder = get_embedder(embedder, **({} if cache else {"cache_dir": False}))
        if not self.embedder.is_hashing:  # (a hashing embedder never imports torch: the actor starts seconds sooner)
            import torch

            torch.set_num_threads(threads)  # its share of the machine, not every core per actor
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
    close_engine_pools()  # idle engine actors would hold CPUs the embedding pool and its reads need
    items = ray.data.from_items([{"text": t} for t in texts], override_num_blocks=_blocks(options))
    rows = _embed(items, embedder, "text", options).take_all()
    return np.stack([r[VECTOR] for r in rows]).astype(np.float32, copy=False)


def read_and_embed(source: str, *, embedder: str, options: RayOptions, text_field: str | None = None,
                   label_field: str | None = None, id_field: str | None = None) -> tuple[Dataset, np.ndarray]:
    """Read `source` with Ray Data and embed it with the actor pool -> (dataset, vectors [n, d]),
    vectors[i] belonging to dataset.records[i], as the single-process build would make them."""
    if source in PACKAGED:
        dataset = load_dataset(source, text_field=text_field, label_field=label_field, id_field=id_field)
        return dataset, embed_texts([r.input for r in dataset.records], embedder, options)
    ray = init_ray(options)
    close_engine_pools()  # idle engine actors would hold CPUs the embedding pool and its reads need
    ds = _read(ray, source, options)
    try:
        tf, _ = pick_fields(ds.columns(), text_field, label_field, source)  # the loader checks them again
        taken = _embed(ds, embedder, tf, options).take_all()
    except ray.exceptions.RayTaskError as e:  # the file itself could not be parsed (bad JSON, ragged CSV)
        raise _read_failure(e, source) from None
    rows, by_text = [], {}
    for row in taken:
        vector = row.pop(VECTOR)
        row = {k: plain(v) for k, v in row.items()}
        rows.append(row)
        by_text.setdefault(text_of(row.get(tf)), vector)
    dataset = load_dataset(source, text_field=text_field, label_field=label_field, id_field=id_field, rows=rows)
    return dataset, np.stack([by_text[r.input] for r in dataset.records]).astype(np.float32, copy=False)


def _read_failure(e: Exception, source: str) -> Exception:
    """What to raise for a Ray task error while reading and embedding `source`: an actor's user
    mistake as itself; a file Ray Data could not parse (bad JSON, ragged CSV) as one DataError."""
    cause = user_error(e)
    if cause is e or "::Read" not in str(e).split("\n", 1)[0]:  # e.g. "ray::ReadPandasJSON->SplitBlocks(8)()"
        return cause
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return DataError(f"{source}: Ray Data could not read it ({first}); the plain build names the bad line")


def embed_to_file(source: str, out: Path, *, embedder: str, options: RayOptions, text_field: str | None = None,
                  label_field: str | None = None, id_field: str | None = None) -> tuple[Dataset, np.memmap]:
    """read_and_embed for pools beyond the driver's RAM -> (dataset, vectors [n, d] float32, an
    np.memmap of `out`), vectors[i] belonging to dataset.records[i] as read_and_embed gives them.

    The rows stream from the pool in file order (iter_rows, not take_all: a Ray Data batch at a
    time); their vectors are appended to a file beside `out` a block of rows at a time and only
    the rows' fields stay on the driver, for load_dataset(rows=...) to parse as the plain build
    does (same ids, dedup, errors). When the records are not the rows one to one (a row with
    several references, a repeated text) the vectors are copied into record order, a block at a time."""
    ray = init_ray(options)
    close_engine_pools()  # idle engine actors would hold CPUs the embedding pool and its reads need
    raw = out.with_name(out.name + ".rows")  # [rows, d] in file order
    if source in PACKAGED:  # loaded here; only its texts go through the pool
        dataset = load_dataset(source, text_field=text_field, label_field=label_field, id_field=id_field)
        items = ray.data.from_items([{"text": r.input} for r in dataset.records], override_num_blocks=_blocks(options))
        dim = _append_vectors((row[VECTOR] for row in _embed(items, embedder, "text", options).iter_rows()), out)
        return dataset, _open_rows(out, dim)
    ds = _read(ray, source, options)
    rows, first = [], {}  # first: text -> the first row that has it (its vector is the records')

    def vectors():
        for row in _embed(ds, embedder, tf, options).iter_rows():
            vector = row.pop(VECTOR)
            row = {k: plain(v) for k, v in row.items()}
            first.setdefault(text_of(row.get(tf)), len(rows))
            rows.append(row)
            yield vector

    try:
        tf, _ = pick_fields(ds.columns(), text_field, label_field, source)  # the loader checks them again
        dim = _append_vectors(vectors(), raw)
    except ray.exceptions.RayTaskError as e:
        raise _read_failure(e, source) from None
    dataset = load_dataset(source, text_field=text_field, label_field=label_field, id_field=id_field, rows=rows)
    where = np.fromiter((first[r.input] for r in dataset.records), np.int64, len(dataset))  # [n] row of each record
    if np.array_equal(where, np.arange(len(rows))):
        raw.rename(out)
    else:
        by_row = _open_rows(raw, dim)
        _append_vectors((v for a in range(0, len(where), WRITE_ROWS) for v in by_row[where[a : a + WRITE_ROWS]]), out)
        del by_row
        raw.unlink()
    return dataset, _open_rows(out, dim)


def _append_vectors(vectors: Iterator[np.ndarray], path: Path) -> int | None:
    """Write the [d] vectors to `path` as float32 rows [n, d], WRITE_ROWS at a time (the driver
    holds one block, never all of them); returns d (None: no rows). A vector of another size, or
    one not finite, is refused."""
    dim = None
    with open(path, "wb") as f:
        buf = []
        for v in itertools.chain(vectors, [None]):  # None: the end, write what is left
            if v is not None:
                buf.append(v)
            if buf and (v is None or len(buf) >= WRITE_ROWS):
                b = np.stack(buf).astype(np.float32, copy=False)  # [<= block, d]
                dim = dim or b.shape[1]
                if b.ndim != 2 or b.shape[1] != dim or not np.isfinite(b).all():
                    raise ValueError(f"embedder: expected finite embeddings of dimension {dim}, got {list(b.shape)}")
                f.write(memoryview(np.ascontiguousarray(b)))
                buf = []
    return dim


def _open_rows(path: Path, dim: int | None) -> np.memmap:
    """The [n, d] float32 rows of a file _append_vectors wrote, as a read-only memmap."""
    if dim is None:
        return np.zeros((0, 0), np.float32)
    return np.memmap(path, dtype=np.float32, mode="r").reshape(-1, dim)


class Job(str, Enum):
    """What an engine actor does with a slice of texts: label it into a shard file (the file
    commands), or hand the engine's results back (an evaluation)."""

    CLASSIFY_FILE = "classify-file"
    GENERATE_FILE = "generate-file"
    CLASSIFY = "classify"
    GENERATE = "generate"


class EngineActor:
    """One actor of the engine pool. It keeps an EngineCache, so it loads an LM once and every
    later job that names the same LM (another file, another k, an evaluation) reuses it."""

    def __init__(self, threads: int):
        import torch

        from ..core.engines import EngineCache, freeze_loaded_heap

        torch.set_num_threads(threads)
        # the actor's process is ours, and long-lived: its full collections skip what a load made
        self.engines = EngineCache(size=2, on_load=lambda _engine: freeze_loaded_heap())

    def lm_name(self, config: dict) -> str:
        """The name the engine of `config` gives its LM (loading the engine: a bad config fails here)."""
        return self._engine(config).lm.name

    def resolve(self, config: dict, query: dict) -> tuple[dict, str]:
        """The options that answer `query` on the engine of `config` (method auto: its fit), in words too."""
        from ..core.config import QueryOptions

        engine = self._engine(config)
        o = engine.resolve(QueryOptions(**query))
        return o.to_dict(), engine.describe(o)

    def run(self, config: dict, job: Job, texts: list[str], start: int, parts: str | None, shard: int,
            query: dict | None = None) -> tuple[int, object]:
        """(shard, result): the number of texts written into the shard's file, or the engine's
        Predictions / Generations for an evaluation. `query`: the QueryOptions (as a dict) of
        every text, default the config's own."""
        from ..core.config import PipelineConfig, QueryOptions
        from .shards import FILE_ROWS, write_shard

        config = PipelineConfig.from_dict(config)
        engine, options = self.engines.get(config), QueryOptions(**query) if query else config.options
        if job is Job.CLASSIFY:
            return shard, engine.classify(texts, options)
        if job is Job.GENERATE:
            return shard, engine.generate(texts, options)
        write_shard(Path(parts), shard, FILE_ROWS[job.value](engine, texts, start, options))  # atomic: retry-safe
        return shard, len(texts)

    def _engine(self, config: dict):
        from ..core.config import PipelineConfig

        return self.engines.get(PipelineConfig.from_dict(config))


_POOLS: dict[tuple, list] = {}  # (Ray node, job, workers, CPUs per worker) -> that pool's actors


def engine_actors(options: RayOptions) -> list:
    """The engine pool of these options in this Ray session, started on first use and kept
    until close_engine_pools() or the end of the session: a process that labels several files or
    runs several evaluations pays the actors' start-up (imports, LM load) once. A dead actor is
    restarted and its task retried (max_restarts, max_task_retries): shards are written
    atomically, so a retry is safe."""
    ray = init_ray(options)
    ctx = ray.get_runtime_context()
    key = (ctx.get_node_id(), ctx.get_job_id(), options.workers, options.cpus_per_worker)
    if key not in _POOLS:
        close_engine_pools()  # other options: their actors give their CPUs back first
        remote = ray.remote(EngineActor).options(num_cpus=options.cpus_per_worker, max_restarts=2,
                                                 max_task_retries=2)
        _POOLS[key] = [remote.remote(max(1, int(options.cpus_per_worker))) for _ in range(options.workers)]
    return _POOLS[key]


def close_engine_pools() -> None:
    """End the engine actors this process started (their CPUs go back to Ray: a Ray Data job
    such as an index build needs them)."""
    ray = require_ray()
    if ray.is_initialized():
        node = ray.get_runtime_context().get_node_id()
        for key, actors in _POOLS.items():
            for actor in actors if key[0] == node else ():  # a former session's actors are gone already
                ray.kill(actor)
    _POOLS.clear()


def remote_config(config) -> dict:
    """The config as a dict an actor can load: paths made absolute (an actor's working directory
    is not ours), the index named by its folder."""
    from ..core.index import index_path

    d = config.to_dict()
    d.update(index=str(index_path(config.index, config.indexes_dir).resolve()), indexes_dir=None)
    for key in ("lm", "soft_prompt", "anchors"):
        if d.get(key) and Path(d[key]).exists():
            d[key] = str(Path(d[key]).resolve())
    return d


def run_shards(config, job: Job, texts: Sequence[str], shards: Sequence[tuple[int, int, int]], options: RayOptions,
               *, parts: Path | None = None, query=None) -> Iterator[tuple[int, object]]:
    """Hand `shards` [(shard, start, stop)] of `texts` to the engine pool, one task each, an actor
    taking the next as it frees up; yields (shard, result) as they finish (any order). A user
    mistake raised in an actor (a ValueError: bad anchors, a wrong index kind) is raised here as
    itself, one line, not wrapped in Ray's traceback. `query`: the QueryOptions of every text
    (default the config's own)."""
    from ray.util import ActorPool

    ray = init_ray(options)
    cfg, job, where = remote_config(config), Job(job), str(Path(parts).resolve()) if parts is not None else None
    q = query.to_dict() if query is not None else None
    pool = ActorPool(engine_actors(options))
    results = pool.map_unordered(lambda actor, sh: actor.run.remote(cfg, job, list(texts[sh[1]:sh[2]]), sh[1],
                                                                     where, sh[0], q), list(shards))
    try:
        yield from results
    except ray.exceptions.RayTaskError as e:
        raise user_error(e) from None


def user_error(e: Exception) -> Exception:
    """The ValueError an actor raised (a user mistake, one line), else Ray's error itself."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, ValueError) else e


class PoolLabeller:
    """An evaluation's queries labelled by the engine pool (evaluate.Labeller): each chunk one
    task, results as they finish. The driver holds the index (labels, kind), not the LM."""

    def __init__(self, config, index, options: RayOptions):
        self.config, self.index, self.options = config, index, options
        self.spec, self.defaults = config.spec, config.options
        actor = engine_actors(options)[0]
        ray = init_ray(options)
        remote = remote_config(config)
        try:  # loads the engine on one actor first: a bad config fails once, before the work
            name = ray.get(actor.lm_name.remote(remote))
        except ray.exceptions.RayTaskError as e:
            raise user_error(e) from None
        self.lm_name = config.lm if name == remote["lm"] else name  # as given, not the actors' absolute path

    def resolve(self, query):
        from ..core.config import QueryOptions

        ray = init_ray(self.options)
        resolved, words = ray.get(engine_actors(self.options)[0].resolve.remote(remote_config(self.config),
                                                                                query.to_dict()))
        return QueryOptions(**resolved), words

    def classify_chunks(self, texts: Sequence[str], chunk: int, query):
        return self._chunks(Job.CLASSIFY, texts, chunk, query)

    def generate_chunks(self, inputs: Sequence[str], chunk: int, query):
        return self._chunks(Job.GENERATE, inputs, chunk, query)

    def _chunks(self, job: Job, texts: Sequence[str], chunk: int, query):
        # a chunk is one actor's task: no larger than an equal share, so every actor has work
        chunk = max(1, min(chunk, -(-len(texts) // self.options.workers)))
        shards = [(i, s, min(len(texts), s + chunk)) for i, s in enumerate(range(0, len(texts), chunk))]
        for shard, results in run_shards(self.config, job, texts, shards, self.options, query=query):
            yield slice(shards[shard][1], shards[shard][2]), results
