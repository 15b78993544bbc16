"""Experiment `linear`: does in-context linear classification approach the fine-tuned model at
the rate the bounds predict?

Data: a ground-truth unit vector w in d dimensions, Gaussian inputs rounded to `decimals`,
labels sign(w·x) (label noise optional). The "fine-tuned" reference is (barely) L2-regularised
logistic regression fit on the same N examples; its own error against the rule is the
reference curve with a known rate (d/N without label noise). The ICL predictor is the frozen LM reading
the examples as text ("x = [0.3, -1.2] -> A"), scoring the two label tokens:
  - in context: all N demonstrations while they fit `budget` tokens. Bound: N = O(d / eps),
    so disagreement with the reference should fall as d / N (log-log slope -1, N*err/d flat
    across d);
  - retrieval (bounded context): beyond that, the k nearest of the N by Euclidean distance.
    Bound: N = O(1/eps^2 log 1/delta), slope -1/2.
Each data draw is one independent curve (nested: N examples are the first N of the draw);
demonstration orders are averaged within a draw and reported as order sensitivity.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ...core.prompt import start_ids
from ...core.score import compute_prefix, score_continuations
from ..bounds import PREDICTED_SLOPE, Bound, format_theory_table, scaling_check, theory_table
from ..report import finish, lm_info, machine_info, progress
from .baselines import fit_logreg
from .common import (
    ExperimentError,
    curve,
    encode,
    fits_table,
    nanmean,
    plot_curves,
    plot_scaling,
    points_table,
    run_line,
    verdict_counts,
    verdict_line,
)

__all__ = ["LinearConfig", "run_linear", "plot_linear"]


@dataclass
class LinearConfig:
    dims: tuple[int, ...] = (2, 4, 8)
    n_grid: tuple[int, ...] = (4, 8, 16, 32, 64, 128, 256, 512, 1024)
    draws: int = 10  # independent data draws (w, training sequence, test set)
    orders: int = 3  # demonstration orders per in-context point (order 0 = as drawn)
    retrieval_orders: int = 1  # per retrieval point (order 0 = nearest last)
    n_test: int = 32
    label_noise: float = 0.0  # probability of flipping a training label
    decimals: int = 1  # rounding of the inputs (what the LM sees, and the data itself)
    budget: int = 2048  # tokens of demonstrations allowed in context
    k: int = 8  # demonstrations per query in the retrieval regime (capped by what fits)
    # Logistic-regression penalty (core/logreg.py's convention: both classes' weights penalised).
    # Tiny on purpose: on separable data the fit then tends to the max-margin direction, a
    # consistent learner with the realisable d/N rate; a fixed 2e-2 penalty gives an N^-1/2
    # error curve (measured: slopes -0.47..-0.59 for N = 32..1024).
    l2: float = 2e-6
    labels: tuple[str, str] = ("A", "B")  # positive side of w first
    batch_size: int = 8
    n_boot: int = 2000

    def __post_init__(self):
        self.dims, self.n_grid, self.labels = tuple(self.dims), tuple(sorted(set(self.n_grid))), tuple(self.labels)
        if not self.dims or min(self.dims) < 1:
            raise ExperimentError(f"dims must be positive integers, got {self.dims}")
        if not self.n_grid or self.n_grid[0] < 1:
            raise ExperimentError(f"n_grid must be positive integers, got {self.n_grid}")
        for name in ("draws", "orders", "retrieval_orders", "n_test", "budget", "k", "batch_size", "n_boot"):
            if getattr(self, name) < 1:
                raise ExperimentError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.label_noise < 0.5:
            raise ExperimentError(f"label_noise must be in [0, 0.5), got {self.label_noise}")
        if not 0 <= self.decimals <= 6:
            raise ExperimentError(f"decimals must be in [0, 6], got {self.decimals}")
        if len(self.labels) != 2 or len(set(self.labels)) != 2:
            raise ExperimentError(f"labels must be two distinct strings, got {self.labels}")

    @classmethod
    def preset(cls, quick: bool) -> "LinearConfig":
        # quick: 90k LM tokens in ~480 forward calls, all in context (SmolLM2-135M: 5.5 min
        # measured on a shared, loaded 2-core machine); full: in context up to the 2048-token
        # budget (N <= 128 / 64 / 32 for d = 2 / 4 / 8), retrieval beyond, 16 test points per
        # draw (32 would double the retrieval regime's cost, ~1.65M tokens, past 90 min on 1 core).
        return cls(n_grid=(2, 4, 8, 16), draws=10, orders=2, n_test=8, budget=1024) if quick else cls(n_test=16)


class _Render:
    """Token ids of demonstrations and queries, built from pieces exactly as they are scored:
    demo = ids("x = [..] ->") + ids(" A") + ids("\\n"); query = ids("x = [..] ->")."""

    def __init__(self, tokenizer, cfg: LinearConfig):
        self.tok, self.cfg = tokenizer, cfg
        self.start = start_ids(tokenizer)
        self.tokens = 0  # tokens sent through the LM: the cost measure, independent of machine load
        self.nl = encode(tokenizer, "\n")
        self.label_ids = [encode(tokenizer, " " + lab) for lab in cfg.labels]
        if any(not ids for ids in self.label_ids):
            raise ExperimentError(f"labels {cfg.labels} tokenize to nothing")

    def query(self, x: np.ndarray) -> list[int]:
        vals = ", ".join(f"{v + 0.0:.{self.cfg.decimals}f}" for v in x)  # + 0.0: no "-0.0"
        return encode(self.tok, f"x = [{vals}] ->")

    def demos(self, X: np.ndarray, y: np.ndarray) -> list[list[int]]:
        return [self.query(x) + self.label_ids[int(c)] + self.nl for x, c in zip(X, y)]

    def demos_that_fit(self, d: int, budget: int, seed: int) -> int:
        """How many demonstrations fit `budget` tokens, using the longest of 256 sampled demos
        (so every draw fits)."""
        rng = np.random.default_rng([seed, d, 999])
        X = np.round(rng.normal(size=(256, d)) * 1.5, self.cfg.decimals)  # wider than the data: conservative
        longest = max(len(ids) for ids in self.demos(X, np.zeros(256, dtype=int)))
        return budget // longest


def _draw(cfg: LinearConfig, d: int, r: int, seed: int):
    """One data draw: w [d], training sequence X [N_max, d] with labels, test set."""
    rng = np.random.default_rng([seed, d, r])
    w = rng.normal(size=d)
    w /= np.linalg.norm(w)
    n_max = cfg.n_grid[-1]
    X = np.round(rng.normal(size=(n_max, d)), cfg.decimals)
    y_clean = (X @ w <= 0).astype(int)  # 0 = labels[0] = the positive side of w
    flip = rng.random(n_max) < cfg.label_noise
    y = np.where(flip, 1 - y_clean, y_clean)
    Xt = np.round(rng.normal(size=(cfg.n_test, d)), cfg.decimals)
    yt = (Xt @ w <= 0).astype(int)  # error is measured against the noise-free rule
    return X, y, Xt, yt, rng


def _icl_in_context(lm, R: _Render, demo_ids, queries, order_perm, prefix_cache, cfg):
    """Label predictions with demos [order_perm] in context as one shared prefix."""
    if prefix_cache is not None:  # order 0 extends the previous N's prefix (nested draws)
        base, n_prev = prefix_cache
        new = [t for i in order_perm[n_prev:] for t in demo_ids[i]]
        ids = (R.start if base is None else []) + new
        prefix = compute_prefix(lm, ids=ids, base=base)
    else:
        ids = R.start + [t for i in order_perm for t in demo_ids[i]]
        prefix = compute_prefix(lm, ids=ids)
    R.tokens += len(ids) + sum(len(q) for q in queries)
    scores = score_continuations(lm, queries, R.label_ids, prefix=prefix, batch_size=cfg.batch_size)  # [q, 2]
    return scores.argmax(1), prefix


def _icl_retrieval(lm, R: _Render, demo_ids, X, Xt, queries, k, rng_order, cfg):
    """Each test point gets its own prompt: the k nearest training points (Euclidean),
    nearest last, or shuffled when rng_order is given."""
    prompts = []
    for x, q in zip(Xt, queries):
        near = np.argsort(np.linalg.norm(X - x, axis=1), kind="stable")[:k][::-1]  # nearest last
        if rng_order is not None:
            near = rng_order.permutation(near)
        prompts.append(R.start + [t for i in near for t in demo_ids[i]] + q)
    R.tokens += sum(len(p) for p in prompts)
    return score_continuations(lm, prompts, R.label_ids, batch_size=cfg.batch_size).argmax(1)


def _measure(lm, R: _Render, cfg: LinearConfig, d: int, n_ctx: int, k: int, seed: int) -> dict:
    K, O = len(cfg.n_grid), max(cfg.orders, cfg.retrieval_orders)
    dis = np.full((cfg.draws, O, K), np.nan)  # ICL vs reference
    err = np.full((cfg.draws, O, K), np.nan)  # ICL vs ground truth
    first = np.full((cfg.draws, O, K), np.nan)  # share of "labels[0]" answers: the LM's label prior
    ref_err = np.zeros((cfg.draws, K))
    flips = np.full((cfg.draws, K), np.nan)  # share of test labels that change across orders
    for r in range(cfg.draws):
        progress(f"linear d={d}: draw {r + 1}/{cfg.draws} ({R.tokens:,} LM tokens so far)")
        X, y, Xt, yt, rng = _draw(cfg, d, r, seed)
        demo_ids = R.demos(X, y)
        queries = [R.query(x) for x in Xt]
        nested = (None, 0)  # order 0's growing prefix
        for j, n in enumerate(cfg.n_grid):
            ref = fit_logreg(X[:n], y[:n], 2, l2=cfg.l2).predict(Xt)
            ref_err[r, j] = np.mean(ref != yt)
            preds = []
            in_context = n <= n_ctx
            for o in range(cfg.orders if in_context else cfg.retrieval_orders):
                if in_context:
                    perm = np.arange(n) if o == 0 else rng.permutation(n)
                    pred, prefix = _icl_in_context(lm, R, demo_ids, queries, perm, nested if o == 0 else None, cfg)
                    if o == 0:
                        nested = (prefix, n)
                else:
                    pred = _icl_retrieval(lm, R, demo_ids, X[:n], Xt, queries, k, rng if o else None, cfg)
                dis[r, o, j], err[r, o, j], first[r, o, j] = np.mean(pred != ref), np.mean(pred != yt), np.mean(pred == 0)
                preds.append(pred)
            if len(preds) > 1:
                flips[r, j] = np.mean(np.any(np.stack(preds) != preds[0], axis=0))
    return {"dis": dis, "err": err, "first": first, "ref_err": ref_err, "flips": flips}


def plot_linear(out: Path, results: dict) -> list[str]:
    """The PNGs of a results dict (also one read back from results.json) -> their file names."""
    curves, out = results["curves"], Path(out)
    plots = [
        plot_curves(out / "linear_disagreement.png", [c for c in curves if c["group"].startswith("disagreement")],
                    title="ICL vs logistic-regression reference", ylabel="disagreement"),
        plot_curves(out / "linear_error.png", [c for c in curves if c["group"] in ("icl_error", "reference_error")],
                    title="error vs the noise-free rule", ylabel="error"),
    ]
    for name, s in results["scaling"].items():
        plots.append(plot_scaling(out / f"linear_scaling_{name}.png", s, title=f"{name}: N·err/d across d",
                                  xlabel="d", ylabel="N · err / d"))
    return [p.name for p in plots]


def run_linear(out: Path, *, lm, config: LinearConfig, seed: int = 0) -> dict:
    """Run the experiment, write results.json, report.md and PNGs into `out`; return the results."""
    t0 = time.perf_counter()
    cfg = config
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    R = _Render(lm.tokenizer, cfg)
    grid = np.array(cfg.n_grid)
    curves, per_dim, raw = [], {}, {}
    for d in cfg.dims:
        n_ctx = R.demos_that_fit(d, cfg.budget, seed)
        if n_ctx < 1:
            raise ExperimentError(f"budget {cfg.budget} tokens does not fit one demonstration for d={d}")
        k = min(cfg.k, n_ctx)
        m = _measure(lm, R, cfg, d, n_ctx, k, seed)
        raw[d] = m
        in_ctx = grid <= n_ctx
        flip_mean = float(nanmean(m["flips"])) if np.isfinite(m["flips"]).any() else None
        first_mean = float(nanmean(m["first"]))
        common = [f"inputs rounded to {cfg.decimals} decimal(s) (theory: exact reals)",
                  f"resolution 1/{cfg.n_test} per draw (test set of {cfg.n_test})"]
        if flip_mean is not None:
            common.append(f"order sensitivity: {flip_mean:.0%} of test labels change across {cfg.orders} orders")
        if abs(first_mean - 0.5) > 0.2:
            common.append(f"LM label prior: answers '{cfg.labels[0]}' on {first_mean:.0%} of queries")
        if cfg.label_noise:
            common.append(f"label noise {cfg.label_noise:g}")
        ctx_note = f"context budget {cfg.budget} tokens holds N <= {n_ctx} (theory: unbounded context)"
        dis_draw = nanmean(m["dis"], axis=1)  # [R, K] orders averaged within a draw
        err_draw = nanmean(m["err"], axis=1)
        kw = dict(n_boot=cfg.n_boot, seed=seed)
        if in_ctx.any():
            curves.append(curve(f"disagreement d={d} (in context)", grid[in_ctx], dis_draw[:, in_ctx],
                                group="disagreement_in_context", metric="disagreement with the reference",
                                predicted=PREDICTED_SLOPE[Bound.LINEAR], basis="linear bound N = O(d/eps)",
                                notes=[ctx_note, *common], **kw))
        if (~in_ctx).any():
            curves.append(curve(f"disagreement d={d} (retrieval k={k})", grid[~in_ctx], dis_draw[:, ~in_ctx],
                                group="disagreement_retrieval", metric="disagreement with the reference",
                                predicted=PREDICTED_SLOPE[Bound.LINEAR_BOUNDED],
                                basis="bounded-context bound N = O(1/eps^2 log 1/delta)",
                                notes=[f"bounded context: k = {k} nearest of N (Euclidean), "
                                       f"{cfg.retrieval_orders} order(s)", *common], **kw))
        curves.append(curve(f"ICL error d={d}", grid, err_draw, group="icl_error",
                            metric="error vs the noise-free rule", predicted=PREDICTED_SLOPE[Bound.LINEAR],
                            basis="implied: reference rate d/N + linear bound",
                            n_max=int(grid[in_ctx].max()) if in_ctx.any() else None,
                            notes=[ctx_note, *common], **kw))
        ref_pred = -1.0 if cfg.label_noise == 0 else -0.5
        # the known rate is asymptotic: fit N >= 4d (or the 3 largest N when too few reach it)
        ref_min = 4 * d if (grid >= 4 * d).sum() >= 3 else int(grid[max(0, grid.size - 3)])
        curves.append(curve(f"reference error d={d}", grid, m["ref_err"], group="reference_error",
                            metric="logistic regression error vs the noise-free rule", predicted=ref_pred,
                            basis="known rate: realisable d/N" if ref_pred == -1 else "known rate: noisy sqrt(d/N)",
                            n_min=ref_min, notes=[f"L2 penalty {cfg.l2:g}"] + (
                                [f"pre-asymptotic: fitted N from {ref_min} < 4d"] if ref_min < 4 * d else []),
                            **kw))
        per_dim[d] = {"n_ctx": n_ctx, "k": k, "order_sensitivity": nanmean(m["flips"], axis=0),
                      "share_first_label": first_mean}

    scaling = {}
    common_ctx = [n for n in cfg.n_grid if all(n <= per_dim[d]["n_ctx"] for d in cfg.dims)]
    if len(cfg.dims) >= 2 and common_ctx:
        idx = [cfg.n_grid.index(n) for n in common_ctx]
        scaling["disagreement_in_context"] = scaling_check(
            cfg.dims, [nanmean(raw[d]["dis"], axis=1)[:, idx] for d in cfg.dims], common_ctx,
            n_exponent=-1.0, param_exponent=1.0, n_boot=cfg.n_boot, seed=seed).to_json()
    if len(cfg.dims) >= 2:
        scaling["reference_error"] = scaling_check(
            cfg.dims, [raw[d]["ref_err"] for d in cfg.dims], cfg.n_grid, n_exponent=-1.0, param_exponent=1.0,
            n_boot=cfg.n_boot, seed=seed).to_json()

    results = {
        "experiment": "linear", "settings": asdict(cfg), "seed": seed, "lm": lm_info(lm), "machine": machine_info(),
        "curves": curves, "scaling": scaling, "verdicts": verdict_counts(curves),
        "per_dim": {str(d): v for d, v in per_dim.items()},
        "lm_tokens": R.tokens, "theory_table": theory_table(0.1, 0.05, V=2, m=1, l=1, d=max(cfg.dims)),
        "raw": {str(d): {k: v for k, v in m.items()} for d, m in raw.items()},
    }
    results["plots"] = plot_linear(out, results)
    return finish(out, results, t0, lambda res: _report(res, cfg))


def _report(res: dict, cfg: LinearConfig) -> str:
    lines = [
        "# Bounds experiment: linear classification", "",
        run_line(res),
        f"dims {list(cfg.dims)}, N {list(cfg.n_grid)}, {cfg.draws} draws, {cfg.orders} orders in context, "
        f"{cfg.n_test} test points, context budget {cfg.budget} tokens, retrieval k = {cfg.k}, "
        f"inputs rounded to {cfg.decimals} decimal(s), label noise {cfg.label_noise:g}.",
        "Intervals: 95% percentile bootstrap over data draws (orders averaged within a draw).", "",
        "## Verdicts", "",
        *[verdict_line(c) for c in res["curves"]], "",
    ]
    for name, s in res["scaling"].items():
        lo, hi = s["slope_ci"]
        lines.append(
            f"- **scaling across d, {name}**: N·err/d = {', '.join(f'{v:.3g}' for v in s['normalised'] if v is not None)}"
            f" for d = {', '.join(f'{p:g}' for p in s['params'])}; max/min {s['ratio'] or float('nan'):.3g}; "
            f"err ∝ d^{s['measured_exponent']:.2f} (slope of the normalised value "
            f"{s['slope']:.3g} [{lo if lo is None else round(lo, 3)}, {hi if hi is None else round(hi, 3)}]); "
            f"predicted d^1 → **{s['verdict']}**")
    lines += ["", "## Fits", "", fits_table(res["curves"]), "", "## Regimes and order sensitivity", "",
              "| d | N in context | retrieval k | share of '" + cfg.labels[0] + "' answers | order sensitivity by N |",
              "|---:|---:|---:|---:|---|"]
    for d, v in res["per_dim"].items():
        sens = ", ".join("–" if x is None or not np.isfinite(x) else f"{x:.2f}" for x in np.asarray(v["order_sensitivity"], float))
        lines.append(f"| {d} | <= {v['n_ctx']} | {v['k']} | {v['share_first_label']:.2f} | {sens} |")
    lines += ["", "## Theory (constants hidden: shapes only)", "", format_theory_table(res["theory_table"]), "",
              "## Points", "", points_table(res["curves"]), ""]
    return "\n".join(lines)
