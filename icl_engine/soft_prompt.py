"""Soft prompts for the frozen LM: prompt tuning, prefix tuning, instruction prompt tuning.

    result = train_soft_prompt(lm, train, SoftPromptConfig(method="ipt", k=4), builder=builder,
                               index=index, out=Path("soft/rt-ipt"))
    soft = load_soft_prompt("soft/rt-ipt")
    prefix = soft.prefix(lm, ids=builder.shared_ids())   # -> score.Prefix, computed once
    score_continuations(lm, prompts_after_shared, labels, prefix=prefix)

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

How a soft prompt composes with the engine: PEFT puts the virtual tokens (or the prefix
key/values) at positions 0..n-1 and the prompt's own tokens from position n on. The engine's
`score.Prefix` has the same contract (prompt ids after a prefix start at position `length`), so
`SoftPrompt.prefix(lm, ids)` runs [soft prompt, ids] once and every query, its demonstrations
and its label continuations read that cache: scoring with it equals the PeftModel's logits.

The training loop here (over pre-tokenised (prompt, target) pairs) is shared with finetune.py.
"""

from __future__ import annotations

import json
import math
import random
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import Dataset, Record, TaskKind
from .embed import get_embedder
from .lm import LM
from .prompt import PromptTooLong, Template
from .score import Prefix, compute_prefix, score_continuations
from .select import SelectionMethod, select_many

__all__ = [
    "SoftPromptMethod",
    "PromptInit",
    "SoftPromptError",
    "TrainSettings",
    "SoftPromptConfig",
    "Example",
    "TrainResult",
    "SoftPrompt",
    "build_examples",
    "split_train_eval",
    "train_loop",
    "init_soft_prompt",
    "fit_soft_prompt",
    "train_soft_prompt",
    "load_soft_prompt",
    "META_FILE",
    "LOG_FILE",
]

META_FILE = "icl_soft_prompt.json"
LOG_FILE = "train_log.jsonl"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FORMAT_VERSION = 1


class SoftPromptError(ValueError):
    """A soft prompt that cannot be trained, loaded or used with this LM; one-line message."""


def _choice(enum: type[Enum], value, name: str):
    """`value` as a member of `enum`, or a ValueError naming the field and the choices."""
    try:
        return enum(value)
    except ValueError:
        raise ValueError(f"{name} must be one of {[m.value for m in enum]}, got {value!r}") from None


class SoftPromptMethod(str, Enum):
    PROMPT_TUNING = "prompt_tuning"
    PREFIX_TUNING = "prefix_tuning"
    IPT = "ipt"


class PromptInit(str, Enum):
    TEXT = "text"  # prompt tuning: embeddings of init_text's tokens; prefix tuning: their key/values
    VOCAB = "vocab"  # the same, of tokens sampled from the (non-special) vocabulary
    RANDOM = "random"  # prompt tuning: N(0, std of the embedding matrix); prefix tuning: PEFT's init
    ZERO = "zero"  # prefix tuning only: zero key/values (PEFT's init_weights="zero")


# Learning rates for AdamW when none is given (PEFT's examples use these orders of magnitude).
# Prefix tuning trains a reparameterisation MLP (millions of weights), which diverges at prompt
# tuning's rates: SmolLM2-135M on Rotten Tomatoes, 50 steps of batch 4, 200 test examples gave
# accuracy 0.595 (every seed the majority label) at 1e-2, 0.56 at 3e-3 and 0.73 at 1e-3.
DEFAULT_LR = {"prompt_tuning": 3e-2, "ipt": 3e-2, "prefix_tuning": 1e-3, "full": 5e-5, "lora": 2e-4}


@dataclass
class TrainSettings:
    """Optimisation settings shared by soft prompts and fine-tuning."""

    epochs: int = 3
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 8
    lr: float | None = None  # None: DEFAULT_LR of the method
    warmup_ratio: float = 0.1  # linear warm-up over this fraction of the steps, then linear decay to 0
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    eval_fraction: float = 0.1  # held-out share of the training records (0: no early stopping)
    eval_every: int | None = None  # steps between evaluations; None: once per epoch
    max_eval: int = 256  # at most this many held-out examples are evaluated
    patience: int | None = 3  # stop after this many evaluations without a better eval loss
    seed: int = 0

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be positive or None, got {self.grad_clip}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.eval_every is not None and self.eval_every < 1:
            raise ValueError(f"eval_every must be >= 1, got {self.eval_every}")
        if self.max_eval < 1:
            raise ValueError(f"max_eval must be >= 1, got {self.max_eval}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1 or None, got {self.patience}")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainSettings":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown training settings {sorted(unknown)}")
        return cls(**d)


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
        self.method = _choice(SoftPromptMethod, self.method, "method")
        if isinstance(self.train, dict):
            self.train = TrainSettings.from_dict(self.train)
        if self.n_virtual < 1:
            raise ValueError(f"n_virtual must be >= 1, got {self.n_virtual}")
        prefix = self.method is SoftPromptMethod.PREFIX_TUNING
        if self.init is None:
            self.init = PromptInit.RANDOM if prefix else PromptInit.TEXT if self.init_text else PromptInit.VOCAB
        self.init = _choice(PromptInit, self.init, "init")
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


# ----------------------------------------------------------------------------- training data


@dataclass(frozen=True)
class Example:
    """One training/evaluation sequence: the loss is over `target_ids` only."""

    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]  # classification: the gold label's tokens; generation: output (+ separator)
    record_id: str = ""
    demo_ids: tuple[str, ...] = ()  # record ids of the demonstrations in the prompt (IPT)
    candidates: tuple[tuple[int, ...], ...] = ()  # classification: every label's tokens, in label order
    answer: int = -1  # index of the gold label in candidates


def split_train_eval(train: Dataset, settings: TrainSettings) -> tuple[Dataset, Dataset | None]:
    """Seeded held-out split for early stopping (by distinct input for generation, see
    Dataset.split); the held-out part is capped at settings.max_eval records."""
    if len(train) < 1:
        raise SoftPromptError("the training set is empty")
    if settings.eval_fraction == 0:
        return train, None
    if len(train) < 2:
        raise SoftPromptError("a held-out split needs 2+ training records (or set eval_fraction=0)")
    fit, held = train.split(settings.eval_fraction, settings.seed)
    if len(fit) == 0:
        raise SoftPromptError(f"eval_fraction {settings.eval_fraction} leaves no training records")
    return fit, held.subsample(settings.max_eval, settings.seed)


def build_examples(records: Sequence[Record], builder, *, kind: TaskKind, labels: Sequence[str] = (),
                   budget: int, n_virtual: int = 0, k: int = 0, index=None,
                   embedder=None) -> tuple[list[Example], int]:
    """Records -> (examples, skipped): prompts assembled by the PromptBuilder exactly as the
    engine assembles them (k retrieved demonstrations when k > 0, never the record itself),
    targets = the label's tokens (classification) or the output's tokens plus the template
    separator (generation: the model learns where to stop). `budget` counts every token of
    prompt + target including the n_virtual soft ones; a record whose query and answer alone do
    not fit is skipped."""
    kind = TaskKind(kind)
    cands = tuple(tuple(builder.label_ids(lab)) for lab in labels) if kind is TaskKind.CLASSIFICATION else ()
    targets = []
    for rec in records:
        if kind is TaskKind.GENERATION:
            targets.append((-1, tuple(builder.label_ids(rec.output)) + tuple(builder.sep_ids)))
        elif rec.output not in labels:
            raise SoftPromptError(f"record {rec.id}: label {rec.output!r} is not one of {list(labels)}")
        else:
            targets.append((list(labels).index(rec.output), cands[list(labels).index(rec.output)]))
    # room kept for the answer: the longest label (as the engine keeps it), or this output
    answer_tokens = [max(map(len, cands)) if cands else len(t) for _, t in targets]
    demos = _neighbours(records, builder, budget=budget, n_virtual=n_virtual, k=k, index=index,
                        embedder=embedder, answer_tokens=answer_tokens) if k > 0 else [()] * len(records)
    out, skipped = [], 0
    for rec, (answer, target), shown, room in zip(records, targets, demos, answer_tokens):
        if any(d.id == rec.id for d in shown):  # select.py excludes it; this is the guarantee
            raise RuntimeError(f"leave-one-out violated: record {rec.id} retrieved itself")
        try:
            prompt = builder.assemble(list(shown), rec.input, budget=budget - n_virtual, answer_tokens=room)
        except PromptTooLong:
            skipped += 1
            continue
        out.append(Example(tuple(prompt.ids), target, rec.id, tuple(d.id for d in shown), cands, answer))
    return out, skipped


def _neighbours(records, builder, *, budget, n_virtual, k, index, embedder, answer_tokens) -> list[tuple[Record, ...]]:
    """IPT: each record's k nearest demonstrations from the index (one search for all), itself
    excluded by id and exact copies of its text dropped (select.py), packed into the budget."""
    if index is None:
        raise SoftPromptError("ipt needs an index to retrieve demonstrations from")
    if not records:
        return []
    embedder = embedder or get_embedder(index.manifest["embedder"])
    vectors = embedder.encode([r.input for r in records])  # [n, d]
    selections = select_many(
        index, vectors, method=SelectionMethod.KNN, k=k,
        budgets=[budget - builder.reserved(r.input, n_virtual, a) for r, a in zip(records, answer_tokens)],
        demo_lengths=builder.demo_lengths(index.records), exclude_ids=[r.id for r in records],
        query_texts=[r.input for r in records],
    )
    return [tuple(index.records[i] for i in sel.ids) for sel in selections]


# ----------------------------------------------------------------------------- training loop


@dataclass
class TrainResult:
    out: Path
    history: list[dict]  # one dict per evaluation: step, epoch, lr, train_loss, eval_loss, eval_accuracy
    metrics: dict  # best step and its eval loss/accuracy, examples, steps, seconds
    model: torch.nn.Module | None = None  # the trained model (soft prompts: the PeftModel over the LM)


def _batch(examples: Sequence[Example], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """Right-padded ids [B, T] and mask [B, T]; for each row the positions whose logits predict
    its target tokens [B, K] and those targets [B, K] (-100 where a row has fewer than K).
    Right padding keeps every row's real tokens at positions 0.. (PEFT's prompt tuning ignores
    position ids, so left padding would shift them)."""
    seqs = [e.prompt_ids + e.target_ids for e in examples]
    T, K = max(map(len, seqs)), max(len(e.target_ids) for e in examples)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    pos = torch.zeros(len(seqs), K, dtype=torch.long)
    tgt = torch.full((len(seqs), K), -100, dtype=torch.long)
    for b, (e, s) in enumerate(zip(examples, seqs)):
        p, m = len(e.prompt_ids), len(e.target_ids)
        ids[b, : len(s)], mask[b, : len(s)] = torch.tensor(s), 1
        pos[b] = p - 1  # unused slots repeat a valid position; their target is -100
        pos[b, :m] = torch.arange(p - 1, p + m - 1)  # logits at t predict token t+1
        tgt[b, :m] = torch.tensor(e.target_ids)
    return ids.to(device), mask.to(device), pos.to(device), tgt.to(device)


def _target_logits(model, batch, offset: int) -> torch.Tensor:
    """Logits at the target-predicting positions only [B, K, V]: the lm_head over the whole
    prompt would be the biggest tensor of the step. `offset`: virtual tokens the model puts
    before the input (prompt tuning), which shift the positions."""
    ids, mask, pos, _ = batch
    with warnings.catch_warnings():
        # PEFT's prefix tuning hands its virtual key/values to the model as `past_key_values`,
        # which transformers 5.24 deprecates for `cache`: PEFT's call, not one we can change.
        warnings.filterwarnings("ignore", r"`past_key_values` is deprecated", FutureWarning)
        return model(input_ids=ids, attention_mask=mask, logits_to_keep=pos + offset).logits


def _loss(logits: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    # mean over target tokens only: the prompt's tokens never enter the loss
    return F.cross_entropy(logits.flatten(0, 1).float(), tgt.flatten(), ignore_index=-100)


Scorer = Callable[[list[list[int]], list[list[int]]], np.ndarray]  # (prompts, labels) -> log p [q, L]


@torch.no_grad()
def _evaluate(model, examples: Sequence[Example], batch_size: int, pad_id: int, device, offset: int,
              scorer: Scorer | None) -> dict:
    """Held-out loss (mean NLL of the gold target tokens) and accuracy. Classification: the
    engine's own one-pass scorer gives every label's summed log-prob, so the accuracy is what
    the engine will report (argmax over labels) and the gold label's score is the loss.
    Generation: a forward over the gold outputs; accuracy = teacher-forced next-token accuracy."""
    if examples[0].candidates:
        if scorer is None:
            raise RuntimeError("evaluating classification examples needs a scorer")
        scores = scorer([list(e.prompt_ids) for e in examples], [list(c) for c in examples[0].candidates])  # [q, L]
        gold = [e.answer for e in examples]
        nll = -scores[range(len(examples)), gold].sum()
        n_tok = sum(len(e.candidates[e.answer]) for e in examples)
        return {"eval_loss": float(nll / n_tok), "eval_accuracy": float((scores.argmax(1) == gold).mean())}
    nll, n_tok, hits = 0.0, 0, 0
    for s in range(0, len(examples), batch_size):
        batch = _batch(examples[s : s + batch_size], pad_id, device)
        logp = _target_logits(model, batch, offset).float().log_softmax(-1)  # [B, K, V]
        tgt = batch[3]
        valid = tgt != -100
        nll -= (logp.gather(-1, tgt.clamp(min=0)[..., None])[..., 0] * valid).sum().item()
        hits += int(((logp.argmax(-1) == tgt) & valid).sum())
        n_tok += int(valid.sum())
    return {"eval_loss": nll / max(n_tok, 1), "eval_accuracy": hits / max(n_tok, 1)}


def train_loop(model, params: Sequence[torch.nn.Parameter], train: Sequence[Example],
               held_out: Sequence[Example], settings: TrainSettings, *, lr: float, pad_id: int, device,
               out: Path, offset: int = 0, train_mode: bool = False, scorer: Scorer | None = None,
               desc: str = "train") -> tuple[list[dict], dict]:
    """AdamW with linear warm-up and linear decay over `params` (the only ones updated), seeded
    shuffling, evaluation on `held_out` every `eval_every` steps (and before the first step),
    early stopping on the held-out loss, and the best parameters restored at the end.
    `scorer` scores classification labels for evaluation (required when examples have labels).
    Evaluations are appended to `out/train_log.jsonl` as they happen. -> (history, metrics)."""
    if not train:
        raise SoftPromptError("no training examples (all prompts too long for the budget?)")
    params = list(params)
    per_epoch = math.ceil(len(train) / settings.batch_size)
    total = settings.max_steps or settings.epochs * per_epoch
    eval_every = settings.eval_every or per_epoch
    warmup = int(settings.warmup_ratio * total)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / (warmup + 1) if s < warmup else max(0.0, (total - s) / max(1, total - warmup)))
    rng = random.Random(settings.seed)
    out.mkdir(parents=True, exist_ok=True)
    log = (out / LOG_FILE).open("w")
    history: list[dict] = []
    best = {"eval_loss": math.inf, "step": 0, "state": None}
    bad, step, running, t0 = 0, 0, [], time.perf_counter()

    def evaluate() -> bool:
        """Log one evaluation; True when early stopping says stop."""
        nonlocal bad
        row = {"step": step, "epoch": round(step / per_epoch, 3), "lr": sched.get_last_lr()[0],
               "train_loss": sum(running) / len(running) if running else None}
        running.clear()
        if held_out:
            model.eval()
            row.update(_evaluate(model, held_out, settings.batch_size, pad_id, device, offset, scorer))
        row["seconds"] = round(time.perf_counter() - t0, 3)
        history.append(row)
        log.write(json.dumps(row) + "\n")
        log.flush()
        if not held_out:
            return False
        if row["eval_loss"] < best["eval_loss"]:
            # a copy of the trained parameters (all of them for full fine-tuning)
            best.update(eval_loss=row["eval_loss"], eval_accuracy=row["eval_accuracy"], step=step,
                        state=[p.detach().clone() for p in params])
            bad = 0
        else:
            bad += 1
        return settings.patience is not None and bad >= settings.patience

    bar = tqdm(total=total, desc=desc, unit="step")
    try:
        stop = evaluate()
        while step < total and not stop:
            order = list(range(len(train)))
            rng.shuffle(order)
            for s in range(0, len(order), settings.batch_size):
                model.train(train_mode)  # a frozen LM stays in eval mode: no dropout noise
                batch = _batch([train[i] for i in order[s : s + settings.batch_size]], pad_id, device)
                loss = _loss(_target_logits(model, batch, offset), batch[3])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if settings.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
                opt.step()
                sched.step()
                step += 1
                running.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}")
                if step % eval_every == 0 or step == total:
                    stop = evaluate()
                if stop or step >= total:
                    break
    finally:
        bar.close()
        log.close()
        model.eval()
    if best["state"] is not None:  # early stopping: keep the parameters of the best evaluation
        with torch.no_grad():
            for p, v in zip(params, best["state"]):
                p.copy_(v)
    metrics = {
        "steps": step, "epochs": round(step / per_epoch, 3), "n_train": len(train), "n_eval": len(held_out),
        "best_step": best["step"] if held_out else step,
        "best_eval_loss": best["eval_loss"] if held_out else None,
        "best_eval_accuracy": best.get("eval_accuracy") if held_out else None,
        "final_train_loss": history[-1]["train_loss"] if history else None,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return history, metrics


# ----------------------------------------------------------------------------- training a soft prompt


def _peft_config(lm: LM, config: SoftPromptConfig):
    from peft import PrefixTuningConfig, PromptTuningConfig, TaskType

    # base_model_name_or_path is left to PEFT (it takes the model's own); lm.name is in META_FILE
    common = dict(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=config.n_virtual)
    if config.method is SoftPromptMethod.PREFIX_TUNING:
        return PrefixTuningConfig(
            **common, prefix_projection=config.prefix_projection,
            encoder_hidden_size=config.encoder_hidden_size or _hidden_size(lm),
            init_weights="zero" if config.init is PromptInit.ZERO else None)
    # PEFT's own TEXT init re-loads the tokenizer by name (impossible for local or converted
    # LMs); we initialise from lm.tokenizer ourselves, so PEFT starts from RANDOM.
    return PromptTuningConfig(**common, prompt_tuning_init="RANDOM")


def _hidden_size(lm: LM) -> int:
    return lm.model.get_input_embeddings().embedding_dim


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


def _unpack_kv(flat: torch.Tensor, n_layers: int, n_heads: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The inverse of _pack_kv, i.e. PEFT's get_prompt: view(n, 2L, H, D).permute -> per layer
    key = row 2l, value = row 2l+1."""
    n = flat.shape[0]
    x = flat.view(n, 2 * n_layers, n_heads, -1).permute(1, 2, 0, 3)  # [2L, H_kv, n, D]
    return [(x[2 * i][None], x[2 * i + 1][None]) for i in range(n_layers)]


def _only_trainable(model, params: Sequence[torch.nn.Parameter]) -> None:
    """The LM is frozen: exactly `params` require gradients, nothing else."""
    want = {id(p) for p in params}
    wrong = [n for n, p in model.named_parameters() if p.requires_grad != (id(p) in want)]
    if wrong or not want:
        raise RuntimeError(f"expected only the soft prompt to require gradients; offending: {wrong[:3]}")


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


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
                    *, out: Path, meta: dict | None = None) -> TrainResult:
    """The training core over pre-tokenised examples: wrap the frozen LM with PEFT, initialise,
    train (only the soft prompt), save the adapter and icl_soft_prompt.json (`meta` adds to the
    metadata)."""
    out = Path(out)
    settings = config.train
    with _peft_soft_prompt(lm, config) as peft_model:
        offset = config.n_virtual if config.method is not SoftPromptMethod.PREFIX_TUNING else 0

        def scorer(prompts, labels):  # the engine's path: the current soft prompt as a KV prefix
            soft = _current(peft_model, config)
            return score_continuations(lm, prompts, labels, prefix=soft.prefix(lm), batch_size=settings.batch_size)

        history, metrics = train_loop(
            peft_model, list(peft_model.prompt_encoder.parameters()), examples, held_out, settings,
            lr=config.lr, pad_id=lm.tokenizer.pad_token_id or 0, device=lm.device, out=out, offset=offset,
            scorer=scorer, desc=config.method.value)
        peft_model.save_pretrained(out, safe_serialization=True)
    full = {
        "format_version": FORMAT_VERSION,
        "method": config.method.value,
        "lm": lm.name,
        "n_virtual": config.n_virtual,
        "init": config.init.value,
        "init_text": config.init_text,
        "prefix_projection": config.prefix_projection if config.method is SoftPromptMethod.PREFIX_TUNING else None,
        "k": config.k,
        "seeds": {"init": settings.seed, "shuffle": settings.seed, "split": settings.seed},
        "training": {**asdict(settings), "lr": config.lr},
        **(meta or {}),
    }
    full["metrics"] = {**metrics, **full.get("metrics", {})}
    _write_json(out / META_FILE, full)
    return TrainResult(out, history, full["metrics"], peft_model)


def train_soft_prompt(lm: LM, train: Dataset, config: SoftPromptConfig, *, builder, index=None,
                      embedder=None, out: Path) -> TrainResult:
    """Train a soft prompt on `train` with the LM frozen, save it to `out` (PEFT adapter +
    icl_soft_prompt.json + train_log.jsonl) and return the evaluation history and metrics.

    Prompts come from `builder` (the template the engine will use). IPT retrieves
    demonstrations from `index` (queries embedded with `embedder`, default the index's own) for
    training and held-out examples alike, each leaving itself out."""
    budget = config.budget or lm.context_length
    fit, held = split_train_eval(train, config.train)
    kw = dict(kind=train.kind, labels=train.labels, budget=budget, n_virtual=config.n_virtual, k=config.k,
              index=index, embedder=embedder)
    examples, skipped = build_examples(fit.records, builder, **kw)
    held_examples, skipped_eval = build_examples(held.records, builder, **kw) if held else ([], 0)
    meta = {
        "template": builder.template.to_dict(),
        "budget": budget,
        "kind": train.kind.value,
        "labels": list(train.labels),
        "train_sha256": train.sha256,
        "index": None if index is None else {k: index.manifest.get(k) for k in ("dataset", "dataset_sha256", "count")},
        "embedder": None if index is None else embedder.name if embedder else index.manifest.get("embedder"),
        "metrics": {"skipped_too_long": skipped + skipped_eval},
    }
    return fit_soft_prompt(lm, examples, held_examples, config, out=out, meta=meta)


# ----------------------------------------------------------------------------- loading and using


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
            width, hidden = self.weights.shape[1], _hidden_size(lm)
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
        return _unpack_kv(self.weights.to(lm.device, lm.dtype), c["num_layers"], c["num_attention_heads"])

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
    if cfg.get("peft_type") not in kinds:
        raise SoftPromptError(f"{path}: peft_type {cfg.get('peft_type')!r} is not PROMPT_TUNING or PREFIX_TUNING")
    if (cfg.get("num_transformer_submodules") or 1) != 1:
        raise SoftPromptError(f"{path}: an encoder-decoder adapter (num_transformer_submodules != 1)")
    if not (path / ADAPTER_WEIGHTS).is_file():
        extra = " (pickled adapter_model.bin files are not loaded; re-save with safetensors)" \
            if (path / "adapter_model.bin").exists() else ""
        raise SoftPromptError(f"{path}: no {ADAPTER_WEIGHTS}{extra}")
    tensors = load_file(str(path / ADAPTER_WEIGHTS))
    if "prompt_embeddings" not in tensors:
        raise SoftPromptError(f"{path / ADAPTER_WEIGHTS}: no 'prompt_embeddings' tensor (keys: {sorted(tensors)})")
    weights = tensors["prompt_embeddings"].float()  # [n, H] or [n, L*2*H_kv*D]
    method = kinds[cfg["peft_type"]]
    n, dim = cfg["num_virtual_tokens"], cfg["token_dim"]
    width = dim if method is SoftPromptMethod.PROMPT_TUNING else cfg["num_layers"] * 2 * dim
    if tuple(weights.shape) != (n, width):
        raise SoftPromptError(f"{path}: prompt_embeddings {tuple(weights.shape)} != ({n}, {width}) from the config")
    meta = json.loads((path / META_FILE).read_text()) if (path / META_FILE).is_file() else {}
    if meta:
        method = SoftPromptMethod(meta["method"])
        if (method is SoftPromptMethod.PREFIX_TUNING) != (cfg["peft_type"] == "PREFIX_TUNING"):
            raise SoftPromptError(f"{path}: {META_FILE} says {method.value} but the adapter is {cfg['peft_type']}")
    return SoftPrompt(method, weights, cfg, meta)
