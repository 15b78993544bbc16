"""Soft prompts for the frozen LM: prompt tuning, prefix tuning, instruction prompt tuning.

    result = train_soft_prompt(lm, train, SoftPromptConfig(method="ipt", k=4), builder=builder,
                               index=index, out=Path("soft/rt-ipt"))
    soft = load_soft_prompt("soft/rt-ipt")               # icl_engine.core.adapters

Three methods, all training only the soft prompt (the LM is frozen and checked to be):
  - prompt tuning (Lester et al. 2021): n virtual token embeddings placed before the input
    embeddings; initialised from text, from sampled vocabulary tokens, or randomly;
  - prefix tuning (Li & Liang 2021): n key/value pairs per layer, optionally produced during
    training by a reparameterisation MLP (only its output is saved);
  - instruction prompt tuning (IPT, Sun et al. 2023): a prompt-tuning soft prompt trained with
    retrieved demonstrations in the input, exactly as the engine will use it; every training
    example gets its k nearest neighbours from the index, never itself (leave-one-out).

Training goes through PEFT (`get_peft_model`), and the result is saved with PEFT's own
`save_pretrained` (adapter_config.json + adapter_model.safetensors holding one tensor,
`prompt_embeddings`), so `peft.PeftModel.from_pretrained(base, dir)` loads it, and an adapter
trained with PEFT elsewhere loads here. `icl_soft_prompt.json` beside it holds the engine's
metadata (method, template, k, seeds, training settings, metrics); `train_log.jsonl` the
evaluation log.

Loading a trained soft prompt for inference (`load_soft_prompt`, `SoftPrompt.prefix`) is in
the core module adapters.py; the training loop and example building in loop.py (shared with
finetune.py).
"""

from __future__ import annotations

import json
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Sequence

import torch

from ..core.adapters import META_FILE, SoftPrompt, SoftPromptError, hidden_size
from ..core.atomic import write_json
from ..core.choices import SelectionMethod, SoftPromptMethod
from ..core.data import Dataset, TaskKind
from ..core.lm import LM
from ..core.score import score_continuations
from .distill import distill_loss, teacher_logprobs, teacher_records, with_teacher
from .loop import (
    Example,
    TrainingError,
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

__all__ = [
    "PromptInit",
    "SoftPromptConfig",
    "DEFAULT_LR",
    "init_soft_prompt",
    "fit_soft_prompt",
    "train_soft_prompt",
]

FORMAT_VERSION = 1


class PromptInit(str, Enum):
    TEXT = "text"  # prompt tuning: embeddings of init_text's tokens; prefix tuning: their key/values
    VOCAB = "vocab"  # the same, of tokens sampled from the (non-special) vocabulary
    RANDOM = "random"  # prompt tuning: N(0, std of the embedding matrix); prefix tuning: PEFT's init
    ZERO = "zero"  # prefix tuning only: zero key/values (PEFT's init_weights="zero")


# Learning rates for AdamW when none is given (PEFT's examples use these orders of magnitude).
# Prefix tuning trains a reparameterisation MLP (millions of weights), which diverges at prompt
# tuning's rates: SmolLM2-135M on Rotten Tomatoes, 50 steps of batch 4, 200 test examples gave
# accuracy 0.595 (every seed the majority label) at 1e-2, 0.56 at 3e-3 and 0.73 at 1e-3.
DEFAULT_LR = {"prompt_tuning": 3e-2, "ipt": 3e-2, "prefix_tuning": 1e-3}


@dataclass
class SoftPromptConfig:
    method: SoftPromptMethod = SoftPromptMethod.PROMPT_TUNING
    n_virtual: int = 20
    init: PromptInit | None = None  # None: text if init_text is given, else vocab; prefix tuning: random
    init_text: str | None = None
    prefix_projection: bool = True  # prefix tuning: train through Li & Liang's reparameterisation MLP
    encoder_hidden_size: int | None = None  # that MLP's width; None: the LM's hidden size
    k: int | None = None  # IPT: demonstrations per training prompt (None: 4); 0 for the others
    budget: int | None = None  # max prompt tokens incl. the virtual ones; None: the LM's context
    train: TrainSettings = field(default_factory=TrainSettings)

    def __post_init__(self):
        self.method = choice(SoftPromptMethod, self.method, "method")
        if isinstance(self.train, dict):
            self.train = TrainSettings.from_dict(self.train)
        if self.n_virtual < 1:
            raise ValueError(f"n_virtual must be >= 1, got {self.n_virtual}")
        prefix = self.method is SoftPromptMethod.PREFIX_TUNING
        if self.init is None:
            self.init = PromptInit.RANDOM if prefix else PromptInit.TEXT if self.init_text else PromptInit.VOCAB
        self.init = choice(PromptInit, self.init, "init")
        if self.init is PromptInit.TEXT and not (self.init_text or "").strip():
            raise ValueError("init_text is required when init is 'text'")
        if self.init is PromptInit.ZERO and not prefix:
            raise ValueError("init 'zero' is for prefix tuning only (zero input embeddings are not a no-op)")
        if prefix and self.prefix_projection and self.init in (PromptInit.TEXT, PromptInit.VOCAB):
            # the MLP cannot be inverted to produce given key/values
            raise ValueError(f"init {self.init.value!r} needs prefix_projection=False for prefix tuning")
        if self.encoder_hidden_size is not None and self.encoder_hidden_size < 1:
            raise ValueError(f"encoder_hidden_size must be >= 1, got {self.encoder_hidden_size}")
        if self.k is None:
            self.k = 4 if self.method is SoftPromptMethod.IPT else 0
        if self.method is SoftPromptMethod.IPT and self.k < 1:
            raise ValueError(f"k must be >= 1 for ipt (with k=0 it is prompt tuning), got {self.k}")
        if self.method is not SoftPromptMethod.IPT and self.k != 0:
            raise ValueError(f"k must be 0 for {self.method.value}; training with demonstrations is method 'ipt'")
        if self.budget is not None and self.budget <= self.n_virtual:
            raise ValueError(f"budget must exceed n_virtual ({self.n_virtual}), got {self.budget}")

    @property
    def lr(self) -> float:
        return self.train.lr or DEFAULT_LR[self.method.value]


# ----------------------------------------------------------------------------- training a soft prompt


def _peft_config(lm: LM, config: SoftPromptConfig):
    from peft import PrefixTuningConfig, PromptTuningConfig, TaskType

    # base_model_name_or_path is left to PEFT (it takes the model's own); lm.name is in META_FILE
    common = dict(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=config.n_virtual)
    if config.method is SoftPromptMethod.PREFIX_TUNING:
        return PrefixTuningConfig(
            **common, prefix_projection=config.prefix_projection,
            encoder_hidden_size=config.encoder_hidden_size or hidden_size(lm),
            init_weights="zero" if config.init is PromptInit.ZERO else None)
    # PEFT's own TEXT init re-loads the tokenizer by name (impossible for local or converted
    # LMs); we initialise from lm.tokenizer ourselves, so PEFT starts from RANDOM.
    return PromptTuningConfig(**common, prompt_tuning_init="RANDOM")


def _init_tokens(lm: LM, config: SoftPromptConfig, gen: torch.Generator) -> list[int]:
    """n token ids: init_text's tokens repeated/trimmed to n (as PEFT does), or n sampled ones."""
    n = config.n_virtual
    if config.init is PromptInit.TEXT:
        ids = lm.tokenizer(config.init_text, add_special_tokens=False).input_ids
        if not ids:
            raise SoftPromptError("init_text has no tokens")
        return (ids * math.ceil(n / len(ids)))[:n]
    special = set(lm.tokenizer.all_special_ids)
    pool = torch.tensor([i for i in range(lm.model.get_input_embeddings().num_embeddings) if i not in special])
    return pool[torch.randint(len(pool), (n,), generator=gen)].tolist()


@torch.no_grad()
def _initialise(peft_model, lm: LM, config: SoftPromptConfig) -> None:
    """Overwrite PEFT's initial soft prompt with the configured init (seeded)."""
    gen = torch.Generator().manual_seed(config.train.seed)
    enc = peft_model.prompt_encoder["default"]
    weight = enc.embedding.weight  # prompt: [n, H]; prefix without projection: [n, L*2*H_kv*D]
    emb = lm.model.get_input_embeddings()
    if config.method is not SoftPromptMethod.PREFIX_TUNING:
        if config.init is PromptInit.RANDOM:
            std = emb.weight.float().std().item()
            weight.copy_(torch.randn(weight.shape, generator=gen) * std)
        else:
            ids = torch.tensor([_init_tokens(lm, config, gen)], device=emb.weight.device)
            weight.copy_(emb(ids)[0].float())
    elif config.init in (PromptInit.TEXT, PromptInit.VOCAB):
        # Li & Liang: prefixes initialised with the activations of real words train better.
        # The key/values of those tokens at positions 0..n-1 are exactly what the prefix holds.
        ids = torch.tensor([_init_tokens(lm, config, gen)], device=lm.device)
        cache = lm.model(input_ids=ids, use_cache=True).cache
        weight.copy_(_pack_kv([(layer.keys, layer.values) for layer in cache.layers]).float())


def _pack_kv(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Per-layer (key, value) [1, H_kv, n, D] -> PEFT's flat prefix [n, L*2*H_kv*D]."""
    stacked = torch.stack([t[0] for k, v in pairs for t in (k, v)])  # [2L, H_kv, n, D]: k0, v0, k1, v1, ...
    return stacked.permute(2, 0, 1, 3).reshape(stacked.shape[2], -1)


def _only_trainable(model, params: Sequence[torch.nn.Parameter]) -> None:
    """The LM is frozen: exactly `params` require gradients, nothing else."""
    want = {id(p) for p in params}
    wrong = [n for n, p in model.named_parameters() if p.requires_grad != (id(p) in want)]
    if wrong or not want:
        raise RuntimeError(f"expected only the soft prompt to require gradients; offending: {wrong[:3]}")


@contextmanager
def _peft_soft_prompt(lm: LM, config: SoftPromptConfig):
    """The frozen LM wrapped by PEFT with a freshly initialised soft prompt; on exit the LM's
    requires_grad flags are put back (PEFT switches them off; nothing else of the LM changes)."""
    from peft import get_peft_model

    frozen = {n: p.requires_grad for n, p in lm.model.named_parameters()}
    try:
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecation notes inside PEFT
            torch.manual_seed(config.train.seed)  # PEFT's own inits (prefix MLP) draw from the global RNG
            peft_model = get_peft_model(lm.model, _peft_config(lm, config))
        _initialise(peft_model, lm, config)
        _only_trainable(peft_model, list(peft_model.prompt_encoder.parameters()))
        yield peft_model
    finally:
        for n, p in lm.model.named_parameters():
            p.requires_grad_(frozen[n])


def _current(peft_model, config: SoftPromptConfig) -> SoftPrompt:
    """The PeftModel's soft prompt as it is now (what save_pretrained would write)."""
    weights = peft_model.get_prompt_embedding_to_save("default").float()  # prefix MLP applied
    cfg = json.loads(json.dumps(peft_model.peft_config["default"].to_dict(), default=_enum_value))
    return SoftPrompt(config.method, weights, cfg, {"method": config.method.value, "k": config.k})


def init_soft_prompt(lm: LM, config: SoftPromptConfig) -> SoftPrompt:
    """The soft prompt before training (seeded init), e.g. a text-initialised baseline."""
    with _peft_soft_prompt(lm, config) as peft_model:
        return _current(peft_model, config)


def _enum_value(x):
    return x.value if isinstance(x, Enum) else str(x)


def fit_soft_prompt(lm: LM, examples: Sequence[Example], held_out: Sequence[Example], config: SoftPromptConfig,
                    *, out: Path, meta: dict | None = None, alpha: float = 1.0, resume: bool = False,
                    force: bool = False) -> TrainResult:
    """The training core over pre-tokenised examples: wrap the frozen LM with PEFT, initialise,
    train (only the soft prompt), save the adapter and icl_soft_prompt.json (`meta` adds to the
    metadata). Examples carrying a teacher distribution are distilled (distill.py, weight
    `alpha` on the KL term). A trained folder is replaced only with `force`; `resume` continues
    an interrupted run."""
    out = Path(out)
    check_train_out(out, META_FILE, force=force, resume=resume)
    settings = config.train
    distilled = bool(examples and examples[0].teacher)
    with _peft_soft_prompt(lm, config) as peft_model:
        offset = config.n_virtual if config.method is not SoftPromptMethod.PREFIX_TUNING else 0

        def scorer(prompts, labels):  # the engine's path: the current soft prompt as a KV prefix
            soft = _current(peft_model, config)
            return score_continuations(lm, prompts, labels, prefix=soft.prefix(lm), batch_size=settings.batch_size)

        history, metrics = train_loop(
            peft_model, list(peft_model.prompt_encoder.parameters()), examples, held_out, settings,
            lr=config.lr, pad_id=lm.tokenizer.pad_token_id or 0, device=lm.device, out=out, offset=offset,
            scorer=scorer, desc=config.method.value, resume=resume,
            loss_fn=distill_loss(alpha, pad_id=lm.tokenizer.pad_token_id or 0, device=lm.device, offset=offset)
            if distilled else None,
            fingerprint={"method": config.method.value, "lm": lm.name, "n_virtual": config.n_virtual, "k": config.k,
                         "init": config.init.value, "data": (meta or {}).get("train_sha256"),
                         "distill": (meta or {}).get("distill")})
        peft_model.save_pretrained(out, safe_serialization=True)
    prefix = config.method is SoftPromptMethod.PREFIX_TUNING
    full = run_meta(format_version=FORMAT_VERSION, method=config.method.value, lm_name=lm.name, settings=settings,
                    lr=config.lr, metrics=metrics, meta=meta, extra={
                        "n_virtual": config.n_virtual, "init": config.init.value, "init_text": config.init_text,
                        "prefix_projection": config.prefix_projection if prefix else None, "k": config.k})
    write_json(out / META_FILE, full)
    return TrainResult(out, history, full["metrics"], peft_model)


def train_soft_prompt(lm: LM, train: Dataset, config: SoftPromptConfig, *, builder, index=None,
                      embedder=None, out: Path, demos: SelectionMethod = SelectionMethod.KNN,
                      teacher: LM | None = None, alpha: float = 1.0, resume: bool = False,
                      force: bool = False) -> TrainResult:
    """Train a soft prompt on `train` with the LM frozen, save it to `out` (PEFT adapter +
    icl_soft_prompt.json + train_log.jsonl) and return the evaluation history and metrics.

    Prompts come from `builder` (the template the engine will use). IPT retrieves
    demonstrations from `index` (queries embedded with `embedder`, default the index's own) for
    training and held-out examples alike, each leaving itself out: the k nearest, or with
    demos="random" k random ones (Sun et al.'s control; seeded by the training seed).
    With a `teacher` (the fine-tuned reference, distill.load_teacher) the soft prompt learns the
    teacher's label distribution on each training record (weight `alpha`, the rest on gold);
    on a generation index it learns the teacher's greedy outputs, one per distinct input
    (distill.teacher_records; alpha must be 1)."""
    demos = SelectionMethod(demos)
    budget = config.budget or lm.context_length
    distill = None if teacher is None else {"teacher": teacher.name, "alpha": alpha}
    if teacher is not None and train.kind is TaskKind.GENERATION:
        if alpha != 1.0:
            raise TrainingError("generation is distilled from the reference's outputs alone: alpha must be 1")
        n_gold = len(train)
        train = teacher_records(teacher, builder, train, batch_size=config.train.batch_size)
        distill.update(targets="reference outputs", records=len(train), gold_records=n_gold)
        teacher = None  # from here on the reference's outputs are ordinary targets
    examples, held_examples, skipped = prepare(train, config.train, lambda records: build_examples(
        records, builder, kind=train.kind, labels=train.labels, budget=budget, n_virtual=config.n_virtual,
        k=config.k, index=index, embedder=embedder, demos=demos, seed=config.train.seed))
    meta = data_meta(train, builder, budget, skipped)
    if demos is not SelectionMethod.KNN:
        meta["demos"] = demos.value
    meta["index"] = None if index is None else {**{k: index.manifest.get(k) for k in ("dataset", "dataset_sha256", "count")},
                                                "version": index.version}  # index.stale_note compares them
    meta["embedder"] = None if index is None else embedder.name if embedder else index.manifest.get("embedder")
    if teacher is not None:
        used = {e.record_id for e in examples}
        examples = with_teacher(examples, teacher_logprobs(teacher, builder, [r for r in train.records if r.id in used],
                                                           batch_size=config.train.batch_size))
    if distill:
        meta["distill"] = distill
    return fit_soft_prompt(lm, examples, held_examples, config, out=out, meta=meta, alpha=alpha, resume=resume,
                           force=force)
