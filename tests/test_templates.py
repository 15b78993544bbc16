"""Templates made from the data, and the template search (tiny random LM, hashing embedder)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from icl_engine.core.data import Dataset, TaskKind, make_records
from icl_engine.core.embed import get_embedder
from icl_engine.core.index import ExampleIndex
from icl_engine.core.pipeline import Engine
from icl_engine.core.prompt import Template
from icl_engine.core.template_search import MIN_POOL, search_templates, validation_slice
from icl_engine.core.templates import MAX_LISTED_LABELS, TemplateError, data_template, template_candidates, verbalize

from conftest import make_tiny_lm, make_tiny_model, make_tiny_tokenizer

ICL = Path(sys.executable).with_name("icl")


def dataset(labels, fields=("utterance", "intent"), n=40, kind=TaskKind.CLASSIFICATION):
    pairs = [(f"request number {i} about {labels[i % len(labels)]}", labels[i % len(labels)]) for i in range(n)]
    return Dataset("mine", kind, make_records(pairs), tuple(sorted(labels)) if kind is TaskKind.CLASSIFICATION
                   else (), fields)


@pytest.mark.parametrize("label, words", [
    ("add_to_playlist", "add to playlist"), ("add-to-playlist", "add to playlist"),
    ("AddToPlaylist", "add to playlist"), ("getWeather", "get weather"), ("NEG_CLASS", "NEG CLASS"),
    ("positive", "positive"), ("0", "0"), ("two words", "two words"),
])
def test_verbalize(label, words):
    assert verbalize(label) == words


def test_default_names_the_task_the_field_and_the_labels():
    tpl, notes = data_template(dataset(["get_weather", "play_music"]))
    assert tpl.instruction == ""  # measured: an instruction cost SmolLM2 accuracy (templates.py)
    tpl, notes = data_template(dataset(["get_weather", "play_music"]), instruction=True)
    assert tpl.instruction == "Classify each utterance as one of: get weather, play music."
    assert tpl.input_format == "Utterance: {input}\nIntent:" and tpl.output_format == " {output}"
    assert tpl.verbalizers == {"get_weather": "get weather", "play_music": "play music"} and notes == []
    plain, _ = data_template(dataset(["neg", "pos"], fields=("text", "label")))
    assert plain.input_format == "Text: {input}\nLabel:" and plain.verbalizers == {}
    odd, _ = data_template(dataset(["neg", "pos"], fields=("x1", "y2")))
    assert odd.input_format == "Text: {input}\nLabel:"  # field names that are no words


def test_many_labels_are_not_listed_and_clashing_labels_are_refused():
    many = [f"class_{i}" for i in range(MAX_LISTED_LABELS + 1)]
    tpl, notes = data_template(dataset(many, n=60), instruction=True)
    assert tpl.instruction == "Classify each utterance." and "too many to list" in notes[0]
    with pytest.raises(TemplateError, match=r"labels \['a-b', 'a_b'\] read the same"):
        data_template(dataset(["a_b", "a-b"]))


def test_generation_default_and_candidates():
    ds = dataset(["x"], fields=("meaning_representation", "target"), kind=TaskKind.GENERATION)
    tpl, _ = data_template(ds)
    assert tpl.input_format == "Meaning representation: {input}\nTarget:"
    assert list(template_candidates(ds))[0] == "default"


def test_candidates_start_with_the_default_and_differ():
    ds = dataset(["get_weather", "play_music"])
    cands = template_candidates(ds)
    assert list(cands)[0] == "default" and cands["default"] == data_template(ds)[0]
    assert len(set(map(repr, cands.values()))) == len(cands) >= 4
    assert len(template_candidates(dataset(["neg", "pos"], fields=("text", "label")))) == 3  # nothing to verbalize


@pytest.fixture(scope="module")
def parts(tiny_tokenizer):
    return make_tiny_lm(tiny_tokenizer), get_embedder("hashing:64")


def test_search_scores_every_candidate_held_out_and_the_default_wins_ties(parts, monkeypatch):
    lm, emb = parts
    ds = dataset(["get_weather", "play_music"], n=60)
    index = ExampleIndex.build(ds, emb)
    seen = []
    real = Engine.classify

    def spy(self, queries, **kw):
        seen.append((list(queries), kw["exclude_ids"]))
        return real(self, queries, **kw)

    monkeypatch.setattr(Engine, "classify", spy)
    same = Template(input_format="{input} ->", output_format=" {output}")
    result = search_templates(index, lm, emb, k=2, n_validation=12,
                              candidates={"a": same, "b": same, "c": template_candidates(ds)["default"]})
    assert [row["name"] for row in result.table] == ["a", "c"]  # the duplicate is not scored twice
    assert all(row["n"] == 12 and 0 <= row["score"] <= 1 for row in result.table)
    rows = validation_slice(ds, 12)
    for queries, exclude in seen:  # each held-out record is never its own demonstration
        assert exclude == [ds.records[i].id for i in rows] and queries == [ds.records[i].input for i in rows]
    c = result.table[1]
    assert c["gain_over_default"] == pytest.approx(c["score"] - result.table[0]["score"])
    assert result.best == ("c" if c["gain_over_default"] > c["gain_se"] else "a")
    tie = search_templates(index, lm, emb, k=2, n_validation=12, candidates={"first": same, "second": Template(
        input_format="{input} =>", output_format=" {output}")})
    if tie.table[0]["score"] == tie.table[1]["score"]:
        assert tie.best == "first"


def test_a_tiny_pool_keeps_the_default_with_a_note(parts):
    lm, emb = parts
    index = ExampleIndex.build(dataset(["neg", "pos"], n=MIN_POOL - 1), emb)
    result = search_templates(index, lm, emb, k=2, n_validation=10)
    assert result.best == "default" and result.n_validation == 0 and "too few" in result.notes[0]


@pytest.mark.slow
def test_build_with_auto_template_and_template_search_through_the_cli(tmp_path, icl_forks):
    """The first build through the installed script, the others forked from a preloaded process
    (tests/icl_forks.py)."""
    tok = make_tiny_tokenizer()
    lm_dir = tmp_path / "lm"
    make_tiny_model(len(tok), initializer_range=0.2).save_pretrained(lm_dir)
    tok.save_pretrained(lm_dir)
    data = tmp_path / "intents.jsonl"
    ds = dataset(["get_weather", "play_music", "rate_book"], n=45)
    data.write_text("".join(json.dumps({"utterance": r.input, "intent": r.output}) + "\n" for r in ds.records))
    env = {**os.environ, "ICL_INDEXES": str(tmp_path / "indexes")}
    run = lambda *a: icl_forks.run(a, cwd=tmp_path, env=env)  # noqa: E731
    p = subprocess.run([str(ICL), "index", "build", str(data), "--name", "plain", "--embedder", "hashing:64", "--json"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["template_source"] == "made from the data"
    assert ExampleIndex.load(tmp_path / "indexes" / "plain").template["input_format"] == "Utterance: {input}\nIntent:"
    p = run("index", "build", str(data), "--name", "auto", "--embedder", "hashing:64", "--auto-template",
            "--lm", str(lm_dir), "--search-examples", "10", "--search-k", "2", "--json")
    assert p.returncode == 0, p.stderr
    search = json.loads(p.stdout)["template_search"]
    assert search["n_validation"] == 10 and len(search["candidates"]) >= 4
    best = next(c for c in search["candidates"] if c["name"] == search["best"])
    stored = ExampleIndex.load(tmp_path / "indexes" / "auto")
    assert stored.template == best["template"] and stored.extras["template_search.json"]["best"] == search["best"]
    p = run("template", "search", "plain", "--lm", str(lm_dir), "--examples", "10", "--k", "2")
    assert p.returncode == 0, p.stderr
    assert "template search: 10 held-out examples" in p.stdout and "(chosen)" in p.stdout
    assert "template_search.json" in ExampleIndex.load(tmp_path / "indexes" / "plain").extras
