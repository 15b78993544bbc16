"""Inference-only loading of trained adapters: soft prompts (PEFT prompt/prefix tuning, IPT)
and fine-tuned reference folders. The engine uses them; training them lives in `train/`.

    soft = load_soft_prompt("soft/rt-ipt")
    prefix = soft.prefix(lm, ids=builder.shared_ids())   # -> score.Prefix, computed once
    tuned = load_finetuned("ft/rt", base=lm)             # an LM for the same scoring code
    lm = load_model("ft/rt")                              # any LM name/folder, fine-tuned or not

How a soft prompt composes with the engine: PEFT puts the virtual tokens (or the prefix
key/values) at positions 0..n-1 and the prompt's own tokens from position n on. The engine's
`score.Prefix` has the same contract (prompt ids after a prefix start at position `length`), so
`SoftPrompt.prefix(lm, ids)` runs [soft prompt, ids] once and every query, its demonstrations
and its label continuations read that cache: scoring with it equals the PeftModel's logits.
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .choices import SoftPromptMethod
from .errors import one_line
from .lm import LM, load_lm
from .prompt import Template
from .score import Prefix, compute_prefix

__all__ = [
    "SoftPromptError",
    "FinetuneError",
    "SoftPrompt",
    "load_soft_prompt",
    "load_finetuned",
    "is_finetuned",
    "load_model",
    "hidden_size",
    "unpack_kv",
    "META_FILE",
    "FINETUNE_META_FILE",
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
]

META_FILE = "icl_soft_prompt.json"  # beside a soft prompt: the engine's metadata (template, k, ...)
FINETUNE_META_FILE = "icl_finetune.json"  # beside a fine-tuned reference
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class SoftPromptError(ValueError):
    """A soft prompt that cannot be trained, loaded or used with this LM; one-line message."""


class FinetuneError(ValueError):
    """A fine-tuned model folder that cannot be loaded; one-line message."""


def hidden_size(lm: LM) -> int:
    return lm.model.get_input_embeddings().embedding_dim


def unpack_kv(flat: torch.Tensor, n_layers: int, n_heads: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """PEFT's flat prefix [n, L*2*H_kv*D] -> per-layer (key, value) [1, H_kv, n, D], i.e. PEFT's
    get_prompt: view(n, 2L, H, D).permute -> per layer key = row 2l, value = row 2l+1."""
    n = flat.shape[0]
    x = flat.view(n, 2 * n_layers, n_heads, -1).permute(1, 2, 0, 3)  # [2L, H_kv, n, D]
    return [(x[2 * i][None], x[2 * i + 1][None]) for i in range(n_layers)]


# ----------------------------------------------------------------------------- soft prompts


@dataclass
class SoftPrompt:
    """A trained soft prompt, independent of any model until `prefix(lm)`."""

    method: SoftPromptMethod
    weights: torch.Tensor  # prompt tuning / IPT: [n, H] input embeddings; prefix: [n, L*2*H_kv*D]
    adapter_config: dict  # PEFT's adapter_config.json
    meta: dict = field(default_factory=dict)  # icl_soft_prompt.json; {} for an adapter trained elsewhere

    @property
    def n_virtual(self) -> int:
        return int(self.weights.shape[0])

    @property
    def k(self) -> int:
        """Demonstrations per prompt it was trained with (IPT), 0 otherwise."""
        return int(self.meta.get("k") or 0)

    @property
    def template(self) -> Template | None:
        """The prompt Template it was trained with, or None (adapter trained elsewhere)."""
        return Template.from_dict(self.meta["template"]) if self.meta.get("template") else None

    def _check(self, lm: LM) -> None:
        cfg = lm.model.config.get_text_config() if hasattr(lm.model.config, "get_text_config") else lm.model.config
        if self.method is not SoftPromptMethod.PREFIX_TUNING:
            width, hidden = self.weights.shape[1], hidden_size(lm)
            if width != hidden:
                raise SoftPromptError(f"soft prompt width {width} != the LM's hidden size {hidden}")
            return
        c = self.adapter_config
        n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        want = (cfg.num_hidden_layers, n_kv, n_kv * head_dim)
        got = (c["num_layers"], c["num_attention_heads"], c["token_dim"])
        if want != got:
            raise SoftPromptError(f"prefix (layers, kv heads, width) {got} does not fit the LM's {want}")

    def embeds(self, lm: LM) -> torch.Tensor:
        """Prompt tuning / IPT: the virtual tokens' input embeddings [1, n, H] for `lm`."""
        if self.method is SoftPromptMethod.PREFIX_TUNING:
            raise SoftPromptError("a prefix-tuning soft prompt has key/values, not input embeddings")
        self._check(lm)
        return self.weights[None].to(lm.device, lm.dtype)

    def key_values(self, lm: LM) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Prefix tuning: per-layer (key, value) [1, H_kv, n, D] for `lm`, PEFT's layout."""
        if self.method is not SoftPromptMethod.PREFIX_TUNING:
            raise SoftPromptError(f"a {self.method.value} soft prompt has input embeddings, not key/values")
        self._check(lm)
        c = self.adapter_config
        return unpack_kv(self.weights.to(lm.device, lm.dtype), c["num_layers"], c["num_attention_heads"])

    def prefix(self, lm: LM, ids: Sequence[int] | None = None) -> Prefix:
        """The shared KV prefix for scoring/generation: the soft prompt, then `ids` (e.g. bos +
        instruction), run once through the frozen LM -> score.Prefix. Prompt ids given to the
        scorer with it are positioned after it, as PEFT positions the input after the virtual
        tokens."""
        if self.method is not SoftPromptMethod.PREFIX_TUNING:
            return compute_prefix(lm, ids=ids, embeds=self.embeds(lm))
        # The key/values are the cache itself; `ids` then read it. Without ids the prefix has
        # no next-token log-probs, so a prompt must then hold at least one token.
        base = Prefix(self.key_values(lm), self.n_virtual)
        return compute_prefix(lm, ids=ids, base=base) if ids else base


def load_soft_prompt(path: str | Path) -> SoftPrompt:
    """Load a soft prompt folder written by train_soft_prompt, or any PEFT prompt-tuning /
    prefix-tuning adapter for a decoder-only LM (adapter_config.json + adapter_model.safetensors)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / ADAPTER_CONFIG).is_file():
        raise SoftPromptError(f"{path}: not a soft prompt folder (no {ADAPTER_CONFIG})")
    try:
        cfg = json.loads((path / ADAPTER_CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise SoftPromptError(f"{path / ADAPTER_CONFIG}: not valid JSON ({e.msg})") from None
    kinds = {"PROMPT_TUNING": SoftPromptMethod.PROMPT_TUNING, "PREFIX_TUNING": SoftPromptMethod.PREFIX_TUNING}
    if not isinstance(cfg, dict):
        raise SoftPromptError(f"{path / ADAPTER_CONFIG}: not a JSON object")
    if cfg.get("peft_type") not in kinds:
        raise SoftPromptError(f"{path}: peft_type {cfg.get('peft_type')!r} is not PROMPT_TUNING or PREFIX_TUNING")
    if (cfg.get("num_transformer_submodules") or 1) != 1:
        raise SoftPromptError(f"{path}: an encoder-decoder adapter (num_transformer_submodules != 1)")
    if not (path / ADAPTER_WEIGHTS).is_file():
        extra = " (pickled adapter_model.bin files are not loaded; re-save with safetensors)" \
            if (path / "adapter_model.bin").exists() else ""
        raise SoftPromptError(f"{path}: no {ADAPTER_WEIGHTS}{extra}")
    try:
        tensors = load_file(str(path / ADAPTER_WEIGHTS))
    except Exception as e:  # safetensors raises its own error type for a damaged file
        raise SoftPromptError(f"{path / ADAPTER_WEIGHTS}: not a readable safetensors file ({one_line(e)})") from None
    if "prompt_embeddings" not in tensors:
        raise SoftPromptError(f"{path / ADAPTER_WEIGHTS}: no 'prompt_embeddings' tensor (keys: {sorted(tensors)})")
    weights = tensors["prompt_embeddings"].float()  # [n, H] or [n, L*2*H_kv*D]
    if not torch.isfinite(weights).all():
        raise SoftPromptError(f"{path / ADAPTER_WEIGHTS}: prompt_embeddings contain NaN or inf")
    method = kinds[cfg["peft_type"]]
    needed = ("num_virtual_tokens", "token_dim") + (("num_layers",) if method is SoftPromptMethod.PREFIX_TUNING else ())
    for key in needed:
        if isinstance(cfg.get(key), bool) or not isinstance(cfg.get(key), int) or cfg[key] < 1:
            raise SoftPromptError(f"{path / ADAPTER_CONFIG}: {key!r} is missing or not a positive integer")
    n, dim = cfg["num_virtual_tokens"], cfg["token_dim"]
    width = dim if method is SoftPromptMethod.PROMPT_TUNING else cfg["num_layers"] * 2 * dim
    if tuple(weights.shape) != (n, width):
        raise SoftPromptError(f"{path}: prompt_embeddings {tuple(weights.shape)} != ({n}, {width}) from the config")
    try:
        meta = json.loads((path / META_FILE).read_text()) if (path / META_FILE).is_file() else {}
        if meta:
            method = SoftPromptMethod(meta["method"])
    except (ValueError, KeyError, TypeError) as e:
        raise SoftPromptError(f"{path / META_FILE}: not a valid soft prompt description ({one_line(e)})") from None
    if meta:
        if (method is SoftPromptMethod.PREFIX_TUNING) != (cfg["peft_type"] == "PREFIX_TUNING"):
            raise SoftPromptError(f"{path}: {META_FILE} says {method.value} but the adapter is {cfg['peft_type']}")
    return SoftPrompt(method, weights, cfg, meta)


# ----------------------------------------------------------------------------- fine-tuned references


def is_finetuned(folder: str | Path) -> bool:
    """A folder written by `icl finetune` (it holds icl_finetune.json)."""
    return (Path(folder) / FINETUNE_META_FILE).is_file()


def load_finetuned(path: str | Path, *, base: LM | None = None, device=None, merge: bool = False,
                   dtype: str | None = None) -> LM:
    """Load a fine-tuned reference as an LM for the engine's scoring/generation code.

    LoRA needs its base LM: `base` (copied, so the caller's stays unchanged) or the base named
    in icl_finetune.json, loaded with load_lm. `merge=True` folds the LoRA weights into the
    base (faster, equal up to float rounding); by default the adapter stays separate so the
    logits are exactly those of training."""
    from peft import PeftModel

    path = Path(path)
    meta_file = path / FINETUNE_META_FILE
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    if not (path / ADAPTER_CONFIG).is_file():
        if not (path / "config.json").is_file():
            raise FinetuneError(f"{path}: not a fine-tuned model folder (no config.json or adapter_config.json)")
        return load_lm(str(path), device=device, dtype=dtype)  # a plain model folder (full fine-tuning)
    if base is None:
        if not meta.get("lm"):
            raise FinetuneError(f"{path}: a LoRA adapter needs its base LM (pass base=, or keep {FINETUNE_META_FILE})")
        base = load_lm(meta["lm"], device=device, dtype=dtype)
        model = base.model
    else:
        model = copy.deepcopy(base.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = PeftModel.from_pretrained(model, str(path)).eval()
    if merge:
        model = model.merge_and_unload()
    return LM(model, base.tokenizer, str(path), base.device)


def load_model(name_or_path: str, *, dtype: str | None = None, trust_remote_code: bool = False) -> LM:
    """The LM a config names: a fine-tuned reference folder (icl finetune) loads with its adapter
    or weights, anything else through load_lm."""
    if is_finetuned(name_or_path):
        return load_finetuned(name_or_path, dtype=dtype)
    return load_lm(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code)
