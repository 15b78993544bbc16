"""Distillation from the fine-tuned reference: soft prompts trained to give the reference's label
distribution, so what they optimise is agreement with the reference, not only the gold labels.

    teacher = load_teacher("ft/rt", lm=lm, builder=builder, labels=index.labels)   # refused if not ours
    examples = with_teacher(examples, teacher_logprobs(teacher, builder, records))  # aligned by record id
    loss_fn = distill_loss(alpha=1.0, pad_id=..., device=..., offset=...)          # for train_loop

The loss is alpha * KL(p_ref || p_student) + (1 - alpha) * (-log p_student(gold)), with both
distributions over the labels (each label's tokens summed, then normalised). The reference is
asked what it was trained on: the zero-shot prompt of the same template. The student sees its
own prompt (IPT: with demonstrations). The teacher's targets need no gold labels, so any pool
record can be used. The LM under the soft prompt stays frozen.

Generation is distilled at the sequence level (Kim & Rush 2016): the reference's greedy output
for each distinct input becomes the target, and the student is trained on it with the usual
loss over the target tokens (`teacher_records`).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..core.adapters import FINETUNE_META_FILE, load_finetuned
from ..core.data import Dataset, Record
from ..core.generate import generate
from ..core.lm import LM
from ..core.prompt import PromptBuilder
from ..core.score import normalize, score_continuations
from .loop import Example, LossFn, TrainingError, label_logprobs

__all__ = ["load_teacher", "teacher_logprobs", "with_teacher", "distill_loss", "teacher_records"]


def load_teacher(folder: str | Path, *, lm: LM, builder: PromptBuilder, labels: Sequence[str]) -> LM:
    """The fine-tuned reference in `folder`, checked against the student's base LM, template and
    labels (one-line TrainingError naming what to rebuild)."""
    folder = Path(folder)
    meta_file = folder / FINETUNE_META_FILE
    if not meta_file.is_file():
        raise TrainingError(f"--distill-from {folder}: not a fine-tuned reference folder (no {FINETUNE_META_FILE}; "
                            "make one with `icl finetune`)")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TrainingError(f"--distill-from {folder}: cannot read {FINETUNE_META_FILE} ({e})") from None
    if meta.get("lm") != lm.name:
        raise TrainingError(f"--distill-from {folder}: fine-tuned from {meta.get('lm')!r}, not from this LM "
                            f"{lm.name!r}; fine-tune a reference of {lm.name!r}")
    if list(meta.get("labels") or []) != list(labels):
        raise TrainingError(f"--distill-from {folder}: its labels {meta.get('labels')} differ from the index's "
                            f"{list(labels)}; fine-tune a reference on this index")
    if meta.get("template") != builder.template.to_dict():
        raise TrainingError(f"--distill-from {folder}: trained with another template; fine-tune it with this one, "
                            "or train the soft prompt with the reference's template")
    teacher = load_finetuned(folder, base=lm)
    if teacher.vocab_size != lm.vocab_size:
        raise TrainingError(f"--distill-from {folder}: vocabulary {teacher.vocab_size} differs from the LM's "
                            f"{lm.vocab_size}")
    return teacher


def teacher_logprobs(teacher: LM, builder: PromptBuilder, records: Sequence[Record], *,
                     batch_size: int = 8) -> dict[str, np.ndarray]:
    """record id -> the reference's log p over the builder's labels [L], from the zero-shot
    prompt (what the reference was fine-tuned on)."""
    prompts = [builder.assemble([], r.input).ids for r in records]
    labels = [builder.label_ids(lab) for lab in builder.labels]
    logp = normalize(score_continuations(teacher, prompts, labels, batch_size=batch_size))  # [n, L]
    return {r.id: row for r, row in zip(records, logp)}


def teacher_records(teacher: LM, builder: PromptBuilder, train: Dataset, *, max_new_tokens: int = 64,
                    batch_size: int = 8) -> Dataset:
    """Generation: one record per distinct input of `train` (its first), its output replaced by
    the reference's greedy continuation of the zero-shot prompt, cut at the template's separator
    and stripped as the engine's `generate` does. Inputs with several references collapse to
    one target: the reference has one answer per input."""
    first: dict[str, Record] = {}
    for r in train.records:
        first.setdefault(r.input, r)
    records = list(first.values())
    outputs = [o.strip() for o in generate(teacher, [builder.assemble([], r.input).ids for r in records],
                                           max_new_tokens=max_new_tokens, stop=(builder.template.separator,),
                                           batch_size=batch_size)]
    if not any(outputs):
        raise TrainingError("the reference generated nothing for every input: check its template and training")
    kept = [replace(r, output=o) for r, o in zip(records, outputs) if o]
    return replace(train, name=f"{train.name}[reference outputs]", records=tuple(kept))


def with_teacher(examples: Sequence[Example], teacher: dict[str, np.ndarray]) -> list[Example]:
    """The examples with their record's teacher distribution attached."""
    missing = [e.record_id for e in examples if e.record_id not in teacher]
    if missing:
        raise TrainingError(f"no teacher distribution for record {missing[0]}")
    return [replace(e, teacher=tuple(float(x) for x in teacher[e.record_id])) for e in examples]


def distill_loss(alpha: float, *, pad_id: int, device, offset: int = 0) -> LossFn:
    """alpha * KL(teacher || student) + (1 - alpha) * gold cross-entropy, over the labels."""
    if not 0.0 <= alpha <= 1.0:
        raise TrainingError(f"alpha must be in [0, 1], got {alpha}")

    def loss(model, examples: Sequence[Example]) -> torch.Tensor:
        s = label_logprobs(model, examples, pad_id, device, offset)  # [B, L]
        t = torch.tensor([e.teacher for e in examples], dtype=s.dtype, device=s.device)  # [B, L]
        kl = (t.exp() * (t - s)).sum(1).mean()
        gold = -s[torch.arange(len(examples)), torch.tensor([e.answer for e in examples])].mean()
        return alpha * kl + (1 - alpha) * gold

    return loss
