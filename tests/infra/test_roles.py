"""The warehouse's least-privilege roles (infra/postgres/warehouse-roles.sql) on real PostgreSQL.

The SQL file is applied with psql, as the warehouse container's init hook does, to a fresh
database; the pipeline's own code then creates the tables as the owner role, and every role is
held to its part: scoring reads readings and writes only the results tables, training only reads.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from data_contracts import load_contract
from tasks.warehouse import ensure_schema, upsert_readings

pytestmark = pytest.mark.postgres

ROLES_SQL = Path(__file__).parents[2] / "infra" / "postgres" / "warehouse-roles.sql"
INSUFFICIENT_PRIVILEGE = "42501"
READ_ONLY_TRANSACTION = "25006"
SMD = load_contract("smd")


@dataclass(frozen=True)
class Roles:
    """Engines connected as each role (trust auth on loopback: passwords are not checked)."""

    owner: sa.Engine
    scoring: sa.Engine
    training: sa.Engine
    url: sa.URL


def apply_roles_sql(database_url: str, names: dict[str, str]) -> None:
    """Run the init SQL with psql, role names and passwords from the environment."""
    url = sa.make_url(database_url)
    env = {
        **os.environ,
        "PGHOST": url.host or "127.0.0.1",
        "PGPORT": str(url.port or 5432),
        "PGUSER": url.username or "postgres",
        "PGDATABASE": url.database or "",
    }
    for part, name in names.items():
        env[f"ATP_{part.upper()}_ROLE"] = name
        env[f"ATP_{part.upper()}_PASSWORD"] = secrets.token_urlsafe(12)
    subprocess.run(
        ["psql", "-q", "-f", str(ROLES_SQL)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )


def drop_roles(admin_url: str, names: list[str]) -> None:
    engine = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        for name in names:
            conn.exec_driver_sql(f'DROP OWNED BY "{name}" CASCADE')
            conn.exec_driver_sql(f'DROP ROLE "{name}"')
    engine.dispose()


@pytest.fixture
def roles(postgres_url: str) -> Iterator[Roles]:
    """Fresh roles (unique names: roles are cluster-wide) in a fresh database, dropped after."""
    suffix = secrets.token_hex(4)
    names = {part: f"atp_{part}_{suffix}" for part in ("owner", "scoring", "training")}
    apply_roles_sql(postgres_url, names)
    url = sa.make_url(postgres_url)
    engines = {part: sa.create_engine(url.set(username=name)) for part, name in names.items()}
    try:
        yield Roles(**engines, url=url)
    finally:
        for engine in engines.values():
            engine.dispose()
        drop_roles(postgres_url, list(names.values()))


def readings(n: int = 5) -> pd.DataFrame:
    frame = pd.DataFrame(np.full((n, len(SMD.sensor_names)), 0.5), columns=SMD.sensor_names)
    frame.insert(0, "entity", "machine-1")
    frame.insert(1, "ts", pd.date_range("2024-01-01", periods=n, freq="60s"))
    frame["label"] = pd.array([None] * n, dtype="Int64")
    return frame


@pytest.fixture
def loaded(roles: Roles) -> Roles:
    """The owner creates the tables and loads readings through the pipeline's own code."""
    ensure_schema(roles.owner, SMD)
    assert upsert_readings(roles.owner, SMD, readings()) == 5
    return roles


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


def test_scoring_reads_readings_and_writes_only_the_results_tables(loaded: Roles) -> None:
    with loaded.scoring.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM smd_readings").scalar() == 5
    for table in ("anomaly_scores", "scoring_watermarks"):
        run(loaded.scoring, COPY_NOTHING.format(table))
        run(loaded.scoring, UPDATE_NOTHING.format(table))
        assert refusal(loaded.scoring, f"DELETE FROM {table}") == INSUFFICIENT_PRIVILEGE
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


def test_training_reads_and_cannot_write_at_all(loaded: Roles) -> None:
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


def test_other_roles_cannot_connect_and_the_owner_keeps_ingest_log(roles: Roles) -> None:
    stranger = f"atp_stranger_{secrets.token_hex(4)}"
    admin = sa.create_engine(roles.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE ROLE "{stranger}" LOGIN')
    engine = sa.create_engine(roles.url.set(username=stranger))
    try:
        with pytest.raises(sa.exc.OperationalError, match="permission denied for database"):
            engine.connect().close()
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP ROLE "{stranger}"')
        admin.dispose()
    ensure_schema(roles.owner, SMD)
    with roles.owner.begin() as conn:
        conn.exec_driver_sql("SELECT count(*) FROM ingest_log")
        assert conn.exec_driver_sql("SELECT count(*) FROM atp_roles").scalar() == 2
