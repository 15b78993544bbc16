"""Stage 8: free-text generation with our own decode loop.

This module checks the input, picks the next token (greedy or top-p sampling) and batches
prompts by length; the LM backend runs the loop (`LMBackend.generate_batch`). The Hugging Face
backend does one prompt pass (left-padded batch, shared with scoring), then one token per step
reading the KV cache; rows that finish (eos or a stop string) leave the batch, so the remaining
rows stop paying for them. Stop strings are matched on the decoded text of the new tokens, since
a stop like "\\n\\n" may be one token or two; the returned text is cut before the first stop.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .backend import LMBackend, Prefix
from .score import ScoreError, check_inputs, length_batches

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


def generate(lm: LMBackend, prompts: Sequence[Sequence[int] | str], *, max_new_tokens: int = 64,
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
    check_inputs(lm, rows, None, prefix)
    stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if max_new_tokens == 0:
        return [""] * len(rows)
    gen = torch.Generator(device=lm.device).manual_seed(seed) if do_sample else None
    pick = lambda lp: sample_next(lp, do_sample=do_sample, temperature=temperature, top_p=top_p,  # noqa: E731
                                  generator=gen)
    out = [""] * len(rows)
    for idx in length_batches(rows, batch_size, True):
        texts = lm.generate_batch([rows[i] for i in idx], prefix=prefix, max_new_tokens=max_new_tokens,
                                  stop=stop, pick=pick)
        for i, t in zip(idx, texts):
            out[i] = t
    return out
