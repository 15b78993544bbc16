"""`icl classify-file`: labelling a whole file in shards equals the engine on each text (labels,
log-scores within float32 rounding: tests/numerics.py); a re-run resumes from the
shards written; another job's shards are refused; Parquet in and out. The same on a Ray pool: test_ray_pool.py."""

from __future__ import annotations

import json

import pytest

from icl_engine.apps import queries
from icl_engine.apps.shards import ShardError, shard_path
from icl_engine.core.config import PipelineConfig

from conftest import CLASSIFY_TEXTS
from numerics import assert_probs_close, assert_scores_close

TEXTS = CLASSIFY_TEXTS


def read_out(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_equal(rows, preds, lm):
    assert [r["row"] for r in rows] == list(range(len(TEXTS))) and [r["text"] for r in rows] == TEXTS
    assert [r["label"] for r in rows] == [p.label for p in preds]
    assert_scores_close([r["log_scores"] for r in rows], [p.log_scores for p in preds], lm)
    assert [r["demo_ids"] for r in rows] == [[d.id for d in p.demos] for p in preds]


def test_classify_file_equals_the_engine_and_resumes(classify_job, tmp_path):
    root, src, config, preds = classify_job
    out = tmp_path / "labels.jsonl"
    s = queries.classify_file(config, str(src), out, shard_size=8)
    assert (s["texts"], s["shards"], s["resumed_shards"], s["field"]) == (30, 4, 0, "review")
    check_equal(read_out(out), preds, config.lm)
    first = out.read_text()
    shard_path(out.with_name("labels.jsonl.parts"), 2).unlink()  # as if the run had died in shard 2
    out.unlink()
    s = queries.classify_file(config, str(src), out, shard_size=8)
    assert s["resumed_shards"] == 3 and out.read_text() == first
    with pytest.raises(ShardError, match="holds the shards of another job"):
        queries.classify_file(PipelineConfig(**{**config.to_dict(), "k": 3}), str(src), out, shard_size=8)
    # a job file written before a config field existed (here `compile`) reads as its default
    job_file = out.with_name("labels.jsonl.parts") / "job.json"
    job = json.loads(job_file.read_text())
    del job["config"]["compile"]
    job_file.write_text(json.dumps(job))
    shard_path(out.with_name("labels.jsonl.parts"), 3).unlink()
    s = queries.classify_file(config, str(src), out, shard_size=8)
    assert s["resumed_shards"] == 3 and out.read_text() == first
    with pytest.raises(ShardError, match="holds the shards of another job"):  # not when it is asked for
        queries.classify_file(PipelineConfig(**{**config.to_dict(), "compile": True}), str(src), out, shard_size=8)


def test_parquet_in_and_out(classify_job, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    root, _, config, preds = classify_job
    src = tmp_path / "texts.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": t} for t in TEXTS]), src)
    out = tmp_path / "labels.parquet"
    queries.classify_file(config, str(src), out, shard_size=16)
    rows = pq.read_table(out).to_pylist()
    check_equal(rows, preds, config.lm)
    got = {p["label"]: p["p"] for p in rows[0]["probs"]}
    assert got.keys() == preds[0].probs.keys()
    assert_probs_close(list(got.values()), list(preds[0].probs.values()), preds[0].log_scores, config.lm)


def test_anchor_flags_label_by_knn_prompting(classify_job, classify_anchors, tmp_path):
    """`icl classify-file --anchors A --anchor-k K --anchor-weight W`: the engine's kNN prompting,
    alone (the anchors that voted are the demonstrations) or mixed with the demonstrations' scores."""
    from typer.testing import CliRunner

    from icl_engine.apps.cli import app
    from icl_engine.core.engines import get_engine

    root, src, config, plain = classify_job
    for weight in (1.0, 0.5):
        out = tmp_path / f"knn-{weight}.jsonl"
        res = CliRunner().invoke(app, ["classify-file", str(src), "--index", "tiny", "--out", str(out), "--lm",
                                       config.lm, "--k", "2", "--anchors", str(classify_anchors), "--anchor-k", "3",
                                       "--anchor-weight", str(weight), "--shard-size", "8",
                                       "--indexes-dir", str(root / "indexes")])
        assert res.exit_code == 0, res.output
        knn = PipelineConfig(**{**config.to_dict(), "anchors": str(classify_anchors), "anchor_k": 3,
                                "anchor_weight": weight})
        preds = [p for s in range(0, 30, 8) for p in get_engine(knn).classify(TEXTS[s:s + 8], knn.options)]
        check_equal(read_out(out), preds, config.lm)
        assert all(len(p.demos) == (3 if weight == 1.0 else 2) for p in preds)
    assert [p.probs for p in preds] != [p.probs for p in plain]  # the anchors changed the probabilities


def test_shards_pipelined_around_finished_ones(classify_job):
    """shard_rows runs the pending shards as one pipeline (classify_chunks, overlap forced here;
    a GPU turns it on): with finished shards between the pending ones and a short last shard,
    each shard's rows are those of its own engine call, with the file's row numbers."""
    from icl_engine.apps.shards import prediction_rows, shard_rows
    from icl_engine.core.engines import get_engine

    _, _, config, _ = classify_job
    engine = get_engine(config)
    texts = list(CLASSIFY_TEXTS)  # 30 texts: shards of 8 -> 0-8, 8-16, 16-24, 24-30
    todo = [(1, 8, 16), (3, 24, 30)]  # shards 0 and 2 already written
    piped = list(shard_rows("classify-file", engine, texts, todo, config.options, overlap=True))
    assert len(piped) == 2 and [len(r) for r in piped] == [8, 6]
    for (_, start, stop), rows in zip(todo, piped):
        alone = prediction_rows(engine, texts[start:stop], start, config.options)
        assert [r["row"] for r in rows] == list(range(start, stop))
        assert [(r["label"], r["demo_ids"]) for r in rows] == [(r["label"], r["demo_ids"]) for r in alone]
        for a, b in zip(rows, alone):
            assert_scores_close(a["log_scores"], b["log_scores"], engine.lm)
