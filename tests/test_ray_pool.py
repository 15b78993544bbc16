"""The engine pool on Ray (ray_jobs.run_shards) against the single-process engine: classify-file
labels as one process does (labels, log-scores within float32 rounding, demonstration ids), also after an
actor died (Ray restarts it); generate-file writes what one process writes; eval --ray gives the
same metrics; kNN prompting's anchors work on the pool. The pool's actors live for the whole
session, so these tests pay their start-up (imports, the tiny LM) once; this file sorts after
test_ray.py, whose index builds end the pool to get its CPUs back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_classify_file import check_equal, read_out

from icl_engine.apps import indexes, queries

from conftest import CLASSIFY_TEXTS
from numerics import assert_probs_close, assert_scores_close

# one local Ray per test session: under pytest-xdist every Ray test runs on the same worker
pytestmark = [pytest.mark.xdist_group("ray"), pytest.mark.slow]  # slow: Ray workers

POOL = dict(workers=2, cpus_per_worker=0.5)  # two engine actors on the session's 2 CPUs


@pytest.fixture(scope="session")
def pool(ray_session):
    """The pool's options, its actors started here: session-scoped and asked for first, so that
    they boot (imports, the tiny LM: ~4 s of CPU each) while the driver makes the session's tiny
    LM and classify_job's single-process answers, instead of after. The first actor is killed at
    once, a worker that dies: Ray restarts it and the first test checks that the shards handed
    to it still get done (killed here, while it boots, its restart overlaps the start-up instead
    of adding a whole actor start, ~9 s on the loaded machine, after it)."""
    from icl_engine.apps.ray_jobs import RayOptions, close_engine_pools, engine_actors

    options = RayOptions(**POOL)
    ray_session.kill(engine_actors(options)[0], no_restart=False)  # starts them; their constructors run meanwhile
    yield options
    close_engine_pools()


def test_classify_file_on_the_pool_equals_one_process(pool, classify_job, tmp_path, ray_session):
    from icl_engine.apps.ray_jobs import engine_actors

    root, src, config, preds = classify_job
    actors = engine_actors(pool)  # actors[0] was killed by the fixture (restarted by Ray)
    out = tmp_path / "labels.jsonl"
    s = queries.classify_file(config, str(src), out, shard_size=8, ray=pool)
    assert (s["shards"], s["resumed_shards"]) == (4, 0) and len(CLASSIFY_TEXTS) == 30
    check_equal(read_out(out), preds, config.lm)  # ActorPool gives both actors a shard at once: the restarted one worked
    queries.classify_file(config, str(src), tmp_path / "again.jsonl", shard_size=8, ray=pool)
    assert engine_actors(pool) == actors  # the same actors, engines loaded, for the next job
    assert (tmp_path / "again.jsonl").read_text() == out.read_text()


@pytest.fixture(scope="module")
def generation_job(tmp_path_factory, tiny_lm_dir):
    """A CommonGen-like generation index (test_generation_files' rows), the tiny LM, an input file."""
    from test_generation_files import TEST, TRAIN

    from icl_engine.core.config import PipelineConfig

    root = tmp_path_factory.mktemp("gf")
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TRAIN))
    indexes.build_index(str(root / "train.jsonl"), "cg", embedder="hashing:64", indexes_dir=root / "indexes")
    src = root / "inputs.jsonl"
    src.write_text("".join(json.dumps({"input": r["input"]}) + "\n" for r in TEST + TRAIN[:5]))
    config = PipelineConfig(index="cg", indexes_dir=str(root / "indexes"), lm=str(tiny_lm_dir), k=4,
                            max_new_tokens=6)
    return src, config


def test_generate_file_on_the_pool_equals_one_process(generation_job, pool, tmp_path):
    src, config = generation_job
    one = queries.generate_file(config, str(src), tmp_path / "one.jsonl", shard_size=3)
    on_ray = queries.generate_file(config, str(src), tmp_path / "ray.jsonl", shard_size=3, ray=pool)
    assert one["shards"] == on_ray["shards"] == 3
    rows = read_out(tmp_path / "ray.jsonl")
    assert (tmp_path / "ray.jsonl").read_text() == (tmp_path / "one.jsonl").read_text()
    assert len(rows) == 8 and any(r["output"] for r in rows) and all(len(r["demo_ids"]) == 4 for r in rows)


def same_eval(a: dict, b: dict, lm) -> None:
    """Two evaluation results alike but for their timings; scores within float32 rounding."""
    timings = ("seconds", "queries_per_s")
    pa, pb = a["predictions"], b["predictions"]
    assert {k: v for k, v in a.items() if k not in timings + ("predictions",)} == \
           {k: v for k, v in b.items() if k not in timings + ("predictions",)}
    assert [{**p, "probs": None, "log_scores": None} for p in pa] == [{**p, "probs": None, "log_scores": None} for p in pb]
    for p, q in zip(pa, pb):
        assert p.get("probs", {}).keys() == q.get("probs", {}).keys()
        if "log_scores" in p:
            assert_scores_close(p["log_scores"], q["log_scores"], lm)
            assert_probs_close(list(p["probs"].values()), list(q["probs"].values()), p["log_scores"], lm)


def test_eval_on_the_pool_equals_one_process(classify_job, generation_job, pool, tmp_path, monkeypatch, ray_session,
                                            tiny_lm_dir):
    from test_generation_files import TEST

    from icl_engine.apps.ray_jobs import engine_actors
    from icl_engine.core.config import PipelineConfig

    from conftest import SENTIMENT_ROWS

    _, _, config, _ = classify_job
    monkeypatch.chdir(Path(config.lm).parent)  # the LM named by a relative path, reported as given
    config = PipelineConfig(**{**config.to_dict(), "lm": Path(config.lm).name})
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps({"text": f"{t} {i}", "label": l}) + "\n"
                            for i in range(3) for t, l in SENTIMENT_ROWS))
    one = queries.evaluate_file(config, str(test))
    on_ray = queries.evaluate_file(config, str(test), ray=pool)
    assert on_ray["n"] == 36 and 0 < on_ray["accuracy"] < 1  # one chunk of 18 queries per actor
    same_eval(one, on_ray, tiny_lm_dir)
    # each actor loaded its engine, then froze its heap (engines.freeze_loaded_heap)
    frozen = ray_session.get([a.__ray_call__.remote(lambda _actor: __import__("gc").get_freeze_count())
                              for a in engine_actors(pool)])
    assert min(frozen) > 10_000, frozen

    _, gen_config = generation_job
    gen_test = tmp_path / "gen.jsonl"
    gen_test.write_text("".join(json.dumps(r) + "\n" for r in TEST))
    same_eval(queries.evaluate_file(gen_config, str(gen_test)), queries.evaluate_file(gen_config, str(gen_test), ray=pool),
              tiny_lm_dir)


def test_knn_prompting_on_the_pool_equals_one_process(classify_job, classify_anchors, pool, tmp_path):
    """classify-file and eval --ray with anchors (kNN prompting alone, and mixed), as one process."""
    from icl_engine.core.config import PipelineConfig

    from conftest import SENTIMENT_ROWS

    root, src, config, _ = classify_job
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in SENTIMENT_ROWS))
    for weight in (1.0, 0.5):
        knn = PipelineConfig(**{**config.to_dict(), "anchors": str(classify_anchors), "anchor_k": 3,
                                "anchor_weight": weight})
        one, on_ray = tmp_path / f"one-{weight}.jsonl", tmp_path / f"ray-{weight}.jsonl"
        queries.classify_file(knn, str(src), one, shard_size=8)
        queries.classify_file(knn, str(src), on_ray, shard_size=8, ray=pool)
        a, b = read_out(one), read_out(on_ray)
        assert [r["label"] for r in a] == [r["label"] for r in b] and [r["demo_ids"] for r in a] == [r["demo_ids"] for r in b]
        assert_scores_close([r["log_scores"] for r in a], [r["log_scores"] for r in b], config.lm)
        same_eval(queries.evaluate_file(knn, str(test)), queries.evaluate_file(knn, str(test), ray=pool), config.lm)
