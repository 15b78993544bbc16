"""`icl index fit`: every candidate scored on a validation split the candidates never saw, the
best attached to the index version, and method "auto" answering with it through the engine, the
CLI and `icl serve` (the same log-scores as `icl eval`). Tiny LM, hashing embedder."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import make_tiny_model, make_tiny_tokenizer
from numerics import assert_scores_close

ICL = Path(sys.executable).with_name("icl")
WORDS = {"positive": ["great", "wonderful", "moving", "fine"], "negative": ["dull", "boring", "terrible", "bad"]}


def rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = "positive" if i % 2 else "negative"
        out.append({"text": f"a {rng.choice(WORDS[label])} film {i} seed {seed}", "label": label})
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """An index of 60 records, a tiny LM, a tiny fine-tuned reference, and the fit of the index."""
    from icl_engine.apps import indexes, training

    root = tmp_path_factory.mktemp("fit")
    tok = make_tiny_tokenizer()
    make_tiny_model(len(tok), initializer_range=0.2).save_pretrained(root / "lm")
    tok.save_pretrained(root / "lm")
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(60, 0)))
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(12, 1)))
    ix = root / "indexes"
    indexes.build_index(str(root / "train.jsonl"), "rt", embedder="hashing:64", indexes_dir=ix)
    training.finetune_reference("rt", out=root / "ref", steps=4, batch_size=4, lm=str(root / "lm"), indexes_dir=ix)
    fit = training.fit_index("rt", reference=root / "ref", validation=12, ipt_steps=2, lm=str(root / "lm"),
                             indexes_dir=ix)
    return root, ix, fit


@pytest.mark.slow
def test_the_selection_reads_only_the_validation_split_and_picks_its_best(world):
    root, ix, fit = world
    table = {r["name"]: r for r in fit["table"]}
    assert {r["candidate"] for r in fit["table"]} == {"icl", "knn_prompting", "readout", "readout_ref", "icl+readout",
                                                       "ipt"}
    assert len([n for n in table if n.startswith("icl k=")]) == 6  # k in (4, 8, 16) x calibration in (none, pmi)
    best = max(fit["table"], key=lambda r: (r["score"], -r["trained"]))
    assert fit["setting"] == best["name"] and fit["selected_on"] == "validation"
    assert fit["validation"]["records"] == 12 and len(fit["validation"]["ids"]) == 12
    readout = table["readout"]
    assert readout["trained"] == (1024 + 1 + 1) * 2 or readout["trained"] > 0  # (S+1) x L weights + L biases
    assert table["readout_ref"]["labelled"] == 0  # the reference's labels, no gold
    # the validation records never served as demonstrations or anchors during the selection
    from icl_engine.core.knn_prompt import Anchors

    work = next((ix / "rt" / "fits").glob(".work-*"))
    anchors_manifest = json.loads((work / "anchors-seed0" / "manifest.json").read_text())
    assert not set(anchors_manifest["context"]) & set(fit["validation"]["ids"])
    assert Anchors  # (imported for the manifest's format)
    cached = json.loads(next((work / "validation").glob("icl_k-4_calibration-none.json")).read_text())
    assert len(cached["pred"]) == 12


def test_auto_answers_with_the_fit_and_an_explicit_method_without_it(world):
    import icl_engine as icl

    root, ix, fit = world
    engine = icl.Engine(icl.EngineSpec(index=str(ix / "rt"), lm=str(root / "lm")))
    assert engine.fit is not None and engine.fit.name == fit["setting"]
    [auto] = engine.classify(["a great film"])
    [knn] = engine.classify(["a great film"], method="knn", k=4)
    assert auto.answered_by == f"fit: {fit['setting']}" and knn.answered_by == "knn-4"
    plain = icl.Engine(icl.EngineSpec(index=str(ix / "rt"), lm=str(root / "lm"), fit=False))
    assert plain.fit is None and plain.classify(["a great film"])[0].answered_by == "knn-8"


def test_refit_keeps_the_choice_and_its_validation_split_under_another_seed(world, tmp_path):
    import shutil

    from icl_engine.apps import training

    root, ix, fit = world
    copy = tmp_path / "indexes"
    shutil.copytree(ix, copy)
    refit = lambda seed, **kw: training.fit_index("rt", refit_only=True, seed=seed, lm=str(root / "lm"),  # noqa: E731
                                                   indexes_dir=copy, **kw)
    if fit["reference_labels"]:
        with pytest.raises(ValueError, match="give it with --reference"):
            refit(1)
    kept = ("setting", "options", "params", "validation", "table", "selected_on", "trained_parameters",
            "labelled_records", "reference_labels")
    # the anchors' context (kNN prompting, readouts) is drawn by the seed, from the records outside V
    context = lambda f: json.loads((Path(f["path"]) / "anchors" / "manifest.json").read_text())["context"] \
        if f["anchors"] else None  # noqa: E731
    again = refit(0, reference=root / "ref")
    assert {k: again[k] for k in kept} == {k: fit[k] for k in kept}
    context0 = context(again)
    other = refit(1, reference=root / "ref")  # replaces the fit in place
    assert {k: other[k] for k in kept} == {k: fit[k] for k in kept} and (fit["seed"], other["seed"]) == (0, 1)
    if other["anchors"]:
        assert not set(context(other)) & set(fit["validation"]["ids"]) and context(other) != context0
    shutil.rmtree(copy / "rt" / "fits")
    with pytest.raises(ValueError, match="no fit is attached"):
        refit(1, reference=root / "ref")


def test_a_refit_names_its_setting_as_the_fit_did(world, tmp_path):
    # fit.json stores a setting's params with sorted keys; the refit's name keeps the setting's
    # own order ("k=16 calibration=none ..."), so a seed's run names the same setting as seed 0's
    import shutil

    from icl_engine.apps import training

    root, ix, _ = world
    copy = tmp_path / "indexes"
    shutil.copytree(ix, copy)
    kw = dict(lm=str(root / "lm"), indexes_dir=copy, reference=root / "ref")
    first = training.fit_index("rt", candidates=["icl"], validation=12, **kw)
    keys = [part.split("=")[0] for part in first["setting"].split()[1:]]
    assert keys != sorted(keys)  # else this test could not tell the two orders apart
    assert training.fit_index("rt", refit_only=True, seed=1, **kw)["setting"] == first["setting"]


def test_a_new_index_version_has_no_fit(world, tmp_path):
    import shutil

    from icl_engine.apps import indexes
    from icl_engine.core.pipeline import Engine, EngineSpec

    root, ix, fit = world
    copy = tmp_path / "indexes"
    shutil.copytree(ix, copy)
    (tmp_path / "more.jsonl").write_text(json.dumps({"text": "a fine new film", "label": "positive"}) + "\n")
    indexes.add_to_index("rt", str(tmp_path / "more.jsonl"), indexes_dir=copy)
    engine = Engine(EngineSpec(index=str(copy / "rt"), lm=str(root / "lm")))
    assert engine.fit is None  # fitted to the version before: another version answers with knn


@pytest.mark.slow
def test_the_cli_and_the_service_answer_with_the_fit_as_eval_does(world, icl_forks):
    """icl eval (auto), icl classify (auto), /v1/classify: the fit answers, with equal log-scores.
    (icl eval through the installed script, icl classify forked from a preloaded process:
    tests/icl_forks.py.)"""
    from fastapi.testclient import TestClient

    from icl_engine.apps.service import ServeConfig, create_app

    root, ix, fit = world
    env_args = ["--indexes-dir", str(ix), "--lm", str(root / "lm")]
    ev = subprocess.run([str(ICL), "eval", "rt", "--test", str(root / "test.jsonl"), "--json", "--predictions",
                         *env_args], capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr
    ev = json.loads(ev.stdout)
    assert ev["answered_by"] == f"fit: {fit['setting']}"
    text = ev["predictions"][0]["text"]
    cl = icl_forks.run(["classify", "rt", text, "--json", *env_args], cwd=root, env=dict(os.environ))
    assert cl.returncode == 0, cl.stderr
    cl = json.loads(cl.stdout)
    assert cl["answered_by"] == ev["answered_by"] and cl["label"] == ev["predictions"][0]["label"]
    assert_scores_close(cl["log_scores"], ev["predictions"][0]["log_scores"], root / "lm")
    with TestClient(create_app(ServeConfig(indexes=("rt",), indexes_dir=str(ix), lm=str(root / "lm")))) as c:
        while c.get("/readyz").status_code != 200:
            pass
        r = c.post("/v1/classify", json={"index": "rt", "text": text}).json()
    assert r["answered_by"] == ev["answered_by"] and r["label"] == cl["label"]
    assert_scores_close(r["log_scores"], cl["log_scores"], root / "lm")
    assert np.isclose(sum(r["probs"].values()), 1.0)
