"""Demonstration KV caches and cached scoring (core/kvcache.py) on a tiny random Llama: the batched,
padded fast path against a brute force built from the definition (each block run alone after the
prefix, its keys turned to their new positions with the model's own rotary embedding, the query
and each label run one by one against the concatenation), in both layouts and with rescaled
attention; one demonstration scored cached IS exact scoring; moving keys equals the model rotating
at the new positions (RoPE scaling configs included); the stored formats' round-trip errors; a
cache for another LM, template, index version or records is refused in one line; and exact
scoring gives the same predictions whether or not a cache exists."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers.cache_utils import DynamicCache

from icl_engine.core import cancel
from icl_engine.core.choices import KVDType
from icl_engine.core.config import EngineSpec, PipelineConfig, QueryOptions
from icl_engine.core.data import Dataset, TaskKind, make_records
from icl_engine.core.embed import get_embedder
from icl_engine.core.index import ExampleIndex
from icl_engine.core.kvcache import KVCache, KVCacheError, build_kv_cache, decode, encode, score_cached
from icl_engine.core.pipeline import Engine
from icl_engine.core.prompt import PromptBuilder, Template

from conftest import SENTIMENT_ROWS, make_tiny_lm, make_tiny_model, make_tiny_tokenizer, sentiment_template
from numerics import U32, assert_scores_close, gamma

QUERIES = ["a great movie", "the plot was dull and boring", "wonderful", "a terrible film with great acting"]
ROWS = [np.array([0, 5, 2]), np.array([7]), np.array([3, 9, 1, 11]), np.array([4, 8])]  # demonstrations, prompt order


@pytest.fixture(scope="module")
def lm(tiny_tokenizer):
    return make_tiny_lm(tiny_tokenizer)


@pytest.fixture(scope="module")
def index():
    ds = Dataset("tiny", TaskKind.CLASSIFICATION, make_records(SENTIMENT_ROWS), ("negative", "positive"))
    return ExampleIndex.build(ds, get_embedder("hashing:64"))


@pytest.fixture(scope="module")
def builder(lm, index):
    return PromptBuilder(sentiment_template(), lm.tokenizer, index.labels)  # multi-token labels (" A" is 2 tokens)


@pytest.fixture(scope="module")
def exact_cache(lm, builder, index, tmp_path_factory):
    folder = tmp_path_factory.mktemp("kv") / "kvcache"
    build_kv_cache(lm, builder, index, folder, dtype="float32", batch_size=5)  # batches of 5: padded blocks
    return KVCache.load(folder, lm=lm, builder=builder, index=index)


@torch.inference_mode()
def reference_scores(lm, builder, index, query, rows, *, budget, rescale=False) -> list[float]:
    """Cached scoring of one query from its definition, the simplest way: batch 1, no padding,
    every block run with the prefix in one plain forward, each label run alone."""
    model, labels = lm.model, [builder.label_ids(lab) for lab in index.labels]
    shared = builder.shared_ids()
    P = len(shared)

    def kv(ids):  # per layer (key, value) [1, H, n, D] of one forward over ids from position 0
        out = model(input_ids=torch.tensor([ids]), use_cache=True)
        return [(layer.keys, layer.values) for layer in out.cache.layers]

    rope = model.model.rotary_emb
    scale = rope.attention_scaling

    def rotate(k, positions, sign):  # the model's own rotation (or its inverse), via apply_rotary_pos_emb
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        cos, sin = rope(k, torch.tensor([positions]))
        return apply_rotary_pos_emb(k, k, cos / scale, sign * sin / scale)[1]

    blocks = [builder.demo_ids(index.records[r]) + builder.sep_ids for r in rows]
    n = np.array([len(b) for b in blocks])
    prompt = builder.assemble([index.records[r] for r in rows], query)
    sequential = len(prompt.ids) + builder.max_answer_len <= budget
    starts = P + np.cumsum(n) - n if sequential else P + n.max() - n
    past = [(k, v) for k, v in kv(shared)] if P else [(None, None)] * model.config.num_hidden_layers
    for block, start in zip(blocks, starts):
        for i, (k, v) in enumerate(kv(shared + block)):
            raw = rotate(k[:, :, P:], list(range(P, P + len(block))), -1.0)  # back to no rotation
            moved = rotate(raw, list(range(start, start + len(block))), 1.0)
            pk, pv = past[i]
            past[i] = (moved, v[:, :, P:]) if pk is None else (torch.cat([pk, moved], 2), torch.cat([pv, v[:, :, P:]], 2))
    q = prompt.ids[P + int(n.sum()):]
    q_start = P + int(n.sum()) if sequential else P + int(n.max())
    K = past[0][0].shape[2]
    out = []
    for lab in labels:
        ids = q + lab
        T = len(ids)
        mask = None
        if rescale and not sequential and len(rows) > 1:  # Hao et al.: the blocks' weights divided by their number
            mask = torch.zeros(1, 1, T, K + T)
            mask[..., P:K] = -math.log(len(rows))
            mask[..., K:] = torch.full((T, T), torch.finfo(torch.float32).min).triu(1)
        cache = DynamicCache([(k.clone(), v.clone()) for k, v in past], config=model.config)
        logits = model(input_ids=torch.tensor([ids]), position_ids=torch.arange(q_start, q_start + T)[None],
                       attention_mask=mask, cache=cache).logits[0].double().log_softmax(-1)
        out.append(float(sum(logits[len(q) - 1 + j, t] for j, t in enumerate(lab))))
    return out


@pytest.mark.parametrize("budget,rescale", [(10_000, False), (120, False), (120, True)])
def test_cached_scores_equal_the_brute_force_reference(lm, builder, index, exact_cache, budget, rescale):
    """budget 10,000: every prompt sequential; 120: the longest laid out with position reuse."""
    prompts = [builder.assemble([index.records[r] for r in rows], q) for q, rows in zip(QUERIES, ROWS)]
    labels = [builder.label_ids(lab) for lab in index.labels]
    P = len(builder.shared_ids())
    prefix = lm.compute_prefix(builder.shared_ids())
    got = score_cached(lm, exact_cache, prefix, prompts, ROWS, labels, budgets=[budget] * 4,
                       answer=builder.max_answer_len, batch_size=3, rescale=rescale).result()
    want = [reference_scores(lm, builder, index, q, rows, budget=budget, rescale=rescale) for q, rows in zip(QUERIES, ROWS)]
    if budget == 120:  # both layouts are in the batch
        assert {len(p.ids) + builder.max_answer_len <= 120 for p in prompts} == {True, False} and P > 0
    assert_scores_close(got, want, lm)


def test_small_batches_by_memory_give_the_same_scores(lm, builder, index, exact_cache):
    prompts = [builder.assemble([index.records[r] for r in rows], q) for q, rows in zip(QUERIES, ROWS)]
    labels, prefix = [builder.label_ids(lab) for lab in index.labels], lm.compute_prefix(builder.shared_ids())
    kw = dict(budgets=[10_000] * 4, answer=builder.max_answer_len, batch_size=4)
    one = score_cached(lm, exact_cache, prefix, prompts, ROWS, labels, **kw).result()
    per_token = exact_cache.data[0].numel() * 4
    tiny = score_cached(lm, exact_cache, prefix, prompts, ROWS, labels, max_past_bytes=per_token, **kw)
    assert len(tiny.parts) == 4  # one prompt a batch
    assert_scores_close(tiny.result(), one, lm)


def test_scoring_stops_between_batches_when_cancelled(lm, builder, index, exact_cache):
    prompts = [builder.assemble([index.records[r] for r in rows], q) for q, rows in zip(QUERIES, ROWS)]
    labels, prefix = [builder.label_ids(lab) for lab in index.labels], lm.compute_prefix(builder.shared_ids())
    with cancel.scope(lambda: True), pytest.raises(cancel.Cancelled):
        score_cached(lm, exact_cache, prefix, prompts, ROWS, labels, budgets=[10_000] * 4, answer=2)


@pytest.fixture(scope="module")
def engine(lm, index, builder):
    return Engine.from_parts(EngineSpec(index="tiny"), index, get_embedder("hashing:64"), lm, builder.template)


def test_one_demonstration_cached_is_exact_scoring(engine, exact_cache, lm):
    """A block is exactly what the prompt holds after the prefix; with one there is nothing else."""
    engine.use_kv_cache(exact_cache)
    for k in (0, 1):
        exact = engine.classify(QUERIES, QueryOptions(k=k, batch_size=3))
        cached = engine.classify(QUERIES, QueryOptions(k=k, batch_size=3, scoring="cached"))
        assert [p.demo_ids for p in cached] == [p.demo_ids for p in exact]
        assert_scores_close([p.log_scores for p in cached], [p.log_scores for p in exact], lm)
    more = engine.classify(QUERIES, QueryOptions(k=4, scoring="cached"))
    exact = engine.classify(QUERIES, QueryOptions(k=4))
    assert np.abs(np.array([p.log_scores for p in more]) - [p.log_scores for p in exact]).max() > 1e-3  # blocks differ


def test_mixed_options_in_one_call_equal_each_alone(engine, exact_cache, lm):
    engine.use_kv_cache(exact_cache)
    opts = [QueryOptions(k=3, scoring="cached"), QueryOptions(k=3), QueryOptions(k=2, scoring="cached"),
            QueryOptions(k=0, scoring="cached")]
    mixed = engine.classify(QUERIES, opts)
    alone = [engine.classify([q], o)[0] for q, o in zip(QUERIES, opts)]
    assert_scores_close([p.log_scores for p in mixed], [p.log_scores for p in alone], lm)


def test_many_shot_keeps_every_demonstration(engine, exact_cache, builder):
    """A budget the k demonstrations overflow: exact scoring drops some, cached keeps all k."""
    engine.use_kv_cache(exact_cache)
    exact = engine.classify(QUERIES[:2], QueryOptions(k=8, budget=80))
    cached = engine.classify(QUERIES[:2], QueryOptions(k=8, budget=80, scoring="cached"))
    assert all(p.dropped > 0 and len(p.demo_ids) < 8 for p in exact)
    assert all(p.dropped == 0 and len(p.demo_ids) == 8 and p.prompt_tokens > 80 for p in cached)
    with pytest.raises(ValueError, match="the query alone needs"):
        engine.classify(QUERIES[:1], QueryOptions(k=8, budget=10, scoring="cached"))


def test_calibration_reads_the_cache_too(engine, exact_cache, lm):
    engine.use_kv_cache(exact_cache)
    for cal in ("contextual", "pmi"):
        one = engine.classify(QUERIES, QueryOptions(k=1, calibration=cal, scoring="cached"))
        ref = engine.classify(QUERIES, QueryOptions(k=1, calibration=cal))
        np.testing.assert_allclose([list(p.probs.values()) for p in one], [list(p.probs.values()) for p in ref],
                                   atol=1e-4)


def test_generation_refuses_cached_scoring(engine):
    with pytest.raises(KVCacheError, match="for classification"):
        engine.generate(["x"], QueryOptions(scoring="cached"))


# ----------------------------------------------------------------------------- keys at new positions


ROPES = [{"rope_type": "default", "rope_theta": 10000.0}, {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
         {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64, "rope_theta": 500000.0},
         {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "rope_theta": 10000.0}]


@pytest.mark.parametrize("rope", ROPES, ids=[r["rope_type"] for r in ROPES])
def test_moved_keys_equal_the_model_rotating_at_the_new_positions(tiny_tokenizer, rope):
    """Layer 0's keys depend on the tokens and their positions only: a block run at positions
    p + delta gives what its keys run at p, moved by delta, give."""
    lm = make_tiny_lm(tiny_tokenizer, rope_parameters=rope, max_position_embeddings=4096)
    ids = tiny_tokenizer("the movie was great and the acting was wonderful")["input_ids"]
    n = len(ids)

    def keys_at(start):  # layer 0's keys [1, H, n, D] of the tokens run at positions start..start+n-1
        out = lm.model(input_ids=torch.tensor([ids]), position_ids=torch.arange(start, start + n)[None], use_cache=True)
        return out.cache.layers[0].keys

    for src, dst in ((3, 3 + 17), (40, 0), (0, 3000)):
        moved = lm.move_keys(keys_at(src), torch.arange(src, src + n), torch.arange(dst, dst + n))
        want = keys_at(dst)
        # the composed rotation rounds cos/sin products and sums and the rotation itself: a few
        # float32 roundings of each key's size (its two rotated halves)
        bound = gamma(8) * want.abs().amax(-1, keepdim=True) * 2
        assert (moved - want).abs().le(bound).all(), float(((moved - want).abs() / bound).max())


def test_keys_stay_put_when_not_moved(lm):
    k = torch.randn(2, 3, 5, 8)
    pos = torch.arange(10, 15)
    moved = lm.move_keys(k.clone(), pos, pos)
    assert (moved - k).abs().max() <= gamma(4) * float(k.abs().max())


# ----------------------------------------------------------------------------- stored formats


def test_int8_round_trip_within_half_a_step_per_token_and_head():
    x = torch.randn(50, 4, 2, 3, 64) * torch.logspace(-3, 2, 50)[:, None, None, None, None]  # scales far apart
    x[7, 1, 0, 2] = 0.0  # an all-zero vector
    q, s = encode(x, KVDType.INT8)
    assert q.dtype == torch.int8 and s.shape == x.shape[:-1]
    back = decode(q, s, KVDType.INT8)
    # q = round(fl(x/s)): |q - x/s| <= 1/2 + 127u; fl(q*s) adds |q s| u <= 127 s u
    bound = s[..., None] * (0.5 + 254 * U32)
    assert (back - x).abs().le(bound).all()
    assert (back[7, 1, 0, 2] == 0).all()


def test_bfloat16_round_trip_within_its_unit_roundoff():
    x = torch.randn(20, 3, 2, 2, 16) * 10
    q, s = encode(x, KVDType.BFLOAT16)
    assert q.dtype == torch.int16 and s is None
    assert (decode(q, s, KVDType.BFLOAT16) - x).abs().le(2.0**-8 * x.abs()).all()  # 8 significant bits


def test_cache_files_and_sizes(lm, builder, index, tmp_path):
    for dtype, itemsize in (("bfloat16", 2), ("int8", 1)):
        m = build_kv_cache(lm, builder, index, tmp_path / dtype, dtype=dtype)
        per_token = m["layers"] * 2 * m["kv_heads"] * (m["head_dim"] * itemsize + (4 if dtype == "int8" else 0))
        assert m["bytes_per_token"] == per_token and m["bytes"] == per_token * m["tokens"]
        lengths = [len(builder.demo_ids(r)) + len(builder.sep_ids) for r in index.records]
        assert m["tokens"] == sum(lengths) and m["records"] == len(index)
        cache = KVCache.load(tmp_path / dtype, lm=lm, builder=builder, index=index)
        assert cache.lengths.tolist() == lengths and isinstance(cache.data, torch.Tensor)


def test_a_new_cache_replaces_the_old(lm, builder, index, tmp_path):
    first = build_kv_cache(lm, builder, index, tmp_path / "kv", index_version="v1")["path"]
    second = build_kv_cache(lm, builder, index, tmp_path / "kv", index_version="v2")["path"]
    versions = sorted(p.name for p in (tmp_path / "kv").iterdir() if p.name.startswith("v-"))
    assert versions == [second.rsplit("/", 1)[1]] and first != second


# ----------------------------------------------------------------------------- refusals


def test_a_cache_for_another_lm_template_index_or_version_is_refused(lm, builder, index, tiny_tokenizer, tmp_path):
    build_kv_cache(lm, builder, index, tmp_path / "kv", index_version="v-1")
    load = lambda **kw: KVCache.load(tmp_path / "kv", **{"lm": lm, "builder": builder, "index": index,  # noqa: E731
                                                         "index_version": "v-1", "name": "rt", **kw})
    load()
    other_lm = make_tiny_lm(tiny_tokenizer, num_hidden_layers=3)
    other_tpl = PromptBuilder(Template(instruction="Sentiment.", input_format="Review: {input}\nSentiment:",
                                       output_format=" {output}"), lm.tokenizer, index.labels)
    more = ExampleIndex.build(Dataset("tiny", TaskKind.CLASSIFICATION, make_records(SENTIMENT_ROWS[:-1]),
                                      ("negative", "positive")), get_embedder("hashing:64"))
    renamed = make_tiny_lm(tiny_tokenizer)
    renamed.name = "another"
    for kw, what in ((dict(lm=renamed), "LM"), (dict(lm=other_lm), "LM config"), (dict(builder=other_tpl), "template"),
                     (dict(index_version="v-2"), "index version"), (dict(index=more), "number of records")):
        with pytest.raises(KVCacheError) as e:
            load(**kw)
        msg = str(e.value)
        assert "\n" not in msg and f"another {what}" in msg and msg.endswith("rebuild it with `icl index cache rt`")
    with pytest.raises(KVCacheError, match=r"has no KV cache .* build it with `icl index cache rt`"):
        KVCache.load(tmp_path / "none", lm=lm, builder=builder, index=index, name="rt")


# ----------------------------------------------------------------------------- an index on disk


@pytest.fixture
def on_disk(tmp_path, tiny_lm_dir):
    from icl_engine.apps import indexes

    root = tmp_path
    (root / "train.jsonl").write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in SENTIMENT_ROWS))
    indexes.build_index(str(root / "train.jsonl"), "rt", embedder="hashing:64", indexes_dir=root / "indexes")
    return root, PipelineConfig(index="rt", indexes_dir=str(root / "indexes"), lm=str(tiny_lm_dir), k=3)


def test_exact_predictions_do_not_change_when_a_cache_exists(on_disk):
    from icl_engine.apps import indexes

    root, config = on_disk
    before = Engine.load(config).classify(QUERIES, config.options)
    info = indexes.cache_index("rt", lm=config.lm, indexes_dir=root / "indexes", dtype="float32")
    assert info["count"] == len(SENTIMENT_ROWS) and info["bytes"] == info["tokens"] * info["bytes_per_token"]
    engine = Engine.load(config)
    after = engine.classify(QUERIES, config.options)
    assert [(p.label, p.log_scores, p.demo_ids) for p in after] == [(p.label, p.log_scores, p.demo_ids) for p in before]
    cached = engine.classify(QUERIES, config.replace(scoring="cached").options)
    assert [p.demo_ids for p in cached] == [p.demo_ids for p in before]


def test_an_engine_refuses_a_cache_of_an_older_index_version(on_disk):
    from icl_engine.apps import indexes

    root, config = on_disk
    indexes.cache_index("rt", lm=config.lm, indexes_dir=root / "indexes")
    (root / "more.jsonl").write_text(json.dumps({"text": "a moving film", "label": "positive"}) + "\n")
    indexes.add_to_index("rt", str(root / "more.jsonl"), indexes_dir=root / "indexes")
    engine = Engine.load(config)
    with pytest.raises(KVCacheError, match=r"another index version .*rebuild it with `icl index cache rt`"):
        engine.classify(QUERIES[:1], config.replace(scoring="cached").options)
    engine.classify(QUERIES[:1], config.options)  # exact scoring never reads it
    indexes.cache_index("rt", lm=config.lm, indexes_dir=root / "indexes")
    engine.classify(QUERIES[:1], config.replace(scoring="cached").options)  # the same engine reads the new one


def test_soft_prompts_refuse_cached_scoring(engine):
    with_soft = Engine.from_parts(EngineSpec(index="tiny", soft_prompt="x"), engine.index, engine.embedder, engine.lm,
                                  engine.builder.template)
    with pytest.raises(KVCacheError, match="soft prompt"):
        with_soft.classify(QUERIES[:1], QueryOptions(k=2, scoring="cached"))


@pytest.mark.slow
def test_packaged_smollm2_one_demonstration_cached_is_exact(tmp_path):
    """The real model (30 layers, 3 KV heads, RoPE base 1e5, the built-in sentiment template with
    its instruction as the prefix): with a float32 cache, one demonstration scored cached is
    exact scoring. The default bfloat16 cache then gives the float32 cache's labels at k = 4 (the
    same approximation stored at 8 significant bits; the positive probabilities here are 0.05-0.9,
    and moved by about 1e-3 when this test was written)."""
    from icl_engine.core.lm import load_lm
    from icl_engine.core.registry import SENTIMENT_TEMPLATE

    lm = load_lm()
    ds = Dataset("tiny", TaskKind.CLASSIFICATION, make_records(SENTIMENT_ROWS), ("negative", "positive"))
    index = ExampleIndex.build(ds, get_embedder("hashing:64"))
    engine = Engine.from_parts(EngineSpec(index="tiny"), index, get_embedder("hashing:64"), lm, SENTIMENT_TEMPLATE)
    build_kv_cache(lm, engine.builder, index, tmp_path / "f32", dtype="float32")
    engine.use_kv_cache(KVCache.load(tmp_path / "f32", lm=lm, builder=engine.builder, index=index))
    exact = engine.classify(QUERIES, QueryOptions(k=1))
    cached = engine.classify(QUERIES, QueryOptions(k=1, scoring="cached"))
    assert_scores_close([p.log_scores for p in cached], [p.log_scores for p in exact], lm)
    full = [p.label for p in engine.classify(QUERIES, QueryOptions(k=4, scoring="cached"))]
    build_kv_cache(lm, engine.builder, index, tmp_path / "bf16")
    engine.use_kv_cache(KVCache.load(tmp_path / "bf16", lm=lm, builder=engine.builder, index=index))
    assert [p.label for p in engine.classify(QUERIES, QueryOptions(k=4, scoring="cached"))] == full
