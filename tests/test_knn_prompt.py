"""kNN prompting on a tiny random Llama: the support projection and KL against brute force, a
query that is an anchor's own text finds that anchor at distance 0 (anchors and queries go
through the same context), and anchors for another LM, template or index are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from icl_engine.core.data import Dataset, TaskKind, make_records
from icl_engine.core.embed import get_embedder
from icl_engine.core.index import ExampleIndex
from icl_engine.core.knn_prompt import (
    AnchorConfig,
    AnchorError,
    Anchors,
    KnnPrompter,
    build_anchors,
    kl_to_anchors,
    on_support,
)
from icl_engine.core.prompt import PromptBuilder, Template
from icl_engine.core.score import next_token_logprobs

from conftest import SENTIMENT_ROWS, make_tiny_lm
from numerics import assert_scores_close

TEMPLATE = Template(instruction="Sentiment.", input_format="Review: {input}\nSentiment:", output_format=" {output}")


@pytest.fixture(scope="module")
def lm(tiny_tokenizer):
    return make_tiny_lm(tiny_tokenizer)


@pytest.fixture(scope="module")
def index():
    ds = Dataset("tiny", TaskKind.CLASSIFICATION, make_records(SENTIMENT_ROWS), ("negative", "positive"))
    return ExampleIndex.build(ds, get_embedder("hashing:64"))


@pytest.fixture(scope="module")
def builder(lm, index):
    return PromptBuilder(TEMPLATE, lm.tokenizer, index.labels)


@pytest.fixture(scope="module")
def anchors(lm, builder, index):
    return build_anchors(lm, builder, index, AnchorConfig(per_label=1, support=50, sample=8, batch_size=4))


def test_on_support_keeps_the_mass_and_is_exact_on_the_full_vocabulary():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 20)) * 3
    logp = (logits - np.log(np.exp(logits).sum(1, keepdims=True))).astype(np.float32)
    part = on_support(logp, np.array([1, 5, 7]))
    np.testing.assert_allclose(np.exp(part.astype(np.float64)).sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(part[:, :3], logp[:, [1, 5, 7]])
    full = on_support(logp, np.arange(19))  # all but one token: the rest bin is exactly that token
    np.testing.assert_allclose(full[:, -1], logp[:, 19], atol=1e-4)


def test_kl_matches_brute_force():
    rng = np.random.default_rng(1)

    def dist(n, s):
        x = rng.normal(size=(n, s))
        return x - np.log(np.exp(x).sum(1, keepdims=True))

    a, q = dist(5, 7), dist(3, 7)
    brute = np.array([[np.sum(np.exp(a[n]) * (a[n] - q[i])) for n in range(5)] for i in range(3)])
    pa = np.exp(a)
    np.testing.assert_allclose(kl_to_anchors(pa, (pa * a).sum(1), q), brute, atol=1e-10)


def test_a_query_finds_its_own_anchor_at_distance_zero(lm, builder, index, anchors):
    knn = KnnPrompter(lm, builder, anchors, index, batch_size=3)
    texts = [r.input for r in index.records]
    q = knn.query_logp(texts)  # [n, S+1]: the same numbers as the anchors' rows
    assert_scores_close(q, anchors.logp, lm)
    probs, nearest = knn.predict(texts, k=1)
    assert list(nearest[:, 0]) == list(range(len(texts)))
    assert [index.labels[int(np.argmax(p))] for p in probs] == [r.output for r in index.records]
    probs, _ = knn.predict(texts[:2], k=5)
    assert np.allclose(probs.sum(1), 1) and set(np.round(probs.ravel() * 5, 4)) <= {0, 1, 2, 3, 4, 5}


def test_anchor_rows_equal_full_prompts_without_a_cached_context(lm, builder, index, anchors):
    # the cached-context path against the obvious one: the whole prompt through the LM
    by_id = {r.id: r for r in index.records}
    context = [by_id[i] for i in anchors.context_ids]
    assert sorted(r.output for r in context) == ["negative", "positive"]  # one per label
    full = [builder.assemble(context, r.input).ids for r in index.records[:4]]
    assert_scores_close(on_support(next_token_logprobs(lm, full), anchors.support), anchors.logp[:4], lm)


def test_save_load_and_refusals(lm, builder, index, anchors, tmp_path, tiny_tokenizer):
    anchors.save(tmp_path / "a")
    back = Anchors.load(tmp_path / "a", lm=lm, builder=builder, index=index)
    np.testing.assert_array_equal(back.logp, anchors.logp)
    assert back.context_ids == anchors.context_ids and back.ids == anchors.ids
    other = PromptBuilder(Template(input_format="Text: {input}\nLabel:", output_format=" {output}"), lm.tokenizer,
                          index.labels)
    with pytest.raises(AnchorError, match="another template.*icl anchors build"):
        Anchors.load(tmp_path / "a", lm=lm, builder=other, index=index)
    renamed = make_tiny_lm(tiny_tokenizer)
    renamed.name = "another-lm"
    with pytest.raises(AnchorError, match="another lm"):
        Anchors.load(tmp_path / "a", lm=renamed, builder=builder, index=index)
    smaller = ExampleIndex.build(index.dataset.subsample(6, 0), get_embedder("hashing:64"))
    with pytest.raises(AnchorError, match="another (labels|index sha256)"):
        Anchors.load(tmp_path / "a", lm=lm, builder=builder, index=smaller)
    with pytest.raises(AnchorError, match="another index version"):
        Anchors.load(tmp_path / "a", lm=lm, builder=builder, index=index, index_version="v-other")
    with pytest.raises(AnchorError, match="holds no kNN-prompting anchors"):
        Anchors.load(tmp_path, lm=lm, builder=builder, index=index)
    (tmp_path / "a" / "manifest.json").write_text("{")
    with pytest.raises(AnchorError, match="not valid JSON"):
        Anchors.load(tmp_path / "a", lm=lm, builder=builder, index=index)
    manifest = json.loads(json.dumps(anchors.manifest))
    assert manifest["config"]["support"] == 50 and manifest["lm"] == lm.name


def test_the_engine_classifies_by_anchors_alone_or_mixed(lm, builder, index, anchors):
    from icl_engine.core.pipeline import Engine, PipelineConfig

    queries = ["a great film", "a dull plot", "wonderful"]
    alone = Engine.from_parts(PipelineConfig(index="tiny", k=2, anchor_k=3), index, get_embedder("hashing:64"), lm,
                              TEMPLATE)
    alone.use_anchors(anchors)
    preds = alone.classify(queries)
    shares, nearest = alone.knn.predict(queries, 3)
    for p, s, rows in zip(preds, shares, nearest):
        assert [p.probs[lab] for lab in index.labels] == pytest.approx(list(s))
        assert [d.id for d in p.demos] == [index.records[i].id for i in rows]  # the anchors that voted
        assert all(d.score <= 1e-6 for d in p.demos) and p.prompt_tokens > 0  # score = -KL
    assert [p.prompt_tokens for p in preds] == [len(builder.assemble(alone.knn.context, q).ids) for q in queries]

    icl = Engine.from_parts(PipelineConfig(index="tiny", k=2), index, get_embedder("hashing:64"), lm, TEMPLATE)
    mixed = Engine.from_parts(PipelineConfig(index="tiny", k=2, anchor_k=3, anchor_weight=0.5), index,
                              get_embedder("hashing:64"), lm, TEMPLATE)
    mixed.use_anchors(anchors)
    for a, b, s in zip(icl.classify(queries), mixed.classify(queries), shares):
        want = 0.5 * np.array([a.probs[lab] for lab in index.labels]) + 0.5 * s
        assert [b.probs[lab] for lab in index.labels] == pytest.approx(list(want))
        assert [d.id for d in a.demos] == [d.id for d in b.demos]  # the demonstrations are ICL's
