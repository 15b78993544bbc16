"""The Hugging Face backend: a transformers causal LM in process (what `load_lm` returns).

Every model call and every KV cache of the engine lives here, on the transformers 5 Cache API
(`cache=` in, `out.cache` out; the old `past_key_values` names are deprecated).

Scoring a batch of prompts against L label continuations takes two forwards at most:
  1. prompt pass: the prompts, left-padded; the log-probs at the last position give every
     label's first token, and the pass leaves a KV cache of the prompt.
  2. label pass (only when some label has 2+ tokens): the labels' tokens (all but the last of
     each) packed side by side into one short sequence that reads the prompt cache; a 4D mask
     lets each packed token see the prompt and the earlier tokens of its own label only, and
     each label's tokens take positions len(prompt), len(prompt)+1, ... as if it were alone.
Positions are computed from the attention mask, so a padded row scores exactly like an unpadded
one. A `Prefix` is computed once and every batch reads a fresh cache over its tensors.
Generation: one prompt pass, then one token per step reading the cache; rows that finish leave
the batch (and the cache), so the remaining rows stop paying for them.
Cached scoring (kvcache.py): `block_kv` hands out the keys/values a row leaves after the prefix,
`move_keys` turns stored keys to other positions with the model's own rotary embedding, and
`score_after` runs rows and their labels in one pass against a past given as tensors, with a
mask and an attention bias of the caller's.
"""

from __future__ import annotations

import inspect
import itertools
import sys
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from transformers.cache_utils import DynamicCache

from ..backend import BackendError, Ids, Prefix
from ..generate import cut_at_stop

__all__ = ["HFBackend", "prefix_cache", "left_pad"]


def prefix_cache(prefix: Prefix, batch: int, config=None) -> DynamicCache:
    """A fresh cache holding the prefix for `batch` rows. DynamicCache.update concatenates into
    new tensors, so the prefix's own tensors are never written to."""
    if prefix.past_key_values is None:
        raise ValueError("this prefix holds ids only (built by a backend without a KV cache)")
    expand = lambda t: t.expand(batch, -1, -1, -1)  # noqa: E731  [1, H, P, D] -> [B, H, P, D]
    return DynamicCache([(expand(k), expand(v)) for k, v in prefix.past_key_values], config=config)


@dataclass
class HFBackend:
    model: torch.nn.Module  # a causal LM in eval mode, on `device`
    tokenizer: object  # a transformers tokenizer; always has a pad token
    name: str
    device: torch.device
    compiled: bool = False  # the forward goes through torch.compile (see `compile`)
    packed: dict = field(default_factory=dict, repr=False, compare=False)  # label set -> _Packed (see _packed)
    _rope: tuple | None = field(default=None, repr=False, compare=False)  # (rotary module, rotate_half), found once

    def compile(self) -> None:
        """torch.compile the model's forward, with dynamic shapes so that one graph serves every
        batch size and prompt length. On a GPU it fuses a small model's many memory-bound ops
        (norms, rotary, activations, casts), about halving SmolLM2-135M's scoring forward on a
        GPU (benchmarks/results/gpu). The first batches pay the compile (minutes); scores change
        only by float rounding. Calling
        it again does nothing."""
        if not self.compiled:
            self.model.forward = torch.compile(self.model.forward, dynamic=True)
            self.compiled = True

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def context_length(self) -> int:
        """Positions the model was trained for: the largest prompt (+ answer) worth sending."""
        return int(getattr(self.model.config, "max_position_embeddings", None) or 2048)

    @property
    def vocab_size(self) -> int:
        return self.model.get_input_embeddings().num_embeddings

    @property
    def eos_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        extra = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids |= set(extra) if isinstance(extra, (list, tuple)) else {extra}
        return {i for i in ids if i is not None}

    # ------------------------------------------------------------------ model calls

    def _cache(self, prefix: Prefix | None, batch: int) -> DynamicCache:
        config = self.model.config
        return prefix_cache(prefix, batch, config) if prefix is not None else DynamicCache(config=config)

    def _last_only(self) -> dict:
        """Ask for logits at the last position only: the lm_head over the whole prompt is the
        biggest single matmul for small models with large vocabularies."""
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}

    @torch.inference_mode()
    def compute_prefix(self, ids: Sequence[int] | None = None, embeds: torch.Tensor | None = None, *,
                       base: Prefix | None = None) -> Prefix:
        parts = []
        if embeds is not None:
            e = embeds if embeds.ndim == 3 else embeds[None]
            parts.append(e.to(self.device, self.dtype))  # [1, P, H]
        if ids:
            t = torch.tensor([list(ids)], device=self.device)
            parts.append(self.model.get_input_embeddings()(t))  # [1, N, H]
        if not parts:
            return base
        x = torch.cat(parts, dim=1)  # [1, N, H]
        p0, n = (base.length if base else 0), x.shape[1]
        out = self.model(
            inputs_embeds=x, attention_mask=torch.ones(1, p0 + n, dtype=torch.long, device=self.device),
            position_ids=torch.arange(p0, p0 + n, device=self.device)[None], cache=self._cache(base, 1),
            use_cache=True, **self._last_only(),
        )
        # ids stand for the prefix only when no soft prompt or raw key/values went into it
        alone = None
        if ids and embeds is None and (base is None or base.ids is not None):
            alone = (base.ids if base else ()) + tuple(ids)
        return Prefix(out.cache, p0 + n, logprobs=out.logits[0, -1].float().log_softmax(-1), ids=alone)

    def prefill(self, rows: Ids, prefix: Prefix | None):
        """Prompt pass over left-padded rows.

        -> logprobs [B, V] at each row's last token, the cache [B, H, P+T, D], the attention
        mask [B, P+T] (1 = real), next position [B] (where each row's next token goes)."""
        B, P = len(rows), (prefix.length if prefix else 0)
        dev = self.device
        ids_np, mask_np = left_pad(rows, self.tokenizer.pad_token_id or 0)  # [B, T] each
        ids, mask = self._to_device(torch.from_numpy(ids_np)), self._to_device(torch.from_numpy(mask_np))
        T = ids.shape[1]
        # positions count real tokens only, so padding never shifts a row's rotary phases
        pos = (mask.cumsum(1) - 1).clamp(min=0) + P  # [B, T]
        full = torch.cat([torch.ones(B, P, dtype=torch.long, device=dev), mask], 1)  # [B, P+T]
        cache = self._cache(prefix, B)
        lengths = mask.sum(1)  # [B]
        if T == 0:  # every row is empty after the prefix: the prefix's last position predicts
            return prefix.logprobs.to(dev).expand(B, -1).clone(), cache, full, lengths + P
        out = self.model(input_ids=ids, attention_mask=full, position_ids=pos, cache=cache, use_cache=True,
                         **self._last_only())
        logprobs = out.logits[:, -1].float().log_softmax(-1)  # [B, V]
        # Rows empty after the prefix: their last position is padding; the prefix's last position
        # predicts. Found on the CPU copy: a test on the GPU tensor would wait for the forward.
        empty = np.flatnonzero(mask_np.sum(1) == 0)
        if empty.size:
            logprobs[self._to_device(torch.from_numpy(empty))] = prefix.logprobs.to(dev)
        return logprobs, out.cache, full, lengths + P

    def _packed(self, continuations: Ids) -> "_Packed":
        """The labels' packed tensors, built once per label set: building them copies lists to
        the GPU, and such a copy waits for everything already queued there."""
        key = tuple(map(tuple, continuations))
        if key not in self.packed:
            if len(self.packed) >= 16:  # a few label sets per engine; never grows without bound
                self.packed.clear()
            self.packed[key] = _Packed.build(continuations, self.device)
        return self.packed[key]

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A CPU tensor on the model's device; to a GPU from pinned memory, without waiting."""
        if self.device.type != "cuda":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    # ------------------------------------------------------------------ the LMBackend methods

    @torch.inference_mode()
    def next_token_logprobs(self, rows: Ids, prefix: Prefix | None) -> torch.Tensor:
        return self.prefill(rows, prefix)[0]  # [B, V]

    @torch.inference_mode()
    def score_batch(self, rows: Ids, continuations: Ids, prefix: Prefix | None) -> torch.Tensor:
        """-> summed log-probs [B, L] of every label after every row (on the device; nothing here
        waits for the GPU)."""
        packed = self._packed(continuations)
        logprobs, cache, full, next_pos = self.prefill(rows, prefix)
        B = len(rows)
        scores = logprobs[:, packed.first]  # [B, L] first tokens, from the prompt pass
        C = packed.ids.numel()
        if C == 0:  # all labels are single tokens: done in one pass
            return scores
        K = full.shape[1]  # P+T cached positions
        see = torch.cat([full.bool()[:, None, :].expand(B, C, K), packed.block.expand(B, C, C)], -1)  # [B, C, K+C]
        mask = torch.zeros(B, 1, C, K + C, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~see[:, None], torch.finfo(self.dtype).min)  # additive: works for sdpa and eager
        out = self.model(input_ids=packed.ids.expand(B, C), attention_mask=mask,
                         position_ids=next_pos[:, None] + packed.off[None], cache=cache, use_cache=True)
        lp = out.logits.float().log_softmax(-1)  # [B, C, V]
        got = lp.gather(-1, packed.target.expand(B, C)[..., None])[..., 0]  # [B, C]
        return scores.index_add(1, packed.seg, got)

    # ------------------------------------------------------------------ demonstration key/value blocks

    @torch.inference_mode()
    def block_kv(self, rows: Ids, prefix: Prefix | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values each row leaves in every layer when it is run alone after the
        prefix (positions P, P+1, ...): [B, layers, 2, H_kv, T, D], each row right-aligned (left
        padding, as prefill lays rows out), and the rows' lengths [B]."""
        _, cache, full, _ = self.prefill(rows, prefix)
        P = prefix.length if prefix is not None else 0
        kv = torch.stack([torch.stack([layer.keys[:, :, P:], layer.values[:, :, P:]], 1)
                          for layer in cache.layers], 1)  # [B, layers, 2, H, T, D]
        return kv, full[:, P:].sum(1)

    def _rotary(self) -> tuple[torch.nn.Module, Callable]:
        """The model's own rotary embedding module and its rotate_half (the pairing of dimensions
        it rotates together); a BackendError when the model has none."""
        if self._rope is None:
            found = [m for name, m in self.model.named_modules() if name.endswith("rotary_emb")]
            half = getattr(sys.modules.get(type(self._base()).__module__), "rotate_half", None)
            if not found or half is None:
                raise BackendError(f"{self.name} has no rotary position embedding this engine can move: cached "
                                   "scoring needs a RoPE model (Llama, Qwen, Mistral, SmolLM2, ...)")
            probe = torch.arange(8.0)
            split = bool(torch.equal(half(probe), torch.cat([-probe[4:], probe[:4]])))  # pairs (i, i + D/2)
            self._rope = (found[0], half, split)
        return self._rope

    def _base(self) -> torch.nn.Module:
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [..., D] of the model's rotation at `positions` (int64 [...]), from its own
        rotary embedding (its scaling config included) with the attention scaling divided out:
        the pure rotation the model applies to a key at that position."""
        rope = self._rotary()[0]
        flat = positions.reshape(1, -1).to(self.device)
        cos, sin = rope(torch.zeros(1, dtype=torch.float32, device=self.device), flat)  # [1, N, D]
        scale = float(getattr(rope, "attention_scaling", 1.0) or 1.0)
        shape = (*positions.shape, cos.shape[-1])
        return (cos[0] / scale).reshape(shape), (sin[0] / scale).reshape(shape)

    def move_keys(self, keys: torch.Tensor, stored: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Keys the model rotated for positions `stored`, turned IN PLACE to what they would be at
        positions `target`: RoPE turns each pair of dimensions by an angle proportional to the
        position, so turning by angle(target) - angle(stored) gives what the model would have
        computed at `target` from the same unrotated key. The angles are the model's own (cos and
        sin of both positions, composed: cos(a-b) = cos a cos b + sin a sin b, sin(a-b) = sin a
        cos b - cos a sin b), so its rounding of position x frequency is kept. keys [..., S, D]
        (float); stored, target int64, broadcastable to keys' [..., S] (e.g. [B, 1, S] for keys
        [layers, B, H, S, D]). Returns `keys`."""
        _, half, split = self._rotary()
        ct, st = self.rotary(target)
        cs, ss = self.rotary(stored)
        cos, sin = ct * cs + st * ss, st * cs - ct * ss  # [..., S, D]
        D = keys.shape[-1]
        if cos.shape[-1] != D:
            raise BackendError(f"{self.name} rotates {cos.shape[-1]} of {D} key dimensions (partial rotary): "
                               "cached scoring cannot move its keys")
        cos, sin = cos.to(keys.dtype), sin.to(keys.dtype)
        if split and torch.equal(cos[..., : D // 2], cos[..., D // 2:]) and torch.equal(sin[..., : D // 2], sin[..., D // 2:]):
            # dimension i turns with i + D/2 by one angle: rotate the halves, without rotate_half's copies
            c, s_ = cos[..., : D // 2], sin[..., : D // 2]
            k1, k2 = keys[..., : D // 2], keys[..., D // 2:]
            first = k1 * c - k2 * s_
            k2.copy_(k2 * c + k1 * s_)
            k1.copy_(first)
            return keys
        return keys.copy_(keys * cos + half(keys) * sin)

    @torch.inference_mode()
    def score_after(self, past: Sequence[tuple[torch.Tensor, torch.Tensor]], see: torch.Tensor, rows: Ids,
                    start: torch.Tensor, continuations: Ids, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Summed log-probs [B, L] of every label after each row, the row reading `past` (per layer
        (key, value) [B, H_kv, K, D], keys already rotated for their positions) where `see` [B, K]
        (bool) says, with `bias` [B, K] added to its attention logits (None: 0). Row i's tokens
        take positions start[i], start[i]+1, ... (start int64 [B]); rows are left-padded.

        One forward: the rows, then the labels packed side by side (as score_batch's label pass
        lays them out), each label token seeing the past, its row and the earlier tokens of its own
        label; logits for the row's last position and the label tokens only."""
        packed = self._packed(continuations)
        B, K = see.shape
        ids_np, mask_np = left_pad(rows, self.tokenizer.pad_token_id or 0)  # [B, T] each
        if not mask_np.sum(1).all():
            raise BackendError("score_after: a row is empty")
        ids, mask = self._to_device(torch.from_numpy(ids_np)), self._to_device(torch.from_numpy(mask_np))
        T, C, real, dev = ids.shape[1], packed.ids.numel(), mask.bool(), self.device
        pos = start.to(dev)[:, None] + (mask.cumsum(1) - 1).clamp(min=0)  # [B, T]
        ids = torch.cat([ids, packed.ids.expand(B, C)], 1)  # [B, T+C]
        pos = torch.cat([pos, pos[:, -1:] + 1 + packed.off[None]], 1)  # labels right after the row's last token
        own = torch.ones(T, T, dtype=torch.bool, device=dev).tril()[None] & real[:, None, :]  # [B, T, T]
        own |= torch.eye(T, dtype=torch.bool, device=dev)[None]  # a padding row sees itself: no empty softmax
        rows_see = torch.cat([own, own.new_zeros(B, T, C)], 2)  # [B, T, T+C]: rows never see the labels
        labels_see = torch.cat([real[:, None, :].expand(B, C, T), packed.block.expand(B, C, C)], 2)  # [B, C, T+C]
        full = torch.cat([see[:, None, :].expand(B, T + C, K), torch.cat([rows_see, labels_see], 1)], 2)
        attn = torch.zeros(B, 1, T + C, K + T + C, dtype=self.dtype, device=dev)
        if bias is not None:
            attn[:, 0, :, :K] = bias[:, None, :].to(self.dtype)
        attn.masked_fill_(~full[:, None], torch.finfo(self.dtype).min)  # additive: works for sdpa and eager
        keep = {"logits_to_keep": C + 1} if self._last_only() else {}
        out = self.model(input_ids=ids, attention_mask=attn, position_ids=pos,
                         cache=DynamicCache(list(past), config=self.model.config), use_cache=True, **keep)
        lp = out.logits[:, -(C + 1):].float().log_softmax(-1)  # [B, C+1, V]: the row's last token, then the labels'
        scores = lp[:, 0, packed.first]  # [B, L] first tokens
        if C == 0:
            return scores
        got = lp[:, 1:].gather(-1, packed.target.expand(B, C)[..., None])[..., 0]  # [B, C]
        return scores.index_add(1, packed.seg, got)

    @torch.inference_mode()
    def sequence_logprobs(self, ids: Sequence[int], prefix: Prefix | None) -> torch.Tensor:
        P, n = (prefix.length if prefix else 0), len(ids)
        seq = torch.tensor([list(ids)], device=self.device)  # [1, N]
        return self.model(
            input_ids=seq, attention_mask=torch.ones(1, P + n, dtype=torch.long, device=self.device),
            position_ids=torch.arange(P, P + n, device=self.device)[None],
            cache=self._cache(prefix, 1) if prefix else None, use_cache=prefix is not None,
        ).logits[0].float().log_softmax(-1)  # [N, V]

    @torch.inference_mode()
    def generate_batch(self, rows: Ids, *, prefix: Prefix | None, max_new_tokens: int, stop: Sequence[str],
                       pick: Callable[[torch.Tensor], torch.Tensor]) -> list[str]:
        logprobs, cache, mask, pos = self.prefill(rows, prefix)  # [B, V], cache, [B, P+T], [B]
        B, eos, decode = len(rows), self.eos_ids, self.tokenizer.decode
        new: list[list[int]] = [[] for _ in range(B)]  # generated ids per row, eos excluded
        live = torch.arange(B, device=self.device)  # original row of each row still in the batch
        for step in range(max_new_tokens):
            nxt = pick(logprobs)  # [B']
            done = []
            for r, (row, tok) in enumerate(zip(live.tolist(), nxt.tolist())):
                if tok in eos:
                    done.append(r)
                    continue
                new[row].append(tok)
                # a stop string may span tokens (or end mid-token): look at the decoded text
                if stop and cut_at_stop(decode(new[row], skip_special_tokens=True), stop)[1]:
                    done.append(r)
            if step == max_new_tokens - 1:
                break
            if done:  # drop finished rows from every tensor and from the cache
                keep = torch.tensor(sorted(set(range(len(live))) - set(done)), dtype=torch.long, device=self.device)
                if keep.numel() == 0:
                    break
                live, nxt, mask, pos = live[keep], nxt[keep], mask[keep], pos[keep]
                cache.batch_select_indices(keep)
            mask = torch.cat([mask, mask.new_ones(len(live), 1)], 1)  # [B', K+1]
            out = self.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos[:, None],
                             cache=cache, use_cache=True)
            cache, pos = out.cache, pos + 1
            logprobs = out.logits[:, -1].float().log_softmax(-1)
        return [cut_at_stop(decode(n, skip_special_tokens=True), stop)[0] for n in new]


def left_pad(rows: Ids, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Token-id rows -> (ids, mask), int64 [B, T] each, T the longest row: each row right-aligned
    after `pad` ids, mask 1 on its real tokens. Array operations, no per-token Python lists."""
    lengths = np.fromiter(map(len, rows), np.int64, len(rows))  # [B]
    T = int(lengths.max(initial=0))
    mask = np.arange(T)[None, :] >= (T - lengths)[:, None]  # [B, T]
    ids = np.full((len(rows), T), pad, np.int64)
    ids[mask] = np.fromiter(itertools.chain.from_iterable(rows), np.int64, int(lengths.sum()))  # row-major fill
    return ids, mask.astype(np.int64)


@dataclass
class _Packed:
    """The labels' tokens side by side (all but each label's last token): C tokens."""

    first: torch.Tensor  # [L] first token of each label
    ids: torch.Tensor  # [C] packed input tokens
    seg: torch.Tensor  # [C] which label each packed token belongs to
    off: torch.Tensor  # [C] its offset inside the label
    target: torch.Tensor  # [C] the token it predicts
    block: torch.Tensor  # [C, C] bool: packed token i may see packed token j

    @classmethod
    def build(cls, conts: Ids, device) -> "_Packed":
        t = lambda x, dt=torch.long: torch.tensor(x, dtype=dt, device=device)  # noqa: E731
        seg = t([j for j, c in enumerate(conts) for _ in c[:-1]])
        off = t([o for c in conts for o in range(len(c) - 1)])
        block = (seg[:, None] == seg[None, :]) & (off[:, None] >= off[None, :])  # causal within a label
        return cls(
            first=t([c[0] for c in conts]), ids=t([x for c in conts for x in c[:-1]]), seg=seg, off=off,
            target=t([x for c in conts for x in c[1:]]), block=block,
        )
