"""Two scoring runs, two overlapping backfills, two trainings or two promotion gates at once:
the result equals one run after the other."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pandas as pd
from conftest import (
    CHUNK_ROWS,
    POLL_SECONDS,
    ROWS,
    assert_same_scores,
    clean_scores,
    mlflow_runs,
    stored_scores,
    watermarks,
)
from fault_workers import MODEL_NAME, backfill_all, fork_server, gate, readings, score_all, train
from mlflow import MlflowClient

from tasks.registry import CHAMPION, DETECTOR_TAG, get_alias_version, load_model_version, set_alias

CONTEXT = fork_server()


def run_together(target: Any, *argument_sets: tuple[Any, ...]) -> None:
    """Start one child per argument set; they begin work at the same moment."""
    barrier = CONTEXT.Barrier(len(argument_sets))
    children = [CONTEXT.Process(target=target, args=(*args, barrier)) for args in argument_sets]
    for child in children:
        child.start()
    for child in children:
        child.join(120)
    assert [child.exitcode for child in children] == [0] * len(children)


def test_two_scoring_runs_at_once_equal_one(loaded_warehouse: str, checkpoint: Path) -> None:
    url = loaded_warehouse
    run_together(score_all, (url, checkpoint, CHUNK_ROWS), (url, checkpoint, CHUNK_ROWS))
    assert_same_scores(stored_scores(url), clean_scores(url, checkpoint))
    assert watermarks(url) == {"machine-1": pd.Timestamp(readings(ROWS)["ts"].max())}


def test_two_overlapping_backfills_at_once_equal_one(
    loaded_warehouse: str, checkpoint: Path
) -> None:
    url = loaded_warehouse
    a, b, c = (pd.Timestamp(f"2024-01-01 0{h}:00").to_pydatetime() for h in (1, 2, 4))
    first, second = (url, checkpoint, CHUNK_ROWS, a, c), (url, checkpoint, CHUNK_ROWS, b, c)
    run_together(backfill_all, first, second)
    assert_same_scores(stored_scores(url), clean_scores(url, checkpoint, a, c))
    assert watermarks(url) == {}


def test_a_training_run_keeps_its_files_while_another_trains(
    training_env: dict[str, str], api_url: str, monkeypatch: Any
) -> None:
    """The first run is held still (SIGSTOP) between calibration and registration while a second
    one runs from start to end; each registers the model it trained and evaluated."""
    home = Path(training_env["ATP_HOME"])
    first = CONTEXT.Process(target=train, args=(training_env, api_url, "anomaly_transformer"))
    first.start()
    deadline = time.monotonic() + 120
    while not any(home.glob("runs/**/model.ckpt")):
        assert first.is_alive() and time.monotonic() < deadline, "no calibrated checkpoint"
        time.sleep(POLL_SECONDS)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        run_together(train, (training_env, api_url, "max_z"))
    finally:
        os.kill(first.pid, signal.SIGCONT)
    first.join(120)
    assert first.exitcode == 0
    for name, value in training_env.items():
        monkeypatch.setenv(name, value)
    client = MlflowClient(training_env["MLFLOW_TRACKING_URI"])
    versions = client.search_model_versions(f"name = '{MODEL_NAME}'")
    assert len(versions) == 2
    for version in versions:
        run = client.get_run(version.run_id)
        assert version.tags[DETECTOR_TAG] == run.data.params["detector"]
        set_alias(MODEL_NAME, "check", int(version.version))
        loaded = load_model_version(MODEL_NAME, "check")  # its checksum verified
        assert loaded.extras["detector"] == run.data.params["detector"]
    assert sorted(p.name for p in (home / "runs" / "smd").iterdir()) == []
    assert {run.info.status for run in mlflow_runs(training_env)} == {"FINISHED"}


def _gated_version(client: MlflowClient, vus_pr: float) -> int:
    """A version whose run logged these honest test metrics."""
    experiment = client.get_experiment_by_name("gate") or client.get_experiment(
        client.create_experiment("gate")
    )
    run = client.create_run(experiment.experiment_id)
    client.log_metric(run.info.run_id, "test_vus_pr", vus_pr)
    client.log_metric(run.info.run_id, "test_fpr_normal", 0.001)
    uri = f"runs:/{run.info.run_id}/model"
    return int(client.create_model_version(MODEL_NAME, uri, run.info.run_id).version)


def test_two_promotion_gates_at_once_act_one_after_the_other(
    warehouse_url: str, mlflow_uri: str, tmp_path: Path, monkeypatch: Any
) -> None:
    """Two ``atp train --promote`` gating at once: the better model ends champion, and each
    decision compared with the champion it replaced or kept."""
    env = {
        "ATP_HOME": str(tmp_path / "home"),
        "ATP_WAREHOUSE_URL": warehouse_url,
        "MLFLOW_TRACKING_URI": mlflow_uri,
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    client = MlflowClient(mlflow_uri)
    client.create_registered_model(MODEL_NAME)
    champion = _gated_version(client, 0.40)
    set_alias(MODEL_NAME, CHAMPION, champion)
    better, good = _gated_version(client, 0.50), _gated_version(client, 0.45)
    run_together(gate, (env, better), (env, good))
    assert get_alias_version(MODEL_NAME, CHAMPION) == better
    decisions = {
        version: client.get_run(client.get_model_version(MODEL_NAME, str(version)).run_id)
        for version in (better, good)
    }
    replaced = [
        run.data.tags["gate.champion_version"]
        for run in decisions.values()
        if run.data.tags["gate.decision"] == "promoted"
    ]
    assert len(replaced) == len(set(replaced)), f"two promotions replaced {replaced}"
    assert decisions[better].data.tags["gate.decision"] == "promoted"
