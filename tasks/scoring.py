"""Score readings with a registered model and write the results, with the watermark, atomically.

A point's final score is a pure function of the model version and the rows of its entity around
it: the ``win_size`` rows that end at the point (``recon_last``/``reference_last``), or the
``2 * win_size - 1`` rows centred on it (``recon_mean``), so scheduled runs, small incremental runs
and backfills give the same value for the same point; an Anomaly Transformer's
``score_smoothing`` averages a point's score with the ``score_smoothing - 1`` before it, so a
point's score reads ``context_points`` rows before it. The first ``win_size - 1`` rows of an entity
are scored once its first window is complete. With ``recon_mean`` the last ``win_size - 1`` rows
scored are ``provisional``: the next scheduled run re-scores them with the rows that came since
(replacing them, never adding rows), and a backfill reads ``win_size - 1`` rows past its range.
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
from model.artifact import BATCH_WINDOWS, ScoringModel
from model.scaling import Scaler
from model.thresholds import p_values
from tasks.adaptive_threshold import DEFAULT_GAMMA, apply_adaptive
from tasks.alarm_rule import alarm_rule
from tasks.alarm_tables import lock_entity
from tasks.drift_monitor import check_batch, record_drift
from tasks.errors import AtpError, DataContractError, ModelRegistryError
from tasks.events import EventRules, refresh_events
from tasks.registry import LoadedModel
from tasks.scores_store import Watermark, first_provisional, get_watermark, write_scores
from tasks.staging import naive_utc
from tasks.validate import validate_readings
from tasks.warehouse import get_engine, read_readings, read_transaction

log = logging.getLogger(__name__)
TOP_SENSORS = 3
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


def score_rows(
    loaded: LoadedModel, entity: str, frame: pd.DataFrame, skip: int, rows: int | None = None
) -> pd.DataFrame:
    """Rows of ``anomaly_scores`` for ``frame[skip : skip + rows]`` (``rows=None``: to the end).

    ``frame`` holds context before them and, for methods that use later windows, the rows after
    them that there are; a point with fewer than ``provisional_points`` rows after it in
    ``frame`` is marked provisional.
    """
    extras = loaded.checkpoint.extras
    sensors = list(extras["sensors"])
    scores, contributions = score_values(
        loaded.checkpoint, entity, frame[sensors].to_numpy(np.float64), skip
    )
    scores, contributions = scores[:rows], contributions[:rows]
    lag = loaded.checkpoint.provisional_points
    rows_after = len(frame) - 1 - np.arange(skip, skip + len(scores))
    rule = alarm_rule(extras, entity)
    return pd.DataFrame(
        {
            "ts": frame["ts"].iloc[skip : skip + len(scores)].to_numpy(),
            "score": scores.astype(np.float64),
            "threshold": rule.threshold,
            "is_anomaly": scores > rule.threshold,
            "p_value": p_values(rule.null_scores, scores),
            "top_sensors": top_sensors(contributions, sensors),
            "provisional": rows_after < lag,
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

    def __post_init__(self) -> None:
        """Refuse event rules no event can follow before any row is scored."""
        try:
            EventRules(self.event_gap, self.event_min_length)
        except ValueError as error:
            raise AtpError(str(error)) from None

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
    new_after: datetime | None,
) -> pd.DataFrame:
    """Scores, watermark, events, drift check and adaptive state of one chunk, all in ``conn``.

    ``values`` are the chunk's raw readings; the drift check takes only the rows after
    ``new_after`` (re-scored provisional rows were checked when they were new).
    """
    extras = loaded.checkpoint.extras
    lock_entity(conn, source, watermark.entity, watermark.model_name)
    fresh = np.ones(len(result), dtype=bool)
    if new_after is not None:
        fresh = (result["ts"] > pd.Timestamp(new_after)).to_numpy()
    if options.check_drift and fresh.any():
        scores = result["score"].to_numpy()[fresh]
        check = check_batch(extras, watermark.entity, values[fresh], scores)
        batch_start = pd.Timestamp(result["ts"][fresh].iloc[0]).to_pydatetime()
        record_drift(conn, source, watermark, batch_start, len(scores), check)
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
    """One entity's rows to score: ``frame`` = ``context_rows`` rows of context read from before
    them, the rows to score, then ``lookahead_rows`` rows read from after them that finalise the
    scores averaged over windows. ``new_after``: the watermark before this run (rows up to it were
    scored before, some provisionally)."""

    entity: str
    frame: pd.DataFrame
    context_rows: int
    lookahead_rows: int = 0
    new_after: datetime | None = None

    @property
    def rows_to_score(self) -> int:
        return len(self.frame) - self.context_rows - self.lookahead_rows


def _new_rows(engine: Engine, contract: Contract, loaded: LoadedModel, entity: str) -> PendingRows:
    """The rows after the entity's watermark, and its provisional rows before it, led by up to
    ``context_points`` rows of context; nothing to score when no row came after the watermark."""
    with read_transaction(engine) as conn:
        watermark = get_watermark(conn, contract.name, entity, loaded.name)
        provisional = first_provisional(conn, contract.name, entity, loaded.name)
    if watermark is None:
        frame = read_readings(engine, contract, entity=entity)
        return PendingRows(entity, frame, 0)
    context = loaded.checkpoint.context_points
    if provisional is None or provisional > watermark.last_ts:
        frame = read_readings(
            engine, contract, entity=entity, after=watermark.last_ts, limit_before=context
        )
        context_rows = int((frame["ts"] <= pd.Timestamp(watermark.last_ts)).sum())
    else:
        frame = read_readings(
            engine, contract, entity=entity, start=provisional, limit_before=context
        )
        context_rows = int((frame["ts"] < pd.Timestamp(provisional)).sum())
    if not (frame["ts"] > pd.Timestamp(watermark.last_ts)).any():
        context_rows = len(frame)  # up to date: provisional rows wait for the rows after them
    return PendingRows(entity, frame, context_rows, new_after=watermark.last_ts)


def _range_rows(
    engine: Engine,
    contract: Contract,
    loaded: LoadedModel,
    entity: str,
    start: datetime | None,
    end: datetime | None,
) -> PendingRows:
    """The rows with ``start <= ts < end``, led by up to ``context_points`` rows of context and
    followed by up to ``provisional_points`` rows from ``end`` on."""
    context = None if start is None else loaded.checkpoint.context_points
    lookahead = None if end is None else loaded.checkpoint.provisional_points
    frame = read_readings(
        engine,
        contract,
        entity=entity,
        start=start,
        end=end,
        limit_before=context,
        limit_after=lookahead,
    )
    context_rows = 0 if start is None else int((frame["ts"] < pd.Timestamp(start)).sum())
    lookahead_rows = 0 if end is None else int((frame["ts"] >= pd.Timestamp(end)).sum())
    return PendingRows(entity, frame, context_rows, lookahead_rows)


def _not_scoreable(loaded: LoadedModel, pending: PendingRows, empty: str) -> EntityResult | None:
    """The result of an entity with nothing to score now; None when it has rows to score."""
    win = loaded.checkpoint.model_cfg.win_size
    entity, rows = pending.entity, len(pending.frame)
    if pending.rows_to_score == 0:
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
    """Score the pending rows chunk by chunk; each chunk commits in its own transaction.

    A chunk reads ``context_points`` rows before it and, for scores averaged over windows, the
    ``provisional_points`` rows after it, so chunk boundaries change no score.
    """
    extras = loaded.checkpoint.extras
    win, lag = loaded.checkpoint.model_cfg.win_size, loaded.checkpoint.provisional_points
    context = loaded.checkpoint.context_points
    entity, frame = pending.entity, pending.frame
    sensors = list(extras["sensors"])
    scaler = Scaler.from_dict(extras["scalers"][entity])
    scored = anomalies = 0
    step = max(chunk_rows, win)
    stop = pending.context_rows + pending.rows_to_score
    for start in range(pending.context_rows, stop, step):
        begin, end = max(0, start - context), min(start + step, stop)
        window = frame.iloc[begin : min(len(frame), end + lag)]
        result = score_rows(loaded, entity, window, start - begin, end - start)
        values = scaler.impute(frame[sensors].iloc[start:end].to_numpy(np.float64))
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
                new_after=pending.new_after,
            )
        scored += len(written)
        anomalies += int(written["is_anomaly"].sum())
    return EntityResult(entity, scored, anomalies, str(frame["ts"].iloc[stop - 1]))


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


def check_model_source(loaded: LoadedModel, contract: Contract) -> None:
    """AtpError unless ``loaded`` was trained on ``contract``'s source and every sensor it reads
    is still in the contract (a model without a recorded source is taken as it is)."""
    trained_on = loaded.extras.get("source")
    model = f"model {loaded.name!r} version {loaded.version}"
    if trained_on is not None and trained_on != contract.name:
        raise AtpError(
            f"{model} was trained on source {trained_on!r}, not {contract.name!r}: keep one "
            "registered model per source (ATP_MODEL_NAME), or score with another --alias"
        )
    missing = sorted(set(loaded.extras["sensors"]) - set(contract.sensor_names))
    if missing:
        raise AtpError(
            f"{model} reads sensors {missing} that contract {contract.name!r} no longer has: "
            "train a new model on the contract as it is"
        )


def backfill_bounds(
    start: datetime | None, end: datetime | None
) -> tuple[datetime | None, datetime | None]:
    """``start`` and ``end`` as the warehouse stores timestamps (naive UTC; an offset is converted);
    AtpError when ``start`` is after ``end``."""
    start, end = (None if t is None else naive_utc(t) for t in (start, end))
    if start is not None and end is not None and start > end:
        raise AtpError(f"backfill: start {start} is after end {end} (UTC)")
    return start, end


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
    :func:`score_new_rows`. Bounds as :func:`backfill_bounds` reads them.
    """
    start, end = backfill_bounds(start, end)
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
