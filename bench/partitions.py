"""Scoring in partitions: scoring_flow's wall time per partitions x task runner, SQLite.

N entities x one day of minute data, the load test's small model registered as champion in a
temporary MLflow store, the flow run through a temporary Prefect server. Each configuration
scores everything from scratch. The standing cluster is a LocalCluster of two worker processes
started here and reached through ATP_DASK_ADDRESS (its first run pays the workers' imports).

    nice -n 10 .venv/bin/python bench/partitions.py --entities 40
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "faults"))
from fault_workers import SMD, readings, save_tiny_checkpoint  # noqa: E402

MINUTES_PER_DAY = 1440
SCORING_TABLES = ("anomaly_scores", "scoring_watermarks", "anomaly_events", "drift_flags")


def _champion(tmp: Path, entities: int) -> None:
    from tasks.registry import configure_tracking, log_and_register, set_alias
    from tasks.settings import get_settings
    from tasks.warehouse import ensure_schema, upsert_readings

    settings = get_settings()
    frame = readings(MINUTES_PER_DAY, tuple(f"machine-{i}" for i in range(entities)))
    ensure_schema(settings.warehouse_url, SMD)
    upsert_readings(settings.warehouse_url, SMD, frame)
    save_tiny_checkpoint(tmp / "model.pt", frame)
    configure_tracking(settings.mlflow_tracking_uri, settings.artifact_root)
    version = log_and_register(
        checkpoint_path=tmp / "model.pt",
        model_name=settings.model_name,
        run_name="partitions-bench",
        params={},
        metrics={},
    ).version
    set_alias(settings.model_name, "champion", version)


def _timed(label: str, partitions: int, task_runner: str) -> None:
    from flows.scoring import scoring_flow
    from tasks.settings import get_settings
    from tasks.warehouse import get_engine

    with get_engine(get_settings().warehouse_url).begin() as conn:
        for table in SCORING_TABLES:
            conn.execute(sa.delete(sa.table(table)))
    started = time.perf_counter()
    points = sum(r.scored for r in scoring_flow(partitions=partitions, task_runner=task_runner))
    wall = time.perf_counter() - started
    print(f"{label}: {points} points in {wall:.1f} s = {points / wall:,.0f} points/s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entities", type=int, default=40)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="atp-partitions-"))
    os.environ.update(
        ATP_HOME=str(tmp / "home"),
        ATP_WAREHOUSE_URL=f"sqlite:///{tmp / 'warehouse.db'}",
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}",
        ATP_MODEL_NAME="partitions-bench",
    )
    os.environ.pop("ATP_DASK_ADDRESS", None)
    from distributed import LocalCluster
    from prefect.testing.utilities import prefect_test_harness

    from tasks.settings import apply_quiet_defaults

    apply_quiet_defaults()
    _champion(tmp, args.entities)
    with prefect_test_harness(server_startup_timeout=180):
        _timed("1 partition, threads", 1, "threads")
        _timed("2 partitions, threads", 2, "threads")
        _timed("2 partitions, dask, temporary local cluster", 2, "dask")
        with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster:
            os.environ["ATP_DASK_ADDRESS"] = cluster.scheduler_address
            _timed("2 partitions, dask, standing 2-worker cluster, cold", 2, "dask")
            _timed("2 partitions, dask, standing 2-worker cluster, warm", 2, "dask")


if __name__ == "__main__":
    main()
