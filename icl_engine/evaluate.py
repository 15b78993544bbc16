"""Evaluate an engine on a labelled test set: accuracy / macro-F1 / confusion matrix for
classification, BLEU / ROUGE-L against all references of an input for generation."""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from .data import Dataset, TaskKind, group_references
from .metrics import accuracy, bleu, confusion_matrix, macro_f1, rouge_l
from .pipeline import Engine
from .progress import Progress
from .select import SelectionMethod

__all__ = ["evaluate", "fewer_demos", "format_table", "UnknownLabelError"]


class UnknownLabelError(ValueError):
    pass


def _chunks(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


def evaluate(
    engine: Engine,
    test: Dataset,
    *,
    method: SelectionMethod | str | None = None,
    k: int | None = None,
    limit: int | None = None,
    progress: bool = True,
    chunk: int = 32,
) -> dict:
    """Run the engine over `test` (first `limit` examples, or distinct inputs for generation)
    and return one JSON-ready dict of metrics, timings and per-example predictions."""
    method = SelectionMethod(method or engine.config.method)
    k = engine.config.k if k is None else k
    out = {"method": method.value, "k": k, "index": engine.config.index, "lm": engine.lm.name,
           "calibration": engine.config.calibration.value}
    desc = f"eval {method.value}-{k}"
    t0 = time.perf_counter()
    if engine.index.kind is TaskKind.CLASSIFICATION:
        records = list(test.records[:limit])
        unknown = sorted({r.output for r in records} - set(engine.index.labels))
        if unknown:
            raise UnknownLabelError(
                f"test labels {unknown} are not among the index's labels {list(engine.index.labels)}")
        preds = []
        with Progress(len(records), desc, unit="queries", enabled=progress) as bar:
            for s in _chunks(len(records), chunk):
                preds += engine.classify([r.input for r in records[s]], method=method, k=k)
                bar.update(s.stop - s.start)
        seconds = time.perf_counter() - t0
        gold, guess = [r.output for r in records], [p.label for p in preds]
        out.update(
            n=len(records), accuracy=accuracy(gold, guess),
            macro_f1=macro_f1(gold, guess, engine.index.labels),
            labels=list(engine.index.labels),
            confusion_matrix=confusion_matrix(gold, guess, engine.index.labels).tolist(),
            mean_prompt_tokens=float(np.mean([p.prompt_tokens for p in preds])),
            predictions=[{"id": r.id, "gold": r.output, "pred": p.label, "probs": p.probs,
                          "demos": [d.id for d in p.demos]} for r, p in zip(records, preds)],
        )
    else:
        groups = group_references(test.records)[:limit]
        gens = []
        with Progress(len(groups), desc, unit="inputs", enabled=progress) as bar:
            for s in _chunks(len(groups), chunk):
                gens += engine.generate([inp for inp, _ in groups[s]], method=method, k=k)
                bar.update(s.stop - s.start)
        seconds = time.perf_counter() - t0
        hyps, refs = [g.text for g in gens], [r for _, r in groups]
        out.update(
            n=len(groups), bleu=bleu(hyps, refs), rouge_l=rouge_l(hyps, refs),
            mean_prompt_tokens=float(np.mean([g.prompt_tokens for g in gens])),
            predictions=[{"input": i, "output": g.text, "references": r, "demos": [d.id for d in g.demos]}
                         for (i, r), g in zip(groups, gens)],
        )
        preds = gens
    fewer = fewer_demos(preds, k if method is not SelectionMethod.ZERO else 0)
    if fewer:  # never silent: how many queries got fewer than k demonstrations, and why
        out["fewer_demos"] = fewer
    out.update(seconds=seconds, queries_per_s=out["n"] / seconds if seconds > 0 else float("inf"))
    return out


def fewer_demos(results: Sequence, k: int) -> dict | None:
    """Predictions/Generations -> {queries, short, skipped, dropped}: how many queries got fewer
    than k demonstrations, and the demonstrations missing for lack of distinct inputs (short), too
    long alone for the budget (skipped) and left out of a full budget (dropped); None if none."""
    queries = sum(len(r.demos) < k for r in results)
    if not queries:
        return None
    return {"queries": queries, "short": sum(r.short for r in results),
            "skipped": sum(len(r.skipped) for r in results), "dropped": sum(r.dropped for r in results)}


def format_table(rows: Sequence[dict]) -> str:
    """A markdown table of evaluation results (one row per evaluate() call)."""
    gen = "bleu" in rows[0]
    head = ["method", "k", "calibration", "n"] + (["BLEU", "ROUGE-L"] if gen else ["accuracy", "macro-F1"]) + ["q/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        metrics = [f"{r['bleu']:.2f}", f"{r['rouge_l']:.2f}"] if gen else [f"{r['accuracy']:.3f}", f"{r['macro_f1']:.3f}"]
        lines.append("| " + " | ".join([r["method"], str(r["k"]), r["calibration"], str(r["n"]), *metrics,
                                       f"{r['queries_per_s']:.2f}"]) + " |")
    return "\n".join(lines)
