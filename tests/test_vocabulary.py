"""docs/vocabulary.md against what the project returns: every name in the JSON of every command
(`icl ... --json`, in process), every endpoint of `icl serve` (OpenAI's own /v1/completions
aside) and every output file is in the table, and every name in the table is returned somewhere.
Tiny LM, hashing embedder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import make_tiny_model, make_tiny_tokenizer

DOC = Path(__file__).resolve().parents[1] / "docs" / "vocabulary.md"
# dicts whose keys are data (labels, file names, knob names), not vocabulary
DATA_KEYS = {"probs", "files", "index_params", "verbalizers", "template_search", "heldout_accuracy"}
ROWS = [("a wonderful film", "positive"), ("great acting and a moving story", "positive"),
        ("a dull boring film", "negative"), ("terrible plot and bad acting", "negative")]
GEN = [("name: a, food: b", "a serves b"), ("name: c, food: d", "c serves d"), ("name: e, food: f", "e serves f")]


def documented() -> set[str]:
    names = set()
    for line in DOC.read_text().splitlines():
        if line.startswith("| `"):
            names |= set(re.findall(r"`([a-z0-9_]+)`", line.split("|")[1]))
    return names


def names_in(obj, out: set[str]) -> set[str]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.add(k)
            if k not in DATA_KEYS or not isinstance(v, dict):
                names_in(v, out)
    elif isinstance(obj, list):
        for v in obj:
            names_in(v, out)
    return out


@pytest.fixture(scope="module")
def returned(tmp_path_factory) -> set[str]:
    """Every name the commands, endpoints and files return."""
    from fastapi.testclient import TestClient

    from icl_engine.apps.cli import app
    from icl_engine.apps.service import ServeConfig, create_app

    root = tmp_path_factory.mktemp("vocab")
    tok = make_tiny_tokenizer()
    make_tiny_model(len(tok), initializer_range=0.2).save_pretrained(root / "lm")
    tok.save_pretrained(root / "lm")
    (root / "train.jsonl").write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in ROWS))
    (root / "more.jsonl").write_text(json.dumps({"text": "a moving film", "label": "positive"}) + "\n")
    (root / "gen.jsonl").write_text("".join(json.dumps({"input": i, "output": o}) + "\n" for i, o in GEN))
    (root / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t, _ in ROWS))
    (root / "inputs.jsonl").write_text("".join(json.dumps({"input": i}) + "\n" for i, _ in GEN))
    ix, lm = ["--indexes-dir", str(root / "indexes")], ["--lm", str(root / "lm")]
    names: set[str] = set()
    runner = CliRunner()

    def cli(*args) -> None:
        res = runner.invoke(app, [*args, "--json"])
        assert res.exit_code == 0, res.output
        names_in(json.loads(res.stdout), names)

    cli("index", "build", str(root / "train.jsonl"), "--name", "rt", "--embedder", "hashing:64", *ix)
    cli("index", "build", str(root / "gen.jsonl"), "--name", "gen", "--embedder", "hashing:64", *ix)
    cli("index", "build", str(root / "train.jsonl"), "--name", "gone", "--embedder", "hashing:64", *ix)
    cli("index", "add", "rt", str(root / "more.jsonl"), *ix)
    cli("index", "info", "rt", *ix)
    cli("index", "cache", "rt", *lm, *ix)
    cli("index", "list", *ix)
    cli("index", "search", "rt", "a film", *ix)
    cli("index", "search", "gen", "name: a", *ix)
    cli("index", "delete", "gone", *ix)
    cli("classify", "rt", "a moving film", "--k", "2", *lm, *ix)
    cli("classify", "rt", "a moving film", "--k", "2", "--scoring", "cached", *lm, *ix)
    cli("generate", "gen", "name: x, food: y", "--k", "2", "--max-new-tokens", "3", *lm, *ix)
    cli("eval", "rt", "--test", str(root / "train.jsonl"), "--k", "2", "--predictions", *lm, *ix)
    cli("eval", "gen", "--test", str(root / "gen.jsonl"), "--k", "5", "--max-new-tokens", "3", "--predictions", *lm, *ix)
    cli("classify-file", str(root / "texts.jsonl"), "--index", "rt", "--out", str(root / "o.jsonl"), *lm, *ix)
    cli("generate-file", str(root / "inputs.jsonl"), "--index", "gen", "--out", str(root / "g.jsonl"),
        "--max-new-tokens", "3", *lm, *ix)
    for f in ("o.jsonl", "g.jsonl"):
        for line in (root / f).read_text().splitlines():
            names_in(json.loads(line), names)
    res = runner.invoke(app, ["classify-file", str(root / "texts.jsonl"), "--index", "rt", "--out",
                              str(root / "o.parquet"), *lm, *ix])
    assert res.exit_code == 0, res.output
    import pyarrow.parquet as pq

    names_in(pq.read_table(root / "o.parquet").to_pylist(), names)
    first = json.loads((root / "o.jsonl").read_text().splitlines()[0])
    cli("index", "remove", "rt", "--ids", first["demo_ids"][0], *ix)
    cli("index", "cache", "rt", "--dtype", "int8", *lm, *ix)

    config = ServeConfig(indexes=("rt",), indexes_dir=str(root / "indexes"), lm=str(root / "lm"))
    with TestClient(create_app(config)) as c:
        while c.get("/readyz").status_code != 200:
            pass
        for method, path, body in (
            ("get", "/healthz", None), ("get", "/readyz", None), ("get", "/v1/models", None),
            ("get", "/v1/indexes", None), ("get", "/v1/indexes/rt", None),
            ("post", "/v1/classify", {"index": "rt", "text": "a film", "k": 2}),
            ("post", "/v1/classify", {"index": "rt", "texts": ["a film", "a plot"], "k": 2, "labels": ["negative", "positive"]}),
            ("post", "/v1/classify", {"index": "rt", "text": "a film", "k": 2, "scoring": "cached"}),
            ("post", "/v1/generate", {"index": "gen", "input": "name: x", "k": 2, "max_new_tokens": 3}),
            ("post", "/v1/search", {"index": "rt", "text": "a film", "k": 2, "mmr": 0.5}),
            ("post", "/v1/classify", {"index": "nope", "text": "a film"}),  # an error object
        ):
            r = getattr(c, method)(path, **({"json": body} if body else {}))
            names_in(r.json(), names)
        with c.stream("POST", "/v1/generate", json={"index": "gen", "input": "name: x", "k": 2, "max_new_tokens": 3,
                                                     "stream": True}) as s:
            for event in s.read().decode().split("\n\n"):
                if "data: " in event:
                    names_in(json.loads(event.split("data: ", 1)[1]), names)
    return names


@pytest.mark.slow
def test_every_returned_name_is_documented(returned):
    missing = sorted(returned - documented())
    assert not missing, missing


@pytest.mark.slow
def test_every_documented_name_is_returned(returned):
    """What the doc names exists (names only sent, never returned, are the request options)."""
    requests = {"texts", "k", "method", "calibration", "scoring", "soft_prompt", "labels", "max_new_tokens", "stream", "mmr",
                "updated", "id_field", "template_source", "template_notes", "template_search", "retry_after",
                "loading", "skipped_too_long", "kv_dtype"}
    unused = sorted(documented() - returned - requests)
    assert not unused, unused
