"""ExampleIndex: search vs numpy brute force, persistence, refusal of damaged folders, add()."""

from __future__ import annotations

import json
import random
from datetime import datetime

import numpy as np
import pytest

from icl_engine.core import index as index_mod
from icl_engine.core.choices import IndexType
from icl_engine.core.data import Dataset, TaskKind, make_records
from icl_engine.core.embed import get_embedder
from icl_engine.core.index import (
    ExampleIndex,
    IndexConfig,
    IndexExistsError,
    IndexFormatError,
    IndexWriteError,
    delete_index,
    folder_state,
    index_path,
    indexes_dir,
    list_indexes,
    store,
)
from icl_engine.core.index.store import current_version

from numerics import assert_separated, dot_tol

WORDS = [f"w{i}" for i in range(300)]


def make_dataset(n: int, seed: int = 0, name: str = "toy") -> Dataset:
    rng = random.Random(seed)
    pairs = [(" ".join(rng.choices(WORDS, k=8)), rng.choice(["neg", "pos"])) for _ in range(n)]
    return Dataset(name, TaskKind.CLASSIFICATION, make_records(pairs), ("neg", "pos"))


@pytest.fixture(scope="module")
def emb():
    return get_embedder("hashing:64")


def brute_force(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return -np.sort(-(queries @ vectors.T), axis=1)[:, :k]  # [q, k] best scores


def assert_topk(index: ExampleIndex, queries: np.ndarray, k: int) -> None:
    """Same scores as brute force, and every returned id really has its score (ties aside)."""
    scores, ids = index.search(queries, k)
    assert scores.dtype == np.float32 and ids.dtype == np.int64 and scores.shape == ids.shape == (len(queries), k)
    tol = dot_tol(queries.shape[1])  # unit vectors
    np.testing.assert_allclose(scores, brute_force(index.vectors, queries, k), atol=tol)
    exact = np.einsum("qd,qkd->qk", queries, index.vectors[ids])  # [q, k]
    np.testing.assert_allclose(scores, exact, atol=tol)
    assert all(len(set(row)) == k for row in ids.tolist())


def test_flat_search_equals_brute_force(emb):
    ds = make_dataset(200)
    index = ExampleIndex.build(ds, emb)
    queries = emb.encode([" ".join(random.Random(i).choices(WORDS, k=6)) for i in range(40)])
    assert_topk(index, queries[:1], 8)
    assert_topk(index, queries[:3], 8)
    assert_topk(index, queries, 8)
    assert_topk(index, index.vectors[:25], 1)
    np.testing.assert_array_equal(index.search(index.vectors[:25], 1)[1][:, 0], np.arange(25))


def test_flat_topk_breaks_ties_by_row_alone_or_batched(monkeypatch):
    """Ties broken by the lower row, and a query gets the same rows and scores alone, in a
    batch, and in a batch split into blocks of queries or of re-scored pairs. The ties are exact
    by construction, not by rounding luck: the vectors hold small integers, so every float32 dot
    product (at most 16 * 9 = 144) is exact, equal to the float64 brute force's, and duplicate
    rows (and many distinct ones) score exactly the same."""
    rng = np.random.default_rng(0)
    base = rng.integers(-3, 4, size=(40, 16)).astype(np.float32)
    vectors = np.concatenate([base, base[::-1], base[:7]])  # [87, 16]: every row duplicated, some twice
    queries = np.concatenate([vectors[[3, 50, 85]], rng.integers(-3, 4, size=(30, 16)).astype(np.float32)])  # [33, 16]
    exact = queries.astype(np.float64) @ vectors.T.astype(np.float64)  # [33, 87], integers
    assert (queries @ vectors.T == exact).all()  # float32 computes them exactly too
    want = np.lexsort((np.broadcast_to(np.arange(87), (33, 87)), -exact), axis=1)
    for k in (1, 5, 87):
        scores, rows = index_mod.flat_topk(queries, vectors, k)
        np.testing.assert_array_equal(rows, want[:, :k])
        np.testing.assert_array_equal(scores, np.take_along_axis(exact, rows, 1))
        alone = [index_mod.flat_topk(q[None], vectors, k) for q in queries]
        np.testing.assert_array_equal(rows, np.concatenate([r for _, r in alone]))
        np.testing.assert_array_equal(scores, np.concatenate([s for s, _ in alone]))
        for knob, value in (("_SCORE_BLOCK", 87 * 4), ("_PAIR_FLOATS", 16 * 3)):  # 4 queries, 3 pairs a block
            monkeypatch.setattr(index_mod, knob, value)
            blocked = index_mod.flat_topk(queries, vectors, k)
            monkeypatch.undo()
            np.testing.assert_array_equal(rows, blocked[1])
            np.testing.assert_array_equal(scores, blocked[0])
    assert index_mod.flat_topk(queries[:0], vectors, 3)[1].shape == (0, 3)
    index = ExampleIndex.from_vectors(make_dataset(87), vectors, "hashing:16")  # the flat index searches this way
    np.testing.assert_array_equal(index.search(queries, 5)[1], want[:, :5])  # (faiss ordered these ties otherwise)
    np.testing.assert_array_equal(index.search(queries[4], 5)[1], want[4:5, :5])


def test_rank_pairs_equals_lexsort():
    """flat_topk's one-key sort of (query, score, row) gives np.lexsort's order: ties broken by
    the row, -0.0 tying 0.0, subnormals and infinities in place, any block and pool size."""
    rng = np.random.default_rng(1)
    special = np.array([0.0, -0.0, 1.5, -1.5, 3e-39, -3e-39, np.inf, -np.inf, 0.25], np.float32)
    for _ in range(200):
        b, n = int(rng.integers(1, 50)), int(rng.integers(1, 3000))
        flat = rng.choice(b * n, size=min(b * n, int(rng.integers(0, 400))), replace=False)  # distinct pairs
        r, c = flat // n, flat % n
        score = rng.normal(size=len(flat)).astype(np.float32)
        score = np.where(rng.random(len(flat)) < 0.5, rng.choice(special, len(flat)), score)
        np.testing.assert_array_equal(index_mod._rank_pairs(r, score, c, b, n), np.lexsort((c, -score, r)))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_flat_topk_first_pass_never_decides_an_order(monkeypatch, dtype):
    """Rows 3e-5 apart in cosine around 0.952, far below bfloat16's step there (2^-8) and across
    one of its rounding boundaries: the fast scores alone order them wrongly (asserted, so the
    data exercises the re-check), and a true top-k row can score below the k-th fast score
    (with no error window this test fails), yet flat_topk returns the float64 brute force's
    rows, with its rows in groups (_GROUP) or one by one."""
    import torch

    rng = np.random.default_rng(0)
    d = 48
    queries = rng.normal(size=(3, d))
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    near = []
    for q in queries:  # 60 rows per query at cosines 0.952, 0.95197, ... in random row order
        w = rng.normal(size=(60, d))
        w -= (w @ q)[:, None] * q
        w /= np.linalg.norm(w, axis=1, keepdims=True)
        cos = rng.permutation(0.952 - 3e-5 * np.arange(60))
        near.append(cos[:, None] * q + np.sqrt(1 - cos**2)[:, None] * w)
    other = np.random.default_rng(101)  # rows and queries with no float32 near-tie (asserted below)
    vectors = np.concatenate([*near, other.normal(size=(100, d))]).astype(np.float32)  # [280, d]
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = np.concatenate([queries, other.normal(size=(5, d)) / np.sqrt(d)]).astype(np.float32)  # [8, d]
    s64 = queries.astype(np.float64) @ vectors.T.astype(np.float64)
    want = np.lexsort((np.broadcast_to(np.arange(len(vectors)), s64.shape), -s64), axis=1)
    for row in s64:  # the built near-ties are 3e-5 apart; no other pair is nearer than rounding reaches
        assert_separated(row, d, top=41)
    first = index_mod.FirstPass.of(vectors, "bfloat16")
    bf16 = (torch.from_numpy(queries).to(torch.bfloat16) @ first.matrix).float().numpy()
    assert (np.argsort(-bf16, axis=1, kind="stable")[:3, :8] != want[:3, :8]).any(1).all()
    first = index_mod.FirstPass.of(vectors, dtype)
    for group in (index_mod._GROUP, 1):
        monkeypatch.setattr(index_mod, "_GROUP", group)
        for k in (1, 8, 40):
            scores, rows = index_mod.flat_topk(queries, vectors, k, first=first)
            np.testing.assert_array_equal(rows, want[:, :k])
            np.testing.assert_array_equal(scores, (queries[:, None] * vectors[rows]).sum(2, dtype=np.float32))
    with pytest.raises(ValueError, match="dtype"):
        index_mod.FirstPass.of(vectors, "int8")


def test_search_pads_and_validates(emb):
    index = ExampleIndex.build(make_dataset(5), emb)
    scores, ids = index.search(index.vectors[0], 8)  # a [d] query is [1, d]
    assert ids.shape == (1, 8) and (ids[0, 5:] == -1).all() and np.isneginf(scores[0, 5:]).all()
    assert sorted(ids[0, :5].tolist()) == list(range(5))
    assert index.search(index.vectors, 0)[0].shape == (5, 0)
    with pytest.raises(ValueError, match="query vectors"):
        index.search(np.zeros((2, 3), np.float32), 2)
    with pytest.raises(ValueError, match="k must be"):
        index.search(index.vectors, -1)


@pytest.mark.parametrize("config", [
    IndexConfig(index_type="ivf", nlist=8, nprobe=8),
    IndexConfig(index_type=IndexType.HNSW, hnsw_m=16, ef_construction=200, ef_search=400),
], ids=["ivf", "hnsw"])
def test_approximate_indexes_are_exact_when_searching_everything(config):
    rng = np.random.default_rng(0)
    ds = make_dataset(400)
    vecs = rng.standard_normal((len(ds), 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    row = {r.input: i for i, r in enumerate(ds.records)}

    class Fixed:  # random vectors: no ties, so the top-k must match exactly
        name, dim = "fixed", 16

        def encode(self, texts):
            return vecs[[row[t] for t in texts]]

    index = ExampleIndex.build(ds, Fixed(), config)
    queries = rng.standard_normal((30, 16)).astype(np.float32)
    scores, ids = index.search(queries, 10)
    exact = queries.astype(np.float64) @ vecs.T.astype(np.float64)
    scale = np.linalg.norm(queries, axis=1).max() * np.linalg.norm(vecs, axis=1).max()
    for row in exact:
        assert_separated(row, 16, top=11, scale=scale)
    ref = np.argsort(-exact, axis=1)[:, :10]
    np.testing.assert_array_equal(ids, ref)
    assert index.manifest["index_type"] == config.index_type.value


def test_ivf_nlist_is_lowered_when_too_few_vectors(emb):
    with pytest.warns(UserWarning, match="using nlist=20"):
        index = ExampleIndex.build(make_dataset(20), emb, IndexConfig(index_type="ivf", nlist=50))
    assert index.manifest["index_params"] == {"nlist": 20, "nprobe": 16}
    auto = ExampleIndex.build(make_dataset(100), emb, IndexConfig(index_type="ivf"))
    assert auto.manifest["index_params"]["nlist"] == 2  # 100 // 39: enough points per cell


@pytest.mark.parametrize("field, value", [("nprobe", 0), ("nlist", 0), ("hnsw_m", 1), ("ef_search", 1.5),
                                          ("index_type", "lsh"), ("use_gpu", "yes")])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        IndexConfig(**{field: value})


def test_locations(tmp_path, monkeypatch):
    monkeypatch.delenv("ICL_INDEXES", raising=False)
    assert indexes_dir() == indexes_dir(None) == type(tmp_path)("indexes")
    monkeypatch.setenv("ICL_INDEXES", str(tmp_path))
    assert index_path("rt") == tmp_path / "rt"
    assert index_path("rt", tmp_path / "other") == tmp_path / "other" / "rt"
    assert index_path(str(tmp_path / "x" / "rt")) == tmp_path / "x" / "rt"
    for bad in ("..", ".", "", ".hidden", "-rf", "x" * 101, "a b", "ü"):
        with pytest.raises(ValueError, match="must be 1-100 letters"):
            index_path(bad)
    for bad in ("a/b", "../x", str(tmp_path / "abs")):  # a path is read, never written
        with pytest.raises(ValueError, match="must be 1-100 letters"):
            index_path(bad, for_write=True)
    assert index_path("r.t-2_x", for_write=True) == tmp_path / "r.t-2_x"


# ----------------------------------------------------------------------------- persistence


@pytest.mark.parametrize("config", [IndexConfig(), IndexConfig(index_type="ivf", nlist=4, nprobe=2),
                                    IndexConfig(index_type="hnsw", ef_search=32)], ids=["flat", "ivf", "hnsw"])
def test_save_load_round_trip(emb, tmp_path, config):
    ds = make_dataset(120)
    index = ExampleIndex.build(ds, emb, config)
    folder = index.save(tmp_path / "toy")
    assert folder == tmp_path / "toy"
    loaded = ExampleIndex.load(folder, embedder_name="hashing:64")
    queries = emb.encode(["w1 w2 w3", "w200 w7"] * 3)  # 6 queries: the faiss path for every type
    for a, b in zip(index.search(queries, 8), loaded.search(queries, 8)):
        np.testing.assert_array_equal(a, b)
    assert loaded.records == ds.records and loaded.dataset.sha256 == ds.sha256
    np.testing.assert_array_equal(loaded.vectors, index.vectors)
    assert loaded.config.index_type is config.index_type and loaded.manifest == index.manifest
    version = current_version(folder)
    m = json.loads((version / "manifest.json").read_text())
    assert list(m) == sorted(m)
    assert m["format_version"] == 1 and m["embedder"] == "hashing:64" and m["dim"] == 64 and m["count"] == 120
    assert m["normalized"] is True and m["metric"] == "inner_product" and m["kind"] == "classification"
    assert m["labels"] == ["neg", "pos"] and m["dataset_sha256"] == ds.sha256 and m["dataset"] == "toy"
    assert datetime.fromisoformat(m["created"]).utcoffset().total_seconds() == 0
    assert sorted(m["files"]) == ["index.faiss", "records.jsonl", "vectors.npy"]
    assert all(m["files"][f]["size"] == (version / f).stat().st_size for f in m["files"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy"]  # no temp folders left
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "CURRENT", version.name]


def _rehash(folder, name):
    """Update a file's manifest entry, so only the deeper consistency checks can catch the edit."""
    import hashlib

    m = json.loads((folder / "manifest.json").read_text())
    data = (folder / name).read_bytes()
    m["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (folder / "manifest.json").write_text(json.dumps(m))


def _edit_manifest(**changes):
    def edit(folder):
        m = json.loads((folder / "manifest.json").read_text())
        m.update(changes)
        (folder / "manifest.json").write_text(json.dumps(m))
    return edit


def _truncate(name):
    def cut(folder):
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])
    return cut


def _flip_byte(folder):
    data = bytearray((folder / "vectors.npy").read_bytes())
    data[-3] ^= 0x01
    (folder / "vectors.npy").write_bytes(bytes(data))


def _other_dim_vectors(folder):
    np.save(folder / "vectors.npy", np.zeros((60, 32), np.float32))
    _rehash(folder, "vectors.npy")


def _wrong_index_type(folder):
    m = json.loads((folder / "manifest.json").read_text())
    m["index_type"], m["index_params"] = "hnsw", {"hnsw_m": 32, "ef_construction": 80, "ef_search": 64}
    (folder / "manifest.json").write_text(json.dumps(m))


DAMAGE = {
    "truncated faiss": (_truncate("index.faiss"), "index.faiss is .* bytes"),
    "truncated records": (_truncate("records.jsonl"), "records.jsonl"),
    "corrupt vectors": (_flip_byte, "vectors.npy does not match its sha256"),
    "missing file": (lambda f: (f / "vectors.npy").unlink(), "missing file vectors.npy"),
    "missing manifest": (lambda f: (f / "manifest.json").unlink(), "missing file manifest.json"),
    "invalid json": (lambda f: (f / "manifest.json").write_text('{"count": 6'), "not valid JSON"),
    "edited count": (_edit_manifest(count=61), "holds 60 records .*count is 61"),
    "edited dim": (_edit_manifest(dim=128), "dimension mismatch: vectors.npy has dim 64, the manifest says 128"),
    "dimension mismatch": (_other_dim_vectors, "dimension mismatch: vectors.npy has dim 32, the manifest says 64"),
    "edited dataset hash": (_edit_manifest(dataset_sha256="0" * 64), "dataset_sha256"),
    "edited labels": (_edit_manifest(labels=["neg"]), "labels outside"),
    "edited index type": (_wrong_index_type, "not the manifest's hnsw"),
    "format version": (_edit_manifest(format_version=99), "format version 99"),
    "bad kind": (_edit_manifest(kind="regression"), "regression"),
    "wrong type": (_edit_manifest(count="60"), "'count' should be a int"),
    "edited records": (lambda f: ((f / "records.jsonl").write_text("[]\n"), _rehash(f, "records.jsonl")), "unreadable"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_index_is_refused(emb, tmp_path, damage):
    folder = ExampleIndex.build(make_dataset(60), emb).save(tmp_path / "toy")
    harm, message = DAMAGE[damage]
    harm(current_version(folder))
    with pytest.raises(IndexFormatError, match=message) as err:
        ExampleIndex.load(folder)
    assert str(err.value).startswith(f"{folder}: ") and "\n" not in str(err.value)


def test_wrong_embedder_and_missing_folder_are_refused(emb, tmp_path):
    folder = ExampleIndex.build(make_dataset(10), emb).save(tmp_path / "toy")
    with pytest.raises(IndexFormatError, match="built with embedder 'hashing:64', not 'hashing:32'"):
        ExampleIndex.load(folder, embedder_name="hashing:32")
    with pytest.raises(IndexFormatError, match="no such index folder"):
        ExampleIndex.load(tmp_path / "nope")
    assert issubclass(IndexFormatError, ValueError)


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("fail", ["np.save", "rename", "pointer"])
def test_failed_save_leaves_the_old_index_intact(emb, tmp_path, monkeypatch, fail):
    folder = tmp_path / "toy"
    old = ExampleIndex.build(make_dataset(30, seed=1), emb)
    old.save(folder)
    before = _names(folder)
    new = ExampleIndex.build(make_dataset(50, seed=2), emb)

    def boom(*a, **kw):
        raise OSError("disk full")

    target = {"np.save": (index_mod.np, "save"), "rename": (store.os, "rename"), "pointer": (store.os, "replace")}
    monkeypatch.setattr(*target[fail], boom)  # writing the files / publishing the version / the switch fails
    with pytest.raises(OSError, match="disk full"):
        new.save(folder, replace=True)
    monkeypatch.undo()

    loaded = ExampleIndex.load(folder)
    assert loaded.records == old.records and loaded.manifest["count"] == 30
    assert _names(tmp_path) == ["toy"]
    assert _names(folder) == before
    new.save(folder, replace=True)  # and a save that succeeds replaces it, and cleans up
    assert ExampleIndex.load(folder).manifest["count"] == 50
    assert _names(tmp_path) == ["toy"] and len([n for n in _names(folder) if n.startswith("v-")]) == 2


def test_failed_first_save_leaves_nothing(emb, tmp_path, monkeypatch):
    monkeypatch.setattr(index_mod.np, "save", lambda *a, **kw: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        ExampleIndex.build(make_dataset(10), emb).save(tmp_path / "toy")
    assert _names(tmp_path) == []


def test_save_replaces_only_when_asked_and_only_its_own_folders(emb, tmp_path):
    index = ExampleIndex.build(make_dataset(10), emb)
    folder = index.save(tmp_path / "toy", template={"instruction": "sentiment"})
    assert ExampleIndex.load(folder).template == {"instruction": "sentiment"}
    with pytest.raises(IndexExistsError, match="'toy' already exists .*--force"):
        index.save(folder)
    index.save(folder, replace=True)  # a rebuild never inherits the old version's template
    assert ExampleIndex.load(folder).template is None
    # the data-loss report: a folder with a manifest.json is not an index
    app = tmp_path / "app"
    for sub in ("src", ".git"):
        (app / sub).mkdir(parents=True)
    (app / "manifest.json").write_text("{}")
    (app / ".env").write_text("SECRET=1")
    (tmp_path / "file").write_text("mine")
    for target in (app, tmp_path / "file", tmp_path / "file" / "x"):
        with pytest.raises(IndexWriteError):
            index.save(target, replace=True)
        with pytest.raises(ValueError, match="not an index made by icl_engine|no such index"):
            delete_index(target)
    assert _names(app) == [".env", ".git", "manifest.json", "src"] and (app / ".env").read_text() == "SECRET=1"
    assert (tmp_path / "file").read_text() == "mine"


def test_layout_1_indexes_are_read_and_replaced_in_place(emb, tmp_path):
    """Folders written by earlier releases: the files directly in the folder."""
    index = ExampleIndex.build(make_dataset(12), emb)
    version = current_version(index.save(tmp_path / "new"))
    legacy = tmp_path / "old"
    legacy.mkdir()
    for p in version.iterdir():
        (legacy / p.name).write_bytes(p.read_bytes())
    (legacy / "template.json").write_text('{"instruction": "x"}')
    loaded = ExampleIndex.load(legacy)
    assert loaded.records == index.records and loaded.template == {"instruction": "x"}
    assert folder_state(legacy) == "legacy"
    with pytest.raises(IndexExistsError):
        index.save(legacy)
    index.save(legacy, replace=True)
    assert folder_state(legacy) == "index" and not (legacy / "manifest.json").exists()
    assert ExampleIndex.load(legacy).records == index.records and ExampleIndex.load(legacy).template is None


def test_delete_and_list(emb, tmp_path):
    for name in ("b", "a"):
        ExampleIndex.build(make_dataset(5), emb).save(tmp_path / name)
    (tmp_path / "notes").mkdir()
    assert [p.name for p in list_indexes(tmp_path)] == ["a", "b"]
    delete_index(tmp_path / "a")
    assert _names(tmp_path) == ["b", "notes"]
    with pytest.raises(IndexFormatError, match="no such index"):
        delete_index(tmp_path / "a")


def test_interrupted_first_build_is_not_an_index_and_is_cleaned(emb, tmp_path):
    folder = tmp_path / "toy"
    (folder / ".tmp-0123abcd").mkdir(parents=True)
    (folder / ".lock").write_text("")
    with pytest.raises(IndexFormatError, match="interrupted build"):
        ExampleIndex.load(folder)
    assert folder_state(folder) == "none"
    ExampleIndex.build(make_dataset(5), emb).save(folder)  # no --force needed: nothing to replace
    assert ".tmp-0123abcd" not in _names(folder)


def test_stale_folders_of_earlier_releases_are_removed(emb, tmp_path):
    for stale in (".toy.old-0123abcd", ".toy.tmp-89abcdef", ".toy.deleted-00000000"):
        (tmp_path / stale).mkdir()
    (tmp_path / ".other.old-0123abcd").mkdir()
    ExampleIndex.build(make_dataset(5), emb).save(tmp_path / "toy")
    assert _names(tmp_path) == [".other.old-0123abcd", "toy"]


def test_writer_lock_times_out_with_one_line(emb, tmp_path):
    folder = ExampleIndex.build(make_dataset(5), emb).save(tmp_path / "toy")
    with store.writer_lock(folder):
        with pytest.raises(store.LockTimeoutError, match="being written by another process"):
            ExampleIndex.build(make_dataset(6), emb).save(folder, replace=True, lock_timeout=0.2)
    ExampleIndex.build(make_dataset(6), emb).save(folder, replace=True, lock_timeout=0.2)


def test_reader_retries_when_the_version_changes_under_it(emb, tmp_path, monkeypatch):
    folder = ExampleIndex.build(make_dataset(5, seed=1), emb).save(tmp_path / "toy")
    new = ExampleIndex.build(make_dataset(7, seed=2), emb)
    real = ExampleIndex._load_version.__func__
    calls = []

    def racing(cls, version, *args):
        calls.append(version.name)
        if len(calls) == 1:  # a rebuild publishes (and collects) while this read is under way
            new.save(folder, replace=True)
            new.save(folder, replace=True)
        return real(cls, version, *args)

    monkeypatch.setattr(ExampleIndex, "_load_version", classmethod(racing))
    assert len(ExampleIndex.load(folder)) == 7 and len(calls) == 2 and calls[0] != calls[1]


# ----------------------------------------------------------------------------- add


def test_add_appends_and_embeds_only_new_texts(tmp_path):
    full = make_dataset(40)
    emb = get_embedder("hashing:64", cache_dir=tmp_path / "cache")
    emb.encode([r.input for r in full.records[30:35]])  # these texts are cached already
    seen: list[str] = []
    inner = emb._embed
    emb._embed = lambda texts: (seen.extend(texts), inner(texts))[1]

    index = ExampleIndex.build(full.select(range(30)), emb)
    assert len(seen) == 30
    seen.clear()
    assert index.add(full.records[25:40], emb) == 10  # 25..29 are present: skipped
    assert sorted(seen) == sorted(r.input for r in full.records[35:40])  # 30..34 came from the cache
    assert index.records == full.records and index.vectors.shape == (40, 64)
    assert index.manifest["count"] == 40 and index.manifest["dataset_sha256"] == full.sha256
    assert_topk(index, index.vectors[:30], 5)
    assert index.add(full.records, emb) == 0

    loaded = ExampleIndex.load(index.save(tmp_path / "toy"))
    assert loaded.records == full.records and loaded.dataset.sha256 == full.sha256
    seen.clear()
    ExampleIndex.build(full, emb)  # a rebuild with a warm cache embeds nothing
    assert seen == []


def test_add_refuses_other_embedders_and_labels(emb):
    index = ExampleIndex.build(make_dataset(10), emb)
    with pytest.raises(ValueError, match="does not match"):
        index.add(make_dataset(3, seed=5).records, get_embedder("hashing:32"))
    odd = make_records([("w1 w2", "neutral")])
    with pytest.raises(ValueError, match="neutral"):
        index.add(odd, emb)
    assert len(index) == 10
