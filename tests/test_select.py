"""select.py against brute-force references, with a duck-typed numpy index (no faiss)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from icl_engine.core.choices import DemoOrder, SelectionMethod
from icl_engine.core.data import make_records
from icl_engine.core.select import (
    Selection,
    exclude,
    input_groups,
    label_balanced,
    mmr,
    pack,
    select_demonstrations,
    select_many,
    top_k,
)

from numerics import assert_separated, dot_tol


class FakeIndex:
    """What select.py needs of ExampleIndex: records, labels, vectors [n, d], exact search."""

    def __init__(self, records, vectors, labels=()):
        self.records, self.vectors, self.labels = tuple(records), np.asarray(vectors, np.float32), tuple(labels)
        self.searches = 0

    def search(self, qv, k):
        self.searches += 1
        sims = qv @ self.vectors.T  # [q, n]
        ids = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        scores = np.take_along_axis(sims, ids, 1)
        pad = k - ids.shape[1]  # fewer than k rows: -1 / -inf padding, as the real index does
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1).astype(np.int64)
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf).astype(np.float32)
        return scores, ids


def unit(rng, n, d=16):
    v = rng.normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture
def index():
    """40 records, labels 'neg'/'pos' alternating; dataset label order ('pos', 'neg')."""
    rng = np.random.default_rng(0)
    recs = make_records((f"text number {i}", "pos" if i % 2 else "neg") for i in range(40))
    return FakeIndex(recs, unit(rng, 40), labels=("pos", "neg"))


def query(rng, d=16):
    return unit(rng, 1, d)[0]


# ----------------------------------------------------------------------------- pure functions


def test_top_k_is_a_stable_sort():
    q = np.array([1.0, 0.0], np.float32)
    c = np.array([[0.5, 0], [0.9, 0], [0.5, 0], [0.1, 0]], np.float32)
    assert top_k(q, c, 3).tolist() == [1, 0, 2]  # tie 0/2 keeps candidate order
    assert top_k(q, c, 10).tolist() == [1, 0, 2, 3]


@pytest.mark.parametrize("seed", range(5))
def test_mmr_lambda_one_is_top_k_exactly(seed):
    rng = np.random.default_rng(seed)
    c = unit(rng, 30)
    c[10] = c[3]  # exact ties must break the same way
    q = query(rng)
    assert mmr(q, c, 12, lam=1.0).tolist() == top_k(q, c, 12).tolist()


def mmr_reference(q, c, k, lam):
    picked = []
    for _ in range(min(k, len(c))):
        best, best_gain = None, -np.inf
        for i in range(len(c)):
            if i in picked:
                continue
            red = max((float(c[i] @ c[j]) for j in picked), default=0.0)
            gain = lam * float(c[i] @ q) - (1 - lam) * red
            if gain > best_gain:
                best, best_gain = i, gain
        picked.append(best)
    return picked


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.7])
def test_mmr_matches_reference_and_diversifies(lam):
    rng = np.random.default_rng(1)
    c, q = unit(rng, 25), query(rng)
    assert mmr(q, c, 8, lam).tolist() == mmr_reference(q, c, 8, lam)
    # a near-copy of the best candidate is not picked second when diversity counts
    c2 = np.vstack([c, c[top_k(q, c, 1)]])
    assert mmr(q, c2, 2, 0.5)[1] != len(c2) - 1
    with pytest.raises(ValueError, match="mmr_lambda"):
        mmr(q, c, 3, 1.5)


def test_label_balanced_round_robin():
    labels = ["neg", "neg", "neg", "pos", "neg", "pos", "mid"]
    # round 0: pos 3, neg 0, mid 6; round 1: pos 5, neg 1; round 2: neg 2; round 3: neg 4
    assert label_balanced(labels, ("pos", "neg", "mid"), 10).tolist() == [3, 0, 6, 5, 1, 2, 4]
    assert label_balanced(labels, ("pos", "neg", "mid"), 4).tolist() == [3, 0, 6, 5]
    assert label_balanced(labels, ("neg",), 3).tolist() == [0, 3, 6]  # unknown labels follow


def test_exclude_own_id_query_text_and_repeats():
    texts = ["a  film", "the query", "a film", "other", "b"]
    ids = ["r0", "r1", "r2", "r3", "own"]
    keep = exclude(texts, ids, exclude_id="own", query_text="the query\n")
    assert keep.tolist() == [0, 3]  # the query copy, the later "a film" (whitespace) and own id go
    assert exclude(texts, ids).tolist() == [0, 1, 3, 4]


def pack_reference(lengths, budget, k):
    fits = [i for i, n in enumerate(lengths) if n <= budget]
    kept, used = [], 0
    for i in fits[:k]:
        if used + lengths[i] > budget:
            break
        kept.append(i)
        used += lengths[i]
    return kept


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 60), max_size=25), st.integers(0, 150), st.integers(0, 12))
def test_pack_never_exceeds_budget_and_keeps_the_most_similar(lengths, budget, k):
    kept, skipped = pack(lengths, budget, k)
    assert sum(lengths[i] for i in kept) <= budget
    assert len(kept) <= k
    if k > 0 and lengths and lengths[0] <= budget:
        assert kept[0] == 0  # the most similar is kept whenever it fits at all
    assert all(lengths[i] > budget for i in skipped)  # only demos too long alone are skipped
    assert not set(kept.tolist()) & set(skipped.tolist())
    assert kept.tolist() == pack_reference(lengths, budget, k)  # a relevance-order prefix


# ----------------------------------------------------------------------------- entry points


def test_zero_and_k0_give_no_demos(index):
    q = query(np.random.default_rng(2))
    for sel in (select_demonstrations(index, q, method="zero", k=4), select_demonstrations(index, q, k=0)):
        assert len(sel) == 0 and sel.ids.dtype == np.int64 and sel.scores.dtype == np.float32


def test_knn_is_brute_force_top_k_in_prompt_order(index):
    q = query(np.random.default_rng(3))
    assert_separated(index.vectors.astype(np.float64) @ q, len(q))
    best = top_k(q, index.vectors, 5)
    sel = select_demonstrations(index, q, k=5)  # nearest_last
    assert sel.ids.tolist() == best[::-1].tolist()
    np.testing.assert_allclose(sel.scores, index.vectors[sel.ids] @ q, atol=dot_tol(len(q)))
    first = select_demonstrations(index, q, k=5, order=DemoOrder.NEAREST_FIRST)
    assert first.ids.tolist() == best.tolist()
    shuffled = select_demonstrations(index, q, k=5, order="random", seed=1)
    assert sorted(shuffled.ids.tolist()) == sorted(best.tolist())
    assert shuffled.ids.tolist() == select_demonstrations(index, q, k=5, order="random", seed=1).ids.tolist()


def test_mmr_lambda_one_selects_like_knn(index):
    rng = np.random.default_rng(4)
    for _ in range(5):
        q = query(rng)
        knn = select_demonstrations(index, q, method="knn", k=6)
        m = select_demonstrations(index, q, method="mmr", k=6, mmr_lambda=1.0)
        assert m.ids.tolist() == knn.ids.tolist()
        np.testing.assert_array_equal(m.scores, knn.scores)


def test_leave_one_out_and_duplicates(index):
    recs = list(index.records)
    recs[7] = make_records([(recs[3].input, "neg")])[0]  # same text as record 3, other label
    idx = FakeIndex(recs, index.vectors, index.labels)
    idx.vectors[7] = idx.vectors[3]
    q = idx.vectors[3]  # the query is record 3 itself
    sel = select_demonstrations(idx, q, k=10, exclude_id=recs[3].id)
    assert 3 not in sel.ids  # own id
    assert 7 in sel.ids  # its text twin stays when only the id is excluded...
    sel = select_demonstrations(idx, q, k=10, exclude_id=recs[3].id, query_text=recs[3].input)
    assert 3 not in sel.ids and 7 not in sel.ids  # ...but not as a copy of the query text
    assert len(sel) == 10  # the fetch had room for what was excluded
    sel = select_demonstrations(idx, q, k=10)  # twins: only the first (most similar) is kept
    assert len({3, 7} & set(sel.ids.tolist())) == 1


@pytest.mark.parametrize("k, want", [(6, {"pos": 3, "neg": 3}), (5, {"pos": 3, "neg": 2}), (1, {"pos": 1})])
def test_balanced_counts(index, k, want):
    rng = np.random.default_rng(5)
    for _ in range(3):
        sel = select_demonstrations(index, query(rng), method="balanced", k=k)
        got = {}
        for i in sel.ids:
            got[index.records[i].output] = got.get(index.records[i].output, 0) + 1
        assert got == want  # the first label in the dataset's order gets the remainder


def test_balanced_needs_labels(index):
    idx = FakeIndex(index.records, index.vectors, labels=())
    with pytest.raises(ValueError, match="balanced"):
        select_demonstrations(idx, index.vectors[0], method="balanced", k=2)


def test_random_is_seeded_reproducible_and_excludes_the_query(index):
    q, own = index.vectors[4], index.records[4]
    kw = dict(method=SelectionMethod.RANDOM, k=8, exclude_id=own.id, query_text=own.input)
    a = [select_demonstrations(index, q, seed=s, **kw).ids.tolist() for s in range(20)]
    assert a == [select_demonstrations(index, q, seed=s, **kw).ids.tolist() for s in range(20)]
    assert len({tuple(sorted(x)) for x in a}) > 15  # different seeds, different draws
    assert all(4 not in x and len(set(x)) == 8 for x in a)
    sel = select_demonstrations(index, q, seed=3, **kw)
    np.testing.assert_allclose(sel.scores, index.vectors[sel.ids] @ q, atol=dot_tol(len(q)))


def test_budget_skips_too_long_demo_and_fills_the_hole(index):
    q = query(np.random.default_rng(6))
    assert_separated(index.vectors.astype(np.float64) @ q, len(q))
    best = top_k(q, index.vectors, 12).tolist()
    lengths = {i: 10 for i in range(len(index.records))}
    lengths[best[0]] = 500  # the most similar cannot fit at all
    lengths[best[2]] = 25

    def demo_lengths(rows):
        return [lengths[r] for r in rows]

    sel = select_demonstrations(index, q, k=4, budget=100, demo_lengths=demo_lengths, order="nearest_first")
    assert sel.skipped == (best[0],)
    assert sel.ids.tolist() == [best[1], best[2], best[3], best[4]]  # the hole is filled
    assert sel.dropped == 0
    sel = select_demonstrations(index, q, k=4, budget=40, demo_lengths=demo_lengths, order="nearest_first")
    assert sel.ids.tolist() == [best[1], best[2]]  # 10 + 25 fit; the next 10 would not
    assert sel.dropped == 2 and sum(lengths[i] for i in sel.ids) <= 40
    assert len(select_demonstrations(index, q, k=4, budget=-1, demo_lengths=demo_lengths)) == 0
    with pytest.raises(ValueError, match="demo_lengths"):
        select_demonstrations(index, q, k=4, budget=40)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31), st.integers(0, 200), st.integers(1, 8), st.sampled_from(list(SelectionMethod)))
def test_selection_never_exceeds_budget(seed, budget, k, method):
    rng = np.random.default_rng(seed)
    recs = make_records((f"t{i}", "ab"[i % 2]) for i in range(30))
    idx = FakeIndex(recs, unit(rng, 30), labels=("a", "b"))
    lengths = rng.integers(1, 60, size=30)
    q = query(rng)
    sel = select_demonstrations(idx, q, method=method, k=k, budget=budget,
                                demo_lengths=lambda rows: [int(lengths[r]) for r in rows])
    assert int(lengths[sel.ids].sum()) <= budget and len(sel) <= k
    if method is SelectionMethod.KNN and lengths[top_k(q, idx.vectors, 1)[0]] <= budget:
        assert sel.ids[-1] == top_k(q, idx.vectors, 1)[0]  # most similar kept, nearest the query


def test_select_many_is_one_search_and_matches_single_queries(index):
    rng = np.random.default_rng(7)
    qv = unit(rng, 4)
    texts = ["a", "b", "c", "d"]
    for method in ("knn", "mmr", "balanced", "random"):
        index.searches = 0
        many = select_many(index, qv, method=method, k=3, query_texts=texts, budgets=[50, None, 30, 5],
                           demo_lengths=lambda rows: [7] * len(rows))
        assert index.searches == (0 if method == "random" else 1)
        for v, t, b, sel in zip(qv, texts, [50, None, 30, 5], many):
            one = select_demonstrations(index, v, method=method, k=3, query_text=t, budget=b,
                                        demo_lengths=lambda rows: [7] * len(rows))
            assert isinstance(sel, Selection) and sel.ids.tolist() == one.ids.tolist()
    with pytest.raises(ValueError, match="budgets"):
        select_many(index, qv, budgets=[1, 2])


def test_argument_errors(index):
    q = index.vectors[0]
    with pytest.raises(ValueError, match="k must"):
        select_demonstrations(index, q, k=-1)
    with pytest.raises(ValueError, match="mmr_lambda"):
        select_demonstrations(index, q, method="mmr", mmr_lambda=2.0)
    with pytest.raises(ValueError, match="fetch_k"):
        select_demonstrations(index, q, k=5, fetch_k=2)
    with pytest.raises(ValueError):
        select_demonstrations(index, q, method="nearest")


# ----------------------------------------------------------------------------- pools with several records per input


class ReversedTies(FakeIndex):
    """Exact search that returns tied rows last-first: the engine must not depend on tie order."""

    def search(self, qv, k):
        self.searches += 1
        sims = qv @ self.vectors.T  # [q, n]
        n = sims.shape[1]
        ids = (n - 1 - np.argsort(-sims[:, ::-1], axis=1, kind="stable"))[:, :k]
        scores = np.take_along_axis(sims, ids, 1)
        pad = k - ids.shape[1]
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1).astype(np.int64)
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf).astype(np.float32)
        return scores, ids


def reference_pool(seed, n_inputs=30, max_refs=6, d=16, shuffle=False):
    """A generation pool as a list-output file gives it: each input once per reference (1 to
    max_refs, consecutive, or shuffled), every record of an input with the input's vector."""
    rng = np.random.default_rng(seed)
    refs = rng.integers(1, max_refs + 1, size=n_inputs)
    pairs = [(f"concepts {i}", f"sentence {j} about {i}") for i in range(n_inputs) for j in range(refs[i])]
    if shuffle:
        pairs = [pairs[i] for i in rng.permutation(len(pairs))]
    vecs = unit(rng, n_inputs, d)
    recs = make_records(pairs)
    return ReversedTies(recs, np.stack([vecs[int(r.input.split()[1])] for r in recs])), rng


def distinct_ranking(index, q, *, exclude_id=None, query_text=None, fetch=None):
    """Brute force: every record by similarity (ties: the earlier row), one per input (its
    first record not excluded by id), only the `fetch` most similar inputs, the query's own
    input and record left out."""
    first = {}
    for r, rec in enumerate(index.records):
        first.setdefault(rec.input, r)
    # one similarity per input: a matrix product may round identical rows differently
    sims = {inp: float(index.vectors[r] @ q) for inp, r in first.items()}
    assert_separated([index.vectors[r].astype(np.float64) @ q for r in first.values()], len(q))
    order = sorted(range(len(index.records)), key=lambda r: (-sims[index.records[r].input], r))
    seen, ranked = set(), []
    for r in order:
        rec = index.records[r]
        if rec.input in seen or rec.id == exclude_id and any(
                o.input == rec.input and o.id != exclude_id for o in index.records):
            continue  # another record of the input stands in for the excluded one
        seen.add(rec.input)
        ranked.append(r)
    ranked = ranked[:fetch]
    return [r for r in ranked if index.records[r].id != exclude_id and index.records[r].input != query_text]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("shuffle", [False, True])
def test_knn_over_references_is_k_distinct_inputs_like_brute_force(seed, shuffle):
    index, rng = reference_pool(seed, shuffle=shuffle)
    qv = unit(rng, 5)
    for k in (1, 4, 8):
        many = select_many(index, qv, k=k, order="nearest_first")
        for v, sel in zip(qv, many):
            want = distinct_ranking(index, v)[:k]
            assert sel.ids.tolist() == want and sel.short == 0
            assert len({index.records[i].input for i in sel.ids}) == k
            np.testing.assert_allclose(sel.scores, index.vectors[sel.ids] @ v, atol=dot_tol(len(v)))
    # the query is an input of the pool: never its own input, whichever of its records is excluded
    for row in rng.integers(0, len(index.records), size=6):
        own = index.records[row]
        sel = select_demonstrations(index, index.vectors[row], k=8, exclude_id=own.id, query_text=own.input,
                                    order="nearest_first")
        assert own.input not in {index.records[i].input for i in sel.ids}
        assert sel.ids.tolist() == distinct_ranking(index, index.vectors[row], exclude_id=own.id,
                                                    query_text=own.input)[:8]
        # leave-one-out by id alone: the input stays, through another of its records if it has one
        sel = select_demonstrations(index, index.vectors[row], k=8, exclude_id=own.id, order="nearest_first")
        assert sel.ids.tolist() == distinct_ranking(index, index.vectors[row], exclude_id=own.id)[:8]
        assert row not in sel.ids


@pytest.mark.parametrize("seed", range(3))
def test_mmr_and_random_over_references_pick_distinct_inputs(seed):
    index, rng = reference_pool(seed, n_inputs=60, shuffle=True)
    for q in unit(rng, 3):
        fetch = max(4 * 5, 32) + 5  # _default_fetch(mmr, 5)
        cands = distinct_ranking(index, q, fetch=fetch)
        sims = (index.vectors @ q).astype(np.float32)
        want = [cands[i] for i in mmr(q, index.vectors[cands], 5, 0.3, relevance=sims[cands])]
        sel = select_demonstrations(index, q, method="mmr", k=5, mmr_lambda=0.3)
        assert sorted(sel.ids.tolist()) == sorted(want)
        for s in range(10):
            sel = select_demonstrations(index, q, method="random", k=8, seed=s, query_text="concepts 3")
            inputs = [index.records[i].input for i in sel.ids]
            assert len(sel) == 8 and len(set(inputs)) == 8 and "concepts 3" not in inputs
            np.testing.assert_allclose(sel.scores, index.vectors[sel.ids] @ q, atol=dot_tol(len(q)))


def test_random_draws_again_when_one_input_fills_the_draw():
    # input 0 owns 200 of 210 records: the first draw (k + 8 + k records) holds few distinct inputs
    pairs = [("popular", f"ref {j}") for j in range(200)] + [(f"rare {i}", "ref") for i in range(10)]
    rng = np.random.default_rng(0)
    vecs = unit(rng, 11)
    index = FakeIndex(make_records(pairs), np.stack([vecs[0]] * 200 + list(vecs[1:])))
    for s in range(20):
        sel = select_demonstrations(index, vecs[3], method="random", k=6, seed=s)
        inputs = [index.records[i].input for i in sel.ids]
        assert len(sel) == 6 and len(set(inputs)) == 6 and sel.short == 0
        assert sel.ids.tolist() == select_demonstrations(index, vecs[3], method="random", k=6, seed=s).ids.tolist()
    sel = select_demonstrations(index, vecs[3], method="random", k=20, seed=0)
    assert len(sel) == 11 and sel.short == 9  # the whole pool holds 11 inputs


def test_fewer_distinct_inputs_than_k_is_reported_not_silent():
    index, rng = reference_pool(0, n_inputs=5)
    q = unit(rng, 1)[0]
    for method in ("knn", "mmr", "random"):
        sel = select_demonstrations(index, q, method=method, k=8)
        assert len(sel) == 5 and sel.short == 3
        assert len({index.records[i].input for i in sel.ids}) == 5
        own = index.records[0]
        sel = select_demonstrations(index, q, method=method, k=8, query_text=own.input, budget=10_000,
                                    demo_lengths=lambda rows: [1] * len(rows))
        assert len(sel) == 4 and sel.short == 4 and sel.dropped == 0
    assert select_demonstrations(FakeIndex([], np.zeros((0, 16))), q, k=3).short == 3
    assert select_demonstrations(index, q, method="zero", k=3).short == 0


def test_a_window_with_too_few_inputs_grows():
    # 40 inputs; the 3 nearest own 30 records each: the first window (~k+8+k inputs' worth) must grow
    rng = np.random.default_rng(1)
    vecs = unit(rng, 40)
    q = vecs[0]
    near = np.argsort(-(vecs @ q))[:3]
    pairs = [(f"in {i}", f"ref {j}") for i in range(40) for j in range(30 if i in near else 1)]
    recs = make_records(pairs)
    index = FakeIndex(recs, np.stack([vecs[int(r.input.split()[1])] for r in recs]))
    sel = select_demonstrations(index, q, k=8, order="nearest_first")
    assert sel.ids.tolist() == distinct_ranking(index, q)[:8] and index.searches > 1
    index.searches = 0
    [a, b] = select_many(index, np.stack([q, vecs[5]]), k=8)  # one search, plus more for the query that needs them
    assert index.searches <= 3 and len(a) == len(b) == 8


def test_input_groups_follow_the_records():
    recs = make_records([("a", "1"), ("b", "1"), ("a", "2"), ("c", "1"), ("a", "3")])
    index = FakeIndex(recs, np.eye(5, 16))
    g = input_groups(index)
    assert g.of.tolist() == [0, 1, 0, 2, 0] and g.first.tolist() == [0, 1, 3] and g.second.tolist() == [2, -1, -1]
    assert input_groups(index) is g  # cached
    assert g.representatives(np.array([4, 1, 2]), recs).tolist() == [0, 1, 0]
    assert g.representatives(np.array([4, 1]), recs, exclude_id=recs[0].id).tolist() == [2, 1]
    index.records = recs[:2]
    assert input_groups(index).count == 2  # recomputed when the records change


def _same(a: Selection, b: Selection) -> bool:
    return (a.ids.tolist() == b.ids.tolist() and np.array_equal(a.scores, b.scores) and a.skipped == b.skipped
            and a.dropped == b.dropped and a.short == b.short and a.ids.dtype == b.ids.dtype == np.int64
            and a.scores.dtype == b.scores.dtype == np.float32)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 9), order=st.sampled_from(list(DemoOrder)),
       refs=st.booleans(), fetch_k=st.sampled_from([None, 12, 30]))
def test_vectorized_knn_equals_query_by_query(seed, k, order, refs, fetch_k):
    """The batched kNN path (array operations for all queries) against the per-query reference:
    same ids, scores, skipped, dropped and short, over pools with repeated inputs, texts equal up
    to whitespace, queries that copy a pool text, own ids to leave out, and budgets from none to
    negative."""
    if fetch_k is not None and fetch_k < k:
        fetch_k = None
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 40))
    words = [f"w{int(rng.integers(0, 12))}" for _ in range(n)]
    inputs = [w + (" " if rng.random() < 0.2 else "") + ("" if rng.random() < 0.5 else " x") for w in words]
    if refs:  # generation-like: several records (references) per input, sharing its vector
        inputs = [inputs[int(rng.integers(0, max(1, n // 3)))] for _ in range(n)]
    recs = make_records((t, "pos" if rng.random() < 0.5 else "neg") for t in inputs)
    base = {t: v for t, v in zip(dict.fromkeys(inputs), unit(rng, len(set(inputs))))}
    vectors = np.stack([base[t] for t in inputs])
    if rng.random() < 0.3:  # ties
        vectors = np.round(vectors, 1)
    idx = FakeIndex(recs, vectors, labels=("pos", "neg"))
    q = int(rng.integers(1, 12))
    qv = unit(rng, q)
    texts = [recs[int(rng.integers(0, n))].input if rng.random() < 0.4 else None for _ in range(q)]
    own = [recs[int(rng.integers(0, n))].id if rng.random() < 0.2 else None for _ in range(q)]
    budgets = [None if r < 0.2 else -1 if r < 0.3 else int(rng.integers(0, 60)) for r in rng.random(q)]
    table = rng.integers(1, 25, size=n)
    lengths = lambda rows: [int(table[r]) for r in rows]  # noqa: E731
    kw = dict(method="knn", k=k, budgets=budgets, demo_lengths=lengths, exclude_ids=own, query_texts=texts,
              order=order, fetch_k=fetch_k, seed=seed)
    fast, slow = select_many(idx, qv, **kw), select_many(idx, qv, vectorized=False, **kw)
    for a, b in zip(fast, slow):
        assert _same(a, b), (a, b)


def test_vectorized_knn_takes_the_batched_path(index):
    """The batch path must settle ordinary queries itself (one search, no per-query searches)."""
    rng = np.random.default_rng(3)
    qv = unit(rng, 6)
    idx = FakeIndex(index.records, index.vectors, index.labels)
    sels = select_many(idx, qv, k=4, budgets=[100] * 6, demo_lengths=lambda rows: [10] * len(rows))
    assert idx.searches == 1 and all(len(s) == 4 for s in sels)
    assert [s.ids.tolist() for s in sels] == [s.ids.tolist() for s in select_many(
        idx, qv, k=4, budgets=[100] * 6, demo_lengths=lambda rows: [10] * len(rows), vectorized=False)]
