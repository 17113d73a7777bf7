"""The warehouse's least-privilege roles (infra/postgres/warehouse-roles.sql) on real PostgreSQL.

The SQL file is applied with psql, as the warehouse container's init hook does, to a fresh
database; the pipeline's own code then creates the tables as the owner role, and every role is
held to its part: scoring reads readings and writes only the results tables, training only reads.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from data_contracts import load_contract
from tasks.warehouse import ensure_schema, upsert_readings
from tests.infra.support import Roles

pytestmark = pytest.mark.postgres

INSUFFICIENT_PRIVILEGE = "42501"
READ_ONLY_TRANSACTION = "25006"
SMD = load_contract("smd")


def readings(n: int = 5) -> pd.DataFrame:
    frame = pd.DataFrame(np.full((n, len(SMD.sensor_names)), 0.5), columns=SMD.sensor_names)
    frame.insert(0, "entity", "machine-1")
    frame.insert(1, "ts", pd.date_range("2024-01-01", periods=n, freq="60s"))
    frame["label"] = pd.array([None] * n, dtype="Int64")
    return frame


@dataclass(frozen=True)
class Engines:
    """One engine per role."""

    owner: sa.Engine
    scoring: sa.Engine
    training: sa.Engine


@pytest.fixture
def engines(warehouse_roles: Roles) -> Iterator[Engines]:
    made = Engines(*(warehouse_roles.engine(part) for part in ("owner", "scoring", "training")))
    yield made
    for engine in (made.owner, made.scoring, made.training):
        engine.dispose()


@pytest.fixture
def loaded(engines: Engines) -> Engines:
    """The owner creates the tables and loads readings through the pipeline's own code."""
    ensure_schema(engines.owner, SMD)
    assert upsert_readings(engines.owner, SMD, readings()) == 5
    return engines


def run(engine: sa.Engine, statement: str, *, read_write: bool = False) -> None:
    with engine.begin() as conn:
        if read_write:
            conn.exec_driver_sql("SET TRANSACTION READ WRITE")
        conn.exec_driver_sql(statement)


def refusal(engine: sa.Engine, statement: str, *, read_write: bool = False) -> str:
    """The SQLSTATE of the error that refused ``statement`` (fails if it was allowed)."""
    with pytest.raises(sa.exc.DBAPIError) as caught:
        run(engine, statement, read_write=read_write)
    return str(caught.value.orig.sqlstate)


COPY_NOTHING = "INSERT INTO {0} SELECT * FROM {0} WHERE false"  # needs INSERT and SELECT
UPDATE_NOTHING = "UPDATE {0} SET entity = entity WHERE false"  # needs UPDATE


def test_scoring_reads_readings_and_writes_only_the_results_tables(loaded: Engines) -> None:
    with loaded.scoring.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM smd_readings").scalar() == 5
    for table in ("anomaly_scores", "scoring_watermarks"):
        run(loaded.scoring, COPY_NOTHING.format(table))
        run(loaded.scoring, UPDATE_NOTHING.format(table))
        run(loaded.scoring, f"DELETE FROM {table} WHERE false")
    denied = [
        COPY_NOTHING.format("smd_readings"),
        UPDATE_NOTHING.format("smd_readings"),
        "DELETE FROM smd_readings",
        "TRUNCATE smd_readings",
        "SELECT * FROM ingest_log",
        "CREATE TABLE public.intruder (x int)",
        "DROP TABLE anomaly_scores",
    ]
    for statement in denied:
        assert refusal(loaded.scoring, statement) == INSUFFICIENT_PRIVILEGE, statement
    run(loaded.scoring, "CREATE TEMPORARY TABLE stage_probe (x int)")  # the loaders' stage tables


def test_training_reads_and_cannot_write_at_all(loaded: Engines) -> None:
    with loaded.training.connect() as conn:
        for table in ("smd_readings", "anomaly_scores", "scoring_watermarks"):
            conn.exec_driver_sql(f"SELECT count(*) FROM {table}").scalar()
    writes = [
        *(COPY_NOTHING.format(t) for t in ("smd_readings", "anomaly_scores", "scoring_watermarks")),
        UPDATE_NOTHING.format("anomaly_scores"),
        "DELETE FROM smd_readings",
        "CREATE TABLE public.intruder (x int)",
        "CREATE TEMPORARY TABLE stage_probe (x int)",
    ]
    for statement in writes:
        assert refusal(loaded.training, statement) == READ_ONLY_TRANSACTION, statement
        denied = refusal(loaded.training, statement, read_write=True)
        assert denied == INSUFFICIENT_PRIVILEGE, statement
    with pytest.raises(sa.exc.DBAPIError, match="read-only transaction"):
        upsert_readings(loaded.training, SMD, readings(7))


def test_other_roles_cannot_connect_and_the_owner_keeps_ingest_log(
    warehouse_roles: Roles, loaded: Engines
) -> None:
    stranger = f"atp_stranger_{secrets.token_hex(4)}"
    admin = sa.create_engine(warehouse_roles.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE ROLE "{stranger}" LOGIN')
    engine = sa.create_engine(warehouse_roles.url.set(username=stranger))
    try:
        with pytest.raises(sa.exc.OperationalError, match="permission denied for database"):
            engine.connect().close()
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP ROLE "{stranger}"')
        admin.dispose()
    with loaded.owner.begin() as conn:
        conn.exec_driver_sql("SELECT count(*) FROM ingest_log")
        assert conn.exec_driver_sql("SELECT count(*) FROM atp_roles").scalar() == 2
