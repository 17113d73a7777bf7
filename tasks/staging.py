"""Bulk writes below SQLAlchemy's per-row overhead, shared by the readings and the scores tables.

A frame goes into a temporary stage table (driver executemany on SQLite, binary COPY on
PostgreSQL); the caller then moves it with one ``INSERT ... SELECT ... ON CONFLICT`` in key order,
so that concurrent loads of overlapping rows neither deadlock nor duplicate.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

CHUNK_ROWS = 20_000
_COPY_TYPES = {
    sa.String: "text",
    sa.Text: "text",
    sa.DateTime: "timestamp",
    sa.Float: "float8",
    sa.Integer: "int4",
    sa.Boolean: "bool",
}


def dialect_insert(conn: Connection) -> Any:
    """The dialect's INSERT construct, which has ON CONFLICT."""
    inserts = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}
    if conn.dialect.name not in inserts:
        raise ValueError(f"the warehouse needs SQLite or PostgreSQL, not {conn.dialect.name}")
    return inserts[conn.dialect.name]


def naive_utc(value: datetime | str) -> datetime:
    """A timestamp as a naive UTC datetime (aware values are converted, naive ones kept)."""
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


def stage_frame(conn: Connection, table: sa.Table, frame: pd.DataFrame) -> sa.Table:
    """A temporary table with ``table``'s columns holding ``frame``, written in chunks."""
    stage = sa.Table(
        f"stage_{uuid.uuid4().hex[:16]}",
        sa.MetaData(),
        *(sa.Column(c.name, c.type) for c in table.columns),
        prefixes=["TEMPORARY"],
    )
    stage.create(conn)
    for start in range(0, len(frame), CHUNK_ROWS):
        chunk = frame.iloc[start : start + CHUNK_ROWS]
        rows = list(zip(*(_values(conn, c, chunk[c.name]) for c in stage.columns), strict=True))
        _write_rows(conn, stage, rows)
    return stage


def _write_rows(conn: Connection, stage: sa.Table, rows: list[tuple[Any, ...]]) -> None:
    """Bulk write: executemany on SQLite, binary COPY on PostgreSQL."""
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
