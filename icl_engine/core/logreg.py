"""Multinomial logistic regression: the one fitter of the engine (the anchors' linear readout,
readout.py) and of the studies' baselines (studies/experiments/baselines.py).

    W, b = fit_logreg(X, y, n_classes, l2=1e-2)   # X [n, d], y [n] ints in [0, C) -> W [d, C], b [C]
    P = predict_proba(X, W, b)                    # [n, C], rows sum to 1

The convention, for every caller:

    objective(W, b) = mean_i -log softmax(X_i W + b)[y_i] + l2/2 * ||W||_F^2 + L2_BIAS/2 * ||b||^2

Each class has its own column of W (the symmetric softmax). The bias is unpenalised up to the
L2_BIAS whisker, which keeps the minimum finite and unique: a pool missing a class would push that
class's bias to -inf, and softmax's shift invariance would leave the mean of b free. A two-class
fit with one weight vector w = W[:, 1] - W[:, 0] penalised l2'/2 * ||w||^2 (scikit-learn's binary
LogisticRegression with C = 1 / (l2' n)) is the same model at l2 = 2 l2'.

Solver: Newton's method from zero, each step solved by conjugate gradients on Hessian-vector
products (no (d C) x (d C) matrix is formed), with Armijo backtracking. The problem is convex and
nothing is random, so the answer is deterministic and does not depend on a start; it stops when
the gradient is down to what float64 rounding of its own computation allows (rounding_tolerance).
"""

from __future__ import annotations

import numpy as np

__all__ = ["fit_logreg", "predict_proba", "objective", "gradient", "rounding_tolerance", "L2_BIAS"]

L2_BIAS = 1e-8  # the bias's whisker of a penalty (see above): far below any l2 a caller uses
_EPS = np.finfo(np.float64).eps


def predict_proba(X: np.ndarray, W: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Class probabilities float64 [n, C] for features X [n, d], weights W [d, C], bias b [C]."""
    z = np.asarray(X, dtype=np.float64) @ np.asarray(W, dtype=np.float64) + b  # [n, C]
    z -= z.max(1, keepdims=True)  # stable: exp of at most 0
    p = np.exp(z)
    return p / p.sum(1, keepdims=True)


def objective(X: np.ndarray, y: np.ndarray, W: np.ndarray, b: np.ndarray, l2: float) -> float:
    """The convention's value (module doc) at W [d, C], b [C] for X [n, d], y [n]."""
    z = X @ W + b  # [n, C]
    top = z.max(1)
    lse = top + np.log(np.exp(z - top[:, None]).sum(1))  # [n]
    nll = np.mean(lse - z[np.arange(len(y)), y])
    return float(nll + 0.5 * l2 * np.sum(W * W) + 0.5 * L2_BIAS * np.sum(b * b))


def gradient(X: np.ndarray, y: np.ndarray, W: np.ndarray, b: np.ndarray, l2: float) -> tuple[np.ndarray, np.ndarray]:
    """The objective's gradient: ([d, C] for W, [C] for b)."""
    g = predict_proba(X, W, b)  # [n, C]: P - onehot(y), over n
    g[np.arange(len(y)), y] -= 1.0
    g /= len(y)
    return X.T @ g + l2 * W, g.sum(0) + L2_BIAS * b


def rounding_tolerance(X: np.ndarray, W: np.ndarray) -> float:
    """A bound on the float64 rounding error of `gradient`'s entries: each is a mean of n terms
    |x| * |p - y| <= max|x| plus logits summed over d features, so no solver can promise a
    max-norm below about eps * (n + d C) * max|x| * max(1, max|W|)."""
    n, d = X.shape
    scale = max(1.0, float(np.abs(X).max(initial=0.0))) * max(1.0, float(np.abs(W).max(initial=0.0)))
    return _EPS * (n + d * W.shape[1]) * scale


def _hessian_times(X: np.ndarray, P: np.ndarray, l2: float, V: np.ndarray, vb: np.ndarray):
    """The objective's Hessian at probabilities P [n, C] applied to (V [d, C], vb [C])."""
    z = X @ V + vb  # [n, C]: the logits' change along (V, vb)
    r = P * (z - (P * z).sum(1, keepdims=True)) / len(X)  # softmax Jacobian, averaged over n
    return X.T @ r + l2 * V, r.sum(0) + L2_BIAS * vb


def _newton_step(X, P, l2, gW, gb, max_cg: int):
    """Approximately solve H s = -g by conjugate gradients, to a residual min(0.5, sqrt|g|) |g|
    (superlinear convergence near the optimum, cheap steps far from it)."""
    sW, sb = np.zeros_like(gW), np.zeros_like(gb)
    rW, rb = -gW, -gb
    dW, db = rW.copy(), rb.copy()
    rr = np.sum(rW * rW) + np.sum(rb * rb)
    stop = min(0.5, rr ** 0.25) ** 2 * rr  # squared target residual
    for _ in range(max_cg):
        if rr <= stop:
            break
        hW, hb = _hessian_times(X, P, l2, dW, db)
        a = rr / (np.sum(dW * hW) + np.sum(db * hb))
        sW, sb, rW, rb = sW + a * dW, sb + a * db, rW - a * hW, rb - a * hb
        rr, rr_old = np.sum(rW * rW) + np.sum(rb * rb), rr
        dW, db = rW + rr / rr_old * dW, rb + rr / rr_old * db
    return sW, sb


def fit_logreg(X: np.ndarray, y: np.ndarray, n_classes: int, *, l2: float,
               max_iter: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Minimise the convention's objective (module doc) for X [n, d], y [n] ints in
    [0, n_classes). Returns W float64 [d, C] and b float64 [C]."""
    X, y = np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.int64)
    if X.ndim != 2 or y.shape != (len(X),) or len(X) == 0 or l2 < 0:
        raise ValueError(f"fit_logreg needs X [n, d], y [n] with n >= 1 and l2 >= 0; got {X.shape}, {y.shape}, {l2}")
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"labels must lie in [0, {n_classes})")
    W, b = np.zeros((X.shape[1], n_classes)), np.zeros(n_classes)
    f = objective(X, y, W, b, l2)
    for _ in range(max_iter):
        gW, gb = gradient(X, y, W, b, l2)
        if max(np.abs(gW).max(initial=0.0), np.abs(gb).max()) <= rounding_tolerance(X, W):
            break
        sW, sb = _newton_step(X, predict_proba(X, W, b), l2, gW, gb, max_cg=W.size + b.size)
        slope = np.sum(gW * sW) + np.sum(gb * sb)  # < 0: H is positive definite
        # Armijo, with the objective's own rounding as slack: close to the optimum the decrease a
        # Newton step earns is below what a mean over n terms can resolve, and the full step is right.
        noise = _EPS * len(X) * max(1.0, abs(f))
        a = 1.0
        while a > 1e-10 and objective(X, y, W + a * sW, b + a * sb, l2) > f + 1e-4 * a * slope + noise:
            a /= 2
        if a <= 1e-10:
            break  # no decrease left to find: the loss is flat to rounding here
        W, b = W + a * sW, b + a * sb
        f = objective(X, y, W, b, l2)
    return W, b
