"""IVF-PQ with its inverted lists on disk, for pools whose vectors do not fit in RAM (tens of
millions): faiss's OnDiskInvertedLists, filled shard by shard with faiss.contrib.ondisk.merge_ondisk.

    cfg = OnDiskConfig(nlist=4096, m=48)
    path = build_ondisk(shards, dim=384, folder=Path("big-ivfpq"), config=cfg, train=sample)  # shards: [n_i, d] each
    index = open_ondisk(path, nprobe=32)        # memory: centroids + codebooks; lists are mmapped
    scores, ids = index.search(queries, 8)      # ids: global row numbers, in shard order
    scores, ids = search_reranked(index, open_vectors(path.parent, 384), queries, 8)  # exact re-rank of 64
    recall_at_k(ids, flat_ids)                  # against exact search

How: train IVF-PQ on a sample (k-means cells + product-quantizer codebooks: the only step that
sees raw vectors together), write the empty trained index; add each shard to a copy of it and
write that shard's lists (one process or one Ray worker per shard: shards are independent);
merge_ondisk concatenates the lists into one .ivfdata file, which search reads through mmap. A
vector costs m bytes (+8 for its id) in the lists instead of 4*d in RAM: 384-d with m = 48 is 56
bytes against 1,536. PQ alone ranks coarsely, so the raw vectors are kept on disk too
(vectors.f32) and `search_reranked` re-scores the PQ's k*factor candidates exactly: a few dozen
random row reads per query for most of flat search's recall. This is a stand-alone index (ids -> rows of the caller's record store); the
engine's ExampleIndex keeps vectors in RAM for MMR and stays the default below a few million.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import faiss
import numpy as np
from faiss.contrib.ondisk import merge_ondisk

__all__ = ["OnDiskConfig", "build_ondisk", "open_ondisk", "open_vectors", "search_reranked", "recall_at_k",
           "INDEX_FILE", "DATA_FILE", "VECTORS_FILE"]

INDEX_FILE, DATA_FILE = "populated.index", "lists.ivfdata"
VECTORS_FILE = "vectors.f32"  # raw float32 rows [n, d], appended shard by shard; read through mmap to re-rank


@dataclass
class OnDiskConfig:
    nlist: int = 1024  # k-means cells; ~4*sqrt(N) to 16*sqrt(N)
    m: int = 48  # PQ sub-quantizers (bytes per vector); must divide the dimension
    nbits: int = 8  # bits per sub-quantizer code
    nprobe: int = 32  # cells searched per query

    def __post_init__(self):
        for name in ("nlist", "m", "nbits", "nprobe"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")


def _trained(dim: int, config: OnDiskConfig, train: np.ndarray) -> faiss.Index:
    if dim % config.m:
        raise ValueError(f"m={config.m} must divide the dimension {dim}")
    need = max(config.nlist * 39, 256 * 39 if config.nbits == 8 else 0)  # faiss's k-means minimum per centroid
    if len(train) < min(need, config.nlist):
        raise ValueError(f"train sample of {len(train)} vectors is too small for nlist={config.nlist}")
    index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, config.nlist, config.m, config.nbits,
                             faiss.METRIC_INNER_PRODUCT)
    index.train(np.ascontiguousarray(train, dtype=np.float32))
    return index


def build_ondisk(shards: Iterable[np.ndarray], *, dim: int, folder: Path, config: OnDiskConfig,
                 train: np.ndarray) -> Path:
    """Train on `train` [t, d], add the `shards` ([n_i, d] each; ids continue across shards) and
    merge their lists into folder/lists.ivfdata; returns the populated index file."""
    trained = _trained(dim, config, train)
    folder.mkdir(parents=True, exist_ok=True)
    faiss.write_index(trained, str(folder / "trained.index"))
    blocks, start = [], 0
    raw = open(folder / VECTORS_FILE, "wb")
    for i, shard in enumerate(shards):  # each shard: read the trained index, add, write its lists
        shard = np.ascontiguousarray(shard, dtype=np.float32)  # [n_i, d]
        raw.write(shard.tobytes())
        index = faiss.read_index(str(folder / "trained.index"))
        index.add_with_ids(shard, np.arange(start, start + len(shard), dtype=np.int64))
        faiss.write_index(index, str(folder / f"block_{i}.index"))
        blocks.append(str(folder / f"block_{i}.index"))
        start += len(shard)
        del index
    raw.close()
    index = faiss.read_index(str(folder / "trained.index"))
    merge_ondisk(index, blocks, str(folder / DATA_FILE))
    faiss.write_index(index, str(folder / INDEX_FILE))
    for b in blocks:  # the merged lists hold everything now
        Path(b).unlink()
    return folder / INDEX_FILE


def open_ondisk(path: Path, nprobe: int = 32) -> faiss.Index:
    """The populated index; its lists stay on disk (mmapped), the cells and codebooks in RAM.
    The .ivfdata file is found by the absolute path written at build time."""
    index = faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR)
    index.nprobe = nprobe
    return index


def open_vectors(folder: Path, dim: int) -> np.ndarray:
    """The raw vectors [n, d] as a read-only memory map (pages are read when a row is used)."""
    return np.memmap(folder / VECTORS_FILE, dtype=np.float32, mode="r").reshape(-1, dim)


def search_reranked(index: faiss.Index, vectors: np.ndarray, queries: np.ndarray, k: int,
                    factor: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """PQ finds k*factor candidates, their exact inner products (raw rows from `vectors`, on
    disk) pick the k best: PQ's coarse ranking, exact scores. -> (scores [q, k], ids [q, k])."""
    q = np.ascontiguousarray(queries, dtype=np.float32)  # [q, d]
    _, cand = index.search(q, k * factor)  # [q, k*factor], -1 where fewer were found
    safe = np.where(cand >= 0, cand, 0)
    exact = np.einsum("qd,qcd->qc", q, vectors[safe.ravel()].reshape(*safe.shape, -1))  # [q, k*factor]
    exact = np.where(cand >= 0, exact, -np.inf)
    top = np.argsort(-exact, axis=1, kind="stable")[:, :k]  # [q, k]
    return np.take_along_axis(exact, top, 1).astype(np.float32), np.take_along_axis(cand, top, 1)


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of the exact top-k ids ([q, k]) that the approximate search found ([q, k])."""
    k = exact.shape[1]
    return float(np.mean([len(set(f[:k]) & set(e)) / k for f, e in zip(found.tolist(), exact.tolist())]))


def default_nlist(n: int) -> int:
    """~4*sqrt(n) cells (faiss's rule of thumb), a power of two."""
    return 2 ** max(4, round(math.log2(4 * math.sqrt(n))))
