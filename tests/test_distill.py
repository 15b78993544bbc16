"""Distillation from the fine-tuned reference on a tiny random Llama: the student's label
distribution against the engine's brute-force scorer, a zero loss when student and teacher agree,
a soft prompt that moves toward its teacher, and references that do not belong refused."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from icl_engine.core.adapters import FINETUNE_META_FILE
from icl_engine.core.data import Dataset, TaskKind, make_records
from icl_engine.core.prompt import PromptBuilder, Template
from icl_engine.core.score import normalize, score_brute_force, score_continuations
from icl_engine.train.distill import distill_loss, load_teacher, teacher_logprobs, with_teacher
from icl_engine.train.finetune import FinetuneConfig, finetune
from icl_engine.train.loop import Example, TrainingError, TrainSettings, build_examples, label_logprobs
from icl_engine.train.soft_prompt import SoftPromptConfig, train_soft_prompt

from conftest import SENTIMENT_ROWS, make_tiny_lm, sentiment_template
from numerics import assert_scores_close

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


@pytest.fixture(scope="module")
def lm(tiny_tokenizer):
    return make_tiny_lm(tiny_tokenizer)


@pytest.fixture(scope="module")
def dataset():
    return Dataset("tiny", TaskKind.CLASSIFICATION, make_records(SENTIMENT_ROWS), ("negative", "positive"))


@pytest.fixture(scope="module")
def builder(lm, dataset):
    return PromptBuilder(sentiment_template(), lm.tokenizer, dataset.labels)


@pytest.fixture(scope="module")
def reference(lm, dataset, builder, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    cfg = FinetuneConfig(train=TrainSettings(max_steps=6, batch_size=4, eval_fraction=0.0, lr=1e-2))
    finetune(lm, dataset, cfg, builder=builder, out=out)
    return out


def test_label_logprobs_match_the_brute_force_scorer(lm, dataset, builder):
    examples, _ = build_examples(dataset.records[:5], builder, kind=dataset.kind, labels=dataset.labels, budget=512)
    got = label_logprobs(lm.model, examples, lm.tokenizer.pad_token_id or 0, lm.device).detach().numpy()
    labels = [builder.label_ids(lab) for lab in dataset.labels]
    want = normalize(score_brute_force(lm, [list(e.prompt_ids) for e in examples], labels))
    assert_scores_close(got, want, lm)


def row_by_row(model, examples, n_lead: int) -> np.ndarray:
    """The brute-force reference: one full forward per (prompt, label), summing the label's
    token log-probs; `n_lead` logits come before the prompt's (prompt tuning's virtual tokens)."""
    out = np.zeros((len(examples), len(examples[0].candidates)))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`past_key_values` is deprecated", FutureWarning)  # PEFT's prefix call
        for b, e in enumerate(examples):
            for j, c in enumerate(e.candidates):
                seq = torch.tensor([list(e.prompt_ids) + list(c)])
                logp = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[0].float().log_softmax(-1)
                at = n_lead + len(e.prompt_ids) - 1  # logits there predict the label's first token
                out[b, j] = sum(logp[at + t, tok].item() for t, tok in enumerate(c))
    return out - np.logaddexp.reduce(out, axis=1, keepdims=True)


@pytest.mark.parametrize("soft", ["none", "prompt_tuning", "prefix_tuning"])
def test_label_logprobs_with_multi_token_labels_match_full_rows(tiny_tokenizer, soft):
    """The cached-prompt path (one prompt forward, then short label continuations) against
    one full forward per (prompt, label): labels of 1-3 tokens, prompts of unequal length
    (right padding), with and without a PEFT soft prompt before the prompt."""
    from peft import PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model

    model = make_tiny_lm(tiny_tokenizer).model
    n_virtual, offset, n_lead = 3, 0, 0
    if soft != "none":
        torch.manual_seed(0)
        cfg = (PromptTuningConfig if soft == "prompt_tuning" else PrefixTuningConfig)(
            task_type=TaskType.CAUSAL_LM, num_virtual_tokens=n_virtual)
        model = get_peft_model(model, cfg)
        with torch.no_grad():  # a prompt far from zero, so a misplaced one would show
            for p in model.prompt_encoder.parameters():
                p.normal_(0, 1.0)
        offset = n_lead = n_virtual if soft == "prompt_tuning" else 0
    cands = ((11,), (12, 13, 14), (15, 16))
    prompts = [tuple(range(20, 29)), tuple(range(30, 35)), tuple(range(40, 52))]
    examples = [Example(p, cands[0], candidates=cands, answer=0) for p in prompts]
    got = label_logprobs(model, examples, tiny_tokenizer.pad_token_id or 0, torch.device("cpu"), offset)
    assert_scores_close(got.detach().numpy(), row_by_row(model, examples, n_lead), model)
    got.sum().backward()  # gradients reach the soft prompt through both passes
    if soft != "none":
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.prompt_encoder.parameters())
    with pytest.raises(TrainingError, match="one label set"):
        label_logprobs(model, [examples[0], Example(prompts[1], (11,), candidates=cands[:2])], 0, "cpu")


def test_the_loss_is_zero_when_the_student_is_the_teacher(lm, dataset, builder):
    examples, _ = build_examples(dataset.records[:4], builder, kind=dataset.kind, labels=dataset.labels, budget=512)
    own = teacher_logprobs(lm, builder, dataset.records[:4])
    loss = distill_loss(1.0, pad_id=lm.tokenizer.pad_token_id or 0, device=lm.device)
    assert loss(lm.model, with_teacher(examples, own)).item() == pytest.approx(0.0, abs=1e-5)
    half = distill_loss(0.5, pad_id=lm.tokenizer.pad_token_id or 0, device=lm.device)
    gold = -np.mean([own[e.record_id][e.answer] for e in examples])
    assert half(lm.model, with_teacher(examples, own)).item() == pytest.approx(0.5 * gold, rel=1e-4)
    with pytest.raises(TrainingError, match="alpha"):
        distill_loss(1.5, pad_id=0, device="cpu")


def kl_to(teacher: dict, lm, builder, records, prefix=None) -> float:
    labels = [builder.label_ids(lab) for lab in builder.labels]
    student = normalize(score_continuations(lm, [builder.assemble([], r.input).ids for r in records], labels,
                                            prefix=prefix))
    t = np.stack([teacher[r.id] for r in records])
    return float((np.exp(t) * (t - student)).sum(1).mean())


def test_a_distilled_soft_prompt_moves_toward_its_teacher(lm, dataset, builder, reference, tmp_path):
    teacher = load_teacher(reference, lm=lm, builder=builder, labels=dataset.labels)
    targets = teacher_logprobs(teacher, builder, dataset.records)
    before = kl_to(targets, lm, builder, dataset.records)
    cfg = SoftPromptConfig(n_virtual=4, train=TrainSettings(max_steps=30, batch_size=4, eval_fraction=0.0, lr=5e-2))
    result = train_soft_prompt(lm, dataset, cfg, builder=builder, out=tmp_path / "sp", teacher=teacher, alpha=1.0)
    from icl_engine.core.adapters import load_soft_prompt

    soft = load_soft_prompt(tmp_path / "sp")
    after = kl_to(targets, lm, builder, dataset.records, prefix=soft.prefix(lm))
    assert after < 0.5 * before, (before, after)
    meta = json.loads((tmp_path / "sp" / "icl_soft_prompt.json").read_text())
    assert meta["distill"] == {"teacher": teacher.name, "alpha": 1.0} and result.metrics["steps"] == 30


def test_references_that_do_not_belong_are_refused(lm, dataset, builder, reference, tmp_path):
    with pytest.raises(TrainingError, match="not a fine-tuned reference folder"):
        load_teacher(tmp_path, lm=lm, builder=builder, labels=dataset.labels)
    with pytest.raises(TrainingError, match="labels .* differ"):
        load_teacher(reference, lm=lm, builder=builder, labels=("bad", "good"))
    other = PromptBuilder(Template(input_format="{input} =", output_format=" {output}"), lm.tokenizer, dataset.labels)
    with pytest.raises(TrainingError, match="another template"):
        load_teacher(reference, lm=lm, builder=other, labels=dataset.labels)
    meta = json.loads((reference / FINETUNE_META_FILE).read_text())
    alien = tmp_path / "alien"
    alien.mkdir()
    (alien / FINETUNE_META_FILE).write_text(json.dumps({**meta, "lm": "gpt2"}))
    with pytest.raises(TrainingError, match="fine-tuned from 'gpt2'"):
        load_teacher(alien, lm=lm, builder=builder, labels=dataset.labels)


def test_generation_is_distilled_from_the_reference_outputs(tiny_tokenizer, tmp_path):
    """Sequence-level distillation: one target per distinct input, the reference's greedy
    zero-shot output (as the engine's generate strips it); the soft prompt trains on those."""
    from icl_engine.core.generate import generate
    from icl_engine.train.distill import teacher_records

    lm = make_tiny_lm(tiny_tokenizer)
    pairs = [(f"name[{n}]", f"{n} serves food") for n in ("Aromi", "Blue", "Cotto")]
    data = Dataset("gen", TaskKind.GENERATION, make_records(pairs + [(pairs[0][0], "another reference")]), ())
    builder = PromptBuilder(Template(input_format="{input} =", output_format=" {output}"), lm.tokenizer, ())
    ref = tmp_path / "ref"
    quick = TrainSettings(max_steps=2, batch_size=2, eval_fraction=0.0)
    finetune(lm, data, FinetuneConfig(train=quick), builder=builder, out=ref)
    teacher = load_teacher(ref, lm=lm, builder=builder, labels=())
    got = teacher_records(teacher, builder, data, max_new_tokens=6)
    want = generate(teacher, [builder.assemble([], i).ids for i, _ in pairs], max_new_tokens=6, stop=("\n\n",))
    assert [r.input for r in got.records] == [i for i, _ in pairs]  # the repeated input once
    assert [r.output for r in got.records] == [w.strip() for w in want if w.strip()]
    cfg = SoftPromptConfig(n_virtual=2, train=quick)
    train_soft_prompt(lm, data, cfg, builder=builder, out=tmp_path / "sp", teacher=teacher)
    meta = json.loads((tmp_path / "sp" / "icl_soft_prompt.json").read_text())
    assert meta["distill"]["targets"] == "reference outputs" and meta["distill"]["gold_records"] == 4
    with pytest.raises(TrainingError, match="alpha must be 1"):
        train_soft_prompt(lm, data, cfg, builder=builder, out=tmp_path / "sp2", teacher=teacher, alpha=0.5)
