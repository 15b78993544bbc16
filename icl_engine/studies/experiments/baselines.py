"""Cheap, honest baselines the bounds experiments need, in numpy/torch (no sklearn):

- `fit_logreg`: L2-regularised multinomial logistic regression (L-BFGS, float64): the
  "fine-tuned" reference of the linear experiment, and a linear probe on text features;
- `knn_vote`: k nearest neighbours by cosine over hashed bags of word uni/bi-grams (the
  engine's own `hashing:DIM` embedder, embed.py), majority vote. A legitimate retrieval
  baseline with the retrieval experiment's predictor signature; reports label it as such,
  never as the LM;
- `bow_logreg`: `fit_logreg` on the same hashed features of the pool, the stand-in for a
  fine-tuned model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ...core.data import Dataset
from ...core.embed import get_embedder

__all__ = ["LogReg", "fit_logreg", "knn_vote", "bow_logreg", "Predictor"]

# predict(pool, test) -> (predicted labels, label probabilities [len(test), len(pool.labels)])
Predictor = Callable[[Dataset, Dataset], "tuple[list[str], np.ndarray]"]


@dataclass(frozen=True)
class LogReg:
    W: np.ndarray  # [d, C]
    b: np.ndarray  # [C]

    def proba(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities [n, C]."""
        z = np.asarray(X, dtype=np.float64) @ self.W + self.b
        z -= z.max(1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(1, keepdims=True)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.proba(X).argmax(1)


def fit_logreg(X: np.ndarray, y: np.ndarray, n_classes: int, *, l2: float = 1e-2, max_iter: int = 100,
               dtype: torch.dtype = torch.float64) -> LogReg:
    """Minimise mean cross-entropy + l2/2 ||W||^2 (bias not penalised).

    Two classes: binary logistic regression by damped Newton in numpy (exact, ~1 ms for the
    small d of the linear experiment); the class-0 logit is fixed at 0. More classes:
    multinomial, L-BFGS in torch. The penalty keeps the solution finite on separable data
    (the noise-free linear task is separable), so the fit is well defined at every N."""
    X, y = np.asarray(X, dtype=np.float64), np.asarray(y)
    if n_classes == 2 and X.shape[1] <= 256:
        w = _newton_binary(X, (y == 1).astype(np.float64), l2, max_iter)
        W = np.stack([np.zeros(X.shape[1]), w[:-1]], axis=1)  # [d, 2]
        return LogReg(W, np.array([0.0, w[-1]]))
    Xt = torch.as_tensor(X, dtype=dtype)  # [n, d]
    yt = torch.as_tensor(y, dtype=torch.long)  # [n]
    W = torch.zeros(X.shape[1], n_classes, dtype=dtype, requires_grad=True)
    b = torch.zeros(n_classes, dtype=dtype, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, tolerance_grad=1e-7, tolerance_change=1e-9,
                            history_size=10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(Xt @ W + b, yt) + 0.5 * l2 * (W * W).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return LogReg(W.detach().double().numpy(), b.detach().double().numpy())


def _newton_binary(X: np.ndarray, t: np.ndarray, l2: float, max_iter: int) -> np.ndarray:
    """-> [d + 1] weights then bias, for mean log-loss + l2/2 ||w||^2 (convex: Newton with
    step halving converges)."""
    n, d = X.shape
    A = np.hstack([X, np.ones((n, 1))])  # [n, d+1]
    reg = np.full(d + 1, l2)
    reg[-1] = 1e-8  # the bias is not penalised (a whisker keeps one-class pools solvable)
    w = np.zeros(d + 1)

    def loss(w):
        z = A @ w
        return np.mean(np.logaddexp(0, z) - t * z) + 0.5 * np.sum(reg * w * w)

    f = loss(w)
    for _ in range(max_iter):
        p = 1 / (1 + np.exp(-(A @ w)))
        g = A.T @ (p - t) / n + reg * w
        H = (A * (p * (1 - p))[:, None]).T @ A / n + np.diag(reg)
        step = np.linalg.solve(H, g)
        a = 1.0
        while a > 1e-8:
            f_new = loss(w - a * step)
            if f_new <= f:
                break
            a /= 2
        w, f_old, f = w - a * step, f, f_new
        if np.max(np.abs(g)) < 1e-10 or f_old - f < 1e-14:
            break
    return w


class _Features:
    """The hashing embedder with a per-text memo: the experiments call predictors on nested
    subsets of one pool, so each text is embedded once. float32 [n, dim], unit norm."""

    def __init__(self, dim: int):
        self.dim, self.memo = dim, {}
        self.embedder = get_embedder(f"hashing:{dim}")

    def __call__(self, texts) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in self.memo]
        if missing:
            self.memo.update(zip(missing, self.embedder.encode(missing)))
        return np.stack([self.memo[t] for t in texts]) if texts else np.zeros((0, self.dim), np.float32)


def knn_vote(k: int = 8, dim: int = 1024) -> Predictor:
    """BASELINE (not the LM): majority vote of the k most cosine-similar pool texts; ties go to
    the label with the larger summed similarity. Probabilities are the vote shares."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    feats = _Features(dim)

    def predict(pool: Dataset, test: Dataset) -> tuple[list[str], np.ndarray]:
        labels = list(pool.labels)
        pos = {lab: j for j, lab in enumerate(labels)}
        P = feats([r.input for r in pool])  # [n, dim]
        Q = feats([r.input for r in test])  # [q, dim]
        y = np.array([pos[r.output] for r in pool])
        kk = min(k, len(pool))
        sim = Q @ P.T  # [q, n]
        top = np.argpartition(-sim, kk - 1, axis=1)[:, :kk]  # [q, kk]
        votes = np.zeros((len(test), len(labels)))
        simsum = np.zeros_like(votes)
        rows = np.arange(len(test))[:, None]
        np.add.at(votes, (rows, y[top]), 1.0)
        np.add.at(simsum, (rows, y[top]), sim[rows, top])
        # |simsum| <= kk, so one vote (worth 2kk+1) always outweighs any similarity difference
        pred = (votes * (2 * kk + 1) + simsum).argmax(1)
        return [labels[j] for j in pred], votes / kk

    predict.__name__ = f"knn_vote(k={k})"
    predict.baseline = True  # reports flag it: never to be mistaken for the LM
    return predict


def bow_logreg(l2: float = 1e-3, dim: int = 512, max_iter: int = 50) -> Predictor:
    """BASELINE stand-in for a fine-tuned model: a logistic-regression probe on hashed
    bag-of-words features, trained on the pool."""
    feats = _Features(dim)

    def predict(pool: Dataset, test: Dataset) -> tuple[list[str], np.ndarray]:
        labels = list(pool.labels)
        pos = {lab: j for j, lab in enumerate(labels)}
        model = fit_logreg(feats([r.input for r in pool]), np.array([pos[r.output] for r in pool]),
                           len(labels), l2=l2, max_iter=max_iter, dtype=torch.float32)
        probs = model.proba(feats([r.input for r in test]))
        return [labels[j] for j in probs.argmax(1)], probs

    predict.__name__ = f"bow_logreg(l2={l2:g})"
    predict.baseline = True
    return predict
