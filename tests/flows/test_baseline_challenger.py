"""A baseline as a registered challenger: trained, gated, promoted and served like the AT."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from mlflow.tracking import MlflowClient

from flows.ingest import ingest_flow
from flows.params import CalibrationParams, GateParams, ModelParams, TrainFlowParams
from flows.scoring import backfill_flow, scoring_flow
from flows.training import training_flow
from model.detector_checkpoint import SCORING_METHOD, DetectorCheckpoint
from model.scaling import Scaler
from tasks.ingest import read_smd
from tasks.registry import CHAMPION, get_alias_version, load_model_version
from tasks.settings import get_settings
from tasks.warehouse import get_engine

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample"
# Each machine keeps its last TRAIN_ROWS train rows and first TEST_ROWS test rows; the labelled
# anomalies at test rows 837-857 (machine-1-7) and 857-859 (machine-2-3) come before the new rows.
MACHINES = ("machine-1-7", "machine-2-3")
TRAIN_ROWS, TEST_ROWS, NEW_ROWS = 600, 1000, 100
MODEL = "baseline-model"


def _slice_sample(root: Path) -> Path:
    """A small SMD folder cut from the shipped sample: the last train rows, the first test rows."""
    for name in MACHINES:
        for part, keep in (("train", slice(-TRAIN_ROWS, None)), ("test", slice(0, TEST_ROWS))):
            with gzip.open(SAMPLE / part / f"{name}.txt.gz", "rt") as handle:
                lines = handle.read().splitlines()[keep]
            (root / part).mkdir(parents=True, exist_ok=True)
            (root / part / f"{name}.txt").write_text("\n".join(lines) + "\n")
        labels = (SAMPLE / "test_label" / f"{name}.txt").read_text().splitlines()[:TEST_ROWS]
        (root / "test_label").mkdir(exist_ok=True)
        (root / "test_label" / f"{name}.txt").write_text("\n".join(labels) + "\n")
    return root


@pytest.fixture
def baseline_env(
    tmp_path: Path, sqlite_url: str, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch
) -> str:
    monkeypatch.setenv("ATP_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ATP_WAREHOUSE_URL", sqlite_url)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    monkeypatch.setenv("ATP_MODEL_NAME", MODEL)
    return sqlite_url


def _split_csv(folder: Path, out: Path) -> tuple[Path, Path]:
    """The folder's readings as two CSV files: all but each machine's last NEW_ROWS, then those."""
    frame = read_smd(folder).frame
    last = frame.groupby("entity")["ts"].transform(lambda ts: ts.iloc[-NEW_ROWS])
    old, new = out / "old.csv", out / "new.csv"
    frame[frame["ts"] < last].to_csv(old, index=False)
    frame[frame["ts"] >= last].to_csv(new, index=False)
    return old, new


def _scores(url: str) -> pd.DataFrame:
    query = "SELECT * FROM anomaly_scores ORDER BY entity, ts"
    with get_engine(url).connect() as conn:
        return pd.read_sql(sa.text(query), conn)


def _gate_tags(version: int) -> tuple[dict[str, str], dict[str, float]]:
    client = MlflowClient(get_settings().mlflow_tracking_uri)
    run = client.get_run(client.get_model_version(MODEL, str(version)).run_id)
    return run.data.tags, run.data.metrics


def test_baseline_challenger_wins_the_gate_and_serves_the_scoring_flow(
    baseline_env: str, tmp_path: Path
) -> None:
    old, new = _split_csv(_slice_sample(tmp_path / "smd"), tmp_path)
    ingest_flow(str(old), kind="csv", contract="smd")
    params = TrainFlowParams(
        models=[ModelParams(win_size=20)],
        calibration=CalibrationParams(alpha=0.02),
        gate=GateParams(false_alarm_budget=0.5),
        promote=True,
    )
    first = training_flow(params.model_copy(update={"detector": "max_z"}))
    assert get_alias_version(MODEL, CHAMPION) == first.version == 1
    second = training_flow(params.model_copy(update={"detector": "knn"}))
    tags, metrics = _gate_tags(second.version)
    assert tags["gate.decision"] == "promoted" and tags["gate.champion_version"] == "1"
    assert first.promotion.startswith("champion: ") and "no champion yet" in first.promotion
    assert second.promotion == f"champion: {tags['gate.reason']}"
    assert metrics["test_entities_evaluated"] == 2
    assert (tags["gate.challenger_detector"], tags["gate.champion_detector"]) == ("knn", "max_z")
    champion_vus_pr = _gate_tags(first.version)[1]["test_vus_pr"]
    assert metrics["test_vus_pr"] > metrics["gate_champion_value"] == champion_vus_pr
    assert 0.0 <= metrics["control_random_vus_pr"] < metrics["test_vus_pr"]
    assert get_alias_version(MODEL, CHAMPION) == second.version
    client = MlflowClient(get_settings().mlflow_tracking_uri)
    assert client.get_model_version(MODEL, str(second.version)).tags["detector"] == "knn"

    loaded = load_model_version(MODEL, CHAMPION)
    assert isinstance(loaded.checkpoint, DetectorCheckpoint)
    assert loaded.checkpoint.model_cfg.win_size == 10  # the kNN window, not the AT's 20
    assert loaded.extras["scoring_method"] == SCORING_METHOD
    assert {"threshold", "calibration_scores", "training_profiles"} <= set(loaded.extras)

    rows = TRAIN_ROWS + TEST_ROWS  # per machine
    assert sum(r.scored for r in scoring_flow(source="smd")) == 2 * (rows - NEW_ROWS)
    ingest_flow(str(new), kind="csv", contract="smd")
    assert [r.scored for r in scoring_flow(source="smd")] == [NEW_ROWS, NEW_ROWS]
    scheduled = _scores(baseline_env)
    assert set(scheduled["model_version"]) == {str(second.version)}
    assert len(scheduled) == 2 * rows and scheduled["p_value"].between(0, 1).all()
    assert all(len(json.loads(t)) == 3 for t in scheduled["top_sensors"])

    # The stored scores are the champion detector's, scored from the raw readings directly.
    raw = read_smd(tmp_path / "smd").frame
    for entity, rows in raw.groupby("entity"):
        scaler = Scaler.from_dict(loaded.extras["scalers"][entity])
        values = scaler.transform(rows[loaded.extras["sensors"]].to_numpy(np.float64))
        want = loaded.checkpoint.detectors[entity].score(values)
        got = scheduled.loc[scheduled["entity"] == entity, "score"].to_numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5)
        threshold = scheduled.loc[scheduled["entity"] == entity, "threshold"].iloc[0]
        assert threshold == loaded.extras["threshold"]

    # A backfill from mid-range (kNN context read from before it) writes the same scores.
    backfill_flow(source="smd", start=scheduled["ts"].iloc[TRAIN_ROWS + 5])
    np.testing.assert_allclose(_scores(baseline_env)["score"], scheduled["score"], rtol=1e-6)
