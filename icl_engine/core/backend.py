"""The LM backend seam: what the engine asks of a language model.

Scoring, generation, the pipeline, soft prompts and the studies talk to an `LMBackend`, never
to a model library. The Hugging Face implementation (`backends/hf.py`, what `load_lm` returns)
owns every cache and model call; a new backend (vLLM, CTranslate2, a remote server) is one new
module with a class that has the methods below and a loader registered with `register_backend`,
then `load_lm(name, backend="...")` returns it.

The methods work on one batch of token-id rows; `score.py` and `generate.py` do the checks,
bucketing, batching and calibration on top, the same for every backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence, runtime_checkable

import torch

from .choices import Backend

__all__ = ["BACKENDS", "BackendError", "Ids", "LMBackend", "Prefix", "register_backend", "backend_loader"]

Ids = Sequence[Sequence[int]]


class BackendError(ValueError):
    """An unknown backend, or a request the backend cannot serve; one-line message."""


@dataclass
class Prefix:
    """The tokens shared by every prompt, run once with batch 1.

    `past_key_values`: per-layer (key, value) pairs [1, H_kv, P, D] (a transformers Cache is
    accepted; prefix tuning builds them directly); None for a backend without a KV cache, which
    then re-sends `ids`. `ids`: the token ids the prefix stands for when it was built from ids
    alone (None when it holds a soft prompt or raw key/values). `logprobs` [V]: next-token
    log-probs after the prefix, needed only to score a prompt that is empty after the prefix
    (None for raw key/values)."""

    past_key_values: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None
    length: int | None = None
    logprobs: torch.Tensor | None = None
    ids: tuple[int, ...] | None = None

    def __post_init__(self):
        kv = self.past_key_values
        if kv is None:
            if self.ids is None:
                raise ValueError("past_key_values: need per-layer key/values or the prefix's ids")
            n = len(self.ids)
        else:
            if hasattr(kv, "layers"):  # a transformers Cache: one layer object per decoder layer
                kv = [(layer.keys, layer.values) for layer in kv.layers]
            kv = tuple((pair[0], pair[1]) for pair in kv)
            if not kv or any(k.ndim != 4 or k.shape[0] != 1 or k.shape != v.shape for k, v in kv):
                raise ValueError("past_key_values: need one (key, value) pair per layer, each [1, H_kv, P, D]")
            n = kv[0][0].shape[-2]
            self.past_key_values = kv
        if self.length is None:
            self.length = n
        if self.length != n:
            raise ValueError(f"length: {self.length} but the key/values hold {n} positions")
        if self.ids is not None:
            self.ids = tuple(int(i) for i in self.ids)

    def cache(self, batch: int, config=None):
        """A fresh transformers DynamicCache for `batch` rows (see backends.hf.prefix_cache)."""
        from .backends.hf import prefix_cache

        return prefix_cache(self, batch, config)


@runtime_checkable
class LMBackend(Protocol):
    """A causal LM the engine can score with and generate from. Rows are token ids; a `Prefix`
    (from `compute_prefix`) is positioned before every row."""

    name: str
    tokenizer: object  # a transformers-style tokenizer (encode/decode, pad/eos ids)
    device: torch.device

    @property
    def context_length(self) -> int:
        """Positions the model was trained for: the largest prompt (+ answer) worth sending."""

    @property
    def vocab_size(self) -> int:
        """V: token ids are in [0, V)."""

    @property
    def eos_ids(self) -> set[int]:
        """Token ids that end a generation."""

    def compute_prefix(self, ids: Sequence[int] | None = None, embeds: torch.Tensor | None = None, *,
                       base: Prefix | None = None) -> Prefix:
        """Run the shared part once: `base`, then `embeds` (soft prompt [1, P, H]), then `ids`."""

    def score_batch(self, rows: Ids, continuations: Ids, prefix: Prefix | None) -> torch.Tensor:
        """Summed log p(continuation j | prefix + row i): float [B, L]."""

    def next_token_logprobs(self, rows: Ids, prefix: Prefix | None) -> torch.Tensor:
        """Log-softmax over the vocabulary after prefix + each row: float32 [B, V]."""

    def sequence_logprobs(self, ids: Sequence[int], prefix: Prefix | None) -> torch.Tensor:
        """One plain forward over prefix + ids: float32 [N, V], row t predicts ids[t + 1]."""

    def generate_batch(self, rows: Ids, *, prefix: Prefix | None, max_new_tokens: int, stop: Sequence[str],
                       pick: Callable[[torch.Tensor], torch.Tensor]) -> list[str]:
        """Decode up to `max_new_tokens` after each row; `pick` maps log-probs [B, V] to token
        ids [B]. A row ends at an eos id or once its decoded text holds a stop string; the text
        returned is cut before the first stop string."""


Loader = Callable[..., LMBackend]  # (name_or_path, *, device, dtype, trust_remote_code, cache_dir) -> backend
BACKENDS: dict[str, Loader] = {}


def register_backend(name: str | Backend, loader: Loader) -> None:
    """Make `load_lm(..., backend=name)` call `loader`."""
    BACKENDS[_key(name)] = loader


def _key(name: str | Backend) -> str:
    return name.value if isinstance(name, Backend) else str(name)  # str(Backend.HF) is "Backend.HF"


def backend_loader(name: str | Backend) -> Loader:
    """The loader registered as `name`; a BackendError names the known ones otherwise."""
    key = _key(name)
    if key not in BACKENDS:
        raise BackendError(f"unknown LM backend {key!r} (known: {', '.join(sorted(BACKENDS))})")
    return BACKENDS[key]
