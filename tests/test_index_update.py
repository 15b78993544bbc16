"""Incremental index updates (icl index add / remove): an update equals a build over the
resulting records, embeds only new texts, publishes a new version with its lineage, and what was
trained on an earlier version is reported stale. The process-level guarantees (readers, kills,
two writers) are in test_index_faults.py."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from icl_engine.apps import indexes
from icl_engine.core.data import DataError, Dataset, Record, TaskKind, load_dataset, make_records
from icl_engine.core.embed import get_embedder
from icl_engine.core.index import (
    ExampleIndex,
    IndexConfig,
    IndexFormatError,
    StaleWarning,
    row_id,
    stale_note,
    update_index,
)

from conftest import SENTIMENT_ROWS, make_tiny_lm, sentiment_template
from numerics import dot_tol

ICL = Path(sys.executable).with_name("icl")
WORDS = [f"w{i}" for i in range(300)]


def make_dataset(n: int, seed: int = 0) -> Dataset:
    rng = random.Random(seed)
    pairs = [(" ".join(rng.choices(WORDS, k=8)), rng.choice(["neg", "pos"])) for _ in range(n)]
    return Dataset("toy", TaskKind.CLASSIFICATION, make_records(pairs), ("neg", "pos"))


@pytest.fixture(scope="module")
def emb():
    return get_embedder("hashing:64")


def same_as_build(index: ExampleIndex, emb) -> None:
    """The updated index holds exactly what a build over its records would: vectors, search."""
    fresh = ExampleIndex.build(Dataset("toy", index.kind, index.records, index.labels), emb, index.config)
    np.testing.assert_allclose(index.vectors, fresh.vectors, atol=1e-6)
    q = fresh.vectors[::7]
    k = min(5, len(index))
    s1, i1 = index.search(q, k)
    s2, i2 = fresh.search(q, k)
    np.testing.assert_allclose(s1, s2, atol=dot_tol(q.shape[1]))
    np.testing.assert_allclose(np.einsum("qd,qkd->qk", q, index.vectors[i1]), s1, atol=dot_tol(q.shape[1]))  # ids point at them
    assert index._faiss.ntotal == len(index.records) == len(index.vectors)


@pytest.mark.parametrize("index_type", ["flat", "ivf", "hnsw"])
def test_upsert_and_remove_equal_a_build_of_the_result(emb, index_type):
    ds = make_dataset(400)
    config = IndexConfig(index_type=index_type, **({"nlist": 8, "nprobe": 8} if index_type == "ivf" else {}))
    index = ExampleIndex.build(ds.select(range(300)), emb, config)
    centroids = index._faiss.quantizer.reconstruct_n(0, 8) if index_type == "ivf" else None
    new = ds.records[300:]
    counts = index.upsert(new, emb.encode([r.input for r in new]))
    assert counts == {"added": 100, "replaced": 0, "unchanged": 0} and len(index) == 400
    assert index.records == ds.records
    same_as_build(index, emb)
    assert index.remove([r.id for r in ds.records[10:50]]) == 40
    assert index.records == ds.records[:10] + ds.records[50:]
    same_as_build(index, emb)
    if index_type == "ivf":  # the trained cells are kept: no re-training on an update
        np.testing.assert_array_equal(index._faiss.quantizer.reconstruct_n(0, 8), centroids)
        assert index.config.index_type.value == "ivf" and index._faiss.nprobe == 8


def test_upsert_replaces_rows_by_id_and_skips_identical_ones(emb):
    old = (Record("a", "w1 w2", "neg"), Record("b", "w3 w4", "pos"), Record("c", "w5", "neg"))
    index = ExampleIndex.build(Dataset("toy", TaskKind.CLASSIFICATION, old, ("neg", "pos")), emb)
    new = (Record("b", "w3 w4", "neg"), Record("c", "w5", "neg"), Record("d", "w6", "pos"))
    counts = index.upsert(new, emb.encode([r.input for r in new]))
    assert counts == {"added": 1, "replaced": 1, "unchanged": 1}
    assert [(r.id, r.output) for r in index.records] == [("a", "neg"), ("c", "neg"), ("b", "neg"), ("d", "pos")]
    same_as_build(index, emb)


def test_rows_with_several_references_are_replaced_and_removed_whole(emb, tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps({"id": "x", "input": "a b", "output": ["r1", "r2", "r3"]}) + "\n"
                    + json.dumps({"id": "y", "input": "c d", "output": "r4"}) + "\n")
    ds = load_dataset(path, id_field="id")
    assert [r.id for r in ds.records] == ["x", "x#2", "x#3", "y"] and row_id("x#3") == "x"
    index = ExampleIndex.build(ds, emb)
    path.write_text(json.dumps({"id": "x", "input": "a b", "output": ["r9"]}) + "\n")
    new = load_dataset(path, id_field="id").records
    assert index.upsert(new, emb.encode([r.input for r in new]))["replaced"] == 1
    assert [(r.id, r.output) for r in index.records] == [("y", "r4"), ("x", "r9")]
    assert index.remove(["x"]) == 1 and [r.id for r in index.records] == ["y"]


def test_id_field_errors(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"id": 1, "text": "a", "label": "x"}\n{"id": 1, "text": "b", "label": "y"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: id '1' repeats line 1's"):
        load_dataset(path, id_field="id")
    path.write_text('{"id": "a#1", "text": "a", "label": "x"}\n{"id": "b", "text": "b", "label": "y"}\n')
    with pytest.raises(DataError, match="reserved"):
        load_dataset(path, id_field="id")
    with pytest.raises(DataError, match="field 'key' not found"):
        load_dataset(path, id_field="key")


def test_remove_refuses_unknown_ids_and_emptying(emb):
    index = ExampleIndex.build(make_dataset(5), emb)
    with pytest.raises(ValueError, match="no record with id 'nope'"):
        index.remove(["nope", index.records[0].id])
    assert len(index) == 5  # nothing removed
    with pytest.raises(ValueError, match="empty"):
        index.remove([r.id for r in index.records])
    twice = (Record("z", "w1", "neg"), Record("z", "w2", "pos"))
    with pytest.raises(ValueError, match="duplicate ids"):
        index.upsert(twice, emb.encode([r.input for r in twice]))
    assert len(index) == 5


def test_update_index_publishes_a_version_and_embeds_only_new_texts(emb, tmp_path):
    ds = make_dataset(60)
    folder = tmp_path / "ix"
    ExampleIndex.build(ds.select(range(50)), emb).save(folder)
    v0 = ExampleIndex.load(folder).version
    embedded: list[str] = []

    def embed(texts):
        embedded.extend(texts)
        return emb.encode(texts)

    # rows 40..49 are present already (unchanged), 50..59 new; row 0 gets a new label with its text kept
    relabel = Record(ds.records[0].id, ds.records[0].input, "pos" if ds.records[0].output == "neg" else "neg")
    r = update_index(folder, records=(relabel, *ds.records[40:60]), embed=embed)
    assert (r["added"], r["replaced"], r["unchanged"], r["removed"], r["count"]) == (10, 1, 10, 0, 60)
    assert sorted(embedded) == sorted(x.input for x in ds.records[50:60])  # the relabelled text was reused
    index = ExampleIndex.load(folder)
    assert index.version == r["version"] != v0 == r["previous"]
    same_as_build(index, emb)
    lineage = index.manifest["lineage"]
    assert [e["change"] for e in lineage] == ["build", "update"] and lineage[-1]["parent"] == v0
    assert lineage[0]["dataset_sha256"] == ds.select(range(50)).sha256
    assert lineage[-1]["dataset_sha256"] == index.dataset.sha256 == index.manifest["dataset_sha256"]
    # nothing to do: no new version
    again = update_index(folder, records=ds.records[55:60], embed=embed)
    assert again["version"] == again["previous"] == r["version"] and again["unchanged"] == 5
    r2 = update_index(folder, remove_ids=[ds.records[1].id])
    assert r2["removed"] == 1 and ExampleIndex.load(folder).manifest["count"] == 59
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith("v-")) == sorted([r["version"], r2["version"]])
    with pytest.raises(IndexFormatError, match="no such index"):
        update_index(tmp_path / "none", remove_ids=["a"])


def test_stale_note_follows_the_lineage(emb, tmp_path):
    ds = make_dataset(30)
    folder = tmp_path / "ix"
    ExampleIndex.build(ds.select(range(20)), emb).save(folder)
    trained = {k: ExampleIndex.load(folder).manifest[k] for k in ("dataset_sha256", "count")}
    assert stale_note(ExampleIndex.load(folder), trained, "soft prompt s") is None
    for i in (20, 25):
        update_index(folder, records=ds.records[i:i + 5], embed=emb.encode)
    note = stale_note(ExampleIndex.load(folder), trained, "soft prompt s")
    assert note == ("soft prompt s was trained on an earlier version of this index (20 records, 2 updates ago; "
                    "now 30): retrain it to use the changed records")
    assert stale_note(ExampleIndex.load(folder), {"dataset_sha256": "other", "count": 3}, "x") is None
    assert stale_note(ExampleIndex.load(folder), None, "x") is None


# ----------------------------------------------------------------------------- the CLI and the API


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_icl(*args, env=None):
    return subprocess.run([str(ICL), *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_cli_add_and_remove(tmp_path):
    rows = [{"id": f"r{i}", "review": f"film {i} " + ("great" if i % 2 else "dull"), "label": "pos" if i % 2 else "neg"}
            for i in range(30)]
    base = write_jsonl(tmp_path / "base.jsonl", rows[:20])
    more = write_jsonl(tmp_path / "more.jsonl", rows[15:] + [{"id": "r3", "review": "film 3 now great", "label": "pos"}])
    ix = ["--indexes-dir", tmp_path / "ix"]
    assert run_icl("index", "build", base, "--name", "rt", "--embedder", "hashing:64", "--id-field", "id", *ix).returncode == 0
    out = run_icl("index", "add", "rt", more, *ix)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("rt: 10 added, 1 replaced, 5 unchanged; 30 records (new version v-")
    out = run_icl("index", "remove", "rt", "--ids", "r1,r2", "--ids", "r29", "--json", *ix)
    info = json.loads(out.stdout)
    assert (info["removed"], info["count"]) == (3, 27)
    index = ExampleIndex.load(tmp_path / "ix" / "rt")
    assert {r.id: r.input for r in index.records}["r3"] == "film 3 now great" and "r1" not in {r.id for r in index.records}
    for args, message in [
        (("index", "add", "rt", more, "--embedder", "hashing:32"), "error: index 'rt' was built with embedder "
                                                                  "'hashing:64', not 'hashing:32'"),
        (("index", "remove", "rt", "--ids", "r1"), "error: remove: no record with id 'r1' in the index"),
        (("index", "add", "nope", more), "error: "),
    ]:
        out = run_icl(*args, *ix)
        assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert out.stderr.startswith(message), out.stderr
    assert len(ExampleIndex.load(tmp_path / "ix" / "rt")) == 27


def test_api_add_checks_template_fields_and_labels(tmp_path):
    rows = [{"review": f"film {i} " + ("great" if i % 2 else "dull"), "label": "pos" if i % 2 else "neg"} for i in range(10)]
    indexes.build_index(str(write_jsonl(tmp_path / "a.jsonl", rows)), "rt", embedder="hashing:64", indexes_dir=tmp_path)
    other = write_jsonl(tmp_path / "b.jsonl", [{"text": "film x", "label": "pos"}])
    with pytest.raises(indexes.UpdateError, match=r"fields text/label are not index 'rt''s review/label, which its template reads"):
        indexes.add_to_index("rt", str(other), indexes_dir=tmp_path)
    odd = write_jsonl(tmp_path / "c.jsonl", [{"review": "film y", "label": "meh"}])
    with pytest.raises(DataError, match="meh"):
        indexes.add_to_index("rt", str(odd), indexes_dir=tmp_path)
    tpl = tmp_path / "t.json"
    tpl.write_text(json.dumps(sentiment_template().to_dict()))
    with pytest.raises(indexes.UpdateError, match="is not index 'rt''s template"):
        indexes.add_to_index("rt", str(other), template=tpl, indexes_dir=tmp_path)
    stored = tmp_path / "stored.json"
    stored.write_text(json.dumps(ExampleIndex.load(tmp_path / "rt").template))
    r = indexes.add_to_index("rt", str(other), text_field="text", template=stored, indexes_dir=tmp_path)
    assert r["added"] == 1 and r["count"] == 11  # fields given explicitly: the same template reads them


def test_a_soft_prompt_of_an_earlier_version_is_reported_stale(tiny_tokenizer, tmp_path):
    from icl_engine.core.pipeline import PipelineConfig
    from icl_engine.core.prompt import PromptBuilder
    from icl_engine.core.resolve import resolve
    from icl_engine.train.loop import TrainSettings
    from icl_engine.train.soft_prompt import SoftPromptConfig, train_soft_prompt

    lm = make_tiny_lm(tiny_tokenizer)
    emb = get_embedder("hashing:64")
    ds = Dataset("tiny", TaskKind.CLASSIFICATION, make_records(SENTIMENT_ROWS), ("negative", "positive"))
    folder = tmp_path / "ix"
    ExampleIndex.build(ds.select(range(10)), emb).save(folder)
    index = ExampleIndex.load(folder)
    builder = PromptBuilder(sentiment_template(), lm.tokenizer, ds.labels)
    cfg = SoftPromptConfig(method="ipt", k=2, n_virtual=2, train=TrainSettings(batch_size=4, max_steps=1,
                                                                              eval_fraction=0.25))
    soft = train_soft_prompt(lm, index.dataset, cfg, builder=builder, index=index, out=tmp_path / "soft").out
    config = PipelineConfig(index=str(folder), soft_prompt=str(soft))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", StaleWarning)
        resolve(config, lm=lm)  # the same version: silent
    update_index(folder, records=ds.records[10:], embed=emb.encode)
    with pytest.warns(StaleWarning, match=r"soft prompt .*soft was trained on an earlier version of this index "
                                          r"\(10 records, 1 update ago; now 12\)"):
        parts = resolve(config, lm=lm)
    assert parts.soft is not None and len(parts.index) == 12  # reported, not refused
