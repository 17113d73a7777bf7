"""Ingest flow: read a source's files, validate them against its contract, upsert the warehouse."""

from pathlib import Path
from typing import Literal

from prefect import flow

from tasks.load import IngestSummary, ingest_benchmark_task, ingest_smd_task, ingest_table_task
from tasks.settings import get_settings

Kind = Literal["smd", "csv", "parquet", "nab", "skab", "ucr", "smap", "msl", "psm", "swat"]


@flow(name="ingest", log_prints=True)
def ingest_flow(path: str, kind: Kind = "smd", contract: str | None = None) -> IngestSummary:
    """Load ``path`` idempotently: loading the same files again changes nothing.

    ``csv``/``parquet`` read through ``contract`` (a name or a YAML path; default ``smd``); a
    benchmark layout uses its bundled contract of the same name unless ``contract`` names another.
    """
    warehouse_url = get_settings().warehouse_url
    if kind == "smd":
        return ingest_smd_task(warehouse_url, Path(path), contract or "smd")
    if kind in ("csv", "parquet"):
        return ingest_table_task(warehouse_url, Path(path), contract or "smd")
    return ingest_benchmark_task(warehouse_url, kind, Path(path), contract)
