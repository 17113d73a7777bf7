"""Scoring in partitions, mapped on a thread pool or a Dask cluster: the rows of one task.

The tests run real Prefect flow runs, a real MLflow registry and real Dask clusters, on SQLite and
on PostgreSQL; the champion is a tiny untrained network (what matters is that partitions write
what one task writes). The Dask tests use an in-process cluster through ``ATP_DASK_ADDRESS``; one
test runs the default temporary cluster of worker processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from itertools import combinations
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa
from distributed import LocalCluster

from flows.cli import _parser, _partitioning, main
from flows.scoring import backfill_flow, scoring_flow
from tasks.alarm_tables import anomaly_events, drift_flags
from tasks.errors import DataContractError
from tasks.partitions import split_entities
from tasks.registry import configure_tracking, log_and_register, set_alias
from tasks.scores_store import anomaly_scores, scoring_watermarks
from tasks.settings import get_settings
from tasks.warehouse import ensure_schema, get_engine, readings_table, upsert_readings
from tests.faults.fault_workers import SMD, T0, readings, save_tiny_checkpoint

ENTITIES = tuple(f"machine-{i}" for i in range(1, 6))
ROWS = 240
CHUNK_ROWS = 20  # twelve transactions per entity, so that partitions' writes interleave
TABLES = (anomaly_scores, scoring_watermarks, anomaly_events, drift_flags)
WRITE_TIMES = {"run_id", "scored_at", "updated_at", "checked_at"}


@pytest.fixture
def warehouse(atp_env: str, tmp_path: Path) -> str:
    """The warehouse under test with ``ROWS`` readings of each of ``ENTITIES``; a champion."""
    frame = readings(ROWS, ENTITIES)
    ensure_schema(atp_env, SMD)
    upsert_readings(atp_env, SMD, frame)
    save_tiny_checkpoint(tmp_path / "model.pt", frame)
    settings = get_settings()
    configure_tracking(settings.mlflow_tracking_uri, settings.artifact_root)
    registered = log_and_register(
        checkpoint_path=tmp_path / "model.pt",
        model_name=settings.model_name,
        run_name="tiny",
        params={},
        metrics={},
    )
    set_alias(settings.model_name, "champion", registered.version)
    return atp_env


@pytest.fixture
def dask_scheduler(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A running in-process Dask cluster of two workers, named by ``ATP_DASK_ADDRESS``."""
    with LocalCluster(
        processes=False, n_workers=2, threads_per_worker=1, dashboard_address=None
    ) as cluster:
        monkeypatch.setenv("ATP_DASK_ADDRESS", cluster.scheduler_address)
        yield cluster.scheduler_address


def snapshot(url: str) -> dict[str, pd.DataFrame]:
    """Every row scoring wrote, without run ids and write times, sorted."""
    frames = {}
    with get_engine(url).connect() as conn:
        for table in TABLES:
            columns = [c for c in table.c if c.name not in WRITE_TIMES]
            rows = conn.execute(sa.select(*columns).order_by(*table.primary_key.columns)).all()
            frames[table.name] = pd.DataFrame(rows, columns=[c.name for c in columns])
    return frames


def clear(url: str) -> None:
    with get_engine(url).begin() as conn:
        for table in TABLES:
            conn.execute(sa.delete(table))


def assert_same_rows(found: dict[str, pd.DataFrame], expected: dict[str, pd.DataFrame]) -> None:
    for name, frame in expected.items():
        pd.testing.assert_frame_equal(found[name], frame, check_exact=True, obj=name)


def write_spans(url: str, groups: list[tuple[str, ...]]) -> list[tuple[datetime, datetime]]:
    """First and last ``scored_at`` of each group of entities."""
    s = anomaly_scores.c
    with get_engine(url).connect() as conn:
        return [
            tuple(
                conn.execute(
                    sa.select(sa.func.min(s.scored_at), sa.func.max(s.scored_at)).where(
                        s.entity.in_(group)
                    )
                ).one()
            )
            for group in groups
        ]


@pytest.mark.parametrize("command", [["score"], ["backfill", "--start=2024-01-01"]])
def test_cli_partition_options_reach_the_flows(command: list[str]) -> None:
    args = _parser().parse_args([*command, "--partitions=4", "--task-runner=dask"])
    assert _partitioning(args) == {"partitions": 4, "task_runner": "dask"}
    assert _partitioning(_parser().parse_args(command)) == {}  # the flows' defaults
    with pytest.raises(SystemExit):
        _parser().parse_args([*command, "--partitions=0"])


def test_partitions_on_threads_write_exactly_the_rows_of_one_task(warehouse: str) -> None:
    single = scoring_flow(chunk_rows=CHUNK_ROWS)
    assert [(r.entity, r.scored) for r in single] == [(e, ROWS) for e in ENTITIES]
    expected = snapshot(warehouse)
    clear(warehouse)

    mapped = scoring_flow(chunk_rows=CHUNK_ROWS, partitions=3)
    assert mapped == single
    assert_same_rows(snapshot(warehouse), expected)
    # Two of the three partitions wrote at once (which two depends on how the threads start).
    spans = write_spans(warehouse, [tuple(g) for g in split_entities(ENTITIES, 3)])
    assert any(max(a[0], b[0]) < min(a[1], b[1]) for a, b in combinations(spans, 2)), spans

    start = pd.Timestamp(T0) + pd.Timedelta(minutes=50)
    assert main(["backfill", f"--start={start.isoformat()}", "--partitions=2"]) == 0
    assert_same_rows(snapshot(warehouse), expected)  # upserts: the same rows, none added


def test_partitions_on_a_dask_scheduler_write_exactly_the_rows_of_one_task(
    warehouse: str, dask_scheduler: str
) -> None:
    start = (pd.Timestamp(T0) + pd.Timedelta(minutes=30)).to_pydatetime()
    single = backfill_flow(start=start, chunk_rows=CHUNK_ROWS)
    expected = snapshot(warehouse)
    clear(warehouse)

    mapped = backfill_flow(start=start, chunk_rows=CHUNK_ROWS, partitions=2, task_runner="dask")
    assert mapped == single and [r.entity for r in mapped] == list(ENTITIES)
    assert_same_rows(snapshot(warehouse), expected)
    assert len(expected["anomaly_scores"]) == len(ENTITIES) * (ROWS - 30)


def test_a_bad_entity_fails_the_dask_run_after_every_other_partition_scored(
    warehouse: str, dask_scheduler: str
) -> None:
    table = readings_table(SMD, sa.MetaData())
    row = (table.c.entity == "machine-4") & (table.c.ts == pd.Timestamp(T0).to_pydatetime())
    with get_engine(warehouse).begin() as conn:  # a writer that bypassed ingest's validation
        conn.execute(sa.update(table).where(row).values(m01=99.0))
    with pytest.raises(DataContractError) as failure:
        scoring_flow(chunk_rows=CHUNK_ROWS, partitions=2, task_runner="dask")
    report = str(failure.value)
    assert report.startswith(
        "1 of 2 partitions rejected entities (entities scored by the other partitions: "
        "machine-1, machine-2, machine-3)"
    )
    assert "['machine-4']" in report and "(entities scored: machine-5)" in report
    assert "m01" in report and "99" in report
    scored = snapshot(warehouse)["anomaly_scores"]
    assert scored.groupby("entity").size().to_dict() == {
        e: ROWS for e in ENTITIES if e != "machine-4"
    }

    with get_engine(warehouse).begin() as conn:
        conn.execute(sa.update(table).where(row).values(m01=0.5))
    results = scoring_flow(chunk_rows=CHUNK_ROWS, partitions=2, task_runner="dask")
    assert [(r.entity, r.scored, r.note) for r in results] == [
        (e, ROWS, "") if e == "machine-4" else (e, 0, "up to date") for e in ENTITIES
    ]


@pytest.mark.parametrize("warehouse_url", ["sqlite"], indirect=True)
def test_the_default_dask_cluster_of_worker_processes_writes_the_rows_of_one_task(
    warehouse: str,
) -> None:
    single = scoring_flow(chunk_rows=CHUNK_ROWS)
    expected = snapshot(warehouse)
    clear(warehouse)

    assert get_settings().dask_address is None
    assert scoring_flow(chunk_rows=CHUNK_ROWS, partitions=2, task_runner="dask") == single
    assert_same_rows(snapshot(warehouse), expected)
