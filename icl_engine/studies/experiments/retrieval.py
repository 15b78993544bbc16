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

Cached rows (`cached`, `cached_same_k`): the same measurement, at the same pools, for the
engine with cached scoring (core/kvcache.py) over a KV cache of each pool: k = min(N,
cached_k_max) demonstrations ("many-shot": k grows with N, which cached scoring affords because
its cost is the query's tokens, not the prompt's), and with the exact predictor's k (like for
like). Each row gets its own error, disagreement and TV curves, fitted and judged as the exact
ones are; the exact curves, plot and report lines stay as they are without the rows.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ...core.choices import DEFAULT_EMBEDDER, KVDType
from ...core.data import DataError, Dataset, TaskKind
from ...core.embed import get_embedder
from ...core.index import ExampleIndex
from ...core.kvcache import KVCache, build_kv_cache, kv_folder
from ...core.pipeline import Engine, PipelineConfig, QueryOptions
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

__all__ = ["RetrievalConfig", "run_retrieval", "engine_predictor", "cached_predictor", "RETRIEVAL_DATASETS"]

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
    cached: bool = False  # also a cached many-shot row: k = min(N, cached_k_max), over a KV cache of each pool
    cached_k_max: int = 64
    cached_same_k: bool = False  # also a cached row with the exact predictor's k (like for like)
    cached_dtype: str = "bfloat16"  # how the rows' KV caches store keys and values (KVDType)

    def __post_init__(self):
        self.datasets = tuple(self.datasets)
        unknown = [d for d in self.datasets if d not in RETRIEVAL_DATASETS]
        if unknown or not self.datasets:
            raise ExperimentError(f"datasets must be from {RETRIEVAL_DATASETS}, got {self.datasets}")
        if self.cached_dtype not in {t.value for t in KVDType}:
            raise ExperimentError(f"cached_dtype must be one of {[t.value for t in KVDType]}, got {self.cached_dtype!r}")
        for name in ("n_min", "n_points", "draws", "k", "n_boot", "cached_k_max"):
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
    # the cached rows' predictors (run_retrieval asks for them): the same LM, embedder and template
    predict.cached = lambda k_max=None, dtype=KVDType.BFLOAT16: cached_predictor(
        lm, k=k, k_max=k_max, embedder=emb, template=template, dtype=dtype)
    return predict


def cached_predictor(lm, *, k: int, k_max: int | None = None, embedder=DEFAULT_EMBEDDER,
                     template: Template | None = None, dtype: KVDType | str = KVDType.BFLOAT16) -> Predictor:
    """(pool, test) -> (labels, probs [q, L]): the engine with cached scoring over a KV cache of
    `pool`, kNN-k demonstrations, or k = min(N, k_max) when k_max is given (many-shot: all k are
    kept whatever the context, kvcache.py). `predict.k_for(N)` says which k a pool of N gets.

    The cache holds only the records some test query retrieves (at this k, over an index of the
    whole pool): exact kNN over a subset that holds every query's k nearest (in pool order, so
    ties break alike) selects the same demonstrations, and the cache is then as big as
    queries x k, not N. It is built for that subset's own index and loaded with every check."""
    emb = get_embedder(embedder) if isinstance(embedder, str) else embedder
    dtype = KVDType(dtype)

    def k_for(n: int) -> int:
        return k if k_max is None else min(n, k_max)

    def predict(pool: Dataset, test: Dataset):
        opts = QueryOptions(k=k_for(len(pool)), method="knn", scoring="cached")
        queries = [r.input for r in test]
        whole = _engine(pool, ExampleIndex.build(pool, emb), emb, lm, template)
        rows = sorted({int(i) for s in whole.select(queries, opts) for i in s.ids})
        part = pool.select(rows, f"{pool.name}[retrieved]")
        engine = _engine(pool, ExampleIndex.from_vectors(part, whole.index.vectors[rows], emb.name), emb, lm, template)
        with tempfile.TemporaryDirectory(prefix="icl-retrieval-kv-") as tmp:
            folder = kv_folder(tmp)
            build_kv_cache(lm, engine.builder, engine.index, folder, dtype=dtype)
            engine.use_kv_cache(KVCache.load(folder, lm=lm, builder=engine.builder, index=engine.index))
            preds = engine.classify(queries, opts)
        return [p.label for p in preds], np.array([[p.probs[lab] for lab in pool.labels] for p in preds])

    predict.k_for = k_for
    shots = f"kNN-{k}" if k_max is None else f"kNN-min(N, {k_max})"
    predict.__name__ = f"icl_engine ({lm.name}, {shots}, cached scoring, {dtype.value} KV cache, embedder {emb.name})"
    return predict


def _engine(pool: Dataset, index: ExampleIndex, emb, lm, template: Template | None) -> Engine:
    """An engine over an index in memory, with the template engine_predictor would use for `pool`."""
    tpl = resolve_template(pool.kind, given=template, dataset=pool.name)
    return Engine.from_parts(PipelineConfig(index=pool.name, lm=lm.name), index, emb, lm, tpl)


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


@dataclass(frozen=True)
class _Row:
    """An extra predictor measured at the same pools: its curves' names and group say which."""

    key: str  # in curve groups and raw keys: "cached_many_shot"
    label: str  # in curve names and the report: "cached many-shot"
    predict: Predictor
    note: str | None = None  # what this row's setup does not give the bounded-context bound


def _cached_rows(predict: Predictor, cfg: RetrievalConfig) -> list[_Row]:
    """The cached rows the config asks for, made by the exact predictor (engine_predictor)."""
    if not (cfg.cached or cfg.cached_same_k):
        return []
    make = getattr(predict, "cached", None)
    if make is None:
        raise ExperimentError(f"cached rows need the engine predictor (engine_predictor), not {_describe(predict)}")
    rows = []
    if cfg.cached:
        rows.append(_Row("cached_many_shot", "cached many-shot", make(k_max=cfg.cached_k_max, dtype=cfg.cached_dtype),
                         f"k = min(N, {cfg.cached_k_max}) grows with N: up to N = {cfg.cached_k_max} the whole pool "
                         "is in context"))
    if cfg.cached_same_k:
        rows.append(_Row("cached_same_k", "cached same-k", make(dtype=cfg.cached_dtype)))
    return rows


_METRICS = ("error", "disagreement", "prob_tv")  # what each predictor is measured by, against gold and reference


def _measure(pool: Dataset, test: Dataset, grid, predict, reference, cfg, seed, rows: list[_Row] = ()) -> dict:
    """Per-draw measurements [draws, K] for each metric: the predictor's under their own names,
    each row's as "<metric> <row key>", the reference's error as "reference_error"."""
    K = len(grid)
    keys = [*_METRICS, "reference_error", *(f"{m} {row.key}" for row in rows for m in _METRICS)]
    out = {k: np.zeros((cfg.draws, K)) for k in keys}
    gold = np.array([r.output for r in test])
    ref_out = None  # a reference trained once answers the same whatever the pool: ask it once
    for r in range(cfg.draws):
        perm = np.random.default_rng([seed, r]).permutation(len(pool))  # nested: first N of one order
        for j, n in enumerate(grid):
            progress(f"retrieval {pool.name}: draw {r + 1}/{cfg.draws}, N = {n}")
            sub = pool.select(perm[:n].tolist(), f"{pool.name}[{n}@{r}]")
            pred = _call(predict, sub, test, "predict")
            if ref_out is None or not getattr(reference, "fixed", False):
                ref_out = _call(reference, sub, test, "reference")
            out["reference_error"][r, j] = np.mean(ref_out[0] != gold)
            _score(out, "", (r, j), pred, ref_out, gold)
            for row in rows:
                _score(out, f" {row.key}", (r, j), _call(row.predict, sub, test, row.label), ref_out, gold)
    return out


def _score(out: dict, suffix: str, at: tuple[int, int], got, ref_out, gold) -> None:
    (pred, probs), (ref, ref_probs) = got, ref_out
    out["error" + suffix][at] = np.mean(pred != gold)
    out["disagreement" + suffix][at] = np.mean(pred != ref)
    out["prob_tv" + suffix][at] = 0.5 * np.abs(probs - ref_probs).sum(1).mean()


_BOUNDED = "bounded-context bound N = O(1/eps^2 log 1/delta)"


def _curves(task: str, grid, m: dict, notes: list[str], kw: dict) -> list[dict]:
    """The exact predictor's curves and the reference's error."""
    bounded = PREDICTED_SLOPE[Bound.LINEAR_BOUNDED]
    return [
        curve(f"disagreement {task}", grid, m["disagreement"], group="disagreement", predicted=bounded,
              basis=_BOUNDED, metric="label disagreement with the reference", notes=notes, **kw),
        curve(f"label-prob TV {task}", grid, m["prob_tv"], group="prob_tv", predicted=bounded, basis=_BOUNDED,
              metric="TV between predictor and reference label distributions", notes=notes, **kw),
        curve(f"error {task}", grid, m["error"], group="error", predicted=None, basis="no bound on error vs gold",
              metric="error vs gold labels", **kw),
        curve(f"reference error {task}", grid, m["reference_error"], group="reference_error", predicted=None,
              basis="no bound on error vs gold", metric="reference error vs gold labels", **kw),
    ]


def _row_curves(row: _Row, task: str, grid, m: dict, notes: list[str], kw: dict) -> list[dict]:
    """A row's curves, made and judged as the exact predictor's are."""
    bounded, notes = PREDICTED_SLOPE[Bound.LINEAR_BOUNDED], [*notes, *([row.note] if row.note else [])]
    k, name = row.key, row.label
    return [
        curve(f"disagreement {name} {task}", grid, m[f"disagreement {k}"], group=f"disagreement_{k}",
              predicted=bounded, basis=_BOUNDED, metric=f"label disagreement with the reference ({name})",
              notes=notes, **kw),
        curve(f"label-prob TV {name} {task}", grid, m[f"prob_tv {k}"], group=f"prob_tv_{k}", predicted=bounded,
              basis=_BOUNDED, metric=f"TV between predictor and reference label distributions ({name})",
              notes=notes, **kw),
        curve(f"error {name} {task}", grid, m[f"error {k}"], group=f"error_{k}", predicted=None,
              basis="no bound on error vs gold", metric=f"error vs gold labels ({name})", **kw),
    ]


def run_retrieval(out: Path, *, predict: Predictor, reference: Predictor, config: RetrievalConfig,
                  seed: int = 0, lm_name: str | None = None) -> dict:
    """Run over each dataset of the config; write results.json, report.md and PNGs into `out`."""
    t0 = time.perf_counter()
    cfg = config
    out = Path(out)
    rows = _cached_rows(predict, cfg)  # (before the long work: a baseline predictor cannot make them)
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
        m = raw[task] = _measure(pool, test, grid, predict, reference, cfg, seed, rows)
        tasks[task] = {"pool": len(pool), "test": len(test), "labels": list(pool.labels), "n_grid": list(grid)}
        curves += _curves(task, grid, m, notes, kw)
        if rows:
            tasks[task]["k"] = {row.key: [row.predict.k_for(n) for n in grid] for row in rows}
            curves += [c for row in rows for c in _row_curves(row, task, grid, m, notes, kw)]
    if not tasks:
        raise ExperimentError(f"no dataset could be loaded: {skipped}")
    results = {
        "experiment": "retrieval", "settings": asdict(cfg), "seed": seed, "machine": machine_info(),
        "predictor": _describe(predict), "reference": _describe(reference), "lm": lm_name,
        "tasks": tasks, "skipped": skipped, "curves": curves, "verdicts": verdict_counts(curves),
        "theory_table": theory_table(0.1, 0.05, V=2, m=1, l=1, d=1), "raw": raw,
    }
    if rows:
        results["rows"] = {row.key: {"label": row.label, "predictor": _describe(row.predict)} for row in rows}
    results["plots"] = [p.name for p in _plots(out, curves, tasks, cfg, rows)]
    return finish(out, results, t0, lambda res: _report(res, cfg))


_EXACT_GROUPS = ("disagreement", "prob_tv", "error", "reference_error")


def _plots(out: Path, curves: list[dict], tasks: dict, cfg: RetrievalConfig, rows: list[_Row]) -> list[Path]:
    """Per task: the exact predictor's plot, and with rows a second one of error and
    disagreement, the exact predictor's beside each row's."""
    plots = []
    for task in tasks:
        mine = [c for c in curves if c["name"].endswith(task)]
        plots.append(plot_curves(out / f"retrieval_{task}.png", [c for c in mine if c["group"] in _EXACT_GROUPS],
                                 title=f"{task}: pool size N, k = {cfg.k}", ylabel="rate / TV"))
        if rows:
            groups = [f"{m}{suffix}" for m in ("error", "disagreement") for suffix in ("", *(f"_{r.key}" for r in rows))]
            plots.append(plot_curves(out / f"retrieval_{task}_cached.png",
                                     [c for g in groups for c in mine if c["group"] == g],
                                     title=f"{task}: pool size N, exact k = {cfg.k} and cached rows",
                                     ylabel="rate"))
    return plots


def _report(res: dict, cfg: RetrievalConfig) -> str:
    lines = [
        "# Bounds experiment: retrieval on real data (bounded context)", "",
        f"Predictor: {res['predictor']}. Reference: {res['reference']}. LM: {res['lm'] or '–'}.",
        f"Machine {res['machine']['platform']}; wall time {res['wall_time_s']:.1f} s; seed {res['seed']}; "
        f"{cfg.draws} nested pool draws; k = {cfg.k}.", "",
        "| task | pool | test | labels | N |", "|---|---:|---:|---|---|",
        *[f"| {t} | {v['pool']} | {v['test']} | {len(v['labels'])} | {v['n_grid']} |" for t, v in res["tasks"].items()],
        "", *[f"- skipped {t}: {why}" for t, why in res["skipped"].items()], "",
        *_rows_section(res),
        "## Verdicts", "", *[verdict_line(c) for c in res["curves"]], "",
        "## Fits", "", fits_table(res["curves"]), "",
        "## Theory (constants hidden: shapes only)", "", format_theory_table(res["theory_table"]), "",
        "## Points", "", points_table(res["curves"]), "",
    ]
    return "\n".join(lines)


def _rows_section(res: dict) -> list[str]:
    """The extra rows: which predictor each is and the k it used at each N (nothing without rows)."""
    if "rows" not in res:
        return []
    lines = ["## Cached rows", ""]
    for key, row in res["rows"].items():
        lines.append(f"- **{row['label']}**: {row['predictor']}")
        lines += [f"  - {t}: k = {v['k'][key]} at N = {v['n_grid']}" for t, v in res["tasks"].items()]
    return lines + [""]
