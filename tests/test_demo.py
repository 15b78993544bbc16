"""`icl demo` (queries.run_demo) on a small built-in pool with the tiny LM: its four rows, the
mixture row equal to what the engine computes for the same anchor weight, and a second run that
reuses the index and the anchors and answers the same."""

import pytest

from icl_engine.apps import queries
from icl_engine.apps.cli_format import format_demo
from icl_engine.core.data import load_dataset
from icl_engine.core.evaluate import evaluate

pytestmark = pytest.mark.slow  # the demo builds its index with the real packaged embedder


def test_demo_rows_mixture_and_reuse(tmp_path, tiny_lm_dir, monkeypatch):
    indexes = tmp_path / "indexes"
    first = queries.run_demo(n=6, k=2, pool=30, lm=str(tiny_lm_dir), indexes_dir=indexes)
    assert first["index"]["built"] and first["anchors"]["built"]
    assert first["index"]["count"] == 30 and first["index"]["data"] == "rotten_tomatoes:train[30@0]"
    assert [r["answered_by"] for r in first["rows"]] == ["zero", "knn-2", "readout", "knn-2 + readout weight=0.5"]
    assert [r["k"] for r in first["rows"]] == [0, 2, 0, 2] and all(r["n"] == 6 for r in first["rows"])
    assert first["anchors"]["labelled_records"] == 30 and first["anchors"]["trained_parameters"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["indexes"]  # nothing written elsewhere

    # the mixture row is the engine's own anchor_weight=0.5 answer, without a second LM pass
    reader = queries.load("rotten_tomatoes-30", lm=str(tiny_lm_dir), indexes_dir=str(indexes), fit=False,
                          anchors=first["anchors"]["path"])
    test = load_dataset("rotten_tomatoes:test")
    engine_mix = evaluate(reader, test, method="knn", k=2, anchor_weight=0.5, anchor_readout="linear", limit=6,
                          progress=False)
    for ours, theirs in zip(first["rows"][3]["predictions"], engine_mix["predictions"], strict=True):
        assert ours["label"] == theirs["label"]
        # the same float32 label scores and float64 readout probabilities, mixed in float64
        assert ours["probs"] == pytest.approx(theirs["probs"], abs=1e-9)

    again = queries.run_demo(n=6, k=2, pool=30, lm=str(tiny_lm_dir), indexes_dir=indexes)
    assert not again["index"]["built"] and not again["anchors"]["built"]
    assert [r["predictions"] for r in again["rows"]] == [r["predictions"] for r in first["rows"]]
    text = format_demo(again)
    assert "reusing" in text and "knn-2 + readout weight=0.5" in text and "example:" in text

    # the readout's pass is labelled as what answers it, in progress lines as in the table
    from icl_engine.core import evaluate as ev

    names = []

    class Recording(ev.Progress):
        def __init__(self, total, desc, **kw):
            names.append(desc)
            super().__init__(total, desc, **kw)

    monkeypatch.setattr(ev, "Progress", Recording)
    alone = ev.evaluate(reader, test, anchor_weight=1.0, anchor_readout="linear", limit=6, progress=False)
    assert names == ["eval readout"] and alone["answered_by"] == "readout"
