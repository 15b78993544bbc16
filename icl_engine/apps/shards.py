"""Labelling a whole file (`icl classify-file IN --out OUT [--ray]`, and `icl generate-file` for a
generation index), resumably: the texts are cut into shards, each shard's results are written
atomically to OUT.parts/ as soon as it is done, and OUT (JSONL, or Parquet when it ends in
.parquet) is assembled from the shards at the end. A re-run of the same job skips the shards
already written, so an interrupted or failed run resumes instead of starting over; a different
job (another config, index version or input) is refused.

    summary = classify_file(config, "texts.jsonl", "labels.jsonl")                 # one process
    summary = classify_file(config, "texts.jsonl", "labels.jsonl", ray=RayOptions(workers=4))
    summary = generate_file(config, "inputs.jsonl", "outputs.jsonl")              # a generation index

Each output row, in input order: classify-file {"row", "text", "label", "probs", "log_scores",
"demo_ids", "prompt_tokens"}; generate-file {"row", "input", "output", "demo_ids",
"prompt_tokens"} (the engine's output: greedy unless the config samples). With Ray, the engine
pool (ray_jobs: each actor loads the LM and index once) takes whole shards and writes them itself
(the parts folder must be on storage every actor sees); Ray retries a shard whose actor died.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from ..core.atomic import check_out_file, read_json, write_json, write_text, writing
from ..core.config import PipelineConfig, QueryOptions
from ..core.data import read_texts
from ..core.engines import get_engine
from ..core.index import ExampleIndex, index_path, index_version
from ..core.progress import Progress, say

if TYPE_CHECKING:  # the model libraries load with the engine, after the job is checked
    from ..core.pipeline import Engine, Prediction

__all__ = ["ShardError", "classify_file", "generate_file", "label_file", "prediction_rows", "generation_rows",
           "rows_of_predictions", "shard_rows", "FILE_ROWS", "write_shard", "shard_path", "JOB_FILE"]

JOB_FILE = "job.json"  # in OUT.parts/: what the shards there were made by
SHARD_SIZE = 256  # texts a shard by default: the unit of resumption (and, on Ray, of an actor's task)
SMALL_FOR_RAY = 64  # texts per actor below which an actor pool is slower than one process


class ShardError(ValueError):
    """An output whose parts folder belongs to another job, or an output that cannot be written."""


def shard_path(parts: Path, shard: int) -> Path:
    return parts / f"shard-{shard:06d}.jsonl"


def prediction_rows(engine: Engine, texts: list[str], start: int, options: QueryOptions | None = None) -> list[dict]:
    """The output rows of texts[start:...] (row numbers count from 0 in the input file)."""
    return rows_of_predictions(texts, engine.classify(texts, options), start)


def rows_of_predictions(texts: list[str], preds: list[Prediction], start: int) -> list[dict]:
    return [{"row": start + i, "text": t, "label": p.label, "probs": p.probs, "log_scores": p.log_scores,
             "demo_ids": p.demo_ids, "prompt_tokens": p.prompt_tokens}
            for i, (t, p) in enumerate(zip(texts, preds))]


def shard_rows(command: str, engine: Engine, texts: list[str], todo: list[tuple[int, int, int]],
               options: QueryOptions | None = None, *, overlap: bool | None = None) -> Iterator[list[dict]]:
    """The output rows of each (shard, start, stop) of `todo`, in order. classify-file runs the
    shards as one pipeline (evaluate.classify_chunks: on a GPU the next shard is prepared while
    the LM scores this one). That works because every shard but the file's last holds
    exactly `shard_size` texts and the last comes last, so chunks of the pending texts are the
    pending shards even when finished shards lie between them."""
    if command != "classify-file" or not todo:
        for _, start, stop in todo:
            yield FILE_ROWS[command](engine, texts[start:stop], start, options)
        return
    from ..core.evaluate import classify_chunks

    size = todo[0][2] - todo[0][1]
    pending = [t for _, start, stop in todo for t in texts[start:stop]]
    chunks = classify_chunks(engine, pending, size, options, overlap=overlap)
    for (_, start, stop), (_, preds) in zip(todo, chunks):
        yield rows_of_predictions(texts[start:stop], preds, start)


def generation_rows(engine: Engine, inputs: list[str], start: int, options: QueryOptions | None = None) -> list[dict]:
    """The output rows of inputs[start:...]: the engine's output text and its demonstrations."""
    gens = engine.generate(inputs, options)
    return [{"row": start + i, "input": t, "output": g.output, "demo_ids": g.demo_ids,
             "prompt_tokens": g.prompt_tokens} for i, (t, g) in enumerate(zip(inputs, gens))]


FILE_ROWS = {"classify-file": prediction_rows, "generate-file": generation_rows}  # command -> one shard's rows


def write_shard(parts: Path, shard: int, rows: list[dict]) -> None:
    """One shard's rows, written atomically: it exists complete or not at all."""
    write_text(shard_path(parts, shard), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _job(config: PipelineConfig, texts: list[str], shard_size: int) -> dict:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode() + b"\x1e")
    folder = index_path(config.index, config.indexes_dir)
    return {"config": config.to_dict(), "index_version": index_version(folder), "texts": len(texts),
            "texts_sha256": h.hexdigest(), "shard_size": shard_size}


def _with_defaults(job: dict) -> dict:
    """A job read back, its config completed with the defaults of fields added to PipelineConfig
    after it was written (e.g. `compile`): an upgrade alone never refuses a resume."""
    config = job.get("config") if isinstance(job, dict) else None
    if not isinstance(config, dict):
        return job
    defaults = json.loads(json.dumps(PipelineConfig(index="-").to_dict()))  # every field at its default
    del defaults["index"]  # (required: never missing)
    return {**job, "config": {**defaults, **config}}


def _open_parts(parts: Path, job: dict, command: str) -> bool:
    """Make OUT.parts for this job (True), or check that the one there is this job's (then
    reused: False)."""
    if (parts / JOB_FILE).exists():
        stored = _with_defaults(read_json(parts / JOB_FILE, "the job description", ShardError))
        if stored != json.loads(json.dumps(job)):
            raise ShardError(f"{parts} holds the shards of another job (other config, index version or input); "
                             "remove it or choose another --out")
        return False
    if parts.exists() and any(parts.iterdir()):
        raise ShardError(f"{parts} exists and is not a {command} parts folder; remove it or choose another --out")
    write_json(parts / JOB_FILE, job)
    return True


def classify_file(config: PipelineConfig, source: str | Path, out: str | Path, *, text_field: str | None = None,
                  shard_size: int | None = None, ray=None, progress: bool = True) -> dict:
    """Label every text of `source` into `out` (see the module doc); returns a summary."""
    return label_file("classify-file", config, source, out, text_field=text_field, shard_size=shard_size, ray=ray,
                      progress=progress)


def generate_file(config: PipelineConfig, source: str | Path, out: str | Path, *, text_field: str | None = None,
                  shard_size: int | None = None, ray=None, progress: bool = True) -> dict:
    """An output for every input of `source`, into `out` (see the module doc); returns a summary."""
    return label_file("generate-file", config, source, out, text_field=text_field, shard_size=shard_size, ray=ray,
                      progress=progress)


def label_file(command: str, config: PipelineConfig, source: str | Path, out: str | Path, *,
               text_field: str | None = None, shard_size: int | None = None, ray=None, progress: bool = True) -> dict:
    """`command` (a key of FILE_ROWS) over every text of `source`, shard by shard, into `out`."""
    if command not in FILE_ROWS:
        raise ShardError(f"unknown file command {command!r}")
    if shard_size is not None and shard_size < 1:
        raise ShardError(f"shard size must be >= 1, got {shard_size}")
    out = Path(out)
    if out.is_dir():
        raise ShardError(f"--out {out} is a folder; give a file name (.jsonl or .parquet)")
    parts = out.with_name(out.name + ".parts")
    folder = index_path(config.index, config.indexes_dir)
    reads = [folder, config.lm, config.soft_prompt, config.anchors]
    check_out_file(out, inputs=[source], folders=[f for f in reads if f and Path(f).is_dir()])  # nothing read is overwritten
    if index_version(folder) is None:  # before OUT.parts exists: a mistake leaves nothing behind
        ExampleIndex.load(folder)  # says why in one line (no such index, a damaged one)
    texts, field = read_texts(source, text_field)
    shard_size = shard_size or default_shard_size(len(texts), ray)
    job = _job(config, texts, shard_size)
    if command != "classify-file":  # (classify-file's job files predate the key; they stay readable)
        job["command"] = command
    made = _open_parts(parts, job, command)
    try:
        return _run_job(command, config, texts, field, shard_size, out, parts, ray, progress)
    except BaseException:
        if made and not any(p.name.startswith("shard-") for p in parts.iterdir()):
            shutil.rmtree(parts, ignore_errors=True)  # nothing done yet: leave no trace of this run
        raise


def default_shard_size(n: int, ray) -> int:
    """SHARD_SIZE texts a shard; on Ray, fewer when that leaves an actor without a shard (each
    actor takes whole shards). A file too small to repay the actors' start is said so."""
    if ray is None:
        return SHARD_SIZE
    if n < SMALL_FOR_RAY * ray.workers:
        say(f"note: {n} texts for {ray.workers} Ray actors: starting them (each loads the LM) costs more than "
            "labelling so few in one process; leave out --ray for small files")
    return max(1, min(SHARD_SIZE, -(-n // ray.workers)))


def _run_job(command: str, config: PipelineConfig, texts: list[str], field: str, shard_size: int, out: Path,
             parts: Path, ray, progress: bool) -> dict:
    shards = [(i, s, min(len(texts), s + shard_size)) for i, s in enumerate(range(0, len(texts), shard_size))]
    todo = [sh for sh in shards if not shard_path(parts, sh[0]).exists()]
    t0 = time.perf_counter()
    with Progress(len(texts), command, unit="texts", enabled=progress) as bar:
        bar.update(len(texts) - sum(stop - start for _, start, stop in todo))  # resumed shards count as done
        if ray is not None and todo:
            from .ray_jobs import Job, run_shards

            for _, n in run_shards(config, Job(command), texts, todo, ray, parts=parts):
                bar.update(n)
        else:
            engine = get_engine(config) if todo else None
            for (shard, start, stop), rows in zip(todo, shard_rows(command, engine, texts, todo, config.options)):
                write_shard(parts, shard, rows)
                bar.update(stop - start)
    seconds = time.perf_counter() - t0
    _assemble(parts, [sh[0] for sh in shards], out)
    return {"out": str(out), "texts": len(texts), "field": field, "shards": len(shards),
            "resumed_shards": len(shards) - len(todo), "seconds": round(seconds, 3), "parts": str(parts)}


def _assemble(parts: Path, shards: list[int], out: Path) -> None:
    """OUT from the shards, in order, written atomically (JSONL, or Parquet for a .parquet name)."""
    if out.suffix != ".parquet":
        write_text(out, "".join(shard_path(parts, s).read_text(encoding="utf-8") for s in shards))
        return
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ShardError(f"--out {out}: writing Parquet needs pyarrow (pip install pyarrow)") from None
    rows = [json.loads(line) for s in shards for line in shard_path(parts, s).read_text(encoding="utf-8").splitlines()]
    for r in rows:  # a map column of probabilities; Parquet wants one type per column
        if "probs" in r:
            r["probs"] = [{"label": k, "p": v} for k, v in r["probs"].items()]
    with writing(out) as tmp:
        pq.write_table(pa.Table.from_pylist(rows), tmp)
