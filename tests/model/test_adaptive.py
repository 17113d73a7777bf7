"""Tests for model.adaptive: ACI by hand, its guarantee, batch splits and drifting series."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.adaptive import AciState, aci_scores
from model.thresholds import conformal_threshold

CAL = [4.0, 2.0, 1.0, 3.0]


def test_aci_by_hand() -> None:
    # n = 4, alpha = 0.2, gamma = 0.1. alpha_1 = 0.2: k = ceil(5 * 0.8) = 4, threshold 4; the
    # alarm at t=1 gives alpha_2 = 0.2 + 0.1 (0.2 - 1) = 0.12, k = ceil(4.4) = 5 > n: +inf; then
    # alpha_t climbs by 0.02 per quiet point: 0.14, 0.16, 0.18 (k = 5), 0.2 (k = 4 again).
    result = aci_scores(AciState(0.2, gamma=0.1), CAL, [5.0, 5.0, 0.0, 0.0, 0.0, 5.0])
    assert result.thresholds.tolist() == [4.0, math.inf, math.inf, math.inf, math.inf, 4.0]
    assert result.is_anomaly.tolist() == [True, False, False, False, False, True]
    assert result.state.alpha_t == pytest.approx(0.12)
    assert (result.state.n_scored, result.state.n_alarms) == (6, 2)
    assert result.state.alarm_rate == pytest.approx(1 / 3)


def test_alpha_t_above_one_alarms_on_every_point() -> None:
    result = aci_scores(AciState(0.2, gamma=0.1, alpha_t=1.05), CAL, [-100.0, 0.5])
    assert result.thresholds.tolist() == [-math.inf, 1.0]  # alpha_2 = 0.97: k = ceil(0.15) = 1
    assert result.is_anomaly.tolist() == [True, False]


def test_rank_survives_float_error_like_the_static_threshold() -> None:
    # 10 (1 - 0.7) is 3.0000000000000004 in floats; the rank must still be 3.
    result = aci_scores(AciState(0.7), np.arange(1.0, 10.0), [0.0])
    assert result.thresholds[0] == conformal_threshold(np.arange(1.0, 10.0), 0.7) == 3.0


@settings(max_examples=40, deadline=None)
@given(alpha=st.floats(0.01, 0.5), n=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_first_threshold_is_the_static_conformal_threshold(alpha: float, n: int, seed: int) -> None:
    calibration = np.random.default_rng(seed).standard_normal(n)
    result = aci_scores(AciState(alpha), calibration, [0.0])
    assert result.thresholds[0] == conformal_threshold(calibration, alpha)


@settings(max_examples=60, deadline=None)
@given(
    alpha=st.floats(0.005, 0.3),
    gamma=st.floats(0.001, 0.2),
    scores=st.lists(st.floats(-5, 5), min_size=1, max_size=400),
    cut=st.integers(0, 400),
    seed=st.integers(0, 2**16),
)
def test_guarantee_flags_and_batch_splits_for_any_sequence(
    alpha: float, gamma: float, scores: list[float], cut: int, seed: int
) -> None:
    calibration = np.random.default_rng(seed).standard_normal(50)
    state = AciState(alpha, gamma)
    whole = aci_scores(state, calibration, scores)
    # Gibbs & Candes, Proposition 4.1: holds for every sequence, here chosen by hypothesis.
    bound = (max(alpha, 1 - alpha) + gamma) / (gamma * len(scores))
    assert abs(whole.state.alarm_rate - alpha) <= bound + 1e-12
    assert np.array_equal(whole.is_anomaly, np.asarray(scores) > whole.thresholds)
    if len(scores) > 1:
        cut = 1 + cut % (len(scores) - 1)
        head = aci_scores(state, calibration, scores[:cut])
        tail = aci_scores(AciState.from_dict(head.state.to_dict()), calibration, scores[cut:])
        assert np.array_equal(np.r_[head.thresholds, tail.thresholds], whole.thresholds)
        assert tail.state == whole.state


@pytest.mark.parametrize("kind", ["ramp", "step"])
def test_aci_holds_the_alarm_rate_on_a_drifting_series_where_a_static_threshold_fails(
    kind: str,
) -> None:
    rng = np.random.default_rng(7)
    calibration = rng.standard_normal(5_000)
    n = 200_000
    drift = np.linspace(0.0, 2.0, n) if kind == "ramp" else np.where(np.arange(n) < n // 4, 0, 1.5)
    scores = rng.standard_normal(n) + drift
    alpha = 0.005
    static_rate = np.mean(scores > conformal_threshold(calibration, alpha))
    result = aci_scores(AciState(alpha, gamma=0.005), calibration, scores)
    assert static_rate > 10 * alpha
    assert abs(result.state.alarm_rate - alpha) < 0.2 * alpha
    # The rate holds locally too, not just on average: every quarter stays within 0.25-1.5 %.
    quarters = result.is_anomaly.reshape(4, -1).mean(axis=1)
    assert np.all((quarters > 0.0025) & (quarters < 0.015)), quarters


def test_state_round_trips_through_json() -> None:
    state = aci_scores(AciState(0.01, gamma=0.02), CAL, [5.0, 0.0, 5.0]).state
    assert AciState.from_dict(json.loads(json.dumps(state.to_dict()))) == state
    assert math.isnan(AciState(0.1).alarm_rate)
    assert AciState(0.1).alpha_t == 0.1


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: AciState(0.0), "alpha must be in \\(0, 1\\), got 0.0"),
        (lambda: AciState(0.1, gamma=0.0), "gamma must be in \\(0, 1\\], got 0.0"),
        (lambda: AciState(0.1, alpha_t=math.inf), "alpha_t must be finite, got inf"),
        (lambda: AciState(0.1, n_scored=2, n_alarms=3), "n_alarms must be in \\[0, n_scored=2\\]"),
        (lambda: aci_scores(AciState(0.1), [], [1.0]), "calibration_scores must not be empty"),
        (lambda: aci_scores(AciState(0.1), CAL, [math.nan]), "scores must be finite"),
    ],
)
def test_bad_input_raises(call: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
