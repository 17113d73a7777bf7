"""SIGKILL the scoring, backfill, ingest and training work mid-write; the next run ends exactly
clean."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pandas as pd
from conftest import (
    CHUNK_ROWS,
    ROWS,
    assert_same_scores,
    clean_scores,
    count,
    kill_once,
    logged_models,
    mlflow_runs,
    stored_scores,
    watermarks,
)
from fault_workers import (
    MODEL_NAME,
    SMD,
    backfill_all,
    fork_server,
    ingest_file,
    readings,
    score_all,
    train,
)

from tasks.registry import CHALLENGER, load_model_version
from tasks.warehouse import read_readings

CONTEXT = fork_server()
PACE_SECONDS = 0.05  # each commit of a child to be killed waits this long


def assert_consistent(url: str) -> None:
    """Scores cover exactly the rows up to each entity's watermark: no gap, nothing beyond."""
    scores, marks = stored_scores(url), watermarks(url)
    for entity, rows in read_readings(url, SMD).groupby("entity"):
        mark = marks.get(str(entity))
        expected = [] if mark is None else list(rows["ts"][rows["ts"] <= mark])
        assert list(scores["ts"][scores["entity"] == entity]) == expected


def test_scoring_killed_mid_write_then_rerun_scores_each_row_once(
    loaded_warehouse: str, checkpoint: Path
) -> None:
    url, rng = loaded_warehouse, random.Random()
    for low, high in ((1, ROWS - 2 * CHUNK_ROWS),):  # killed at a random row
        target = rng.randint(low, high)
        child = CONTEXT.Process(
            target=score_all,
            args=(url, checkpoint, CHUNK_ROWS),
            kwargs={"pace_seconds": PACE_SECONDS},
        )
        kill_once(child, lambda t=target: count(url, "anomaly_scores") >= t, rng.uniform(0, 0.01))
        assert target <= count(url, "anomaly_scores") < ROWS
        assert_consistent(url)
    score_all(url, checkpoint, CHUNK_ROWS)
    assert_same_scores(stored_scores(url), clean_scores(url, checkpoint))
    assert watermarks(url) == {"machine-1": pd.Timestamp(readings(ROWS)["ts"].max())}


def test_backfill_killed_mid_write_then_rerun_gives_a_clean_backfill(
    loaded_warehouse: str, checkpoint: Path
) -> None:
    url = loaded_warehouse
    start, end = pd.Timestamp("2024-01-01 01:00"), pd.Timestamp("2024-01-01 04:00")
    args = (url, checkpoint, CHUNK_ROWS, start.to_pydatetime(), end.to_pydatetime())
    child = CONTEXT.Process(target=backfill_all, args=args, kwargs={"pace_seconds": PACE_SECONDS})
    target = random.randint(1, 120)
    kill_once(child, lambda: count(url, "anomaly_scores") >= target, random.uniform(0, 0.01))
    assert 0 < count(url, "anomaly_scores") < 180 and watermarks(url) == {}
    backfill_all(*args)
    assert_same_scores(stored_scores(url), clean_scores(url, checkpoint, start, end))
    assert watermarks(url) == {}


def test_ingest_killed_mid_load_writes_nothing_and_the_rerun_loads_once(
    warehouse_url: str, tmp_path: Path
) -> None:
    frame = readings(4_000, entities=("machine-1", "machine-2"))
    path = tmp_path / "readings.csv"
    frame.to_csv(path, index=False)
    staging = CONTEXT.Event()
    child = CONTEXT.Process(target=ingest_file, args=(warehouse_url, path, staging))
    kill_once(child, staging.is_set, random.uniform(0, 0.03))  # while staging or moving rows
    assert count(warehouse_url, SMD.table_name) == 0
    ingest_file(warehouse_url, path)
    stored = read_readings(warehouse_url, SMD)
    assert len(stored) == len(frame)
    expected = frame[SMD.sensor_names].astype("float32")
    pd.testing.assert_frame_equal(stored[SMD.sensor_names], expected)


def test_training_killed_while_logging_then_rerun_leaves_nothing_open(
    training_env: dict[str, str], api_url: str, monkeypatch: Any
) -> None:
    """Killed with its MLflow run open: the next training marks that run KILLED, removes the
    killed run's files and registers a model that loads."""
    child = CONTEXT.Process(target=train, args=(training_env, api_url, "max_z"))
    running = lambda: any(r.info.status == "RUNNING" for r in mlflow_runs(training_env))  # noqa: E731
    kill_once(child, running, random.uniform(0, 0.5))
    assert [r.info.status for r in mlflow_runs(training_env)] == ["RUNNING"]
    again = CONTEXT.Process(target=train, args=(training_env, api_url, "max_z"))
    again.start()
    again.join(120)
    assert again.exitcode == 0
    assert sorted(r.info.status for r in mlflow_runs(training_env)) == ["FINISHED", "KILLED"]
    statuses = [str(m.status) for m in logged_models(training_env)]
    assert "PENDING" not in statuses and "READY" in statuses
    assert list((Path(training_env["ATP_HOME"]) / "runs" / "smd").iterdir()) == []
    for name, value in training_env.items():
        monkeypatch.setenv(name, value)
    assert load_model_version(MODEL_NAME, CHALLENGER).extras["detector"] == "max_z"
