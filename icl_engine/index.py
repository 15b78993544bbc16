"""Stage 3: a persistent, searchable pool of demonstration candidates.

    index = ExampleIndex.build(dataset, get_embedder("hashing:256"))
    scores, ids = index.search(query_vectors, k=8)    # [q, 8] float32, [q, 8] int64 row ids
    index.save(index_path("rt"))                      # indexes/rt/
    index = ExampleIndex.load(index_path("rt"), embedder_name="hashing:256")

Vectors are unit norm, so inner product = cosine. faiss does the search: exact (`flat`, default)
or approximate (`ivf`, `hnsw`) for large pools, on GPU when faiss sees one. `vectors` stays in
memory as well, because MMR selection needs the candidates' vectors.

On disk an index is a folder of versions behind an atomic pointer (store.py): each version
holds index.faiss, records.jsonl, vectors.npy, an optional template.json and manifest.json
(which records the sha256 and size of the others). `save` publishes a new version only when
asked to replace and only over an index this engine made; `load` verifies every file against
the manifest and refuses anything off with `IndexFormatError`. Folders written by earlier
releases (the files directly in the folder) are still read.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Iterable

import faiss
import numpy as np

from . import store
from .atomic import nearest_existing
from .data import Dataset, Record, TaskKind
from .embed import canonical_name

__all__ = ["IndexType", "IndexConfig", "ExampleIndex", "IndexFormatError", "IndexExistsError", "IndexWriteError",
           "FORMAT_VERSION", "TEMPLATE_FILE", "indexes_dir", "index_path", "check_index_name", "folder_state",
           "check_writable", "delete_index", "list_indexes", "index_version"]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FAISS_FILE, RECORDS_FILE, VECTORS_FILE = "index.faiss", "records.jsonl", "vectors.npy"
DATA_FILES = (FAISS_FILE, RECORDS_FILE, VECTORS_FILE)
TEMPLATE_FILE = "template.json"  # optional default prompt template stored with a version
_EXTRA = re.compile(r"[a-z][a-z0-9_]{0,40}\.json\Z")  # other JSON files a version may hold
_SMALL_QUERY = 4  # below this many queries a flat CPU search is a single-threaded scan (see search)


class IndexFormatError(ValueError):
    """An index folder that cannot be trusted; the message names the folder and the problem."""


class IndexExistsError(ValueError):
    """A save over an existing index that was not asked to replace it."""


class IndexWriteError(ValueError):
    """A save that must not or cannot happen (a foreign folder, a file in the way, no write access)."""


class IndexType(str, Enum):
    FLAT = "flat"  # exact inner product
    IVF = "ivf"  # inverted lists: k-means cells, search the nprobe nearest cells
    HNSW = "hnsw"  # graph search


@dataclass
class IndexConfig:
    index_type: IndexType = IndexType.FLAT
    nlist: int | None = None  # ivf cells; None: ~4*sqrt(n), at most n/39 (faiss k-means minimum)
    nprobe: int = 16  # ivf cells searched per query
    hnsw_m: int = 32  # hnsw links per node
    ef_construction: int = 80
    ef_search: int = 64
    use_gpu: bool | None = None  # None: faiss GPU when available

    def __post_init__(self):
        try:
            self.index_type = IndexType(self.index_type)
        except ValueError:
            choices = [t.value for t in IndexType]
            raise ValueError(f"index_type must be one of {choices}, got {self.index_type!r}") from None
        for name, low in (("nprobe", 1), ("hnsw_m", 2), ("ef_construction", 1), ("ef_search", 1)):
            _check_int(name, getattr(self, name), low)
        if self.nlist is not None:
            _check_int("nlist", self.nlist, 1)
        if self.use_gpu not in (None, True, False):
            raise ValueError(f"use_gpu must be None, True or False, got {self.use_gpu!r}")


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
    else:
        index = faiss.IndexHNSWFlat(d, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = config.ef_construction
        params = {"hnsw_m": config.hnsw_m, "ef_construction": config.ef_construction, "ef_search": config.ef_search}
    index.add(vectors)
    _set_search_params(index, params)
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


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------- the index


class ExampleIndex:
    """Records + their unit-norm vectors + a faiss index over them. Make one with `build` or `load`."""

    def __init__(self, records: tuple[Record, ...], kind: TaskKind, labels: tuple[str, ...], vectors: np.ndarray,
                 manifest: dict, config: IndexConfig, faiss_index: faiss.Index, gpu_resources=None):
        self.records, self.kind, self.labels = records, kind, labels
        self.vectors = vectors  # [n, d] float32, unit norm; row i belongs to records[i]
        self.manifest, self.config = manifest, config
        self._faiss, self._gpu_res = faiss_index, gpu_resources
        self.template: dict | None = None  # the default prompt template stored with it (prompt.Template's dict)
        self.extras: dict[str, dict] = {}  # other JSON files stored with it, e.g. template_search.json

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
        config = config or IndexConfig()
        if len(dataset) == 0:
            raise ValueError(f"dataset {dataset.name!r} has no records to index")
        ids = [r.id for r in dataset.records]
        if len(set(ids)) != len(ids):
            raise ValueError(f"dataset {dataset.name!r} has duplicate record ids")
        vectors = _check_vectors(embedder.encode([r.input for r in dataset.records]), len(dataset), embedder.dim,
                                 f"embedder {embedder.name!r}")
        cpu_index, params = _make_faiss(vectors, config)
        manifest = {
            "format_version": FORMAT_VERSION, "embedder": embedder.name, "dim": int(vectors.shape[1]),
            "normalized": True, "metric": "inner_product", "index_type": config.index_type.value,
            "index_params": params, "count": len(dataset), "dataset": dataset.name,
            "dataset_sha256": dataset.sha256, "kind": dataset.kind.value, "labels": list(dataset.labels),
            "fields": list(dataset.fields),
            "created": _now(), "files": {},  # files: filled in by save()
        }
        index, res = _to_device(cpu_index, config.use_gpu)
        return cls(dataset.records, dataset.kind, tuple(dataset.labels), vectors, manifest, config, index, res)

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
        if self.config.index_type is IndexType.FLAT and self._gpu_res is None and len(q) < _SMALL_QUERY:
            s, i = self._small_flat_search(q, kk)
        else:
            s, i = self._faiss.search(q, kk)
        scores[:, :kk] = np.where(i >= 0, s, -np.inf)
        ids[:, :kk] = i
        return scores, ids

    def _small_flat_search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k for one or a few queries, single-threaded, from the in-memory vectors.

        A flat scan of one query is memory-bound (~0.6 ms for 12k x 384 on one core). faiss and
        BLAS split it across threads, which saves little when idle and costs 8-16 ms per call on a
        busy machine, where a descheduled worker stalls the hand-off. einsum (no BLAS) never does.
        """
        s = np.einsum("qd,nd->qn", q, self.vectors)  # [q, n]
        top = np.argpartition(-s, k - 1, axis=1)[:, :k]  # [q, k], the k best in any order
        top_s = np.take_along_axis(s, top, axis=1)  # [q, k], unordered
        order = np.argsort(-top_s, axis=1, kind="stable")
        return np.take_along_axis(top_s, order, axis=1), np.take_along_axis(top, order, axis=1).astype(np.int64)

    def add(self, records: Iterable[Record], embedder) -> int:
        """Append records whose id is not in the index yet; returns how many were added.

        Only their texts are embedded (and the embedder's cache skips texts seen before). An IVF
        index keeps its trained cells; rebuild it when the pool changes a lot.
        """
        self._check_embedder(embedder)
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
                # checked again under the lock: another build may have published meanwhile
                legacy = check_writable(folder, replace=replace) == "legacy"
                store.publish(folder, lambda tmp: self._write(tmp, template, extras))
                if legacy:  # the layout-1 files at the top are now shadowed by CURRENT
                    for name in (*DATA_FILES, MANIFEST, TEMPLATE_FILE):
                        (folder / name).unlink(missing_ok=True)
                _remove_stale_siblings(folder)
        except BaseException:
            if created and store.only_leftovers(folder):  # a failed first build leaves nothing
                shutil.rmtree(folder, ignore_errors=True)
            raise
        return folder

    def _write(self, tmp: Path, template: dict | None, extras: dict[str, dict]) -> None:
        faiss.write_index(_to_cpu(self._faiss), str(tmp / FAISS_FILE))
        lines = [json.dumps(r.to_json(), ensure_ascii=False, sort_keys=True) for r in self.records]
        (tmp / RECORDS_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
        np.save(tmp / VECTORS_FILE, self.vectors, allow_pickle=False)
        names = list(DATA_FILES)
        if template is not None:
            (tmp / TEMPLATE_FILE).write_text(json.dumps(template, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            names.append(TEMPLATE_FILE)
        for name, obj in extras.items():
            (tmp / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            names.append(name)
        files = {}
        for name in names:
            data = (tmp / name).read_bytes()
            files[name] = {"sha256": _sha256(data), "size": len(data)}
        self.manifest["files"] = files
        self.manifest["created_by"] = "icl_engine"
        (tmp / MANIFEST).write_text(json.dumps(self.manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        self.template, self.extras = template, extras

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
        blobs = {}
        optional = (TEMPLATE_FILE,) if TEMPLATE_FILE in m["files"] else ()
        extra_names = sorted(n for n in m["files"] if n not in (*DATA_FILES, TEMPLATE_FILE))
        if not all(_EXTRA.match(n) for n in extra_names):
            raise bad(f"manifest.json lists files that are not the index's: {extra_names}")
        for name in (*DATA_FILES, *optional, *extra_names):  # read once, verify, then parse those very bytes
            entry = m["files"].get(name)
            if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                    and isinstance(entry.get("size"), int)):
                raise bad(f"manifest.json has no valid entry for {name}")
            if not (version / name).is_file():
                raise bad(f"missing file {name}")
            data = (version / name).read_bytes()
            if len(data) != entry["size"]:
                raise bad(f"{name} is {len(data)} bytes, the manifest says {entry['size']} (truncated or modified)")
            if _sha256(data) != entry["sha256"]:
                raise bad(f"{name} does not match its sha256 in manifest.json (corrupt or modified)")
            blobs[name] = data
        try:
            vectors = np.load(io.BytesIO(blobs[VECTORS_FILE]), allow_pickle=False)
            records = tuple(_parse_record(line) for line in blobs[RECORDS_FILE].decode("utf-8").split("\n") if line)
            cpu_index = faiss.deserialize_index(np.frombuffer(blobs[FAISS_FILE], dtype=np.uint8))
            template = json.loads(blobs[TEMPLATE_FILE]) if optional else _legacy_template(version)
            extras = {name: json.loads(blobs[name]) for name in extra_names}
        except (ValueError, TypeError, KeyError, RuntimeError, UnicodeDecodeError) as e:
            first_line = str(e).splitlines()[0] if str(e) else ""
            raise bad(f"unreadable index files ({type(e).__name__}: {first_line})") from None
        n, d = m["count"], m["dim"]
        if len(records) != n or len({r.id for r in records}) != n:
            raise bad(f"records.jsonl holds {len(records)} records (distinct ids expected), "
                      f"the manifest's count is {n}")
        if vectors.dtype != np.float32 or vectors.ndim != 2 or len(vectors) != n:
            raise bad(f"vectors.npy is {vectors.dtype} {list(vectors.shape)}, expected float32 [{n}, {d}]")
        for what, dim in (("vectors.npy", vectors.shape[1]), ("index.faiss", cpu_index.d)):
            if dim != d:
                raise bad(f"dimension mismatch: {what} has dim {dim}, the manifest says {d}")
        if cpu_index.ntotal != n:
            raise bad(f"index.faiss holds {cpu_index.ntotal} vectors, the manifest's count is {n}")
        if not _faiss_matches(cpu_index, config, m["index_params"]):
            raise bad(f"index.faiss is a {type(cpu_index).__name__}, "
                      f"not the manifest's {m['index_type']} {m['index_params']}")
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
        return loaded


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
    return isinstance(index, faiss.IndexHNSWFlat)
