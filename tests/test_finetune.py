"""The fine-tuned reference on a tiny random Llama: the loss is on the answer tokens only, the
caller's LM is untouched, and full / LoRA models reload with identical logits and score with the
engine's own code."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from icl_engine.core.adapters import FINETUNE_META_FILE, FinetuneError, load_finetuned
from icl_engine.core.data import Dataset, TaskKind, make_records
from icl_engine.core.generate import generate
from icl_engine.core.prompt import PromptBuilder, Template
from icl_engine.core.score import score_brute_force, score_continuations
from icl_engine.train.finetune import FinetuneConfig, finetune, fit_finetune
from icl_engine.train.loop import LOG_FILE, TrainSettings, build_examples

from conftest import SENTIMENT_ROWS, make_tiny_lm
from numerics import assert_scores_close

TEMPLATE = Template(input_format="Review: {input}\nSentiment:", output_format=" {output}",
                    verbalizers={"positive": "A", "negative": "B"})
ROWS = SENTIMENT_ROWS


@pytest.fixture(scope="module")
def lm(tiny_tokenizer):
    return make_tiny_lm(tiny_tokenizer)


@pytest.fixture(scope="module")
def dataset():
    return Dataset("tiny", TaskKind.CLASSIFICATION, make_records(ROWS), ("negative", "positive"))


@pytest.fixture(scope="module")
def builder(lm, dataset):
    return PromptBuilder(TEMPLATE, lm.tokenizer, dataset.labels)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


@pytest.mark.parametrize("kwargs, name", [
    (dict(method="adapter"), "method must be one of"), (dict(lora_r=0), "lora_r"), (dict(lora_alpha=0), "lora_alpha"),
    (dict(lora_dropout=1.0), "lora_dropout"), (dict(target_modules=()), "target_modules"), (dict(budget=0), "budget"),
])
def test_config_validation_names_the_field(kwargs, name):
    with pytest.raises(ValueError, match=name):
        FinetuneConfig(**kwargs)


def test_load_errors(tmp_path):
    with pytest.raises(FinetuneError, match="not a fine-tuned model folder"):
        load_finetuned(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(FinetuneError, match="needs its base LM"):
        load_finetuned(tmp_path)


def test_losses_are_over_the_answer_tokens_only(lm, dataset, builder, tmp_path):
    """The first evaluation (before any update) and the first step's loss equal brute-force
    references computed over the label tokens only; accuracy is the engine's argmax over labels."""
    examples, _ = build_examples(dataset.records, builder, kind=dataset.kind, labels=dataset.labels, budget=512)
    held = examples[:5]
    cfg = FinetuneConfig(train=TrainSettings(max_steps=1, batch_size=len(examples), eval_every=1, lr=1e-3))
    result = fit_finetune(lm, examples, held, cfg, out=tmp_path)

    def token_mean_nll(exs):
        nll = sum(-score_brute_force(lm, [list(e.prompt_ids)], [list(e.target_ids)])[0, 0] for e in exs)
        return nll / sum(len(e.target_ids) for e in exs)

    labels = [builder.label_ids(lab) for lab in dataset.labels]
    scores = score_brute_force(lm, [list(e.prompt_ids) for e in held], labels)  # [q, L]
    first, after_step = result.history
    assert all(len(e.target_ids) > 1 for e in examples)  # multi-token answers, padded batch
    assert_scores_close(first["eval_loss"], token_mean_nll(held), lm)
    assert first["eval_accuracy"] == np.mean(scores.argmax(1) == [e.answer for e in held])
    assert_scores_close(after_step["train_loss"], token_mean_nll(examples), lm)


def test_full_finetune_learns_and_reloads(lm, dataset, builder, tmp_path):
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    cfg = FinetuneConfig(train=TrainSettings(max_steps=8, batch_size=4, eval_every=4, eval_fraction=0.25, lr=1e-2))
    result = finetune(lm, dataset, cfg, builder=builder, out=tmp_path)
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())  # trained a copy
    assert result.metrics["best_eval_loss"] < result.history[0]["eval_loss"]
    assert {"config.json", "model.safetensors", "tokenizer.json", FINETUNE_META_FILE, LOG_FILE} <= {
        p.name for p in tmp_path.iterdir()}
    text = (tmp_path / FINETUNE_META_FILE).read_text()
    meta = json.loads(text)
    assert text == json.dumps(meta, indent=2, sort_keys=True) + "\n"
    assert meta["method"] == "full" and meta["template"] == TEMPLATE.to_dict() and meta["training"]["lr"] == 1e-2

    tuned = load_finetuned(tmp_path)
    ids = builder.assemble([], "a great film").ids
    assert torch.equal(logits(tuned.model, ids), logits(result.model, ids))
    assert not torch.allclose(logits(tuned.model, ids), logits(lm.model, ids))
    labels = [builder.label_ids(lab) for lab in dataset.labels]
    prompts = [builder.assemble([], r.input).ids for r in dataset.records[:3]]
    assert_scores_close(score_continuations(tuned, prompts, labels), score_brute_force(tuned, prompts, labels), tuned)


def test_lora_reloads_with_identical_logits(lm, dataset, builder, tmp_path):
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    cfg = FinetuneConfig(method="lora", lora_r=4, train=TrainSettings(max_steps=6, batch_size=4, eval_every=3,
                                                                      eval_fraction=0.25, lr=5e-2))
    result = finetune(lm, dataset, cfg, builder=builder, out=tmp_path)
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
    saved = {p.name for p in tmp_path.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", FINETUNE_META_FILE} <= saved
    assert result.metrics["trainable_params"] < lm.n_params // 10

    tuned = load_finetuned(tmp_path, base=lm)
    ids = builder.assemble([], "a boring film").ids
    assert torch.equal(logits(tuned.model, ids), logits(result.model, ids))  # bit-identical
    assert not torch.allclose(logits(tuned.model, ids), logits(lm.model, ids))  # LoRA changed the function
    merged = load_finetuned(tmp_path, base=lm, merge=True)
    assert_scores_close(logits(merged.model, ids), logits(result.model, ids), lm)  # W + BA rounded once
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())  # loading copied the base
    labels = [builder.label_ids(lab) for lab in dataset.labels]
    prompts = [builder.assemble([], r.input).ids for r in dataset.records[:3]]
    assert_scores_close(score_continuations(tuned, prompts, labels), score_brute_force(merged, prompts, labels), lm)


def test_generation_finetune(lm, tmp_path):
    tpl = Template(input_format="Input: {input}\nOutput:", output_format=" {output}")
    rows = [("name Blue", "a pub"), ("area near", "a coffee shop"), ("food rating", "a restaurant"),
            ("name pub", "a pub")] * 2
    data = Dataset("gen", TaskKind.GENERATION, make_records(rows), ())
    cfg = FinetuneConfig(train=TrainSettings(max_steps=8, batch_size=4, eval_every=4, eval_fraction=0.25, lr=1e-2))
    result = finetune(lm, data, cfg, builder=PromptBuilder(tpl, lm.tokenizer), out=tmp_path)
    assert result.metrics["best_eval_loss"] < result.history[0]["eval_loss"]
    assert 0.0 <= result.history[-1]["eval_accuracy"] <= 1.0  # teacher-forced token accuracy
    tuned = load_finetuned(tmp_path)
    [text] = generate(tuned, [PromptBuilder(tpl, lm.tokenizer).assemble([], "name Blue").ids], max_new_tokens=4)
    assert isinstance(text, str)


# ----------------------------------------------------------------------------- resumable runs


class Killed(Exception):
    pass


def _kill_after(monkeypatch, calls: int):
    """Make the training step raise on its (calls+1)-th call, as a kill mid-run would stop it."""
    import icl_engine.train.loop as loop

    real, count = loop._step, {"n": 0}

    def step(*args, **kwargs):
        count["n"] += 1
        if count["n"] > calls:
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "_step", step)
    return lambda: monkeypatch.setattr(loop, "_step", real)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_an_interrupted_run_resumes_to_the_same_model(lm, dataset, builder, tmp_path, monkeypatch, method):
    settings = dict(max_steps=7, batch_size=2, eval_every=2, eval_fraction=0.25, patience=None, seed=3)
    cfg = FinetuneConfig(method=method, train=TrainSettings(**settings))
    whole = finetune(lm, dataset, cfg, builder=builder, out=tmp_path / "whole")

    restore = _kill_after(monkeypatch, 5)  # killed during step 6, after the checkpoint of step 4
    with pytest.raises(Killed):
        finetune(lm, dataset, cfg, builder=builder, out=tmp_path / "cut")
    restore()
    assert (tmp_path / "cut" / "checkpoint" / "state.json").is_file()
    with pytest.raises(ValueError, match="unfinished run.s checkpoint: pass --resume"):
        finetune(lm, dataset, cfg, builder=builder, out=tmp_path / "cut")
    other = FinetuneConfig(method=method, train=TrainSettings(**{**settings, "batch_size": 3}))
    with pytest.raises(ValueError, match="other settings"):
        finetune(lm, dataset, other, builder=builder, out=tmp_path / "cut", resume=True)
    resumed = finetune(lm, dataset, cfg, builder=builder, out=tmp_path / "cut", resume=True)

    assert resumed.metrics["resumed"] and resumed.metrics["steps"] == whole.metrics["steps"] == 7
    assert [r["step"] for r in resumed.history] == [r["step"] for r in whole.history] == [0, 2, 4, 6, 7]
    np.testing.assert_allclose([r["eval_loss"] for r in resumed.history], [r["eval_loss"] for r in whole.history],
                               rtol=1e-5)
    for a, b in zip(whole.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not (tmp_path / "cut" / "checkpoint").exists()  # removed once the model is saved
    log = [json.loads(line) for line in (tmp_path / "cut" / LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 2, 4, 6, 7]


def test_a_trained_folder_is_replaced_only_with_force(lm, dataset, builder, tmp_path):
    cfg = FinetuneConfig(method="lora", train=TrainSettings(max_steps=1, batch_size=4, eval_fraction=0.0))
    finetune(lm, dataset, cfg, builder=builder, out=tmp_path)
    before = (tmp_path / FINETUNE_META_FILE).read_text()
    with pytest.raises(ValueError, match="already holds a trained model.*--force"):
        finetune(lm, dataset, cfg, builder=builder, out=tmp_path)
    assert (tmp_path / FINETUNE_META_FILE).read_text() == before
    finetune(lm, dataset, cfg, builder=builder, out=tmp_path, force=True)


def test_min_epochs_holds_off_early_stopping(lm, dataset, builder, tmp_path):
    # lr 0 never improves the held-out loss: patience 1 stops at the first evaluation after step 0,
    # unless min_epochs says the run must first see every example twice
    base = dict(max_steps=40, batch_size=4, eval_every=1, eval_fraction=0.25, patience=1, lr=1e-12)
    quick = finetune(lm, dataset, FinetuneConfig(method="lora", train=TrainSettings(**base)), builder=builder,
                     out=tmp_path / "a")
    held = finetune(lm, dataset, FinetuneConfig(method="lora", train=TrainSettings(**base, min_epochs=2)),
                    builder=builder, out=tmp_path / "b")
    per_epoch = -(-held.metrics["n_train"] // 4)
    assert quick.metrics["steps"] == 1
    assert held.metrics["steps"] == 2 * per_epoch
    assert held.metrics["examples_seen"] == 2 * held.metrics["n_train"]
