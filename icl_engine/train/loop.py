"""The one training loop, shared by soft prompts (soft_prompt.py) and the fine-tuned reference
(finetune.py), and the training data both build: pre-tokenised (prompt, target) examples made
by the engine's own PromptBuilder, so a model is trained on exactly the prompts it will see.

    examples, held_out, skipped = prepare(train, settings, lambda recs: build_examples(recs, builder, ...))
    history, metrics = train_loop(model, params, examples, held_out, settings, lr=..., out=out, ...)

The loss is on the target tokens only (the label's verbalizer tokens, or the output plus the
template separator), never on the prompt.
"""

from __future__ import annotations

import json
import math
import random
import time
import warnings
from dataclasses import asdict, dataclass, fields
from enum import Enum
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.choices import SelectionMethod
from ..core.data import Dataset, Record, TaskKind
from ..core.embed import get_embedder
from ..core.prompt import PromptTooLong
from ..core.select import select_many
from .checkpoint import CHECKPOINT_DIR, Checkpoint

__all__ = [
    "TrainingError",
    "TrainSettings",
    "Example",
    "TrainResult",
    "Scorer",
    "choice",
    "split_train_eval",
    "build_examples",
    "prepare",
    "data_meta",
    "run_meta",
    "train_loop",
    "LOG_FILE",
    "LossFn",
    "check_train_out",
    "gold_loss",
    "label_logprobs",
]

LOG_FILE = "train_log.jsonl"  # one JSON line per evaluation, written as training goes


class TrainingError(ValueError):
    """Training that cannot run as asked (no examples, no held-out split); one-line message."""


def choice(enum: type[Enum], value, name: str):
    """`value` as a member of `enum`, or a ValueError naming the field and the choices."""
    try:
        return enum(value)
    except ValueError:
        raise ValueError(f"{name} must be one of {[m.value for m in enum]}, got {value!r}") from None


@dataclass
class TrainSettings:
    """Optimisation settings shared by soft prompts and fine-tuning."""

    epochs: int = 3
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 8
    lr: float | None = None  # None: the method's default (soft_prompt.DEFAULT_LR, finetune.DEFAULT_LR)
    warmup_ratio: float = 0.1  # linear warm-up over this fraction of the steps, then linear decay to 0
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    eval_fraction: float = 0.1  # held-out share of the training records (0: no early stopping)
    eval_every: int | None = None  # steps between evaluations; None: once per epoch
    max_eval: int = 256  # at most this many held-out examples are evaluated
    patience: int | None = 3  # stop after this many evaluations without a better eval loss
    min_epochs: float = 0.0  # early stopping may not stop before this many epochs
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
        if self.min_epochs < 0:
            raise ValueError(f"min_epochs must be >= 0, got {self.min_epochs}")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainSettings":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown training settings {sorted(unknown)}")
        return cls(**d)


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
    teacher: tuple[float, ...] = ()  # distillation: the reference's log p over the labels (distill.py)


def split_train_eval(train: Dataset, settings: TrainSettings) -> tuple[Dataset, Dataset | None]:
    """Seeded held-out split for early stopping (by distinct input for generation, see
    Dataset.split); the held-out part is capped at settings.max_eval records."""
    if len(train) < 1:
        raise TrainingError("the training set is empty")
    if settings.eval_fraction == 0:
        return train, None
    if len(train) < 2:
        raise TrainingError("a held-out split needs 2+ training records (or set eval_fraction=0)")
    fit, held = train.split(settings.eval_fraction, settings.seed)
    if len(fit) == 0:
        raise TrainingError(f"eval_fraction {settings.eval_fraction} leaves no training records")
    return fit, held.subsample(settings.max_eval, settings.seed)


def build_examples(records: Sequence[Record], builder, *, kind: TaskKind, labels: Sequence[str] = (),
                   budget: int, n_virtual: int = 0, k: int = 0, index=None, embedder=None,
                   demos: SelectionMethod = SelectionMethod.KNN, seed: int = 0) -> tuple[list[Example], int]:
    """Records -> (examples, skipped): prompts assembled by the PromptBuilder exactly as the
    engine assembles them (k demonstrations when k > 0 chosen by `demos` -- the k nearest, or k
    random ones drawn as the engine draws them with `seed` -- never the record itself),
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
            raise TrainingError(f"record {rec.id}: label {rec.output!r} is not one of {list(labels)}")
        else:
            targets.append((list(labels).index(rec.output), cands[list(labels).index(rec.output)]))
    # room kept for the answer: the longest label (as the engine keeps it), or this output
    answer_tokens = [max(map(len, cands)) if cands else len(t) for _, t in targets]
    shown_demos = _neighbours(records, builder, budget=budget, n_virtual=n_virtual, k=k, index=index,
                              embedder=embedder, answer_tokens=answer_tokens, method=SelectionMethod(demos),
                              seed=seed) if k > 0 else [()] * len(records)
    out, skipped = [], 0
    for rec, (answer, target), shown, room in zip(records, targets, shown_demos, answer_tokens):
        if any(d.id == rec.id for d in shown):  # select.py excludes it; this is the guarantee
            raise RuntimeError(f"leave-one-out violated: record {rec.id} retrieved itself")
        try:
            prompt = builder.assemble(list(shown), rec.input, budget=budget - n_virtual, answer_tokens=room)
        except PromptTooLong:
            skipped += 1
            continue
        out.append(Example(tuple(prompt.ids), target, rec.id, tuple(d.id for d in shown), cands, answer))
    return out, skipped


def _neighbours(records, builder, *, budget, n_virtual, k, index, embedder, answer_tokens, method,
                seed) -> list[tuple[Record, ...]]:
    """IPT: each record's k nearest (or k random) demonstrations from the index (one search for
    all), itself excluded by id and exact copies of its text dropped (select.py), packed into
    the budget."""
    if index is None:
        raise TrainingError("ipt needs an index to retrieve demonstrations from")
    if not records:
        return []
    embedder = embedder or get_embedder(index.manifest["embedder"])
    vectors = embedder.encode([r.input for r in records])  # [n, d]
    selections = select_many(
        index, vectors, method=method, k=k,
        budgets=[budget - builder.reserved(r.input, n_virtual, a) for r, a in zip(records, answer_tokens)],
        demo_lengths=builder.demo_lengths(index.records), exclude_ids=[r.id for r in records],
        query_texts=[r.input for r in records], seed=seed,
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
LossFn = Callable[[torch.nn.Module, Sequence[Example]], torch.Tensor]  # (model, batch's examples) -> scalar loss


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
               desc: str = "train", loss_fn: LossFn | None = None, resume: bool = False,
               fingerprint: dict | None = None) -> tuple[list[dict], dict]:
    """AdamW with linear warm-up and linear decay over `params` (the only ones updated), seeded
    shuffling, evaluation on `held_out` every `eval_every` steps (and before the first step),
    early stopping on the held-out loss (not before settings.min_epochs), and the best
    parameters restored at the end. `scorer` scores classification labels for evaluation
    (required when examples have labels); `loss_fn(model, examples)` replaces the gold
    targets' cross-entropy (distill.py). Evaluations are appended to `out/train_log.jsonl`.
    At every evaluation the whole state is checkpointed in `out/checkpoint/`; with `resume` a run
    continues from there (refused when `fingerprint` -- the caller's description of the run --
    differs). The checkpoint is removed when training ends. -> (history, metrics)."""
    if not train:
        raise TrainingError("no training examples (all prompts too long for the budget?)")
    params = list(params)
    per_epoch = math.ceil(len(train) / settings.batch_size)
    total = settings.max_steps or settings.epochs * per_epoch
    eval_every = settings.eval_every or per_epoch
    opt, sched = _optimizer(params, settings, lr, total)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpoint(out / CHECKPOINT_DIR)
    fingerprint = {**(fingerprint or {}), "settings": asdict(settings), "lr": lr, "n_train": len(train),
                   "n_eval": len(held_out), "n_params": [list(p.shape) for p in params]}
    history: list[dict] = []
    best = {"eval_loss": math.inf, "step": 0, "state": None}
    bad, step, running, t_before = 0, 0, [], 0.0
    saved = ckpt.load(params, opt, sched, fingerprint) if resume else None
    if saved is not None:
        state, best_state = saved
        step, bad, history, running, t_before = (state["step"], state["bad"], state["history"], state["running"],
                                                 state["seconds"])
        best.update(state["best"], state=best_state)
    elif ckpt.exists():
        raise TrainingError(f"{out} holds an unfinished run's checkpoint: pass --resume to continue it, "
                            f"or remove {ckpt.folder}")
    log = (out / LOG_FILE).open("w")
    for row in history:  # a resumed run's log starts with the evaluations made before
        log.write(json.dumps(row) + "\n")
    t0 = time.perf_counter() - t_before
    loss_fn = loss_fn or gold_loss(pad_id, device, offset)

    def evaluate() -> bool:
        """Log one evaluation and checkpoint; True when early stopping says stop."""
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
        if held_out and row["eval_loss"] < best["eval_loss"]:
            # a copy of the trained parameters (all of them for full fine-tuning)
            best.update(eval_loss=row["eval_loss"], eval_accuracy=row["eval_accuracy"], step=step,
                        state=[p.detach().clone() for p in params])
            bad = 0
        elif held_out:
            bad += 1
        if step < total:  # the last evaluation needs no checkpoint: the caller saves the result
            ckpt.save(params=params, best=best["state"], optimizer=opt, scheduler=sched, state={
                "fingerprint": fingerprint, "step": step, "bad": bad, "history": history, "running": running,
                "seconds": row["seconds"], "best": {k: v for k, v in best.items() if k != "state"}})
        return should_stop()

    def should_stop() -> bool:
        early = step >= settings.min_epochs * per_epoch
        return bool(held_out) and settings.patience is not None and bad >= settings.patience and early

    bar = tqdm(total=total, initial=step, desc=desc, unit="step")
    try:
        stop = evaluate() if step == 0 else should_stop()  # a run killed after deciding to stop
        epoch_rng = random.Random(settings.seed)
        for epoch in range(total // per_epoch + 1):
            order = list(range(len(train)))
            epoch_rng.shuffle(order)  # epoch e's order: the e-th shuffle, also when resuming
            if stop or step >= total:
                break
            if (epoch + 1) * per_epoch <= step:
                continue  # finished before the checkpoint
            for s in range((step - epoch * per_epoch) * settings.batch_size, len(order), settings.batch_size):
                model.train(train_mode)  # a frozen LM stays in eval mode: no dropout noise
                examples = [train[i] for i in order[s : s + settings.batch_size]]
                loss = _step(model, params, examples, opt, sched, settings.grad_clip, loss_fn)
                step += 1
                running.append(loss)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
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
    ckpt.remove()
    return history, {
        "steps": step, "epochs": round(step / per_epoch, 3), "n_train": len(train), "n_eval": len(held_out),
        "examples_seen": step // per_epoch * len(train) + min(step % per_epoch * settings.batch_size, len(train)),
        "best_step": best["step"] if held_out else step,
        "best_eval_loss": best["eval_loss"] if held_out else None,
        "best_eval_accuracy": best.get("eval_accuracy") if held_out else None,
        "final_train_loss": history[-1]["train_loss"] if history else None,
        "seconds": round(time.perf_counter() - t0, 3),
        "resumed": saved is not None,
    }


def _optimizer(params, settings: TrainSettings, lr: float, total: int):
    """AdamW with linear warm-up over warmup_ratio of the `total` steps, then linear decay to 0."""
    warmup = int(settings.warmup_ratio * total)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / (warmup + 1) if s < warmup else max(0.0, (total - s) / max(1, total - warmup)))
    return opt, sched


def gold_loss(pad_id: int, device, offset: int = 0) -> LossFn:
    """The default loss: mean NLL of the gold target tokens (never the prompt's)."""
    def loss(model, examples):
        batch = _batch(examples, pad_id, device)
        return _loss(_target_logits(model, batch, offset), batch[3])

    return loss


def label_logprobs(model, examples: Sequence[Example], pad_id: int, device, offset: int = 0) -> torch.Tensor:
    """Each example's log p over its labels, with gradients: [B, L], summed over each label's
    tokens (teacher-forced after the prompt), then normalised over the L labels.

    The prompt runs once per example, not once per label: its last position gives every
    label's first token, and only the labels' later tokens run again, as L short continuations
    over the prompt's cached keys and values. On SNIPS (7 labels of 2-3 tokens after ~300
    prompt tokens) that is one long forward instead of seven. `model` may be a PEFT
    prompt-learning model: the continuation goes to its base model, whose cache already holds
    the virtual tokens or the prefix."""
    cands = examples[0].candidates
    if any(e.candidates != cands for e in examples):
        raise TrainingError("label_logprobs needs one label set for the whole batch")
    B, L, T = len(examples), len(cands), max(len(e.prompt_ids) for e in examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, e in enumerate(examples):  # right padding, as _batch (positions start at 0 in every row)
        ids[b, : len(e.prompt_ids)], mask[b, : len(e.prompt_ids)] = torch.tensor(e.prompt_ids), 1
    last = torch.tensor([len(e.prompt_ids) - 1 for e in examples])  # [B]
    rest = max(len(c) for c in cands) - 1  # label tokens after the first
    ids, mask = ids.to(device), mask.to(device)
    with warnings.catch_warnings():  # PEFT's prefix tuning: see _target_logits
        warnings.filterwarnings("ignore", r"`past_key_values` is deprecated", FutureWarning)
        out = model(input_ids=ids, attention_mask=mask, logits_to_keep=(last + offset)[:, None].to(device),
                    use_cache=rest > 0)
    first = out.logits[:, 0].float().log_softmax(-1)  # [B, V]
    logp = first[:, torch.tensor([c[0] for c in cands], device=device)]  # [B, L]
    if rest == 0:  # single-token labels (" positive" / " negative"): one forward was all
        return logp.log_softmax(-1)
    cache = out.cache
    lead = cache.get_seq_length() - T  # virtual tokens or prefix before the prompt's first token
    cont = torch.full((L, rest), pad_id, dtype=torch.long)  # label l's tokens 0..m-2 as input
    cmask = torch.zeros(L, rest, dtype=torch.long)
    tgt = torch.full((L, rest), -100, dtype=torch.long)  # ... predicting its tokens 1..m-1
    for l, c in enumerate(cands):
        cont[l, : len(c) - 1], cmask[l, : len(c) - 1], tgt[l, : len(c) - 1] = torch.tensor(c[:-1]), 1, torch.tensor(c[1:])
    cache.batch_repeat_interleave(L)  # row b*L + l: example b, label l
    attn = torch.cat([torch.ones(B, lead, dtype=torch.long), mask.cpu()], 1).repeat_interleave(L, 0)
    attn = torch.cat([attn, cmask.repeat(B, 1)], 1)  # [B*L, lead + T + rest]
    pos = (lead + last + 1).repeat_interleave(L)[:, None] + torch.arange(rest)  # [B*L, rest]: after each prompt
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    logits = base(input_ids=cont.repeat(B, 1).to(device), attention_mask=attn.to(device),
                  position_ids=pos.to(device), cache=cache).logits  # [B*L, rest, V]
    tgt = tgt.repeat(B, 1).to(device)
    tok = logits.float().log_softmax(-1).gather(-1, tgt.clamp(min=0)[..., None])[..., 0] * (tgt != -100)
    return (logp + tok.sum(1).view(B, L)).log_softmax(-1)


def _step(model, params, examples, opt, sched, grad_clip: float | None, loss_fn: LossFn) -> float:
    """One optimiser step on one batch; returns its loss."""
    loss = loss_fn(model, examples)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    sched.step()
    return loss.item()


# ----------------------------------------------------------------------------- the flow around the loop


def prepare(train: Dataset, settings: TrainSettings,
            build: Callable[[Sequence[Record]], tuple[list[Example], int]]) -> tuple[list[Example], list[Example], int]:
    """The seeded held-out split, then `build` (records -> (examples, skipped)) on each part
    -> (training examples, held-out examples, records skipped as too long)."""
    fit, held = split_train_eval(train, settings)
    examples, skipped = build(fit.records)
    held_examples, skipped_eval = build(held.records) if held else ([], 0)
    return examples, held_examples, skipped + skipped_eval


def check_train_out(out: Path, meta_file: str, *, force: bool, resume: bool) -> None:
    """What a training run may write into `out`: a new or empty folder; its own interrupted run
    (with `resume`); its own finished model (replaced only with `force`). Anything else -- a
    folder of other files -- is refused before any work, so nothing of the user's is touched."""
    out = Path(out)
    if not out.is_dir() or not any(out.iterdir()):
        return
    trained, unfinished = (out / meta_file).is_file(), (out / CHECKPOINT_DIR / "state.json").is_file()
    if unfinished and not resume:
        raise TrainingError(f"{out} holds an unfinished run's checkpoint: pass --resume to continue it, "
                            f"or remove {out / CHECKPOINT_DIR}")
    if trained and not unfinished and not force:
        raise TrainingError(f"{out} already holds a trained model; choose another --out, or pass --force to replace it")
    if not trained and not unfinished:
        raise TrainingError(f"{out} is not empty and holds no training run of ours: choose a new or empty folder")


def data_meta(train: Dataset, builder, budget: int, skipped: int) -> dict:
    """What every trained folder records about its data: template, budget, labels, pool hash."""
    return {
        "template": builder.template.to_dict(),
        "budget": budget,
        "kind": train.kind.value,
        "labels": list(train.labels),
        "train_sha256": train.sha256,
        "metrics": {"skipped_too_long": skipped},
    }


def run_meta(*, format_version: int, method: str, lm_name: str, settings: TrainSettings, lr: float,
             metrics: dict, extra: dict, meta: dict | None) -> dict:
    """The metadata file of a training run: method, base LM, seeds, settings, the method's own
    `extra` fields, the caller's `meta`; metrics merged (the caller's win, e.g. skipped_too_long)."""
    full = {
        "format_version": format_version,
        "method": method,
        "lm": lm_name,
        **extra,
        "seeds": {"init": settings.seed, "shuffle": settings.seed, "split": settings.seed},
        "training": {**asdict(settings), "lr": lr},
        **(meta or {}),
    }
    full["metrics"] = {**metrics, **full.get("metrics", {})}
    return full
