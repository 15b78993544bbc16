"""A linear readout over kNN prompting's anchors: the same frozen-LM features (each record's
next-token distribution after a short fixed context, knn_prompt.py), read by a multinomial
logistic regression instead of a vote of the nearest anchors.

    readout = fit_readout(anchors)                       # labels: the anchors' own (gold), or given
    readout.save("anchors/rt")                           # readout.safetensors + readout.json beside them
    readout = LinearReadout.load("anchors/rt", anchors)  # refused if fitted to other anchors
    probs = readout.predict(query_logp)                  # [q, S+1] log-probs -> [q, L] label probabilities

The LM stays frozen; what is learned is (S+1) x L weights (2,050 for Rotten Tomatoes). Its L2
strength is picked on a seeded tenth of the anchors held out, then the readout is refitted on
all of them. `labels` may be the fine-tuned reference's labels for the anchors (distillation, no
gold labels needed), which teaches the readout the reference's decisions.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from safetensors.numpy import load_file, save_file

from .atomic import read_json, write_json, writing
from .knn_prompt import AnchorError, Anchors
from .logreg import fit_logreg, predict_proba

__all__ = ["LinearReadout", "fit_readout", "has_readout", "no_readout", "READOUT_JSON", "READOUT_TENSORS", "DEFAULT_L2_GRID"]

READOUT_JSON, READOUT_TENSORS = "readout.json", "readout.safetensors"
# On standardised features, in logreg.py's l2/2 * ||W||^2 convention; 2e-3 fits RT's 11,752 anchors without overfit.
DEFAULT_L2_GRID = (2e-3, 2e-2, 2e-1)


def anchors_key(anchors: Anchors) -> str:
    """What a readout was fitted over: the anchors' manifest (LM, template, index) and support."""
    h = hashlib.sha256(json.dumps({k: v for k, v in anchors.manifest.items() if k != "ids"}, sort_keys=True).encode())
    h.update(anchors.support.tobytes())
    return h.hexdigest()


@dataclass
class LinearReadout:
    weight: np.ndarray  # [S+1, L] float32, over standardised features
    bias: np.ndarray  # [L]
    mean: np.ndarray  # [S+1]: the anchors' feature mean and standard deviation
    std: np.ndarray  # [S+1]
    info: dict  # l2, held-out accuracy per l2, label source, anchors key

    def predict(self, query_logp: np.ndarray) -> np.ndarray:
        """Label probabilities float64 [q, L] for query features [q, S+1] (log-probs on the support)."""
        return predict_proba((query_logp.astype(np.float64) - self.mean) / self.std, self.weight, self.bias)

    def save(self, folder: str | Path) -> None:
        """Beside the anchors; the tensors first, then the JSON naming their checksum, each by rename."""
        folder = Path(folder)
        tensors = {"weight": self.weight, "bias": self.bias, "mean": self.mean, "std": self.std}
        with writing(folder / READOUT_TENSORS) as tmp:
            save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, str(tmp))
            digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
        write_json(folder / READOUT_JSON, {**self.info, "tensors_sha256": digest})

    @classmethod
    def load(cls, folder: str | Path, anchors: Anchors) -> "LinearReadout":
        folder = Path(folder)
        if not has_readout(folder):
            raise AnchorError(no_readout(folder))
        info = read_json(folder / READOUT_JSON, "a linear readout", AnchorError)
        if info.get("anchors_key") != anchors_key(anchors):
            raise AnchorError(f"{folder}: the linear readout was fitted to other anchors; refit it with "
                              "`icl anchors build --readout linear --force`")
        if hashlib.sha256((folder / READOUT_TENSORS).read_bytes()).hexdigest() != info.get("tensors_sha256"):
            raise AnchorError(f"{folder}: {READOUT_TENSORS} does not match {READOUT_JSON}; refit the readout")
        t = load_file(str(folder / READOUT_TENSORS))
        s, n_labels = anchors.logp.shape[1], len(anchors.label_names)
        if t["weight"].shape != (s, n_labels) or t["bias"].shape != (n_labels,):
            raise AnchorError(f"{folder}: the readout's shape does not fit these anchors; refit it")
        return cls(t["weight"], t["bias"], t["mean"], t["std"], info)


def has_readout(folder: str | Path) -> bool:
    """Whether an anchors folder holds a fitted readout (either of its files: a torn pair is refused at load)."""
    return (Path(folder) / READOUT_JSON).is_file() or (Path(folder) / READOUT_TENSORS).is_file()


def no_readout(folder: str | Path) -> str:
    return f"{folder} holds no linear readout (fit one with `icl anchors build --readout linear`)"


def fit_readout(anchors: Anchors, labels: np.ndarray | None = None, *, label_source: str = "gold",
                l2_grid: Sequence[float] = DEFAULT_L2_GRID, holdout: float = 0.1, seed: int = 0) -> LinearReadout:
    """Fit the readout to `labels` [N] (indices into anchors.label_names; default the anchors'
    own). The L2 strength with the best accuracy on a seeded `holdout` share of the anchors wins
    (ties to the stronger one), then the readout is refitted on every anchor."""
    y = np.asarray(anchors.labels if labels is None else labels, dtype=np.int64)
    n, n_labels = len(anchors.ids), len(anchors.label_names)
    if y.shape != (n,) or y.min() < 0 or y.max() >= n_labels:
        raise AnchorError(f"readout labels must be {n} indices into {n_labels} labels")
    if not l2_grid or min(l2_grid) < 0 or not 0 < holdout < 1:
        raise AnchorError("l2_grid needs values >= 0 and holdout a share in (0, 1)")
    x = anchors.logp.astype(np.float64)  # [N, S+1]
    mean, std = x.mean(0), x.std(0, ddof=1) + 1e-4  # the + keeps near-constant support tokens from blowing up
    x = (x - mean) / std
    perm = np.random.default_rng(seed).permutation(n)
    held, fit = perm[: max(1, int(holdout * n))], perm[max(1, int(holdout * n)):]
    scores = {}
    for l2 in sorted(l2_grid, reverse=True):
        w, b = fit_logreg(x[fit], y[fit], n_labels, l2=l2)
        scores[l2] = float(np.mean((x[held] @ w + b).argmax(1) == y[held]))
    best = max(scores, key=lambda l2: (scores[l2], l2))
    w, b = fit_logreg(x, y, n_labels, l2=best)
    info = {"l2": best, "heldout_accuracy": {str(k): v for k, v in scores.items()}, "holdout": holdout, "seed": seed,
            "label_source": label_source, "n": n, "anchors_key": anchors_key(anchors)}
    w, b, mean, std = (a.astype(np.float32) for a in (w, b, mean, std))
    return LinearReadout(w, b, mean, std, info)
