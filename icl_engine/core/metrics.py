"""Evaluation metrics: accuracy, macro-F1, confusion matrix (classification); corpus BLEU and
ROUGE-L against every reference of an input (generation); the percentile bootstrap of a mean
(every interval the studies report).

Pure functions over lists; labels are indexed in the dataset's label order, never set() order.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np

__all__ = ["accuracy", "macro_f1", "confusion_matrix", "bleu", "rouge_l", "rouge_l_pair", "bootstrap_mean"]


def accuracy(gold: Sequence[str], pred: Sequence[str]) -> float:
    if len(gold) != len(pred) or not gold:
        raise ValueError(f"accuracy needs two equal, non-empty lists (got {len(gold)} and {len(pred)})")
    return float(np.mean([g == p for g, p in zip(gold, pred)]))


def confusion_matrix(gold: Sequence[str], pred: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """int64 [L, L]: rows are gold labels, columns predictions, both in `labels` order."""
    pos = {lab: i for i, lab in enumerate(labels)}
    cm = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for g, p in zip(gold, pred):
        cm[pos[g], pos[p]] += 1
    return cm


def macro_f1(gold: Sequence[str], pred: Sequence[str], labels: Sequence[str]) -> float:
    """Unweighted mean of per-label F1 over `labels`; a label never gold nor predicted counts 0
    only if it appears in gold (sklearn's convention with labels=present gold labels)."""
    cm = confusion_matrix(gold, pred, labels).astype(np.float64)
    tp = np.diag(cm)
    precision = np.divide(tp, cm.sum(0), out=np.zeros_like(tp), where=cm.sum(0) > 0)
    recall = np.divide(tp, cm.sum(1), out=np.zeros_like(tp), where=cm.sum(1) > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    present = (cm.sum(1) + cm.sum(0)) > 0  # labels that occur in gold or predictions
    return float(f1[present].mean())


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (sacrebleu, 0-100) with a varying number of references per hypothesis."""
    import sacrebleu

    n_refs = max(len(r) for r in references)
    # sacrebleu takes reference *streams*; None marks "this input has fewer references".
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(n_refs)]
    return float(sacrebleu.corpus_bleu(list(hypotheses), streams).score)


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l_pair(hypothesis: str, reference: str) -> float:
    """ROUGE-L F1 (beta = 1) over lower-cased whitespace tokens."""
    h, r = hypothesis.lower().split(), reference.lower().split()
    if not h or not r:
        return 0.0
    lcs = _lcs(h, r)
    if lcs == 0:
        return 0.0
    p, rec = lcs / len(h), lcs / len(r)
    return 2 * p * rec / (p + rec)


def rouge_l(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean over inputs of the best ROUGE-L F1 against any of that input's references (0-100)."""
    scores = [max(rouge_l_pair(h, r) for r in refs) for h, refs in zip(hypotheses, references)]
    return 100.0 * float(np.mean(scores))


def bootstrap_mean(values, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0):
    """Mean over rows (draws) of `values` [R, K] with a percentile-bootstrap interval per column.
    Returns (mean [K], low [K], high [K]); the interval is NaN with fewer than two draws."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 1:
        v = v[:, None]
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: NaN is the intended answer
        mean = np.nanmean(v, axis=0)
        if v.shape[0] < 2:
            nan = np.full(v.shape[1], np.nan)
            return mean, nan, nan.copy()
        idx = np.random.default_rng(seed).integers(0, v.shape[0], size=(n_boot, v.shape[0]))
        boot = np.nanmean(v[idx], axis=1)  # [B, K]
        q = (1 - level) / 2
        lo, hi = np.nanquantile(boot, [q, 1 - q], axis=0)
    return mean, lo, hi
