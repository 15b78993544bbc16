"""ExampleIndex: search vs numpy brute force, persistence, refusal of damaged folders, add()."""

from __future__ import annotations

import json
import os
import random
from datetime import datetime

import numpy as np
import pytest

from icl_engine import index as index_mod
from icl_engine.data import Dataset, TaskKind, make_records
from icl_engine.embed import get_embedder
from icl_engine.index import ExampleIndex, IndexConfig, IndexFormatError, IndexType, index_path, indexes_dir

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
    np.testing.assert_allclose(scores, brute_force(index.vectors, queries, k), atol=1e-5)
    exact = np.einsum("qd,qkd->qk", queries, index.vectors[ids])  # [q, k]
    np.testing.assert_allclose(scores, exact, atol=1e-5)
    assert all(len(set(row)) == k for row in ids.tolist())


def test_flat_search_equals_brute_force(emb):
    ds = make_dataset(200)
    index = ExampleIndex.build(ds, emb)
    queries = emb.encode([" ".join(random.Random(i).choices(WORDS, k=6)) for i in range(40)])
    assert_topk(index, queries[:1], 8)  # one query: the single-threaded scan
    assert_topk(index, queries[:3], 8)
    assert_topk(index, queries, 8)  # many queries: faiss
    assert_topk(index, index.vectors[:25], 1)
    np.testing.assert_array_equal(index.search(index.vectors[:25], 1)[1][:, 0], np.arange(25))


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
    ref = np.argsort(-(queries @ vecs.T), axis=1)[:, :10]
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
    with pytest.raises(ValueError, match="plain folder name"):
        index_path("..")


# ----------------------------------------------------------------------------- persistence


@pytest.mark.parametrize("config", [IndexConfig(), IndexConfig(index_type="ivf", nlist=4, nprobe=2),
                                    IndexConfig(index_type="hnsw", ef_search=32)], ids=["flat", "ivf", "hnsw"])
def test_save_load_round_trip(emb, tmp_path, config):
    ds = make_dataset(120)
    index = ExampleIndex.build(ds, emb, config)
    folder = index.save(tmp_path / "toy")
    loaded = ExampleIndex.load(folder, embedder_name="hashing:64")
    queries = emb.encode(["w1 w2 w3", "w200 w7"] * 3)  # 6 queries: the faiss path for every type
    for a, b in zip(index.search(queries, 8), loaded.search(queries, 8)):
        np.testing.assert_array_equal(a, b)
    assert loaded.records == ds.records and loaded.dataset.sha256 == ds.sha256
    np.testing.assert_array_equal(loaded.vectors, index.vectors)
    assert loaded.config.index_type is config.index_type and loaded.manifest == index.manifest
    m = json.loads((folder / "manifest.json").read_text())
    assert list(m) == sorted(m)
    assert m["format_version"] == 1 and m["embedder"] == "hashing:64" and m["dim"] == 64 and m["count"] == 120
    assert m["normalized"] is True and m["metric"] == "inner_product" and m["kind"] == "classification"
    assert m["labels"] == ["neg", "pos"] and m["dataset_sha256"] == ds.sha256 and m["dataset"] == "toy"
    assert datetime.fromisoformat(m["created"]).utcoffset().total_seconds() == 0
    assert sorted(m["files"]) == ["index.faiss", "records.jsonl", "vectors.npy"]
    assert all(m["files"][f]["size"] == (folder / f).stat().st_size for f in m["files"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy"]  # no temp folders left


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
    harm(folder)
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


def test_failed_save_leaves_the_old_index_intact(emb, tmp_path, monkeypatch):
    folder = tmp_path / "toy"
    old = ExampleIndex.build(make_dataset(30, seed=1), emb)
    old.save(folder)
    new = ExampleIndex.build(make_dataset(50, seed=2), emb)

    def boom(*a, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(index_mod.np, "save", boom)  # fails midway through writing the new files
    with pytest.raises(OSError, match="disk full"):
        new.save(folder)
    monkeypatch.undo()

    renames = []
    real_rename = os.rename

    def rename_fails_second_time(src, dst):  # old moved aside, then moving the new one in fails
        renames.append(dst)
        if len(renames) == 2:
            raise OSError("interrupted")
        real_rename(src, dst)

    monkeypatch.setattr(index_mod.os, "rename", rename_fails_second_time)
    with pytest.raises(OSError, match="interrupted"):
        new.save(folder)
    monkeypatch.undo()

    loaded = ExampleIndex.load(folder)
    assert loaded.records == old.records and loaded.manifest["count"] == 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy"]
    new.save(folder)  # and a save that succeeds replaces it
    assert ExampleIndex.load(folder).manifest["count"] == 50
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy"]


def test_save_keeps_extra_files_and_refuses_foreign_folders(emb, tmp_path):
    index = ExampleIndex.build(make_dataset(10), emb)
    folder = index.save(tmp_path / "toy")
    (folder / "template.json").write_text("{}")
    index.save(folder)
    assert (folder / "template.json").read_text() == "{}"
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an index folder"):
        index.save(tmp_path / "docs")
    assert (tmp_path / "docs" / "notes.txt").read_text() == "mine"


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
