"""Scores and their watermarks: upserted together in the caller's transaction, never half-written.

Scores are replaced on conflict (same source, entity, ts, model name), except that a provisional
score never replaces a final one; the watermark of (source, entity, model name) moves in the same
transaction and never backwards, so a run killed at any point leaves scores and watermark
consistent and the next run continues where it stopped. A provisional score (one that rows after
it can still change) is replaced by the next scheduled run that has those rows.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from data_contracts.contract import check_identifier
from tasks.staging import dialect_insert, naive_utc, stage_frame

SCORE_COLUMNS = ("ts", "score", "threshold", "is_anomaly", "p_value", "top_sensors", "provisional")
METADATA = sa.MetaData()


def _key(*names: str) -> list[sa.Column[Any]]:
    return [sa.Column(name, sa.String, primary_key=True) for name in names]


anomaly_scores = sa.Table(
    "anomaly_scores",
    METADATA,
    *_key("source", "entity"),
    sa.Column("ts", sa.DateTime, primary_key=True),
    *_key("model_name"),
    sa.Column("model_version", sa.String, nullable=False),
    sa.Column("score", sa.Float, nullable=False),
    sa.Column("threshold", sa.Float, nullable=False),
    sa.Column("is_anomaly", sa.Boolean, nullable=False),
    sa.Column("p_value", sa.Float),
    sa.Column("top_sensors", sa.Text),
    sa.Column("provisional", sa.Boolean, nullable=False),
    sa.Column("run_id", sa.String, nullable=False),
    sa.Column("scored_at", sa.DateTime, nullable=False),
)
scoring_watermarks = sa.Table(
    "scoring_watermarks",
    METADATA,
    *_key("source", "entity", "model_name"),
    sa.Column("last_ts", sa.DateTime, nullable=False),
    sa.Column("model_version", sa.String, nullable=False),
    sa.Column("run_id", sa.String, nullable=False),
    sa.Column("updated_at", sa.DateTime, nullable=False),
)


@dataclass(frozen=True)
class Watermark:
    """How far one model has scored one entity, and which model version and run moved it."""

    entity: str
    model_name: str
    last_ts: datetime
    model_version: str
    run_id: str


def get_watermark(conn: Connection, source: str, entity: str, model_name: str) -> Watermark | None:
    """The watermark of (source, entity, model_name), or None before the first scores."""
    w = scoring_watermarks.c
    query = sa.select(w.entity, w.model_name, w.last_ts, w.model_version, w.run_id).where(
        w.source == check_identifier(source, "source"),
        w.entity == entity,
        w.model_name == model_name,
    )
    row = conn.execute(query).one_or_none()
    return None if row is None else Watermark(*row)


@dataclass(frozen=True)
class LateRows:
    """Readings of one entity from before its scoring watermark that hold no score (they arrived
    after scoring passed their time): scheduled scoring, which scores what follows the watermark,
    never reaches them; ``atp backfill --start first_ts --end watermark`` scores them."""

    entity: str
    rows: int
    first_ts: datetime
    watermark: datetime

    def __str__(self) -> str:
        return f"{self.entity}: {self.rows} rows from {self.first_ts}, before {self.watermark}"


def late_rows(
    conn: Connection, source: str, entities: Sequence[str] | None = None
) -> dict[str, LateRows]:
    """Per entity of ``source`` (of ``entities`` only, when given) with late rows: see
    :class:`LateRows`. The watermark is the furthest of any model's; a score of any model counts."""
    check_identifier(source, "source")
    readings = sa.table(
        f"{source}_readings", sa.column("entity", sa.String), sa.column("ts", sa.DateTime)
    )
    w, s = scoring_watermarks.c, anomaly_scores.c
    marks = (
        sa.select(w.entity, sa.func.max(w.last_ts).label("last_ts"))
        .where(w.source == source)
        .group_by(w.entity)
        .subquery()
    )
    scored = sa.exists().where(
        s.source == source, s.entity == readings.c.entity, s.ts == readings.c.ts
    )
    query = (
        sa.select(
            readings.c.entity,
            sa.func.count(),
            sa.func.min(readings.c.ts),
            sa.func.max(marks.c.last_ts),
        )
        .join(marks, marks.c.entity == readings.c.entity)
        .where(readings.c.ts < marks.c.last_ts, ~scored)
        .group_by(readings.c.entity)
    )
    if entities is not None:
        query = query.where(readings.c.entity.in_(list(entities)))
    return {
        entity: LateRows(entity, int(count), first, mark)
        for entity, count, first, mark in conn.execute(query)
    }


def first_provisional(
    conn: Connection, source: str, entity: str, model_name: str
) -> datetime | None:
    """The ts of the entity's earliest provisional score by ``model_name``, or None."""
    s = anomaly_scores.c
    query = sa.select(sa.func.min(s.ts)).where(
        s.source == check_identifier(source, "source"),
        s.entity == entity,
        s.model_name == model_name,
        s.provisional,
    )
    return conn.scalar(query)


def _check_score_frame(frame: pd.DataFrame, entity: str) -> None:
    missing = sorted(set(SCORE_COLUMNS) - set(frame.columns))
    extra = sorted(set(frame.columns) - set(SCORE_COLUMNS) - {"entity"})
    if missing or extra:
        raise ValueError(f"score frame: missing columns {missing}, unexpected columns {extra}")
    if "entity" in frame and (frame["entity"] != entity).any():
        raise ValueError(f"score frame holds entities other than {entity!r}")
    if frame["ts"].duplicated().any():
        raise ValueError("score frame has duplicate timestamps")


def write_scores(
    conn: Connection,
    source: str,
    frame: pd.DataFrame,
    watermark: Watermark,
    *,
    move_watermark: bool = True,
) -> int:
    """Upsert one entity's scores (replacing earlier ones, but a final score never by a provisional
    one) and advance its watermark, in ``conn``.

    ``frame`` has the columns ``SCORE_COLUMNS`` (``top_sensors``: JSON text or a list of sensor
    names) and optionally ``entity`` (must equal ``watermark.entity``); entity, model name and
    version and run id come from ``watermark``. Pass a connection from ``engine.begin()``: scores
    and watermark commit together or not at all. ``move_watermark=False`` (backfills) leaves the
    watermark as it is. Returns the number of score rows written.
    """
    check_identifier(source, "source")
    _check_score_frame(frame, watermark.entity)
    now = datetime.now(UTC).replace(tzinfo=None)
    frame = frame.assign(
        source=source,
        entity=watermark.entity,
        model_name=watermark.model_name,
        model_version=watermark.model_version,
        run_id=watermark.run_id,
        scored_at=now,
        top_sensors=frame["top_sensors"].map(_as_json, na_action="ignore"),
    )
    stage = stage_frame(conn, anomaly_scores, frame)
    insert = dialect_insert(conn)(anomaly_scores).from_select(
        list(anomaly_scores.columns.keys()), sa.select(stage).where(sa.true()).order_by(stage.c.ts)
    )
    replace = {c.name: insert.excluded[c.name] for c in anomaly_scores.columns if not c.primary_key}
    conn.execute(
        insert.on_conflict_do_update(
            index_elements=list(anomaly_scores.primary_key.columns.keys()),
            set_=replace,
            where=sa.or_(~insert.excluded.provisional, anomaly_scores.c.provisional),
        )
    )
    stage.drop(conn)
    if move_watermark:
        _move_watermark(conn, source, watermark, now)
    return len(frame)


def _as_json(value: str | Sequence[str]) -> str:
    return value if isinstance(value, str) else json.dumps(list(value))


def _move_watermark(conn: Connection, source: str, watermark: Watermark, now: datetime) -> None:
    insert = dialect_insert(conn)(scoring_watermarks).values(
        source=source,
        entity=watermark.entity,
        model_name=watermark.model_name,
        last_ts=naive_utc(watermark.last_ts),
        model_version=watermark.model_version,
        run_id=watermark.run_id,
        updated_at=now,
    )
    moved = ("last_ts", "model_version", "run_id", "updated_at")
    conn.execute(
        insert.on_conflict_do_update(
            index_elements=list(scoring_watermarks.primary_key.columns.keys()),
            set_={name: insert.excluded[name] for name in moved},
            where=insert.excluded.last_ts >= scoring_watermarks.c.last_ts,
        )
    )
