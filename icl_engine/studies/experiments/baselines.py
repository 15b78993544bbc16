"""Cheap, honest baselines the bounds experiments need, in numpy (no sklearn):

- `fit_logreg`: core/logreg.py's multinomial logistic regression (its l2 convention) as a
  `LogReg`: the "fine-tuned" reference of the linear experiment, and a linear probe on text features;
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

from ...core import logreg
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
        return logreg.predict_proba(X, self.W, self.b)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.proba(X).argmax(1)


def fit_logreg(X: np.ndarray, y: np.ndarray, n_classes: int, *, l2: float = 1e-2, max_iter: int = 100) -> LogReg:
    """Mean cross-entropy + l2/2 ||W||^2, bias unpenalised (core/logreg.py). The penalty keeps
    the solution finite on separable data (the noise-free linear task is separable), so the
    fit is well defined at every N."""
    return LogReg(*logreg.fit_logreg(X, y, n_classes, l2=l2, max_iter=max_iter))


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
                           len(labels), l2=l2, max_iter=max_iter)
        probs = model.proba(feats([r.input for r in test]))
        return [labels[j] for j in probs.argmax(1)], probs

    predict.__name__ = f"bow_logreg(l2={l2:g})"
    predict.baseline = True
    return predict
