"""Soft prompts on a tiny random Llama: the LM stays frozen, PEFT round trips give the same
logits, and a soft prompt composes with retrieved demonstrations, the one-pass scorer (its KV
prefix) and generation."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model

from icl_engine.core.adapters import META_FILE, SoftPromptError, load_soft_prompt
from icl_engine.core.data import Dataset, TaskKind, make_records
from icl_engine.core.embed import get_embedder
from icl_engine.core.generate import generate
from icl_engine.core.index import ExampleIndex
from icl_engine.core.lm import LM
from icl_engine.core.prompt import PromptBuilder, Template
from icl_engine.core.score import Prefix, score_brute_force, score_continuations
from icl_engine.train.loop import LOG_FILE, Example, TrainSettings, build_examples
from icl_engine.train.soft_prompt import SoftPromptConfig, fit_soft_prompt, init_soft_prompt, train_soft_prompt

from conftest import SENTIMENT_ROWS, make_tiny_lm, make_tiny_model, sentiment_template
from numerics import assert_probs_close, assert_scores_close

# PeftModel.from_pretrained trips a transformers deprecation note inside PEFT
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")

TEMPLATE = sentiment_template()
ROWS = SENTIMENT_ROWS
FAST = dict(batch_size=4, eval_every=5, max_steps=15, eval_fraction=0.25)


@pytest.fixture(scope="module")
def lm(tiny_tokenizer):
    return make_tiny_lm(tiny_tokenizer)


@pytest.fixture(scope="module")
def dataset():
    return Dataset("tiny", TaskKind.CLASSIFICATION, make_records(ROWS), ("negative", "positive"))


@pytest.fixture(scope="module")
def builder(lm, dataset):
    return PromptBuilder(TEMPLATE, lm.tokenizer, dataset.labels)


@pytest.fixture(scope="module")
def index(dataset):
    return ExampleIndex.build(dataset, get_embedder("hashing:64"))


def peft_logprobs(peft_model, ids: list[int]) -> torch.Tensor:
    """Log-probs [T, V] of the PeftModel over input `ids` (virtual positions dropped)."""
    with torch.no_grad(), warnings.catch_warnings():
        # PEFT's prefix tuning passes its key/values as the deprecated `past_key_values`
        warnings.filterwarnings("ignore", r"`past_key_values` is deprecated", FutureWarning)
        logits = peft_model(input_ids=torch.tensor([ids])).logits[0]
    return logits[-len(ids):].float().log_softmax(-1)


def peft_score(peft_model, prompt: list[int], cont: list[int]) -> float:
    lp = peft_logprobs(peft_model, prompt + cont)
    return sum(lp[len(prompt) - 1 + i, t].item() for i, t in enumerate(cont))


def peft_greedy(peft_model, prompt: list[int], n: int, eos: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        nxt = int(peft_logprobs(peft_model, ids)[-1].argmax())
        if nxt == eos:
            break
        ids.append(nxt)
    return ids[len(prompt):]


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("kwargs, name", [
    (dict(n_virtual=0), "n_virtual"),
    (dict(init="text"), "init_text"),
    (dict(init="zero"), "init"),
    (dict(k=2), "k"),
    (dict(method="ipt", k=0), "k"),
    (dict(method="prefix_tuning", init="text", init_text="hi"), "prefix_projection"),
    (dict(budget=10), "budget"),
    (dict(method="nope"), "method must be one of"),
    (dict(init="nope"), "init must be one of"),
])
def test_config_validation_names_the_field(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SoftPromptConfig(**kwargs)


@pytest.mark.parametrize("kwargs, name", [
    (dict(lr=0), "lr"), (dict(epochs=0), "epochs"), (dict(eval_fraction=1.0), "eval_fraction"),
    (dict(warmup_ratio=1.0), "warmup_ratio"), (dict(patience=0), "patience"), (dict(batch_size=0), "batch_size"),
])
def test_train_settings_validation_names_the_field(kwargs, name):
    with pytest.raises(ValueError, match=name):
        TrainSettings(**kwargs)


def test_config_defaults_per_method():
    assert SoftPromptConfig(method="ipt").k == 4 and SoftPromptConfig().k == 0
    assert SoftPromptConfig().init.value == "vocab"
    assert SoftPromptConfig(init_text="Sentiment:").init.value == "text"
    assert SoftPromptConfig(method="prefix_tuning").init.value == "random"
    assert SoftPromptConfig(train={"lr": 0.5}).lr == 0.5


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_only_the_soft_prompt_trains_and_the_lm_is_bit_identical(lm, dataset, builder, tmp_path, method):
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    flags = [p.requires_grad for p in lm.model.parameters()]
    cfg = SoftPromptConfig(method=method, n_virtual=3, train=TrainSettings(**{**FAST, "max_steps": 3}))
    result = train_soft_prompt(lm, dataset, cfg, builder=builder, out=tmp_path)
    # no gradient ever reached the LM (a parameter that required grad would hold one now) ...
    assert all(p.grad is None for p in lm.model.parameters())
    # ... while every soft-prompt parameter got one
    soft_params = list(result.model.prompt_encoder.parameters())
    assert soft_params and all(p.grad is not None for p in soft_params)
    after = lm.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in lm.model.parameters()] == flags  # handed back as it was


@pytest.mark.parametrize("method, extra, steps", [
    ("prompt_tuning", {}, 15),
    ("prefix_tuning", {}, 15),  # through the reparameterisation MLP
    ("prefix_tuning", dict(prefix_projection=False, init="vocab"), 15),
    # IPT: which of the tied hashing neighbours are the demonstrations decides how fast it
    # learns; with ties to the lower row, 15 steps gave 6.76 -> 6.50 and 30 steps 6.76 -> 5.20
    ("ipt", dict(k=2), 30),
])
@pytest.mark.slow
def test_a_few_steps_reduce_the_loss(lm, dataset, builder, index, tmp_path, method, extra, steps):
    lr = 0.01 if method == "prefix_tuning" and not extra else 0.1
    train = TrainSettings(**{**FAST, "max_steps": steps}, lr=lr, patience=None)
    cfg = SoftPromptConfig(method=method, n_virtual=4, train=train, **extra)
    result = train_soft_prompt(lm, dataset, cfg, builder=builder, index=index, out=tmp_path)
    first, best = result.history[0]["eval_loss"], result.metrics["best_eval_loss"]
    assert best < first - 0.5, result.history  # the gold labels got >1.6x likelier on held-out reviews
    assert result.history[-1]["train_loss"] < result.history[1]["train_loss"]


def test_outputs_log_and_metadata(lm, dataset, builder, index, tmp_path):
    cfg = SoftPromptConfig(method="ipt", k=2, n_virtual=2, train=TrainSettings(**FAST))
    result = train_soft_prompt(lm, dataset, cfg, builder=builder, index=index, out=tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors", META_FILE, LOG_FILE} <= {
        p.name for p in tmp_path.iterdir()}
    log = [json.loads(line) for line in (tmp_path / LOG_FILE).read_text().splitlines()]
    assert log == json.loads(json.dumps(result.history))
    assert [r["step"] for r in log] == [0, 5, 10, 15]
    assert all({"step", "epoch", "lr", "train_loss", "eval_loss", "eval_accuracy"} <= set(r) for r in log)
    text = (tmp_path / META_FILE).read_text()
    meta = json.loads(text)
    assert text == json.dumps(meta, indent=2, sort_keys=True) + "\n"  # sorted keys
    assert {"method", "template", "k", "seeds", "training", "metrics"} <= set(meta)
    assert meta["method"] == "ipt" and meta["k"] == 2 and meta["template"] == TEMPLATE.to_dict()
    assert meta["training"]["lr"] == cfg.lr and meta["metrics"]["best_step"] in (0, 5, 10, 15)
    assert meta["metrics"]["n_train"] + meta["metrics"]["n_eval"] == len(ROWS)
    soft = load_soft_prompt(tmp_path)
    assert soft.method.value == "ipt" and soft.k == 2 and soft.n_virtual == 2 and soft.template == TEMPLATE


def test_early_stopping_restores_the_best_evaluation(lm, tmp_path):
    # training teaches " A" while the held-out examples (same prompts) want " B": every step makes
    # the held-out loss worse, so the best evaluation is the one before training
    enc = lambda t: tuple(lm.tokenizer(t, add_special_tokens=False).input_ids)  # noqa: E731
    a, b = enc(" A"), enc(" B")
    prompts = [enc(f"Review: {t}\nSentiment:") for t, _ in ROWS]
    train = [Example(p, a, candidates=(b, a), answer=1) for p in prompts]
    held = [Example(p, b, candidates=(b, a), answer=0) for p in prompts]
    cfg = SoftPromptConfig(n_virtual=2, train=TrainSettings(max_steps=50, batch_size=6, eval_every=2, lr=0.1,
                                                             patience=2))
    result = fit_soft_prompt(lm, train, held, cfg, out=tmp_path)
    losses = [r["eval_loss"] for r in result.history]
    assert losses[1] > losses[0] and losses[2] > losses[0]
    assert [r["step"] for r in result.history] == [0, 2, 4] and result.metrics["steps"] == 4  # patience 2
    assert result.metrics["best_step"] == 0 and result.metrics["best_eval_loss"] == losses[0]
    # what was saved is the best evaluation's soft prompt: here the untrained one
    torch.testing.assert_close(load_soft_prompt(tmp_path).weights, init_soft_prompt(lm, cfg).weights,
                               atol=0, rtol=0)


# ----------------------------------------------------------------------------- IPT


def test_ipt_never_retrieves_the_training_example_itself(lm, builder, tmp_path):
    # a duplicate text with a different label, and an exact duplicate record: both must be left out too
    rows = ROWS + [("great film", "negative"), ("terrible plot", "negative")]
    data = Dataset("dups", TaskKind.CLASSIFICATION, make_records(rows), ("negative", "positive"))
    index = ExampleIndex.build(data, get_embedder("hashing:64"))
    examples, skipped = build_examples(data.records, builder, kind=data.kind, labels=data.labels, budget=512,
                                       n_virtual=4, k=3, index=index)
    assert skipped == 0 and len(examples) == len(rows)
    by_id = {r.id: r for r in data.records}
    for rec, ex in zip(data.records, examples):
        assert ex.record_id == rec.id and len(ex.demo_ids) == 3
        assert rec.id not in ex.demo_ids
        assert all(" ".join(by_id[d].input.split()) != " ".join(rec.input.split()) for d in ex.demo_ids)
        # the prompt is exactly what the engine assembles: demos (prompt order), then the query
        demos = [by_id[d] for d in ex.demo_ids]
        assert list(ex.prompt_ids) == builder.assemble(demos, rec.input).ids
        assert ex.target_ids == tuple(builder.label_ids(rec.output))


def test_generation_targets_are_the_output_and_the_separator(lm):
    tpl = Template(input_format="Input: {input}\nOutput:", output_format=" {output}")
    b = PromptBuilder(tpl, lm.tokenizer)
    recs = make_records([("name Blue", "a pub"), ("area near", "a coffee shop")])
    examples, _ = build_examples(recs, b, kind="generation", budget=512)
    for rec, ex in zip(recs, examples):
        assert list(ex.target_ids) == b.label_ids(rec.output) + b.sep_ids
        assert list(ex.prompt_ids) == b.assemble([], rec.input).ids and ex.candidates == ()


# ----------------------------------------------------------------------------- PEFT round trip + composition


def _peft_native(lm, method, path):
    """An adapter made by PEFT alone (its own random init), as if trained elsewhere."""
    cfg = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=3) if method == "prompt" else \
        PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=3, prefix_projection=True,
                           encoder_hidden_size=16)
    flags = [p.requires_grad for p in lm.model.parameters()]
    torch.manual_seed(1)
    get_peft_model(lm.model, cfg).save_pretrained(path)
    for p, f in zip(lm.model.parameters(), flags):
        p.requires_grad_(f)
    return path


@pytest.mark.parametrize("source", ["prompt_tuning", "prefix_tuning", "prefix_tuning_direct", "peft_prompt",
                                    "peft_prefix"])
def test_peft_round_trip_scoring_and_generation(lm, dataset, builder, tmp_path, source):
    if source.startswith("peft_"):
        folder = _peft_native(lm, source.removeprefix("peft_"), tmp_path)
    else:
        extra = dict(prefix_projection=False) if source == "prefix_tuning_direct" else {}
        cfg = SoftPromptConfig(method=source.removesuffix("_direct"), n_virtual=3,
                               train=TrainSettings(**{**FAST, "max_steps": 4}), **extra)
        folder = train_soft_prompt(lm, dataset, cfg, builder=builder, out=tmp_path).out
    soft = load_soft_prompt(folder)
    peft_model = PeftModel.from_pretrained(lm.model, folder).eval()
    n = soft.n_virtual

    # one-pass label scoring with the KV prefix == the PeftModel on the full prompt
    records = dataset.records
    prompts = [builder.assemble([records[1], records[6]], r.input).ids for r in records[:4]]
    shared = builder.shared_ids()
    labels = [builder.label_ids(lab) for lab in dataset.labels]
    want = np.array([[peft_score(peft_model, p, c) for c in labels] for p in prompts])
    for ids in (None, shared):  # soft prompt alone, or with bos + instruction cached too
        prefix = soft.prefix(lm, ids=ids)
        cut = len(ids) if ids else 0
        assert prefix.length == n + cut
        rest = [p[cut:] for p in prompts]
        assert_scores_close(score_continuations(lm, rest, labels, prefix=prefix, batch_size=3), want, lm)
        assert_scores_close(score_brute_force(lm, rest, labels, prefix=prefix), want, lm)

    # greedy generation with the prefix == greedy decoding with the PeftModel
    prefix = soft.prefix(lm, ids=shared)
    got = generate(lm, [p[len(shared):] for p in prompts[:2]], prefix=prefix, max_new_tokens=5, stop=())
    for p, text in zip(prompts[:2], got):
        ids = peft_greedy(peft_model, p, 5, lm.tokenizer.eos_token_id)
        assert text == lm.tokenizer.decode(ids, skip_special_tokens=True)


def test_engine_with_soft_prompt_and_demonstrations_equals_peft(lm, dataset, builder, index, tmp_path):
    from icl_engine.core.pipeline import Engine, PipelineConfig

    cfg = SoftPromptConfig(method="ipt", k=2, n_virtual=3, train=TrainSettings(**{**FAST, "max_steps": 4}))
    folder = train_soft_prompt(lm, dataset, cfg, builder=builder, index=index, out=tmp_path / "soft").out
    config = PipelineConfig(index=str(tmp_path / "unused"), template=TEMPLATE, k=2, soft_prompt=str(folder))
    engine = Engine.load(config, lm=lm, embedder=get_embedder("hashing:64"), index=index)
    assert engine.n_virtual == 3
    peft_model = PeftModel.from_pretrained(lm.model, folder).eval()
    queries = ["a great wonderful film", "boring and terrible"]
    by_id = {r.id: r for r in dataset.records}
    for q, pred in zip(queries, engine.classify(queries)):
        assert len(pred.demos) == 2
        ids = builder.assemble([by_id[d.id] for d in pred.demos], q).ids
        s = np.array([peft_score(peft_model, ids, builder.label_ids(lab)) for lab in dataset.labels])
        p = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
        assert_probs_close([pred.probs[lab] for lab in dataset.labels], p, s, lm)


def test_prefix_initialised_from_text_equals_the_text_in_the_prompt(lm, builder):
    """Li & Liang's real-word init: the prefix holds the key/values of the text's tokens at
    positions 0..n-1, so scoring after it is scoring after the text itself (checks the
    key/value layout and the positions of everything after a prefix)."""
    text = "Review: the movie"
    text_ids = builder.encode(text)
    soft = init_soft_prompt(lm, SoftPromptConfig(method="prefix_tuning", prefix_projection=False, init="text",
                                                 init_text=text, n_virtual=len(text_ids)))
    prompts = [builder.encode(" was great\nSentiment:"), builder.encode(" was dull")]
    labels = [builder.label_ids("positive"), builder.label_ids("negative")]
    want = score_brute_force(lm, [text_ids + p for p in prompts], labels)
    assert_scores_close(score_continuations(lm, prompts, labels, prefix=soft.prefix(lm)), want, lm)
    # prompt tuning's text init: the virtual tokens ARE the text's embeddings
    soft = init_soft_prompt(lm, SoftPromptConfig(init="text", init_text=text, n_virtual=len(text_ids)))
    assert_scores_close(score_continuations(lm, prompts, labels, prefix=soft.prefix(lm)), want, lm)


# ----------------------------------------------------------------------------- zero-initialised prefix


def _eager(lm):
    model = make_tiny_model(lm.model.config.vocab_size, initializer_range=0.2)
    model.set_attn_implementation("eager")  # attention weights are returned
    return LM(model, lm.tokenizer, "tiny-eager", lm.device)


def test_zero_prefix_is_not_a_no_op_it_only_takes_attention_mass(lm):
    """What "a zero-initialised prefix leaves outputs unchanged" can honestly mean.

    With keys = values = 0 (PEFT's init_weights="zero") every prefix position scores q.0 = 0,
    so softmax gives it weight exp(0)/Z > 0 while contributing a zero value. Every head's
    output is therefore the original output scaled by (1 - prefix mass): not unchanged (the
    scale differs per head and position, and the next layers are nonlinear). No finite key can
    make exp(score) = 0 for every query, so no prefix of finite key/values is an exact no-op;
    the exact statement is the first one below, and masking the prefix is the no-op."""
    lm = _eager(lm)
    n = 3
    soft = init_soft_prompt(lm, SoftPromptConfig(method="prefix_tuning", prefix_projection=False, init="zero",
                                                 n_virtual=n))
    assert soft.weights.abs().max() == 0
    ids = torch.tensor([lm.tokenizer("the movie was great and the acting was wonderful").input_ids])
    T = ids.shape[1]
    heads_out = []
    hook = lm.model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(
        lambda mod, args: heads_out.append(args[0].detach()))  # [1, T, heads*D]: per-head outputs
    pos = torch.arange(n, n + T)[None]
    with torch.no_grad():
        base = lm.model(input_ids=ids, output_attentions=True)
        cache = soft.prefix(lm).cache(1, lm.model.config)
        with_prefix = lm.model(input_ids=ids, cache=cache, position_ids=pos, output_attentions=True,
                               attention_mask=torch.ones(1, n + T, dtype=torch.long))
        masked = lm.model(input_ids=ids, cache=soft.prefix(lm).cache(1, lm.model.config),
                          position_ids=pos, attention_mask=torch.tensor([[0] * n + [1] * T]))
    hook.remove()
    a0, a1 = base.attentions[0], with_prefix.attentions[0]  # layer 0: [1, H, T, T], [1, H, T, n+T]
    mass = a1[..., :n].sum(-1)  # [1, H, T] attention taken by the prefix
    assert (mass > 0).all() and (mass < 1).all()
    torch.testing.assert_close(a1[..., n:], a0 * (1 - mass)[..., None], atol=1e-6, rtol=1e-5)
    H = a0.shape[1]
    o0, o1 = heads_out[0].view(1, T, H, -1), heads_out[1].view(1, T, H, -1)  # [1, T, H, D]
    torch.testing.assert_close(o1, o0 * (1 - mass).transpose(1, 2)[..., None], atol=1e-6, rtol=1e-5)
    assert (with_prefix.logits - base.logits).abs().max() > 1e-2  # hence: outputs do change
    # with the prefix masked out the outputs are unchanged (up to rotary rounding at shifted positions)
    torch.testing.assert_close(masked.logits, base.logits, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- loading


def test_load_errors(lm, tmp_path):
    with pytest.raises(SoftPromptError, match="adapter_config.json"):
        load_soft_prompt(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(SoftPromptError, match="PROMPT_TUNING or PREFIX_TUNING"):
        load_soft_prompt(tmp_path)
    other = LM(make_tiny_model(lm.model.config.vocab_size, num_hidden_layers=3), lm.tokenizer, "other", lm.device)
    folder = _peft_native(lm, "prefix", tmp_path / "prefix")
    with pytest.raises(SoftPromptError, match="does not fit"):
        load_soft_prompt(folder).prefix(other)
    wide = LM(make_tiny_model(lm.model.config.vocab_size, hidden_size=48, num_attention_heads=4),
              lm.tokenizer, "wide", lm.device)
    folder = _peft_native(lm, "prompt", tmp_path / "prompt")
    with pytest.raises(SoftPromptError, match="hidden size"):
        load_soft_prompt(folder).prefix(wide)


def test_fit_over_pre_tokenised_pairs(lm, tmp_path):
    """The core loop needs no builder: (prompt ids, target ids) pairs are enough."""
    enc = lambda t: tuple(lm.tokenizer(t, add_special_tokens=False).input_ids)  # noqa: E731
    a, b = enc(" A"), enc(" B")
    exs = [Example(enc(f"Review: {t}\nSentiment:"), a if y == "positive" else b, candidates=(b, a),
                   answer=int(y == "positive")) for t, y in ROWS]
    cfg = SoftPromptConfig(n_virtual=2, train=TrainSettings(max_steps=6, batch_size=6, eval_every=3, lr=0.1))
    result = fit_soft_prompt(lm, exs[:8], exs[8:], cfg, out=tmp_path)
    assert [r["step"] for r in result.history] == [0, 3, 6]
    assert result.history[-1]["eval_loss"] < result.history[0]["eval_loss"]
    assert isinstance(load_soft_prompt(tmp_path).prefix(lm), Prefix)
