"""The warehouse: tables declared from contracts, idempotent loads, scores with their watermark.

SQLite (default) and PostgreSQL (production) behave alike:

- Readings are immutable. Loading rows already stored with the same values changes nothing; a row
  that contradicts a stored one (same entity and ts, other values, a label included) raises
  DataContractError and nothing of that load is written. Corrections need an explicit delete.
- Scores are replaced on conflict; the watermark moves in the same transaction, never backwards.
- Bulk writes go through a temporary stage table (driver executemany on SQLite, binary COPY on
  PostgreSQL), then one ``INSERT ... SELECT ... ON CONFLICT`` in key order, so that concurrent
  loads of overlapping rows neither deadlock nor duplicate.
- On SQLite every transaction starts with ``BEGIN IMMEDIATE`` (writers queue on ``busy_timeout``
  instead of failing to upgrade a read lock); the read helpers here use ``BEGIN DEFERRED``, so in
  WAL mode they never wait for a writer.
- Loaders and readers take a URL or an Engine (a transaction of their own) or a Connection (the
  caller's transaction, ``with engine.begin() as conn``), so that several writes commit together.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.states import State
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from data_contracts.contract import Contract, check_identifier
from tasks.errors import DataContractError

CHUNK_ROWS = 20_000
SQLITE_BUSY_TIMEOUT_MS = 60_000
READ_ONLY = "atp_read_only"  # execution option: this SQLite transaction only reads (BEGIN DEFERRED)
SCORE_COLUMNS = ("ts", "score", "threshold", "is_anomaly", "p_value", "top_sensors", "provisional")
_SCHEMA_LOCK = 0x41545053  # PostgreSQL advisory lock key that serialises ensure_schema
_COPY_TYPES = {sa.String: "text", sa.Text: "text", sa.DateTime: "timestamp", sa.Float: "float8",
               sa.Integer: "int4", sa.Boolean: "bool"}
METADATA = sa.MetaData()
_ENGINES: dict[str, Engine] = {}
_ENGINES_LOCK = threading.Lock()
Bind = Engine | Connection | str


def _key(*names: str) -> list[sa.Column[Any]]:
    return [sa.Column(name, sa.String, primary_key=True) for name in names]


anomaly_scores = sa.Table(
    "anomaly_scores", METADATA, *_key("source", "entity"),
    sa.Column("ts", sa.DateTime, primary_key=True), *_key("model_name"),
    sa.Column("model_version", sa.String, nullable=False),
    sa.Column("score", sa.Float, nullable=False), sa.Column("threshold", sa.Float, nullable=False),
    sa.Column("is_anomaly", sa.Boolean, nullable=False), sa.Column("p_value", sa.Float),
    sa.Column("top_sensors", sa.Text), sa.Column("provisional", sa.Boolean, nullable=False),
    sa.Column("run_id", sa.String, nullable=False),
    sa.Column("scored_at", sa.DateTime, nullable=False),
)
scoring_watermarks = sa.Table(
    "scoring_watermarks", METADATA, *_key("source", "entity", "model_name"),
    sa.Column("last_ts", sa.DateTime, nullable=False),
    sa.Column("model_version", sa.String, nullable=False),
    sa.Column("run_id", sa.String, nullable=False),
    sa.Column("updated_at", sa.DateTime, nullable=False),
)
ingest_log = sa.Table(
    "ingest_log", METADATA, *_key("source", "file_sha256"),
    sa.Column("path", sa.Text, nullable=False), sa.Column("rows", sa.Integer, nullable=False),
    sa.Column("loaded_at", sa.DateTime, nullable=False),
)


@dataclass(frozen=True)
class Watermark:
    """How far one model has scored one entity, and which model version and run moved it."""

    entity: str
    model_name: str
    last_ts: datetime
    model_version: str
    run_id: str


@dataclass(frozen=True)
class EntityBounds:
    """What one entity holds: first/last timestamp, row count, first labelled timestamp."""

    entity: str
    first_ts: datetime
    last_ts: datetime
    rows: int
    first_labelled_ts: datetime | None


def get_engine(url: str) -> Engine:
    """The process's engine for ``url`` (cached); ``postgresql://`` URLs use psycopg 3."""
    with _ENGINES_LOCK:
        if url not in _ENGINES:
            _ENGINES[url] = _create_engine(url)
        return _ENGINES[url]


def _create_engine(url: str) -> Engine:
    parsed = sa.make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() != "sqlite":
        return sa.create_engine(parsed, pool_pre_ping=True)
    engine = sa.create_engine(parsed)
    sa.event.listen(engine, "connect", _sqlite_connect)
    sa.event.listen(engine, "begin", _sqlite_begin)
    return engine


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # the driver emits no BEGIN: _sqlite_begin does
    cursor = dbapi_connection.cursor()
    for pragma in (f"busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}", "journal_mode = WAL",
                   "foreign_keys = ON", "synchronous = NORMAL"):
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


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


@contextmanager
def _transaction(bind: Bind, read_only: bool = False) -> Iterator[Connection]:
    """The caller's connection as is, or a new transaction (committed on success)."""
    if isinstance(bind, Connection):
        yield bind
        return
    engine = get_engine(bind) if isinstance(bind, str) else bind
    with engine.connect() as conn, conn.execution_options(**{READ_ONLY: read_only}).begin():
        yield conn


def readings_table(contract: Contract, metadata: sa.MetaData) -> sa.Table:
    """``<name>_readings``: entity, ts (naive UTC), a float per sensor, label if labelled."""
    return sa.Table(
        check_identifier(contract.table_name, "readings table"), metadata,
        sa.Column("entity", sa.String, primary_key=True),
        sa.Column("ts", sa.DateTime, primary_key=True),
        *(sa.Column(check_identifier(s.name, "sensor"), sa.Float, nullable=s.nullable)
          for s in contract.sensors),
        *([sa.Column("label", sa.Integer)] if contract.has_label else []),
    )


def ensure_schema(bind: Bind, contract: Contract) -> None:
    """Create the shared tables and the contract's readings table if missing; safe concurrently."""
    table = readings_table(contract, sa.MetaData())
    with _transaction(bind) as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_SCHEMA_LOCK)))
        METADATA.create_all(conn, checkfirst=True)
        table.create(conn, checkfirst=True)
        probe = sa.select(sa.literal_column("*")).select_from(table).limit(0)
        stored = list(conn.execute(probe).keys())
    if stored != list(table.columns.keys()):
        raise DataContractError(
            f"table {table.name} has columns {stored}, but contract {contract.name!r} "
            f"v{contract.version} declares {list(table.columns.keys())}: migrate the table or "
            "give the changed contract a new name"
        )


def _insert(conn: Connection) -> Any:
    """The dialect's INSERT construct, which has ON CONFLICT."""
    inserts = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}
    if conn.dialect.name not in inserts:
        raise ValueError(f"the warehouse needs SQLite or PostgreSQL, not {conn.dialect.name}")
    return inserts[conn.dialect.name]


def _naive_utc(value: datetime | str) -> datetime:
    stamp = pd.Timestamp(value)
    if pd.isna(stamp):
        raise ValueError(f"not a timestamp: {value!r}")
    return (stamp.tz_convert("UTC").tz_localize(None) if stamp.tzinfo else stamp).to_pydatetime()


def _values(conn: Connection, column: sa.Column[Any], values: pd.Series) -> list[Any]:
    """One column as the driver's Python values: None for missing, naive UTC datetimes."""
    if isinstance(column.type, sa.DateTime):
        stamps = pd.to_datetime(values)
        if stamps.dt.tz is not None:
            stamps = stamps.dt.tz_convert("UTC").dt.tz_localize(None)
        process = column.type.dialect_impl(conn.dialect).bind_processor(conn.dialect)
        return [process(v) if process else v for v in stamps.dt.to_pydatetime()]
    if isinstance(column.type, sa.Float):
        array = values.to_numpy(dtype=np.float64, na_value=np.nan)
        if not np.isnan(array).any():
            return list(array.tolist())
    elif isinstance(column.type, (sa.Integer, sa.String)):
        values = values.astype("Int64" if isinstance(column.type, sa.Integer) else "str")
    return list(values.astype(object).where(values.notna(), None).tolist())


def _staged(conn: Connection, table: sa.Table, frame: pd.DataFrame) -> sa.Table:
    """A temporary table with ``table``'s columns holding ``frame``, written in chunks."""
    stage = sa.Table(f"stage_{uuid.uuid4().hex[:16]}", sa.MetaData(),
                     *(sa.Column(c.name, c.type) for c in table.columns), prefixes=["TEMPORARY"])
    stage.create(conn)
    for start in range(0, len(frame), CHUNK_ROWS):
        chunk = frame.iloc[start : start + CHUNK_ROWS]
        rows = list(zip(*(_values(conn, c, chunk[c.name]) for c in stage.columns), strict=True))
        _write_rows(conn, stage, rows)
    return stage


def _write_rows(conn: Connection, stage: sa.Table, rows: list[tuple[Any, ...]]) -> None:
    """Bulk write below SQLAlchemy's per-row overhead: executemany on SQLite, binary COPY on PG."""
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql(str(stage.insert().compile(dialect=conn.dialect)), rows)
        return
    quote = conn.dialect.identifier_preparer.quote
    names = ", ".join(quote(c.name) for c in stage.columns)
    copy = f"COPY {quote(stage.name)} ({names}) FROM STDIN (FORMAT binary)"
    with conn.connection.driver_connection.cursor() as cursor, cursor.copy(copy) as writer:
        writer.set_types([_COPY_TYPES[type(c.type)] for c in stage.columns])
        for row in rows:
            writer.write_row(row)


def upsert_readings(bind: Bind, contract: Contract, frame: pd.DataFrame) -> int:
    """Insert the readings not stored yet, in one transaction; return how many rows were new.

    Rows equal to stored ones are skipped; a row contradicting a stored one (or another row of
    ``frame`` with the same key) raises DataContractError, and the whole load is rolled back.
    """
    table = readings_table(contract, sa.MetaData())
    if sorted(frame.columns) != sorted(table.columns.keys()):
        raise ValueError(f"frame columns {list(frame.columns)} differ from {table.name}'s "
                         f"{list(table.columns.keys())}")
    with _transaction(bind) as conn:
        insert = _insert(conn)
        stage = _staged(conn, table, frame)
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
        examples.append(f"entity={row['entity']!r} ts={row['ts']} {name}: stored "
                        f"{row[f'stored_{name}']!r}, new {row[name]!r}")
    raise DataContractError(
        f"{table.name}: rows contradict readings already stored (same entity and ts, other "
        f"values); nothing was written. Examples: {'; '.join(examples)}"
    )


def _context(table: sa.Table, entity: str | None, start: datetime | str | None,
             after: datetime | str | None, n: int) -> sa.Select[Any]:
    """The n rows of ``entity`` just before the lower bound (``ts < start`` or ``ts <= after``)."""
    if entity is None or n < 0 or (start is not None and after is not None):
        raise ValueError("limit_before needs a count >= 0, entity and one of start or after")
    if start is not None:
        bound = table.c.ts < _naive_utc(start)
    elif after is not None:
        bound = table.c.ts <= _naive_utc(after)
    else:
        raise ValueError("limit_before needs start or after")
    query = sa.select(table).where(table.c.entity == entity, bound)
    return query.order_by(table.c.ts.desc()).limit(n)


def read_readings(
    bind: Bind, contract: Contract, *, entity: str | None = None,
    start: datetime | str | None = None, end: datetime | str | None = None,
    after: datetime | str | None = None, limit_before: int | None = None,
) -> pd.DataFrame:
    """Readings with ``start <= ts < end`` and ``ts > after``, sorted by (entity, ts).

    ``limit_before=n`` (needs ``entity`` and one of ``start``/``after``) adds the n rows just before
    that lower bound: the ``win_size - 1`` rows of context a window score needs. Sensors come back
    as float32, ``label`` as nullable Int64, ``ts`` as naive UTC datetime64[us].
    """
    table = readings_table(contract, sa.MetaData())
    query = sa.select(table)
    if entity is not None:
        query = query.where(table.c.entity == entity)
    if start is not None:
        query = query.where(table.c.ts >= _naive_utc(start))
    if end is not None:
        query = query.where(table.c.ts < _naive_utc(end))
    if after is not None:
        query = query.where(table.c.ts > _naive_utc(after))
    context = None if limit_before is None else _context(table, entity, start, after, limit_before)
    with _transaction(bind, read_only=True) as conn:
        rows = conn.execute(query.order_by(table.c.entity, table.c.ts)).all()
        if context is not None:
            rows = conn.execute(context).all()[::-1] + rows
    frame = pd.DataFrame([tuple(row) for row in rows], columns=list(table.columns.keys()))
    dtypes = {"entity": "str", "ts": "datetime64[us]", "label": "Int64"}
    dtypes |= dict.fromkeys(contract.sensor_names, "float32")
    return frame.astype({name: dtypes[name] for name in frame.columns})


def list_entities(bind: Bind, contract: Contract) -> list[str]:
    """The entities of a source, sorted."""
    table = readings_table(contract, sa.MetaData())
    with _transaction(bind, read_only=True) as conn:
        return list(conn.scalars(sa.select(table.c.entity).distinct().order_by(table.c.entity)))


def entity_bounds(bind: Bind, contract: Contract) -> dict[str, EntityBounds]:
    """Per entity: first and last ts, row count and first labelled ts (None if never labelled)."""
    table = readings_table(contract, sa.MetaData())
    labelled: Any = sa.null()
    if contract.has_label:
        labelled = sa.func.min(sa.case((table.c.label.is_not(None), table.c.ts)))
    query = sa.select(table.c.entity, sa.func.min(table.c.ts), sa.func.max(table.c.ts),
                      sa.func.count(), labelled).group_by(table.c.entity).order_by(table.c.entity)
    with _transaction(bind, read_only=True) as conn:
        return {row[0]: EntityBounds(*row) for row in conn.execute(query)}


def get_watermark(conn: Connection, source: str, entity: str, model_name: str) -> Watermark | None:
    """The watermark of (source, entity, model_name), or None before the first scores."""
    w = scoring_watermarks.c
    query = sa.select(w.entity, w.model_name, w.last_ts, w.model_version, w.run_id).where(
        w.source == check_identifier(source, "source"), w.entity == entity,
        w.model_name == model_name)
    row = conn.execute(query).one_or_none()
    return None if row is None else Watermark(*row)


def write_scores(conn: Connection, source: str, frame: pd.DataFrame, watermark: Watermark, *,
                 move_watermark: bool = True) -> int:
    """Upsert one entity's scores (replacing earlier ones) and advance its watermark, in ``conn``.

    ``frame`` has the columns ``SCORE_COLUMNS`` (``top_sensors``: JSON text or a list of sensor
    names) and optionally ``entity`` (must equal ``watermark.entity``); entity, model name and
    version and run id come from ``watermark``. Pass a connection from ``engine.begin()``: scores
    and watermark commit together or not at all. ``move_watermark=False`` (backfills) leaves the
    watermark as it is. Returns the number of score rows written.
    """
    check_identifier(source, "source")
    missing = sorted(set(SCORE_COLUMNS) - set(frame.columns))
    extra = sorted(set(frame.columns) - set(SCORE_COLUMNS) - {"entity"})
    if missing or extra:
        raise ValueError(f"score frame: missing columns {missing}, unexpected columns {extra}")
    if "entity" in frame and (frame["entity"] != watermark.entity).any():
        raise ValueError(f"score frame holds entities other than {watermark.entity!r}")
    if frame["ts"].duplicated().any():
        raise ValueError("score frame has duplicate timestamps")
    now = datetime.now(UTC).replace(tzinfo=None)
    frame = frame.assign(
        source=source, entity=watermark.entity, model_name=watermark.model_name,
        model_version=watermark.model_version, run_id=watermark.run_id, scored_at=now,
        top_sensors=frame["top_sensors"].map(_as_json, na_action="ignore"))
    insert = _insert(conn)
    stage = _staged(conn, anomaly_scores, frame)
    insert = insert(anomaly_scores).from_select(
        list(anomaly_scores.columns.keys()), sa.select(stage).where(sa.true()).order_by(stage.c.ts))
    replace = {c.name: insert.excluded[c.name] for c in anomaly_scores.columns if not c.primary_key}
    conn.execute(insert.on_conflict_do_update(
        index_elements=list(anomaly_scores.primary_key.columns.keys()), set_=replace))
    stage.drop(conn)
    if move_watermark:
        _move_watermark(conn, source, watermark, now)
    return len(frame)


def _as_json(value: str | Sequence[str]) -> str:
    return value if isinstance(value, str) else json.dumps(list(value))


def _move_watermark(conn: Connection, source: str, watermark: Watermark, now: datetime) -> None:
    insert = _insert(conn)(scoring_watermarks).values(
        source=source, entity=watermark.entity, model_name=watermark.model_name,
        last_ts=_naive_utc(watermark.last_ts), model_version=watermark.model_version,
        run_id=watermark.run_id, updated_at=now)
    moved = ("last_ts", "model_version", "run_id", "updated_at")
    conn.execute(insert.on_conflict_do_update(
        index_elements=list(scoring_watermarks.primary_key.columns.keys()),
        set_={name: insert.excluded[name] for name in moved},
        where=insert.excluded.last_ts >= scoring_watermarks.c.last_ts))


def record_ingest(bind: Bind, source: str, path: str, sha256: str, rows: int) -> None:
    """Note that a file (by content hash) was loaded into ``source``; a repeat is a no-op."""
    row = {"source": check_identifier(source, "source"), "file_sha256": sha256, "path": path,
           "rows": rows, "loaded_at": datetime.now(UTC).replace(tzinfo=None)}
    with _transaction(bind) as conn:
        conn.execute(_insert(conn)(ingest_log).values(**row).on_conflict_do_nothing())


def already_ingested(bind: Bind, source: str, sha256: str) -> bool:
    """Whether a file with this content hash was loaded into ``source`` before."""
    log = ingest_log.c
    query = sa.select(log.rows).where(log.source == check_identifier(source, "source"),
                                      log.file_sha256 == sha256)
    with _transaction(bind, read_only=True) as conn:
        return conn.execute(query).first() is not None


def is_transient(_task: Any, _task_run: Any, state: State) -> bool:
    """Prefect retry condition: retry lost connections and lock timeouts, never bad data or SQL."""
    error = state.result(raise_on_failure=False)
    return isinstance(error, sa.exc.OperationalError) or (
        isinstance(error, sa.exc.DBAPIError) and error.connection_invalidated)


_IO: dict[str, Any] = {"cache_policy": NO_CACHE, "retries": 3, "retry_delay_seconds": [2, 10, 30],
                       "retry_condition_fn": is_transient}
list_entities_task = task(name="list-entities", **_IO)(list_entities)
