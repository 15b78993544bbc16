"""OpenAI-compatible `/v1/completions` over the served LM (no retrieval: the prompt is sent as
is), enough for OpenAI clients and lm-evaluation-harness's log-likelihood requests.

lm-evaluation-harness (`local-completions`) sends token ids or text with `echo: true`,
`max_tokens: 1`, `logprobs: 1`, `temperature: 0`, and reads `choices[i].logprobs`:
`token_logprobs[ctxlen:-1]` (the continuation, the last entry being the one generated token)
and `top_logprobs[ctxlen:-1]` (greedy when each token's log-prob is its position's maximum).
So the echoed prompt tokens come first (the first has no log-prob: null), then the generated
ones; an end-of-text token the LM picks is listed too (its text is not), so the count is always
prompt + max_tokens unless a stop string ends it early. Log-probs are read from one plain
forward over prompt + completion (`LMBackend.sequence_logprobs`), the exact reference scoring.
"""

from __future__ import annotations

import time
import uuid
from typing import Sequence

import torch

from ...core.backend import LMBackend
from ...core.generate import cut_at_stop, generate_stream
from ...core.score import check_inputs

__all__ = ["complete", "prompt_ids"]


def prompt_ids(lm: LMBackend, prompt) -> list[list[int]]:
    """A prompt as OpenAI takes it (text, list of texts, token ids, list of token-id lists) ->
    token-id rows."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        prompt = [prompt]
    rows = [lm.tokenizer(p).input_ids if isinstance(p, str) else list(p) for p in prompt]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("each prompt needs at least one token")
    check_inputs(lm, rows, None, None)  # token ids outside the vocabulary
    if max(len(r) for r in rows) > lm.context_length:
        raise ValueError(f"a prompt is longer than the LM's context ({lm.context_length} tokens)")
    return rows


def _choice(lm: LMBackend, i: int, ids: list[int], prompt_text: str, *, max_tokens: int, echo: bool,
            logprobs: int | None, stop: Sequence[str], sampling: dict) -> tuple[dict, int]:
    picked: list[int] = []  # every token the decoder picked, an end-of-text one included
    text = "" if max_tokens == 0 else generate_stream(lm, ids, on_text=lambda _: None, on_token=picked.append,
                                                      max_new_tokens=max_tokens, stop=stop, **sampling)
    ended = bool(picked) and picked[-1] in lm.eos_ids
    words = lm.tokenizer.decode([t for t in picked if t not in lm.eos_ids], skip_special_tokens=True)
    finish = "stop" if ended or cut_at_stop(words, stop)[1] else "length"
    out = {"text": (prompt_text if echo else "") + text, "index": i, "logprobs": None, "finish_reason": finish}
    if logprobs is not None:
        out["logprobs"] = _logprobs(lm, ids, picked, prompt_text, echo, logprobs)
    return out, len(picked)


def _logprobs(lm: LMBackend, ids: list[int], picked: list[int], prompt_text: str, echo: bool, top: int) -> dict:
    """OpenAI's logprobs object for the echoed prompt (when `echo`) and the picked tokens;
    text_offset counts characters from the start of the prompt, as OpenAI's does."""
    seq = ids + picked
    lp = lm.sequence_logprobs(seq, None)  # [N, V], row t predicts seq[t + 1]
    first = 0 if echo else len(ids)  # the first position reported
    decode = lambda t: lm.tokenizer.decode(t, skip_special_tokens=False)  # noqa: E731
    base = 0 if echo else len(prompt_text)
    tokens, token_lp, tops, offsets = [], [], [], []
    for t in range(first, len(seq)):
        tokens.append(decode([seq[t]]))
        offsets.append(base + (len(decode(seq[first:t])) if t > first else 0))
        if t == 0:  # nothing predicts the first token
            token_lp.append(None)
            tops.append(None)
            continue
        row = lp[t - 1]  # [V]
        token_lp.append(float(row[seq[t]]))
        best = torch.topk(row, min(top, row.numel()))
        entry = {decode([int(j)]): float(v) for v, j in zip(best.values, best.indices)} if top > 0 else {}
        entry.setdefault(tokens[-1], token_lp[-1])  # OpenAI lists the chosen token too
        tops.append(entry)
    return {"tokens": tokens, "token_logprobs": token_lp, "top_logprobs": tops, "text_offset": offsets}


@torch.inference_mode()
def complete(lm: LMBackend, request: dict, rows: list[list[int]] | None = None) -> dict:
    """The response body of one completions request (`request`: the validated JSON fields;
    `rows`: its prompt_ids, when the caller has them)."""
    prompt = request["prompt"]
    rows = prompt_ids(lm, prompt) if rows is None else rows
    texts = [prompt] if isinstance(prompt, str) else prompt if isinstance(prompt[0], str) else None
    stop = request.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    temperature = request.get("temperature", 1.0)
    sampling = {"do_sample": temperature > 0, "temperature": temperature if temperature > 0 else 1.0,
                "top_p": request.get("top_p", 1.0), "seed": request.get("seed") or 0}
    choices, generated = [], 0
    for i, ids in enumerate(rows):
        text = texts[i] if texts else lm.tokenizer.decode(ids, skip_special_tokens=False)
        choice, n = _choice(lm, i, ids, text, max_tokens=request["max_tokens"], echo=request["echo"],
                            logprobs=request.get("logprobs"), stop=stop, sampling=sampling)
        choices.append(choice)
        generated += n
    prompt_tokens = sum(len(r) for r in rows)
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": lm.name, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                      "total_tokens": prompt_tokens + generated}}
