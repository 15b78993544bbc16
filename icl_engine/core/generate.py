"""Stage 8: free-text generation with our own decode loop.

This module checks the input, picks the next token (greedy or top-p sampling) and batches
prompts by length; the LM backend runs the loop (`LMBackend.generate_batch`). The Hugging Face
backend does one prompt pass (left-padded batch, shared with scoring), then one token per step
reading the KV cache; rows that finish (eos or a stop string) leave the batch, so the remaining
rows stop paying for them. Stop strings are matched on the decoded text of the new tokens, since
a stop like "\\n\\n" may be one token or two; the returned text is cut before the first stop.
`generate_stream` runs the same loop for one prompt and hands out the text as it is decoded (the
service's server-sent events) and each token picked (its OpenAI-compatible completions).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from . import cancel
from .backend import LMBackend, Prefix
from .score import ScoreError, check_inputs, length_batches

__all__ = ["generate", "generate_stream", "cut_at_stop", "sample_next", "stream_safe"]


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


def _check(max_new_tokens: int, do_sample: bool, temperature: float, top_p: float) -> None:
    if max_new_tokens < 0:
        raise ScoreError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if do_sample and temperature <= 0:
        raise ScoreError(f"temperature must be positive when sampling, got {temperature}")
    if not 0 < top_p <= 1:
        raise ScoreError(f"top_p must be in (0, 1], got {top_p}")


def generate(lm: LMBackend, prompts: Sequence[Sequence[int] | str], *, max_new_tokens: int = 64,
             stop: Sequence[str] = ("\n\n",), do_sample: bool = False, temperature: float = 1.0,
             top_p: float = 1.0, seed: int = 0, batch_size: int = 8, prefix: Prefix | None = None) -> list[str]:
    """Continue each prompt (token ids; a str is tokenized with the LM's tokenizer) and return
    the new text, cut before the first stop string; decoding also ends at eos."""
    _check(max_new_tokens, do_sample, temperature, top_p)
    rows = [lm.tokenizer(p).input_ids if isinstance(p, str) else list(p) for p in prompts]
    check_inputs(lm, rows, None, prefix)
    stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if max_new_tokens == 0:
        return [""] * len(rows)
    gen = torch.Generator(device=lm.device).manual_seed(seed) if do_sample else None
    def pick(lp: torch.Tensor) -> torch.Tensor:  # [B, V] -> [B]; each decoding step comes here
        cancel.check()
        return sample_next(lp, do_sample=do_sample, temperature=temperature, top_p=top_p, generator=gen)

    out = [""] * len(rows)
    for idx in length_batches(rows, batch_size, True):
        texts = lm.generate_batch([rows[i] for i in idx], prefix=prefix, max_new_tokens=max_new_tokens,
                                  stop=stop, pick=pick)
        for i, t in zip(idx, texts):
            out[i] = t
    return out


def stream_safe(text: str, stop: Sequence[str]) -> str:
    """The part of the text decoded so far that can be shown now: before any stop string, less a
    tail that may still become one (the "\n" of a "\n\n" stop) or an unfinished character."""
    text, _ = cut_at_stop(text, stop)
    held = max((n for s in stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
    text = text[: len(text) - held]
    return text[:-1] if text.endswith("\ufffd") else text  # half of a multi-byte character


def generate_stream(lm: LMBackend, prompt: Sequence[int] | str, *, on_text: Callable[[str], None],
                    on_token: Callable[[int], None] | None = None, max_new_tokens: int = 64,
                    stop: Sequence[str] = ("\n\n",), do_sample: bool = False, temperature: float = 1.0,
                    top_p: float = 1.0, seed: int = 0, prefix: Prefix | None = None) -> str:
    """`generate` for ONE prompt, telling `on_text` each new piece of text as soon as it is safe to
    show (see stream_safe) and `on_token` each token id picked (eos included). The pieces join
    to the returned text, which is what `generate` returns for this prompt alone: the same
    backend loop runs, and the callbacks only watch the tokens it picks."""
    _check(max_new_tokens, do_sample, temperature, top_p)
    row = lm.tokenizer(prompt).input_ids if isinstance(prompt, str) else list(prompt)
    check_inputs(lm, [row], None, prefix)
    stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if max_new_tokens == 0:
        return ""
    gen = torch.Generator(device=lm.device).manual_seed(seed) if do_sample else None
    eos, new, shown = lm.eos_ids, [], [""]

    def pick(logprobs: torch.Tensor) -> torch.Tensor:  # [1, V] -> [1]
        cancel.check()
        tok = sample_next(logprobs, do_sample=do_sample, temperature=temperature, top_p=top_p, generator=gen)
        t = int(tok[0])
        if on_token is not None:
            on_token(t)
        if t not in eos:
            new.append(t)
            safe = stream_safe(lm.tokenizer.decode(new, skip_special_tokens=True), stop)
            if len(safe) > len(shown[0]) and safe.startswith(shown[0]):
                on_text(safe[len(shown[0]):])
                shown[0] = safe
        return tok

    [text] = lm.generate_batch([row], prefix=prefix, max_new_tokens=max_new_tokens, stop=stop, pick=pick)
    if text.startswith(shown[0]) and len(text) > len(shown[0]):
        on_text(text[len(shown[0]):])  # what was held back (a tail that did not become a stop)
    return text
