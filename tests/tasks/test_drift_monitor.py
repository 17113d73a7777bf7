"""Drift checks per batch, the latest state per entity, and the adaptive-threshold state."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from data_contracts import load_contract
from model.adaptive import AciState, aci_scores
from model.drift import TrainingProfile
from model.scaling import Scaler
from tasks.adaptive_threshold import apply_adaptive, load_state
from tasks.drift_monitor import NO_PROFILE, check_batch, latest_drift, record_drift
from tasks.fit import training_profiles
from tasks.scores_store import Watermark
from tasks.warehouse import ensure_schema, get_engine, read_readings, upsert_readings
from tasks.windowing import build_dataset

SMD = load_contract("smd")
SENSORS = ["a", "b", "c"]
RNG = np.random.default_rng(0)
TRAIN = RNG.normal(size=(2000, 3))
CALIBRATION = np.sort(RNG.normal(size=999))


def _extras(*, profiled: bool = True) -> dict:
    profiles = {"e1": TrainingProfile.fit(TRAIN).to_dict()} if profiled else {}
    return {
        "sensors": SENSORS,
        "scalers": {"e1": Scaler.fit(TRAIN).to_dict()},
        "threshold": float(np.quantile(CALIBRATION, 0.99)),
        "calibration": {"alpha": 0.01},
        "calibration_scores": CALIBRATION.tolist(),
        "training_profiles": profiles,
    }


def test_the_flag_is_the_score_test_and_sensors_explain_it() -> None:
    values = RNG.normal(size=(500, 3))
    values[:, 1] += 3.0  # sensor b moved
    quiet = check_batch(_extras(), "e1", values, RNG.normal(size=500))
    assert not quiet.flag and quiet.statistics["most_shifted"][0][0] == "b"
    alarming = check_batch(_extras(), "e1", values, RNG.normal(size=500) + 2.5)
    assert alarming.flag and alarming.alarm_rate > 0.3 and alarming.alpha == 0.01
    few = check_batch(_extras(), "e1", values[:3], np.array([0.0, 0.0, 9.0]))
    assert not few.flag  # one alarm in three points is no evidence at alpha 1 %
    blind = check_batch(_extras(profiled=False), "e1", values, RNG.normal(size=500) + 2.5)
    assert blind.flag and blind.statistics["note"] == NO_PROFILE
    assert "most_shifted" not in blind.statistics


def test_discrete_sensors_at_their_training_levels_have_not_moved(
    sqlite_url: str, tmp_path: Path
) -> None:
    """Levels such as 0.1, 0.2 (and a constant sensor) read again from the warehouse: the profile
    training stores must hold the same levels, not float32-rounded neighbours of them."""
    sensors = SMD.sensor_names
    rng = np.random.default_rng(3)
    levels = rng.integers(0, 11, size=(2000, len(sensors))) / 10
    levels[:, 0] = 0.3  # constant in training
    frame = pd.DataFrame(levels, columns=sensors)
    frame.insert(0, "ts", pd.date_range("2024-01-01", periods=2000, freq="min"))
    frame.insert(0, "entity", "e1")
    frame["label"] = None
    ensure_schema(get_engine(sqlite_url), SMD)
    upsert_readings(sqlite_url, SMD, frame)
    dataset = build_dataset(sqlite_url, SMD, tmp_path / "ds", win_size=10, val_fraction=0.2)
    extras = _extras() | {
        "sensors": sensors,
        "scalers": {e: s.to_dict() for e, s in dataset.scalers().items()},
        "training_profiles": training_profiles(dataset),
    }
    batch = read_readings(sqlite_url, SMD, entity="e1")[sensors].to_numpy(np.float64)
    check = check_batch(extras, "e1", batch, np.zeros(len(batch)))  # the same readings
    assert check.statistics["sensors_rejected"] == 0
    assert max(d for _, d, _ in check.statistics["most_shifted"]) < 0.05
    batch[:, 0] = 0.4  # the constant sensor moved
    moved = check_batch(extras, "e1", batch, np.zeros(len(batch))).statistics
    assert moved["sensors_rejected"] == 1 and moved["most_shifted"][0][:2] == [sensors[0], 1.0]


def _mark(entity: str, last: str, version: str = "1") -> Watermark:
    return Watermark(entity, "m", datetime.fromisoformat(last), version, "run")


def test_latest_drift_is_the_newest_batch_per_entity(warehouse_url: str) -> None:
    assert latest_drift(warehouse_url) == []
    engine = get_engine(warehouse_url)
    ensure_schema(engine, SMD)
    ensure_schema(engine, SMD)  # a second call changes nothing
    values, scores = RNG.normal(size=(50, 3)), RNG.normal(size=50)
    calm = check_batch(_extras(), "e1", values, scores)
    loud = check_batch(_extras(), "e1", values, scores + 5)
    with engine.begin() as conn:
        for entity, start, end, check in (
            ("e1", "2024-01-01", "2024-01-02", loud),
            ("e1", "2024-01-02", "2024-01-03", calm),
            ("e2", "2024-01-01", "2024-01-02", loud),
        ):
            record_drift(conn, "smd", _mark(entity, end), datetime.fromisoformat(start), 50, check)
    with engine.begin() as conn:  # the same batch again replaces its row
        record_drift(
            conn,
            "smd",
            _mark("e2", "2024-01-02", "2"),
            datetime.fromisoformat("2024-01-01"),
            50,
            loud,
        )
    states = latest_drift(warehouse_url, "smd")
    assert [(s.entity, s.flag, s.model_version) for s in states] == [
        ("e1", False, "1"),
        ("e2", True, "2"),
    ]
    assert states[0].batch_end == datetime(2024, 1, 3) and states[0].drifted_sensors


def _rows(start: int, n: int, scores: np.ndarray, provisional: int = 0) -> pd.DataFrame:
    """Score rows ``start .. start + n - 1``, the last ``provisional`` of them provisional."""
    ts = pd.Timestamp("2024-01-01") + pd.to_timedelta(np.arange(start, start + n), unit="min")
    return pd.DataFrame(
        {
            "ts": ts,
            "score": scores[start : start + n],
            "threshold": 0.0,
            "is_anomaly": False,
            "provisional": np.arange(n) >= n - provisional,
        }
    )


def test_adaptive_state_advances_once_per_point(warehouse_url: str) -> None:
    engine = get_engine(warehouse_url)
    ensure_schema(engine, SMD)
    scores = np.concatenate([RNG.normal(size=300), RNG.normal(size=300) + 1.5])
    flagged = []
    for start, n in ((0, 250), (200, 250), (450, 150), (100, 50)):  # overlaps: already covered
        with engine.begin() as conn:
            part = apply_adaptive(
                conn,
                "smd",
                _mark("e1", "2024-01-02"),
                _rows(start, n, scores),
                _extras(),
                gamma=0.01,
            )
        flagged.append(part)
    written = pd.concat(flagged)
    assert list(written["ts"]) == list(_rows(0, 600, scores)["ts"])
    expected = aci_scores(AciState(0.01, 0.01), CALIBRATION, scores)
    np.testing.assert_array_equal(written["threshold"], expected.thresholds)
    np.testing.assert_array_equal(written["is_anomaly"], expected.is_anomaly)
    with engine.begin() as conn:  # a new model version starts afresh
        fresh = apply_adaptive(
            conn, "smd", _mark("e1", "2024-01-02", "2"), _rows(0, 10, scores), _extras(), gamma=0.01
        )
    np.testing.assert_array_equal(
        fresh["threshold"], aci_scores(AciState(0.01, 0.01), CALIBRATION, scores[:10]).thresholds
    )


def test_provisional_rows_are_flagged_without_advancing_the_state(warehouse_url: str) -> None:
    engine = get_engine(warehouse_url)
    ensure_schema(engine, SMD)
    scores = RNG.normal(size=100) + np.repeat([0.0, 2.0], 50)
    mark = _mark("e1", "2024-01-02")
    with engine.begin() as conn:  # rows 50..59 provisional: flagged now, advanced when final
        first = apply_adaptive(conn, "smd", mark, _rows(0, 60, scores, 10), _extras(), gamma=0.01)
    with engine.begin() as conn:
        second = apply_adaptive(conn, "smd", mark, _rows(50, 50, scores, 5), _extras(), gamma=0.01)
        state, last_ts = load_state(conn, "smd", mark, 0.01, 0.01)
    expected = aci_scores(AciState(0.01, 0.01), CALIBRATION, scores).thresholds
    assert list(second["ts"]) == list(_rows(50, 50, scores)["ts"])  # re-flagged once final
    np.testing.assert_array_equal(first["threshold"], expected[:60])
    np.testing.assert_array_equal(second["threshold"], expected[50:])
    assert state.n_scored == 95 and last_ts == second["ts"].iloc[44]
