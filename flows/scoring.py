"""Scheduled scoring and backfill flows: score with one model version, write results atomically."""

from datetime import datetime

from prefect import flow
from prefect.runtime import flow_run

from data_contracts import load_contract
from tasks.partitions import TaskRunnerKind, map_partitions, split_entities
from tasks.registry import load_model_version_task
from tasks.scoring import (
    EntityResult,
    ScoringOptions,
    ThresholdMode,
    backfill_bounds,
    backfill_range_task,
    check_model_source,
    score_new_rows_task,
)
from tasks.settings import get_settings
from tasks.warehouse import list_entities_task


@flow(name="score", log_prints=True)
def scoring_flow(
    source: str = "smd",
    alias: str = "champion",
    chunk_rows: int = 50_000,
    threshold_mode: ThresholdMode = "static",
    event_gap: int = 10,
    event_min_length: int = 1,
    partitions: int = 1,
    task_runner: TaskRunnerKind = "threads",
) -> list[EntityResult]:
    """Score every entity's rows after its watermark with ``models:/<name>@<alias>``.

    Each batch also updates the alarm events, a drift check and, with
    ``threshold_mode="adaptive"``, the entity's adaptive threshold, in the scores' transaction.
    Entities whose new rows break the contract are left unscored and fail the run, after the
    others are scored. ``partitions`` > 1 scores that many groups of consecutive entities at
    once on ``task_runner`` (``dask``: the scheduler at ``ATP_DASK_ADDRESS``, else a local
    cluster); the results keep the entities' order.
    """
    settings = get_settings()
    contract = load_contract(source)
    options = ScoringOptions(threshold_mode, event_gap, event_min_length)
    loaded = load_model_version_task(settings.model_name, alias)
    check_model_source(loaded, contract)
    groups = split_entities(list_entities_task(settings.warehouse_url, contract), partitions)
    return map_partitions(
        score_new_rows_task,
        groups,
        task_runner,
        settings.dask_address,
        warehouse_url=settings.warehouse_url,
        contract=contract,
        loaded=loaded,
        run_id=str(flow_run.id),
        chunk_rows=chunk_rows,
        options=options,
    )


@flow(name="backfill", log_prints=True)
def backfill_flow(
    source: str = "smd",
    start: datetime | None = None,
    end: datetime | None = None,
    alias: str = "champion",
    chunk_rows: int = 50_000,
    event_gap: int = 10,
    event_min_length: int = 1,
    partitions: int = 1,
    task_runner: TaskRunnerKind = "threads",
) -> list[EntityResult]:
    """Re-score ``start <= ts < end`` for every entity; safe to re-run (upserts, same scores).

    Backfills use the static threshold (never the adaptive state) and re-derive the events they
    touch with the same rules as the scheduled flow. ``partitions`` and ``task_runner`` as in
    :func:`scoring_flow`.
    """
    settings = get_settings()
    contract = load_contract(source)
    options = ScoringOptions(event_gap=event_gap, event_min_length=event_min_length)
    start, end = backfill_bounds(start, end)
    loaded = load_model_version_task(settings.model_name, alias)
    check_model_source(loaded, contract)
    groups = split_entities(list_entities_task(settings.warehouse_url, contract), partitions)
    return map_partitions(
        backfill_range_task,
        groups,
        task_runner,
        settings.dask_address,
        warehouse_url=settings.warehouse_url,
        contract=contract,
        loaded=loaded,
        start=start,
        end=end,
        run_id=str(flow_run.id),
        chunk_rows=chunk_rows,
        options=options,
    )
