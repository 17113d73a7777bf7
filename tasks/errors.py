"""Domain errors that fail a run on purpose, and which failures are worth a retry."""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

if TYPE_CHECKING:
    from prefect.states import State

_SQLITE_BUSY = ("database is locked", "database table is locked", "database is busy")
PERMANENT_OS_ERRORS = (  # a retry cannot help
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)


class AtpError(Exception):
    """Base class of every error this pipeline raises on purpose."""

    transient = False  # a retry may succeed (set on errors that only report an outage)


class DataContractError(AtpError):
    """Input broke its data contract; ``report`` names the file, column, rule and examples."""

    def __init__(self, report: str) -> None:
        super().__init__(report)
        self.report = report


class IngestError(AtpError):
    """A source file cannot be read as its layout promises (ragged rows, label length, format)."""


class NoDataError(IngestError):
    """A source file holds no data rows (empty, blank or only a header); a loader of many files
    skips it and reports it, a loader that needs the file fails."""


class ModelRegistryError(AtpError):
    """No usable model: missing alias, missing or altered artifact."""


class QualityGateError(AtpError):
    """A challenger did not earn promotion."""


class WarehouseUnavailableError(AtpError):
    """The warehouse server cannot be reached (refused, timed out, gone); worth a retry."""

    transient = True


def _transient_here(error: BaseException) -> bool:
    if isinstance(error, sa.exc.DBAPIError):
        if error.connection_invalidated:
            return True
        if isinstance(error.orig, sqlite3.Error):  # SQLite also reports SQL errors as operational
            return any(busy in str(error.orig) for busy in _SQLITE_BUSY)
        return isinstance(error, sa.exc.OperationalError)  # lost connection, lock/deadlock timeout
    if isinstance(error, sa.exc.TimeoutError):  # no pooled connection came free in time
        return True
    if isinstance(error, OSError):
        return not isinstance(error, PERMANENT_OS_ERRORS)
    return getattr(error, "error_code", None) == "TEMPORARILY_UNAVAILABLE"  # MLflow server busy


def is_transient(error: BaseException | None) -> bool:
    """Whether a failure (or one that caused it) is an outage a retry may get past.

    Lost or refused connections, lock timeouts and busy servers are; bad data, SQL errors, missing
    files and every deliberate refusal (an ``AtpError`` not marked ``transient``) are not.
    """
    while error is not None:
        if isinstance(error, AtpError):
            return error.transient
        if _transient_here(error):
            return True
        error = error.__cause__
    return False


def retry_if_transient(_task: Any, _task_run: Any, state: State[Any]) -> bool:
    """Prefect ``retry_condition_fn``: retry a failed task run only after a transient failure."""
    return is_transient(state.result(raise_on_failure=False))


TRANSIENT_RETRIES: dict[str, Any] = {
    "retries": 3,
    "retry_delay_seconds": [2, 10, 30],
    "retry_condition_fn": retry_if_transient,
}
"""Task options for I/O against the warehouse or the registry: retry outages, nothing else."""
