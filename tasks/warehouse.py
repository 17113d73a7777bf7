"""The warehouse: readings tables declared from contracts, idempotent loads, reads, the ingest log.

SQLite (default) and PostgreSQL (production) behave alike:

- Readings are immutable. Loading rows already stored with the same values changes nothing; a row
  that contradicts a stored one (same entity and ts, other values, a label included) raises
  DataContractError and nothing of that load is written. Corrections need an explicit delete.
- A load is one transaction: staged in bulk, then moved with one ``INSERT ... SELECT ... ON
  CONFLICT DO NOTHING`` in key order (``tasks/staging.py``), so a load killed midway leaves nothing
  and two loads of the same rows at once leave one copy. Scores live in ``tasks/scores_store.py``.
- On SQLite every transaction starts with ``BEGIN IMMEDIATE`` (writers queue on ``busy_timeout``
  instead of failing to upgrade a read lock); the read helpers here use ``BEGIN DEFERRED``, so in
  WAL mode they never wait for a writer.
- Loaders and readers take a URL or an Engine (a transaction of their own) or a Connection (the
  caller's transaction, ``with engine.begin() as conn``), so that several writes commit together.
- A server that cannot be reached raises WarehouseUnavailableError naming it (without its
  password); the I/O task wrappers retry that, and only transient failures, with backoff.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pandas as pd
import sqlalchemy as sa
from prefect import task
from prefect.cache_policies import NO_CACHE
from sqlalchemy.engine import Connection, Engine

from data_contracts.contract import Contract, check_identifier
from tasks import alarm_tables, scores_store
from tasks.errors import (
    TRANSIENT_RETRIES,
    AtpError,
    DataContractError,
    WarehouseUnavailableError,
)
from tasks.staging import dialect_insert, naive_utc, stage_frame

SQLITE_BUSY_TIMEOUT_MS = 60_000
READ_ONLY = "atp_read_only"  # execution option: this SQLite transaction only reads (BEGIN DEFERRED)
_SCHEMA_LOCK = 0x41545053  # PostgreSQL advisory lock key that serialises ensure_schema
METADATA = sa.MetaData()
_ENGINES: dict[str, Engine] = {}
_ENGINES_LOCK = threading.Lock()
Bind = Engine | Connection | str
_URL_FORMS = "use sqlite:///PATH or postgresql+psycopg://USER@HOST[:PORT]/DATABASE"

ingest_log = sa.Table(
    "ingest_log",
    METADATA,
    sa.Column("source", sa.String, primary_key=True),
    sa.Column("file_sha256", sa.String, primary_key=True),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("rows", sa.Integer, nullable=False),
    sa.Column("loaded_at", sa.DateTime, nullable=False),
)


@dataclass(frozen=True)
class EntityBounds:
    """What one entity holds: first/last timestamp, row count, first labelled timestamp."""

    entity: str
    first_ts: datetime
    last_ts: datetime
    rows: int
    first_labelled_ts: datetime | None


def get_engine(url: str) -> Engine:
    """The process's engine for ``url`` (cached); see :func:`warehouse_url`."""
    with _ENGINES_LOCK:
        if url not in _ENGINES:
            _ENGINES[url] = _create_engine(url)
        return _ENGINES[url]


def warehouse_url(url: str) -> sa.URL:
    """``url`` parsed, ``postgresql://`` and ``postgres://`` as psycopg 3.

    Raises:
        AtpError: not a SQLAlchemy URL, or a database other than SQLite and PostgreSQL (the
            text is not repeated when it does not parse: it may hold a password).
    """
    try:
        parsed = sa.make_url(url)
    except (sa.exc.ArgumentError, ValueError):
        raise AtpError(
            f"the warehouse URL is not a SQLAlchemy URL: {_URL_FORMS} (ATP_WAREHOUSE_URL)"
        ) from None
    backend, _, driver = parsed.drivername.partition("+")
    if backend in ("postgresql", "postgres") and driver in ("", "psycopg"):
        return parsed.set(drivername="postgresql+psycopg")
    if parsed.drivername in ("sqlite", "sqlite+pysqlite"):
        return parsed
    raise AtpError(
        f"the warehouse at {redacted_url(parsed)} is not supported: {_URL_FORMS} "
        "(ATP_WAREHOUSE_URL)"
    )


def _create_engine(url: str) -> Engine:
    parsed = warehouse_url(url)
    if parsed.get_backend_name() != "sqlite":
        return sa.create_engine(parsed, pool_pre_ping=True)
    engine = sa.create_engine(parsed)
    sa.event.listen(engine, "connect", _sqlite_connect)
    sa.event.listen(engine, "begin", _sqlite_begin)
    return engine


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # the driver emits no BEGIN: _sqlite_begin does
    cursor = dbapi_connection.cursor()
    for pragma in (
        f"busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}",
        "foreign_keys = ON",
        "synchronous = NORMAL",
    ):
        cursor.execute(f"PRAGMA {pragma}")
    _use_wal(cursor)
    cursor.close()


def _use_wal(cursor: Any) -> None:
    """Switch the database file to WAL once; it stays WAL for every later connection.

    The switch needs the file to itself and SQLite answers "database is locked" at once instead
    of waiting, so two processes opening a new database retry until the busy timeout.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() not in ("wal", "memory"):
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _sqlite_begin(conn: Connection) -> None:
    read_only = conn.get_execution_options().get(READ_ONLY, False)
    conn.exec_driver_sql("BEGIN DEFERRED" if read_only else "BEGIN IMMEDIATE")


def _after_fork_in_child() -> None:
    """A forked child must not use its parent's pooled connections: drop them unclosed."""
    global _ENGINES_LOCK
    _ENGINES_LOCK = threading.Lock()
    for engine in _ENGINES.values():
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_after_fork_in_child)


def redacted_url(url: str | sa.URL) -> str:
    """``url`` for messages and logs: the password shown as ``***``."""
    return sa.make_url(url).render_as_string(hide_password=True)


def connect(engine: Engine) -> Connection:
    """A connection from ``engine``; WarehouseUnavailableError (transient) if the server is away."""
    try:
        return engine.connect()
    except sa.exc.OperationalError as error:
        reason = " ".join(str(error.orig).split())  # libpq's message spans lines
        raise WarehouseUnavailableError(
            f"the warehouse at {redacted_url(engine.url)} cannot be reached: {reason}"
        ) from error


@contextmanager
def _transaction(bind: Bind, read_only: bool = False) -> Iterator[Connection]:
    """The caller's connection as is, or a new transaction (committed on success)."""
    if isinstance(bind, Connection):
        yield bind
        return
    engine = get_engine(bind) if isinstance(bind, str) else bind
    with connect(engine) as conn, conn.execution_options(**{READ_ONLY: read_only}).begin():
        yield conn


def read_transaction(bind: Bind) -> AbstractContextManager[Connection]:
    """A transaction that only reads; on SQLite it reads a snapshot and never waits for a writer."""
    return _transaction(bind, read_only=True)


@contextmanager
def _reading(bind: Bind, contract: Contract) -> Iterator[Connection]:
    """A read transaction on ``contract``'s readings; AtpError if a read fails because the source
    was never loaded (the table is looked up only then, not before every read)."""
    with read_transaction(bind) as conn:
        try:
            yield conn
        except sa.exc.DBAPIError as error:
            if _table_is_missing(conn.engine, contract.table_name):
                raise AtpError(
                    f"no readings of source {contract.name!r} in the warehouse (no table "
                    f"{contract.table_name}): load them first (atp ingest)"
                ) from error
            raise


def _table_is_missing(engine: Engine, name: str) -> bool:
    """Whether ``name`` is surely absent (False when the warehouse cannot tell now)."""
    try:
        return not sa.inspect(engine).has_table(name)
    except sa.exc.DBAPIError:
        return False


def readings_table(contract: Contract, metadata: sa.MetaData) -> sa.Table:
    """``<name>_readings``: entity, ts (naive UTC), a float per sensor, label if labelled."""
    return sa.Table(
        check_identifier(contract.table_name, "readings table"),
        metadata,
        sa.Column("entity", sa.String, primary_key=True),
        sa.Column("ts", sa.DateTime, primary_key=True),
        *(
            sa.Column(check_identifier(s.name, "sensor"), sa.Float, nullable=s.nullable)
            for s in contract.sensors
        ),
        *([sa.Column("label", sa.Integer)] if contract.has_label else []),
    )


def ensure_schema(bind: Bind, contract: Contract) -> None:
    """Create the shared tables and the contract's readings table if missing; safe concurrently."""
    table = readings_table(contract, sa.MetaData())
    with _transaction(bind) as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_SCHEMA_LOCK)))
        for metadata in (scores_store.METADATA, alarm_tables.METADATA, METADATA):
            metadata.create_all(conn, checkfirst=True)
        table.create(conn, checkfirst=True)
        probe = sa.select(sa.literal_column("*")).select_from(table).limit(0)
        stored = list(conn.execute(probe).keys())
    if stored != list(table.columns.keys()):
        raise DataContractError(
            f"table {table.name} has columns {stored}, but contract {contract.name!r} "
            f"v{contract.version} declares {list(table.columns.keys())}: migrate the table or "
            "give the changed contract a new name"
        )


def upsert_readings(bind: Bind, contract: Contract, frame: pd.DataFrame) -> int:
    """Insert the readings not stored yet, in one transaction; return how many rows were new.

    Rows equal to stored ones are skipped; a row contradicting a stored one (or another row of
    ``frame`` with the same key) raises DataContractError, and the whole load is rolled back.
    """
    table = readings_table(contract, sa.MetaData())
    if sorted(frame.columns) != sorted(table.columns.keys()):
        raise ValueError(
            f"frame columns {list(frame.columns)} differ from {table.name}'s "
            f"{list(table.columns.keys())}"
        )
    with _transaction(bind) as conn:
        insert = dialect_insert(conn)
        stage = stage_frame(conn, table, frame)
        rows = sa.select(stage).where(sa.true()).order_by(stage.c.entity, stage.c.ts)
        copy = insert(table).from_select(list(table.columns.keys()), rows).on_conflict_do_nothing()
        result = conn.execute(copy.execution_options(preserve_rowcount=True))
        _refuse_contradictions(conn, table, stage)
        stage.drop(conn)
    return int(result.rowcount)


def _refuse_contradictions(conn: Connection, table: sa.Table, stage: sa.Table) -> None:
    values = [c.name for c in table.columns if not c.primary_key]
    same_key = sa.and_(stage.c.entity == table.c.entity, stage.c.ts == table.c.ts)
    differs = sa.or_(*(stage.c[name].is_distinct_from(table.c[name]) for name in values))
    query = sa.select(stage, *(table.c[name].label(f"stored_{name}") for name in values))
    found = conn.execute(query.join(table, same_key).where(differs).limit(5)).mappings().all()
    if not found:
        return
    examples = []
    for row in found:
        name = next(n for n in values if row[n] != row[f"stored_{n}"])
        examples.append(
            f"entity={row['entity']!r} ts={row['ts']} {name}: stored "
            f"{row[f'stored_{name}']!r}, new {row[name]!r}"
        )
    raise DataContractError(
        f"{table.name}: rows contradict readings already stored (same entity and ts, other "
        f"values); nothing was written. Examples: {'; '.join(examples)}"
    )


def _context(
    table: sa.Table,
    entity: str | None,
    start: datetime | str | None,
    after: datetime | str | None,
    n: int,
) -> sa.Select[Any]:
    """The n rows of ``entity`` just before the lower bound (``ts < start`` or ``ts <= after``)."""
    if entity is None or n < 0 or (start is not None and after is not None):
        raise ValueError("limit_before needs a count >= 0, entity and one of start or after")
    if start is not None:
        bound = table.c.ts < naive_utc(start)
    elif after is not None:
        bound = table.c.ts <= naive_utc(after)
    else:
        raise ValueError("limit_before needs start or after")
    query = sa.select(table).where(table.c.entity == entity, bound)
    return query.order_by(table.c.ts.desc()).limit(n)


def _lookahead(
    table: sa.Table, entity: str | None, end: datetime | str | None, n: int
) -> sa.Select[Any]:
    """The n rows of ``entity`` from the upper bound on (``ts >= end``)."""
    if entity is None or end is None or n < 0:
        raise ValueError("limit_after needs a count >= 0, entity and end")
    query = sa.select(table).where(table.c.entity == entity, table.c.ts >= naive_utc(end))
    return query.order_by(table.c.ts).limit(n)


def read_readings(
    bind: Bind,
    contract: Contract,
    *,
    entity: str | None = None,
    start: datetime | str | None = None,
    end: datetime | str | None = None,
    after: datetime | str | None = None,
    limit_before: int | None = None,
    limit_after: int | None = None,
) -> pd.DataFrame:
    """Readings with ``start <= ts < end`` and ``ts > after``, sorted by (entity, ts).

    ``limit_before=n`` (needs ``entity`` and one of ``start``/``after``) adds the n rows just before
    that lower bound: the ``win_size - 1`` rows of context a window score needs. ``limit_after=n``
    (needs ``entity`` and ``end``) adds the n rows from ``end`` on: the rows that make the scores
    averaged over windows final up to ``end``. Sensors come back
    as float32, ``label`` as nullable Int64, ``ts`` as naive UTC datetime64[us].
    """
    table = readings_table(contract, sa.MetaData())
    query = sa.select(table)
    if entity is not None:
        query = query.where(table.c.entity == entity)
    if start is not None:
        query = query.where(table.c.ts >= naive_utc(start))
    if end is not None:
        query = query.where(table.c.ts < naive_utc(end))
    if after is not None:
        query = query.where(table.c.ts > naive_utc(after))
    context = None if limit_before is None else _context(table, entity, start, after, limit_before)
    lookahead = None if limit_after is None else _lookahead(table, entity, end, limit_after)
    with _reading(bind, contract) as conn:
        rows = conn.execute(query.order_by(table.c.entity, table.c.ts)).all()
        if context is not None:
            rows = conn.execute(context).all()[::-1] + rows
        if lookahead is not None:
            rows += conn.execute(lookahead).all()
    frame = pd.DataFrame([tuple(row) for row in rows], columns=list(table.columns.keys()))
    dtypes = {"entity": "str", "ts": "datetime64[us]", "label": "Int64"}
    dtypes |= dict.fromkeys(contract.sensor_names, "float32")
    return frame.astype({name: dtypes[name] for name in frame.columns})


def list_entities(bind: Bind, contract: Contract) -> list[str]:
    """The entities of a source, sorted."""
    table = readings_table(contract, sa.MetaData())
    with _reading(bind, contract) as conn:
        return list(conn.scalars(sa.select(table.c.entity).distinct().order_by(table.c.entity)))


def entity_bounds(bind: Bind, contract: Contract) -> dict[str, EntityBounds]:
    """Per entity: first and last ts, row count and first labelled ts (None if never labelled)."""
    table = readings_table(contract, sa.MetaData())
    labelled: Any = sa.null()
    if contract.has_label:
        labelled = sa.func.min(sa.case((table.c.label.is_not(None), table.c.ts)))
    query = (
        sa.select(
            table.c.entity,
            sa.func.min(table.c.ts),
            sa.func.max(table.c.ts),
            sa.func.count(),
            labelled,
        )
        .group_by(table.c.entity)
        .order_by(table.c.entity)
    )
    with _reading(bind, contract) as conn:
        return {row[0]: EntityBounds(*row) for row in conn.execute(query)}


def record_ingest(bind: Bind, source: str, path: str, sha256: str, rows: int) -> None:
    """Note that a file (by content hash) was loaded into ``source``; a repeat is a no-op."""
    row = {
        "source": check_identifier(source, "source"),
        "file_sha256": sha256,
        "path": path,
        "rows": rows,
        "loaded_at": datetime.now(UTC).replace(tzinfo=None),
    }
    with _transaction(bind) as conn:
        conn.execute(dialect_insert(conn)(ingest_log).values(**row).on_conflict_do_nothing())


def already_ingested(bind: Bind, source: str, sha256: str) -> bool:
    """Whether a file with this content hash was loaded into ``source`` before."""
    log = ingest_log.c
    query = sa.select(log.rows).where(
        log.source == check_identifier(source, "source"), log.file_sha256 == sha256
    )
    with _transaction(bind, read_only=True) as conn:
        return conn.execute(query).first() is not None


_IO: dict[str, Any] = {"cache_policy": NO_CACHE, **TRANSIENT_RETRIES}
list_entities_task = task(name="list-entities", **_IO)(list_entities)
