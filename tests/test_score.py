"""One-pass label scoring == the brute-force reference; shared prefixes; calibration arithmetic."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from icl_engine.core.choices import Calibration
from icl_engine.core.lm import LM
from icl_engine.core.score import (
    MAX_PADDING,
    Prefix,
    ScoreError,
    calibrate,
    compute_prefix,
    contextual_calibrate,
    length_batches,
    next_token_logprobs,
    normalize,
    pmi,
    score_brute_force,
    score_continuations,
)

from conftest import make_tiny_lm
from numerics import assert_scores_close

# labels of 1, 3, 2 and 1 tokens: single- and multi-token paths in one call
LABELS = [[10], [20, 21, 22], [30, 31], [40]]


@pytest.fixture(scope="module")
def lm(tiny_tokenizer) -> LM:
    return make_tiny_lm(tiny_tokenizer)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [[int(x) for x in rng.integers(3, 300, size=n)] for n in (5, 1, 12, 7, 3, 20, 9)]


def test_tiny_model_is_not_degenerate(lm, prompts):
    lp = next_token_logprobs(lm, prompts)
    assert lp.std(axis=1).min() > 0.5  # far from uniform, so the equalities below mean something
    s = score_continuations(lm, prompts, LABELS)
    assert np.ptp(s[:, 0]) > 0.5  # and the prompt matters


@pytest.mark.parametrize("batch_size", [1, 3, 8])
@pytest.mark.parametrize("bucket", [True, False])
def test_matches_brute_force(lm, prompts, batch_size, bucket):
    ref = score_brute_force(lm, prompts, LABELS)
    got = score_continuations(lm, prompts, LABELS, batch_size=batch_size, bucket=bucket)
    assert got.dtype == np.float64 and got.shape == (len(prompts), len(LABELS))
    assert_scores_close(got, ref, lm)


@pytest.mark.parametrize("seed", range(20))
def test_length_buckets_cut_where_padding_or_size_says(seed):
    # brute-force check of the definition: every prompt once; sorted by length; batches of at most
    # batch_size rows; a batch of several rows pads at most MAX_PADDING of its positions; and each
    # batch ends only where taking the next prompt would break one of those two limits
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0 if seed % 5 == 0 else 1, 400, size=int(rng.integers(0, 60)))
    prompts = [[1] * int(n) for n in lengths]
    size = int(rng.integers(1, 12))
    got = length_batches(prompts, size, True)
    flat = [i for b in got for i in b]
    assert sorted(flat) == list(range(len(prompts)))
    assert [len(prompts[i]) for i in flat] == sorted(lengths.tolist())

    def pads(batch):  # padded positions, and positions in all
        longest = max(len(prompts[i]) for i in batch)
        return len(batch) * longest - sum(len(prompts[i]) for i in batch), len(batch) * longest

    for b in got:
        waste, total = pads(b)
        assert 1 <= len(b) <= size and (len(b) == 1 or waste <= MAX_PADDING * total)
    for b, nxt in itertools.pairwise(got):
        waste, total = pads(b + nxt[:1])
        assert len(b) == size or waste > MAX_PADDING * total


def test_length_buckets_without_bucketing_keep_order():
    prompts = [[1] * n for n in (300, 2, 150, 9, 40)]
    assert length_batches(prompts, 2, False) == [[0, 1], [2, 3], [4]]
    assert length_batches([[1] * 100] * 5, 2, True) == [[0, 1], [2, 3], [4]]  # equal lengths: size alone


def test_padded_batch_equals_one_by_one(lm, prompts):
    batched = score_continuations(lm, prompts, LABELS, batch_size=len(prompts), bucket=False)
    single = np.vstack([score_continuations(lm, [p], LABELS) for p in prompts])
    assert_scores_close(batched, single, lm)


def test_length_normalize(lm, prompts):
    s = score_continuations(lm, prompts, LABELS)
    m = score_continuations(lm, prompts, LABELS, length_normalize=True)
    np.testing.assert_allclose(m, s / np.array([len(c) for c in LABELS]), atol=1e-9)
    assert_scores_close(score_brute_force(lm, prompts[:2], LABELS, length_normalize=True), m[:2], lm)


def test_next_token_logprobs(lm, prompts):
    lp = next_token_logprobs(lm, prompts, batch_size=3)  # [q, V]
    for p, row in zip(prompts, lp):
        with torch.no_grad():
            ref = lm.model(torch.tensor([p])).logits[0, -1].log_softmax(-1).numpy()
        assert_scores_close(row, ref, lm)
    np.testing.assert_allclose(np.exp(lp).sum(1), 1.0, atol=1e-4)


# --------------------------------------------------------------------------- prefixes

INSTR = [1, 50, 51, 52, 53]


def test_prefix_equals_concatenated_ids(lm, prompts):
    prefix = compute_prefix(lm, ids=INSTR)
    assert prefix.length == len(INSTR)
    full = score_continuations(lm, [INSTR + p for p in prompts], LABELS)
    assert_scores_close(score_continuations(lm, prompts, LABELS, prefix=prefix, batch_size=3), full, lm)
    assert_scores_close(score_brute_force(lm, prompts, LABELS, prefix=prefix), full, lm)
    assert_scores_close(next_token_logprobs(lm, prompts, prefix=prefix),
                               next_token_logprobs(lm, [INSTR + p for p in prompts]), lm)


def test_prefix_is_never_mutated(lm, prompts):
    prefix = compute_prefix(lm, ids=INSTR)
    before = [(k.clone(), v.clone()) for k, v in prefix.past_key_values]
    a = score_continuations(lm, prompts, LABELS, prefix=prefix, batch_size=4)
    b = score_continuations(lm, prompts, LABELS, prefix=prefix, batch_size=4)
    np.testing.assert_array_equal(a, b)
    assert prefix.length == len(INSTR)
    for (k, v), (k0, v0) in zip(prefix.past_key_values, before):
        assert k.shape == k0.shape and torch.equal(k, k0) and torch.equal(v, v0)


def test_empty_prompt_after_prefix(lm, prompts):
    """E.g. a PMI premise whose tokens are all in the shared prefix."""
    prefix = compute_prefix(lm, ids=INSTR)
    got = score_continuations(lm, [[]] + prompts[:3], LABELS, prefix=prefix)
    ref = score_continuations(lm, [INSTR] + [INSTR + p for p in prompts[:3]], LABELS)
    assert_scores_close(got, ref, lm)
    assert_scores_close(score_brute_force(lm, [[]], LABELS, prefix=prefix), ref[:1], lm)
    only_empty = score_continuations(lm, [[], []], LABELS, prefix=prefix)  # a batch with no prompt tokens at all
    assert_scores_close(only_empty, np.vstack([ref[:1]] * 2), lm)


def test_soft_prompt_embeds_and_chained_prefix(lm, prompts):
    """A soft prompt is just embeddings: the embeddings of real tokens must act like the tokens;
    a prefix extended by `base` must equal the whole prefix at once."""
    emb = lm.model.get_input_embeddings()(torch.tensor(INSTR[:3])).detach()  # [3, H]
    want = score_continuations(lm, prompts, LABELS, prefix=compute_prefix(lm, ids=INSTR))
    by_embeds = compute_prefix(lm, ids=INSTR[3:], embeds=emb[None])
    chained = compute_prefix(lm, ids=INSTR[3:], base=compute_prefix(lm, ids=INSTR[:3]))
    for prefix in (by_embeds, chained):
        assert prefix.length == len(INSTR)
        assert_scores_close(score_continuations(lm, prompts, LABELS, prefix=prefix), want, lm)


def test_prefix_from_raw_key_values(lm, prompts):
    """Prefix tuning hands over per-layer key/values (DynamicCache or legacy tuple)."""
    computed = compute_prefix(lm, ids=INSTR)
    want = score_continuations(lm, prompts, LABELS, prefix=computed)
    legacy = tuple((k.clone(), v.clone()) for k, v in computed.past_key_values)
    for kv in (legacy, computed.cache(1)):
        prefix = Prefix(kv)
        assert prefix.length == len(INSTR) and prefix.logprobs is None
        assert_scores_close(score_continuations(lm, prompts, LABELS, prefix=prefix), want, lm)
    with pytest.raises(ScoreError, match="empty"):  # nothing predicts the first label token
        score_continuations(lm, [[]], LABELS, prefix=Prefix(legacy))
    with pytest.raises(ValueError, match="length"):
        Prefix(legacy, length=3)
    with pytest.raises(ValueError, match="past_key_values"):
        Prefix(tuple((k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1)) for k, v in legacy))


# --------------------------------------------------------------------------- other architectures


@pytest.mark.parametrize("cfg", [
    dict(num_attention_heads=4, num_key_value_heads=1),  # multi-query
    dict(num_attention_heads=4, num_key_value_heads=4, attn_implementation="eager"),  # MHA, eager masks
    dict(num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=3, tie_word_embeddings=False),
])
def test_other_configs_match_brute_force(tiny_tokenizer, prompts, cfg):
    lm = make_tiny_lm(tiny_tokenizer, seed=1, **cfg)
    ps = prompts[:4]
    prefix = compute_prefix(lm, ids=INSTR)
    assert_scores_close(score_continuations(lm, ps, LABELS, batch_size=4),
                               score_brute_force(lm, ps, LABELS), lm)
    assert_scores_close(score_continuations(lm, ps, LABELS, prefix=prefix, batch_size=4),
                               score_brute_force(lm, [INSTR + p for p in ps], LABELS), lm)


def test_input_errors(lm):
    with pytest.raises(ScoreError, match="continuation 1 is empty"):
        score_continuations(lm, [[1, 2]], [[3], []])
    with pytest.raises(ScoreError, match="prompt 1 is empty"):
        score_continuations(lm, [[1, 2], []], [[3]])
    with pytest.raises(ScoreError, match="vocabulary"):
        score_continuations(lm, [[1, 10_000]], [[3]])
    with pytest.raises(ScoreError, match="token ids"):
        score_continuations(lm, ["some text"], [[3]])
    with pytest.raises(ScoreError, match="no continuations"):
        score_continuations(lm, [[1]], [])


# --------------------------------------------------------------------------- calibration


def test_normalize_by_hand():
    out = normalize(np.log([[1.0, 3.0], [2.0, 2.0]]) + 7.0)  # any shift cancels
    np.testing.assert_allclose(np.exp(out), [[0.25, 0.75], [0.5, 0.5]])
    np.testing.assert_allclose(np.exp(normalize(np.array([-1000.0, -1001.0]))).sum(), 1.0)  # no underflow


def test_contextual_calibration_by_hand():
    p = np.array([[0.6, 0.4], [0.9, 0.1]])
    p_cf = np.array([0.8, 0.2])  # the model leans to label 0 with no content
    # row 0: p / p_cf = [0.75, 2.0] -> [0.75, 2.0] / 2.75
    want = np.array([[0.75 / 2.75, 2.0 / 2.75], [1.125 / 1.625, 0.5 / 1.625]])
    np.testing.assert_allclose(np.exp(contextual_calibrate(np.log(p), np.log(p_cf))), want)
    # scores need not be normalised and p_cf may be given per query
    got = contextual_calibrate(np.log(p) - 3.0, np.log(np.tile(p_cf * 0.5, (2, 1))))
    np.testing.assert_allclose(np.exp(got), want)
    np.testing.assert_allclose(np.exp(calibrate("contextual", np.log(p), np.log(p_cf))), want)


def test_pmi_by_hand():
    cond = np.log([[0.5, 0.25]])
    premise = np.log([0.25, 0.5])  # label 1 is a priori likely, so it earns less credit
    np.testing.assert_allclose(pmi(cond, premise), np.log([[2.0, 0.5]]))
    np.testing.assert_allclose(np.exp(calibrate(Calibration.PMI, cond, premise[None])), [[0.8, 0.2]])
    np.testing.assert_allclose(np.exp(calibrate("none", cond)), [[2 / 3, 1 / 3]])
    with pytest.raises(ValueError, match="reference"):
        calibrate("pmi", cond)
    assert [c.value for c in Calibration] == ["none", "contextual", "pmi"]


def test_left_pad_equals_python_lists():
    from icl_engine.core.backends.hf import left_pad

    rows = [[5, 6, 7], [], [9], [1, 2, 3, 4]]
    ids, mask = left_pad(rows, 0)
    assert ids.tolist() == [[0] * (4 - len(r)) + r for r in rows]
    assert mask.tolist() == [[0] * (4 - len(r)) + [1] * len(r) for r in rows]
    assert ids.dtype == mask.dtype == np.int64
    ids, mask = left_pad([[]], 3)
    assert ids.shape == mask.shape == (1, 0)
