"""The Ray front end (ray_jobs) against the single-process engine: an index built by Ray Data and
an actor pool equals the plain build (same ids, vectors within 1e-6) from JSONL and Parquet;
data errors are the same one line; without Ray, --ray is one line saying how to install it.
All Ray tests share one local Ray (the ray_session fixture) and take well under a minute."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from icl_engine.apps import indexes
from icl_engine.core.data import DataError
from icl_engine.core.index import ExampleIndex, flat_topk

from conftest import said

# one local Ray per test session: under pytest-xdist every Ray test runs on the same worker
pytestmark = [pytest.mark.xdist_group("ray"), pytest.mark.slow]  # slow: Ray workers

ICL = Path(sys.executable).with_name("icl")
SMALL = dict(workers=2, batch_size=16, cpus_per_worker=0.5)  # two actors and a read task fit 2 CPUs
ONE = dict(SMALL, workers=1)  # where the pool's size plays no part: each actor costs a process start-up


def rows(n: int = 60) -> list[dict]:
    words = ["great", "dull", "film", "plot", "acting", "boring", "wonderful", "story"]
    return [{"text": " ".join(words[(i * 7 + j) % 8] for j in range(3 + i % 5)) + f" {i}", "label": "ab"[i % 3 == 0]}
            for i in range(n)]


def same_index(a: ExampleIndex, b: ExampleIndex) -> None:
    assert [r.id for r in a.records] == [r.id for r in b.records] and a.records == b.records
    np.testing.assert_allclose(a.vectors, b.vectors, atol=1e-6)
    assert a.manifest["dataset_sha256"] == b.manifest["dataset_sha256"] and a.template == b.template


def test_ray_build_equals_the_plain_build(ray_session, tmp_path):
    """Parquet in several blocks, two actors: the plain build's index. (JSONL: the generation
    build below and the streaming ivfpq_disk build, which compares its records and vectors with
    the plain build's as this does; CSV: the same path, another reader, left out for time.)"""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from icl_engine.apps.ray_jobs import RayOptions

    data = rows()
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in data))
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(data), parquet, row_group_size=20)  # several blocks
    kw = dict(embedder="hashing:64", indexes_dir=tmp_path / "ix")
    indexes.build_index(str(jsonl), "plain", **kw)
    indexes.build_index(str(parquet), "ray", ray=RayOptions(**SMALL), **kw)
    same_index(ExampleIndex.load(tmp_path / "ix" / "ray"), ExampleIndex.load(tmp_path / "ix" / "plain"))


def test_ray_build_of_generation_data_with_references_and_ids(ray_session, tmp_path):
    from icl_engine.apps.ray_jobs import RayOptions

    gen = tmp_path / "g.jsonl"
    gen.write_text("".join(json.dumps({"key": f"k{i}", "input": f"name {i}, food {i % 4}",
                                       "output": [f"ref {i} a", f"ref {i} b"] if i % 2 else f"ref {i}"}) + "\n"
                           for i in range(30)))
    kw = dict(embedder="hashing:32", indexes_dir=tmp_path / "ix", id_field="key")
    indexes.build_index(str(gen), "plain", **kw)
    indexes.build_index(str(gen), "ray", ray=RayOptions(**ONE), **kw)
    a, b = (ExampleIndex.load(tmp_path / "ix" / n) for n in ("plain", "ray"))
    same_index(a, b)
    assert len(a) == 45 and "k1#2" in {r.id for r in a.records}


def test_ray_build_reports_data_errors_as_the_loader_does(ray_session, tmp_path):
    from icl_engine.apps.ray_jobs import RayOptions

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine", "label": "a"}) + "\n" + json.dumps({"text": "", "label": "b"}) + "\n")
    with pytest.raises(DataError) as plain:
        indexes.build_index(str(bad), "x", embedder="hashing:32", indexes_dir=tmp_path / "ix")
    with pytest.raises(DataError) as ray:
        indexes.build_index(str(bad), "x", embedder="hashing:32", indexes_dir=tmp_path / "ix", ray=RayOptions(**ONE))
    assert str(ray.value) == str(plain.value).replace(str(bad), str(bad.resolve())) or str(ray.value) == str(plain.value)
    torn = tmp_path / "torn.jsonl"  # a line Ray Data's JSON reader cannot parse: one DataError line
    torn.write_text(json.dumps({"text": "fine", "label": "a"}) + '\n{"text": "cut\n')
    with pytest.raises(DataError, match=r"torn.jsonl: Ray Data could not read it \(.+\); the plain build names"):
        indexes.build_index(str(torn), "x", embedder="hashing:32", indexes_dir=tmp_path / "ix", ray=RayOptions(**ONE))
    with pytest.raises(DataError, match="--ray reads .jsonl, .csv, .tsv and .parquet"):
        indexes.build_index(str(tmp_path / "d.txt"), "x", embedder="hashing:32", indexes_dir=tmp_path / "ix",
                        ray=RayOptions(**ONE))


def test_the_console_script_on_a_local_ray_says_nothing_but_its_progress(tmp_path):
    """A local Ray started by the command itself (not the test session's): Ray's start-up lines,
    its C++ core's own log lines included, stay out of the user's terminal."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows(30)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "ICL_DEBUG"}
    out = subprocess.run([str(ICL), "index", "build", str(data), "--name", "x", "--ray", "--workers", "1",
                          "--indexes-dir", str(tmp_path / "ix"), "--embedder", "hashing:32"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert said(out.stderr) == []
    assert len(ExampleIndex.load(tmp_path / "ix" / "x")) == 30


def test_without_ray_the_flag_is_one_line_with_the_install_command(tmp_path):
    # a `ray` package that fails to import, first on the path: what a machine without Ray sees
    fake = tmp_path / "noray" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named ray', name='ray')\n")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows(5)))
    out = subprocess.run([str(ICL), "index", "build", str(data), "--name", "x", "--ray", "--indexes-dir",
                          str(tmp_path / "ix"), "--embedder", "hashing:32"], capture_output=True, text=True,
                         env={**__import__("os").environ, "PYTHONPATH": str(fake.parent)}, timeout=120)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == ["error: --ray needs Ray with Ray Data, which is not installed (ray): "
                                               "pip install 'icl-engine[ray]'"]
    assert not (tmp_path / "ix" / "x").exists()


def test_ray_ivfpq_disk_build_streams_and_equals_the_plain_builds(ray_session, tmp_path, monkeypatch):
    """--ray with ivfpq_disk streams the pool's rows to disk instead of gathering them: the same
    records, vectors and trained index as the plain ivfpq_disk build (train_rows: the same
    sample), so the same PQ search; with a rerank covering every row, flat search's ids and
    scores. Peak driver memory (tracemalloc: numpy's buffers are traced) stays well under the
    [n, d] matrix a take_all build stacks, with a train sample and blocks smaller than n. The
    scratch vectors file becomes the version's (moved, same inode); its scratch folder is locked
    while the build runs (what a killed build leaves: test_index_faults.py)."""
    import fcntl
    import tracemalloc

    from icl_engine.apps import ray_jobs
    from icl_engine.apps.ray_jobs import RayOptions
    from icl_engine.core import index as index_module

    monkeypatch.setattr(ray_jobs, "WRITE_ROWS", 100)  # blocks much smaller than n, as at scale
    monkeypatch.setattr(index_module, "FILL_ROWS", 100)
    scratch = {}  # what the streaming build hands from_vector_file: its scratch vectors file
    from_vector_file = ExampleIndex.from_vector_file.__func__

    def spy(cls, dataset, vectors, *args, **kw):
        scratch.update(inode=os.stat(vectors.filename).st_ino, folder=Path(vectors.filename).parent)
        fd = os.open(scratch["folder"] / ".lock", os.O_RDWR)
        try:  # the build holds its scratch folder's lock
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        return from_vector_file(cls, dataset, vectors, *args, **kw)

    monkeypatch.setattr(ExampleIndex, "from_vector_file", classmethod(spy))
    data = rows(2400) + [rows(3)[1]]  # a repeated text: records are not the rows one to one (the copy path)
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in data))
    kw = dict(embedder="hashing:4096", indexes_dir=tmp_path / "ix")  # [n, d] float32: 39 MB
    pq = dict(index_type="ivfpq_disk", index_settings=dict(nlist=8, nprobe=2, pq_m=64, rerank=400, train_size=300))
    indexes.build_index(str(jsonl), "plain", **kw, **pq)
    tracemalloc.start()
    indexes.build_index(str(jsonl), "ray", ray=RayOptions(**{**SMALL, "batch_size": 250}), **kw, **pq)
    kept, peak = tracemalloc.get_traced_memory()  # kept: what stays, Ray Data's modules imported on first use
    tracemalloc.stop()
    n, d = len(data), 4096  # peak - kept: a Ray block (300 rows, 5 MB) or the train sample (300 rows, 5 MB)
    assert peak - kept < n * d * 4 / 4, f"driver peak {(peak - kept) / 1e6:.1f} MB above what stays, " \
                                        f"the stacked vectors are {n * d * 4 / 1e6:.1f} MB"
    plain, ray = (ExampleIndex.load(tmp_path / "ix" / name) for name in ("plain", "ray"))
    same_index(ray, plain)
    assert ray.manifest["index_params"] == plain.manifest["index_params"] == {
        "nlist": 8, "nprobe": 2, "pq_m": 64, "pq_nbits": 8, "rerank": 400, "train_size": 300}
    assert not list((tmp_path / "ix").glob(".*build-*"))  # the scratch folder is gone
    assert (tmp_path / "ix" / "ray" / ray.version / "vectors.f32").stat().st_ino == scratch["inode"]  # moved, not copied
    q = np.asarray(plain.vectors[::160]) + 0.01  # [16, d] near some rows, not on them
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    f_s, f_i = flat_topk(q, np.asarray(plain.vectors), 8)  # a flat index's search
    for index in (plain, ray):  # 8 x 400 candidates cover every row: flat search's answer
        s, i = index.search(q, 8)
        np.testing.assert_array_equal(i, f_i)
        np.testing.assert_allclose(s, f_s, atol=1e-6)
    for index in (plain, ray):  # the PQ alone proposes: the same trained cells and codes give the same
        index.manifest["index_params"]["rerank"] = 1
    np.testing.assert_array_equal(plain.search(q, 8)[1], ray.search(q, 8)[1])
