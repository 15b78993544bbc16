"""Tolerances that follow from float32 arithmetic, for tests that compare two computations of the
same numbers done in different batch shapes, orders, processes or thread counts.

Two such results are not bit-identical: a matmul's reductions are blocked by the batch shape and
the thread count, and float32 addition is not associative. How far apart they may be follows from
the size of the sums and the unit roundoff u = 2^-24 (Higham, "Accuracy and Stability of
Numerical Algorithms", 2nd ed., ch. 3):

- `dot_tol`: a dot product of length d summed in any order is within gamma_d * sum |a_i b_i| of
  the exact value, gamma_d = d u / (1 - d u): a proven bound, so two orders are within twice it.
- `lm_rtol`: a language model's log-prob goes through about 4 chained reductions of length
  `hidden` per layer (attention projections, attention, MLP), too many for the worst-case bound
  to say anything. Rounding errors of long float32 sums behave like a random walk (Higham & Mary,
  "A new approach to probabilistic rounding error analysis", SIAM J. Sci. Comput. 2019): relative
  error about lambda * sqrt(n) * u for n chained accumulations, lambda a small constant (4 here,
  which the probabilistic bound exceeds with probability below 1e-3 per value). Log-probs and the
  label log-scores that sum them are all negative, so the sum of their magnitudes is the
  magnitude of the result: the error is relative to the value itself.

A bug (another demonstration, a lost prefix, a wrong position) moves a log-score by 1e-2 or more;
these tolerances stay far below that for every model the suite runs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

__all__ = ["U32", "gamma", "dot_tol", "lm_rtol", "assert_scores_close", "assert_probs_close"]

U32 = 2.0**-24  # float32 unit roundoff
LAMBDA = 4.0  # the probabilistic bound's constant


def gamma(n: int) -> float:
    """gamma_n = n u / (1 - n u): the relative error bound of a float32 sum of n terms."""
    return n * U32 / (1 - n * U32)


def dot_tol(d: int, scale: float = 1.0) -> float:
    """Two float32 dot products of the same length-d vectors (|a| |b| <= scale, e.g. 1 for unit
    vectors) summed in any two orders differ by at most this (1.001: a float32 unit vector's norm
    is 1 only to a few ulps)."""
    return 2 * gamma(d) * scale * 1.001


def _shape(model) -> tuple[int, int]:
    """(layers, hidden size) of an LM: an HF config, a model or our LM wrapper, or a model folder."""
    if isinstance(model, (str, Path)):
        cfg = json.loads((Path(model) / "config.json").read_text())
        return cfg["num_hidden_layers"], cfg["hidden_size"]
    for attr in ("model", "config"):  # LM -> HF model -> config
        while hasattr(model, attr) and not hasattr(model, "num_hidden_layers"):
            model = getattr(model, attr)
    return model.num_hidden_layers, model.hidden_size


def lm_rtol(model) -> float:
    """Relative tolerance of an LM's float32 log-probs (or sums of them) computed twice in
    different batch shapes: LAMBDA * sqrt(4 * layers * hidden) * u."""
    layers, hidden = _shape(model)
    return LAMBDA * math.sqrt(4 * layers * hidden) * U32


def assert_scores_close(got, want, model) -> None:
    """Log-scores (or log-probs) of the same prompts from two computations."""
    r = lm_rtol(model)
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64), rtol=r, atol=r)


def assert_probs_close(got, want, log_scores, model) -> None:
    """Probabilities normalized from log-scores: p = exp(s - logsumexp(s)) moves by at most
    p * |d(s - lse)| <= 2 max|ds|, and |ds| <= rtol * |s|."""
    tol = 2 * lm_rtol(model) * max(1.0, float(np.max(np.abs(log_scores))))
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64), rtol=0, atol=tol)


def assert_separated(scores, d: int, top: int | None = None, scale: float = 1.0) -> None:
    """The premise of comparing a ranking against a brute force computed another way: the
    distinct scores (of vectors of length d, |a| |b| <= scale) lie further apart than two float32
    computations of them can (dot_tol), so no machine can order them differently. Equal scores
    are exact ties (duplicate vectors), broken by row on both sides. The test data are seeded,
    so what holds here holds on every machine. `top`: only the best `top` scores matter."""
    s = np.sort(np.unique(np.asarray(scores, np.float64)))[::-1][:top]
    gap = np.min(-np.diff(s)) if len(s) > 1 else np.inf
    tol = dot_tol(d, scale)
    assert gap > tol, f"scores {gap:.2e} apart: a float32 near-tie (dot_tol {tol:.2e}); pick another seed"
