"""Score readings with a registered model and write the results, with the watermark, atomically.

A point's score is a pure function of the model version and the ``win_size`` rows of its entity that
end at the point (``recon_last``/``reference_last``), so scheduled runs, small incremental runs and
backfills give the same value for the same point. The first ``win_size - 1`` rows of an entity are
scored from the entity's first window once it is complete.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Literal

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE
from sqlalchemy.engine import Connection, Engine

from data_contracts import Contract
from model.artifact import ScoringModel
from model.scaling import Scaler
from model.thresholds import p_values
from tasks.adaptive_threshold import DEFAULT_GAMMA, apply_adaptive
from tasks.alarm_rule import alarm_rule
from tasks.alarm_tables import lock_entity
from tasks.drift_monitor import check_batch, record_drift
from tasks.errors import DataContractError, ModelRegistryError
from tasks.events import EventRules, refresh_events
from tasks.registry import LoadedModel
from tasks.scores_store import Watermark, get_watermark, write_scores
from tasks.validate import validate_readings
from tasks.warehouse import get_engine, read_readings, read_transaction

log = logging.getLogger(__name__)
TOP_SENSORS = 3
BATCH_WINDOWS = 1024
# Rows of consecutive entities validated in one Great Expectations run (its cost is per run).
VALIDATION_ROWS = 200_000
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
    checkpoint: ScoringModel, entity: str, values: np.ndarray, skip: int
) -> tuple[np.ndarray, np.ndarray]:
    """Scale raw ``(T, C)`` readings with the entity's scaler and score ``values[skip:]`` with the
    model (an Anomaly Transformer or a baseline); gaps of nullable sensors take the entity's
    training mean, as in training."""
    scalers = checkpoint.extras["scalers"]
    if entity not in scalers:
        raise ModelRegistryError(f"entity {entity!r} was not in this model's training data")
    scaler = Scaler.from_dict(scalers[entity])
    scaled = scaler.transform(scaler.impute(values))
    result = checkpoint.score(scaled, entity=entity, skip=skip, batch_size=BATCH_WINDOWS)
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


@dataclass(frozen=True)
class PendingRows:
    """One entity's rows to score, after ``context_rows`` rows of context read from before them."""

    entity: str
    frame: pd.DataFrame
    context_rows: int


def _new_rows(engine: Engine, contract: Contract, loaded: LoadedModel, entity: str) -> PendingRows:
    """The rows after the entity's watermark, led by up to ``win_size - 1`` rows of context."""
    with read_transaction(engine) as conn:
        watermark = get_watermark(conn, contract.name, entity, loaded.name)
    after = None if watermark is None else watermark.last_ts
    context = None if after is None else loaded.checkpoint.model_cfg.win_size - 1
    frame = read_readings(engine, contract, entity=entity, after=after, limit_before=context)
    context_rows = 0 if after is None else int((frame["ts"] <= pd.Timestamp(after)).sum())
    return PendingRows(entity, frame, context_rows)


def _range_rows(
    engine: Engine,
    contract: Contract,
    loaded: LoadedModel,
    entity: str,
    start: datetime | None,
    end: datetime | None,
) -> PendingRows:
    """The rows with ``start <= ts < end``, led by up to ``win_size - 1`` rows of context."""
    context = None if start is None else loaded.checkpoint.model_cfg.win_size - 1
    frame = read_readings(
        engine, contract, entity=entity, start=start, end=end, limit_before=context
    )
    context_rows = 0 if start is None else int((frame["ts"] < pd.Timestamp(start)).sum())
    return PendingRows(entity, frame, context_rows)


def _not_scoreable(loaded: LoadedModel, pending: PendingRows, empty: str) -> EntityResult | None:
    """The result of an entity with nothing to score now; None when it has rows to score."""
    win = loaded.checkpoint.model_cfg.win_size
    entity, rows = pending.entity, len(pending.frame)
    if rows == pending.context_rows:
        return EntityResult(entity, 0, 0, None, empty)
    if entity not in loaded.checkpoint.extras["scalers"]:
        return EntityResult(entity, 0, 0, None, "not in the model's training data: not scored")
    if rows < win:
        return EntityResult(entity, 0, 0, None, f"waiting: {rows} rows, a window needs {win}")
    return None


def _batches(pending: Iterable[PendingRows]) -> Iterator[list[PendingRows]]:
    """Consecutive entities holding about ``VALIDATION_ROWS`` rows together (at least one)."""
    batch: list[PendingRows] = []
    rows = 0
    for item in pending:
        batch.append(item)
        rows += len(item.frame)
        if rows >= VALIDATION_ROWS:
            yield batch
            batch, rows = [], 0
    if batch:
        yield batch


def _rejected(contract: Contract, batch: list[PendingRows], win: int) -> dict[str, str]:
    """Validate a batch of entities in one GX run; if it fails, find the entities at fault."""
    if not batch:
        return {}
    try:
        frame = pd.concat([p.frame for p in batch], ignore_index=True)
        validate_readings(frame, contract, source=contract.table_name, min_rows=win)
        return {}
    except DataContractError:
        pass
    rejected = {}
    for pending in batch:
        where = f"{contract.table_name} entity {pending.entity!r}"
        try:
            validate_readings(pending.frame, contract, source=where, min_rows=win)
        except DataContractError as error:
            rejected[pending.entity] = error.report
    return rejected


def _score_entities(
    engine: Engine,
    contract: Contract,
    loaded: LoadedModel,
    pending: Iterable[PendingRows],
    *,
    empty: str,
    run_id: str,
    chunk_rows: int,
    move_watermark: bool,
    options: ScoringOptions,
) -> list[EntityResult]:
    """Validate and score entity after entity; entities whose rows break the contract are left
    unscored while the others are scored, then DataContractError names every one of them."""
    win = loaded.checkpoint.model_cfg.win_size
    results: list[EntityResult] = []
    rejected: dict[str, str] = {}
    position: dict[str, int] = {}
    for batch in _batches(pending):
        ready = []
        for item in batch:
            position[item.entity] = len(position)
            if (result := _not_scoreable(loaded, item, empty)) is not None:
                results.append(result)
            else:
                ready.append(item)
        found = _rejected(contract, ready, win)
        rejected |= found
        for item in ready:
            if item.entity not in found:
                results.append(
                    _score_in_chunks(
                        engine,
                        contract,
                        loaded,
                        item,
                        run_id=run_id,
                        chunk_rows=chunk_rows,
                        move_watermark=move_watermark,
                        options=options,
                    )
                )
    if rejected:
        scored = ", ".join(r.entity for r in results if r.scored) or "none"
        raise DataContractError(
            f"{len(rejected)} entit{'y' if len(rejected) == 1 else 'ies'} not scored: "
            f"{sorted(rejected)} (entities scored: {scored})\n\n" + "\n\n".join(rejected.values())
        )
    return sorted(results, key=lambda result: position[result.entity])


def _score_in_chunks(
    engine: Engine,
    contract: Contract,
    loaded: LoadedModel,
    pending: PendingRows,
    *,
    run_id: str,
    chunk_rows: int,
    move_watermark: bool,
    options: ScoringOptions,
) -> EntityResult:
    """Score the pending rows chunk by chunk; each chunk commits in its own transaction."""
    win = loaded.checkpoint.model_cfg.win_size
    entity, frame = pending.entity, pending.frame
    sensors = list(loaded.checkpoint.extras["sensors"])
    scaler = Scaler.from_dict(loaded.checkpoint.extras["scalers"][entity])
    scored = anomalies = 0
    step = max(chunk_rows, win)
    for start in range(pending.context_rows, len(frame), step):
        begin = max(0, start - (win - 1))
        result = score_rows(loaded, entity, frame.iloc[begin : start + step], start - begin)
        values = scaler.impute(frame[sensors].iloc[start : start + step].to_numpy(np.float64))
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
    entities: Sequence[str],
    *,
    run_id: str,
    chunk_rows: int = 50_000,
    options: ScoringOptions = ScoringOptions(),
) -> list[EntityResult]:
    """Scheduled scoring: every row after each entity's watermark; nothing new is a no-op.

    The new rows of consecutive entities are validated together, about ``VALIDATION_ROWS`` at a
    time (one Great Expectations run each). An entity whose rows break the contract is not scored;
    the others are, and then DataContractError names each rejected entity and its broken rules.
    """
    engine = get_engine(warehouse_url)
    return _score_entities(
        engine,
        contract,
        loaded,
        (_new_rows(engine, contract, loaded, entity) for entity in entities),
        empty="up to date",
        run_id=run_id,
        chunk_rows=chunk_rows,
        move_watermark=True,
        options=options,
    )


def backfill_range(
    warehouse_url: str,
    contract: Contract,
    loaded: LoadedModel,
    entities: Sequence[str],
    *,
    start: datetime | None,
    end: datetime | None,
    run_id: str,
    chunk_rows: int = 50_000,
    options: ScoringOptions = ScoringOptions(),
) -> list[EntityResult]:
    """Backfill: re-score rows with ``start <= ts < end``; upserts, leaves the watermarks alone.

    Always the static threshold and no drift checks (``options`` gives the event rules only), so
    a backfill of a range writes the same rows whenever it runs. Validation as in
    :func:`score_new_rows`.
    """
    engine = get_engine(warehouse_url)
    return _score_entities(
        engine,
        contract,
        loaded,
        (_range_rows(engine, contract, loaded, entity, start, end) for entity in entities),
        empty="no rows in range",
        run_id=run_id,
        chunk_rows=chunk_rows,
        move_watermark=False,
        options=replace(options, threshold_mode="static", check_drift=False),
    )


score_new_rows_task = task(name="score-new-rows", cache_policy=NO_CACHE)(score_new_rows)
backfill_range_task = task(name="backfill-range", cache_policy=NO_CACHE)(backfill_range)
