"""Alarm events: runs of anomalous points, derived from the stored scores of one entity.

Rules (:class:`EventRules`), counted in scored rows of the entity, not in time:

- two anomalous points belong to one event when at most ``gap`` normal rows lie between them;
- an event is kept when it spans at least ``min_length`` rows (first to last anomalous point);
- an event is ``open`` while at most ``gap`` rows were scored after its end (the next alarm could
  still extend it), ``closed`` after that.

Events are a pure function of the ``anomaly_scores`` rows, so scheduled runs, split runs and
backfills agree. After scores for ``[first_ts, last_ts]`` are written, :func:`refresh_events`
re-derives, in the same transaction, the events of the smallest span around it that is bounded by
``gap + 1`` consecutive normal rows (or the ends of the series): nothing outside such a boundary
can merge with anything inside it. An event therefore stays one row (keyed by its start) while
scheduled runs extend it, and re-scoring never duplicates it. After changing ``gap`` or
``min_length``, backfill the whole range once so that every event follows the new rules.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
from prefect import task
from prefect.cache_policies import NO_CACHE
from sqlalchemy.engine import Connection

from tasks.alarm_tables import anomaly_events, entity_filter
from tasks.scores_store import anomaly_scores
from tasks.warehouse import get_engine, read_transaction

_SCAN_ROWS = 1024  # rows read per step while looking for a quiet boundary


@dataclass(frozen=True)
class EventRules:
    """How anomalous points merge into events; see the module docstring."""

    gap: int = 10
    min_length: int = 1
    top_k: int = 3

    def __post_init__(self) -> None:
        for name in ("gap", "min_length", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (name != "gap"):
                raise ValueError(
                    f"event rule {name} must be an int >= {int(name != 'gap')}, got {value!r}"
                )


@dataclass(frozen=True)
class AlarmEvent:
    """One row of ``anomaly_events``."""

    source: str
    entity: str
    model_name: str
    start_ts: datetime
    end_ts: datetime
    status: str
    points: int
    peak_score: float
    min_p_value: float | None
    top_sensors: list[tuple[str, float]]
    model_version: str


def event_top_sensors(top_sensors: list[str | None], scores: np.ndarray, k: int) -> list[list[Any]]:
    """Sensors behind an event: per-point ``top_sensors`` shares weighted by score, top ``k``."""
    weight: dict[str, float] = defaultdict(float)
    for text, score in zip(top_sensors, scores, strict=True):
        for sensor, share in json.loads(text) if text else []:
            weight[sensor] += float(share) * float(score)
    total = sum(weight.values())
    ranked = sorted(weight.items(), key=lambda item: (-item[1], item[0]))[:k]
    return [[sensor, round(w / total, 4) if total > 0 else 0.0] for sensor, w in ranked]


def derive_events(anomalous: pd.DataFrame, n_rows: int, rules: EventRules) -> list[dict[str, Any]]:
    """Events of a span of ``n_rows`` scored rows, from its anomalous rows only.

    ``anomalous`` holds ``pos`` (row position in the span, increasing), ``ts``, ``score``,
    ``p_value``, ``top_sensors`` and ``model_version``; the span must reach the end of the entity's
    scores or be followed by more than ``gap`` rows, so that the status is right.
    """
    if anomalous.empty:
        return []
    pos = anomalous["pos"].to_numpy(np.int64)
    breaks = np.flatnonzero(np.diff(pos) - 1 > rules.gap) + 1
    events = []
    for rows in np.split(np.arange(len(pos)), breaks):
        part = anomalous.iloc[rows]
        length = int(pos[rows[-1]] - pos[rows[0]] + 1)
        if length < rules.min_length:
            continue
        scores = part["score"].to_numpy(np.float64)
        peak = int(np.argmax(scores))
        p = part["p_value"].dropna()
        events.append(
            {
                "start_ts": part["ts"].iloc[0],
                "end_ts": part["ts"].iloc[-1],
                "status": "open" if n_rows - 1 - pos[rows[-1]] <= rules.gap else "closed",
                "points": len(rows),
                "length": length,
                "peak_score": float(scores[peak]),
                "peak_ts": part["ts"].iloc[peak],
                "min_p_value": float(p.min()) if len(p) else None,
                "top_sensors": json.dumps(
                    event_top_sensors(list(part["top_sensors"]), scores, rules.top_k)
                ),
                "model_version": str(part["model_version"].iloc[-1]),
            }
        )
    return events


Key = tuple[str, str, str]  # source, entity, model name


def _quiet_bound(
    conn: Connection, key: Key, anchor: datetime, gap: int, *, backwards: bool
) -> datetime | None:
    """Far end of the first ``gap + 1`` consecutive normal rows beyond ``anchor``; None if the
    series ends first."""
    s = anomaly_scores.c
    run = 0
    while True:
        beyond = s.ts < anchor if backwards else s.ts > anchor
        order = s.ts.desc() if backwards else s.ts.asc()
        query = sa.select(s.ts, s.is_anomaly).where(entity_filter(anomaly_scores, *key), beyond)
        rows = conn.execute(query.order_by(order).limit(_SCAN_ROWS)).all()
        for ts, is_anomaly in rows:
            run = 0 if is_anomaly else run + 1
            if run > gap:
                return ts
        if len(rows) < _SCAN_ROWS:
            return None
        anchor = rows[-1][0]


def _within(
    ts: sa.ColumnElement[Any], lo: datetime | None, hi: datetime | None
) -> sa.ColumnElement[bool]:
    return sa.and_(sa.true() if lo is None else ts >= lo, sa.true() if hi is None else ts <= hi)


def _touched(lo: datetime | None, hi: datetime | None) -> sa.ColumnElement[bool]:
    e = anomaly_events.c
    return sa.and_(
        sa.true() if hi is None else e.start_ts <= hi, sa.true() if lo is None else e.end_ts >= lo
    )


def _span(
    conn: Connection, key: Key, first_ts: datetime, last_ts: datetime, gap: int
) -> tuple[datetime | None, datetime | None]:
    """The span to re-derive: quiet-bounded, widened to cover every stored event it touches."""
    lo = _quiet_bound(conn, key, first_ts, gap, backwards=True)
    hi = _quiet_bound(conn, key, last_ts, gap, backwards=False)
    e = anomaly_events.c
    start, end = conn.execute(
        sa.select(sa.func.min(e.start_ts), sa.func.max(e.end_ts)).where(
            entity_filter(anomaly_events, *key), _touched(lo, hi)
        )
    ).one()
    if lo is not None and start is not None:
        lo = min(lo, start)
    if hi is not None and end is not None:
        hi = max(hi, end)
    return lo, hi


def _anomalous_rows(
    conn: Connection, key: Key, lo: datetime | None, hi: datetime | None
) -> tuple[pd.DataFrame, int]:
    """The span's anomalous rows with their positions in it, and the span's row count."""
    s = anomaly_scores.c
    in_span = sa.and_(entity_filter(anomaly_scores, *key), _within(s.ts, lo, hi))
    n_rows = int(conn.scalar(sa.select(sa.func.count()).where(in_span)) or 0)
    ranked = (
        sa.select(
            (sa.func.row_number().over(order_by=s.ts) - 1).label("pos"),
            s.ts,
            s.score,
            s.p_value,
            s.top_sensors,
            s.model_version,
            s.is_anomaly,
        )
        .where(in_span)
        .subquery()
    )
    query = (
        sa.select(*(c for c in ranked.c if c.name != "is_anomaly"))
        .where(ranked.c.is_anomaly)
        .order_by(ranked.c.pos)
    )
    rows = conn.execute(query).all()
    columns = ["pos", "ts", "score", "p_value", "top_sensors", "model_version"]
    return pd.DataFrame([tuple(r) for r in rows], columns=columns), n_rows


def refresh_events(
    conn: Connection,
    source: str,
    entity: str,
    model_name: str,
    first_ts: datetime,
    last_ts: datetime,
    rules: EventRules,
) -> int:
    """Re-derive the events around freshly written scores ``[first_ts, last_ts]`` in ``conn``.

    Call it in the transaction that wrote the scores, after :func:`lock_entity`. Returns the
    number of event rows now stored for the re-derived span.
    """
    key = (source, entity, model_name)
    lo, hi = _span(conn, key, first_ts, last_ts, rules.gap)
    anomalous, n_rows = _anomalous_rows(conn, key, lo, hi)
    events = derive_events(anomalous, n_rows, rules)
    conn.execute(
        sa.delete(anomaly_events).where(entity_filter(anomaly_events, *key), _touched(lo, hi))
    )
    if events:
        now = datetime.now(UTC).replace(tzinfo=None)
        stamp = {"source": source, "entity": entity, "model_name": model_name, "updated_at": now}
        conn.execute(sa.insert(anomaly_events), [stamp | _python(event) for event in events])
    return len(events)


def _python(event: dict[str, Any]) -> dict[str, Any]:
    """Timestamps as naive ``datetime`` for the driver."""
    stamps = ("start_ts", "end_ts", "peak_ts")
    return event | {name: pd.Timestamp(event[name]).to_pydatetime() for name in stamps}


def list_events(
    warehouse_url: str, *, source: str | None = None, open_only: bool = True, limit: int = 100
) -> list[AlarmEvent]:
    """At most ``limit`` events of every source (or of ``source``), newest first; only open ones
    if ``open_only``.

    Raises:
        ValueError: ``limit`` is negative.
    """
    if limit < 0:
        raise ValueError(f"limit must be at least 0, got {limit}")
    e = anomaly_events.c
    query = sa.select(
        e.source,
        e.entity,
        e.model_name,
        e.start_ts,
        e.end_ts,
        e.status,
        e.points,
        e.peak_score,
        e.min_p_value,
        e.top_sensors,
        e.model_version,
    )
    if source is not None:
        query = query.where(e.source == source)
    if open_only:
        query = query.where(e.status == "open")
    with read_transaction(get_engine(warehouse_url)) as conn:
        if not sa.inspect(conn).has_table(anomaly_events.name):
            return []
        rows = conn.execute(query.order_by(e.end_ts.desc(), e.entity).limit(limit)).all()
    return [AlarmEvent(*row[:9], [tuple(p) for p in json.loads(row[9])], row[10]) for row in rows]


list_events_task = task(name="list-events", cache_policy=NO_CACHE)(list_events)
