"""Only outages are retried; an unreachable warehouse fails with a clear message, no password."""

from __future__ import annotations

import sqlite3

import pytest
import sqlalchemy as sa
from fault_workers import SMD

from tasks.errors import (
    DataContractError,
    ModelRegistryError,
    WarehouseUnavailableError,
    is_transient,
)
from tasks.events import list_events
from tasks.warehouse import list_entities, list_entities_task

DEAD_URL = "postgresql+psycopg://postgres:s3cret@127.0.0.1:9/atp"  # port 9: nothing listens


def test_outages_are_transient_and_refusals_are_not() -> None:
    locked = sa.exc.OperationalError("INSERT", {}, sqlite3.OperationalError("database is locked"))
    no_table = sa.exc.OperationalError("SELECT", {}, sqlite3.OperationalError("no such table: x"))
    lost = sa.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection"))
    assert is_transient(locked) and is_transient(lost) and is_transient(ConnectionResetError())
    assert is_transient(WarehouseUnavailableError("down"))
    for error in (
        no_table,
        DataContractError("bad"),
        ModelRegistryError("altered"),
        FileNotFoundError("x"),
        sa.exc.IntegrityError("INSERT", {}, Exception()),
        None,
    ):
        assert not is_transient(error)
    wrapped = ModelRegistryError("refused")
    wrapped.__cause__ = ConnectionResetError()
    assert not is_transient(wrapped)


@pytest.mark.postgres
def test_an_unreachable_warehouse_fails_clearly_without_the_password() -> None:
    with pytest.raises(WarehouseUnavailableError) as caught:
        list_entities(DEAD_URL, SMD)
    message = str(caught.value)
    assert "127.0.0.1:9" in message and "***" in message and "s3cret" not in message
    assert "\n" not in message  # the CLI's one-line refusal
    assert is_transient(caught.value)
    assert list_entities_task.retries == 3 and list_entities_task.retry_condition_fn is not None
    with pytest.raises(WarehouseUnavailableError, match="127.0.0.1:9"):
        list_events(DEAD_URL)
