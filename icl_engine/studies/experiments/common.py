"""What every bounds experiment shares: curve summaries (points with bootstrap intervals, a
fitted slope, a verdict), log-log PNGs, token helpers for the LM. Writing files, describing the machine and plotting basics are in
studies/report.py.

A curve is a plain JSON-ready dict, so results.json, the report and the plots all read the
same object:
    {"name", "group", "metric", "n": [K], "mean"/"low"/"high": [K], "draws",
     "predicted": float | None, "basis": str, "fit": SlopeFit.to_json(), "verdict": str,
     "theory_log_c": float | None, "notes": [str]}
"""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from ...core.metrics import bootstrap_mean
from ..bounds import Verdict, fit_slope, verdict
from ..report import fmt, pyplot, save_figure

__all__ = [
    "ExperimentError",
    "log_grid",
    "curve",
    "fits_table",
    "points_table",
    "verdict_line",
    "run_line",
    "plot_curves",
    "plot_scaling",
    "encode",
    "apply_overrides",
    "verdict_counts",
    "nanmean",
]


class ExperimentError(ValueError):
    """A bad experiment name, setting or input; one-line message."""


def log_grid(lo: int, hi: int, count: int) -> tuple[int, ...]:
    """`count` log-spaced integers from lo to hi inclusive (duplicates after rounding dropped)."""
    if lo < 1 or hi < lo or count < 1:
        raise ExperimentError(f"log_grid needs 1 <= lo <= hi and count >= 1, got ({lo}, {hi}, {count})")
    return tuple(sorted({int(round(x)) for x in np.geomspace(lo, hi, count)}))


def apply_overrides(config, overrides: dict):
    """A copy of a config dataclass with some fields replaced (the experiment's **options)."""
    names = {f.name for f in fields(config)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ExperimentError(f"unknown setting(s) {unknown} for {type(config).__name__} (known: {sorted(names)})")
    for key, value in overrides.items():
        _check_like(key, value, getattr(config, key))
    return replace(config, **overrides)


def _check_like(key: str, value, preset) -> None:
    """A setting must have the preset's shape: an int where the preset has an int (a float
    where it has a float also takes an int), a tuple or list of such where it has a tuple."""
    def fits(v, p) -> bool:
        if isinstance(p, bool) or isinstance(v, bool):
            return isinstance(v, bool) and isinstance(p, bool)
        if isinstance(p, (tuple, list)):
            return isinstance(v, (tuple, list)) and all(fits(x, p[0]) for x in v) if p else isinstance(v, (tuple, list))
        if isinstance(p, float):
            return isinstance(v, (int, float))
        return p is None or isinstance(v, type(p))

    if not fits(value, preset):
        raise ExperimentError(f"setting {key}={value!r} does not fit the preset's {key}={preset!r}")


# ----------------------------------------------------------------------------- curves


def curve(
    name: str,
    n: Sequence[int],
    per_draw,
    *,
    group: str,
    metric: str,
    predicted: float | None,
    basis: str,
    n_min: float | None = None,
    n_max: float | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    notes: Sequence[str] = (),
) -> dict:
    """Summarise per-draw measurements [draws, K] at the N values `n`: mean with a bootstrap
    95% interval per point, the fitted log-log slope over [n_min, n_max] with its interval, the
    verdict against `predicted` (None: nothing is predicted, verdict "n/a"), and the constant of
    the theory shape C * N^predicted fitted to the same points (for the plot overlay)."""
    per_draw = np.asarray(per_draw, dtype=np.float64).reshape(-1, len(n))
    mean, lo, hi = bootstrap_mean(per_draw, n_boot=n_boot, seed=seed)
    fit = fit_slope(n, per_draw, n_min=n_min, n_max=n_max, n_boot=n_boot, seed=seed)
    v = verdict(fit, predicted).value if predicted is not None else "n/a"
    theory_log_c = None
    if predicted is not None and fit.n_points >= 1:
        nn = np.asarray(n, dtype=np.float64)
        use = (nn >= fit.n_min) & (nn <= fit.n_max) & (mean > 0)
        if use.any():  # geometric-mean fit of C: the theory line through the cloud of points
            theory_log_c = float(np.mean(np.log(mean[use]) - predicted * np.log(nn[use])))
    return {
        "name": name, "group": group, "metric": metric, "n": [int(x) for x in n],
        "mean": mean.tolist(), "low": lo.tolist(), "high": hi.tolist(), "draws": int(per_draw.shape[0]),
        "predicted": predicted, "basis": basis, "fit": fit.to_json(), "verdict": v,
        "theory_log_c": theory_log_c, "notes": list(notes),
    }


def verdict_line(c: dict) -> str:
    """One report line: the numbers behind the verdict, and what the theory assumes that the
    setup does not give it."""
    f = c["fit"]
    pred = "no prediction" if c["predicted"] is None else f"predicted {c['predicted']:g} ({c['basis']})"
    line = (f"- **{c['name']}**: slope {fmt(f['slope'])} [{fmt(f['ci_low'])}, {fmt(f['ci_high'])}] over "
            f"N = {fmt(f['n_min'], 'g')}…{fmt(f['n_max'], 'g')} ({f['n_points']} points, {f['n_draws']} draws); "
            f"{pred} → **{c['verdict']}**")
    lo, hi = f["ci_low"], f["ci_high"]
    if lo is not None and hi is not None and lo <= 0 <= hi:
        line += " (the interval also contains 0: no decrease detected)"
    if c["notes"]:
        line += "\n  - assumptions not met here: " + "; ".join(c["notes"])
    return line


def run_line(res: dict) -> str:
    """The report line saying what ran where: the LM, the machine, the wall time, the seed."""
    return (f"LM `{res['lm']['name']}` ({res['lm']['n_params']:,} parameters) on {res['machine']['platform']}, "
            f"{res['machine']['torch_threads']} threads; wall time {res['wall_time_s']:.1f} s for "
            f"{res['lm_tokens']:,} LM tokens; seed {res['seed']}.")


def fits_table(curves: Sequence[dict]) -> str:
    lines = ["| curve | N regime | slope | 95% interval | predicted | verdict |", "|---|---|---:|---|---:|---|"]
    for c in curves:
        f = c["fit"]
        lines.append(
            f"| {c['name']} | {fmt(f['n_min'], 'g')}–{fmt(f['n_max'], 'g')} | {fmt(f['slope'])} | "
            f"[{fmt(f['ci_low'])}, {fmt(f['ci_high'])}] | {fmt(c['predicted'], 'g')} | {c['verdict']} |")
    return "\n".join(lines)


def points_table(curves: Sequence[dict]) -> str:
    """Every measured point: curve × N, mean [95% interval]."""
    lines = ["| curve | N | mean | 95% interval |", "|---|---:|---:|---|"]
    for c in curves:
        for n, m, lo, hi in zip(c["n"], c["mean"], c["low"], c["high"]):
            lines.append(f"| {c['name']} | {n} | {fmt(m, '.4f')} | [{fmt(lo, '.4f')}, {fmt(hi, '.4f')}] |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots


def _axes(title: str, xlabel: str, ylabel: str):
    import matplotlib.ticker

    fig, ax = pyplot().subplots(figsize=(6.4, 4.6))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.25)
    # N grids are powers of two (or log-spaced): label 2^j ticks plainly (16, not 1.6×10^1) and
    # leave the minor ticks unlabelled so their labels never run into each other
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=2))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    return fig, ax


def plot_curves(path: Path, curves: Sequence[dict], *, title: str, ylabel: str, xlabel: str = "N (examples)") -> Path:
    """Log-log: each curve's means with 95% bars, its fitted slope (dashed) and the theory shape
    C·N^predicted with C fitted to the points (dotted) over the fitted regime. Zeros cannot be
    drawn on a log axis and are left out (they are in results.json)."""
    fig, ax = _axes(title, xlabel, ylabel)
    for i, c in enumerate(curves):
        color = f"C{i % 10}"
        n, m = np.asarray(c["n"], float), np.asarray(c["mean"], float)
        lo = np.asarray([np.nan if v is None else v for v in c["low"]], float)
        hi = np.asarray([np.nan if v is None else v for v in c["high"]], float)
        ok = m > 0
        if not ok.any():
            continue
        err = np.vstack([np.clip(m - lo, 0, None), np.clip(hi - m, 0, None)])
        err = np.where(np.isfinite(err), err, 0)
        f = c["fit"]
        label = c["name"] if f["slope"] is None else f"{c['name']}: slope {f['slope']:.2f}"
        if c["predicted"] is not None:
            label += f" (theory {c['predicted']:g})"
        ax.errorbar(n[ok], m[ok], yerr=err[:, ok], fmt="o", ms=4, capsize=2, color=color, label=label)
        if f["slope"] is not None and f["n_min"] is not None:
            xs = np.geomspace(f["n_min"], f["n_max"], 20)
            ax.plot(xs, np.exp(f["intercept"]) * xs ** f["slope"], "--", color=color, lw=1)
            if c["theory_log_c"] is not None:
                ax.plot(xs, np.exp(c["theory_log_c"]) * xs ** c["predicted"], ":", color=color, lw=1.5)
    ax.plot([], [], "k--", lw=1, label="fitted power law")
    ax.plot([], [], "k:", lw=1.5, label="theory shape C·N^predicted (C fitted)")
    ax.legend(fontsize=6)
    return save_figure(fig, path)


def plot_scaling(path: Path, scaling: dict, *, title: str, xlabel: str, ylabel: str) -> Path:
    """The normalised quantity per parameter value with 95% bars; flat = scales as predicted."""
    fig, ax = _axes(title, xlabel, ylabel)
    p = np.asarray(scaling["params"], float)
    m = np.asarray([np.nan if v is None else v for v in scaling["normalised"]], float)
    lo = np.asarray([np.nan if v is None else v for v in scaling["ci_low"]], float)
    hi = np.asarray([np.nan if v is None else v for v in scaling["ci_high"]], float)
    ok = m > 0
    if ok.any():
        err = np.where(np.isfinite(np.vstack([m - lo, hi - m])), np.vstack([m - lo, hi - m]), 0).clip(0)
        ax.errorbar(p[ok], m[ok], yerr=err[:, ok], fmt="o-", capsize=3, label="measured")
        ax.axhline(np.exp(np.mean(np.log(m[ok]))), ls=":", color="k", lw=1, label="flat (predicted)")
    ax.set_xticks(p)
    ax.set_xticklabels([f"{v:g}" for v in p])
    ax.legend(fontsize=7)
    return save_figure(fig, path)


# ----------------------------------------------------------------------------- tokens


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` alone: no special tokens (prompts are concatenations of pieces)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def nanmean(a, axis=None):
    """np.nanmean without the warning for all-NaN slices (NaN is the intended answer there)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(a, axis=axis)


def verdict_counts(curves: Sequence[dict]) -> dict[str, int]:
    """How many curves got each verdict (for the summary line)."""
    out = {v.value: 0 for v in Verdict} | {"n/a": 0}
    for c in curves:
        out[c["verdict"]] += 1
    return out
