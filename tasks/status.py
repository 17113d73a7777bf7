"""What is in the warehouse and the registry: sources, entities, watermarks, lag, open events,
drift, champion."""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from prefect import task
from prefect.cache_policies import NO_CACHE

from data_contracts.contract import check_identifier
from tasks.alarm_tables import anomaly_events
from tasks.drift_monitor import DriftState, latest_drift
from tasks.scores_store import anomaly_scores, late_rows, scoring_watermarks
from tasks.warehouse import get_engine, read_transaction

READINGS_SUFFIX = "_readings"


@dataclass(frozen=True)
class EntityStatus:
    """One entity of one source: its rows, how far it is scored (``unscored_rows`` after the
    watermark; ``late_rows`` before it without a score, which only a backfill scores), its alarms
    and open events."""

    source: str
    entity: str
    rows: int
    last_ts: str
    scored_until: str | None
    unscored_rows: int
    late_rows: int
    anomalies: int
    open_events: int


@dataclass(frozen=True)
class ModelStatus:
    """One alias of the registered model and the test metrics of the run behind it."""

    alias: str
    version: int
    run_id: str
    test_auc_pr: float | None
    test_vus_pr: float | None
    threshold: float | None


@dataclass(frozen=True)
class Status:
    """The whole picture ``atp status`` prints."""

    warehouse: str
    entities: tuple[EntityStatus, ...]
    drifting: tuple[DriftState, ...]
    models: tuple[ModelStatus, ...]


def _sources(engine: sa.Engine) -> list[str]:
    names = sa.inspect(engine).get_table_names()
    return sorted(n.removesuffix(READINGS_SUFFIX) for n in names if n.endswith(READINGS_SUFFIX))


def _count_by_entity(
    conn: sa.Connection, table: sa.Table, *conditions: sa.ColumnElement[bool]
) -> dict[str, int]:
    query = sa.select(table.c.entity, sa.func.count()).where(*conditions).group_by(table.c.entity)
    return {entity: int(count) for entity, count in conn.execute(query)}


def _entity_rows(conn: sa.Connection, source: str) -> list[EntityStatus]:
    check_identifier(source, "source")
    readings = sa.table(f"{source}{READINGS_SUFFIX}", sa.column("entity"), sa.column("ts"))
    w, s, e = scoring_watermarks.c, anomaly_scores.c, anomaly_events.c
    marks = dict(
        conn.execute(
            sa.select(w.entity, sa.func.max(w.last_ts)).where(w.source == source).group_by(w.entity)
        ).all()
    )
    alarms = _count_by_entity(conn, anomaly_scores, s.source == source, s.is_anomaly)
    events = _count_by_entity(conn, anomaly_events, e.source == source, e.status == "open")
    late = late_rows(conn, source)
    rows = []
    query = sa.select(readings.c.entity, sa.func.count(), sa.func.max(readings.c.ts)).group_by(
        readings.c.entity
    )
    for entity, count, last_ts in conn.execute(query.order_by(readings.c.entity)):
        mark = marks.get(entity)
        unscored = (
            count
            if mark is None
            else conn.scalar(
                sa.select(sa.func.count())
                .select_from(readings)
                .where(readings.c.entity == entity, readings.c.ts > mark)
            )
        )
        rows.append(
            EntityStatus(
                source,
                entity,
                count,
                str(last_ts),
                None if mark is None else str(mark),
                int(unscored or 0),
                late[entity].rows if entity in late else 0,
                alarms.get(entity, 0),
                events.get(entity, 0),
            )
        )
    return rows


def model_status(tracking_uri: str, model_name: str) -> list[ModelStatus]:
    """Every alias of ``model_name`` with its run's headline metrics; empty when unregistered."""
    from mlflow import MlflowClient

    from tasks.registry import registered_aliases

    client = MlflowClient(tracking_uri)
    found = []
    for alias, version in sorted((registered_aliases(client, model_name) or {}).items()):
        run_id = client.get_model_version(model_name, str(version)).run_id or ""
        metrics = client.get_run(run_id).data.metrics if run_id else {}
        found.append(
            ModelStatus(
                alias,
                int(version),
                run_id,
                metrics.get("test_auc_pr"),
                metrics.get("test_vus_pr"),
                metrics.get("threshold"),
            )
        )
    return found


def collect_status(warehouse_url: str, tracking_uri: str, model_name: str) -> Status:
    """Rows, watermarks, alarms and open events per entity of every source, the entities whose
    latest drift check flagged, plus champion and challenger."""
    engine = get_engine(warehouse_url)
    with read_transaction(engine) as conn:
        entities = [row for source in _sources(engine) for row in _entity_rows(conn, source)]
    drifting = tuple(state for state in latest_drift(warehouse_url) if state.flag)
    url = engine.url.render_as_string(hide_password=True)
    return Status(url, tuple(entities), drifting, tuple(model_status(tracking_uri, model_name)))


collect_status_task = task(name="collect-status", cache_policy=NO_CACHE)(collect_status)
