"""Scheduled scoring and backfill flows: score with one model version, write results atomically."""

from __future__ import annotations

from datetime import datetime

from prefect import flow
from prefect.runtime import flow_run

from data_contracts import load_contract
from tasks.registry import load_model_version_task
from tasks.scoring import EntityResult, backfill_range_task, score_new_rows_task
from tasks.settings import get_settings
from tasks.warehouse import list_entities_task


@flow(name="score", log_prints=True)
def scoring_flow(source: str = "smd", alias: str = "champion", chunk_rows: int = 50_000) -> list[EntityResult]:
    """Score every entity's rows after its watermark with ``models:/<name>@<alias>``."""
    settings = get_settings()
    contract = load_contract(source)
    loaded = load_model_version_task(settings.model_name, alias)
    entities = list_entities_task(settings.warehouse_url, contract)
    return [
        score_new_rows_task(settings.warehouse_url, contract, loaded, entity, run_id=str(flow_run.id), chunk_rows=chunk_rows)
        for entity in entities
    ]


@flow(name="backfill", log_prints=True)
def backfill_flow(
    source: str = "smd",
    start: datetime | None = None,
    end: datetime | None = None,
    alias: str = "champion",
    chunk_rows: int = 50_000,
) -> list[EntityResult]:
    """Re-score ``start <= ts < end`` for every entity; safe to re-run (upserts, same scores)."""
    settings = get_settings()
    contract = load_contract(source)
    loaded = load_model_version_task(settings.model_name, alias)
    entities = list_entities_task(settings.warehouse_url, contract)
    return [
        backfill_range_task(
            settings.warehouse_url, contract, loaded, entity, start=start, end=end, run_id=str(flow_run.id), chunk_rows=chunk_rows
        )
        for entity in entities
    ]
