"""Ingest flow: read a source file set, validate it against its contract, upsert into the warehouse."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect import flow

from tasks.load import IngestSummary, ingest_smd_task, ingest_table_task
from tasks.settings import get_settings


@flow(name="ingest", log_prints=True)
def ingest_flow(
    path: str, kind: Literal["smd", "csv", "parquet"] = "smd", contract: str = "smd"
) -> IngestSummary:
    """Load ``path`` idempotently: loading the same files again changes nothing."""
    warehouse_url = get_settings().warehouse_url
    if kind == "smd":
        return ingest_smd_task(warehouse_url, Path(path), contract)
    return ingest_table_task(warehouse_url, Path(path), contract)
