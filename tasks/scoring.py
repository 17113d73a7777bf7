"""Score readings with a registered model and write the results, with the watermark, atomically.

A point's score is a pure function of the model version and the ``win_size`` rows of its entity that
end at the point (``recon_last``/``reference_last``), so scheduled runs, small incremental runs and
backfills give the same value for the same point. The first ``win_size - 1`` rows of an entity are
scored from the entity's first window once it is complete.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Literal

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE
from sqlalchemy.engine import Connection, Engine

from data_contracts import Contract
from model.checkpoint import Checkpoint
from model.scaling import Scaler
from model.scoring import score_series
from model.thresholds import p_values
from tasks.adaptive_threshold import DEFAULT_GAMMA, apply_adaptive
from tasks.alarm_rule import alarm_rule
from tasks.alarm_tables import lock_entity
from tasks.drift_monitor import check_batch, record_drift
from tasks.errors import ModelRegistryError
from tasks.events import EventRules, refresh_events
from tasks.registry import LoadedModel
from tasks.scores_store import Watermark, get_watermark, write_scores
from tasks.validate import validate_readings
from tasks.warehouse import get_engine, read_readings, read_transaction

log = logging.getLogger(__name__)
TOP_SENSORS = 3
BATCH_WINDOWS = 1024
ThresholdMode = Literal["static", "adaptive"]


@dataclass(frozen=True)
class EntityResult:
    """What one scoring pass did for one entity."""

    entity: str
    scored: int
    anomalies: int
    last_ts: str | None
    note: str = ""


def score_values(
    checkpoint: Checkpoint, entity: str, values: np.ndarray, skip: int
) -> tuple[np.ndarray, np.ndarray]:
    """Scale raw ``(T, C)`` readings with the entity's scaler and score ``values[skip:]``."""
    scalers = checkpoint.extras["scalers"]
    if entity not in scalers:
        raise ModelRegistryError(f"entity {entity!r} was not in this model's training data")
    scaled = Scaler.from_dict(scalers[entity]).transform(values).astype(np.float32)
    method = checkpoint.extras["scoring_method"]
    result = score_series(checkpoint.model, scaled, method, skip=skip, batch_size=BATCH_WINDOWS)
    return result.scores, result.contributions


def top_sensors(contributions: np.ndarray, sensors: list[str], k: int = TOP_SENSORS) -> list[str]:
    """Per point, the ``k`` sensors carrying most of the score with their shares, as JSON."""
    totals = contributions.sum(axis=1, keepdims=True)
    shares = np.divide(contributions, totals, out=np.zeros_like(contributions), where=totals > 0)
    order = np.argsort(-shares, axis=1)[:, :k]
    return [
        json.dumps([[sensors[j], round(float(shares[i, j]), 4)] for j in row])
        for i, row in enumerate(order)
    ]


def score_rows(loaded: LoadedModel, entity: str, frame: pd.DataFrame, skip: int) -> pd.DataFrame:
    """Rows of ``anomaly_scores`` for ``frame[skip:]`` (``frame`` = context + new rows)."""
    extras = loaded.checkpoint.extras
    sensors = list(extras["sensors"])
    scores, contributions = score_values(
        loaded.checkpoint, entity, frame[sensors].to_numpy(np.float64), skip
    )
    rule = alarm_rule(extras, entity)
    return pd.DataFrame(
        {
            "ts": frame["ts"].iloc[skip:].to_numpy(),
            "score": scores.astype(np.float64),
            "threshold": rule.threshold,
            "is_anomaly": scores > rule.threshold,
            "p_value": p_values(rule.null_scores, scores),
            "top_sensors": top_sensors(contributions, sensors),
            "provisional": False,
        }
    )


@dataclass(frozen=True)
class ScoringOptions:
    """How scores become alarms: threshold mode, event rules, drift checks.

    ``threshold_mode="adaptive"`` flags scheduled batches with ACI
    (:mod:`tasks.adaptive_threshold`); backfills always use the static threshold.
    ``event_gap``/``event_min_length`` are :class:`tasks.events.EventRules`: use the same values
    for scheduled runs and backfills.
    """

    threshold_mode: ThresholdMode = "static"
    event_gap: int = EventRules.gap
    event_min_length: int = EventRules.min_length
    gamma: float = DEFAULT_GAMMA
    check_drift: bool = True

    @property
    def event_rules(self) -> EventRules:
        return EventRules(self.event_gap, self.event_min_length)


def _write_chunk(
    conn: Connection,
    source: str,
    loaded: LoadedModel,
    result: pd.DataFrame,
    values: np.ndarray,
    watermark: Watermark,
    options: ScoringOptions,
    *,
    move_watermark: bool,
) -> pd.DataFrame:
    """Scores, watermark, events, drift check and adaptive state of one chunk, all in ``conn``."""
    extras = loaded.checkpoint.extras
    lock_entity(conn, source, watermark.entity, watermark.model_name)
    batch_start = pd.Timestamp(result["ts"].iloc[0]).to_pydatetime()
    if options.check_drift:
        check = check_batch(extras, watermark.entity, values, result["score"].to_numpy())
        record_drift(conn, source, watermark, batch_start, len(result), check)
    if options.threshold_mode == "adaptive":
        result = apply_adaptive(conn, source, watermark, result, extras, options.gamma)
        if result.empty:
            return result
    write_scores(conn, source, result, watermark, move_watermark=move_watermark)
    first_ts = pd.Timestamp(result["ts"].iloc[0]).to_pydatetime()
    refresh_events(
        conn,
        source,
        watermark.entity,
        watermark.model_name,
        first_ts,
        watermark.last_ts,
        options.event_rules,
    )
    return result


def _score_in_chunks(
    engine: Engine,
    contract: Contract,
    loaded: LoadedModel,
    entity: str,
    frame: pd.DataFrame,
    context_rows: int,
    *,
    run_id: str,
    chunk_rows: int,
    move_watermark: bool,
    options: ScoringOptions,
) -> EntityResult:
    """Score ``frame[context_rows:]`` chunk by chunk; each chunk commits in its own transaction."""
    win = loaded.checkpoint.model_cfg.win_size
    if entity not in loaded.checkpoint.extras["scalers"]:
        return EntityResult(entity, 0, 0, None, "not in the model's training data: not scored")
    if len(frame) < win:
        return EntityResult(entity, 0, 0, None, f"waiting: {len(frame)} rows, a window needs {win}")
    validate_readings(
        frame, contract, source=f"{contract.table_name} entity {entity!r}", min_rows=win
    )
    sensors = list(loaded.checkpoint.extras["sensors"])
    scored = anomalies = 0
    step = max(chunk_rows, win)
    for start in range(context_rows, len(frame), step):
        begin = max(0, start - (win - 1))
        result = score_rows(loaded, entity, frame.iloc[begin : start + step], start - begin)
        values = frame[sensors].iloc[start : start + step].to_numpy(np.float64)
        last_ts = pd.Timestamp(result["ts"].iloc[-1]).to_pydatetime()
        watermark = Watermark(entity, loaded.name, last_ts, str(loaded.version), run_id)
        with engine.begin() as conn:
            written = _write_chunk(
                conn,
                contract.name,
                loaded,
                result,
                values,
                watermark,
                options,
                move_watermark=move_watermark,
            )
        scored += len(written)
        anomalies += int(written["is_anomaly"].sum())
    return EntityResult(entity, scored, anomalies, str(frame["ts"].iloc[-1]))


def score_new_rows(
    warehouse_url: str,
    contract: Contract,
    loaded: LoadedModel,
    entity: str,
    *,
    run_id: str,
    chunk_rows: int = 50_000,
    options: ScoringOptions = ScoringOptions(),
) -> EntityResult:
    """Scheduled scoring: every row after the entity's watermark; nothing new is a no-op."""
    engine = get_engine(warehouse_url)
    with read_transaction(engine) as conn:
        watermark = get_watermark(conn, contract.name, entity, loaded.name)
    after = None if watermark is None else watermark.last_ts
    context = None if after is None else loaded.checkpoint.model_cfg.win_size - 1
    frame = read_readings(engine, contract, entity=entity, after=after, limit_before=context)
    context_rows = 0 if after is None else int((frame["ts"] <= pd.Timestamp(after)).sum())
    if len(frame) == context_rows:
        return EntityResult(entity, 0, 0, None, "up to date")
    return _score_in_chunks(
        engine,
        contract,
        loaded,
        entity,
        frame,
        context_rows,
        run_id=run_id,
        chunk_rows=chunk_rows,
        move_watermark=True,
        options=options,
    )


def backfill_range(
    warehouse_url: str,
    contract: Contract,
    loaded: LoadedModel,
    entity: str,
    *,
    start: datetime | None,
    end: datetime | None,
    run_id: str,
    chunk_rows: int = 50_000,
    options: ScoringOptions = ScoringOptions(),
) -> EntityResult:
    """Backfill: re-score rows with ``start <= ts < end``; upserts, leaves the watermark alone.

    Always the static threshold and no drift checks (``options`` gives the event rules only), so
    a backfill of a range writes the same rows whenever it runs.
    """
    options = replace(options, threshold_mode="static", check_drift=False)
    engine = get_engine(warehouse_url)
    context = None if start is None else loaded.checkpoint.model_cfg.win_size - 1
    frame = read_readings(
        engine, contract, entity=entity, start=start, end=end, limit_before=context
    )
    context_rows = 0 if start is None else int((frame["ts"] < pd.Timestamp(start)).sum())
    if len(frame) == context_rows:
        return EntityResult(entity, 0, 0, None, "no rows in range")
    return _score_in_chunks(
        engine,
        contract,
        loaded,
        entity,
        frame,
        context_rows,
        run_id=run_id,
        chunk_rows=chunk_rows,
        move_watermark=False,
        options=options,
    )


score_new_rows_task = task(name="score-new-rows", cache_policy=NO_CACHE)(score_new_rows)
backfill_range_task = task(name="backfill-range", cache_policy=NO_CACHE)(backfill_range)
