"""Experiment `retrieval`: real data, bounded context. Grow the pool the demonstrations are
retrieved from (nested subsets, N = 16 ... the whole training set, log-spaced), keep k fixed,
and measure the ICL predictor's error and its disagreement with a fine-tuned reference trained
on the same pool. With k fixed the context is bounded, so the relevant bound is
N = O(1/eps^2 log 1/delta): disagreement (and the TV between label distributions) should fall
with log-log slope -1/2.

The predictor and the reference are callables, `predict(pool, test) -> (labels, probs [q, L])`
in the order of `pool.labels`, so this module does not depend on how the engine or the
fine-tuning are built. A reference trained once on the whole training set (and ignoring
`pool`) should carry the attribute `fixed = True` so the report says so. `baselines.knn_vote` / `baselines.bow_logreg` are cheap stand-ins;
reports name whatever ran and flag baselines as such.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ...core.choices import DEFAULT_EMBEDDER
from ...core.data import DataError, Dataset, TaskKind
from ...core.embed import get_embedder
from ...core.index import ExampleIndex
from ...core.pipeline import Engine, PipelineConfig
from ...core.prompt import Template
from ...core.registry import BUILTINS
from ...core.templates import resolve_template
from ..bounds import PREDICTED_SLOPE, Bound, format_theory_table, theory_table
from ..report import finish, machine_info, progress
from .baselines import Predictor
from .common import (
    ExperimentError,
    curve,
    fits_table,
    log_grid,
    plot_curves,
    points_table,
    verdict_counts,
    verdict_line,
)

__all__ = ["RetrievalConfig", "run_retrieval", "engine_predictor", "RETRIEVAL_DATASETS"]

# the built-in classification datasets (registry.BUILTINS): the experiment labels with their templates
RETRIEVAL_DATASETS = tuple(n for n, t in BUILTINS.items() if t.kind is TaskKind.CLASSIFICATION)


@dataclass
class RetrievalConfig:
    datasets: tuple[str, ...] = RETRIEVAL_DATASETS
    n_min: int = 16
    n_points: int = 8  # log-spaced pool sizes from n_min to the whole training pool
    draws: int = 3  # independent nested pool orders
    n_test: int | None = 200  # first n_test of the test split (None: all)
    k: int = 8  # demonstrations per query: recorded; the predictor must use it
    snips_test_fraction: float = 0.2
    data_dir: str | None = None  # None: registry.data_dir() (env ICL_SHARED_DATA, else ../shared/data)
    n_boot: int = 2000

    def __post_init__(self):
        self.datasets = tuple(self.datasets)
        unknown = [d for d in self.datasets if d not in RETRIEVAL_DATASETS]
        if unknown or not self.datasets:
            raise ExperimentError(f"datasets must be from {RETRIEVAL_DATASETS}, got {self.datasets}")
        for name in ("n_min", "n_points", "draws", "k", "n_boot"):
            if getattr(self, name) < 1:
                raise ExperimentError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_test is not None and self.n_test < 1:
            raise ExperimentError(f"n_test must be >= 1 or None, got {self.n_test}")
        if not 0 < self.snips_test_fraction < 1:
            raise ExperimentError(f"snips_test_fraction must be in (0, 1), got {self.snips_test_fraction}")

    @classmethod
    def preset(cls, quick: bool) -> "RetrievalConfig":
        # Cost with the SmolLM2 engine ~ draws x n_points x n_test prompts of ~250 tokens per
        # dataset: quick ~640 prompts (~4 min on 2 CPU cores), full ~9.6k (~60 min).
        return cls(n_points=5, draws=2, n_test=32) if quick else cls()


def engine_predictor(lm, *, k: int, embedder: str = DEFAULT_EMBEDDER, template: Template | None = None) -> Predictor:
    """(pool, test) -> (labels, probs [q, L]): the ICL engine with kNN-k demonstrations from an
    in-memory index of `pool` (k = 0: zero-shot, e.g. for a fine-tuned reference). The template:
    `template`, else the built-in dataset's the pool was drawn from (resolve_template), else the
    task default."""
    emb = get_embedder(embedder)

    def predict(pool: Dataset, test: Dataset):
        index = ExampleIndex.build(pool, emb)
        tpl = resolve_template(pool.kind, given=template, dataset=pool.name)
        cfg = PipelineConfig(index=pool.name, lm=lm.name, k=k, method="knn" if k else "zero")
        engine = Engine.from_parts(cfg, index, emb, lm, tpl)
        preds = engine.classify([r.input for r in test])
        return [p.label for p in preds], np.array([[p.probs[lab] for lab in index.labels] for p in preds])

    predict.__name__ = f"icl_engine ({lm.name}, {'kNN-%d' % k if k else 'zero-shot'}, embedder {emb.name})"
    return predict


def _describe(fn) -> str:
    name = getattr(fn, "__name__", type(fn).__name__)
    return f"{name} (BASELINE stand-in, not the LM)" if getattr(fn, "baseline", False) else name


def _call(fn: Predictor, pool: Dataset, test: Dataset, what: str) -> tuple[np.ndarray, np.ndarray]:
    labels, probs = fn(pool, test)
    probs = np.asarray(probs, dtype=np.float64)
    if len(labels) != len(test) or probs.shape != (len(test), len(pool.labels)):
        raise ExperimentError(f"{what} returned {len(labels)} labels and probs {probs.shape}; expected "
                              f"{len(test)} and ({len(test)}, {len(pool.labels)})")
    return np.asarray(labels), probs


def _measure(pool: Dataset, test: Dataset, grid, predict, reference, cfg, seed) -> dict:
    K = len(grid)
    out = {k: np.zeros((cfg.draws, K)) for k in ("error", "disagreement", "prob_tv", "reference_error")}
    gold = np.array([r.output for r in test])
    ref_out = None  # a reference trained once answers the same whatever the pool: ask it once
    for r in range(cfg.draws):
        perm = np.random.default_rng([seed, r]).permutation(len(pool))  # nested: first N of one order
        for j, n in enumerate(grid):
            progress(f"retrieval {pool.name}: draw {r + 1}/{cfg.draws}, N = {n}")
            sub = pool.select(perm[:n].tolist(), f"{pool.name}[{n}@{r}]")
            pred, probs = _call(predict, sub, test, "predict")
            if ref_out is None or not getattr(reference, "fixed", False):
                ref_out = _call(reference, sub, test, "reference")
            ref, ref_probs = ref_out
            out["error"][r, j] = np.mean(pred != gold)
            out["disagreement"][r, j] = np.mean(pred != ref)
            out["prob_tv"][r, j] = 0.5 * np.abs(probs - ref_probs).sum(1).mean()
            out["reference_error"][r, j] = np.mean(ref != gold)
    return out


def run_retrieval(out: Path, *, predict: Predictor, reference: Predictor, config: RetrievalConfig,
                  seed: int = 0, lm_name: str | None = None) -> dict:
    """Run over each dataset of the config; write results.json, report.md and PNGs into `out`."""
    t0 = time.perf_counter()
    cfg = config
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    curves, tasks, skipped, raw = [], {}, {}, {}
    kw = dict(n_boot=cfg.n_boot, seed=seed)
    # what the setup does not give the theory (k fixed is what the bounded-context bound assumes;
    # the predictor and reference are named in the report's header)
    notes = ["the reference is trained once, not on each pool of N (fixed across N)"
             if getattr(reference, "fixed", False) else "the reference is refit on each pool, so it moves with N too"]
    for task in cfg.datasets:
        try:
            pool, test = BUILTINS[task].splits(cfg.data_dir, test_fraction=cfg.snips_test_fraction)
        except DataError as e:
            skipped[task] = str(e)
            continue
        if cfg.n_test is not None:
            test = test.select(range(min(cfg.n_test, len(test))))
        grid = log_grid(min(cfg.n_min, len(pool)), len(pool), cfg.n_points)
        m = _measure(pool, test, grid, predict, reference, cfg, seed)
        raw[task] = m
        tasks[task] = {"pool": len(pool), "test": len(test), "labels": list(pool.labels), "n_grid": list(grid)}
        bounded = PREDICTED_SLOPE[Bound.LINEAR_BOUNDED]
        basis = "bounded-context bound N = O(1/eps^2 log 1/delta)"
        curves += [
            curve(f"disagreement {task}", grid, m["disagreement"], group="disagreement", predicted=bounded,
                  basis=basis, metric="label disagreement with the reference", notes=notes, **kw),
            curve(f"label-prob TV {task}", grid, m["prob_tv"], group="prob_tv", predicted=bounded, basis=basis,
                  metric="TV between predictor and reference label distributions", notes=notes, **kw),
            curve(f"error {task}", grid, m["error"], group="error", predicted=None, basis="no bound on error vs gold",
                  metric="error vs gold labels", **kw),
            curve(f"reference error {task}", grid, m["reference_error"], group="reference_error", predicted=None,
                  basis="no bound on error vs gold", metric="reference error vs gold labels", **kw),
        ]
    if not tasks:
        raise ExperimentError(f"no dataset could be loaded: {skipped}")
    results = {
        "experiment": "retrieval", "settings": asdict(cfg), "seed": seed, "machine": machine_info(),
        "predictor": _describe(predict), "reference": _describe(reference), "lm": lm_name,
        "tasks": tasks, "skipped": skipped, "curves": curves, "verdicts": verdict_counts(curves),
        "theory_table": theory_table(0.1, 0.05, V=2, m=1, l=1, d=1), "raw": raw,
    }
    plots = []
    for task in tasks:
        plots.append(plot_curves(out / f"retrieval_{task}.png", [c for c in curves if c["name"].endswith(task)],
                                 title=f"{task}: pool size N, k = {cfg.k}", ylabel="rate / TV"))
    results["plots"] = [p.name for p in plots]
    return finish(out, results, t0, lambda res: _report(res, cfg))


def _report(res: dict, cfg: RetrievalConfig) -> str:
    lines = [
        "# Bounds experiment: retrieval on real data (bounded context)", "",
        f"Predictor: {res['predictor']}. Reference: {res['reference']}. LM: {res['lm'] or '–'}.",
        f"Machine {res['machine']['platform']}; wall time {res['wall_time_s']:.1f} s; seed {res['seed']}; "
        f"{cfg.draws} nested pool draws; k = {cfg.k}.", "",
        "| task | pool | test | labels | N |", "|---|---:|---:|---|---|",
        *[f"| {t} | {v['pool']} | {v['test']} | {len(v['labels'])} | {v['n_grid']} |" for t, v in res["tasks"].items()],
        "", *[f"- skipped {t}: {why}" for t, why in res["skipped"].items()], "",
        "## Verdicts", "", *[verdict_line(c) for c in res["curves"]], "",
        "## Fits", "", fits_table(res["curves"]), "",
        "## Theory (constants hidden: shapes only)", "", format_theory_table(res["theory_table"]), "",
        "## Points", "", points_table(res["curves"]), "",
    ]
    return "\n".join(lines)
