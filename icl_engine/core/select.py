"""Stage 4: choose the demonstrations for a query.

Everything here is a pure function over arrays, except `select_many`/`select_demonstrations`,
which call `index.search` once and then only slice arrays. Token lengths come from the prompt
stage through a `demo_lengths(row_ids) -> list[int]` callable (exact counts with the target
LM's tokenizer), so this module never formats or tokenises anything.

Flow for one query:
  candidates   search in similarity order until they hold fetch_k distinct inputs, each input
               standing for one record, its first (a generation pool holds one record per
               reference, all with the input's vector); or a seeded random draw of records
  exclude      drop the query's own record, copies of its text, repeated candidate texts
  rank         relevance order: search order (knn), pick order (mmr), round-robin (balanced)
  pack         keep a relevance-order prefix that fits the budget; skip demos too long alone
  order        arrange the kept demos for the prompt (default: most similar nearest the query)
"""

from __future__ import annotations

import hashlib
import math
import weakref
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .choices import DemoOrder, SelectionMethod

__all__ = [
    "Selection",
    "InputGroups",
    "input_groups",
    "top_k",
    "mmr",
    "label_balanced",
    "exclude",
    "pack",
    "select_demonstrations",
    "select_many",
    "normalized_texts",
    "pack_many",
]

DemoLengths = Callable[[Sequence[int]], Sequence[int]]


@dataclass(frozen=True, eq=False)
class Selection:
    ids: np.ndarray  # int64 [k'] row positions into index.records, in prompt order
    scores: np.ndarray  # float32 [k'] similarity to the query, aligned with ids
    skipped: tuple[int, ...] = ()  # rows too long for the whole budget (never truncated)
    dropped: int = 0  # demos the budget cost, beyond the skipped: up to k, how many more there would be without it
    short: int = 0  # demos fewer than k because the pool has no more distinct inputs (the query's own left out)

    @classmethod
    def empty(cls, short: int = 0) -> "Selection":
        return cls(np.zeros(0, np.int64), np.zeros(0, np.float32), short=short)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True, eq=False)
class InputGroups:
    """The pool's distinct inputs. A generation pool holds one record per reference, so one
    input may own many rows (CommonGen: ~4, E2E: up to 18); demonstrations are distinct inputs."""

    of: np.ndarray  # int64 [n]: each row's input, numbered in first-seen order
    first: np.ndarray  # int64 [G]: each input's first row (all its rows share its text, so its vector)
    second: np.ndarray  # int64 [G]: its second row, -1 if none (stands in when the first is excluded by id)

    @property
    def count(self) -> int:
        return len(self.first)

    def representatives(self, rows: np.ndarray, records, exclude_id: str | None = None) -> np.ndarray:
        """rows [c] -> int64 [c]: each row's input's first row, or its second when the first
        is the record excluded by id (an input of one record keeps it: `exclude` drops it)."""
        g = self.of[rows]
        reps = self.first[g]
        if exclude_id is not None:
            own = np.fromiter((records[r].id == exclude_id for r in reps), bool, len(reps))
            reps = np.where(own & (self.second[g] >= 0), self.second[g], reps)
        return reps.astype(np.int64)


_GROUPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # index -> (its records, InputGroups)


def input_groups(index) -> InputGroups:
    """The distinct inputs of `index.records`, computed once per index (again after `add`)."""
    try:
        records, groups = _GROUPS.get(index, (None, None))
    except TypeError:  # an index object that takes no weak reference: no cache
        records = groups = None
    if records is index.records:
        return groups
    number: dict[str, int] = {}
    of = np.fromiter((number.setdefault(r.input, len(number)) for r in index.records), np.int64, len(index.records))
    first = np.full(len(number), -1, np.int64)
    second = np.full(len(number), -1, np.int64)
    for row, g in enumerate(of.tolist()):
        if first[g] < 0:
            first[g] = row
        elif second[g] < 0:
            second[g] = row
    groups = InputGroups(of, first, second)
    try:
        _GROUPS[index] = (index.records, groups)
    except TypeError:
        pass
    return groups


_TEXTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # index -> (records, numbers, lookup)


def normalized_texts(index) -> tuple[np.ndarray, dict[str, int]]:
    """Each row's input with whitespace collapsed (as `exclude` compares texts), numbered:
    (int64 [n], text -> number). Computed once per index (again after `add`)."""
    try:
        records, numbers, lookup = _TEXTS.get(index, (None, None, None))
    except TypeError:
        records = None
    if records is index.records:
        return numbers, lookup
    lookup: dict[str, int] = {}
    numbers = np.fromiter((lookup.setdefault(_norm(r.input), len(lookup)) for r in index.records), np.int64,
                          len(index.records))
    try:
        _TEXTS[index] = (index.records, numbers, lookup)
    except TypeError:
        pass
    return numbers, lookup


# ----------------------------------------------------------------------------- pure functions


def top_k(query: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
    """query [d], candidates [c, d] -> int64 [min(k, c)]: positions of the k largest inner
    products, best first; ties keep candidate order."""
    sims = candidates @ query  # [c]
    return np.argsort(-sims, kind="stable")[:k].astype(np.int64)


def mmr(query: np.ndarray, candidates: np.ndarray, k: int, lam: float = 0.5,
        relevance: np.ndarray | None = None) -> np.ndarray:
    """Maximal marginal relevance (Carbonell & Goldstein 1998): repeatedly pick the candidate
    maximising lam * sim(query, c) - (1 - lam) * max_{s picked} sim(c, s).

    query [d], candidates [c, d] (unit norm), relevance [c]: sim(query, c) if already known
    (the index's scores, so lam=1 reproduces the index's ranking exactly) -> int64
    [min(k, c)] positions in pick order. lam=1 is `top_k` exactly, ties included.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"mmr_lambda must be in [0, 1], got {lam}")
    rel = np.asarray(candidates @ query if relevance is None else relevance, np.float64)  # [c]
    k = min(k, len(rel))
    redundancy = np.zeros_like(rel)  # max sim to the picked ones; nothing picked yet: 0
    free = np.ones(len(rel), bool)
    picks: list[int] = []
    for step in range(k):
        gain = lam * rel - (1.0 - lam) * redundancy  # lam=1: exactly rel
        gain[~free] = -np.inf
        i = int(np.argmax(gain))  # first maximum: ties go to the earlier candidate, as in top_k
        picks.append(i)
        free[i] = False
        sims = np.asarray(candidates @ candidates[i], np.float64)  # [c]
        redundancy = sims if step == 0 else np.maximum(redundancy, sims)
    return np.asarray(picks, np.int64)


def label_balanced(labels: Sequence[str], label_order: Sequence[str], k: int) -> np.ndarray:
    """labels [c] of candidates in relevance order -> int64 [min(k, c)] positions: round r
    takes the r-th most relevant candidate of every label, labels in `label_order` (labels not
    in it follow, first seen first). k demos split as evenly as the candidates allow; the first
    labels get the remainder, and a label that runs out leaves its turns to the others."""
    order = list(dict.fromkeys([*label_order, *labels]))
    queues: dict[str, list[int]] = {lab: [] for lab in order}
    for i, lab in enumerate(labels):
        queues[lab].append(i)
    picks = [q[r] for r in range(max(map(len, queues.values()), default=0))
             for q in (queues[lab] for lab in order) if r < len(q)]
    return np.asarray(picks[:k], np.int64)


def _norm(text: str) -> str:
    return " ".join(text.split())


def exclude(texts: Sequence[str], record_ids: Sequence[str], *, exclude_id: str | None = None,
            query_text: str | None = None) -> np.ndarray:
    """texts [c], record_ids [c] of candidates in relevance order -> int64 [c'] positions kept:
    not the query's own record (leave-one-out by id), not a copy of the query's text, and of
    candidates with the same text only the first (most similar). Texts compare with whitespace
    collapsed, so a trailing newline does not hide a duplicate."""
    seen = set() if query_text is None else {_norm(query_text)}
    keep = []
    for i, (text, rid) in enumerate(zip(texts, record_ids)):
        t = _norm(text)
        if (exclude_id is not None and rid == exclude_id) or t in seen:
            continue
        seen.add(t)
        keep.append(i)
    return np.asarray(keep, np.int64)


def pack(lengths: Sequence[int], budget: int, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fill `budget` tokens with demos taken in relevance order, never truncating one.

    lengths [c] (relevance order) -> (kept int64 [k'], skipped int64 [s]) positions. A demo
    longer than the whole budget could never fit: it is skipped (reported) and the next one is
    tried. The first demo that fits alone but not beside those already kept ends the packing, so
    what is left out for room is always the least relevant, and the most similar demo is kept
    whenever it fits. At most k are kept.
    """
    k = len(lengths) if k is None else k
    kept: list[int] = []
    skipped: list[int] = []
    used = 0
    for i, n in enumerate(lengths):
        if len(kept) >= k:
            break
        if n > budget:
            skipped.append(i)
            continue
        if used + n > budget:
            break
        kept.append(i)
        used += n
    return np.asarray(kept, np.int64), np.asarray(skipped, np.int64)


# ----------------------------------------------------------------------------- entry points


def _rng(seed: int, query_text: str | None, qv: np.ndarray) -> np.random.Generator:
    """Seeded by (seed, query), so a query gets the same draw alone or in any batch."""
    key = query_text.encode() if query_text is not None else qv.tobytes()
    return np.random.default_rng([seed, int.from_bytes(hashlib.sha256(key).digest()[:8], "little")])


def _per_query(value, n: int, name: str) -> list:
    """None/scalar -> [value] * n; a sequence must have one entry per query."""
    if value is None or isinstance(value, (str, int, np.integer)):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"{name} has {len(value)} entries for {n} queries")
    return value


def _default_fetch(method: SelectionMethod, k: int) -> int:
    # +8: room for excluding the query's own record and duplicate texts; MMR needs a pool to
    # diversify from, balanced enough neighbours to find minority labels; +k so that packing
    # can step over demos too long for the budget without leaving a hole. Independent of the
    # budget, so a query gets the same candidates (and random draw) alone or in any batch.
    base = {SelectionMethod.MMR: max(4 * k, 32), SelectionMethod.BALANCED: max(8 * k, 64)}.get(method, k + 8)
    return base + k


def _check(index, method: SelectionMethod, k: int, budgets: list, demo_lengths, mmr_lambda: float,
           fetch_k: int | None) -> tuple[str, ...]:
    """select_many's argument checks (ValueError), before anything is searched; returns the
    index's labels (empty for generation)."""
    labels = tuple(getattr(index, "labels", ()) or ())
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if any(b is not None for b in budgets) and demo_lengths is None:
        raise ValueError("a token budget needs demo_lengths (PromptBuilder.demo_lengths)")
    if method is SelectionMethod.MMR and not 0.0 <= mmr_lambda <= 1.0:
        raise ValueError(f"mmr_lambda must be in [0, 1], got {mmr_lambda}")
    if fetch_k is not None and fetch_k < k:
        raise ValueError(f"fetch_k must be >= k ({k}), got {fetch_k}")
    if method is SelectionMethod.BALANCED and not labels:
        raise ValueError("method 'balanced' needs a classification index (this one has no labels)")
    return labels


def _window(index, groups, qv: np.ndarray, method: SelectionMethod, fetch: int, random_window: int,
            rngs: list) -> tuple[int, np.ndarray, np.ndarray]:
    """Every query's candidate rows [q, w] int64 (-1 padding) and their similarities [q, w]
    float32, with the window size w: a uniform draw for method random, else one index search."""
    n = len(index.records)
    if method is SelectionMethod.RANDOM:  # same pool, uniform over records; scores are still real similarities
        window = min(n, random_window)
        rows = np.stack([g.choice(n, size=window, replace=False) for g in rngs]).astype(np.int64)  # [q, w]
        return window, rows, np.einsum("qfd,qd->qf", index.vectors[rows], qv).astype(np.float32)
    # fetch x (records per input) rows usually hold `fetch` inputs: one search for all queries
    window = min(n, math.ceil(fetch * n / groups.count))
    scores, rows = index.search(qv, window)
    return window, rows, scores


def select_many(
    index,
    query_vectors: np.ndarray,
    *,
    method: SelectionMethod | str = SelectionMethod.KNN,
    k: int = 8,
    budgets: int | Sequence[int | None] | None = None,
    demo_lengths: DemoLengths | None = None,
    exclude_ids: Sequence[str | None] | None = None,
    query_texts: Sequence[str | None] | None = None,
    seed: int = 0,
    mmr_lambda: float = 0.5,
    fetch_k: int | None = None,
    order: DemoOrder | str = DemoOrder.NEAREST_LAST,
    vectorized: bool = True,
) -> list[Selection]:
    """Demonstrations for each of q queries with ONE `index.search` call.

    query_vectors [q, d] (unit norm, the index's embedder); budgets: demo tokens allowed per
    query (the total budget minus `PromptBuilder.reserved(query)`), None = no limit;
    demo_lengths(row_ids) gives each row's exact token cost. exclude_ids: each query's own
    record id when it comes from the pool (leave-one-out); query_texts: drop copies of the
    query. Returns one `Selection` per query. kNN is computed for all queries at once with
    array operations (`_knn_many`); a query it cannot settle (exclusions that need a wider
    search, its own record in the pool) and the other methods go query by query, as does
    everything with `vectorized=False` (the reference the tests compare against).
    """
    method, order = SelectionMethod(method), DemoOrder(order)
    # an engine resolves auto before it selects; a plain call means kNN
    method = SelectionMethod.KNN if method is SelectionMethod.AUTO else method
    qv = np.asarray(query_vectors, np.float32)
    if qv.ndim != 2:  # (before len(qv) means anything)
        raise ValueError(f"query_vectors must be [q, d], got shape {qv.shape}")
    nq, n = len(qv), len(index.records)
    budgets, exclude_ids, query_texts = (_per_query(v, nq, name) for v, name in (
        (budgets, "budgets"), (exclude_ids, "exclude_ids"), (query_texts, "query_texts")))
    labels = _check(index, method, k, budgets, demo_lengths, mmr_lambda, fetch_k)
    if method is SelectionMethod.ZERO or k == 0 or nq == 0:
        return [Selection.empty() for _ in range(nq)]
    if n == 0:
        return [Selection.empty(short=k) for _ in range(nq)]

    groups = input_groups(index)
    fetch = min(groups.count, fetch_k or _default_fetch(method, k))  # distinct inputs per query
    # a seeded generator per query only where something is drawn (seeding costs more than most draws)
    need_rng = method is SelectionMethod.RANDOM or order is DemoOrder.RANDOM
    rngs = [_rng(seed, t, v) if need_rng else None for t, v in zip(query_texts, qv)]
    window, rows, scores = _window(index, groups, qv, method, fetch, fetch_k or _default_fetch(method, k), rngs)

    out: list[Selection | None] = [None] * nq
    if vectorized and method is SelectionMethod.KNN:  # the common case, for all queries at once
        out = _knn_many(index, groups, rows, scores, fetch, k, budgets, demo_lengths, exclude_ids, query_texts,
                        order, rngs)
    for i in range(nq):  # what _knn_many left, and every query of the other methods
        if out[i] is None:
            rows_i, scores_i = _candidates_alone(index, groups, method, qv[i], (rows[i], scores[i]), window, fetch, k,
                                                 exclude_ids[i], query_texts[i], seed)
            out[i] = _select_one(index, qv[i], rows_i, scores_i, method, k, budgets[i], demo_lengths, mmr_lambda,
                                 order, labels, rngs[i])
    return out


def _candidates_alone(index, groups, method: SelectionMethod, q: np.ndarray, window_rows: tuple, window: int,
                      fetch: int, k: int, exclude_id: str | None, query_text: str | None,
                      seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One query's candidate rows and similarities from its share of the shared window
    (rows [w], scores [w]), searching wider for this query alone where the window falls short."""

    def wider(size: int) -> tuple[np.ndarray, np.ndarray]:
        return _fetch_one(index, method, q, _rng(seed, query_text, q), size)

    window_i = (np.asarray(window_rows[0], np.int64), np.asarray(window_rows[1], np.float32))
    if method is SelectionMethod.RANDOM:
        return _drawn(index, window_i, wider, window, k, exclude_id, query_text)
    return _candidates(index, groups, window_i, wider, window, fetch, k, exclude_id, query_text)


def _earlier_equal(x: np.ndarray, among: np.ndarray) -> np.ndarray:
    """x [q, w], among [q, w] bool -> [q, w] bool: some earlier position of the same row that is
    in `among` holds the same value."""
    eq = (x[:, :, None] == x[:, None, :]) & among[:, None, :]  # [q, w, w]: a equals an earlier b
    return np.tril(eq, -1).any(2)


def _knn_many(index, groups: InputGroups, rows, scores, fetch: int, k: int, budgets, demo_lengths, exclude_ids,
              query_texts, order: DemoOrder, rngs) -> list[Selection | None]:
    """kNN for a batch: what `_candidates` + `_select_one` give query by query, as array
    operations over the batched search's window (rows, scores [q, w]). None for a query whose
    window holds too few inputs, or whose exclusions leave fewer than k while the pool has
    more, or with its own record id to leave out: the per-query path handles those."""
    rows, scores = np.asarray(rows, np.int64), np.asarray(scores, np.float32)  # [q, w]
    nq, w = rows.shape
    ok = (rows >= 0).all(1) & np.fromiter((e is None for e in exclude_ids), bool, nq)
    g = groups.of[np.maximum(rows, 0)]  # [q, w] each row's input
    first = ~_earlier_equal(g, np.ones_like(rows, bool))  # the first row of each input, window order
    ok &= first.sum(1) >= fetch
    cand = first & (np.cumsum(first, 1) <= fetch)  # the `fetch` most similar inputs
    reps = groups.first[g]  # [q, w] each input stands as its first row
    norm, number = normalized_texts(index)
    text = norm[reps]  # [q, w] whitespace-collapsed text number of each candidate
    qtext = np.fromiter((-1 if t is None else number.get(_norm(t), -1) for t in query_texts), np.int64, nq)
    keep = cand & (text != qtext[:, None]) & ~_earlier_equal(text, cand)  # `exclude`, for all rows
    ok &= (keep.sum(1) >= k) | (fetch >= groups.count)

    # the kept candidates of each query, left-aligned in relevance order: [q, c]
    at = np.argsort(~keep, axis=1, kind="stable")
    c = int(keep.sum(1).max(initial=0))
    crow = np.take_along_axis(reps, at, 1)[:, :c]
    cscore = np.take_along_axis(scores, at, 1)[:, :c]
    valid = np.take_along_axis(keep, at, 1)[:, :c]
    nvalid = valid.sum(1)
    big = np.iinfo(np.int64).max // 4
    budget = np.fromiter((big if b is None else b for b in budgets), np.int64, nq)  # None: no limit
    lengths = np.zeros((nq, c), np.int64)
    use = valid & ok[:, None] & (budget >= 0)[:, None]
    if demo_lengths is not None and use.any():
        got = np.asarray(demo_lengths(crow[use].tolist()), np.int64)
        if got.shape != (int(use.sum()),):
            raise ValueError(f"demo_lengths returned {got.shape[0]} lengths for {int(use.sum())} rows")
        lengths[use] = got
    kept, skipped, dropped = pack_many(lengths, valid, budget, k)

    # prompt order: most similar first (stable), reversed for nearest_last, or shuffled
    key = np.where(kept, -cscore, np.inf)
    rank = np.argsort(key, axis=1, kind="stable")
    nkept = kept.sum(1)
    out: list[Selection | None] = [None] * nq
    for i in np.flatnonzero(ok).tolist():
        if budget[i] < 0:  # the query alone does not fit: no demos; assemble() reports it
            out[i] = Selection.empty()
            continue
        n = int(nkept[i])
        if order is DemoOrder.RANDOM:
            pick = np.flatnonzero(kept[i])[rngs[i].permutation(n)]
        else:
            pick = rank[i, :n] if order is DemoOrder.NEAREST_FIRST else rank[i, :n][::-1]
        out[i] = Selection(crow[i, pick], cscore[i, pick], tuple(crow[i, skipped[i]].tolist()), int(dropped[i]),
                           max(0, k - int(nvalid[i])))
    return out


def pack_many(lengths: np.ndarray, valid: np.ndarray, budget: np.ndarray, k: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`pack` for a batch. lengths [q, c] int64 (relevance order), valid [q, c] bool (the
    candidates), budget [q] int64 -> (kept [q, c] bool, skipped [q, c] bool, dropped [q] int64),
    exactly as `pack` row by row and `_select_one`'s count of dropped demos."""
    B = budget[:, None]
    alone = valid & (lengths <= B)  # could fit on its own
    fits = alone & (np.cumsum(np.where(alone, lengths, 0), 1) <= B)  # before the first that overflows
    kept = fits & (np.cumsum(fits, 1) <= k)
    # pack stops at the first overflow or once k are kept: long demos after that are not reported
    pos = np.arange(lengths.shape[1])
    c = lengths.shape[1]
    overflow = np.where(alone & ~fits, pos, c).min(1, initial=c)
    kth = np.where(kept & (np.cumsum(kept, 1) == k), pos + 1, c).min(1, initial=c)
    skipped = valid & ~alone & (pos < np.minimum(overflow, kth)[:, None])
    dropped = np.minimum(k, valid.sum(1) - skipped.sum(1)) - kept.sum(1)
    return kept, skipped, dropped


def _fetch_one(index, method: SelectionMethod, q: np.ndarray, rng: np.random.Generator,
               size: int) -> tuple[np.ndarray, np.ndarray]:
    """A wider window for one query [d]: (rows [size], scores [size]) by search, or a larger
    draw (the same seeded generator, so it is reproducible)."""
    if method is SelectionMethod.RANDOM:
        rows = rng.choice(len(index.records), size=size, replace=False).astype(np.int64)
        return rows, (index.vectors[rows] @ q).astype(np.float32)
    scores, rows = index.search(q[None], size)  # [1, size]
    return np.asarray(rows[0], np.int64), np.asarray(scores[0], np.float32)


def _drawn(index, first, wider, window: int, k: int, exclude_id, query_text) -> tuple[np.ndarray, np.ndarray]:
    """Random: the draw (rows [w], scores [w]) in draw order, less the query's own record and
    copies of its text, one record per input (`exclude` keeps an input's first drawn record, one
    of its references); drawn again, larger, when that leaves fewer than k."""
    rows, scores = first
    while True:
        keep = exclude([index.records[r].input for r in rows], [index.records[r].id for r in rows],
                       exclude_id=exclude_id, query_text=query_text)
        if len(keep) >= k or window >= len(index.records):
            return rows[keep], scores[keep]
        window = min(len(index.records), 4 * window)
        rows, scores = wider(window)


def _candidates(index, groups: InputGroups, first, wider, window: int, fetch: int, k: int,
                exclude_id, query_text) -> tuple[np.ndarray, np.ndarray]:
    """kNN, MMR, balanced: (rows [c], scores [c]) in similarity order: the `fetch` most similar
    distinct inputs, one record each (`InputGroups.representatives`), less the query's own
    record and copies of its text. `first` is this query's window [w] from the batched search; a
    window holding fewer inputs than needed (many references per input, or exclusions leaving
    fewer than k) grows, wider(size), up to the whole pool."""
    limit = len(index.records)
    rows, scores = first
    target = fetch
    while True:
        valid = rows >= 0
        rows, scores = rows[valid], scores[valid]
        _, seen_at = np.unique(groups.of[rows], return_index=True)
        seen_at.sort()  # [have] window position of each input's first row, in window order
        have = len(seen_at)
        while True:
            at = seen_at[:target]
            reps = groups.representatives(rows[at], index.records, exclude_id)
            keep = exclude([index.records[r].input for r in reps], [index.records[r].id for r in reps],
                           exclude_id=exclude_id, query_text=query_text)
            if len(keep) >= k or target >= groups.count:
                break
            target = min(groups.count, target + k - len(keep))  # exclusions took some: look further
            if have < target:
                break
        if have >= target or window >= limit:
            return reps[keep], scores[at][keep]
        window = min(limit, 4 * window)
        rows, scores = wider(window)


def _select_one(index, q, rows, scores, method, k, budget, demo_lengths, lam, order, labels, rng) -> Selection:
    """rows [c], scores [c]: one query's candidates (`_candidates`), in similarity (or draw) order."""
    recs = index.records
    short = max(0, k - len(rows))  # the pool has no more distinct inputs: said, never silent

    # relevance order; with a budget every candidate is ranked, so packing can step past long ones
    m = len(rows) if budget is not None else k
    if method is SelectionMethod.MMR:
        pick = mmr(q, index.vectors[rows], m, lam, relevance=scores)
    elif method is SelectionMethod.BALANCED:
        pick = label_balanced([recs[r].output for r in rows], labels, m)
    else:
        pick = np.arange(min(m, len(rows)))
    rows, scores = rows[pick], scores[pick]

    skipped, dropped = (), 0
    if budget is None:
        rows, scores = rows[:k], scores[:k]
    elif budget < 0:  # the query alone does not fit: no demos; assemble() reports it
        return Selection.empty()
    else:
        lengths = np.asarray(demo_lengths(rows.tolist()), np.int64)
        if lengths.shape != rows.shape:
            raise ValueError(f"demo_lengths returned {lengths.shape[0]} lengths for {len(rows)} rows")
        kept, skip = pack(lengths, budget, k)
        skipped = tuple(int(r) for r in rows[skip])
        # without a budget the k best of the candidates not skipped would have been kept
        dropped = min(k, len(rows) - len(skip)) - len(kept)
        rows, scores = rows[kept], scores[kept]

    rank = np.argsort(-scores, kind="stable")  # most similar first
    if order is DemoOrder.NEAREST_LAST:
        rank = rank[::-1]
    elif order is DemoOrder.RANDOM:
        rank = rng.permutation(len(rows))
    return Selection(rows[rank].astype(np.int64), scores[rank].astype(np.float32), skipped, dropped, short)


def select_demonstrations(
    index,
    query_vector: np.ndarray,
    *,
    method: SelectionMethod | str = SelectionMethod.KNN,
    k: int = 8,
    budget: int | None = None,
    demo_lengths: DemoLengths | None = None,
    exclude_id: str | None = None,
    query_text: str | None = None,
    seed: int = 0,
    mmr_lambda: float = 0.5,
    fetch_k: int | None = None,
    order: DemoOrder | str = DemoOrder.NEAREST_LAST,
) -> Selection:
    """The demonstrations for one query: query_vector [d]. See `select_many`."""
    qv = np.asarray(query_vector, np.float32).reshape(1, -1)  # [1, d]
    [sel] = select_many(
        index, qv, method=method, k=k, budgets=[budget], demo_lengths=demo_lengths,
        exclude_ids=[exclude_id], query_texts=[query_text], seed=seed, mmr_lambda=mmr_lambda,
        fetch_k=fetch_k, order=order,
    )
    return sel
