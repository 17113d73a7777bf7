"""Tests for model.drift: KS and binomial tests against scipy, corrections, profile, drift flags."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from model.drift import (
    DriftReport,
    TrainingProfile,
    adjust_p_values,
    detect_drift,
    exceedance_test,
    kolmogorov_sf,
    ks_2samp,
)


def test_kolmogorov_sf_by_hand_and_against_scipy() -> None:
    # Classical critical values: P(K > 1.3581) = 0.05, P(K > 1.6276) = 0.01.
    assert kolmogorov_sf([0.0, 1.3581, 1.6276]) == pytest.approx([1.0, 0.05, 0.01], abs=2e-5)
    grid = np.concatenate((np.linspace(0.0, 4.0, 401), [1e-4, 0.05, 10.0, np.inf]))
    np.testing.assert_allclose(kolmogorov_sf(grid), stats.kstwobign.sf(grid), atol=1e-14)


def test_ks_2samp_by_hand() -> None:
    # F_first - F_second at 1, 2, 3, 4 is 1/2, 0, 1/2, 0: D = 1/2, n m / (n + m) = 1.
    statistic, p_value = ks_2samp([1.0, 3.0], [2.0, 4.0])
    assert statistic == 0.5
    assert p_value == pytest.approx(float(stats.kstwobign.sf(0.5)))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(5, 3000),
    m=st.integers(5, 3000),
    shift=st.floats(0.0, 1.0),
    decimals=st.sampled_from([0, 1, 6]),
    seed=st.integers(0, 2**16),
)
def test_ks_2samp_matches_scipy(n: int, m: int, shift: float, decimals: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    first = np.round(rng.standard_normal(n) * 2, decimals)  # rounding makes ties
    second = np.round(rng.standard_normal(m) * 2 + shift, decimals)
    statistic, p_value = ks_2samp(first, second)
    reference = stats.ks_2samp(first, second, method="asymp")
    assert statistic == pytest.approx(reference.statistic, abs=1e-12)
    effective = n * m / (n + m)
    assert p_value == pytest.approx(stats.kstwobign.sf(math.sqrt(effective) * statistic), abs=1e-12)
    # scipy's "asymp" uses the one-sample exact law at round(n m / (n + m)); the Kolmogorov limit
    # differs from it by O(1 / sqrt(n m / (n + m))).
    assert p_value == pytest.approx(reference.pvalue, abs=0.6 / math.sqrt(effective))


def test_adjust_p_values_by_hand() -> None:
    p = [0.01, 0.04, 0.03, 0.5]
    # BH: sorted 0.01, 0.03, 0.04, 0.5 times 4 / rank = 0.04, 0.06, 0.0533, 0.5; running min
    # from the top gives 0.04, 0.0533, 0.0533, 0.5.
    assert adjust_p_values(p, "bh") == pytest.approx([0.04, 0.16 / 3, 0.16 / 3, 0.5])
    assert adjust_p_values(p, "bonferroni") == pytest.approx([0.04, 0.16, 0.12, 1.0])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=60))
def test_benjamini_hochberg_matches_scipy(p: list[float]) -> None:
    np.testing.assert_allclose(
        adjust_p_values(p, "bh"), stats.false_discovery_control(p), rtol=1e-12, atol=1e-15
    )


@pytest.mark.parametrize(
    ("exceedances", "n", "alpha"),
    [(0, 10, 0.1), (3, 3, 0.5), (5, 1000, 0.005), (130, 23_000, 0.005), (40, 2_000, 0.01)],
)
def test_exceedance_test_matches_scipy_binomtest(exceedances: int, n: int, alpha: float) -> None:
    scores = np.r_[np.ones(exceedances), np.zeros(n - exceedances)]
    result = exceedance_test(scores, 0.5, alpha)
    expected = stats.binomtest(exceedances, n, alpha, alternative="greater").pvalue
    assert result.p_value == pytest.approx(expected, rel=1e-9)
    assert (result.n, result.exceedances, result.rate) == (n, exceedances, exceedances / n)


def test_exceedance_test_flags_too_many_alarms_only() -> None:
    # P(Bin(3, 1/2) >= 3) = 1/8 by hand.
    assert exceedance_test([1.0, 1.0, 1.0], 0.0, 0.5).p_value == pytest.approx(0.125)
    rng = np.random.default_rng(0)
    calm, busy = rng.random(20_000), rng.random(20_000) + 0.01
    assert not exceedance_test(calm, 0.99, 0.01).flagged  # about 1 % above 0.99
    assert exceedance_test(busy, 0.99, 0.01).flagged  # about 2 %
    assert not exceedance_test(busy, 0.99, 0.01, min_rate_ratio=3.0).flagged


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 5000),
    size=st.integers(1, 400),
    decimals=st.sampled_from([0, 2, 8]),
    seed=st.integers(0, 2**16),
)
def test_profile_sketch_keeps_ks_within_half_a_step(
    n: int, size: int, decimals: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    train = np.round(rng.standard_normal((n, 2)), decimals)
    batch = np.round(rng.standard_normal(300) + 0.3, decimals)
    profile = TrainingProfile.fit(train, size=size)
    assert len(profile.sketch[0]) == min(n, size)
    full, _ = ks_2samp(train[:, 0], batch)
    sketched, _ = ks_2samp(profile.sketch[0], batch)
    assert abs(sketched - full) <= 1 / (2 * size) + 1e-12
    if n <= size:
        assert sketched == full


def test_profile_round_trips_through_json() -> None:
    profile = TrainingProfile.fit(np.random.default_rng(1).standard_normal((5000, 3)), size=64)
    restored = TrainingProfile.from_dict(json.loads(json.dumps(profile.to_dict())))
    assert restored == profile
    assert (restored.n_rows, restored.n_sensors) == (5000, 3)


def _train_and_fresh(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    scales = np.linspace(0.5, 3.0, 38)
    return rng.standard_normal((20_000, 38)) * scales, rng.standard_normal((2_000, 38)) * scales


def test_ks_p_values_against_a_profile_are_uniform_without_drift() -> None:
    p_values = []
    for seed in range(20):
        train, fresh = _train_and_fresh(100 + seed)
        p_values += detect_drift(TrainingProfile.fit(train), fresh).p_values
    p = np.array(p_values)  # 760 p-values; about 5 % and 20 % fall below 0.05 and 0.2
    assert 0.025 < np.mean(p < 0.05) < 0.08 and 0.16 < np.mean(p < 0.2) < 0.24


@pytest.mark.parametrize("correction", ["bh", "bonferroni"])
def test_drift_flags_a_shifted_sensor_and_not_an_identical_distribution(correction: str) -> None:
    train, fresh = _train_and_fresh(0)
    profile = TrainingProfile.fit(train)
    calm = detect_drift(profile, fresh, correction=correction)
    assert not calm.flag and not any(calm.sensors_flagged)
    assert detect_drift(profile, train, correction=correction).statistics == pytest.approx(
        [0.0] * 38, abs=1 / 2000 + 1e-12
    )
    shifted = fresh.copy()
    shifted[:, 7] += 0.3 * np.linspace(0.5, 3.0, 38)[7]
    report = detect_drift(profile, shifted, correction=correction)
    assert report.flag
    assert np.flatnonzero(report.sensors_flagged).tolist() == [7]
    assert report.p_adjusted[7] <= 0.01 < min(np.delete(report.p_adjusted, 7))


def test_drift_min_statistic_and_score_test() -> None:
    train, fresh = _train_and_fresh(3)
    profile = TrainingProfile.fit(train)
    slightly = fresh + 0.15 * np.linspace(0.5, 3.0, 38)  # significant, yet a KS distance < 0.1
    assert detect_drift(profile, slightly).flag
    assert not detect_drift(profile, slightly, min_statistic=0.1).flag
    alarms = exceedance_test(np.r_[np.ones(30), np.zeros(970)], 0.5, 0.005)
    report = detect_drift(profile, fresh, score_test=alarms)
    assert report.flag and not any(report.sensors_flagged)
    encoded = json.loads(json.dumps(report.to_dict()))
    assert encoded["score_test"]["exceedances"] == 30 and encoded["correction"] == "bh"
    assert isinstance(report, DriftReport)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: ks_2samp([], [1.0]), "first must not be empty"),
        (lambda: ks_2samp([1.0], [np.nan]), "second must be finite"),
        (lambda: kolmogorov_sf([np.nan]), "x must not be NaN"),
        (lambda: adjust_p_values([0.2, 1.5]), "p must be in \\[0, 1\\]"),
        (lambda: adjust_p_values([0.2], "holm"), "method must be 'bh' or 'bonferroni', got 'holm'"),
        (lambda: exceedance_test([1.0], 0.5, 0.0), "alpha must be in \\(0, 1\\), got 0.0"),
        (lambda: exceedance_test([1.0], math.nan, 0.1), "threshold must not be NaN"),
        (lambda: exceedance_test([1.0], 0.5, 0.1, significance=1.0), "significance must be in"),
        (lambda: TrainingProfile.fit(np.zeros(4)), "train must be a finite non-empty \\(T, C\\)"),
        (lambda: TrainingProfile.fit(np.zeros((4, 1)), size=0), "size must be an int >= 1, got 0"),
        (lambda: TrainingProfile.from_dict({"n_rows": 3, "sketch": [[1.0], []]}), "equal-size"),
        (
            lambda: detect_drift(TrainingProfile.fit(np.zeros((4, 2))), np.zeros((4, 3))),
            "batch must be \\(T >= 1, 2\\), got \\(4, 3\\)",
        ),
        (
            lambda: detect_drift(TrainingProfile.fit(np.zeros((4, 1))), [[np.inf]]),
            "batch must be finite",
        ),
    ],
)
def test_bad_input_raises(call: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
