"""core/logreg.py: the fit is the objective's minimum (gradient at float64 rounding level, checked
by an independent autograd gradient), it is scikit-learn's LogisticRegression under the
documented mapping of C to l2, both for the multinomial and the binary form, and the readout and
the studies' baseline both go through it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from icl_engine.core import logreg
from icl_engine.core.logreg import L2_BIAS, fit_logreg, objective, predict_proba, rounding_tolerance


def _problem(n_classes: int, n: int = 300, d: int = 6, seed: int = 0):
    """Overlapping classes (a noisy linear rule): the optimum is interior even at tiny l2."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)) * rng.uniform(0.5, 3.0, size=d)  # [n, d], uneven scales
    z = X @ rng.normal(size=(d, n_classes)) + rng.gumbel(size=(n, n_classes)) * 2.0
    return X, z.argmax(1)


def _autograd_gradient(X, y, W, b, l2):
    """The objective's gradient by torch autograd: independent of logreg.gradient's formula."""
    Wt = torch.tensor(W, requires_grad=True)
    bt = torch.tensor(b, requires_grad=True)
    loss = (torch.nn.functional.cross_entropy(torch.from_numpy(X) @ Wt + bt, torch.from_numpy(y))
            + 0.5 * l2 * (Wt * Wt).sum() + 0.5 * L2_BIAS * (bt * bt).sum())
    loss.backward()
    return Wt.grad.numpy(), bt.grad.numpy()


@pytest.mark.parametrize("n_classes,l2", [(2, 1e-3), (3, 1e-2), (4, 1e-4), (2, 2e-6)])
def test_the_gradient_vanishes_at_the_solution(n_classes, l2):
    X, y = _problem(n_classes)
    W, b = fit_logreg(X, y, n_classes, l2=l2)
    gW, gb = _autograd_gradient(X, y, W, b, l2)
    # The solver stops at rounding_tolerance by its own gradient; the autograd gradient rounds
    # differently, so allow the same bound again for it.
    assert max(np.abs(gW).max(), np.abs(gb).max()) <= 2 * rounding_tolerance(X, W)
    # and it is a minimum, not merely a stationary point: any small move costs
    f = objective(X, y, W, b, l2)
    rng = np.random.default_rng(1)
    for _ in range(5):
        assert objective(X, y, W + 1e-4 * rng.normal(size=W.shape), b, l2) > f


@pytest.mark.parametrize("n_classes", [3, 4])
def test_multinomial_matches_sklearn(n_classes):
    X, y = _problem(n_classes)
    l2 = 1e-2
    W, b = fit_logreg(X, y, n_classes, l2=l2)
    # sklearn: sum of losses + ||W||^2 / (2C) = n * (mean loss + l2/2 ||W||^2) at C = 1 / (l2 n)
    sk = LogisticRegression(C=1 / (l2 * len(X)), tol=1e-12, max_iter=10_000).fit(X, y)
    assert np.abs(predict_proba(X, W, b) - sk.predict_proba(X)).max() < 1e-6
    assert np.abs(W - sk.coef_.T).max() < 1e-5  # the same columns, not just the same probabilities


def test_binary_matches_sklearn_at_twice_the_penalty():
    """The documented mapping: sklearn's binary fit (one vector w, penalty l2'/2 ||w||^2) is
    ours at l2 = 2 l2', with w = W[:, 1] - W[:, 0]."""
    X, y = _problem(2)
    l2_binary = 1e-3
    W, b = fit_logreg(X, y, 2, l2=2 * l2_binary)
    sk = LogisticRegression(C=1 / (l2_binary * len(X)), tol=1e-12, max_iter=10_000).fit(X, y)
    assert np.abs(predict_proba(X, W, b)[:, 1] - sk.predict_proba(X)[:, 1]).max() < 1e-6
    assert np.abs((W[:, 1] - W[:, 0]) - sk.coef_[0]).max() < 1e-5


def test_deterministic_and_finite_on_a_pool_missing_a_class():
    X, y = _problem(3)
    assert all(np.array_equal(a, c) for a, c in zip(fit_logreg(X, y, 3, l2=1e-2), fit_logreg(X, y, 3, l2=1e-2)))
    W, b = fit_logreg(X, np.where(y == 2, 0, y), 3, l2=1e-2)  # class 2 never seen
    assert np.isfinite(W).all() and np.isfinite(b).all()
    assert predict_proba(X, W, b)[:, 2].max() < 1e-3


def test_the_readout_and_the_baseline_fit_through_logreg(monkeypatch):
    from icl_engine.core import readout
    from icl_engine.studies.experiments import baselines

    calls = []
    real = logreg.fit_logreg

    def counting(*args, **kwargs):
        calls.append(kwargs["l2"])
        return real(*args, **kwargs)

    monkeypatch.setattr(readout, "fit_logreg", counting)
    monkeypatch.setattr(baselines.logreg, "fit_logreg", counting)
    X, y = _problem(2)
    baselines.fit_logreg(X, y, 2, l2=1e-3)
    assert calls == [1e-3]
    from test_readout import synthetic_anchors
    readout.fit_readout(synthetic_anchors(n=60, s=5))
    assert calls[1:] == sorted(readout.DEFAULT_L2_GRID, reverse=True) + [calls[-1]]
