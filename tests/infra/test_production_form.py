"""The production form on one machine, without Docker: servers on PostgreSQL, a scheduled worker.

``prefect server`` (API auth on) and ``mlflow server`` (lean: one worker, no job runner) run on
PostgreSQL databases on loopback; the warehouse has the least-privilege roles of
``infra/postgres``. The pipeline's code ingests as the owner role and trains and registers a tiny
model as the read-only training role; ``prefect deploy`` puts infra/prefect.yaml's ``score``
deployment on a short interval, and a process worker holding the scoring role runs it. New
readings arrive between two scheduled runs. The test checks the warehouse, the run states through
the Prefect API and the champion through the MLflow API, then pauses the schedule, lets the last
run finish and stops the worker before the servers.
"""

from __future__ import annotations

import gzip
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

from data_contracts import load_contract
from flows.params import (
    CalibrationParams,
    GateParams,
    ModelParams,
    TrainFlowParams,
    TrainingParams,
)
from tasks.load import ingest_smd
from tasks.warehouse import upsert_readings
from tests.infra.support import (
    REPO,
    Roles,
    Service,
    create_database,
    database_url,
    drop_database,
    free_port,
    start,
    wait_healthy,
)

pytestmark = pytest.mark.postgres

BIN = Path(sys.executable).parent
SMD = load_contract("smd")
MACHINES = ("machine-8-1", "machine-8-2")
TRAIN_ROWS, TEST_ROWS, NEW_ROWS = 500, 200, 40
MODEL = "prod-form-model"
INTERVAL_S = 5
WORKER_QUERY_S = 2  # how often the worker polls for runs to start
TINY = TrainFlowParams(
    models=[ModelParams(win_size=20, d_model=16, n_heads=2, e_layers=1, d_ff=16)],
    training=TrainingParams(max_epochs=1, max_steps=5, batch_size=32, stride=4, lr=1e-3),
    calibration=CalibrationParams(alpha=0.05),
    gate=GateParams(force=True),  # a 5-step model: the champion this test needs, not the gate's
    promote=True,
)
DEPLOY = ["deploy", "--prefect-file", "infra/prefect.yaml", "--name", "score", "--interval"]


@dataclass(frozen=True)
class Platform:
    """The running servers and what a client needs to reach them."""

    prefect_api: str
    prefect_auth: tuple[str, str]
    mlflow_uri: str
    logs: Path


def server_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), **extra}


@pytest.fixture
def platform(tmp_path: Path) -> Iterator[Platform]:
    """Prefect and MLflow servers on fresh PostgreSQL databases; stopped and dropped after."""
    suffix = secrets.token_hex(4)
    prefect_db, mlflow_db = f"atp_prefect_{suffix}", f"atp_mlflow_{suffix}"
    logs = tmp_path / "logs"
    logs.mkdir()
    for name in (prefect_db, mlflow_db):
        create_database(name)
    auth = ("atp", secrets.token_urlsafe(16))
    prefect_port, mlflow_port = free_port(), free_port()
    prefect = start(
        "prefect-server",
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1"]
        + ["--port", str(prefect_port), "--no-ui"],
        server_env(
            tmp_path,
            PREFECT_SERVER_DATABASE_CONNECTION_URL=database_url("asyncpg", prefect_db),
            PREFECT_SERVER_API_AUTH_STRING=":".join(auth),
            PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5",
        ),
        logs,
    )
    mlflow = start(
        "mlflow-server",
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port)]
        + ["--workers", "1", "--backend-store-uri", database_url("psycopg", mlflow_db)]
        + ["--artifacts-destination", (tmp_path / "artifacts").as_uri()],
        server_env(tmp_path, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
        logs,
    )
    try:
        wait_healthy(prefect, f"http://127.0.0.1:{prefect_port}/api/health")
        wait_healthy(mlflow, f"http://127.0.0.1:{mlflow_port}/health")
        yield Platform(
            f"http://127.0.0.1:{prefect_port}/api", auth, f"http://127.0.0.1:{mlflow_port}", logs
        )
    finally:
        prefect.stop()
        mlflow.stop()
        for name in (prefect_db, mlflow_db):
            drop_database(name)


def client_env(platform: Platform, warehouse_url: str, home: Path) -> dict[str, str]:
    """A worker's environment: the servers' addresses and its own warehouse role."""
    return {
        **os.environ,
        "PREFECT_API_URL": platform.prefect_api,
        "PREFECT_API_AUTH_STRING": ":".join(platform.prefect_auth),
        "PREFECT_HOME": str(home / "prefect-client"),
        "PREFECT_WORKER_QUERY_SECONDS": str(WORKER_QUERY_S),
        "ATP_PROJECT_DIR": str(REPO),
        "MLFLOW_TRACKING_URI": platform.mlflow_uri,
        "ATP_HOME": str(home / "atp"),
        "ATP_MODEL_NAME": MODEL,
        "ATP_WAREHOUSE_URL": warehouse_url,
    }


def train_and_promote(
    platform: Platform, training_url: str, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The training flow in this process, as the read-only role, against both servers."""
    from flows.training import training_flow

    for key, value in client_env(platform, training_url, home).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr("mlflow.tracking._tracking_service.utils._tracking_uri", None)
    api = {
        PREFECT_API_URL: platform.prefect_api,
        PREFECT_API_AUTH_STRING: ":".join(platform.prefect_auth),
    }
    with temporary_settings(updates=api):
        summary = training_flow(TINY)
    assert summary.version == 1


def deploy_scoring(platform: Platform, env: dict[str, str], worker: Service) -> None:
    """``prefect deploy`` of infra/prefect.yaml's score deployment, on a short interval."""
    pool = f"{platform.prefect_api}/work_pools/atp-scoring"
    deadline = time.monotonic() + 60
    while httpx.get(pool, auth=platform.prefect_auth).status_code != 200:
        assert time.monotonic() < deadline, f"the worker made no pool:\n{worker.tail()}"
        time.sleep(1)
    command = [str(BIN / "prefect"), "--no-prompt", *DEPLOY, str(INTERVAL_S)]
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"prefect deploy:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"


def write_smd(root: Path) -> None:
    """A small SMD layout: sine readings per machine, a labelled level shift in the test part."""
    rng = np.random.default_rng(7)
    for name in MACHINES:
        t = np.arange(TRAIN_ROWS + TEST_ROWS)
        phases = rng.uniform(0, 2 * np.pi, len(SMD.sensor_names))
        values = 0.5 + 0.3 * np.sin(2 * np.pi * t[:, None] / 40 + phases)
        values = np.clip(values + rng.normal(0, 0.02, values.shape), 0, 1)
        values[TRAIN_ROWS + 100 : TRAIN_ROWS + 120, :4] = 1.0
        for part, rows in (("train", values[:TRAIN_ROWS]), ("test", values[TRAIN_ROWS:])):
            (root / part).mkdir(parents=True, exist_ok=True)
            with gzip.open(root / part / f"{name}.txt.gz", "wt") as handle:
                handle.write("\n".join(",".join(f"{v:.4f}" for v in row) for row in rows) + "\n")
        labels = np.zeros(TEST_ROWS, dtype=int)
        labels[100:120] = 1
        (root / "test_label").mkdir(exist_ok=True)
        (root / "test_label" / f"{name}.txt").write_text("\n".join(map(str, labels)) + "\n")


def bootstrap_as_owner(roles: Roles, smd: Path) -> None:
    """The owner creates every table and loads the history; scoring and training create nothing."""
    ingest_smd(roles.url_for("owner"), smd)


def append_readings(owner: sa.Engine, entity: str, n: int) -> None:
    """``n`` new one-minute rows after the entity's last reading (unlabelled, as live data is)."""
    query = "SELECT * FROM smd_readings WHERE entity = %(e)s ORDER BY ts DESC LIMIT %(n)s"
    last = pd.read_sql(query, owner, params={"e": entity, "n": n}).iloc[::-1]
    step = pd.Timedelta(minutes=1)
    start = last["ts"].max() + step
    new = last.assign(ts=pd.date_range(start, periods=n, freq=step), label=pd.NA)
    assert upsert_readings(owner, SMD, new.astype({"label": "Int64"})) == n


def scheduled_runs(platform: Platform) -> list[dict[str, object]]:
    """Flow runs created by a deployment's schedule, through the authenticated API."""
    body = {"flow_runs": {"deployment_id": {"is_null_": False}}, "sort": "START_TIME_ASC"}
    response = httpx.post(
        f"{platform.prefect_api}/flow_runs/filter", json=body, auth=platform.prefect_auth
    )
    response.raise_for_status()
    return [run for run in response.json() if run["state_type"] != "SCHEDULED"]


def wait_for_runs(platform: Platform, worker: Service, completed: int, timeout: float) -> list[str]:
    """Ids of the completed scheduled runs once there are ``completed``; no run may fail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = scheduled_runs(platform)
        failed = [r for r in runs if r["state_type"] in ("FAILED", "CRASHED", "CANCELLED")]
        assert not failed, f"{failed[0]['state_name']} run; worker log:\n{worker.tail(60)}"
        done = [str(r["id"]) for r in runs if r["state_type"] == "COMPLETED"]
        if len(done) >= completed:
            return done
        time.sleep(1)
    pytest.fail(f"fewer than {completed} completed scheduled runs; worker log:\n{worker.tail(60)}")


def pause_and_drain(platform: Platform, worker: Service, timeout: float = 60) -> None:
    """Pause the deployment's schedule, then wait until no run is pending or running."""
    runs = scheduled_runs(platform)
    deployment = runs[0]["deployment_id"]
    url = f"{platform.prefect_api}/deployments/{deployment}/pause_deployment"
    httpx.post(url, auth=platform.prefect_auth).raise_for_status()
    # A run's process outlives its COMPLETED state by a moment (a SIGTERM then can hang the
    # worker), and a run fetched just before the pause turns PENDING at the worker's next poll.
    time.sleep(2 * WORKER_QUERY_S + 1)
    deadline = time.monotonic() + timeout
    while any(r["state_type"] in ("PENDING", "RUNNING") for r in scheduled_runs(platform)):
        assert time.monotonic() < deadline, f"runs still in flight; worker log:\n{worker.tail(60)}"
        time.sleep(1)


def warehouse_facts(admin_url: str) -> dict[str, object]:
    engine = sa.create_engine(admin_url)
    with engine.connect() as conn:
        one = lambda sql: conn.exec_driver_sql(sql).scalar_one()  # noqa: E731
        facts = {
            "readings": one("SELECT count(*) FROM smd_readings"),
            "scores": one("SELECT count(*) FROM anomaly_scores"),
            "scored_points": one("SELECT count(DISTINCT (entity, ts)) FROM anomaly_scores"),
            "versions": one("SELECT string_agg(DISTINCT model_version, ',') FROM anomaly_scores"),
            "run_ids": set(conn.exec_driver_sql("SELECT DISTINCT run_id FROM anomaly_scores")),
            "behind": one(
                "SELECT count(*) FROM (SELECT entity, max(ts) AS ts FROM smd_readings GROUP BY"
                " entity) r LEFT JOIN scoring_watermarks w USING (entity)"
                " WHERE w.last_ts IS DISTINCT FROM r.ts"
            ),
        }
    engine.dispose()
    facts["run_ids"] = {str(row[0]) for row in facts["run_ids"]}  # type: ignore[attr-defined]
    return facts


def test_scheduled_scoring_runs_on_a_worker_against_the_servers(
    platform: Platform, warehouse_roles: Roles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    unauthenticated = httpx.post(f"{platform.prefect_api}/flow_runs/filter", json={})
    assert unauthenticated.status_code == 401

    write_smd(tmp_path / "smd")
    bootstrap_as_owner(warehouse_roles, tmp_path / "smd")
    env = client_env(platform, warehouse_roles.url_for("scoring"), tmp_path)
    command = [str(BIN / "prefect"), "worker", "start", "--pool", "atp-scoring"]
    worker = start("worker", [*command, "--type", "process", "--limit", "1"], env, platform.logs)
    admin_url = warehouse_roles.url.render_as_string(hide_password=False)
    expected = (TRAIN_ROWS + TEST_ROWS) * len(MACHINES) + NEW_ROWS
    try:
        train_and_promote(platform, warehouse_roles.url_for("training"), tmp_path, monkeypatch)
        alias = httpx.get(
            f"{platform.mlflow_uri}/api/2.0/mlflow/registered-models/alias",
            params={"name": MODEL, "alias": "champion"},
        )
        assert alias.json()["model_version"]["version"] == "1"
        deploy_scoring(platform, env, worker)
        wait_for_runs(platform, worker, completed=1, timeout=120)
        owner = warehouse_roles.engine("owner")
        append_readings(owner, MACHINES[0], NEW_ROWS)
        owner.dispose()
        deadline = time.monotonic() + 90
        while warehouse_facts(admin_url)["scores"] < expected:
            assert time.monotonic() < deadline, f"new rows not scored:\n{worker.tail(60)}"
            time.sleep(1)
        wait_for_runs(platform, worker, completed=2, timeout=60)
        pause_and_drain(platform, worker)
    finally:
        # Prefect's process worker waits for its runs' processes on SIGTERM; after the rest of
        # the suite it has hung there past 20 s in CI (root cause open; the warning it then
        # gives holds its group's processes and Python stacks). Its writes are transactional
        # (tests/faults kill scoring mid-write), so a SIGKILL then loses nothing.
        worker.stop(must_exit_on_sigterm=False)
    runs = scheduled_runs(platform)
    assert {r["state_type"] for r in runs} == {"COMPLETED"}
    facts = warehouse_facts(admin_url)
    assert facts["readings"] == facts["scores"] == facts["scored_points"] == expected
    assert facts["behind"] == 0 and facts["versions"] == "1"
    assert len(facts["run_ids"]) >= 2 and facts["run_ids"] <= {str(r["id"]) for r in runs}
