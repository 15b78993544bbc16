"""Stage 7: score label continuations in one pass, plus calibration.

For a prompt x and label continuations y_1..y_L, score(x, y_j) = sum_t log p(y_j,t | x, y_j,<t).
This module checks the input, buckets prompts by length (sorted, batched with neighbours, order
restored) so padding is small, and hands each batch to the LM backend (`backend.LMBackend`).
The Hugging Face backend scores all L labels of a batch from ONE prompt pass plus at most one
short packed label pass (see `backends/hf.py`). A `Prefix` (instruction tokens and/or a soft
prompt, or prefix-tuning key/values) is computed once by the backend and every batch reads it.
`score_brute_force` is the slow obvious reference the tests compare against.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from . import cancel
from .backend import Ids, LMBackend, Prefix
from .choices import Calibration

__all__ = [
    "Prefix",
    "ScoreError",
    "check_inputs",
    "MAX_PADDING",
    "length_batches",
    "compute_prefix",
    "PendingScores",
    "launch_scores",
    "score_continuations",
    "score_brute_force",
    "next_token_logprobs",
    "normalize",
    "contextual_calibrate",
    "pmi",
    "calibrate",
]


class ScoreError(ValueError):
    """Bad scoring input (empty prompt or label, unknown token id); one-line message."""


def compute_prefix(lm: LMBackend, ids: Sequence[int] | None = None, embeds: torch.Tensor | None = None, *,
                   base: Prefix | None = None) -> Prefix:
    """Run the shared part once: `base` (an existing prefix) then `embeds` (a soft prompt,
    [P, H] or [1, P, H]) then `ids` (e.g. bos + instruction)."""
    if embeds is None and not ids:
        if base is None:
            raise ScoreError("compute_prefix needs ids, embeds or a base prefix")
        return base
    return lm.compute_prefix(ids, embeds, base=base)


def check_inputs(lm: LMBackend, prompts: Ids, continuations: Ids | None, prefix: Prefix | None) -> None:
    """ScoreError for string rows, ids outside the vocabulary, empty labels, or an empty prompt
    that nothing predicts from."""
    vocab = lm.vocab_size
    for what, seqs in (("prompt", prompts), ("continuation", continuations or ())):
        for i, s in enumerate(seqs):
            if isinstance(s, str):
                raise ScoreError(f"{what} {i} is a string; pass token ids")
        # all ids at once; the row at fault is looked for only when there is one
        flat = np.fromiter(itertools.chain.from_iterable(seqs), np.int64)
        if flat.size and (flat.min() < 0 or flat.max() >= vocab):
            i = next(i for i, s in enumerate(seqs) if len(s) and (min(s) < 0 or max(s) >= vocab))
            raise ScoreError(f"{what} {i} has a token id outside the vocabulary [0, {vocab})")
    if continuations is not None:
        if not continuations:
            raise ScoreError("no continuations to score")
        if any(len(c) == 0 for c in continuations):
            raise ScoreError(f"continuation {[len(c) for c in continuations].index(0)} is empty")
    if any(len(p) == 0 for p in prompts) and (prefix is None or prefix.logprobs is None):
        i = [len(p) for p in prompts].index(0)
        raise ScoreError(f"prompt {i} is empty; it needs at least one token (e.g. BOS) or a computed prefix")


# A bucket also ends where padding it to its longest prompt would spend more than this share of
# its positions on padding. A long sorted call rarely reaches it (about 5 % padding at 8 rows,
# benchmarks/results/padding_bench.md), but a short one (a server's few merged requests) would
# otherwise pad a few short prompts to a long one: on a CPU the LM's cost follows the positions
# it runs, not its rows, so the extra rows save nothing there.
MAX_PADDING = 0.125


def length_batches(prompts: Ids, batch_size: int, bucket: bool, max_padding: float = MAX_PADDING) -> list[list[int]]:
    """Index batches of at most `batch_size` rows. Bucketing sorts the prompts by length and cuts
    each batch from neighbours, ending it early where the next prompt would make padding more
    than `max_padding` of the batch's positions (rows x its longest prompt); unbucketed batches
    keep the input order and are cut by size alone."""
    if batch_size <= 0:
        raise ScoreError(f"batch_size must be positive, got {batch_size}")
    if not bucket:
        return [list(range(i, min(i + batch_size, len(prompts)))) for i in range(0, len(prompts), batch_size)]
    batches: list[list[int]] = []
    real = 0  # tokens in the open batch; sorted ascending, so the newest prompt is its longest
    for i in sorted(range(len(prompts)), key=lambda i: len(prompts[i])):
        n = len(prompts[i])
        rows = len(batches[-1]) + 1 if batches else 0
        if rows and rows <= batch_size and rows * n - (real + n) <= max_padding * rows * n:
            batches[-1].append(i)
            real += n
        else:
            batches.append([i])
            real = n
    return batches


@dataclass
class PendingScores:
    """Label scores queued on the LM's device by `launch_scores`; `result()` waits for them.

    On a GPU every batch's scores are copied into pinned CPU memory without waiting and one CUDA
    event marks the end of the work: the caller can prepare the next batch while the LM runs,
    and `result()` waits for these batches only, not for work queued after them. On a CPU the
    scores are ready when launch_scores returns."""

    shape: tuple[int, int]  # (q, L)
    parts: list[tuple[list[int], torch.Tensor]]  # (rows, their scores [b, L] on the CPU, maybe still arriving)
    event: torch.cuda.Event | None = None
    divide: np.ndarray | None = None  # [L] token counts, for length-normalised scores

    @classmethod
    def join(cls, shape: tuple[int, int], pieces: Sequence[tuple[Sequence[int], "PendingScores"]]) -> "PendingScores":
        """One batch's scores from passes over parts of it (exact and cached prompts): each piece's
        rows of the whole, and its PendingScores (none length-normalised)."""
        parts = [([rows[i] for i in idx], t) for rows, p in pieces for idx, t in p.parts]
        events = [p.event for _, p in pieces if p.event is not None]
        return cls(shape, parts, events[-1] if events else None)  # one stream: the last event waits for all

    def result(self) -> np.ndarray:
        """log p(continuation j | prompt i): float64 [q, L]."""
        if self.event is not None:
            self.event.synchronize()
        out = np.zeros(self.shape, dtype=np.float64)
        for idx, s in self.parts:
            out[idx] = s.double().numpy()
        return out if self.divide is None else out / self.divide


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A device tensor's copy in pinned CPU memory, queued without waiting; a CPU tensor as is."""
    if t.device.type != "cuda":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)


@torch.inference_mode()
def launch_scores(lm: LMBackend, prompts: Ids, continuations: Ids, *, prefix: Prefix | None = None,
                  batch_size: int = 8, length_normalize: bool = False, bucket: bool = True) -> PendingScores:
    """`score_continuations` without waiting for a GPU: queue every batch, return at once."""
    check_inputs(lm, prompts, continuations, prefix)
    parts = []
    for idx in length_batches(prompts, batch_size, bucket):
        cancel.check()  # a server's abandoned work ends here, at an LM batch boundary
        s = lm.score_batch([prompts[i] for i in idx], continuations, prefix)  # [B, L] on the LM's device
        parts.append((idx, _to_host(s)))
    event = None
    if any(t.is_pinned() for _, t in parts):
        event = torch.cuda.Event()
        event.record()
    divide = np.array([len(c) for c in continuations], np.float64) if length_normalize else None  # [L]
    return PendingScores((len(prompts), len(continuations)), parts, event, divide)


def score_continuations(lm: LMBackend, prompts: Ids, continuations: Ids, *, prefix: Prefix | None = None,
                        batch_size: int = 8, length_normalize: bool = False, bucket: bool = True) -> np.ndarray:
    """log p(continuation j | prompt i), summed over its tokens (mean if length_normalize):
    float64 [q, L]."""
    return launch_scores(lm, prompts, continuations, prefix=prefix, batch_size=batch_size,
                         length_normalize=length_normalize, bucket=bucket).result()


@torch.inference_mode()
def next_token_logprobs(lm: LMBackend, prompts: Ids, *, prefix: Prefix | None = None,
                        batch_size: int = 8) -> np.ndarray:
    """Log-softmax over the vocabulary after each prompt: float32 [q, V]."""
    check_inputs(lm, prompts, None, prefix)
    out = np.zeros((len(prompts), lm.vocab_size), dtype=np.float32)
    for idx in length_batches(prompts, batch_size, True):
        cancel.check()
        out[idx] = lm.next_token_logprobs([prompts[i] for i in idx], prefix).cpu().numpy()  # [B, V]
    return out


@torch.inference_mode()
def score_brute_force(lm: LMBackend, prompts: Ids, continuations: Ids, *, prefix: Prefix | None = None,
                      batch_size: int = 8, length_normalize: bool = False) -> np.ndarray:
    """Reference: one full forward per (prompt, continuation), batch 1, no padding, no reuse
    (only a prefix is read, as it cannot be re-derived from ids). `batch_size` is ignored."""
    check_inputs(lm, prompts, continuations, prefix)
    out = np.zeros((len(prompts), len(continuations)), dtype=np.float64)
    for i, p in enumerate(prompts):
        for j, c in enumerate(continuations):
            lp = lm.sequence_logprobs(list(p) + list(c), prefix)  # [N, V]
            # prepend what predicts token 0 (the prefix's last position, if any): row k then predicts token k
            before = prefix.logprobs[None].to(lp) if prefix is not None and prefix.logprobs is not None \
                else torch.full_like(lp[:1], float("nan"))  # never read: prompts are non-empty then
            lp = torch.cat([before, lp])  # [N+1, V]
            rows = torch.arange(len(p), len(p) + len(c))
            s = lp[rows.to(lp.device), torch.tensor(list(c), device=lp.device)].sum().item()
            out[i, j] = s / len(c) if length_normalize else s
    return out


# ----------------------------------------------------------------------------- calibration


def normalize(log_scores: np.ndarray) -> np.ndarray:
    """Scores -> log-probabilities over the labels (last axis), computed stably."""
    s = np.asarray(log_scores, dtype=np.float64)
    m = s.max(axis=-1, keepdims=True)
    return s - (m + np.log(np.exp(s - m).sum(axis=-1, keepdims=True)))


def contextual_calibrate(log_scores: np.ndarray, content_free_log_scores: np.ndarray) -> np.ndarray:
    """p_cal ∝ p / p_cf, renormalised; both arguments are label log-scores [q, L] (the
    content-free one may be [L]). The caller averages the content-free inputs' label
    probabilities (scored with the SAME demonstrations) and passes their log."""
    cf = normalize(content_free_log_scores)  # only ratios matter: normalise p_cf first
    return normalize(normalize(log_scores) - cf)


def pmi(log_scores: np.ndarray, premise_log_scores: np.ndarray) -> np.ndarray:
    """log p(y | prompt) - log p(y | domain premise): [q, L] (premise [q, L], [1, L] or [L])."""
    return np.asarray(log_scores, dtype=np.float64) - np.asarray(premise_log_scores, dtype=np.float64)


def calibrate(method: Calibration | str, log_scores: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """Label log-probs [q, L] after `method`; `reference` is the content-free scores
    (contextual) or the premise scores (pmi)."""
    method = Calibration(method)
    if method is Calibration.NONE:
        return normalize(log_scores)
    if reference is None:
        raise ValueError(f"calibration {method.value!r} needs reference scores")
    if method is Calibration.CONTEXTUAL:
        return contextual_calibrate(log_scores, reference)
    return normalize(pmi(log_scores, reference))
