"""The fine-tuned reference: the same base LM fine-tuned on the same training pool.

    result = finetune(lm, train, FinetuneConfig(method="lora"), builder=builder, out=Path("ft/rt"))
    tuned = load_finetuned("ft/rt", base=lm)      # icl_engine.core.adapters: an LM for the same scoring code

In-context learning with a frozen LM is measured against this: full fine-tuning (every weight),
or LoRA through PEFT. Examples are the engine's zero-shot prompts (same template, no
demonstrations); the loss is on the verbalizer tokens (classification) or the output tokens
(generation), never on the prompt. The training loop, split and example building are
the soft prompts' (loop.py), so both references see exactly the same data.

The caller's LM is never modified: training works on a deep copy. Saved to `out`: full
fine-tuning as a model folder (save_pretrained: config.json + model.safetensors, and the
tokenizer), so `load_lm(out)` loads it too; LoRA as a PEFT adapter (adapter_config.json +
adapter_model.safetensors) over the base named in the metadata. `icl_finetune.json` holds the
metadata (method, base LM, template, seeds, training settings, metrics), `train_log.jsonl` the
evaluation log.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Sequence

import torch

from ..core.adapters import FINETUNE_META_FILE
from ..core.atomic import write_json
from ..core.data import Dataset
from ..core.lm import LM
from ..core.score import score_continuations
from .loop import (
    Example,
    TrainResult,
    TrainSettings,
    build_examples,
    check_train_out,
    choice,
    data_meta,
    prepare,
    run_meta,
    train_loop,
)

__all__ = ["FinetuneMethod", "FinetuneConfig", "DEFAULT_LR", "fit_finetune", "finetune"]

FORMAT_VERSION = 1
# AdamW learning rates when none is given: full fine-tuning moves every weight, so a small one;
# LoRA's low-rank update tolerates a larger one (PEFT's examples use these orders of magnitude).
DEFAULT_LR = {"full": 5e-5, "lora": 2e-4}


class FinetuneMethod(str, Enum):
    FULL = "full"
    LORA = "lora"


@dataclass
class FinetuneConfig:
    method: FinetuneMethod = FinetuneMethod.FULL
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None  # LoRA: None = PEFT's default for the architecture
    budget: int | None = None  # max prompt tokens; None: the LM's context
    train: TrainSettings = field(default_factory=TrainSettings)

    def __post_init__(self):
        self.method = choice(FinetuneMethod, self.method, "method")
        if isinstance(self.train, dict):
            self.train = TrainSettings.from_dict(self.train)
        if self.lora_r < 1:
            raise ValueError(f"lora_r must be >= 1, got {self.lora_r}")
        if not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be positive, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.target_modules is not None:
            self.target_modules = tuple(self.target_modules)
            if not self.target_modules:
                raise ValueError("target_modules must name at least one module (or be None)")
        if self.budget is not None and self.budget < 1:
            raise ValueError(f"budget must be positive, got {self.budget}")

    def lora_meta(self) -> dict | None:
        if self.method is not FinetuneMethod.LORA:
            return None
        return {"r": self.lora_r, "alpha": self.lora_alpha, "dropout": self.lora_dropout,
                "target_modules": list(self.target_modules) if self.target_modules else None}

    @property
    def lr(self) -> float:
        return self.train.lr or DEFAULT_LR[self.method.value]


def fit_finetune(lm: LM, examples: Sequence[Example], held_out: Sequence[Example], config: FinetuneConfig,
                 *, out: Path, meta: dict | None = None, resume: bool = False, force: bool = False) -> TrainResult:
    """The training core over pre-tokenised examples: copy the LM, (LoRA-)train the copy, save
    it and icl_finetune.json (`meta` adds to the metadata). `lm` itself is left untouched.
    A finished model in `out` is replaced only with `force`; `resume` continues an interrupted
    run from its checkpoint."""
    from peft import LoraConfig, TaskType, get_peft_model

    out = Path(out)
    check_train_out(out, FINETUNE_META_FILE, force=force, resume=resume)
    settings = config.train
    model = copy.deepcopy(lm.model)  # the caller's LM stays the frozen base
    if config.method is FinetuneMethod.LORA:
        lora = LoraConfig(task_type=TaskType.CAUSAL_LM, r=config.lora_r, lora_alpha=config.lora_alpha,
                          lora_dropout=config.lora_dropout,
                          target_modules=list(config.target_modules) if config.target_modules else None)
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.simplefilter("ignore", FutureWarning)
            torch.manual_seed(settings.seed)  # LoRA's A matrices are drawn from the global RNG
            model = get_peft_model(model, lora)
    else:
        model.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    tuned = LM(model, lm.tokenizer, lm.name, lm.device)

    def scorer(prompts, labels):  # evaluation through the engine's own label scoring
        return score_continuations(tuned, prompts, labels, batch_size=settings.batch_size)

    history, metrics = train_loop(
        model, params, examples, held_out, settings, lr=config.lr, pad_id=lm.tokenizer.pad_token_id or 0,
        device=lm.device, out=out, train_mode=True, scorer=scorer, desc=f"finetune-{config.method.value}",
        resume=resume, fingerprint={"method": config.method.value, "lm": lm.name, "lora": config.lora_meta(),
                                    "data": (meta or {}).get("train_sha256"), "template": (meta or {}).get("template")})
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    lm.tokenizer.save_pretrained(out)
    full = run_meta(format_version=FORMAT_VERSION, method=config.method.value, lm_name=lm.name, settings=settings,
                    lr=config.lr, metrics={**metrics, "trainable_params": sum(p.numel() for p in params)}, meta=meta,
                    extra={"k": 0, "lora": config.lora_meta()})
    write_json(out / FINETUNE_META_FILE, full)
    return TrainResult(out, history, full["metrics"], model)


def finetune(lm: LM, train: Dataset, config: FinetuneConfig, *, builder, out: Path, resume: bool = False,
             force: bool = False) -> TrainResult:
    """Fine-tune a copy of `lm` on `train` (zero-shot prompts from `builder`, the same split and
    targets as the soft prompts), save it to `out` and return the evaluation history and
    metrics. `lm` itself is left untouched; reload with load_finetuned(out)."""
    budget = config.budget or lm.context_length
    examples, held_examples, skipped = prepare(train, config.train, lambda records: build_examples(
        records, builder, kind=train.kind, labels=train.labels, budget=budget))
    return fit_finetune(lm, examples, held_examples, config, out=out, meta=data_meta(train, builder, budget, skipped),
                        resume=resume, force=force)
