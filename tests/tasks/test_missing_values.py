"""Nullable sensors with gaps: training fills them with the training mean, scoring does the same."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from data_contracts.contract import contract_from_dict
from model.checkpoint import Checkpoint
from model.config import ModelConfig
from model.network import AnomalyTransformer
from model.scoring import score_series
from tasks.errors import DataContractError
from tasks.fit import sensor_scales
from tasks.scoring import score_values
from tasks.warehouse import ensure_schema, get_engine, upsert_readings
from tasks.windowing import DatasetRef, build_dataset

ROWS = 80
PUMPS = contract_from_dict(
    {
        "name": "pumps",
        "version": 1,
        "min_rows_per_entity": 10,
        "sensors": {"columns": ["pressure", {"name": "flow", "nullable": True}]},
    }
)


def _readings(flow_missing: slice) -> pd.DataFrame:
    t = np.arange(ROWS)
    flow = 10.0 + np.sin(t / 5)
    flow[flow_missing] = np.nan
    return pd.DataFrame(
        {
            "entity": "P1",
            "ts": pd.date_range("2024-01-01", periods=ROWS, freq="1min"),
            "pressure": 1.0 + 0.1 * np.cos(t / 7),
            "flow": flow,
        }
    )


def _dataset(url: str, frame: pd.DataFrame, out: Path) -> DatasetRef:
    engine = get_engine(url)
    ensure_schema(engine, PUMPS)
    upsert_readings(engine, PUMPS, frame)
    return build_dataset(url, PUMPS, out, win_size=10, val_fraction=0.2)


def test_gaps_of_a_nullable_sensor_train_as_the_training_mean(
    sqlite_url: str, tmp_path: Path
) -> None:
    frame = _readings(slice(20, 30))
    dataset = _dataset(sqlite_url, frame, tmp_path / "dataset")
    assert dataset.nullable == ("flow",)  # the checkpoint's nullable_sensors (common_extras)
    fit, val = dataset.load("P1")
    assert np.isfinite(fit).all() and np.isfinite(val).all()
    np.testing.assert_array_equal(fit[20:30, 1], 0.0)
    observed = frame["flow"].iloc[: len(fit)].dropna()
    np.testing.assert_allclose(dataset.scalers()["P1"].mean[1], observed.mean())


def test_a_sensor_that_never_reports_in_the_fit_part_is_refused(
    sqlite_url: str, tmp_path: Path
) -> None:
    with pytest.raises(DataContractError, match=r"entity 'P1': sensor\(s\) \['flow'\] have no"):
        _dataset(sqlite_url, _readings(slice(0, ROWS)), tmp_path / "dataset")
    assert not (tmp_path / "dataset" / "scalers.json").exists()


def test_a_gap_scores_the_same_in_any_batch() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(n_channels=2, win_size=10, d_model=8, n_heads=2, e_layers=1, d_ff=8)
    scaler = {"mean": [1.0, 10.0], "scale": [0.1, 0.7]}
    extras = {"scalers": {"P1": scaler}, "scoring_method": "recon_last"}
    checkpoint = Checkpoint(AnomalyTransformer(cfg).eval(), cfg, extras)
    values = _readings(slice(40, 55))[["pressure", "flow"]].to_numpy(np.float64)
    whole, _ = score_values(checkpoint, "P1", values, skip=30)
    split, _ = score_values(checkpoint, "P1", values[36:], skip=9)
    assert np.isfinite(whole).all()
    np.testing.assert_allclose(whole[15:], split, rtol=1e-5)


def test_a_gap_in_the_validation_tail_does_not_shrink_the_sensors_divisor(
    sqlite_url: str, tmp_path: Path
) -> None:
    """recon_mean_norm divides each sensor's error by its mean error on the tail: a filled gap
    there (easy to reconstruct) must not count, or the sensor's normal errors look anomalous."""
    dataset = _dataset(sqlite_url, _readings(slice(68, 78)), tmp_path / "dataset")
    fit_observed, observed = dataset.observed("P1")  # the tail is rows 64..79
    assert fit_observed.all() and not observed[4:14, 1].any() and observed[:, 0].all()
    torch.manual_seed(0)
    cfg = ModelConfig(n_channels=2, win_size=10, d_model=8, n_heads=2, e_layers=1, d_ff=8)
    model = AnomalyTransformer(cfg).eval()
    scales = sensor_scales(model, dataset, "recon_mean_norm")["P1"]
    values, skip = dataset.tail_with_context("P1", cfg.win_size - 1)
    errors = score_series(model, values, "recon_mean", skip=skip).contributions
    assert scales[0] == pytest.approx(errors[:, 0].mean(), rel=1e-6)
    assert scales[1] == pytest.approx(errors[observed[:, 1], 1].mean(), rel=1e-6)
