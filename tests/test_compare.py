"""The approximation report on a tiny random Llama saved to a folder, the hashing embedder and a
tiny dataset: every method with 2 seeds and 2 training steps writes a complete report, an
interrupted/repeated run reuses what exists, and the comparison measures match hand values."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from icl_engine.core.data import Dataset, TaskKind, make_records
from icl_engine.core.embed import get_embedder
from icl_engine.core.index import ExampleIndex
from icl_engine.studies.compare import (
    REPORT_JSON,
    REPORT_MD,
    REPORT_PNG,
    RUN_FILE,
    CompareError,
    CompareMethod,
    agreement,
    mean_total_variation,
    run_compare,
    total_variation,
)
from icl_engine.train.finetune import FinetuneConfig
from icl_engine.train.loop import TrainSettings

from conftest import SENTIMENT_ROWS, make_tiny_model, make_tiny_tokenizer, sentiment_template

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")

TEMPLATE = sentiment_template()
ROWS = SENTIMENT_ROWS
TEST = [("a great movie", "positive"), ("boring and dull", "negative"), ("wonderful film", "positive"),
        ("a terrible film", "negative"), ("great acting", "positive")]
SEEDS = 2


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    tok = make_tiny_tokenizer()
    lm_dir = root / "tiny-lm"
    make_tiny_model(len(tok), initializer_range=0.2).save_pretrained(lm_dir)
    tok.save_pretrained(lm_dir)
    train = Dataset("tiny", TaskKind.CLASSIFICATION, make_records(ROWS), ("negative", "positive"))
    folder = root / "indexes" / "tiny"
    ExampleIndex.build(train, get_embedder("hashing:64")).save(folder, template=TEMPLATE.to_dict())
    test = Dataset("tiny-test", TaskKind.CLASSIFICATION, make_records(TEST), ("negative", "positive"))
    return root, lm_dir, test


def compare(workspace, steps=2, test=None, **kw):
    root, lm_dir, default_test = workspace
    test = test or default_test
    args = dict(reference=root / "ref", methods=[m.value for m in CompareMethod], seeds=SEEDS, k=2,
                out=root / "report", lm=str(lm_dir), indexes_dir=root / "indexes", train_pool=None,
                test_limit=None, n_virtual=3, threads=1, progress=False,
                soft_train=TrainSettings(max_steps=steps, batch_size=4, eval_fraction=0.0),
                finetune_config=FinetuneConfig(train=TrainSettings(max_steps=2, batch_size=4, eval_fraction=0.0)))
    return run_compare("tiny", test, **{**args, **kw})


@pytest.fixture(scope="module")
def report(workspace):
    return compare(workspace)


def test_agreement_and_total_variation_by_hand():
    assert agreement(["a", "b", "a", "c"], ["a", "a", "a", "c"]) == 0.75
    assert agreement([" x y", "z"], ["x y ", "w"]) == 0.5  # generated text: surrounding space ignored
    p = [[0.7, 0.2, 0.1], [1.0, 0.0, 0.0]]
    q = [[0.4, 0.4, 0.2], [0.0, 0.0, 1.0]]
    np.testing.assert_allclose(total_variation(p, q), [0.3, 1.0])  # 0.5*(.3+.2+.1), 0.5*(1+0+1)
    assert mean_total_variation(p, q) == pytest.approx(0.65)
    assert mean_total_variation(p, p) == 0.0
    with pytest.raises(ValueError, match="equal"):
        agreement(["a"], [])
    with pytest.raises(ValueError, match="shape"):
        total_variation([[1.0, 0.0]], [[1.0, 0.0, 0.0]])


def test_report_has_every_row_and_column(workspace, report):
    root = workspace[0]
    out = root / "report"
    on_disk = json.loads((out / REPORT_JSON).read_text())
    assert on_disk == report
    rows = {r["method"]: r for r in report["rows"]}
    assert list(rows) == [m.value for m in CompareMethod]
    for name, r in rows.items():
        for col in ("accuracy", "macro_f1", "agreement", "tv", "trainable_params", "train_seconds",
                    "queries_per_s", "wall_seconds", "this_run_seconds"):
            assert col in r, (name, col)
        assert {"mean", "std", "per_seed"} <= set(r["accuracy"])
        seeded = name not in ("zero", "knn", "finetuned", "knn_distill")  # kNN prompting: the anchors' context
        assert len(r["seeds"]) == (SEEDS if seeded else 1), name
        assert (r["accuracy"]["std"] is not None) == seeded, name
        assert 0.0 <= r["agreement"]["mean"] <= 1.0 and 0.0 <= r["tv"]["mean"] <= 1.0
    ref = rows["finetuned"]
    assert ref["agreement"] == {"mean": 1.0, "std": None, "per_seed": [1.0]}
    assert ref["tv"]["mean"] == 0.0
    assert ref["trainable_params"] > 0 and ref["trained_now"] == 1
    n_virtual, hidden = 3, 32
    assert rows["prompt_tuning"]["trainable_params"] == n_virtual * hidden == rows["ipt"]["trainable_params"]
    assert rows["prefix_tuning"]["saved_params"] == n_virtual * 2 * 2 * 2 * 8  # n * layers * (k, v) * kv heads * dim
    assert rows["prefix_tuning"]["trainable_params"] > rows["prefix_tuning"]["saved_params"]  # the MLP
    assert rows["zero"]["trainable_params"] == 0 and rows["zero"]["train_seconds"] is None
    assert rows["ipt"]["train_steps"] == [2, 2] and rows["ipt"]["trained_now"] == SEEDS
    assert rows["prompt_tuning_knn"]["trained_now"] == 0  # evaluates prompt_tuning's soft prompts
    assert (rows["ipt"]["k"], rows["ipt_random"]["eval_demos"], rows["zero"]["k"]) == (2, "random", 0)
    for m in ("prompt_tuning", "prefix_tuning", "ipt", "ipt_random", "ipt_distill", "prompt_tuning_distill"):
        for s in range(SEEDS):
            assert (out / "adapters" / f"{m}-seed{s}" / "adapter_model.safetensors").is_file()
    meta = json.loads((out / "adapters" / "ipt_distill-seed0" / "icl_soft_prompt.json").read_text())
    assert meta["distill"]["alpha"] == 1.0 and meta["k"] == 2
    for seed in range(SEEDS):  # kNN prompting's, built once per seed (its context draw) for all their rows
        assert (out / ("anchors" if seed == 0 else f"anchors-seed{seed}") / "anchors.safetensors").is_file()
    contexts = [json.loads((out / f / "manifest.json").read_text())["context"] for f in ("anchors", "anchors-seed1")]
    assert contexts[0] != contexts[1]
    for name, r in rows.items():  # paired-bootstrap intervals around each gap and agreement
        if name != "finetuned":
            lo, hi = r["gap_to_ref"]["ci95"]
            assert lo <= r["gap_to_ref"]["mean"] <= hi
            lo, hi = r["agreement_ci95"]
            assert lo <= 100 * r["agreement"]["mean"] + 1e-9 and 100 * r["agreement"]["mean"] - 1e-9 <= hi
    s = report["settings"]
    assert (s["seeds"], s["k"], s["test_n"], s["train_pool"]) == (SEEDS, 2, len(TEST), len(ROWS))
    assert report["machine"]["torch_threads"] == 1 and report["machine"]["cpu_count"] >= 1


def test_relabelled_rows_read_the_references_labels(workspace, report, tmp_path):
    """The reference labels every index record once (out/teacher/), and the *_distill rows read
    those labels. Tested on queries that are index records, with one voting anchor: each query's
    nearest anchor is itself, so kNN prompting answers the gold label and its relabelled twin
    the reference's own answer, on every query."""
    root, lm_dir, _ = workspace
    cache = (root / "report" / "teacher" / "logprobs.jsonl").read_text().splitlines()
    assert len(cache) == 1 + len(ROWS)  # the key, then one line per index record
    labels = ("negative", "positive")
    teacher = {json.loads(line)["id"]: labels[int(np.argmax(json.loads(line)["logp"]))] for line in cache[1:]}
    pool = Dataset("pool", TaskKind.CLASSIFICATION, make_records(ROWS), labels)
    assert [teacher[r.id] for r in pool.records] != [r.output for r in pool.records]  # the reference errs here
    again = compare(workspace, out=tmp_path / "out", methods=["knn_prompting", "knn_prompting_distill"],
                    anchor_k=1, test=pool)
    runs = {m: rs[0]["pred"] for m, rs in again["runs"].items()}
    assert runs["knn_prompting"] == [r.output for r in pool.records]
    assert runs["knn_prompting_distill"] == runs["finetuned"] == [teacher[r.id] for r in pool.records]
    assert (tmp_path / "out" / "anchors-distill" / "anchors.safetensors").is_file()
    # the linear readouts: one per anchors folder, fitted to the labels that folder's anchors carry
    for folder, source in (("anchors", "gold"), ("anchors-distill", "reference")):
        info = json.loads((root / "report" / folder / "readout.json").read_text())
        assert info["label_source"] == source and info["n"] == len(ROWS)


def test_per_example_runs_recompute_agreement_and_tv(report):
    rows = {r["method"]: r for r in report["rows"]}
    ref = report["runs"]["finetuned"][0]
    gold = report["test"]["gold"]
    for name, runs in report["runs"].items():
        assert len(runs) == len(rows[name]["seeds"])
        for run, agree, tv, acc in zip(runs, rows[name]["agreement"]["per_seed"], rows[name]["tv"]["per_seed"],
                                       rows[name]["accuracy"]["per_seed"]):
            assert len(run["pred"]) == len(run["probs"]) == len(TEST)
            np.testing.assert_allclose(np.sum(run["probs"], axis=1), 1.0, atol=1e-9)
            assert agree == agreement(run["pred"], ref["pred"])
            assert tv == pytest.approx(mean_total_variation(run["probs"], ref["probs"]))
            assert acc == pytest.approx(np.mean([p == g for p, g in zip(run["pred"], gold)]))
    # random demos differ between seeds; kNN demos do not depend on the seed
    assert report["runs"]["random"][0]["seed"] == 0 and report["runs"]["random"][1]["seed"] == 1


def test_checks_and_markdown(workspace, report):
    c = report["checks"]
    assert c["finding1"]["verdict"] in ("supported", "not supported")
    for key in ("ipt_knn_minus_pt", "ipt_random_minus_pt"):
        assert {"delta", "se", "verdict"} <= set(c["finding1"][key])
    assert c["finding2"]["verdict"] in ("supported", "not supported")
    rows = {r["method"]: r for r in report["rows"]}
    g = c["goal"]
    assert g["gap"] == pytest.approx(100 * (rows["finetuned"]["accuracy"]["mean"] - rows[g["method"]]["accuracy"]["mean"]))
    met = {m for m, x in g["all"].items() if x["gap"] <= 2 and x["agreement"] >= 0.9}
    assert g["verdict"] == ("met" if met else "not met") and (g["method"] in met if met else True)
    if not met:  # then the best is the one that agrees most
        assert g["agreement"] == max(x["agreement"] for x in g["all"].values())
    out = workspace[0] / "report"
    md = (out / REPORT_MD).read_text()
    for text in ("| method |", "IPT, random demos", "kNN + soft prompt", "Supported" if c["finding1"]["verdict"] ==
                 "supported" else "Not supported", "Goal", "torch thread", "defaults:"):
        assert text in md
    unsure = g["gap_ci95"][1] > 2 or g["agreement_ci95"][0] < 90  # a goal met on the mean, not by its intervals
    assert ("do not confirm" in md) == (g["verdict"] == "met" and unsure)
    png = (out / REPORT_PNG).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_a_second_run_reuses_everything(workspace, report):
    again = compare(workspace)
    rows = {r["method"]: r for r in again["rows"]}
    assert all(r.get("trained_now", 0) == 0 for r in rows.values())
    assert again["reference"]["trained_now"] is False
    assert all(run["reused"] for runs in again["runs"].values() for run in runs)
    assert again["runs"] == {m: [{**r, "reused": True} for r in rs] for m, rs in report["runs"].items()}


def test_an_interrupted_soft_prompt_resumes_from_its_checkpoint(workspace, report, tmp_path, monkeypatch):
    """A sitting stopped mid-training leaves adapters/.<name>.partial with the checkpoint of its last
    evaluation; the next run resumes there and ends with the soft prompt an uninterrupted run trains."""
    from safetensors.torch import load_file

    import icl_engine.train.loop as loop
    kw = dict(methods=["prompt_tuning", "finetuned"], seeds=1,
              soft_train=TrainSettings(max_steps=6, batch_size=2, eval_fraction=0.25, eval_every=2, patience=None))
    compare(workspace, out=tmp_path / "whole", **kw)
    step, calls = loop._step, []

    def stopped_at_step_5(*a, **k):
        calls.append(1)
        if len(calls) == 5:  # the checkpoint of the evaluation at step 4 is on disk
            raise KeyboardInterrupt
        return step(*a, **k)

    monkeypatch.setattr(loop, "_step", stopped_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        compare(workspace, out=tmp_path / "cut", **kw)
    monkeypatch.undo()
    adapters = tmp_path / "cut" / "adapters"
    assert (adapters / ".prompt_tuning-seed0.partial" / "checkpoint" / "state.json").is_file()
    assert not (adapters / "prompt_tuning-seed0").exists()
    compare(workspace, out=tmp_path / "cut", **kw)
    run = json.loads((adapters / "prompt_tuning-seed0" / RUN_FILE).read_text())
    assert run["metrics"]["resumed"] and run["metrics"]["steps"] == 6
    assert not (adapters / ".prompt_tuning-seed0.partial").exists()
    whole, cut = (load_file(str(p / "adapters" / "prompt_tuning-seed0" / "adapter_model.safetensors"))
                  for p in (tmp_path / "whole", tmp_path / "cut"))
    assert whole.keys() == cut.keys() and all(torch.equal(whole[n], cut[n]) for n in whole)


def test_adapters_trained_with_other_settings_are_refused(workspace, report):
    with pytest.raises(CompareError, match="other settings"):
        compare(workspace, steps=3)


@pytest.mark.parametrize("kw, match", [
    (dict(methods=["zero", "bogus"]), "unknown method 'bogus'"),
    (dict(seeds=0), "seeds must be >= 1"),
    (dict(k=0), "k must be >= 1"),
    (dict(test_limit=0), "test_limit"),
])
def test_user_mistakes_are_one_line_errors(workspace, kw, match):
    with pytest.raises(CompareError, match=match):
        compare(workspace, **kw)


def test_the_reference_is_trained_only_when_asked_for(workspace, tmp_path):
    """`--methods zero` alone once fine-tuned a reference for 13 minutes: now it needs one."""
    root, lm_dir, test = workspace
    with pytest.raises(CompareError, match="no fine-tuned reference in .*add 'finetuned'"):
        run_compare("tiny", test, out=tmp_path / "out", methods=["zero"], lm=str(lm_dir),
                    indexes_dir=root / "indexes")
    assert not (tmp_path / "out").exists()
    (tmp_path / "file").write_text("mine")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        run_compare("tiny", test, out=tmp_path / "file" / "out", lm=str(lm_dir), indexes_dir=root / "indexes")


def test_unknown_test_labels_and_missing_index(workspace):
    root, lm_dir, _ = workspace
    odd = Dataset("odd", TaskKind.CLASSIFICATION, make_records([("meh", "neutral")]), ("neutral",))
    with pytest.raises(CompareError, match="not among the index's labels"):
        run_compare("tiny", odd, out=root / "x", lm=str(lm_dir), indexes_dir=root / "indexes")
    with pytest.raises(CompareError, match="no index"):
        run_compare("nope", odd, out=root / "x", lm=str(lm_dir), indexes_dir=root / "indexes")


def test_generation_report(tmp_path):
    """Data-to-text: ROUGE-L / BLEU columns, agreement = identical outputs, no TV column."""
    tok = make_tiny_tokenizer()
    lm_dir = tmp_path / "lm"
    make_tiny_model(len(tok), initializer_range=0.2).save_pretrained(lm_dir)
    tok.save_pretrained(lm_dir)
    pairs = [(f"name[{n}], food[{f}]", f"{n} serves {f} food") for n in ("Aromi", "Blue", "Cotto")
             for f in ("coffee", "pub", "restaurant")]
    train = Dataset("gen", TaskKind.GENERATION, make_records(pairs[:7]), ())
    ExampleIndex.build(train, get_embedder("hashing:64")).save(tmp_path / "idx")
    test = Dataset("gen-test", TaskKind.GENERATION, make_records(pairs[7:] + [(pairs[8][0], "another ref")]), ())
    quick = TrainSettings(max_steps=1, batch_size=4, eval_fraction=0.0)
    report = run_compare(str(tmp_path / "idx"), test, out=tmp_path / "out",
                         methods=["zero", "prompt_tuning", "ipt", "ipt_distill", "finetuned"],
                         seeds=1, k=1, lm=str(lm_dir), train_pool=None, test_limit=None, n_virtual=2, threads=1,
                         progress=False, soft_train=quick, max_new_tokens=4,
                         finetune_config=FinetuneConfig(train=quick))
    rows = {r["method"]: r for r in report["rows"]}
    assert list(rows) == ["zero", "prompt_tuning", "ipt", "ipt_distill", "finetuned"]
    # generation is distilled from the reference's outputs (sequence level), one per distinct input
    distilled = json.loads((tmp_path / "out" / "adapters" / "ipt_distill-seed0" / "icl_soft_prompt.json").read_text())
    assert distilled["distill"]["targets"] == "reference outputs" and distilled["distill"]["gold_records"] == 7
    assert report["metric"] == "rouge_l" and report["settings"]["test_n"] == 2  # distinct inputs (3 records)
    assert rows["finetuned"]["agreement"]["mean"] == 1.0 and rows["finetuned"]["tv"] is None
    assert all(len(run["pred"]) == 2 and "probs" not in run for runs in report["runs"].values() for run in runs)
    assert {"bleu", "rouge_l"} <= set(rows["ipt"])
    # the generation goal is the ROUGE-L gap alone (the target): the smallest gap, agreement not required
    g = report["checks"]["goal"]
    assert g["gap"] == min(x["gap"] for x in g["all"].values()) and not g["needs_agreement"]
    assert g["verdict"] == ("met" if g["gap"] <= 2 else "not met")
    md = (tmp_path / "out" / REPORT_MD).read_text()
    assert (tmp_path / "out" / REPORT_PNG).is_file() and "within 2 ROUGE-L points" in md and "below 90%" not in md
    assert ("do not confirm" in md) == (g["verdict"] == "met" and g["gap_ci95"][1] > 2)
    with pytest.raises(CompareError, match="knn_prompting needs a classification index"):
        run_compare(str(tmp_path / "idx"), test, out=tmp_path / "out2", methods=["knn_prompting", "finetuned"],
                    reference=tmp_path / "out" / "reference", lm=str(lm_dir), train_pool=None, progress=False)
