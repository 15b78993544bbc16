"""Stage 3: a persistent, searchable pool of demonstration candidates.

    index = ExampleIndex.build(dataset, get_embedder("hashing:256"))
    scores, ids = index.search(query_vectors, k=8)    # [q, 8] float32, [q, 8] int64 row ids
    index.save(index_path("rt"))                      # indexes/rt/
    index = ExampleIndex.load(index_path("rt"), embedder_name="hashing:256")

Vectors are unit norm, so inner product = cosine. An exact (`flat`, default) index on CPU is
searched by `flat_topk` (a torch matmul, in bfloat16 on CPUs with a bfloat16 matrix unit, then
an exact float32 re-score of every row its proven error bound cannot rule out; ties go to the
lower row, alone or batched); faiss searches the approximate ones (`ivf`, `hnsw`) and any
index on GPU. `vectors` stays in memory as well, because MMR selection needs the candidates'
vectors. `ivfpq_disk` is for pools beyond RAM: its PQ lists (lists.ivfdata) and raw vectors
(vectors.f32) stay on disk, mmapped; the PQ proposes k*rerank candidates, re-scored exactly
from `vectors` (an np.memmap: readers use rows only). It is written once: updates are refused.

On disk an index is a folder of versions behind an atomic pointer (store.py): each version
holds index.faiss, records.jsonl, vectors.npy (ivfpq_disk: lists.ivfdata and vectors.f32 instead),
an optional template.json and manifest.json (which records the sha256 and size of the others).
`save` publishes a new version only when asked to replace and only over an index this engine
made; `load` verifies every file against the manifest and refuses anything off with
`IndexFormatError`. Folders written by earlier releases (the files directly in the folder) are
still read.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import os
import re
import shutil
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Sequence

import faiss
import numpy as np

from ..atomic import nearest_existing
from ..choices import IndexType
from ..data import Dataset, Record, TaskKind
from ..embed import canonical_name
from . import store

__all__ = ["IndexConfig", "ExampleIndex", "IndexFormatError", "IndexExistsError", "IndexWriteError",
           "FORMAT_VERSION", "TEMPLATE_FILE", "indexes_dir", "index_path", "check_index_name", "folder_state",
           "check_writable", "delete_index", "list_indexes", "index_version", "row_id", "update_index",
           "stale_note", "StaleWarning", "flat_topk", "FirstPass", "KNOBS",
           "train_rows", "ivfpq_trained", "FILL_ROWS"]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FAISS_FILE, RECORDS_FILE, VECTORS_FILE = "index.faiss", "records.jsonl", "vectors.npy"
DATA_FILES = (FAISS_FILE, RECORDS_FILE, VECTORS_FILE)
LISTS_FILE, RAW_FILE = "lists.ivfdata", "vectors.f32"  # ivfpq_disk: on-disk PQ lists, raw float32 rows [n, d]
DISK_FILES = (FAISS_FILE, RECORDS_FILE, LISTS_FILE, RAW_FILE)  # an ivfpq_disk version's data files
_STREAMED = (LISTS_FILE, RAW_FILE)  # checksummed in chunks on load, never read into RAM whole
TEMPLATE_FILE = "template.json"  # optional default prompt template stored with a version
_EXTRA = re.compile(r"[a-z][a-z0-9_]{0,40}\.json\Z")  # other JSON files a version may hold
_GROUP = 16  # flat_topk finds its candidates among groups of this many rows (_near_best)
# from_vector_file adds this many rows at a time. faiss's add copies what it is given (residuals),
# so a streaming build's peak memory grows with the chunk; small chunks cost next to no speed.
FILL_ROWS = 1 << 12
_BLOCK = 1 << 22  # at most this many floats of candidate rows at once (16 MB of float32)
# flat_topk scores at most this many (query, row) pairs at once: 8 MB of float32, so a large call
# runs in blocks that stay in cache and is no slower per query than a small one.
_SCORE_BLOCK = 1 << 21
# _pair_dots gathers at most this many floats of each side at once (256 KB of float32): the
# gathered rows stay in L2 while they are multiplied, where gathering them whole would not.
_PAIR_FLOATS = 1 << 16


class IndexFormatError(ValueError):
    """An index folder that cannot be trusted; the message names the folder and the problem."""


class IndexExistsError(ValueError):
    """A save over an existing index that was not asked to replace it."""


class IndexWriteError(ValueError):
    """A save that must not or cannot happen (a foreign folder, a file in the way, no write access)."""


class StaleWarning(UserWarning):
    """Something trained on an earlier version of an index (a soft prompt) is used with a newer one."""


@dataclass
class IndexConfig:
    """Which index and its settings. A setting left None takes its kind's default (KNOBS); one
    given for a kind that does not use it (nprobe for flat) is an error, not silently ignored."""

    index_type: IndexType = IndexType.FLAT
    nlist: int | None = None  # ivf cells; None: ~4*sqrt(n), at most n/39 (faiss k-means minimum)
    nprobe: int | None = None  # ivf cells searched per query; default 16
    hnsw_m: int | None = None  # hnsw links per node; default 32
    ef_construction: int | None = None  # default 80
    ef_search: int | None = None  # default 64
    pq_m: int | None = None  # ivfpq_disk: PQ bytes per vector, divides the dim; None: the largest divisor <= dim/8
    pq_nbits: int | None = None  # ivfpq_disk: bits per PQ code; None: 8 (fewer under 256 records: k-means needs 2^bits)
    rerank: int | None = None  # ivfpq_disk: the PQ proposes k*rerank candidates, re-scored exactly; default 8
    train_size: int | None = None  # ivfpq_disk: rows trained on (train_rows); None: as many as k-means uses, nlist*256
    use_gpu: bool | None = None  # None: faiss GPU when available

    def __post_init__(self):
        try:
            self.index_type = IndexType(self.index_type)
        except ValueError:
            choices = [t.value for t in IndexType]
            raise ValueError(f"index_type must be one of {choices}, got {self.index_type!r}") from None
        for name, low in _KNOB_MINIMUM.items():
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), low)
        if self.pq_nbits is not None and self.pq_nbits > 16:
            raise ValueError(f"pq_nbits must be at most 16, got {self.pq_nbits}")
        if self.use_gpu not in (None, True, False):
            raise ValueError(f"use_gpu must be None, True or False, got {self.use_gpu!r}")
        knobs = KNOBS[self.index_type]
        for name in _KNOB_MINIMUM:
            if getattr(self, name) is not None and name not in knobs:
                uses = ", ".join(knobs) or "no settings"
                raise ValueError(f"{name} does not apply to a {self.index_type.value} index (it takes {uses})")
            if getattr(self, name) is None and name in knobs:
                setattr(self, name, knobs[name])


# The settings each kind takes, with their defaults (None: chosen from the data at build time).
KNOBS: dict[IndexType, dict[str, int | None]] = {
    IndexType.FLAT: {},
    IndexType.IVF: {"nlist": None, "nprobe": 16},
    IndexType.HNSW: {"hnsw_m": 32, "ef_construction": 80, "ef_search": 64},
    IndexType.IVFPQ_DISK: {"nlist": None, "nprobe": 16, "pq_m": None, "pq_nbits": None, "rerank": 8,
                           "train_size": None},
}
_KNOB_MINIMUM = {"nlist": 1, "nprobe": 1, "hnsw_m": 2, "ef_construction": 1, "ef_search": 1, "pq_m": 1,
                 "pq_nbits": 1, "rerank": 1, "train_size": 1}


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


# ----------------------------------------------------------------------------- locations


def indexes_dir(path: str | os.PathLike | None = None) -> Path:
    """Where named indexes live: the argument, else $ICL_INDEXES, else ./indexes."""
    return Path(path or os.environ.get("ICL_INDEXES") or "indexes")


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}\Z")


def check_index_name(name: str) -> str:
    """An index name is one path component: letters, digits, '.', '_', '-', at most 100
    characters, starting with a letter or digit (so never '..', a hidden or an option-like name)."""
    if not _NAME.match(name):
        raise ValueError(f"index name {name!r} must be 1-100 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return name


def row_id(record_id: str) -> str:
    """The row a record belongs to: a file row with an explicit id and several references
    (generation) is one record per reference, ids "X", "X#2", "X#3"...; updates replace and
    remove whole rows."""
    return record_id.split("#", 1)[0]


def index_path(name: str | os.PathLike, indexes_dir: str | os.PathLike | None = None, *,
               for_write: bool = False) -> Path:
    """The folder of index `name` under the indexes dir. Where an index is only read, a name with
    a path separator is taken as the path of an index folder; a writer gets only plain names."""
    name = str(name)
    if not for_write and ("/" in name or os.sep in name):
        return Path(name)
    return _indexes_dir(indexes_dir) / check_index_name(name)


def index_version(folder: Path) -> str | None:
    """What identifies the index now at `folder`, for caches: the current version's name (a
    rebuild publishes a new one), or for a layout-1 folder its manifest's inode and mtime; None
    when there is no index."""
    try:
        version = store.read_pointer(folder)
        if version is not None:
            return version
        st = os.stat(folder / MANIFEST)
        return f"layout1:{st.st_ino}:{st.st_mtime_ns}"
    except (OSError, store.StoreError):
        return None


def list_indexes(indexes_dir: str | os.PathLike | None = None) -> list[Path]:
    """The index folders under the indexes dir (published or layout 1), sorted by name."""
    root = _indexes_dir(indexes_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if _NAME.match(p.name) and folder_state(p) in ("index", "legacy"))


_indexes_dir = indexes_dir  # index_path's parameter shadows the function


@dataclass(frozen=True)
class FirstPass:
    """flat_topk's fast scores: the vectors as the first-pass matmul reads them, and the largest
    row norm, which bounds how far a fast score may be from the exact float32 one."""

    matrix: object  # torch [d, n]: bfloat16 (a contiguous copy) or float32 (a view of the vectors)
    max_norm: float  # of the vectors' rows

    @classmethod
    def of(cls, vectors: np.ndarray, dtype: str | None = None) -> "FirstPass":
        """dtype "bfloat16", "float32", or None: bfloat16 where the CPU multiplies it in hardware
        (AMX or AVX512-BF16: 3-5x the float32 matmul here), else float32."""
        import torch

        if dtype is None:  # (get_capabilities is recent: an older torch gets float32)
            caps = getattr(torch.cpu, "get_capabilities", dict)()
            dtype = "bfloat16" if caps.get("amx_bf16") or caps.get("avx512_bf16") else "float32"
        if dtype not in ("bfloat16", "float32"):
            raise ValueError(f"FirstPass dtype must be 'bfloat16' or 'float32', got {dtype!r}")
        v = np.ascontiguousarray(vectors, dtype=np.float32)  # [n, d]
        norm = float(np.sqrt(np.einsum("nd,nd->n", v, v, dtype=np.float64).max(initial=0.0)))
        t = torch.from_numpy(v).T  # [d, n], no copy
        return cls(t.to(torch.bfloat16).contiguous() if dtype == "bfloat16" else t, norm)

    def scores(self, queries: np.ndarray) -> np.ndarray:
        """Fast scores of queries [b, d] float32 against every vector: float32 [b, n]."""
        import torch  # here, not at import: index builds on Ray's embedder actors never load it

        with torch.no_grad():
            return (torch.from_numpy(queries).to(self.matrix.dtype) @ self.matrix).float().numpy()

    def error(self, query_norms: np.ndarray) -> np.ndarray:
        """[b] float64: |fast - exact| is at most this for queries of these norms, whatever the
        order of the sums. Both sum d products in float32 (gamma_d each); bfloat16 (unit roundoff
        u = 2^-9) also rounds the query, the vector (2u + u^2) and the output (u). A float32
        matmul allowed to run in reduced precision (torch.set_float32_matmul_precision) gets the
        bfloat16 bound, which covers TF32 and bfloat16x3 too."""
        import torch

        d = self.matrix.shape[0]
        gamma = d * 2.0**-24 / (1 - d * 2.0**-24)
        low = self.matrix.dtype == torch.bfloat16 or torch.get_float32_matmul_precision() != "highest"
        u = 2.0**-9 if low else 0.0
        return (3 * u + 8 * u * u + 2 * gamma) * 1.001 * self.max_norm * query_norms  # 1.001: the norms' rounding


def flat_topk(queries: np.ndarray, vectors: np.ndarray, k: int, *,
              first: FirstPass | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product: (scores float32 [q, k], rows int64 [q, k]), best first, and
    equal scores in row order, so a query gets the same rows alone or in any batch.

    queries [q, d] and vectors [n, d] float32, 1 <= k <= n; `first`: FirstPass.of(vectors),
    made once per vectors by the caller that searches them often. One matmul per block of
    queries (torch, on the threads torch was given; bfloat16 on CPUs with a bfloat16 matrix
    unit) gives fast scores, each within a proven bound E of the exact float32 one. Every row
    whose fast score is within 2E of the k-th best fast score (and a few more) is re-scored
    one pair at a time, the same arithmetic whatever the batch, and sorted by (score, row): a
    row of the true top k (exact >= the k-th exact >= the k-th fast - E) has fast >= the k-th
    fast - 2E. The fast pass's rounding therefore never decides an order, and exact ties
    (duplicate texts) go to the lower row, where faiss and argpartition broke them differently.
    """
    first = FirstPass.of(vectors) if first is None else first
    n = len(vectors)
    out_s, out_i = np.empty((len(queries), k), np.float32), np.empty((len(queries), k), np.int64)
    step = max(1, _SCORE_BLOCK // max(n, 1))
    for a in range(0, len(queries), step):
        qb = np.ascontiguousarray(queries[a : a + step], dtype=np.float32)  # [b, d]
        qn = np.sqrt(np.einsum("bd,bd->b", qb, qb, dtype=np.float64))  # [b]
        fast = first.scores(qb)  # [b, n]
        r, c = _near_best(fast, k, 2 * first.error(qn))  # [p] pairs
        exact = _pair_dots(qb, r, vectors, c)  # [p]
        order = _rank_pairs(r, exact, c, len(qb), n)
        r, c, exact = r[order], c[order], exact[order]
        pick = np.searchsorted(r, np.arange(len(qb)))[:, None] + np.arange(k)  # [b, k]: each has >= k
        out_s[a : a + len(qb)], out_i[a : a + len(qb)] = exact[pick], c[pick]
    return out_s, out_i


def _pair_dots(a: np.ndarray, ra: np.ndarray, b: np.ndarray, rb: np.ndarray) -> np.ndarray:
    """Exact float32 a[ra[i]] . b[rb[i]] for each pair i: [p] float32, from a [m, d], b [n, d]
    and rows ra, rb [p]. One pair at a time, the same arithmetic (a product, then numpy's sum
    of that row) whatever the other pairs, so a score never depends on the batch. The rows are
    gathered a cache-sized block of pairs at a time, not all at once."""
    d = a.shape[1]
    out = np.empty(len(ra), np.float32)
    step = max(1, _PAIR_FLOATS // max(d, 1))
    for s in range(0, len(ra), step):
        np.multiply(a[ra[s : s + step]], b[rb[s : s + step]]).sum(1, dtype=np.float32, out=out[s : s + step])
    return out


def _rank_pairs(r: np.ndarray, score: np.ndarray, c: np.ndarray, b: int, n: int) -> np.ndarray:
    """The order [p] of (query r, score, row c) triples [p] each: by query, then best score,
    then lower row; == np.lexsort((c, -score, r)) for float32 scores without NaN (-0.0 and 0.0
    tie), r in [0, b), c in [0, n), the pairs distinct. One argsort of an int64 key (query,
    score's bits flipped to sort descending, row) instead of a three-key lexsort: one sort pass
    over integers instead of three."""
    rbits, cbits = max(b - 1, 0).bit_length(), max(n - 1, 0).bit_length()
    if rbits + 32 + cbits > 63:  # does not fit one key (only for billions of rows and queries)
        return np.lexsort((c, -score, r))
    neg = np.negative(score, dtype=np.float32) + np.float32(0.0)  # -x, with -0.0 made 0.0
    bits = neg.view(np.int32).astype(np.int64)  # [p]
    # negative floats sort in reverse as ints: flip their magnitude bits, then shift to >= 0
    ordered = np.where(bits < 0, bits ^ 0x7FFFFFFF, bits) + (1 << 31)  # [p] in [0, 2^32), float order
    key = (r.astype(np.int64) << (32 + cbits)) | (ordered << cbits) | c.astype(np.int64)
    return np.argsort(key)  # the keys are distinct: no ties left to break


def _near_best(fast: np.ndarray, k: int, window: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(query, row) pairs, int64 [p] each, holding every pair whose fast score (fast [b, n]
    float32) is within `window` [b] (float64) of the query's k-th best, and a few more.

    No topk or sort over the n scores (those cost 2-3x the bfloat16 matmul): the row positions
    are dealt into n // g groups (a strided view, g = _GROUP), each group's best found by an
    elementwise max over g rows of the view, and the k-th best of those group bests is at most
    the k-th best score (they are k distinct scores). Groups whose best reaches that, less the
    window, hold every pair wanted; only their g scores are compared."""
    b, n = fast.shape
    g = max(1, min(_GROUP, n // k))  # at least k groups
    G = n // g
    n0 = G * g  # the last n - n0 rows (< g) are compared one by one
    best = fast[:, :n0].reshape(b, g, G).max(1)  # [b, G]: group j holds rows j, j + G, j + 2G, ...
    floor = -np.partition(-best, k - 1, axis=1)[:, k - 1] - window  # [b] <= the k-th best, less the window
    qi, j = np.nonzero(best >= floor[:, None])  # [pg] groups that reach it
    rows = j[:, None] + G * np.arange(g)  # [pg, g]
    hit, at = np.nonzero(fast[qi[:, None], rows] >= floor[qi, None])
    rt, ct = np.nonzero(fast[:, n0:] >= floor[:, None])
    return np.concatenate([qi[hit], rt]), np.concatenate([rows[hit, at], ct + n0])


# ----------------------------------------------------------------------------- faiss helpers


def _ivf_nlist(n: int, requested: int | None) -> int:
    if requested is None:
        return max(1, min(round(4 * math.sqrt(n)), n // 39))
    if requested > n:  # k-means cannot make more cells than points
        warnings.warn(f"ivf: nlist={requested} is more than the {n} vectors to train on; using nlist={n}")
        return n
    return requested


def _make_faiss(vectors: np.ndarray, config: IndexConfig) -> tuple[faiss.Index, dict]:
    """A CPU faiss index holding `vectors` [n, d], and the parameters to record in the manifest."""
    n, d = vectors.shape
    if config.index_type is IndexType.FLAT:
        index, params = faiss.IndexFlatIP(d), {}
    elif config.index_type is IndexType.IVF:
        nlist = _ivf_nlist(n, config.nlist)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)  # the cells come from the first pool; add() only fills them
        params = {"nlist": nlist, "nprobe": min(config.nprobe, nlist)}
    elif config.index_type is IndexType.IVFPQ_DISK:
        index, params = ivfpq_trained(vectors, config)  # save() moves the filled lists to disk
    else:
        index = faiss.IndexHNSWFlat(d, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = config.ef_construction
        params = {"hnsw_m": config.hnsw_m, "ef_construction": config.ef_construction, "ef_search": config.ef_search}
    index.add(vectors)
    _set_search_params(index, params)
    return index, params


def train_rows(n: int, nlist: int, train_size: int | None, seed: int = 0) -> np.ndarray:
    """The rows [t] an ivfpq_disk index is trained on, the same for the plain and the streaming
    build: every row in order when there are at most `train_size` (None: nlist*256, the most
    faiss's k-means uses for nlist cells; it would subsample the rest itself), else a seeded
    sample of that many, in row order."""
    t = min(n, train_size or nlist * 256)
    if t == n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, t, replace=False))


def ivfpq_trained(vectors: np.ndarray, config: IndexConfig) -> tuple[faiss.Index, dict]:
    """An empty IVF-PQ trained on train_rows of `vectors` [n, d] (in RAM, or an np.memmap: only
    the sample is read), and its manifest parameters. The caller adds the rows."""
    n, d = vectors.shape
    train_cap = min(n, config.train_size or n)
    nlist = _ivf_nlist(train_cap, config.nlist) if config.nlist is None or config.nlist > train_cap \
        else config.nlist  # default: ~4*sqrt(n) (n: the rows trained on when a train_size bounds them)
    rows = train_rows(n, nlist, config.train_size)
    sample = vectors if len(rows) == n and not isinstance(vectors, np.memmap) \
        else np.ascontiguousarray(vectors[rows], dtype=np.float32)  # [t, d]
    m = config.pq_m or max(f for f in range(1, max(1, d // 8) + 1) if d % f == 0)
    if d % m:
        raise ValueError(f"pq_m={m} must divide the embedding dimension {d}")
    nbits = config.pq_nbits or max(1, min(8, int(math.log2(max(len(rows), 2)))))
    index = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT)
    index.train(sample)  # cells and PQ codebooks: the only step that sees raw vectors together
    params = {"nlist": nlist, "nprobe": min(config.nprobe, nlist), "pq_m": m, "pq_nbits": nbits,
              "rerank": config.rerank, "train_size": len(rows)}
    return index, params


def _set_search_params(index: faiss.Index, params: dict) -> None:
    if "nprobe" in params:
        index.nprobe = params["nprobe"]
    if "ef_search" in params:
        index.hnsw.efSearch = params["ef_search"]


def _num_gpus() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def _to_device(index: faiss.Index, use_gpu: bool | None):
    """(index, gpu resources or None): on GPU when asked for or available, else as is."""
    if use_gpu is False or (use_gpu is None and _num_gpus() == 0):
        return index, None
    if isinstance(index, faiss.IndexIVFPQ):  # ivfpq_disk: its lists are on disk, read through mmap
        if use_gpu:
            warnings.warn("ivfpq_disk indexes run on CPU (their lists are on disk)")
        return index, None
    if _num_gpus() == 0:
        raise ValueError("use_gpu=True but faiss sees no GPU (install faiss-gpu and a CUDA build)")
    if isinstance(index, faiss.IndexHNSW):  # faiss has no GPU HNSW
        if use_gpu:
            warnings.warn("hnsw indexes run on CPU (faiss has no GPU HNSW)")
        return index, None
    res = faiss.StandardGpuResources()  # must outlive the GPU index: kept by the caller
    return faiss.index_cpu_to_gpu(res, 0, index), res


def _to_cpu(index: faiss.Index) -> faiss.Index:
    gpu_index = getattr(faiss, "GpuIndex", None)
    return faiss.index_gpu_to_cpu(index) if gpu_index is not None and isinstance(index, gpu_index) else index


def _check_vectors(vectors, n: int, dim: int | None, who: str) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != n or (dim is not None and vectors.shape[1] != dim):
        raise ValueError(f"{who}: expected embeddings of shape [{n}, {dim}], got {list(vectors.shape)}")
    if not np.isfinite(vectors).all():
        raise ValueError(f"{who}: the embeddings contain NaN or inf")
    return vectors


def _check_records(dataset: Dataset) -> None:
    if len(dataset) == 0:
        raise ValueError(f"dataset {dataset.name!r} has no records to index")
    ids = [r.id for r in dataset.records]
    if len(set(ids)) != len(ids):
        raise ValueError(f"dataset {dataset.name!r} has duplicate record ids")


def _new_manifest(dataset: Dataset, dim: int, embedder_name: str, config: IndexConfig, params: dict) -> dict:
    return {
        "format_version": FORMAT_VERSION, "embedder": embedder_name, "dim": dim,
        "normalized": True, "metric": "inner_product", "index_type": config.index_type.value,
        "index_params": params, "count": len(dataset), "dataset": dataset.name,
        "dataset_sha256": dataset.sha256, "kind": dataset.kind.value, "labels": list(dataset.labels),
        "fields": list(dataset.fields),
        "created": _now(), "files": {},  # files: filled in by save()
    }


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    """A file's sha256, read in 1 MB chunks (an ivfpq_disk index's files may exceed RAM; larger
    chunks are no faster, and two of them are alive at once while the next is read)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _write_ondisk(index: faiss.Index, tmp: Path) -> None:
    """tmp/index.faiss + tmp/lists.ivfdata: `index`'s inverted lists (in RAM after a build, on
    disk after a load) copied into faiss's on-disk format. The index file records the .ivfdata
    path, which the version folder's rename makes stale: load opens it with
    IO_FLAG_ONDISK_SAME_DIR (the .ivfdata beside the index file) instead."""
    src = faiss.extract_index_ivf(index)
    filled, own, ntotal = src.invlists, src.own_invlists, index.ntotal
    empty = faiss.ArrayInvertedLists(src.nlist, src.code_size)
    src.own_invlists = False  # detach the filled lists for a moment: serialize the cells + codebooks alone
    src.replace_invlists(empty, True)
    empty.this.disown()
    try:
        out = faiss.deserialize_index(faiss.serialize_index(index))  # trained, empty
    finally:
        src.replace_invlists(filled, own)  # frees `empty`
        index.ntotal = src.ntotal = ntotal
    dst = faiss.extract_index_ivf(out)
    lists = faiss.OnDiskInvertedLists(dst.nlist, dst.code_size, str(tmp / LISTS_FILE))
    sources = faiss.InvertedListsPtrVector()
    sources.push_back(filled)
    with _quiet_faiss():
        out.ntotal = dst.ntotal = lists.merge_from_multiple(sources.data(), 1, False)
    dst.replace_invlists(lists, True)
    lists.this.disown()  # owned by `out` now
    faiss.write_index(out, str(tmp / FAISS_FILE))


@contextmanager
def _quiet_faiss():
    """faiss's on-disk lists printf a line when they resize or are re-pointed to the same
    folder; C's stdout is the process's, where `--json` output goes: send it to /dev/null
    meanwhile (flushing C's buffer before and after, so no line lands later)."""
    import ctypes

    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    libc.fflush(None)
    saved, null = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)


def _is_raw_file(vectors: np.ndarray) -> bool:
    """True when `vectors` is a memmap of a whole file that is exactly vectors.f32's format
    (float32 rows [n, d], nothing before or after): that file can become the version's as is."""
    return (isinstance(vectors, np.memmap) and vectors.filename is not None and vectors.offset == 0
            and vectors.dtype == np.float32 and vectors.flags.c_contiguous
            and os.path.getsize(vectors.filename) == vectors.nbytes)


def _write_raw(vectors: np.ndarray, path: Path) -> None:
    """The raw rows [n, d] as float32, 65,536 rows at a time (`vectors` may be a memmap)."""
    with open(path, "wb") as f:
        for a in range(0, len(vectors), 1 << 16):
            f.write(memoryview(np.ascontiguousarray(vectors[a : a + (1 << 16)], dtype=np.float32)))  # no copy


# ----------------------------------------------------------------------------- the index


class ExampleIndex:
    """Records + their unit-norm vectors + a faiss index over them. Make one with `build` or `load`."""

    def __init__(self, records: tuple[Record, ...], kind: TaskKind, labels: tuple[str, ...], vectors: np.ndarray,
                 manifest: dict, config: IndexConfig, faiss_index: faiss.Index, gpu_resources=None):
        self.records, self.kind, self.labels = records, kind, labels
        self.vectors = vectors  # [n, d] float32, unit norm; row i belongs to records[i] (ivfpq_disk loaded: np.memmap)
        self.manifest, self.config = manifest, config
        self._faiss, self._gpu_res = faiss_index, gpu_resources
        self.template: dict | None = None  # the default prompt template stored with it (prompt.Template's dict)
        self.extras: dict[str, dict] = {}  # other JSON files stored with it, e.g. template_search.json
        self.version: str | None = None  # the store version it was loaded from (None: built in memory, layout 1)
        self._first: tuple[np.ndarray, FirstPass] | None = None  # (the vectors it was made of, flat_topk's first pass)
        self._raw_file: Path | None = None  # from_vector_file(move=True): the vectors' file, moved by the next save

    def __len__(self) -> int:
        return len(self.records)

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    @property
    def dataset(self) -> Dataset:
        return Dataset(self.manifest["dataset"], self.kind, self.records, self.labels,
                       tuple(self.manifest.get("fields", ())))

    # -- build / search / add

    @classmethod
    def build(cls, dataset: Dataset, embedder, config: IndexConfig | None = None) -> "ExampleIndex":
        """Embed every record's input (cached texts are not re-embedded) and index the vectors."""
        _check_records(dataset)  # before the long work
        vectors = _check_vectors(embedder.encode([r.input for r in dataset.records]), len(dataset), embedder.dim,
                                 f"embedder {embedder.name!r}")
        return cls.from_vectors(dataset, vectors, embedder.name, config)

    @classmethod
    def from_vectors(cls, dataset: Dataset, vectors: np.ndarray, embedder_name: str,
                     config: IndexConfig | None = None) -> "ExampleIndex":
        """Index `dataset` with its records' embeddings `vectors` [n, d] (unit norm) made by
        embedder `embedder_name` elsewhere (e.g. by Ray workers); `build` = embed + this."""
        config = config or IndexConfig()
        _check_records(dataset)
        vectors = _check_vectors(vectors, len(dataset), None, f"embedder {embedder_name!r}")
        cpu_index, params = _make_faiss(vectors, config)
        manifest = _new_manifest(dataset, int(vectors.shape[1]), embedder_name, config, params)
        index, res = _to_device(cpu_index, config.use_gpu)
        return cls(dataset.records, dataset.kind, tuple(dataset.labels), vectors, manifest, config, index, res)

    @classmethod
    def from_vector_file(cls, dataset: Dataset, vectors: np.memmap, embedder_name: str, config: IndexConfig,
                         lists: Path, *, move: bool = False) -> "ExampleIndex":
        """An ivfpq_disk index of `dataset` whose embeddings [n, d] are a file on disk (a streaming
        build wrote them there), never all in RAM: trained on train_rows of them (as from_vectors
        trains), then filled FILL_ROWS rows at a time into on-disk lists at `lists` (faiss
        OnDiskInvertedLists; `save` copies them into the version, compacted). `vectors` stays the
        index's memmap; the caller keeps both files until the index is saved. With `move`, the
        first save moves the vectors' file into the version instead of copying it (os.replace: no
        second copy on disk while publishing; a copy only when the file is on another filesystem),
        and the caller must not use the file after."""
        if config.index_type is not IndexType.IVFPQ_DISK:
            raise ValueError(f"from_vector_file makes ivfpq_disk indexes, not {config.index_type.value}")
        _check_records(dataset)
        n, d = vectors.shape
        if n != len(dataset):
            raise ValueError(f"embedder {embedder_name!r}: expected embeddings of shape [{len(dataset)}, {d}], "
                             f"got {[n, d]}")
        cpu_index, params = ivfpq_trained(vectors, config)
        ivf = faiss.extract_index_ivf(cpu_index)
        on_disk = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(lists))
        ivf.replace_invlists(on_disk, True)
        on_disk.this.disown()  # owned by the index now
        for a in range(0, n, FILL_ROWS):  # [<= FILL_ROWS, d] at a time: codes go to disk as they are made
            chunk = _check_vectors(vectors[a : a + FILL_ROWS], min(n - a, FILL_ROWS), d, f"embedder {embedder_name!r}")
            with _quiet_faiss():  # the lists print a line each time their file grows
                cpu_index.add(chunk)
        _set_search_params(cpu_index, params)
        manifest = _new_manifest(dataset, d, embedder_name, config, params)
        index = cls(dataset.records, dataset.kind, tuple(dataset.labels), vectors, manifest, config, cpu_index)
        index._raw_file = Path(vectors.filename) if move and _is_raw_file(vectors) else None
        return index

    def search(self, query_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product: (scores float32 [q, k], ids int64 [q, k]), best first.

        ids are row positions into `records`; missing results (fewer than k records, or an
        approximate index that found fewer) are id -1 with score -inf. A [d] query is taken as [1, d].
        """
        q = np.ascontiguousarray(query_vectors, dtype=np.float32)
        q = q[None] if q.ndim == 1 else q
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"search: expected query vectors [q, {self.dim}], got {list(np.shape(query_vectors))}")
        k = int(k)
        if k < 0:
            raise ValueError(f"search: k must be >= 0, got {k}")
        scores = np.full((len(q), k), -np.inf, dtype=np.float32)  # [q, k]
        ids = np.full((len(q), k), -1, dtype=np.int64)  # [q, k]
        kk = min(k, len(self.records))
        if kk == 0 or len(q) == 0:
            return scores, ids
        if self.config.index_type is IndexType.FLAT and self._gpu_res is None:
            s, i = flat_topk(q, self.vectors, kk, first=self.first_pass())
        elif self.config.index_type is IndexType.IVFPQ_DISK:
            s, i = self._search_reranked(q, kk)
        else:
            s, i = self._faiss.search(q, kk)
        scores[:, :kk] = np.where(i >= 0, s, -np.inf)
        ids[:, :kk] = i
        return scores, ids

    def first_pass(self) -> FirstPass:
        """flat_topk's first-pass copy of the vectors, made once per vectors array (add and
        remove replace the array, so the copy follows; the array itself is never written in place)."""
        if self._first is None or self._first[0] is not self.vectors:
            self._first = (self.vectors, FirstPass.of(self.vectors))
        return self._first[1]

    def _search_reranked(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """ivfpq_disk: the PQ's k*rerank best candidates (every row when that many cover the
        index: then no PQ at all) re-scored exactly against the stored vectors, one row read
        each from the memmap, and ordered as flat_topk orders: score, then the lower row (the
        same arithmetic, so covering every row gives flat search's ids and scores). A query
        whose PQ search found fewer than k gets id -1 in the missing places."""
        n = len(self.records)
        c = min(n, k * self.manifest["index_params"]["rerank"])
        out_s = np.full((len(q), k), -np.inf, np.float32)  # [q, k]
        out_i = np.full((len(q), k), -1, np.int64)  # [q, k]
        step = max(1, _BLOCK // (c * self.dim))  # at most _BLOCK floats of candidate rows at once
        for a in range(0, len(q), step):
            qb = q[a : a + step]  # [b, d]
            cand = np.broadcast_to(np.arange(n), (len(qb), n)) if c == n else self._faiss.search(qb, c)[1]  # [b, c]
            r, col = np.repeat(np.arange(len(qb)), cand.shape[1]), cand.ravel()  # [p] pairs, r ascending
            r, col = r[col >= 0], col[col >= 0]
            exact = _pair_dots(qb, r, self.vectors, col)  # [p], flat_topk's arithmetic
            order = _rank_pairs(r, exact, col, len(qb), n)
            r, col, exact = r[order], col[order], exact[order]
            start, end = np.searchsorted(r, np.arange(len(qb))), np.searchsorted(r, np.arange(len(qb)), "right")
            pick = start[:, None] + np.arange(k)  # [b, k]
            ok = pick < end[:, None]
            pick = np.minimum(pick, len(r) - 1)
            out_s[a : a + len(qb)] = np.where(ok, exact[pick], -np.inf) if len(r) else -np.inf
            out_i[a : a + len(qb)] = np.where(ok, col[pick], -1) if len(r) else -1
        return out_s, out_i

    def check_updatable(self) -> None:
        """Refuse, in one line, a change to an index kind written once (ivfpq_disk)."""
        if self.config.index_type is IndexType.IVFPQ_DISK:
            raise IndexWriteError("an ivfpq_disk index cannot be updated (its PQ lists and vectors are written "
                                  "once); rebuild it with icl index build --force")

    def add(self, records: Iterable[Record], embedder) -> int:
        """Append records whose id is not in the index yet; returns how many were added.

        Only their texts are embedded (and the embedder's cache skips texts seen before). An IVF
        index keeps its trained cells; rebuild it when the pool changes a lot.
        """
        self._check_embedder(embedder)
        self.check_updatable()
        known = {r.id for r in self.records}
        new = []
        for r in records:
            if r.id not in known:
                known.add(r.id)
                new.append(r)
        if not new:
            return 0
        if self.kind is TaskKind.CLASSIFICATION:
            unknown = sorted({r.output for r in new} - set(self.labels))
            if unknown:
                raise ValueError(f"add: labels {unknown} are not among the index's labels {list(self.labels)}")
        vecs = _check_vectors(embedder.encode([r.input for r in new]), len(new), self.dim,
                              f"embedder {embedder.name!r}")
        self._faiss.add(vecs)
        self.vectors = np.concatenate([self.vectors, vecs])  # [n + m, d]
        self.records = self.records + tuple(new)
        self.manifest.update(count=len(self.records), dataset_sha256=self.dataset.sha256, updated=_now(), files={})
        return len(new)

    def _check_embedder(self, embedder) -> None:
        if embedder.name != self.manifest["embedder"] or embedder.dim != self.dim:
            raise ValueError(f"embedder {embedder.name!r} (dim {embedder.dim}) does not match the index's "
                             f"{self.manifest['embedder']!r} (dim {self.dim})")

    def upsert(self, records: Sequence[Record], vectors: np.ndarray) -> dict:
        """Insert `records` ([m] with their embeddings `vectors` [m, d]); a row already in the
        index (same `row_id`) is replaced by the new one with all its records. Returns the counts
        {"added", "replaced", "unchanged"} of rows. Appends when nothing is replaced."""
        self.check_updatable()
        vectors = _check_vectors(vectors, len(records), self.dim, "upsert")
        self._check_labels(records)
        if len({r.id for r in records}) != len(records):
            raise ValueError("upsert: the new records have duplicate ids")
        old_rows: dict[str, list[Record]] = {}
        for r in self.records:
            old_rows.setdefault(row_id(r.id), []).append(r)
        new_rows: dict[str, list[int]] = {}
        for i, r in enumerate(records):
            new_rows.setdefault(row_id(r.id), []).append(i)
        counts = {"added": 0, "replaced": 0, "unchanged": 0}
        take: list[int] = []  # positions in `records` that go into the index
        for rid, positions in new_rows.items():
            if old_rows.get(rid) == [records[i] for i in positions]:
                counts["unchanged"] += 1
                continue
            counts["replaced" if rid in old_rows else "added"] += 1
            take += positions
        gone = {row_id(records[i].id) for i in take} & old_rows.keys()  # rows replaced
        keep = np.array([row_id(r.id) not in gone for r in self.records], dtype=bool)  # [n]
        self._set_rows(keep, [records[i] for i in take], vectors[take])
        return counts

    def remove(self, ids: Iterable[str]) -> int:
        """Remove the records with these ids (an id of a row removes all its records, see
        `row_id`); returns how many records went. An id that matches nothing is an error, and
        then nothing is removed."""
        self.check_updatable()
        ids = set(ids)
        keep = np.array([r.id not in ids and row_id(r.id) not in ids for r in self.records], dtype=bool)  # [n]
        found = {r.id for r in self.records} | {row_id(r.id) for r in self.records}
        missing = sorted(ids - found)
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise ValueError(f"remove: no record with id {', '.join(map(repr, missing[:5]))}{more} in the index")
        if not keep.any():
            raise ValueError("remove: that would leave the index empty; delete it instead (icl index delete)")
        removed = int((~keep).sum())
        self._set_rows(keep, [], np.zeros((0, self.dim), np.float32))
        return removed

    def _check_labels(self, records: Sequence[Record]) -> None:
        if self.kind is TaskKind.CLASSIFICATION:
            unknown = sorted({r.output for r in records} - set(self.labels))
            if unknown:
                raise ValueError(f"labels {unknown} are not among the index's labels {list(self.labels)}; "
                                 "rebuild the index to add labels")

    def _set_rows(self, keep: np.ndarray, records: list[Record], vectors: np.ndarray) -> None:
        """Keep the rows where `keep` [n] is True, then append `records` with `vectors` [m, d].
        Pure appends go straight into the faiss index (flat: a copy; IVF: assigned to the trained
        cells; HNSW: inserted); a removal refills it from the stored vectors, IVF keeping its
        trained cells, so nothing is re-embedded either way."""
        if not keep.all():
            self.vectors = self.vectors[keep]  # [n', d]
            self.records = tuple(r for r, k in zip(self.records, keep) if k)
            cpu = faiss.clone_index(_to_cpu(self._faiss))
            if isinstance(cpu, faiss.IndexHNSW):  # HNSW cannot delete: a new graph over the same vectors
                cpu, _ = _make_faiss(self.vectors, self.config)
            else:
                cpu.reset()  # flat: empty; IVF: empty lists, the trained cells stay
                cpu.add(self.vectors)
            _set_search_params(cpu, self.manifest["index_params"])
            self._faiss, self._gpu_res = _to_device(cpu, self.config.use_gpu)
        if len(records):
            self._faiss.add(vectors)
            self.vectors = np.concatenate([self.vectors, vectors])  # [n' + m, d]
            self.records = self.records + tuple(records)

    # -- persistence

    def save(self, path: str | os.PathLike, *, replace: bool = False, template: dict | None = None,
             extras: dict[str, dict] | None = None, lock_timeout: float | None = None) -> Path:
        """Publish the index as folder `path` (see store.py); returns the folder.

        An existing index there is replaced only with `replace=True` (else IndexExistsError), and
        only if this engine made it; any other existing folder is refused untouched. `template`
        (a prompt template as a dict) is stored with this version: a rebuild never inherits the
        previous version's template. `extras`: other JSON objects stored as files of this version
        ({"template_search.json": {...}}), verified on load like the rest, read back as `.extras`.
        Readers see the old index or the new one, never a mix.
        """
        extras = dict(extras or {})
        for name in extras:
            if not _EXTRA.match(name) or name in (*DATA_FILES, MANIFEST, TEMPLATE_FILE):
                raise ValueError(f"save: extra file name {name!r} must be a plain *.json name of the index's own")
        folder = Path(path)
        check_writable(folder, replace=replace)
        created = not folder.exists()
        folder.mkdir(parents=True, exist_ok=True)
        try:
            with store.writer_lock(folder, lock_timeout, what=f"index {str(folder)!r}"):
                self.publish_locked(folder, replace=replace, template=template, extras=extras)
        except BaseException:
            if created and store.only_leftovers(folder):  # a failed first build leaves nothing
                shutil.rmtree(folder, ignore_errors=True)
            raise
        return folder

    def publish_locked(self, folder: Path, *, replace: bool, template: dict | None, extras: dict[str, dict]) -> None:
        """`save`'s publish, for a caller that holds the folder's writer lock (update_index)."""
        # checked again under the lock: another build may have published meanwhile
        legacy = check_writable(folder, replace=replace) == "legacy"
        self.version = store.publish(folder, lambda tmp: self._write(tmp, template, extras)).name
        if legacy:  # the layout-1 files at the top are now shadowed by CURRENT
            for name in (*DATA_FILES, MANIFEST, TEMPLATE_FILE):
                (folder / name).unlink(missing_ok=True)
        _remove_stale_siblings(folder)

    def _write(self, tmp: Path, template: dict | None, extras: dict[str, dict]) -> None:
        disk = self.config.index_type is IndexType.IVFPQ_DISK
        if disk:
            _write_ondisk(self._faiss, tmp)
            if not self._move_raw_file(tmp / RAW_FILE):
                _write_raw(self.vectors, tmp / RAW_FILE)
        else:
            faiss.write_index(_to_cpu(self._faiss), str(tmp / FAISS_FILE))
            np.save(tmp / VECTORS_FILE, self.vectors, allow_pickle=False)
        lines = [json.dumps(r.to_json(), ensure_ascii=False, sort_keys=True) for r in self.records]
        (tmp / RECORDS_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
        names = list(DISK_FILES if disk else DATA_FILES)
        if template is not None:
            (tmp / TEMPLATE_FILE).write_text(json.dumps(template, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            names.append(TEMPLATE_FILE)
        for name, obj in extras.items():
            (tmp / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            names.append(name)
        files = {}
        for name in names:
            files[name] = {"sha256": _sha256_file(tmp / name), "size": (tmp / name).stat().st_size}
        self.manifest["files"] = files
        self.manifest["created_by"] = "icl_engine"
        (tmp / MANIFEST).write_text(json.dumps(self.manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        self.template, self.extras = template, extras

    def _move_raw_file(self, dst: Path) -> bool:
        """Move the vectors' file of from_vector_file(move=True) to `dst` (once: False after, and
        across filesystems, where the caller copies). `self.vectors` keeps reading it: a memmap
        holds the file, not its name, so a publish that fails after the move (its tmp folder
        removed) leaves the index whole, and a later save copies from the memmap."""
        src, self._raw_file = self._raw_file, None
        if src is None:
            return False
        try:
            os.replace(src, dst)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            return False
        return True

    @classmethod
    def load(cls, path: str | os.PathLike, embedder_name: str | None = None, *,
             use_gpu: bool | None = None) -> "ExampleIndex":
        """Read and verify an index folder; `embedder_name`, when given, must match the manifest.

        Reads the current version (retrying once if a rebuild switched versions meanwhile), or
        the files directly in the folder for an index saved by an earlier release (layout 1)."""
        folder = Path(path)
        try:
            if store.is_store(folder) or (folder / store.POINTER).exists():
                return store.read(folder, lambda version: cls._load_version(version, folder, embedder_name, use_gpu))
            if not folder.is_dir():
                raise IndexFormatError(f"{folder}: no such index folder")
            if store.only_leftovers(folder):
                raise IndexFormatError(f"{folder}: an interrupted build left no index here; build it again")
            return cls._load_version(folder, folder, embedder_name, use_gpu)
        except IndexFormatError:
            raise
        except OSError as e:  # e.g. a file removed while read, a permission error
            raise IndexFormatError(f"{folder}: cannot read the index ({e.strerror or e})") from None
        except store.StoreError as e:
            raise IndexFormatError(str(e)) from None

    @classmethod
    def _load_version(cls, version: Path, folder: Path, embedder_name: str | None,
                      use_gpu: bool | None) -> "ExampleIndex":
        """Verify and parse one version's files; errors name the index `folder`."""

        def bad(problem: str) -> IndexFormatError:
            return IndexFormatError(f"{folder}: {problem}")

        m = _read_manifest(version / MANIFEST, bad)
        try:
            kind = TaskKind(m["kind"])
            config = IndexConfig(index_type=m["index_type"], **m["index_params"], use_gpu=use_gpu)
        except (ValueError, TypeError) as e:
            raise bad(f"manifest.json: {e}") from None
        if m["format_version"] != FORMAT_VERSION:
            raise bad(f"index format version {m['format_version']}, this version of icl_engine reads {FORMAT_VERSION}")
        if embedder_name is not None and canonical_name(embedder_name) != m["embedder"]:
            raise bad(f"built with embedder {m['embedder']!r}, not {canonical_name(embedder_name)!r}")
        disk = config.index_type is IndexType.IVFPQ_DISK
        data_files = DISK_FILES if disk else DATA_FILES
        optional = (TEMPLATE_FILE,) if TEMPLATE_FILE in m["files"] else ()
        extra_names = sorted(n for n in m["files"] if n not in (*data_files, TEMPLATE_FILE))
        if not all(_EXTRA.match(n) for n in extra_names):
            raise bad(f"manifest.json lists files that are not the index's: {extra_names}")
        blobs = _verified_files(version, m, (*data_files, *optional, *extra_names), bad)
        vectors, cpu_index, records, template, extras = _parse_files(version, m, blobs, disk, bool(optional),
                                                                     extra_names, bad)
        _check_consistent(m, config, vectors, cpu_index, records, disk, bad)
        for name, obj in (*extras.items(), (TEMPLATE_FILE, template if template is not None else {})):
            if not isinstance(obj, dict):
                raise bad(f"{name} is not a JSON object")
        labels = tuple(m["labels"])
        dataset = Dataset(m["dataset"], kind, records, labels)
        if dataset.sha256 != m["dataset_sha256"]:
            raise bad("records.jsonl does not match the manifest's dataset_sha256")
        if kind is TaskKind.CLASSIFICATION and not {r.output for r in records} <= set(labels):
            raise bad(f"records have labels outside the manifest's labels {list(labels)}")
        _set_search_params(cpu_index, m["index_params"])
        index, res = _to_device(cpu_index, use_gpu)
        loaded = cls(records, kind, labels, vectors, m, config, index, res)
        loaded.template, loaded.extras = template, extras
        loaded.version = version.name if version != folder else None
        return loaded


def _verified_files(version: Path, m: dict, names: tuple[str, ...], bad) -> dict[str, bytes | None]:
    """Each named file's bytes, checked against the manifest's size and sha256: read once, then
    parsed from those very bytes. Streamed files (too big to hold) are verified in chunks and
    map to None: they are memory-mapped later."""
    blobs = {}
    for name in names:
        entry = m["files"].get(name)
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                and isinstance(entry.get("size"), int)):
            raise bad(f"manifest.json has no valid entry for {name}")
        if not (version / name).is_file():
            raise bad(f"missing file {name}")
        streamed = name in _STREAMED
        data = None if streamed else (version / name).read_bytes()
        size = (version / name).stat().st_size if streamed else len(data)
        if size != entry["size"]:
            raise bad(f"{name} is {size} bytes, the manifest says {entry['size']} (truncated or modified)")
        if (_sha256_file(version / name) if streamed else _sha256(data)) != entry["sha256"]:
            raise bad(f"{name} does not match its sha256 in manifest.json (corrupt or modified)")
        blobs[name] = data
    return blobs


def _parse_files(version: Path, m: dict, blobs: dict, disk: bool, has_template: bool, extra_names: list[str], bad):
    """(vectors [n, d], the faiss index on the CPU, records, template, extras) from verified files;
    any parse error becomes one IndexFormatError naming its type and first line."""
    n, d = m["count"], m["dim"]
    if disk and os.path.getsize(version / RAW_FILE) != n * d * 4:
        raise bad(f"vectors.f32 is {os.path.getsize(version / RAW_FILE)} bytes, expected float32 [{n}, {d}]")
    try:
        if disk:  # rows are read from disk when used (search's re-rank, MMR), never all at once
            vectors = np.memmap(version / RAW_FILE, dtype=np.float32, mode="r", shape=(n, d))
            with _quiet_faiss():
                cpu_index = faiss.read_index(str(version / FAISS_FILE), faiss.IO_FLAG_ONDISK_SAME_DIR)
        else:
            vectors = np.load(io.BytesIO(blobs[VECTORS_FILE]), allow_pickle=False)
            cpu_index = faiss.deserialize_index(np.frombuffer(blobs[FAISS_FILE], dtype=np.uint8))
        records = tuple(_parse_record(line) for line in blobs[RECORDS_FILE].decode("utf-8").split("\n") if line)
        template = json.loads(blobs[TEMPLATE_FILE]) if has_template else _legacy_template(version)
        extras = {name: json.loads(blobs[name]) for name in extra_names}
    except (ValueError, TypeError, KeyError, RuntimeError, UnicodeDecodeError) as e:
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise bad(f"unreadable index files ({type(e).__name__}: {first_line})") from None
    return vectors, cpu_index, records, template, extras


def _check_consistent(m: dict, config: IndexConfig, vectors, cpu_index, records, disk: bool, bad) -> None:
    """The parsed files agree with the manifest and each other: counts, distinct ids, dims, index type."""
    n, d = m["count"], m["dim"]
    if len(records) != n or len({r.id for r in records}) != n:
        raise bad(f"records.jsonl holds {len(records)} records (distinct ids expected), "
                  f"the manifest's count is {n}")
    if vectors.dtype != np.float32 or vectors.ndim != 2 or len(vectors) != n:
        raise bad(f"vectors.npy is {vectors.dtype} {list(vectors.shape)}, expected float32 [{n}, {d}]")
    for what, dim in ((RAW_FILE if disk else VECTORS_FILE, vectors.shape[1]), ("index.faiss", cpu_index.d)):
        if dim != d:
            raise bad(f"dimension mismatch: {what} has dim {dim}, the manifest says {d}")
    if cpu_index.ntotal != n:
        raise bad(f"index.faiss holds {cpu_index.ntotal} vectors, the manifest's count is {n}")
    if not _faiss_matches(cpu_index, config, m["index_params"]):
        raise bad(f"index.faiss is a {type(cpu_index).__name__}, "
                  f"not the manifest's {m['index_type']} {m['index_params']}")


# ----------------------------------------------------------------------------- folders


def folder_state(folder: Path) -> str:
    """What an existing path is, for a writer: "none" (absent, empty, or only an interrupted
    first build's leftovers), "index" (published by this engine), "legacy" (a layout-1 index:
    the engine's files alone at the top), or "foreign" (anything else: never written into)."""
    if not folder.exists() or store.only_leftovers(folder):
        return "none"
    if not folder.is_dir():
        return "foreign"
    if store.is_store(folder):
        return "index"
    names = {p.name for p in folder.iterdir()}
    if MANIFEST in names and names <= {*DATA_FILES, MANIFEST, TEMPLATE_FILE, store.LOCK}:
        try:
            _read_manifest(folder / MANIFEST, IndexFormatError)
            return "legacy"
        except IndexFormatError:
            pass
    return "foreign"


def check_writable(folder: Path, *, replace: bool) -> str:
    """Refuse, before any long work, a save that could not or must not happen; returns the
    folder's state (see folder_state)."""
    parent = nearest_existing(folder)
    if not parent.is_dir():
        raise IndexWriteError(f"{parent} is a file, not a folder")
    state = folder_state(folder)
    if state == "foreign":
        raise IndexWriteError(f"{folder} exists and is not an index made by icl_engine; refusing to touch it")
    if state in ("index", "legacy") and not replace:
        raise IndexExistsError(f"index {folder.name!r} already exists in {folder.parent}; pass --force to replace it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise IndexWriteError(f"{parent} is not writable")
    return state


def _remove_stale_siblings(folder: Path) -> None:
    """Folders that earlier releases' saves (`.rt.old-*`, `.rt.tmp-*`) or a killed delete
    (`.rt.deleted-*`) left beside index `rt`."""
    stale = re.compile(re.escape(f".{folder.name}.") + r"(old|tmp|deleted)-[0-9a-f]{8}\Z")
    for p in folder.parent.iterdir():
        if stale.match(p.name) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def _legacy_template(folder: Path) -> dict | None:
    """A layout-1 index kept its template as a plain file beside the index files."""
    path = folder / TEMPLATE_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def delete_index(folder: Path, lock_timeout: float | None = None) -> None:
    """Remove an index this engine made (refuses any other folder)."""
    state = folder_state(folder)
    if not folder.exists():
        raise IndexFormatError(f"{folder}: no such index folder")
    if state == "foreign":
        raise IndexWriteError(f"{folder} is not an index made by icl_engine; refusing to delete it")
    with store.writer_lock(folder, lock_timeout, what=f"index {str(folder)!r}"):
        store.remove(folder)


# ----------------------------------------------------------------------------- updates

MAX_LINEAGE = 100  # past versions a manifest remembers (for stale_note)


def update_index(folder: str | os.PathLike, *, records: Sequence[Record] = (), remove_ids: Sequence[str] = (),
                 embed: Callable[[list[str]], np.ndarray] | None = None, check: Callable[["ExampleIndex"], None] | None = None,
                 index: "ExampleIndex | None" = None, lock_timeout: float | None = None) -> dict:
    """Upsert `records` into, and remove the rows `remove_ids` from, the index at `folder`, and
    publish the result as a new version: readers see the old or the new one, a killed update
    leaves the old one, and old versions are collected as after a rebuild.

    Only texts the index does not hold are embedded (`embed(texts) -> [m, d]`), before the
    writer lock is taken; under the lock the current version is read again if another writer
    published meanwhile, so two updates at once both land (the second waits for the lock, up
    to $ICL_LOCK_TIMEOUT). `check(index)` validates the loaded index (embedder, template) before
    anything is embedded. `index`: the index already loaded from `folder` (read again under the
    lock only if a writer published since). Returns the counts of rows added / replaced / unchanged, records
    removed, the new count and the versions before and after (the same when nothing changed)."""
    folder = Path(folder)
    state = folder_state(folder)
    if state == "none":
        raise IndexFormatError(f"{folder}: no such index; build it first (icl index build)")
    if state == "foreign":
        raise IndexWriteError(f"{folder} exists and is not an index made by icl_engine; refusing to touch it")
    index = index if index is not None else ExampleIndex.load(folder, use_gpu=False)
    index.check_updatable()
    if check is not None:
        check(index)
    index._check_labels(records)
    known = _stored_vectors(index)
    texts = list(dict.fromkeys(r.input for r in records if r.input not in known))
    if texts and embed is None:
        raise ValueError("update_index: new texts to embed but no embedder given")
    fresh = dict(zip(texts, _check_vectors(embed(texts), len(texts), index.dim, "embedder"))) if texts else {}
    with store.writer_lock(folder, lock_timeout, what=f"index {str(folder)!r}"):
        if index_version(folder) != index.version or index.version is None:  # another writer published meanwhile
            index = ExampleIndex.load(folder, use_gpu=False)
            if check is not None:
                check(index)
            known = {**_stored_vectors(index), **fresh}
            late = list(dict.fromkeys(r.input for r in records if r.input not in known))
            fresh.update(zip(late, _check_vectors(embed(late), len(late), index.dim, "embedder")) if late else ())
        vectors = np.stack([fresh[r.input] if r.input in fresh else known[r.input] for r in records]) if records \
            else np.zeros((0, index.dim), np.float32)  # [m, d]
        before = {"version": index.version, "dataset_sha256": index.manifest["dataset_sha256"], "count": len(index)}
        counts = index.upsert(records, vectors) if len(records) else {"added": 0, "replaced": 0, "unchanged": 0}
        counts["removed"] = index.remove(remove_ids) if remove_ids else 0
        if counts["added"] or counts["replaced"] or counts["removed"]:
            _note_change(index, before, counts)
            index.publish_locked(folder, replace=True, template=index.template, extras=index.extras)
    return {**counts, "count": len(index), "version": index.version, "previous": before["version"]}


def _stored_vectors(index: "ExampleIndex") -> dict[str, np.ndarray]:
    """input text -> its stored vector [d]: what an update reuses instead of embedding again."""
    return {r.input: index.vectors[i] for i, r in enumerate(index.records)}


def _note_change(index: "ExampleIndex", before: dict, counts: dict) -> None:
    """Record the update in the manifest: new count and hash, and one more lineage entry (the
    first describes the build), so what was trained on an earlier version can tell."""
    m = index.manifest
    lineage = m.get("lineage") if isinstance(m.get("lineage"), list) else [
        {"dataset_sha256": before["dataset_sha256"], "count": before["count"], "change": "build", "at": m["created"]}]
    m.update(count=len(index), dataset_sha256=index.dataset.sha256, updated=_now(), files={})
    lineage.append({"dataset_sha256": m["dataset_sha256"], "count": m["count"], "change": "update",
                    "parent": before["version"], "at": m["updated"], **counts})
    m["lineage"] = lineage[-MAX_LINEAGE:]


def stale_note(index: "ExampleIndex", trained_on: dict | None, what: str) -> str | None:
    """One line when `trained_on` (the {"dataset_sha256", "count"} of the index something was
    trained on, e.g. a soft prompt's meta["index"]) is an earlier version of `index`; else None
    (the same version, or something unrelated to this index)."""
    sha = trained_on.get("dataset_sha256") if isinstance(trained_on, dict) else None
    lineage = index.manifest.get("lineage")
    if not sha or sha == index.manifest["dataset_sha256"] or not isinstance(lineage, list):
        return None
    shas = [e.get("dataset_sha256") if isinstance(e, dict) else None for e in lineage]
    if sha not in shas:
        return None
    behind = len(shas) - 1 - max(i for i, s in enumerate(shas) if s == sha)
    return (f"{what} was trained on an earlier version of this index ({trained_on.get('count')} records, "
            f"{behind} update{'s' if behind != 1 else ''} ago; now {index.manifest['count']}): "
            "retrain it to use the changed records")


# ----------------------------------------------------------------------------- load helpers

_MANIFEST_TYPES = {
    "format_version": int, "embedder": str, "dim": int, "normalized": bool, "metric": str, "index_type": str,
    "index_params": dict, "count": int, "dataset": str, "dataset_sha256": str, "kind": str, "labels": list,
    "created": str, "files": dict,
}


def _read_manifest(path: Path, bad) -> dict:
    if not path.is_file():
        raise bad("missing file manifest.json")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"manifest.json is not valid JSON ({getattr(e, 'msg', e)})") from None
    if not isinstance(m, dict):
        raise bad("manifest.json is not a JSON object")
    for key, typ in _MANIFEST_TYPES.items():
        if key not in m:
            raise bad(f"manifest.json has no {key!r}")
        if not isinstance(m[key], typ) or (typ is int and isinstance(m[key], bool)):
            raise bad(f"manifest.json: {key!r} should be a {typ.__name__}, got {m[key]!r}")
    if m["metric"] != "inner_product" or m["normalized"] is not True:
        raise bad(f"manifest.json: unsupported metric {m['metric']!r} (normalized={m['normalized']})")
    if not all(isinstance(lab, str) for lab in m["labels"]):
        raise bad("manifest.json: labels must be strings")
    if not (isinstance(m.get("fields", []), list) and all(isinstance(f, str) for f in m.get("fields", []))):
        raise bad("manifest.json: fields must be a list of strings")
    return m


def _parse_record(line: str) -> Record:
    d = json.loads(line)
    ok = isinstance(d, dict) and set(d) == {"id", "input", "output"} and all(isinstance(v, str) for v in d.values())
    if not ok:
        raise ValueError(f"bad record line {line[:60]!r}")
    return Record(d["id"], d["input"], d["output"])


def _faiss_matches(index: faiss.Index, config: IndexConfig, params: dict) -> bool:
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        return False
    if config.index_type is IndexType.FLAT:
        return isinstance(index, faiss.IndexFlat)
    if config.index_type is IndexType.IVF:
        return isinstance(index, faiss.IndexIVFFlat) and index.nlist == params.get("nlist")
    if config.index_type is IndexType.IVFPQ_DISK:
        lists = faiss.downcast_InvertedLists(index.invlists) if isinstance(index, faiss.IndexIVFPQ) else None
        return (isinstance(lists, faiss.OnDiskInvertedLists) and index.nlist == params.get("nlist")
                and index.pq.M == params.get("pq_m") and index.pq.nbits == params.get("pq_nbits"))
    return isinstance(index, faiss.IndexHNSWFlat)
