"""Stage 7: score label continuations in one pass, plus calibration.

For a prompt x and label continuations y_1..y_L, score(x, y_j) = sum_t log p(y_j,t | x, y_j,<t).
All L labels of a prompt come from ONE forward over the prompt:
  1. prompt pass: the prompts of a batch, left-padded; the log-probs at the last position give
     every label's first token, and the pass leaves a KV cache of the prompt.
  2. label pass (only when some label has 2+ tokens): the labels' tokens (all but the last of
     each) packed side by side into one short sequence that reads the prompt cache; a 4D mask
     lets each packed token see the prompt and the earlier tokens of its own label only, and
     each label's tokens take positions len(prompt), len(prompt)+1, ... as if it were alone.
Prompts are bucketed by length (sorted, batched with neighbours, order restored) so padding is
small; positions are computed from the attention mask, so a padded row scores exactly like an
unpadded one. A `Prefix` (instruction tokens and/or a soft prompt, or prefix-tuning key/values)
is computed once and every batch reads a copy of its cache.
`score_brute_force` is the slow obvious reference the tests compare against.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from enum import Enum
from typing import Sequence

import numpy as np
import torch
from transformers.cache_utils import Cache, DynamicCache

from .lm import LM

__all__ = [
    "Prefix",
    "ScoreError",
    "compute_prefix",
    "score_continuations",
    "score_brute_force",
    "next_token_logprobs",
    "Calibration",
    "normalize",
    "contextual_calibrate",
    "pmi",
    "calibrate",
]

Ids = Sequence[Sequence[int]]


class ScoreError(ValueError):
    """Bad scoring input (empty prompt or label, unknown token id); one-line message."""


# ----------------------------------------------------------------------------- shared prefix


@dataclass
class Prefix:
    """Key/values of tokens shared by every prompt, computed once with batch 1.

    `past_key_values`: a DynamicCache or per-layer (key, value) pairs [1, H_kv, P, D] (prefix
    tuning can build one directly); stored as a tuple of pairs. `logprobs` [V]: next-token
    log-probs after the prefix, needed only to score a prompt that is empty after the prefix
    (None for raw key/values)."""

    past_key_values: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    length: int | None = None
    logprobs: torch.Tensor | None = None

    def __post_init__(self):
        kv = self.past_key_values
        if isinstance(kv, Cache):
            kv = [(layer.keys, layer.values) for layer in kv.layers]
        kv = tuple((pair[0], pair[1]) for pair in kv)
        if not kv or any(k.ndim != 4 or k.shape[0] != 1 or k.shape != v.shape for k, v in kv):
            raise ValueError("past_key_values: need one (key, value) pair per layer, each [1, H_kv, P, D]")
        n = kv[0][0].shape[-2]
        if self.length is None:
            self.length = n
        if self.length != n:
            raise ValueError(f"length: {self.length} but the key/values hold {n} positions")
        self.past_key_values = kv

    def cache(self, batch: int, config=None) -> DynamicCache:
        """A fresh cache for `batch` rows. DynamicCache.update concatenates into new tensors, so
        the prefix's own tensors are never written to."""
        expand = lambda t: t.expand(batch, -1, -1, -1)  # noqa: E731  [1, H, P, D] -> [B, H, P, D]
        return DynamicCache([(expand(k), expand(v)) for k, v in self.past_key_values], config=config)


def _config(lm: LM):
    return lm.model.config


@torch.inference_mode()
def compute_prefix(lm: LM, ids: Sequence[int] | None = None, embeds: torch.Tensor | None = None, *,
                   base: Prefix | None = None) -> Prefix:
    """Run the shared part once: `base` (an existing prefix) then `embeds` (a soft prompt,
    [P, H] or [1, P, H]) then `ids` (e.g. bos + instruction)."""
    model = lm.model
    parts = []
    if embeds is not None:
        e = embeds if embeds.ndim == 3 else embeds[None]
        parts.append(e.to(lm.device, lm.dtype))  # [1, P, H]
    if ids:
        t = torch.tensor([list(ids)], device=lm.device)
        parts.append(model.get_input_embeddings()(t))  # [1, N, H]
    if not parts:
        if base is None:
            raise ScoreError("compute_prefix needs ids, embeds or a base prefix")
        return base
    x = torch.cat(parts, dim=1)  # [1, N, H]
    p0, n = (base.length if base else 0), x.shape[1]
    cache = base.cache(1, _config(lm)) if base else DynamicCache(config=_config(lm))
    out = model(
        inputs_embeds=x, attention_mask=torch.ones(1, p0 + n, dtype=torch.long, device=lm.device),
        position_ids=torch.arange(p0, p0 + n, device=lm.device)[None], past_key_values=cache, use_cache=True,
        **_last_only(lm),
    )
    return Prefix(out.past_key_values, p0 + n, logprobs=out.logits[0, -1].float().log_softmax(-1))


# ----------------------------------------------------------------------------- batched passes


def _last_only(lm: LM) -> dict:
    """Ask for logits at the last position only: the lm_head over the whole prompt is the
    biggest single matmul for small models with large vocabularies."""
    base = lm.model.get_base_model() if hasattr(lm.model, "get_base_model") else lm.model
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}


def _prefill(lm: LM, rows: Ids, prefix: Prefix | None):
    """Prompt pass over left-padded rows.

    -> logprobs [B, V] at each row's last token, the cache [B, H, P+T, D], the attention mask
    [B, P+T] (1 = real), next position [B] (where each row's next token goes)."""
    B, T, P = len(rows), max(len(r) for r in rows), (prefix.length if prefix else 0)
    pad = lm.tokenizer.pad_token_id or 0
    dev = lm.device
    ids = torch.tensor([[pad] * (T - len(r)) + list(r) for r in rows], dtype=torch.long, device=dev)  # [B, T]
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows], dtype=torch.long, device=dev)
    # positions count real tokens only, so padding never shifts a row's rotary phases
    pos = (mask.cumsum(1) - 1).clamp(min=0) + P  # [B, T]
    full = torch.cat([torch.ones(B, P, dtype=torch.long, device=dev), mask], 1)  # [B, P+T]
    cache = prefix.cache(B, _config(lm)) if prefix else DynamicCache(config=_config(lm))
    lengths = mask.sum(1)  # [B]
    if T == 0:  # every row is empty after the prefix: the prefix's last position predicts
        return prefix.logprobs.to(dev).expand(B, -1).clone(), cache, full, lengths + P
    out = lm.model(input_ids=ids, attention_mask=full, position_ids=pos, past_key_values=cache,
                   use_cache=True, **_last_only(lm))
    logprobs = out.logits[:, -1].float().log_softmax(-1)  # [B, V]
    empty = lengths == 0
    if empty.any():  # this row's last position is padding; the prefix's last position predicts
        logprobs[empty] = prefix.logprobs.to(dev)
    return logprobs, out.past_key_values, full, lengths + P


@dataclass
class _Packed:
    """The labels' tokens side by side (all but each label's last token): C tokens."""

    first: torch.Tensor  # [L] first token of each label
    ids: torch.Tensor  # [C] packed input tokens
    seg: torch.Tensor  # [C] which label each packed token belongs to
    off: torch.Tensor  # [C] its offset inside the label
    target: torch.Tensor  # [C] the token it predicts
    block: torch.Tensor  # [C, C] bool: packed token i may see packed token j
    lengths: torch.Tensor  # [L] tokens per label

    @classmethod
    def build(cls, conts: Ids, device) -> "_Packed":
        t = lambda x, dt=torch.long: torch.tensor(x, dtype=dt, device=device)  # noqa: E731
        seg = t([j for j, c in enumerate(conts) for _ in c[:-1]])
        off = t([o for c in conts for o in range(len(c) - 1)])
        block = (seg[:, None] == seg[None, :]) & (off[:, None] >= off[None, :])  # causal within a label
        return cls(
            first=t([c[0] for c in conts]), ids=t([x for c in conts for x in c[:-1]]), seg=seg, off=off,
            target=t([x for c in conts for x in c[1:]]), block=block, lengths=t([len(c) for c in conts]),
        )


def _score_batch(lm: LM, rows: Ids, packed: _Packed, prefix: Prefix | None) -> torch.Tensor:
    """-> summed log-probs [B, L] of every label after every row."""
    logprobs, cache, full, next_pos = _prefill(lm, rows, prefix)
    B = len(rows)
    scores = logprobs[:, packed.first]  # [B, L] first tokens, from the prompt pass
    C = packed.ids.numel()
    if C == 0:  # all labels are single tokens: done in one pass
        return scores
    K = full.shape[1]  # P+T cached positions
    see = torch.cat([full.bool()[:, None, :].expand(B, C, K), packed.block.expand(B, C, C)], -1)  # [B, C, K+C]
    mask = torch.zeros(B, 1, C, K + C, dtype=lm.dtype, device=lm.device)
    mask.masked_fill_(~see[:, None], torch.finfo(lm.dtype).min)  # additive: works for sdpa and eager
    out = lm.model(input_ids=packed.ids.expand(B, C), attention_mask=mask,
                   position_ids=next_pos[:, None] + packed.off[None], past_key_values=cache, use_cache=True)
    lp = out.logits.float().log_softmax(-1)  # [B, C, V]
    got = lp.gather(-1, packed.target.expand(B, C)[..., None])[..., 0]  # [B, C]
    return scores.index_add(1, packed.seg, got)


def _check(lm: LM, prompts: Ids, continuations: Ids | None, prefix: Prefix | None) -> None:
    vocab = lm.model.get_input_embeddings().num_embeddings
    for what, seqs in (("prompt", prompts), ("continuation", continuations or ())):
        for i, s in enumerate(seqs):
            if isinstance(s, str):
                raise ScoreError(f"{what} {i} is a string; pass token ids")
            if len(s) and (min(s) < 0 or max(s) >= vocab):
                raise ScoreError(f"{what} {i} has a token id outside the vocabulary [0, {vocab})")
    if continuations is not None:
        if not continuations:
            raise ScoreError("no continuations to score")
        if any(len(c) == 0 for c in continuations):
            raise ScoreError(f"continuation {[len(c) for c in continuations].index(0)} is empty")
    if any(len(p) == 0 for p in prompts) and (prefix is None or prefix.logprobs is None):
        i = [len(p) for p in prompts].index(0)
        raise ScoreError(f"prompt {i} is empty; it needs at least one token (e.g. BOS) or a computed prefix")


def _batches(prompts: Ids, batch_size: int, bucket: bool) -> list[list[int]]:
    """Index batches; bucketing puts prompts of similar length together so padding is small."""
    if batch_size <= 0:
        raise ScoreError(f"batch_size must be positive, got {batch_size}")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i])) if bucket else list(range(len(prompts)))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.inference_mode()
def score_continuations(lm: LM, prompts: Ids, continuations: Ids, *, prefix: Prefix | None = None,
                        batch_size: int = 8, length_normalize: bool = False, bucket: bool = True) -> np.ndarray:
    """log p(continuation j | prompt i), summed over its tokens (mean if length_normalize):
    float64 [q, L]."""
    _check(lm, prompts, continuations, prefix)
    packed = _Packed.build(continuations, lm.device)
    out = np.zeros((len(prompts), len(continuations)), dtype=np.float64)
    for idx in _batches(prompts, batch_size, bucket):
        s = _score_batch(lm, [prompts[i] for i in idx], packed, prefix)  # [B, L]
        if length_normalize:
            s = s / packed.lengths
        out[idx] = s.double().cpu().numpy()
    return out


@torch.inference_mode()
def next_token_logprobs(lm: LM, prompts: Ids, *, prefix: Prefix | None = None, batch_size: int = 8) -> np.ndarray:
    """Log-softmax over the vocabulary after each prompt: float32 [q, V]."""
    _check(lm, prompts, None, prefix)
    out = None
    for idx in _batches(prompts, batch_size, True):
        lp = _prefill(lm, [prompts[i] for i in idx], prefix)[0].cpu().numpy()  # [B, V]
        out = np.zeros((len(prompts), lp.shape[1]), dtype=np.float32) if out is None else out
        out[idx] = lp
    return out if out is not None else np.zeros((0, lm.model.get_output_embeddings().weight.shape[0]), np.float32)


@torch.inference_mode()
def score_brute_force(lm: LM, prompts: Ids, continuations: Ids, *, prefix: Prefix | None = None,
                      batch_size: int = 8, length_normalize: bool = False) -> np.ndarray:
    """Reference: one full forward per (prompt, continuation), batch 1, no padding, no reuse
    (only a prefix's cache is read, as it cannot be re-derived from ids). `batch_size` is ignored."""
    _check(lm, prompts, continuations, prefix)
    P = prefix.length if prefix else 0
    out = np.zeros((len(prompts), len(continuations)), dtype=np.float64)
    for i, p in enumerate(prompts):
        for j, c in enumerate(continuations):
            seq = torch.tensor([list(p) + list(c)], device=lm.device)  # [1, N]
            n = seq.shape[1]
            logits = lm.model(
                input_ids=seq, attention_mask=torch.ones(1, P + n, dtype=torch.long, device=lm.device),
                position_ids=torch.arange(P, P + n, device=lm.device)[None],
                past_key_values=prefix.cache(1, _config(lm)) if prefix else None, use_cache=prefix is not None,
            ).logits[0].float()  # [N, V]
            # prepend what predicts token 0 (the prefix's last position, if any): row k then predicts token k
            before = prefix.logprobs[None].to(logits) if prefix is not None and prefix.logprobs is not None \
                else torch.full_like(logits[:1], float("nan"))  # never read: prompts are non-empty then
            lp = torch.cat([before, logits.log_softmax(-1)])  # [N+1, V]
            rows = torch.arange(len(p), n)
            s = lp[rows.to(lp.device), torch.tensor(list(c), device=lp.device)].sum().item()
            out[i, j] = s / len(c) if length_normalize else s
    return out


# ----------------------------------------------------------------------------- calibration


class Calibration(str, Enum):
    NONE = "none"
    CONTEXTUAL = "contextual"  # Zhao et al. 2021: divide by the label probs of content-free inputs
    PMI = "pmi"  # Holtzman et al. 2021: domain-conditional PMI


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
