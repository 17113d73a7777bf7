"""Tables the scoring flow keeps beside the scores: alarm events, drift flags, adaptive state.

Every row here is derived from, or advanced together with, the ``anomaly_scores`` rows of one
(source, entity, model name), inside the same transaction as those scores. :func:`lock_entity`
serialises such transactions per entity: on SQLite ``BEGIN IMMEDIATE`` already does, on PostgreSQL
a transaction-scoped advisory lock on the key does, so two runs at once never interleave their
read-derive-write steps.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

METADATA = sa.MetaData()


def _key(*names: str) -> list[sa.Column[Any]]:
    return [sa.Column(name, sa.String, primary_key=True) for name in names]


anomaly_events = sa.Table(
    "anomaly_events",
    METADATA,
    *_key("source", "entity", "model_name"),
    sa.Column("start_ts", sa.DateTime, primary_key=True),
    sa.Column("end_ts", sa.DateTime, nullable=False),
    sa.Column("status", sa.String, nullable=False),  # open | closed
    sa.Column("points", sa.Integer, nullable=False),  # anomalous points in the event
    sa.Column("length", sa.Integer, nullable=False),  # scored points from start to end
    sa.Column("peak_score", sa.Float, nullable=False),
    sa.Column("peak_ts", sa.DateTime, nullable=False),
    sa.Column("min_p_value", sa.Float),
    sa.Column("top_sensors", sa.Text, nullable=False),  # JSON [[sensor, share], ...]
    sa.Column("model_version", sa.String, nullable=False),
    sa.Column("updated_at", sa.DateTime, nullable=False),
)
drift_flags = sa.Table(
    "drift_flags",
    METADATA,
    *_key("source", "entity", "model_name"),
    sa.Column("batch_start", sa.DateTime, primary_key=True),
    sa.Column("batch_end", sa.DateTime, nullable=False),
    sa.Column("model_version", sa.String, nullable=False),
    sa.Column("rows", sa.Integer, nullable=False),
    sa.Column("flag", sa.Boolean, nullable=False),
    sa.Column("alarm_rate", sa.Float, nullable=False),
    sa.Column("alpha", sa.Float, nullable=False),
    sa.Column("p_value", sa.Float, nullable=False),
    sa.Column("statistics", sa.Text, nullable=False),  # JSON: score test + per-sensor KS
    sa.Column("run_id", sa.String, nullable=False),
    sa.Column("checked_at", sa.DateTime, nullable=False),
)
adaptive_state = sa.Table(
    "adaptive_threshold_state",
    METADATA,
    *_key("source", "entity", "model_name"),
    sa.Column("last_ts", sa.DateTime, nullable=False),
    sa.Column("model_version", sa.String, nullable=False),
    sa.Column("state", sa.Text, nullable=False),  # JSON of model.adaptive.AciState
    sa.Column("updated_at", sa.DateTime, nullable=False),
)


def lock_entity(conn: Connection, source: str, entity: str, model_name: str) -> None:
    """Hold (source, entity, model name) for the rest of ``conn``'s transaction."""
    if conn.dialect.name == "postgresql":
        key = sa.func.hashtext(f"{source}\x1f{entity}\x1f{model_name}")
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(key)))


def entity_filter(
    table: sa.Table, source: str, entity: str, model_name: str
) -> sa.ColumnElement[bool]:
    """``WHERE`` clause selecting one (source, entity, model name) of ``table``."""
    return sa.and_(
        table.c.source == source, table.c.entity == entity, table.c.model_name == model_name
    )
