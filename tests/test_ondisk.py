"""IVF-PQ with on-disk inverted lists: built shard by shard and merged, it finds the exact
neighbours (recall@8 against a flat index) and its lists live in the .ivfdata file, not in RAM."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from icl_engine.core.index.ondisk import (
    DATA_FILE,
    OnDiskConfig,
    build_ondisk,
    open_ondisk,
    open_vectors,
    recall_at_k,
    search_reranked,
)

from numerics import dot_tol


def clustered(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(64, d))
    x = centers[rng.integers(0, 64, n)] + 0.3 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # [n, d] unit norm


@pytest.mark.slow
def test_ondisk_ivfpq_recall_against_flat(tmp_path):
    d, n = 32, 12000
    x = clustered(n, d, 0)
    q = clustered(200, d, 1)
    cfg = OnDiskConfig(nlist=64, m=16, nprobe=16)
    path = build_ondisk(np.array_split(x, 3), dim=d, folder=tmp_path / "ix", config=cfg, train=x)
    index = open_ondisk(path, nprobe=cfg.nprobe)
    assert index.ntotal == n and (tmp_path / "ix" / DATA_FILE).stat().st_size >= n * cfg.m
    assert isinstance(faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists), faiss.OnDiskInvertedLists)
    flat = faiss.IndexFlatIP(d)
    flat.add(x)
    _, exact = flat.search(q, 8)
    _, found = index.search(q, 8)
    r = recall_at_k(found, exact)
    assert 0.6 < r <= 1.0  # PQ at 16 bytes a vector is lossy; ids are global rows across the shards
    assert recall_at_k(exact, exact) == 1.0
    vectors = open_vectors(tmp_path / "ix", d)
    np.testing.assert_array_equal(vectors, x)  # the raw rows, in shard order
    scores, reranked = search_reranked(index, vectors, q, 8)
    assert recall_at_k(reranked, exact) >= r and recall_at_k(reranked, exact) > 0.9
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", q, x[reranked]), atol=dot_tol(d))  # exact scores
    _, top1 = index.search(x[:50], 1)
    assert np.mean(top1[:, 0] == np.arange(50)) > 0.8  # a stored vector finds itself (ids in shard order)


def test_ondisk_config_errors():
    with pytest.raises(ValueError, match="nlist"):
        OnDiskConfig(nlist=0)
    with pytest.raises(ValueError, match="must divide"):
        build_ondisk([], dim=30, folder=None, config=OnDiskConfig(m=16), train=np.zeros((10, 30), np.float32))


# ----------------------------------------------------------------------------- the engine's ivfpq_disk kind

import json  # noqa: E402
import shutil  # noqa: E402

from typer.testing import CliRunner  # noqa: E402

from icl_engine.apps.cli import app  # noqa: E402
from icl_engine.core.choices import IndexType  # noqa: E402
from icl_engine.core.data import Dataset, TaskKind, make_records  # noqa: E402
from icl_engine.core.index import ExampleIndex, IndexConfig, IndexFormatError, IndexWriteError, flat_topk, update_index  # noqa: E402

from conftest import make_tiny_model, make_tiny_tokenizer  # noqa: E402


def disk_index(n: int = 3000, d: int = 32, rerank: int = 8) -> tuple[ExampleIndex, np.ndarray]:
    x = clustered(n, d, 2)
    ds = Dataset("syn", TaskKind.CLASSIFICATION, make_records([(f"text {i}", "ab"[i % 2]) for i in range(n)]),
                 ("a", "b"))
    cfg = IndexConfig(index_type=IndexType.IVFPQ_DISK, nlist=32, nprobe=8, pq_m=8, rerank=rerank)
    return ExampleIndex.from_vectors(ds, x, "hashing:32", cfg), x


def test_ivfpq_disk_recall_reload_and_exact_cover(tmp_path):
    index, x = disk_index()
    q = clustered(100, 32, 3)
    flat_s, flat_i = flat_topk(q, x, 8)
    _, ids = index.search(q, 8)
    assert recall_at_k(ids, flat_i) >= 0.9  # PQ candidates, exact re-rank of 64
    index.save(tmp_path / "a")
    shutil.move(tmp_path / "a", tmp_path / "b")  # the .ivfdata path written at build is stale now
    loaded = ExampleIndex.load(tmp_path / "b")
    assert isinstance(loaded.vectors, np.memmap) and loaded.vectors.shape == x.shape
    np.testing.assert_array_equal(loaded.vectors, x)
    assert loaded.manifest["index_type"] == "ivfpq_disk" and loaded.manifest["index_params"]["rerank"] == 8
    scores, found = loaded.search(q, 8)
    np.testing.assert_array_equal(found, ids)  # the same as before the save
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", q, x[found]), atol=dot_tol(x.shape[1]))  # exact scores
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    wide = ExampleIndex.load(tmp_path / "c")
    wide.manifest["index_params"]["rerank"] = len(x)  # candidates cover every row: flat search's answer
    s, i = wide.search(q, 8)
    np.testing.assert_array_equal(i, flat_i)
    np.testing.assert_array_equal(s, flat_s)
    s1, i1 = wide.search(q[:1], 8)  # alone as in a batch
    np.testing.assert_array_equal(i1, flat_i[:1])


def test_ivfpq_disk_refuses_damage_and_updates(tmp_path):
    index, x = disk_index(n=600)
    folder = index.save(tmp_path / "ix")
    version = next(folder.glob("v-*"))
    for name in ("lists.ivfdata", "vectors.f32"):
        shutil.copytree(folder, tmp_path / name)
        with open(tmp_path / name / version.name / name, "r+b") as f:
            f.truncate((version / name).stat().st_size - 4)
        with pytest.raises(IndexFormatError, match=f"{name} is .* bytes, the manifest says") as e:
            ExampleIndex.load(tmp_path / name)
        assert "\n" not in str(e.value)
    loaded = ExampleIndex.load(folder)
    with pytest.raises(IndexWriteError, match="cannot be updated.*rebuild it"):
        update_index(folder, remove_ids=[loaded.records[0].id])
    with pytest.raises(IndexWriteError, match="rebuild it"):
        loaded.upsert(loaded.records[:1], x[:1])
    assert ExampleIndex.load(folder).version == loaded.version  # nothing published
    with pytest.raises(ValueError, match="rerank"):
        IndexConfig(index_type="ivfpq_disk", rerank=0)
    ds = index.dataset
    with pytest.raises(ValueError, match="must divide"):
        ExampleIndex.from_vectors(ds, x, "hashing:32", IndexConfig(index_type="ivfpq_disk", pq_m=5))



def test_vector_file_is_moved_into_the_version_not_copied(tmp_path, monkeypatch):
    """from_vector_file(move=True), a streaming build's: save publishes the vectors' scratch file
    itself (os.replace: same inode, the scratch name gone, no copy made: the copy paths are made
    to fail), the index loads and searches as one built in RAM from the same vectors; a second
    save of it copies (the moved file belongs to the published version now)."""
    from icl_engine.core import index as index_module

    ram, x = disk_index(n=600)
    raw = tmp_path / "scratch" / "vectors.f32"
    raw.parent.mkdir()
    x.astype(np.float32).tofile(raw)
    inode = raw.stat().st_ino
    streamed = ExampleIndex.from_vector_file(ram.dataset, np.memmap(raw, dtype=np.float32, mode="r").reshape(-1, 32),
                                             "hashing:32", ram.config, tmp_path / "scratch" / "lists.ivfdata", move=True)

    def no_copy(*a, **k):
        raise AssertionError("the vectors were copied")

    for name in ("copy", "copy2", "copyfile", "copyfileobj"):
        monkeypatch.setattr(shutil, name, no_copy)
    monkeypatch.setattr(index_module, "_write_raw", no_copy)
    folder = streamed.save(tmp_path / "ix")
    published = folder / streamed.version / "vectors.f32"
    assert published.stat().st_ino == inode and not raw.exists()
    monkeypatch.undo()
    q = clustered(20, 32, 3)
    loaded = ExampleIndex.load(folder)
    np.testing.assert_array_equal(loaded.vectors, x)
    for index in (ram, streamed, loaded):  # the same cells, codes and re-rank
        np.testing.assert_array_equal(index.search(q, 8)[1], ram.search(q, 8)[1])
    again = streamed.save(tmp_path / "ix2")  # the file is the first version's now: copied, not taken
    assert published.stat().st_ino == inode and (again / streamed.version / "vectors.f32").stat().st_ino != inode
    np.testing.assert_array_equal(ExampleIndex.load(again).vectors, x)
    kept = ExampleIndex.from_vector_file(ram.dataset, np.memmap(published, dtype=np.float32, mode="r").reshape(-1, 32),
                                         "hashing:32", ram.config, tmp_path / "lists2.ivfdata")
    kept.save(tmp_path / "ix3")  # without move the caller's file stays where it is
    assert published.exists() and published.stat().st_ino == inode


ROWS = [("a wonderful film", "positive"), ("great acting and a moving story", "positive"),
        ("a dull boring film", "negative"), ("terrible plot and bad acting", "negative"),
        ("the movie was great", "positive"), ("a boring waste of time", "negative"),
        ("what a lovely surprise", "positive"), ("an awful mess", "negative")]


def test_cli_classify_same_over_flat_and_ivfpq_disk(tmp_path):
    """Eight rows, rerank 8: the candidates cover every row, so demonstrations and predictions match."""
    runner = CliRunner()
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"text": t, "label": lab}) for t, lab in ROWS) + "\n")
    tok = make_tiny_tokenizer()
    make_tiny_model(len(tok)).save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    out = {}
    for kind in ("flat", "ivfpq_disk"):
        res = runner.invoke(app, ["index", "build", str(data), "--name", kind, "--embedder", "hashing:64",
                                  "--index-type", kind, "--indexes-dir", str(tmp_path / "indexes")])
        assert res.exit_code == 0, res.output
        out[kind] = []
        for text in ("a moving film", "a boring plot", "lovely acting"):
            res = runner.invoke(app, ["classify", kind, text, "--k", "3", "--lm", str(tmp_path / "lm"), "--json",
                                      "--indexes-dir", str(tmp_path / "indexes")])
            assert res.exit_code == 0, res.output
            got = json.loads(res.stdout)
            out[kind].append((got["label"], got["demos"], got["probs"]))
    assert out["flat"] == out["ivfpq_disk"]
    res = runner.invoke(app, ["index", "remove", "ivfpq_disk", "--ids", "x", "--indexes-dir", str(tmp_path / "indexes")])
    assert res.exit_code != 0 and "rebuild it" in res.output


@pytest.mark.slow
def test_console_script_json_stays_clean_after_a_rename(tmp_path):
    """faiss printf's a line when the on-disk lists are written or re-pointed: never into the JSON
    on stdout (the installed `icl`, a real process: Typer's runner would not see C's stdout)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    icl = Path(sys.executable).parent / "icl"
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": t, "label": lab}) for t, lab in ROWS) + "\n")
    env = {**os.environ, "ICL_INDEXES": str(tmp_path / "ix")}

    def run(*args):
        p = subprocess.run([str(icl), *args, "--json"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)

    assert run("index", "build", "d.jsonl", "--name", "a", "--embedder", "hashing:64",
               "--index-type", "ivfpq_disk")["index_type"] == "ivfpq_disk"
    (tmp_path / "ix" / "a").rename(tmp_path / "ix" / "b")
    run("index", "build", "d.jsonl", "--name", "f", "--embedder", "hashing:64")
    hits = run("index", "search", "b", "a boring film", "-k", "3")
    assert len(hits) == 3 and hits == run("index", "search", "f", "a boring film", "-k", "3")  # 24 candidates cover all


@pytest.mark.slow
def test_console_script_index_settings_land_in_the_manifest_and_bad_ones_are_one_line(tmp_path, icl_forks):
    """`icl index build` takes each kind's settings (--nlist, --nprobe, --pq-m, --rerank, ...);
    `icl index info` shows them; a bad value or a setting of another kind is one line, exit 1,
    and nothing is written. (The first build through the installed script, the other command
    lines forked from a preloaded process: tests/icl_forks.py.)"""
    import os
    import subprocess
    import sys
    from pathlib import Path

    icl = Path(sys.executable).parent / "icl"
    rows = [(f"{t} {i}", lab) for i in range(40) for t, lab in ROWS]  # 320 rows: 8-bit codes
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": t, "label": lab}) for t, lab in rows) + "\n")
    env = {**os.environ, "ICL_INDEXES": str(tmp_path / "ix")}

    def run(*args, installed=False):
        if installed:
            return subprocess.run([str(icl), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        return icl_forks.run(args, cwd=tmp_path, env=env)

    build = ["index", "build", "d.jsonl", "--embedder", "hashing:64"]
    p = run(*build, "--name", "pq", "--index-type", "ivfpq_disk", "--nlist", "4", "--nprobe", "2", "--pq-m", "16",
            "--rerank", "3", "--train-size", "200", "--json", installed=True)
    assert p.returncode == 0, p.stderr
    want = {"nlist": 4, "nprobe": 2, "pq_m": 16, "pq_nbits": 7, "rerank": 3, "train_size": 200}  # 7 bits: 200 rows
    assert json.loads(p.stdout)["index_params"] == want
    info = run("index", "info", "pq", "--json")
    assert info.returncode == 0 and json.loads(info.stdout)["index_params"] == want
    text = run("index", "info", "pq").stdout
    assert "settings: nlist=4, nprobe=2, pq_m=16, pq_nbits=7, rerank=3, train_size=200" in text
    p = run(*build, "--name", "hn", "--index-type", "hnsw", "--hnsw-m", "8", "--ef-search", "20", "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["index_params"] == {"hnsw_m": 8, "ef_construction": 80,
                                                                          "ef_search": 20}
    for args, line in [
        (("--nprobe", "4"), "error: nprobe does not apply to a flat index (it takes no settings)"),
        (("--index-type", "ivf", "--rerank", "2"), "error: rerank does not apply to a ivf index (it takes nlist, nprobe)"),
        (("--index-type", "hnsw", "--nlist", "8"), "error: nlist does not apply to a hnsw index (it takes hnsw_m, "
                                                    "ef_construction, ef_search)"),
        (("--index-type", "ivfpq_disk", "--rerank", "0"), "error: rerank must be an integer >= 1, got 0"),
        (("--index-type", "ivfpq_disk", "--nlist", "-3"), "error: nlist must be an integer >= 1, got -3"),
        (("--index-type", "ivfpq_disk", "--pq-nbits", "17"), "error: pq_nbits must be at most 16, got 17"),
        (("--index-type", "ivfpq_disk", "--pq-m", "5"), "error: pq_m=5 must divide the embedding dimension 64"),
    ]:
        p = run(*build, "--name", "bad", *args)
        assert (p.returncode, p.stderr.strip().splitlines()) == (1, [line]), (args, p.stderr)
        assert "Traceback" not in p.stderr and not (tmp_path / "ix" / "bad").exists()
    assert sorted(os.listdir(tmp_path / "ix")) == ["hn", "pq"]
