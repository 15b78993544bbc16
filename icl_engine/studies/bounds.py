"""Sample-size bounds for in-context learning (Sharma 2025, arXiv 2506.08060) and the
statistics that check measured curves against their shapes.

The paper proves that a frozen transformer given enough demonstrations approximates a
fine-tuned model within error eps with probability 1 - delta, with dataset sizes

    text generation, m contexts, vocabulary V      N = O(m V / eps^2 * log(m / delta))
    ... with bounded context and output length l   N = O(l log V / eps^2 * log(1 / delta))
    linear classification in dimension d           N = O(d / eps)
    ... with bounded context                       N = O(1 / eps^2 * log(1 / delta))

The constants are hidden, so every function here takes an explicit constant `c` (default 1)
and the numbers are order-of-magnitude SHAPES, not predictions of absolute sample sizes. What
the experiments can check is the shape: the log-log slope of error against N (-1 for the
O(d/eps) bound, -1/2 for the eps^2 bounds) and how the error scales with d or V.

The checking half is pure numpy:
  - `fit_slope`: least squares of log(mean error) on log N over a chosen regime, with a
    bootstrap interval from resampling the per-draw curves (draws are the independent unit);
  - `verdict`: "consistent" when the predicted exponent lies inside that interval;
  - `scaling_check`: whether error * N^-b / p^a is flat across p (p = d or V').
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Sequence

import numpy as np

__all__ = [
    "BoundsError",
    "Bound",
    "PREDICTED_SLOPE",
    "n_text_generation",
    "eps_text_generation",
    "n_text_generation_bounded",
    "eps_text_generation_bounded",
    "n_linear",
    "eps_linear",
    "n_linear_bounded",
    "eps_linear_bounded",
    "theory_table",
    "format_theory_table",
    "Verdict",
    "SlopeFit",
    "fit_slope",
    "verdict",
    "ScalingFit",
    "scaling_check",
]


class BoundsError(ValueError):
    """A bad argument to a bound or a fit; the message is one line naming the argument."""


class Bound(str, Enum):
    TEXT_GENERATION = "text_generation"
    TEXT_GENERATION_BOUNDED = "text_generation_bounded"
    LINEAR = "linear"
    LINEAR_BOUNDED = "linear_bounded"


# Slope of log(eps) against log(N) that each bound implies (N ∝ eps^-2 gives eps ∝ N^-1/2).
PREDICTED_SLOPE: dict[Bound, float] = {
    Bound.TEXT_GENERATION: -0.5,
    Bound.TEXT_GENERATION_BOUNDED: -0.5,
    Bound.LINEAR: -1.0,
    Bound.LINEAR_BOUNDED: -0.5,
}

# ----------------------------------------------------------------------------- the bounds


def _positive(name: str, x, *, integer_min: float | None = None) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(a)) or np.any(a <= 0):
        raise BoundsError(f"{name} must be positive and finite, got {x!r}")
    if integer_min is not None and np.any(a < integer_min):
        raise BoundsError(f"{name} must be >= {integer_min:g}, got {x!r}")
    return a


def _delta(delta) -> np.ndarray:
    a = np.asarray(delta, dtype=np.float64)
    if not np.all((a > 0) & (a < 1)):
        raise BoundsError(f"delta must be in (0, 1), got {delta!r}")
    return a


def _out(a: np.ndarray):
    """Scalars in, float out; arrays in, array out."""
    return float(a) if np.ndim(a) == 0 else a


def n_text_generation(eps, delta, *, m, V, c: float = 1.0):
    """Required N for text generation over m contexts and vocabulary V: c m V / eps^2 log(m/delta)."""
    eps, delta = _positive("eps", eps), _delta(delta)
    m, V, c = _positive("m", m, integer_min=1), _positive("V", V, integer_min=2), _positive("c", c)
    return _out(c * m * V / eps**2 * np.log(m / delta))


def eps_text_generation(n, delta, *, m, V, c: float = 1.0):
    """Inverse of `n_text_generation`: eps reachable with n examples, sqrt(c m V log(m/delta) / n).
    Values above 1 mean the bound says nothing at that n (TV is at most 1)."""
    n, delta = _positive("n", n), _delta(delta)
    m, V, c = _positive("m", m, integer_min=1), _positive("V", V, integer_min=2), _positive("c", c)
    return _out(np.sqrt(c * m * V * np.log(m / delta) / n))


def n_text_generation_bounded(eps, delta, *, l, V, c: float = 1.0):
    """Required N with bounded context and output length l: c l log V / eps^2 log(1/delta)."""
    eps, delta = _positive("eps", eps), _delta(delta)
    l, V, c = _positive("l", l, integer_min=1), _positive("V", V, integer_min=2), _positive("c", c)
    return _out(c * l * np.log(V) / eps**2 * np.log(1 / delta))


def eps_text_generation_bounded(n, delta, *, l, V, c: float = 1.0):
    """Inverse of `n_text_generation_bounded`: sqrt(c l log V log(1/delta) / n)."""
    n, delta = _positive("n", n), _delta(delta)
    l, V, c = _positive("l", l, integer_min=1), _positive("V", V, integer_min=2), _positive("c", c)
    return _out(np.sqrt(c * l * np.log(V) * np.log(1 / delta) / n))


def n_linear(eps, *, d, c: float = 1.0):
    """Required N for linear classification in dimension d: c d / eps (no delta in this bound)."""
    eps, d, c = _positive("eps", eps), _positive("d", d, integer_min=1), _positive("c", c)
    return _out(c * d / eps)


def eps_linear(n, *, d, c: float = 1.0):
    """Inverse of `n_linear`: c d / n."""
    n, d, c = _positive("n", n), _positive("d", d, integer_min=1), _positive("c", c)
    return _out(c * d / n)


def n_linear_bounded(eps, delta, *, c: float = 1.0):
    """Required N for linear classification with bounded context: c / eps^2 log(1/delta)."""
    eps, delta, c = _positive("eps", eps), _delta(delta), _positive("c", c)
    return _out(c / eps**2 * np.log(1 / delta))


def eps_linear_bounded(n, delta, *, c: float = 1.0):
    """Inverse of `n_linear_bounded`: sqrt(c log(1/delta) / n)."""
    n, delta, c = _positive("n", n), _delta(delta), _positive("c", c)
    return _out(np.sqrt(c * np.log(1 / delta) / n))


def theory_table(eps: float, delta: float, V: int, m: int, l: int, d: int, c: float = 1.0) -> list[dict]:
    """Required N of each bound at (eps, delta) with constant c: one JSON-ready dict per bound."""
    rows = [
        (Bound.TEXT_GENERATION, "text generation, m contexts, vocabulary V", "c·m·V/ε²·log(m/δ)",
         n_text_generation(eps, delta, m=m, V=V, c=c), "ε ∝ sqrt(m·V/N)"),
        (Bound.TEXT_GENERATION_BOUNDED, "text generation, bounded context, output length l",
         "c·l·log V/ε²·log(1/δ)", n_text_generation_bounded(eps, delta, l=l, V=V, c=c), "ε ∝ sqrt(l·log V/N)"),
        (Bound.LINEAR, "linear classification, dimension d", "c·d/ε", n_linear(eps, d=d, c=c), "ε ∝ d/N"),
        (Bound.LINEAR_BOUNDED, "linear classification, bounded context", "c/ε²·log(1/δ)",
         n_linear_bounded(eps, delta, c=c), "ε ∝ sqrt(1/N)"),
    ]
    return [
        {"bound": b.value, "setting": setting, "formula": formula, "required_n": float(n),
         "required_n_ceil": int(math.ceil(n)), "predicted_slope": PREDICTED_SLOPE[b], "shape": shape,
         "eps": float(eps), "delta": float(delta), "V": V, "m": m, "l": l, "d": d, "c": float(c)}
        for b, setting, formula, n, shape in rows
    ]


def format_theory_table(rows: Sequence[dict]) -> str:
    """A markdown table of `theory_table` rows (order-of-magnitude shapes, constant c shown)."""
    if not rows:
        return ""
    r0 = rows[0]
    head = (f"Required N at eps={r0['eps']:g}, delta={r0['delta']:g}, V={r0['V']}, m={r0['m']}, "
            f"l={r0['l']}, d={r0['d']}, c={r0['c']:g} (hidden constants: orders of magnitude only)")
    lines = [head, "", "| bound | setting | required N (formula) | required N here | slope of log ε vs log N | shape |",
             "|---|---|---|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['bound']} | {r['setting']} | {r['formula']} | {r['required_n_ceil']:,} | "
                     f"{r['predicted_slope']:g} | {r['shape']} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- statistics


class Verdict(str, Enum):
    CONSISTENT = "consistent"
    NOT_CONSISTENT = "not consistent"
    INCONCLUSIVE = "inconclusive"  # too few draws or points for an interval


@dataclass(frozen=True)
class SlopeFit:
    slope: float
    intercept: float  # log(err) at N = 1 on the fitted line
    ci_low: float
    ci_high: float
    n_min: float  # the regime actually fitted
    n_max: float
    n_points: int  # points in the regime with a positive mean (log needs > 0)
    n_draws: int
    n_boot: int
    failed_boot: int  # resamples with fewer than two usable points (left out of the interval)
    level: float

    def predict(self, n) -> np.ndarray:
        """The fitted power law exp(intercept) * n^slope."""
        return np.exp(self.intercept) * np.asarray(n, dtype=np.float64) ** self.slope

    def to_json(self) -> dict:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


def _check_curves(n, curves) -> tuple[np.ndarray, np.ndarray]:
    n = np.asarray(n, dtype=np.float64)
    curves = np.asarray(curves, dtype=np.float64)
    if curves.ndim == 1:
        curves = curves[None, :]
    if n.ndim != 1 or curves.ndim != 2 or curves.shape[1] != n.shape[0]:
        raise BoundsError(f"curves must be [draws, len(n)] = [*, {n.shape[0]}], got shape {curves.shape}")
    if np.any(n <= 0):
        raise BoundsError("n must be positive (the fit is on log N)")
    return n, curves


@contextmanager
def _quiet():
    """NaN-aware reductions over all-NaN slices warn; here NaN is the intended answer."""
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _ls_slopes(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise least squares y = a + b x over the points with w = 1. x [K], y/w [B, K]."""
    cnt = w.sum(1)
    with _quiet():
        xm = (w * x).sum(1) / cnt
        ym = (w * y).sum(1) / cnt
        dx = (x[None, :] - xm[:, None]) * w
        sxx = (dx * dx).sum(1)
        b = (dx * (y - ym[:, None]) * w).sum(1) / sxx
    ok = (cnt >= 2) & (sxx > 0)
    b = np.where(ok, b, np.nan)
    return b, np.where(ok, ym - b * xm, np.nan)


def _log_means(means: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log of row means, with the non-positive (or missing) points masked out."""
    w = np.isfinite(means) & (means > 0)
    return np.log(np.where(w, means, 1.0)), w.astype(np.float64)


def fit_slope(
    n: Sequence[float],
    curves,
    *,
    n_min: float | None = None,
    n_max: float | None = None,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> SlopeFit:
    """Slope of log(mean over draws of err) against log N, over n_min <= N <= n_max.

    `curves` is [draws, len(n)]: one curve per independent data draw (NaN = not measured).
    The interval is the percentile bootstrap over draws: resample whole curves with
    replacement, refit, take the (1-level)/2 quantiles. Points whose mean is 0 cannot be
    logged and are left out of that fit (e.g. a disagreement that reached exactly 0).
    """
    n, curves = _check_curves(n, curves)
    if not 0 < level < 1:
        raise BoundsError(f"level must be in (0, 1), got {level}")
    lo_n = -np.inf if n_min is None else n_min
    hi_n = np.inf if n_max is None else n_max
    keep = (n >= lo_n) & (n <= hi_n)
    x = np.log(n[keep])  # [K']
    sub = curves[:, keep]  # [R, K']
    R = sub.shape[0]
    with _quiet():
        means = np.nanmean(sub, axis=0)[None, :] if R else np.full((1, x.size), np.nan)
    y, w = _log_means(means)
    b, a = _ls_slopes(x, y, w)
    lo = hi = math.nan
    failed = 0
    if R >= 2 and x.size >= 2:
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, R, size=(n_boot, R))  # [B, R]
        with _quiet():  # a resample may hold only NaN at some N
            boot_means = np.nanmean(sub[idx], axis=1)  # [B, K']
        yb, wb = _log_means(boot_means)
        bb, _ = _ls_slopes(x, yb, wb)
        failed = int(np.isnan(bb).sum())
        if failed < n_boot:
            q = (1 - level) / 2
            lo, hi = (float(v) for v in np.nanquantile(bb, [q, 1 - q]))
    used = n[keep][w[0] > 0]
    return SlopeFit(
        slope=float(b[0]), intercept=float(a[0]), ci_low=lo, ci_high=hi,
        n_min=float(used.min()) if used.size else math.nan, n_max=float(used.max()) if used.size else math.nan,
        n_points=int(used.size), n_draws=R, n_boot=n_boot, failed_boot=failed, level=level,
    )


def verdict(fit: SlopeFit, predicted: float) -> Verdict:
    """"consistent" when the predicted exponent lies inside the fit's interval."""
    if not (math.isfinite(fit.ci_low) and math.isfinite(fit.ci_high)):
        return Verdict.INCONCLUSIVE
    return Verdict.CONSISTENT if fit.ci_low <= predicted <= fit.ci_high else Verdict.NOT_CONSISTENT


@dataclass(frozen=True)
class ScalingFit:
    """Is err * N^-b / p^a flat across p? (b = predicted N exponent, a = predicted p exponent)"""

    params: list[float]  # p: d or V'
    normalised: list[float]  # mean over draws of the normalised quantity, per p
    ci_low: list[float]
    ci_high: list[float]
    ratio: float  # max / min of `normalised`: 1 is perfectly flat
    ratio_ci: tuple[float, float]
    slope: float  # slope of log(normalised) on log p: 0 when the p exponent is as predicted
    slope_ci: tuple[float, float]
    measured_exponent: float  # slope + predicted_exponent: the exponent of p in err itself
    predicted_exponent: float
    n_exponent: float
    verdict: Verdict

    def to_json(self) -> dict:
        def clean(v):
            if isinstance(v, float):
                return v if math.isfinite(v) else None
            if isinstance(v, (list, tuple)):
                return [clean(x) for x in v]
            return v.value if isinstance(v, Enum) else v

        return {k: clean(v) for k, v in self.__dict__.items()}


def scaling_check(
    params: Sequence[float],
    curves: Sequence,
    n: Sequence[float],
    *,
    n_exponent: float,
    param_exponent: float,
    n_min: float | None = None,
    n_max: float | None = None,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> ScalingFit:
    """Flatness across p of err * N^(-n_exponent) / p^param_exponent.

    `curves[g]` is [draws_g, len(n)] for parameter value params[g]. Per draw the normalised
    value is averaged over the N regime; groups are bootstrapped independently (resampling
    their draws), and each replicate gives a max/min ratio and a log-log slope against p.
    Consistent when the slope interval contains 0 (equivalently the measured exponent of p in
    err contains `param_exponent`). Examples: linear err ∝ d/N -> (n_exponent=-1,
    param_exponent=1), i.e. N*err/d; TV ∝ sqrt(V'/N) -> (-0.5, 0.5), i.e. TV*sqrt(N/V').
    """
    p = np.asarray(params, dtype=np.float64)
    if p.ndim != 1 or len(curves) != p.size or p.size < 2 or np.any(p <= 0):
        raise BoundsError(f"need >= 2 positive params with one curve array each, got {len(curves)} for {p.size}")
    per_draw = []  # [G] arrays [R_g]
    for c, pg in zip(curves, p):
        nn, cv = _check_curves(n, c)
        keep = (nn >= (-np.inf if n_min is None else n_min)) & (nn <= (np.inf if n_max is None else n_max))
        norm = cv[:, keep] * nn[keep] ** (-n_exponent) / pg**param_exponent  # [R, K']
        with _quiet():
            per_draw.append(np.nanmean(norm, axis=1))
    rng = np.random.default_rng(seed)
    with _quiet():
        means = np.array([np.nanmean(v) for v in per_draw])  # [G]
        boots = np.stack([
            np.nanmean(v[rng.integers(0, v.size, size=(n_boot, v.size))], axis=1) if v.size >= 2
            else np.full(n_boot, np.nan) for v in per_draw
        ], axis=1)  # [B, G]
    q = (1 - level) / 2
    with _quiet():
        lo, hi = np.nanquantile(boots, [q, 1 - q], axis=0)
        ratio = float(np.max(means) / np.min(means)) if np.all(means > 0) else math.nan
        ratio_b = np.where(np.all(boots > 0, axis=1), boots.max(1) / boots.min(1), np.nan)
        r_lo, r_hi = np.nanquantile(ratio_b, [q, 1 - q]) if np.any(np.isfinite(ratio_b)) else (math.nan, math.nan)
    x = np.log(p)
    y, w = _log_means(means[None, :])
    slope = float(_ls_slopes(x, y, w)[0][0])
    yb, wb = _log_means(boots)
    sb = _ls_slopes(x, yb, wb)[0]
    if np.any(np.isfinite(sb)) and all(v.size >= 2 for v in per_draw):
        s_lo, s_hi = (float(v) for v in np.nanquantile(sb, [q, 1 - q]))
        ok = s_lo <= 0 <= s_hi
        v = Verdict.CONSISTENT if ok else Verdict.NOT_CONSISTENT
    else:
        s_lo = s_hi = math.nan
        v = Verdict.INCONCLUSIVE
    return ScalingFit(
        params=[float(x) for x in p], normalised=[float(x) for x in means],
        ci_low=[float(x) for x in lo], ci_high=[float(x) for x in hi],
        ratio=ratio, ratio_ci=(float(r_lo), float(r_hi)), slope=slope, slope_ci=(s_lo, s_hi),
        measured_exponent=slope + param_exponent, predicted_exponent=param_exponent,
        n_exponent=n_exponent, verdict=v,
    )
