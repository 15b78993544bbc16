"""The engine pool on Ray (ray_jobs.run_shards) against the single-process engine: classify-file
labels as one process does (labels, log-scores within 1e-5, demonstration ids). The pool's actors
live for the whole session, so these tests pay their start-up (imports, the tiny LM) once; this
file sorts after test_ray.py, whose index builds end the pool to get its CPUs back."""

from __future__ import annotations

import pytest

from conftest import CLASSIFY_TEXTS
from icl_engine import api
from test_classify_file import check_equal, read_out

POOL = dict(workers=2, cpus_per_worker=0.5)  # two engine actors on the session's 2 CPUs


@pytest.fixture(scope="module")
def pool(ray_session):
    from icl_engine.ray_jobs import RayOptions, close_engine_pools

    yield RayOptions(**POOL)
    close_engine_pools()


def test_classify_file_on_the_pool_equals_one_process(classify_job, pool, tmp_path):
    from icl_engine.ray_jobs import engine_actors

    root, src, config, preds = classify_job
    out = tmp_path / "labels.jsonl"
    s = api.classify_file(config, str(src), out, shard_size=8, ray=pool)
    assert s["shards"] == 4 and len(CLASSIFY_TEXTS) == 30
    check_equal(read_out(out), preds)
    actors = engine_actors(pool)
    api.classify_file(config, str(src), tmp_path / "again.jsonl", shard_size=8, ray=pool)
    assert engine_actors(pool) == actors  # the same actors, engines loaded, for the next job
    assert (tmp_path / "again.jsonl").read_text() == out.read_text()
