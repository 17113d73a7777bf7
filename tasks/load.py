"""Ingest: read → coerce to warehouse columns → validate the whole load → upsert in one transaction."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from data_contracts import Contract, load_contract
from tasks.ingest import read_smd, read_table
from tasks.validate import coerce_readings, validate_readings
from tasks.warehouse import ensure_schema, get_engine, upsert_readings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestSummary:
    """What one ingest run read and how many rows were new to the warehouse."""

    source: str
    path: str
    rows_read: int
    rows_new: int
    entities: tuple[str, ...]
    skipped: tuple[str, ...]


def load_frame(
    warehouse_url: str, contract: Contract, frame: pd.DataFrame, *, path: Path, skipped: list[str]
) -> IngestSummary:
    """Validate every row before writing any; then one idempotent upsert."""
    readings = coerce_readings(frame, contract, source=str(path))
    validate_readings(readings, contract, source=str(path))
    engine = get_engine(warehouse_url)
    ensure_schema(engine, contract)
    rows_new = upsert_readings(engine, contract, readings)
    for reason in skipped:
        log.warning("skipped %s", reason)
    entities = tuple(sorted(readings["entity"].astype(str).unique()))
    return IngestSummary(contract.name, str(path), len(readings), rows_new, entities, tuple(skipped))


def ingest_smd(warehouse_url: str, root: Path, contract_name: str = "smd") -> IngestSummary:
    """Load SMD's published layout (train then test rows per machine, test labels)."""
    loaded = read_smd(root)
    return load_frame(
        warehouse_url, load_contract(contract_name), loaded.frame, path=root, skipped=list(loaded.skipped)
    )


def ingest_table(warehouse_url: str, path: Path, contract_name: str) -> IngestSummary:
    """Load a CSV or Parquet file through its data contract."""
    contract = load_contract(contract_name)
    return load_frame(warehouse_url, contract, read_table(path, contract), path=path, skipped=[])


ingest_smd_task = task(name="ingest-smd", cache_policy=NO_CACHE)(ingest_smd)
ingest_table_task = task(name="ingest-table", cache_policy=NO_CACHE)(ingest_table)
