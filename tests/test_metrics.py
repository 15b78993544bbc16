import numpy as np
import pytest

from icl_engine.core.metrics import accuracy, bleu, confusion_matrix, macro_f1, rouge_l, rouge_l_pair


def test_classification_metrics_by_hand():
    gold, pred = ["a", "a", "b", "c"], ["a", "b", "b", "b"]
    assert accuracy(gold, pred) == 0.5
    cm = confusion_matrix(gold, pred, ["a", "b", "c"])
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [0, 1, 0]]
    # F1: a = 2*1*.5/1.5 = 2/3, b = 2*(1/3)*1/(4/3) = 1/2, c = 0
    assert macro_f1(gold, pred, ["a", "b", "c"]) == pytest.approx((2 / 3 + 0.5 + 0) / 3)
    with pytest.raises(ValueError):
        accuracy([], [])


def test_rouge_l_by_hand_and_multi_reference():
    # LCS("the cat sat", "the cat sat on the mat") = 3: P = 1, R = 0.5, F = 2/3
    assert rouge_l_pair("the cat sat", "the cat sat on the mat") == pytest.approx(2 / 3)
    assert rouge_l(["the cat sat"], [["a dog", "the cat sat"]]) == pytest.approx(100.0)


def test_bleu_variable_references():
    assert bleu(["the cat sat on the mat"], [["the cat sat on the mat"]]) == pytest.approx(100.0)
    low = bleu(["a b c d e"], [["v w x y z"]])
    two = bleu(["the cat sat on the mat today", "x"], [["the cat sat on the mat today"], ["y", "x"]])
    assert low < 1 and np.isfinite(two)
