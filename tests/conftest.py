"""Shared fixtures: a SQLite warehouse in a temporary file, a fresh PostgreSQL database, a fresh
MLflow tracking store."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from tasks.settings import apply_quiet_defaults

POSTGRES_ADMIN_URL = os.environ.get(
    "ATP_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


def pytest_configure(config: pytest.Config) -> None:
    """Telemetry off before any test module imports Prefect or MLflow."""
    apply_quiet_defaults()


@pytest.fixture(scope="session", autouse=True)
def scratch_atp_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """State written by tests that set no ATP_HOME (validation's Data Docs pages) stays out of
    the developer's ./.atp: a temporary ATP_HOME for the session; tests may set their own."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ATP_HOME", str(tmp_path_factory.mktemp("atp-home")))
        yield


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite warehouse in a file of its own."""
    return f"sqlite:///{tmp_path / 'warehouse.db'}"


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[None]:
    """One temporary Prefect server and database for the session (its workers' start takes
    seconds). Flow-run heartbeats are off: they detect crashed runs of deployments, and a run's
    end waits up to a second for the heartbeat thread (the production-form worker keeps them)."""
    from prefect.settings import temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    no_heartbeats = temporary_settings(updates={"flows.heartbeat_frequency": None})
    with prefect_test_harness(server_startup_timeout=120), no_heartbeats:
        yield


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow SQLite store, created and migrated once per session by MLflow itself."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_uri(tmp_path: Path, mlflow_template: Path) -> str:
    """A fresh MLflow tracking store of this test: a copy of the empty migrated one (migrating a
    new store takes seconds; the first-run path is covered by the MLflow UI and production-form
    tests, which start from nothing)."""
    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database ``atp_test_<worker>_<random>``, dropped afterwards.

    Fails (never skips) when the server is unreachable: postgres tests must run in CI. A test that
    uses it directly marks itself ``@pytest.mark.postgres``; ``warehouse_url`` does so itself.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")  # gw0, gw1, ... under pytest-xdist
    name = f"atp_test_{worker}_{secrets.token_hex(6)}"
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except sa.exc.OperationalError as error:
        admin.dispose()
        pytest.fail(f"PostgreSQL at {admin.url!r} is unreachable: {error}", pytrace=False)
    try:
        yield admin.url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def warehouse_url(request: pytest.FixtureRequest) -> str:
    """Each warehouse backend in turn: the test runs on SQLite and on PostgreSQL."""
    return str(request.getfixturevalue(f"{request.param}_url"))
