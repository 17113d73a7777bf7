"""Tests for model.thresholds: coverage, p-values, POT, leaky threshold."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from model.thresholds import (
    conformal_threshold,
    fit_gpd,
    leaky_reference_threshold,
    p_values,
    pot_threshold,
    quantile_threshold,
)

CAL = [4.0, 2.0, 1.0, 3.0]


@pytest.mark.parametrize(("alpha", "expected"), [(0.5, 2.0), (0.25, 3.0), (0.2, 4.0), (0.01, 4.0)])
def test_quantile_threshold_by_hand(alpha: float, expected: float) -> None:
    # ceil(4 (1 - alpha))-th smallest: ceil(2) = 2, ceil(3) = 3, ceil(3.2) = 4, ceil(3.96) = 4.
    assert quantile_threshold(CAL, alpha) == expected


@pytest.mark.parametrize(
    ("alpha", "expected"), [(0.4, 3.0), (0.25, 4.0), (0.2, 4.0), (0.1, math.inf)]
)
def test_conformal_threshold_by_hand(alpha: float, expected: float) -> None:
    # ceil(5 (1 - alpha))-th smallest: ceil(3) = 3, ceil(3.75) = 4, ceil(4) = 4, ceil(4.5) = 5 > n.
    assert conformal_threshold(CAL, alpha) == expected


def test_thresholds_survive_float_error_in_the_rank() -> None:
    # 1 - 0.7 is 0.30000000000000004 in floats, so 10 (1 - 0.7) is just above the integer 3.
    assert quantile_threshold(np.arange(1.0, 11.0), 0.7) == 3.0
    assert conformal_threshold(np.arange(1.0, 10.0), 0.7) == 3.0


def test_p_values_by_hand() -> None:
    # #{cal >= s} for s = 0, 2, 2.5, 5 is 4, 3, 2, 0.
    assert p_values(CAL, [0.0, 2.0, 2.5, 5.0]).tolist() == pytest.approx([1.0, 0.8, 0.6, 0.2])


@pytest.mark.parametrize(("n", "alpha"), [(99, 0.1), (19, 0.05), (200, 0.005), (50, 0.03)])
def test_conformal_false_alarm_rate_is_at_most_alpha(n: int, alpha: float) -> None:
    rng = np.random.default_rng(n)
    draws, new_points = 4_000, 50
    calibration = rng.standard_normal((draws, n))
    fresh = rng.standard_normal((draws, new_points))
    rank = math.ceil((n + 1) * (1 - alpha) - 1e-9)
    thresholds = np.sort(calibration, axis=1)[:, rank - 1] if rank <= n else np.full(draws, np.inf)
    assert thresholds[0] == conformal_threshold(calibration[0], alpha)
    rate = np.mean(fresh > thresholds[:, None])
    assert alpha - 1 / (n + 1) - 0.005 <= rate <= alpha + 0.005


def test_quantile_threshold_alone_has_no_finite_sample_guarantee() -> None:
    rng = np.random.default_rng(1)
    calibration, fresh = rng.standard_normal((4_000, 10)), rng.standard_normal((4_000, 50))
    thresholds = np.array([quantile_threshold(row, 0.1) for row in calibration])
    # The 9th of 10 calibration scores: a new score exceeds it with probability 2 / 11 > 0.1.
    assert np.mean(fresh > thresholds[:, None]) == pytest.approx(2 / 11, abs=0.01)


def test_p_values_are_valid_and_roughly_uniform() -> None:
    rng = np.random.default_rng(2)
    n = 49
    pooled = np.concatenate([p_values(rng.random(n), rng.random(20)) for _ in range(2_000)])
    assert pooled.min() == pytest.approx(1 / (n + 1)) and pooled.max() == 1.0
    for u in (0.02, 0.1, 0.3, 0.5, 0.9):
        assert u - 1 / (n + 1) - 0.01 <= np.mean(pooled <= u) <= u + 0.01


@settings(max_examples=80, deadline=None)
@given(
    arrays(np.float64, st.integers(1, 40), elements=st.integers(0, 6).map(float)),
    arrays(np.float64, st.integers(1, 20), elements=st.integers(-1, 7).map(float)),
    st.floats(0.01, 0.99),
)
def test_p_values_flag_exactly_above_the_conformal_threshold(calibration, scores, alpha) -> None:
    p = p_values(calibration, scores)
    assert p.shape == scores.shape and np.all((p > 0) & (p <= 1))
    threshold = conformal_threshold(calibration, alpha)
    assert np.array_equal(p <= alpha, scores > threshold)
    assert np.mean(calibration > quantile_threshold(calibration, alpha)) <= alpha
    if math.isfinite(threshold):
        assert threshold >= quantile_threshold(calibration, alpha)
    assert conformal_threshold(calibration, min(alpha * 1.5, 0.999)) <= threshold


@pytest.mark.parametrize(("shape", "scale"), [(0.0, 1.0), (0.2, 2.0), (-0.3, 1.5)])
def test_fit_gpd_recovers_known_parameters(shape: float, scale: float) -> None:
    uniform = np.random.default_rng(4).random(50_000)
    excesses = -scale * np.log(uniform) if shape == 0 else scale / shape * (uniform ** (-shape) - 1)
    fitted_shape, fitted_scale = fit_gpd(excesses)
    assert fitted_shape == pytest.approx(shape, abs=0.03)
    assert fitted_scale == pytest.approx(scale, rel=0.03)


@pytest.mark.parametrize(
    ("sample", "q", "true_quantile"),
    [
        (lambda u: -np.log(u), 1e-4, -math.log(1e-4)),  # exponential: GPD tail with shape 0
        (lambda u: u**-0.5, 1e-4, 1e-4**-0.5),  # Pareto with tail index 2: GPD shape 0.5
    ],
)
def test_pot_threshold_extrapolates_the_tail(sample, q: float, true_quantile: float) -> None:
    scores = sample(np.random.default_rng(5).random(200_000))
    threshold = pot_threshold(scores, q, level=0.98)
    assert threshold == pytest.approx(true_quantile, rel=0.1)
    assert threshold > np.quantile(scores, 0.98)


def test_leaky_reference_threshold_pools_train_and_test() -> None:
    train, test = np.arange(10.0), np.arange(10.0, 20.0)
    threshold = leaky_reference_threshold(train, test, 5.0)
    assert threshold == pytest.approx(np.percentile(np.arange(20.0), 95))
    assert leaky_reference_threshold(train, test + 100, 5.0) > threshold  # test data moves it


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: quantile_threshold(CAL, 0.0), "alpha must be in \\(0, 1\\), got 0.0"),
        (lambda: conformal_threshold(CAL, 1.0), "alpha must be in \\(0, 1\\), got 1.0"),
        (lambda: conformal_threshold(CAL, math.nan), "alpha must be in \\(0, 1\\), got nan"),
        (lambda: quantile_threshold([], 0.1), "calibration_scores must not be empty"),
        (
            lambda: conformal_threshold([1.0, math.nan], 0.1),
            "calibration_scores must be finite, got nan at index 1",
        ),
        (lambda: p_values(CAL, [1.0, math.inf]), "scores must be finite, got inf at index 1"),
        (
            lambda: pot_threshold(np.arange(100.0), 0.001),
            "at least 10 values above the level 0.98 quantile, got 2",
        ),
        (lambda: pot_threshold(np.arange(1e3), 0.05), "q must be below the tail fraction 0.02"),
        (lambda: pot_threshold(np.arange(1e3), 1e-3, level=1.0), r"level must be in \(0, 1\)"),
        (lambda: fit_gpd([2.0, 2.0, 2.0]), "excesses must not all be equal, got 3 values of 2.0"),
        (lambda: fit_gpd([0.0, 1.0]), "must be at least 2 positive values, got 2 with min 0.0"),
        (
            lambda: leaky_reference_threshold(CAL, CAL, 100.0),
            "anomaly_ratio_percent must be in \\(0, 100\\), got 100.0",
        ),
    ],
)
def test_bad_input_raises(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
