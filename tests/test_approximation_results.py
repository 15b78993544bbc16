"""The stored approximation results (benchmarks/results/approximation/) agree with themselves:
the figures the notes and READMEs quote are read from these files."""

import json
from pathlib import Path

import pytest

RT = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "approximation" / "rt" / "validation.json"


@pytest.mark.skipif(not RT.is_file(), reason="no stored Rotten Tomatoes validation results")
def test_rt_validation_scores_are_counts_over_the_validation_split():
    d = json.loads(RT.read_text())
    n = d["validation"]["records"]
    assert d["candidates_on_validation"], "no candidate was scored"
    for row in d["candidates_on_validation"]:
        assert row["n"] == n, row  # every candidate on the same split
        correct = row["accuracy"] * n
        assert abs(correct - round(correct)) < 1e-9, row  # an accuracy is a count of n answers
    ref = d["reference"]
    kept = [e for e in ref["heldout_evals"] if e["step"] == ref["best_step"]]
    assert len(kept) == 1 and kept[0]["epoch"] == ref["kept_epoch"]
    assert ref["best_eval_loss"] == min(e["eval_loss"] for e in ref["heldout_evals"])  # kept: the best held-out loss


TEST = RT.with_name("test.json")


@pytest.mark.skipif(not TEST.is_file(), reason="no stored Rotten Tomatoes test results")
def test_rt_test_rows_are_counts_and_the_selection_is_the_validation_best():
    d = json.loads(TEST.read_text())
    n = d["n"]
    best = max(row["score"] for row in d["selection_table"])
    chosen = d["rows"]["selected"]["setting"]
    assert [r["score"] for r in d["selection_table"] if r["name"] == chosen] == [best]  # chosen on validation
    assert d["selected_on"] == "validation"
    for name, row in d["rows"].items():
        for acc in row["per_seed_accuracy"] + row["per_seed_agreement"]:
            assert abs(acc * n - round(acc * n)) < 1e-6, (name, acc)  # each a count of n answers
        assert row["accuracy"]["value"] == pytest.approx(sum(row["per_seed_accuracy"]) / len(row["seeds"]))
        lo, hi = row["accuracy"]["ci95"]
        assert lo <= row["accuracy"]["value"] <= hi, name
    assert d["rows"]["reference"]["agreement"]["value"] == 1.0
    sel = d["rows"]["selected"]
    assert d["targets"]["agreement_at_least_90"] == (sel["agreement"]["value"] >= 0.90)
    assert d["targets"]["within_2_points"] == (abs(sel["gap_to_reference"]["value"]) <= 0.02)
    assert d["mixture_check"]["same_labels_seed0"]
