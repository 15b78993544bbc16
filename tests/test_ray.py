"""The Ray front end (ray_jobs) against the single-process engine: an index built by Ray Data and
an actor pool equals the plain build (same ids, vectors within 1e-6) from JSONL and Parquet;
data errors are the same one line; without Ray, --ray is one line saying how to install it.
All Ray tests share one local Ray (the ray_session fixture) and take well under a minute."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from icl_engine import api
from icl_engine.data import DataError
from icl_engine.index import ExampleIndex

ICL = Path(sys.executable).with_name("icl")
SMALL = dict(workers=2, batch_size=16, cpus_per_worker=0.5)  # two actors and a read task fit 2 CPUs


def rows(n: int = 60) -> list[dict]:
    words = ["great", "dull", "film", "plot", "acting", "boring", "wonderful", "story"]
    return [{"text": " ".join(words[(i * 7 + j) % 8] for j in range(3 + i % 5)) + f" {i}", "label": "ab"[i % 3 == 0]}
            for i in range(n)]


def same_index(a: ExampleIndex, b: ExampleIndex) -> None:
    assert [r.id for r in a.records] == [r.id for r in b.records] and a.records == b.records
    np.testing.assert_allclose(a.vectors, b.vectors, atol=1e-6)
    assert a.manifest["dataset_sha256"] == b.manifest["dataset_sha256"] and a.template == b.template


def test_ray_build_equals_the_plain_build(ray_session, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from icl_engine.ray_jobs import RayOptions

    data = rows()
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in data))
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(data), parquet, row_group_size=20)  # several blocks
    kw = dict(embedder="hashing:64", indexes_dir=tmp_path / "ix")
    api.build_index(str(jsonl), "plain", **kw)
    plain = ExampleIndex.load(tmp_path / "ix" / "plain")
    for i, path in enumerate((jsonl, parquet)):  # (CSV: the same path, another reader; left out for time)
        api.build_index(str(path), f"ray{i}", ray=RayOptions(**SMALL), **kw)
        same_index(ExampleIndex.load(tmp_path / "ix" / f"ray{i}"), plain)


def test_ray_build_of_generation_data_with_references_and_ids(ray_session, tmp_path):
    from icl_engine.ray_jobs import RayOptions

    gen = tmp_path / "g.jsonl"
    gen.write_text("".join(json.dumps({"key": f"k{i}", "input": f"name {i}, food {i % 4}",
                                       "output": [f"ref {i} a", f"ref {i} b"] if i % 2 else f"ref {i}"}) + "\n"
                           for i in range(30)))
    kw = dict(embedder="hashing:32", indexes_dir=tmp_path / "ix", id_field="key")
    api.build_index(str(gen), "plain", **kw)
    api.build_index(str(gen), "ray", ray=RayOptions(**SMALL), **kw)
    a, b = (ExampleIndex.load(tmp_path / "ix" / n) for n in ("plain", "ray"))
    same_index(a, b)
    assert len(a) == 45 and "k1#2" in {r.id for r in a.records}


def test_ray_build_reports_data_errors_as_the_loader_does(ray_session, tmp_path):
    from icl_engine.ray_jobs import RayOptions

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine", "label": "a"}) + "\n" + json.dumps({"text": "", "label": "b"}) + "\n")
    with pytest.raises(DataError) as plain:
        api.build_index(str(bad), "x", embedder="hashing:32", indexes_dir=tmp_path / "ix")
    with pytest.raises(DataError) as ray:
        api.build_index(str(bad), "x", embedder="hashing:32", indexes_dir=tmp_path / "ix", ray=RayOptions(**SMALL))
    assert str(ray.value) == str(plain.value).replace(str(bad), str(bad.resolve())) or str(ray.value) == str(plain.value)
    torn = tmp_path / "torn.jsonl"  # a line Ray Data's JSON reader cannot parse: one DataError line
    torn.write_text(json.dumps({"text": "fine", "label": "a"}) + '\n{"text": "cut\n')
    with pytest.raises(DataError, match=r"torn.jsonl: Ray Data could not read it \(.+\); the plain build names"):
        api.build_index(str(torn), "x", embedder="hashing:32", indexes_dir=tmp_path / "ix", ray=RayOptions(**SMALL))
    with pytest.raises(DataError, match="--ray reads .jsonl, .csv, .tsv and .parquet"):
        api.build_index(str(tmp_path / "d.txt"), "x", embedder="hashing:32", indexes_dir=tmp_path / "ix",
                        ray=RayOptions(**SMALL))


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
