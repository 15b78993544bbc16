"""bounds.py: the bound functions against hand-computed values and their inverses, and the
statistics (slope fit, verdict, flatness) against synthetic power laws with known exponents."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from icl_engine.core.metrics import bootstrap_mean
from icl_engine.studies import bounds as B

# ----------------------------------------------------------------------------- the bounds


def test_bounds_match_hand_computed_values():
    # m V / eps^2 log(m/delta) = 4*16/0.01 * ln(80)
    assert B.n_text_generation(0.1, 0.05, m=4, V=16) == pytest.approx(6400 * math.log(80))
    # l ln V / eps^2 ln(1/delta) = 8 ln 16 / 0.01 * ln 20
    assert B.n_text_generation_bounded(0.1, 0.05, l=8, V=16) == pytest.approx(800 * math.log(16) * math.log(20))
    assert B.n_linear(0.1, d=4) == pytest.approx(40.0)
    assert B.n_linear_bounded(0.1, 0.05) == pytest.approx(100 * math.log(20))
    # the constant multiplies N (and so eps^2 or eps scales with it in the inverse)
    assert B.n_linear(0.1, d=4, c=3.0) == pytest.approx(120.0)
    assert B.n_text_generation(0.2, 0.1, m=1, V=2, c=2.0) == pytest.approx(2 * 2 / 0.04 * math.log(10))
    assert B.eps_linear(40, d=4) == pytest.approx(0.1)
    assert B.eps_linear_bounded(100 * math.log(20), 0.05) == pytest.approx(0.1)


@settings(max_examples=60, deadline=None)
@given(
    eps=st.floats(1e-3, 1.0), delta=st.floats(1e-4, 0.5), m=st.integers(1, 1000), V=st.integers(2, 100_000),
    l=st.integers(1, 512), d=st.integers(1, 1000), c=st.floats(0.01, 100.0),
)
def test_inverse_of_required_n_gives_back_eps(eps, delta, m, V, l, d, c):
    pairs = [
        (B.n_text_generation(eps, delta, m=m, V=V, c=c), lambda n: B.eps_text_generation(n, delta, m=m, V=V, c=c)),
        (B.n_text_generation_bounded(eps, delta, l=l, V=V, c=c),
         lambda n: B.eps_text_generation_bounded(n, delta, l=l, V=V, c=c)),
        (B.n_linear(eps, d=d, c=c), lambda n: B.eps_linear(n, d=d, c=c)),
        (B.n_linear_bounded(eps, delta, c=c), lambda n: B.eps_linear_bounded(n, delta, c=c)),
    ]
    for n, inverse in pairs:
        assert inverse(n) == pytest.approx(eps, rel=1e-9)


def test_bounds_are_vectorised_and_monotone():
    eps = np.array([0.4, 0.2, 0.1])
    n = B.n_text_generation(eps, 0.05, m=2, V=8)
    assert isinstance(n, np.ndarray) and n.shape == (3,)
    assert np.all(np.diff(n) > 0)  # smaller error needs more data
    assert isinstance(B.n_linear(0.1, d=2), float)
    # the shapes: halving eps doubles N for the linear bound, quadruples it for the eps^2 ones
    assert B.n_linear(0.05, d=3) / B.n_linear(0.1, d=3) == pytest.approx(2)
    assert B.n_linear_bounded(0.05, 0.1) / B.n_linear_bounded(0.1, 0.1) == pytest.approx(4)


@pytest.mark.parametrize("call", [
    lambda: B.n_linear(0.0, d=2),
    lambda: B.n_linear(-0.1, d=2),
    lambda: B.n_linear(0.1, d=0),
    lambda: B.n_linear_bounded(0.1, 1.0),
    lambda: B.n_linear_bounded(0.1, 0.0),
    lambda: B.n_text_generation(0.1, 0.05, m=2, V=1),
    lambda: B.n_text_generation(0.1, 0.05, m=0, V=4),
    lambda: B.eps_linear(0, d=2),
    lambda: B.n_text_generation_bounded(0.1, 0.05, l=2, V=4, c=0),
])
def test_bad_arguments_are_one_line_errors(call):
    with pytest.raises(B.BoundsError) as e:
        call()
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)


def test_theory_table_rows_and_format():
    rows = B.theory_table(0.1, 0.05, V=16, m=4, l=8, d=4, c=1.0)
    assert [r["bound"] for r in rows] == [b.value for b in B.Bound]
    by = {r["bound"]: r for r in rows}
    assert by["linear"]["required_n"] == pytest.approx(40.0)
    assert by["linear"]["predicted_slope"] == -1.0
    assert by["text_generation"]["required_n_ceil"] == math.ceil(6400 * math.log(80))
    assert all(r["predicted_slope"] == B.PREDICTED_SLOPE[B.Bound(r["bound"])] for r in rows)
    text = B.format_theory_table(rows)
    assert "| linear |" in text and "c=1" in text and "28,045" in text
    assert B.format_theory_table([]) == ""


# ----------------------------------------------------------------------------- slope fits


def _power_law(slope, *, draws=12, n=(8, 16, 32, 64, 128, 256, 512), noise=0.25, seed=0, c=2.0):
    rng = np.random.default_rng(seed)
    n = np.array(n, dtype=float)
    return n, c * n**slope * np.exp(rng.normal(0, noise, size=(draws, n.size)))


@pytest.mark.parametrize("true", [-1.0, -0.5, -0.25, 0.0])
def test_fit_slope_recovers_known_exponent_within_its_interval(true):
    n, curves = _power_law(true, seed=int(-true * 100))
    fit = B.fit_slope(n, curves, n_boot=800, seed=1)
    assert fit.ci_low <= true <= fit.ci_high
    assert abs(fit.slope - true) < 0.08
    assert fit.ci_high - fit.ci_low < 0.3
    assert B.verdict(fit, true) is B.Verdict.CONSISTENT
    assert B.verdict(fit, true - 0.5) is B.Verdict.NOT_CONSISTENT
    assert fit.n_points == 7 and fit.n_draws == 12
    # the fitted line reproduces the constant (means of lognormal noise: E exp(z) ~ 1.03)
    assert fit.predict(1.0) == pytest.approx(2.0, rel=0.3)


def test_fit_slope_interval_coverage_is_near_nominal():
    """Over repeated synthetic experiments the 95% interval covers the truth most of the time."""
    hits = 0
    for s in range(40):
        n, curves = _power_law(-0.5, draws=10, noise=0.4, seed=100 + s)
        fit = B.fit_slope(n, curves, n_boot=400, seed=s)
        hits += fit.ci_low <= -0.5 <= fit.ci_high
    assert hits >= 32  # 80%: percentile bootstrap with 10 draws is a little narrow, never wildly off


def test_fit_slope_regime_zeros_and_missing_points():
    n = np.array([1, 2, 4, 8, 16, 32, 64], dtype=float)
    curves = np.tile(5.0 / n, (6, 1))
    curves[:, 0] = 3.0  # a flat head outside the regime must not bias the fit
    curves[:, -1] = 0.0  # an exact zero cannot be logged: left out of the fit
    curves[2, 3] = np.nan  # a missing measurement in one draw
    fit = B.fit_slope(n, curves, n_min=2, n_boot=200)
    assert fit.slope == pytest.approx(-1.0)
    assert (fit.n_min, fit.n_max, fit.n_points) == (2.0, 32.0, 5)
    assert fit.ci_low == pytest.approx(-1.0) and fit.ci_high == pytest.approx(-1.0)


def test_fit_slope_inconclusive_without_draws_or_points():
    n = np.array([10.0, 100.0, 1000.0])
    one = B.fit_slope(n, [1 / n], n_boot=100)  # a single draw: nothing to resample
    assert one.slope == pytest.approx(-1.0) and math.isnan(one.ci_low)
    assert B.verdict(one, -1.0) is B.Verdict.INCONCLUSIVE
    flat_zero = B.fit_slope(n, np.zeros((5, 3)), n_boot=100)
    assert math.isnan(flat_zero.slope) and B.verdict(flat_zero, -1.0) is B.Verdict.INCONCLUSIVE
    assert flat_zero.to_json()["slope"] is None  # JSON-safe
    with pytest.raises(B.BoundsError):
        B.fit_slope(n, np.ones((3, 4)))


def test_bootstrap_mean_interval_contains_the_mean():
    rng = np.random.default_rng(0)
    v = rng.normal(1.0, 0.1, size=(30, 4))
    mean, lo, hi = bootstrap_mean(v, n_boot=500)
    assert np.all(lo <= mean) and np.all(mean <= hi)
    assert np.allclose(mean, v.mean(0))
    assert np.all(hi - lo < 0.15)
    m1, lo1, hi1 = bootstrap_mean(v[:1])
    assert np.all(np.isnan(lo1)) and np.allclose(m1, v[0])


# ----------------------------------------------------------------------------- flatness


def test_scaling_check_flat_when_error_scales_as_predicted():
    rng = np.random.default_rng(3)
    n = np.array([16, 32, 64, 128], dtype=float)
    dims = [2, 4, 8]
    curves = [0.5 * d / n * np.exp(rng.normal(0, 0.2, size=(10, n.size))) for d in dims]
    s = B.scaling_check(dims, curves, n, n_exponent=-1.0, param_exponent=1.0, n_boot=500)
    assert s.verdict is B.Verdict.CONSISTENT
    assert s.slope_ci[0] <= 0 <= s.slope_ci[1]
    assert s.measured_exponent == pytest.approx(1.0, abs=0.15)
    assert s.ratio < 1.3 and np.allclose(s.normalised, 0.5, rtol=0.2)
    json = s.to_json()
    assert json["verdict"] == "consistent" and isinstance(json["ratio_ci"], list)


def test_scaling_check_detects_wrong_exponent():
    rng = np.random.default_rng(4)
    n = np.array([64, 128, 256, 512], dtype=float)
    V = [4, 16, 64]
    # TV ∝ V'/sqrt(N) (exponent 1), while the m·V bound predicts sqrt(V'/N) (exponent 1/2)
    curves = [0.01 * v / np.sqrt(n) * np.exp(rng.normal(0, 0.1, size=(10, n.size))) for v in V]
    s = B.scaling_check(V, curves, n, n_exponent=-0.5, param_exponent=0.5, n_boot=500)
    assert s.verdict is B.Verdict.NOT_CONSISTENT
    assert s.measured_exponent == pytest.approx(1.0, abs=0.1)
    assert s.ratio > 3
    with pytest.raises(B.BoundsError):
        B.scaling_check([2], [np.ones((3, 4))], n, n_exponent=-1, param_exponent=1)
