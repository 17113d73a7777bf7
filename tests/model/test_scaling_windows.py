"""Scaler statistics and window starts that never cross an entity boundary."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.config import ModelConfig
from model.network import AnomalyTransformer
from model.scaling import STANDARD_SCORE_LIMIT, Scaler
from model.scoring import METHODS, score_series
from model.windows import WindowSet, window_starts


def test_scaler_standardises_and_keeps_constant_channels_finite() -> None:
    rng = np.random.default_rng(0)
    values = np.column_stack([rng.normal(5.0, 2.0, 500), np.full(500, 0.1), rng.normal(0, 1, 500)])
    scaler = Scaler.fit(values)
    scaled = scaler.transform(values)
    assert scaled.dtype == np.float32
    np.testing.assert_allclose(scaled.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(scaled.std(axis=0), [1.0, 0.0, 1.0], atol=1e-5)
    assert scaler.scale[1] == 1.0


def test_scaler_standardises_sensors_read_in_tiny_units() -> None:
    """A pressure of 1e-10 +- 1e-11 varies by 10 %: it is no constant channel, whatever its unit."""
    rng = np.random.default_rng(0)
    values = np.column_stack([rng.normal(1e-10, 1e-11, 500), rng.normal(0.0, 1e-12, 500)])
    scaled = Scaler.fit(values).transform(values)
    np.testing.assert_allclose(scaled.std(axis=0), [1.0, 1.0], atol=1e-5)
    assert Scaler.fit(np.zeros((5, 1))).scale[0] == 1.0
    # Already standardised input (the detectors'): rounding noise of a constant sensor stays flat.
    assert Scaler.fit(np.array([[-5.5e-17], [0.0]]), unit=1.0).scale[0] == 1.0


def test_readings_far_outside_the_training_range_are_clipped_and_score_finite(
    tiny_cfg: ModelConfig,
) -> None:
    """A reading 1e30 deviations out (a sensor in tiny units that jumps, a constant one that
    moves) would overflow the squared error to inf/NaN: it is clipped, and still scores highest."""
    rng = np.random.default_rng(0)
    scaler = Scaler.fit(rng.normal(0.0, 1e-12, (200, tiny_cfg.n_channels)))
    readings = rng.normal(0.0, 1e-12, (64, tiny_cfg.n_channels))
    readings[40, 1] = 1e18
    scaled = scaler.transform(readings)
    assert scaled[40, 1] == STANDARD_SCORE_LIMIT
    model = AnomalyTransformer(tiny_cfg).eval()
    for method in METHODS:
        scores = score_series(model, scaled, method).scores
        assert np.isfinite(scores).all(), method


def test_scaler_round_trips_through_a_dict() -> None:
    scaler = Scaler.fit(np.random.default_rng(1).normal(size=(50, 3)))
    restored = Scaler.from_dict(scaler.to_dict())
    np.testing.assert_array_equal(restored.mean, scaler.mean)
    np.testing.assert_array_equal(restored.scale, scaler.scale)


def test_scaler_rejects_bad_input() -> None:
    scaler = Scaler.fit(np.ones((4, 2)))
    with pytest.raises(ValueError, match="3 channels: this scaler was fitted on 2"):
        scaler.transform(np.ones((4, 3)))
    with pytest.raises(ValueError, match="the first is nan at row 1, column 0"):
        Scaler.fit(np.array([[1.0, 2.0], [np.nan, 1.0]]))
    with pytest.raises(ValueError, match="every scale > 0"):
        Scaler.from_dict({"mean": [0.0], "scale": [0.0]})


def test_window_starts_stay_inside_each_entity() -> None:
    lengths, win = [10, 3, 7], 4
    starts = window_starts(lengths, win, stride=1)
    np.testing.assert_array_equal(starts, [0, 1, 2, 3, 4, 5, 6, 13, 14, 15, 16])
    bounds = np.cumsum([0, *lengths])
    for start in starts:
        entity = np.searchsorted(bounds, start, side="right") - 1
        assert start + win <= bounds[entity + 1]


def test_window_starts_follow_the_stride_from_each_entity_start() -> None:
    np.testing.assert_array_equal(window_starts([10, 9], 4, stride=3), [0, 3, 6, 10, 13])
    assert window_starts([2, 3], 4).shape == (0,)


def test_window_set_gathers_the_windows_it_indexes() -> None:
    series = [np.arange(20, dtype=np.float32).reshape(10, 2), -np.ones((5, 2), np.float32)]
    windows = WindowSet(series, win_size=4, stride=2, device=torch.device("cpu"), resident=True)
    assert len(windows) == 4 + 1
    batch = windows.batch(torch.tensor([1, 4]))  # (2, 4, 2)
    np.testing.assert_array_equal(batch[0].numpy(), series[0][2:6])
    np.testing.assert_array_equal(batch[1].numpy(), series[1][0:4])


def test_scaler_fits_observed_values_and_imputes_the_mean_where_missing_is_allowed() -> None:
    values = np.array([[1.0, 10.0], [np.nan, 20.0], [3.0, np.nan]])
    with pytest.raises(ValueError, match="non-finite"):
        Scaler.fit(values)
    scaler = Scaler.fit(values, missing_ok=True)
    np.testing.assert_allclose(scaler.mean, [2.0, 15.0])
    filled = scaler.impute(values)
    np.testing.assert_allclose(filled, [[1.0, 10.0], [2.0, 20.0], [3.0, 15.0]])
    assert scaler.transform(filled)[1, 0] == 0.0 and scaler.transform(filled)[2, 1] == 0.0
    with pytest.raises(ValueError, match="non-finite"):
        scaler.transform(values)
    with pytest.raises(ValueError, match="non-finite"):
        scaler.impute(np.array([[np.inf, 1.0]]))
    with pytest.raises(ValueError, match=r"channel\(s\) \[1\] hold no observed value"):
        Scaler.fit(np.array([[1.0, np.nan], [2.0, np.nan]]), missing_ok=True)
