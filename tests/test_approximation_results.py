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
