"""Stage 8: free-text generation with our own decode loop.

One prompt pass (left-padded batch, shared with scoring), then one token per step reading the
KV cache. Rows that finish (eos or a stop string) leave the batch, so the remaining rows stop
paying for them. Stop strings are matched on the decoded text of the new tokens, since a stop
like "\\n\\n" may be one token or two; the returned text is cut before the first stop string.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .lm import LM
from .score import Prefix, ScoreError, _batches, _check, _prefill

__all__ = ["generate", "cut_at_stop", "sample_next"]


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Text before the earliest stop string, and whether one was found."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def sample_next(logprobs: torch.Tensor, *, do_sample: bool, temperature: float, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """logprobs [B, V] -> next token ids [B]: argmax, or a sample from the temperature-scaled,
    top-p (nucleus) truncated distribution."""
    if not do_sample:
        return logprobs.argmax(-1)
    probs = (logprobs / temperature).softmax(-1)  # [B, V]
    if top_p < 1.0:
        p, idx = probs.sort(-1, descending=True)
        keep = p.cumsum(-1) - p < top_p  # the smallest set reaching top_p (always >= 1 token)
        probs = torch.zeros_like(probs).scatter_(-1, idx, p * keep)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _eos_ids(lm: LM) -> set[int]:
    ids = {lm.tokenizer.eos_token_id}
    gen = getattr(lm.model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    ids |= set(extra) if isinstance(extra, (list, tuple)) else {extra}
    return {i for i in ids if i is not None}


@torch.inference_mode()
def _generate_batch(lm: LM, rows, *, prefix, max_new_tokens, stop, eos, pick) -> list[str]:
    logprobs, cache, mask, pos = _prefill(lm, rows, prefix)  # [B, V], cache, [B, P+T], [B]
    B = len(rows)
    new: list[list[int]] = [[] for _ in range(B)]  # generated ids per row, eos excluded
    live = torch.arange(B, device=lm.device)  # original row of each row still in the batch
    for step in range(max_new_tokens):
        nxt = pick(logprobs)  # [B']
        done = []
        for r, (row, tok) in enumerate(zip(live.tolist(), nxt.tolist())):
            if tok in eos:
                done.append(r)
                continue
            new[row].append(tok)
            # a stop string may span tokens (or end mid-token): look at the decoded text
            if stop and cut_at_stop(lm.tokenizer.decode(new[row], skip_special_tokens=True), stop)[1]:
                done.append(r)
        if step == max_new_tokens - 1:
            break
        if done:  # drop finished rows from every tensor and from the cache
            keep = torch.tensor(sorted(set(range(len(live))) - set(done)), dtype=torch.long, device=lm.device)
            if keep.numel() == 0:
                break
            live, nxt, mask, pos = live[keep], nxt[keep], mask[keep], pos[keep]
            cache.batch_select_indices(keep)
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], 1)  # [B', K+1]
        out = lm.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos[:, None],
                       past_key_values=cache, use_cache=True)
        cache, pos = out.past_key_values, pos + 1
        logprobs = out.logits[:, -1].float().log_softmax(-1)
    return [cut_at_stop(lm.tokenizer.decode(n, skip_special_tokens=True), stop)[0] for n in new]


def generate(lm: LM, prompts: Sequence[Sequence[int] | str], *, max_new_tokens: int = 64,
             stop: Sequence[str] = ("\n\n",), do_sample: bool = False, temperature: float = 1.0,
             top_p: float = 1.0, seed: int = 0, batch_size: int = 8, prefix: Prefix | None = None) -> list[str]:
    """Continue each prompt (token ids; a str is tokenized with the LM's tokenizer) and return
    the new text, cut before the first stop string; decoding also ends at eos."""
    if max_new_tokens < 0:
        raise ScoreError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if do_sample and temperature <= 0:
        raise ScoreError(f"temperature must be positive when sampling, got {temperature}")
    if not 0 < top_p <= 1:
        raise ScoreError(f"top_p must be in (0, 1], got {top_p}")
    rows = [lm.tokenizer(p).input_ids if isinstance(p, str) else list(p) for p in prompts]
    _check(lm, rows, None, prefix)
    stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if max_new_tokens == 0:
        return [""] * len(rows)
    gen = torch.Generator(device=lm.device).manual_seed(seed) if do_sample else None
    pick = lambda lp: sample_next(lp, do_sample=do_sample, temperature=temperature, top_p=top_p,  # noqa: E731
                                  generator=gen)
    out = [""] * len(rows)
    for idx in _batches(rows, batch_size, True):
        texts = _generate_batch(lm, [rows[i] for i in idx], prefix=prefix, max_new_tokens=max_new_tokens,
                                stop=stop, eos=_eos_ids(lm), pick=pick)
        for i, t in zip(idx, texts):
            out[i] = t
    return out
