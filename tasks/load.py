"""Ingest: read → coerce to warehouse columns → validate the whole load → one upsert transaction."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from data_contracts import Contract, load_contract
from data_contracts.contract import (
    CONTRACT_DIR,
    is_contract_path,
    list_contracts,
    user_contract_dir,
)
from tasks.errors import DataContractError, IngestError
from tasks.ingest import read_smd, read_table, to_wide
from tasks.loaders import LOADERS
from tasks.scores_store import late_rows
from tasks.validate import coerce_readings, validate_readings
from tasks.warehouse import ensure_schema, get_engine, read_transaction, upsert_readings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestSummary:
    """What one ingest run read, how many rows were new to the warehouse, and the entities whose
    rows before their scoring watermark hold no score (late: only a backfill scores them)."""

    source: str
    path: str
    rows_read: int
    rows_new: int
    entities: tuple[str, ...]
    skipped: tuple[str, ...]
    late: tuple[str, ...] = ()


def load_frame(
    warehouse_url: str,
    contract: Contract,
    frame: pd.DataFrame,
    *,
    path: Path,
    skipped: list[str],
    notes: Sequence[str] = (),
) -> IngestSummary:
    """Validate every row before writing any; then one idempotent upsert."""
    readings = coerce_readings(frame, contract, source=str(path))
    validate_readings(readings, contract, source=str(path))
    engine = get_engine(warehouse_url)
    try:
        ensure_schema(engine, contract)
        rows_new = upsert_readings(engine, contract, readings)
    except DataContractError as error:  # rows contradicting stored ones: name the file too
        raise DataContractError(f"{path}: {error.report}") from error
    for reason in skipped:
        log.warning("skipped %s", reason)
    for note in notes:
        log.info("repaired %s", note)
    entities = tuple(sorted(readings["entity"].astype(str).unique()))
    with read_transaction(engine) as conn:
        late = list(late_rows(conn, contract.name, entities).values())
    if late:
        start, end = min(r.first_ts for r in late), max(r.watermark for r in late)
        log.warning(
            "%d rows of %d entities lie before their scoring watermark, which scheduled scoring "
            "has passed; to score them: atp backfill --source %s --start %s --end %s",
            sum(r.rows for r in late),
            len(late),
            contract.name,
            start.isoformat(),
            end.isoformat(),
        )
    return IngestSummary(
        contract.name,
        str(path),
        len(readings),
        rows_new,
        entities,
        tuple(skipped),
        tuple(str(r) for r in late),
    )


def ingest_smd(warehouse_url: str, root: Path, contract_name: str = "smd") -> IngestSummary:
    """Load SMD's published layout (train then test rows per machine, test labels)."""
    loaded = read_smd(root)
    return load_frame(
        warehouse_url,
        load_contract(contract_name),
        loaded.frame,
        path=root,
        skipped=list(loaded.skipped),
    )


def ingest_benchmark(
    warehouse_url: str, kind: str, root: Path, contract_name: str | None = None
) -> IngestSummary:
    """Load a public benchmark in its published layout (``LOADERS``) through its contract."""
    if kind not in LOADERS:
        raise IngestError(f"unknown layout {kind!r}; known: {sorted(LOADERS)}")
    loaded = LOADERS[kind](Path(root))
    contract = load_contract(contract_name or kind)
    return load_frame(
        warehouse_url,
        contract,
        loaded.frame,
        path=Path(root),
        skipped=loaded.skipped,
        notes=loaded.notes,
    )


def register_contract(contract_path: Path) -> Path:
    """Copy a contract file to ``user_contract_dir()`` so that train and score find it by name
    (a bundled contract's name already resolves to the bundled file)."""
    contract = load_contract(contract_path)
    if contract.name in list_contracts():
        return CONTRACT_DIR / f"{contract.name}.yaml"
    target = user_contract_dir() / f"{contract.name}.yaml"
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_suffix(f".{os.getpid()}.tmp")
    staging.write_bytes(Path(contract_path).read_bytes())
    os.replace(staging, target)
    return target


def ingest_table(warehouse_url: str, path: Path, contract_name: str) -> IngestSummary:
    """Load a CSV or Parquet file (wide or long layout) through its data contract.

    A contract given as a YAML path is registered under its name once the load succeeds, so
    ``train --source NAME`` and ``score --source NAME`` use the same rules.
    """
    contract = load_contract(contract_name)
    by_path = is_contract_path(contract_name)
    if by_path and contract.name in list_contracts() and load_contract(contract.name) != contract:
        raise IngestError(
            f"{contract_name}: name {contract.name!r} belongs to a bundled "
            "contract; choose another name"
        )
    frame = to_wide(read_table(path, contract), contract, source=str(path))
    summary = load_frame(warehouse_url, contract, frame, path=path, skipped=[])
    if by_path:
        log.info(
            "contract %s registered at %s", contract.name, register_contract(Path(contract_name))
        )
    return summary


ingest_smd_task = task(name="ingest-smd", cache_policy=NO_CACHE)(ingest_smd)
ingest_table_task = task(name="ingest-table", cache_policy=NO_CACHE)(ingest_table)
ingest_benchmark_task = task(name="ingest-benchmark", cache_policy=NO_CACHE)(ingest_benchmark)
