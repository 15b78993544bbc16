"""Evaluate an engine on a labelled test set: accuracy / macro-F1 / confusion matrix for
classification, BLEU / ROUGE-L against all references of an input for generation.

The queries are answered by a Labeller: an Engine in this process (EngineLabeller), or any
object with the same few members, e.g. ray_jobs.PoolLabeller, whose chunks run on a pool of Ray
actors and come back in any order. The metrics are computed here either way."""

from __future__ import annotations

import dataclasses
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ContextManager, Iterator, Protocol, Sequence

import numpy as np

from .choices import SelectionMethod
from .config import EngineSpec, QueryOptions
from .data import Dataset, TaskKind, group_references
from .metrics import accuracy, bleu, confusion_matrix, macro_f1, rouge_l
from .pipeline import Engine, Generation, Prediction
from .progress import Progress

if TYPE_CHECKING:  # (index.py imports faiss; the engine runs without it)
    from .index import ExampleIndex

__all__ = ["evaluate", "classify_chunks", "CHUNK_BATCHES", "prepare_stream", "fewer_demos",
           "UnknownLabelError", "Labeller", "EngineLabeller"]


MIN_CHUNK = 32  # queries per engine call at least
# LM batches per engine call by default: the length buckets (score.length_batches) cut each LM
# batch from this many batches' worth of queries sorted by length: the more to sort, the closer
# the lengths in a batch and the less padding; 8 takes most of the gain at every batch size
# (benchmarks/results/padding_bench.md).
CHUNK_BATCHES = 8


class UnknownLabelError(ValueError):
    pass


def _chunks(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


def classify_chunks(engine: Engine, texts: Sequence[str], chunk: int, options: QueryOptions | None = None, *,
                    overlap: bool | None = None) -> Iterator[tuple[slice, list]]:
    """(slice, its Predictions) for each chunk of `texts`, in order. With `overlap` (default: the
    LM is on a GPU) the chunks run as a pipeline in this one thread: chunk i+1 is prepared
    (embedding, selection, prompts) while the GPU scores chunk i, and queued behind it before
    chunk i's scores are collected, so the GPU has the next chunk as soon as it is done.

    Not a second thread: a thread preparing the next chunk gains little on a GPU, because the
    thread launching the LM's kernels gives up the GIL at each kernel and waits to get it back
    while the preparing thread runs Python (up to the 5 ms switch interval), so the two mostly take
    turns. The results are the same either way."""
    if overlap is None:
        overlap = getattr(engine.lm.device, "type", "cpu") == "cuda"
    slices = list(_chunks(len(texts), chunk))
    if not overlap or len(slices) < 2:
        for s in slices:
            yield s, engine.classify(texts[s], options)
        return
    side = prepare_stream(engine.lm.device)

    def launch(s: slice):
        with side():  # the GPU work of preparing (an embedder, an index) must not wait for the LM
            prepared = engine.prepare(texts[s], options)
        return engine.launch(prepared)

    running = launch(slices[0])
    for i, s in enumerate(slices):
        following = launch(slices[i + 1]) if i + 1 < len(slices) else None  # while chunk i runs
        yield s, engine.collect(running)
        running = following


def prepare_stream(device) -> Callable[[], ContextManager]:
    """What preparing a chunk runs its GPU work in (an embedder or an index on the GPU). On a
    CUDA device: a stream of its own. On the LM's stream its kernels would queue behind the LM's
    forward for the chunk before, and its first copy to the CPU would wait for that forward."""
    if getattr(device, "type", "cpu") != "cuda":
        return nullcontext
    import torch

    stream = torch.cuda.Stream(device)
    return lambda: torch.cuda.stream(stream)


class Labeller(Protocol):
    """What evaluate needs of an engine: its spec, default options and index, its LM's name, and
    answers for chunks of queries as (slice of the queries, their results), in any order."""

    spec: EngineSpec
    defaults: QueryOptions
    index: ExampleIndex
    lm_name: str

    def classify_chunks(self, texts: Sequence[str], chunk: int,
                        options: QueryOptions) -> Iterator[tuple[slice, list[Prediction]]]: ...

    def generate_chunks(self, inputs: Sequence[str], chunk: int,
                        options: QueryOptions) -> Iterator[tuple[slice, list[Generation]]]: ...

    def resolve(self, options: QueryOptions) -> tuple[QueryOptions, str]: ...  # the options that answer, in words


@dataclass
class EngineLabeller:
    """A Labeller over an Engine in this process (chunks in order; see classify_chunks for `overlap`)."""

    engine: Engine
    overlap: bool | None = None

    @property
    def spec(self) -> EngineSpec:
        return self.engine.spec

    @property
    def defaults(self) -> QueryOptions:
        return self.engine.defaults

    @property
    def index(self) -> ExampleIndex:
        return self.engine.index

    @property
    def lm_name(self) -> str:
        return self.engine.lm.name

    def resolve(self, options):
        o = self.engine.resolve(options)
        return o, self.engine.describe(o)

    def classify_chunks(self, texts, chunk, options):
        return classify_chunks(self.engine, texts, chunk, options, overlap=self.overlap)

    def generate_chunks(self, inputs, chunk, options):
        for s in _chunks(len(inputs), chunk):
            yield s, self.engine.generate(inputs[s], options)


def _collect(chunks: Iterator[tuple[slice, list]], n: int, bar, row) -> tuple[list, np.ndarray]:
    """The results of n queries from chunks that may come in any order, each turned into its
    output row (`row(i, result)`) as its chunk arrives, plus their counts: int64 [n, 5] of
    prompt tokens, demonstrations, short, skipped, dropped (what `fewer_demos` reads). The
    Predictions/Generations (a dozen objects a query, 8 of them Demos) die with their chunk:
    kept to the end they were most of what a run leaves for the garbage collector's full
    collections to walk."""
    rows, counts = [None] * n, np.zeros((n, 5), np.int64)
    for s, batch in chunks:
        for i, r in zip(range(s.start, s.stop), batch):
            rows[i] = row(i, r)
            counts[i] = (r.prompt_tokens, len(r.demos), r.short, len(r.skipped), r.dropped)
        bar.update(s.stop - s.start)
    return rows, counts


def _eval_classification(labeller: Labeller, test: Dataset, limit: int | None, chunk: int, o: QueryOptions,
                         desc: str, progress: bool) -> tuple[dict, np.ndarray]:
    """evaluate's classification fields (accuracy, macro-F1, confusion, predictions) and the
    per-query counts [n, 5] of _collect."""
    index = labeller.index
    records = list(test.records[:limit])
    unknown = sorted({r.output for r in records} - set(index.labels))
    if unknown:
        raise UnknownLabelError(f"test labels {unknown} are not among the index's labels {list(index.labels)}")
    gold = [r.output for r in records]
    row = lambda i, p: {"id": records[i].id, "text": p.text, "gold": gold[i], "label": p.label,  # noqa: E731
                        "probs": p.probs, "log_scores": p.log_scores, "demo_ids": p.demo_ids}
    with Progress(len(records), desc, unit="queries", enabled=progress) as bar:
        preds, counts = _collect(labeller.classify_chunks([r.input for r in records], chunk, o),
                                 len(records), bar, row)
    guess = [p["label"] for p in preds]
    return dict(
        n=len(records), accuracy=accuracy(gold, guess),
        macro_f1=macro_f1(gold, guess, index.labels),
        labels=list(index.labels),
        confusion_matrix=confusion_matrix(gold, guess, index.labels).tolist(),
        mean_prompt_tokens=float(np.mean(counts[:, 0])),
        predictions=preds,
    ), counts


def _eval_generation(labeller: Labeller, test: Dataset, limit: int | None, chunk: int, o: QueryOptions,
                     desc: str, progress: bool) -> tuple[dict, np.ndarray]:
    """evaluate's generation fields (BLEU, ROUGE-L against every reference of an input, the
    outputs) and the per-input counts [n, 5] of _collect."""
    groups = group_references(test.records)[:limit]
    row = lambda i, g: {"input": g.input, "output": g.output, "references": groups[i][1],  # noqa: E731
                        "demo_ids": g.demo_ids}
    with Progress(len(groups), desc, unit="inputs", enabled=progress) as bar:
        gens, counts = _collect(labeller.generate_chunks([inp for inp, _ in groups], chunk, o),
                                len(groups), bar, row)
    hyps, refs = [g["output"] for g in gens], [r for _, r in groups]
    return dict(
        n=len(groups), bleu=bleu(hyps, refs), rouge_l=rouge_l(hyps, refs),
        mean_prompt_tokens=float(np.mean(counts[:, 0])),
        predictions=gens,
    ), counts


def evaluate(
    engine: Engine | Labeller,
    test: Dataset,
    options: QueryOptions | None = None,
    *,
    limit: int | None = None,
    progress: bool = True,
    chunk: int | None = None,
    overlap: bool | None = None,
    **overrides,
) -> dict:
    """Run the engine over `test` (first `limit` examples, or distinct inputs for generation)
    and return one JSON-ready dict of metrics, timings and per-example predictions.

    `chunk`: queries handed to the engine per call (the progress step); default CHUNK_BATCHES
    LM batches (at least MIN_CHUNK queries), so an LM batch is never cut short by the chunk and
    the length buckets have queries to choose from. `overlap`: prepare the next chunk while the LM
    scores this one (classify_chunks; default: when the LM is on a GPU, as on a CPU the LM's
    work is done before its call returns). `engine` may be a Labeller instead (answers from
    elsewhere, e.g. a Ray pool). `options` (default: the engine's), with `overrides` (QueryOptions
    fields: method="zero", k=4) applied, are every query's."""
    labeller = EngineLabeller(engine, overlap) if isinstance(engine, Engine) else engine
    index = labeller.index
    o = options or labeller.defaults
    o = dataclasses.replace(o.options, **{k: v for k, v in overrides.items() if v is not None})
    o, answered_by = labeller.resolve(o)  # method auto: the index's fit, if it has one
    chunk = max(MIN_CHUNK, CHUNK_BATCHES * o.batch_size) if chunk is None else chunk
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    k = 0 if o.method is SelectionMethod.ZERO else o.k  # zero-shot shows no demonstrations, whatever k says
    out = {"method": o.method.value, "k": k, "index": labeller.spec.index, "lm": labeller.lm_name,
           "calibration": o.calibration.value, "scoring": o.scoring.value, "answered_by": answered_by}
    desc = f"eval {answered_by}"  # what answers (e.g. "readout" for anchor_weight=1), not only the method
    t0 = time.perf_counter()
    run = _eval_classification if index.kind is TaskKind.CLASSIFICATION else _eval_generation
    fields, counts = run(labeller, test, limit, chunk, o, desc, progress)
    seconds = time.perf_counter() - t0
    out.update(fields)
    fewer = _fewer(counts[:, 1:], k)
    if fewer:  # never silent: how many queries got fewer than k demonstrations, and why
        out["fewer_demos"] = fewer
    out.update(seconds=seconds, queries_per_s=out["n"] / seconds if seconds > 0 else float("inf"))
    return out


def fewer_demos(results: Sequence, k: int) -> dict | None:
    """Predictions/Generations -> {queries, short, skipped, dropped}: how many queries got fewer
    than k demonstrations, and the demonstrations missing for lack of distinct inputs (short), too
    long alone for the budget (skipped) and left out of a full budget (dropped); None if none."""
    counts = np.array([(len(r.demos), r.short, len(r.skipped), r.dropped) for r in results], np.int64)
    return _fewer(counts.reshape(-1, 4), k)


def _fewer(counts: np.ndarray, k: int) -> dict | None:
    """fewer_demos over int64 [n, 4] counts: demonstrations, short, skipped, dropped."""
    queries = int((counts[:, 0] < k).sum())
    if not queries:
        return None
    short, skipped, dropped = (int(x) for x in counts[:, 1:].sum(0))
    return {"queries": queries, "short": short, "skipped": skipped, "dropped": dropped}
