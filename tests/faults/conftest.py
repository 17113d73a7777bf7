"""Fault-test fixtures: a warehouse with readings, a tiny model, helpers to kill and compare."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import sqlalchemy as sa
from fault_workers import MODEL_NAME, SMD, local_model, readings, save_tiny_checkpoint
from mlflow import MlflowClient

from tasks.scores_store import anomaly_scores, scoring_watermarks
from tasks.scoring import score_rows
from tasks.warehouse import (
    ensure_schema,
    get_engine,
    read_readings,
    read_transaction,
    upsert_readings,
)

ROWS = 300  # per entity: 15 score transactions of 20 rows each
CHUNK_ROWS = 20
POLL_SECONDS = 0.002


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "model.pt"
    save_tiny_checkpoint(path, readings(ROWS))
    return path


@pytest.fixture
def loaded_warehouse(warehouse_url: str) -> str:
    """The warehouse under test holding ``ROWS`` readings of one entity."""
    ensure_schema(warehouse_url, SMD)
    upsert_readings(warehouse_url, SMD, readings(ROWS, entities=("machine-1",)))
    return warehouse_url


@pytest.fixture
def training_env(tmp_path: Path, sqlite_url: str, mlflow_uri: str) -> dict[str, str]:
    """Settings of a training child: a fresh ATP_HOME and MLflow store, a SQLite warehouse
    holding ``ROWS`` readings of each entity."""
    ensure_schema(sqlite_url, SMD)
    upsert_readings(sqlite_url, SMD, readings(ROWS))
    return {
        "ATP_HOME": str(tmp_path / "home"),
        "ATP_WAREHOUSE_URL": sqlite_url,
        "MLFLOW_TRACKING_URI": mlflow_uri,
        "ATP_MODEL_NAME": MODEL_NAME,
    }


@pytest.fixture
def api_url(prefect_api: None) -> str:
    """The session's temporary Prefect API, for flows run in children."""
    from prefect.settings import PREFECT_API_URL

    return str(PREFECT_API_URL.value())


def mlflow_runs(env: dict[str, str]) -> list[Any]:
    """Every MLflow run of the store ``env`` names."""
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def logged_models(env: dict[str, str]) -> list[Any]:
    """Every MLflow logged model of the store ``env`` names."""
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    return client.search_logged_models([e.experiment_id for e in client.search_experiments()])


def count(url: str, table: str) -> int:
    """Rows in ``table``, read without waiting for a writer (SQLite: a deferred transaction)."""
    with read_transaction(url) as conn:
        return int(conn.scalar(sa.select(sa.func.count()).select_from(sa.table(table))) or 0)


def stored_scores(url: str) -> pd.DataFrame:
    """Every score row's key and values (not run ids or write times), sorted by key."""
    s = anomaly_scores.c
    query = sa.select(
        s.entity,
        s.ts,
        s.model_version,
        s.score,
        s.threshold,
        s.is_anomaly,
        s.p_value,
        s.top_sensors,
    ).order_by(s.entity, s.ts)
    with get_engine(url).connect() as conn:
        return pd.DataFrame(conn.execute(query).all(), columns=list(query.selected_columns.keys()))


def watermarks(url: str) -> dict[str, pd.Timestamp]:
    w = scoring_watermarks.c
    with get_engine(url).connect() as conn:
        return {e: pd.Timestamp(t) for e, t in conn.execute(sa.select(w.entity, w.last_ts))}


def clean_scores(url: str, checkpoint: Path, start: Any = None, end: Any = None) -> pd.DataFrame:
    """What one uninterrupted pass writes for ``start <= ts < end``: every entity in one go."""
    loaded = local_model(checkpoint)
    frames = []
    for entity, frame in read_readings(url, SMD).groupby("entity"):
        rows = score_rows(loaded, str(entity), frame.reset_index(drop=True), 0)
        low, high = start or rows["ts"].min(), end or pd.Timestamp.max
        rows = rows[(rows["ts"] >= low) & (rows["ts"] < high)]
        frames.append(rows.assign(entity=entity, model_version="1"))
    return pd.concat(frames, ignore_index=True)[list(stored_scores(url).columns)]


def assert_same_scores(found: pd.DataFrame, expected: pd.DataFrame) -> None:
    """The same keys, exactly once each; the same scores up to float rounding of batching."""
    assert not found.duplicated(["entity", "ts"]).any()
    assert list(zip(found["entity"], found["ts"], strict=True)) == list(
        zip(expected["entity"], expected["ts"], strict=True)
    )
    pd.testing.assert_series_equal(found["score"], expected["score"], rtol=1e-5)
    pd.testing.assert_series_equal(found["p_value"], expected["p_value"], rtol=1e-5)
    assert (found["is_anomaly"] == expected["is_anomaly"]).all()


def kill_once(
    process: Any, started: Callable[[], bool], delay: float, timeout: float = 120
) -> None:
    """Start ``process``; once ``started()`` holds, wait ``delay`` seconds and SIGKILL it."""
    process.start()
    deadline = time.monotonic() + timeout
    while not started() and process.is_alive():
        assert time.monotonic() < deadline, "the child never started writing"
        time.sleep(POLL_SECONDS)
    time.sleep(delay)
    os.kill(process.pid, signal.SIGKILL)
    process.join(timeout)
    assert process.exitcode == -signal.SIGKILL, "the child ended before it could be killed"
