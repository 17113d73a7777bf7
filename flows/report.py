"""What the CLI prints: flow results as tables, where to look next, and local serving."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from rich.console import Console
from rich.table import Table

from tasks.errors import AtpError
from tasks.settings import get_settings

console = Console()
# Rich cuts tables to 80 columns when stdout is no terminal (a pipe, a log) and COLUMNS is unset,
# leaving headers such as `last_…`; print those that wide instead.
UNCUT_WIDTH = 250


def _table_of_records(records: list[Any], title: str) -> Table:
    table = Table(title=title)
    columns = [f.name for f in dataclasses.fields(records[0])]
    for column in columns:
        table.add_column(column)
    for record in records:
        table.add_row(*(_cell(getattr(record, column)) for column in columns))
    return table


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_cell(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)) and value and all(_is_pair(v) for v in value):
        return ", ".join(f"{k}={_cell(v)}" for k, v in value)  # top_sensors: (sensor, share)
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(v) for v in value) if len(value) <= 8 else f"{len(value)} items"
    return "" if value is None else str(value)


def _is_pair(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[0], str)


def _print(renderable: Any) -> None:
    if not console.is_terminal and not os.environ.get("COLUMNS"):
        console.width = UNCUT_WIDTH
    console.print(renderable)


def print_result(result: Any) -> None:
    """Render a flow's return value: a dataclass, a list of them, or a status with sub-tables."""
    if isinstance(result, list) and not result:
        _print("(none)")
        return
    if isinstance(result, list) and dataclasses.is_dataclass(result[0]):
        _print(_table_of_records(result, type(result[0]).__name__))
        return
    if not dataclasses.is_dataclass(result):
        _print(result)
        return
    scalars = Table(title=type(result).__name__, show_header=False)
    for field in dataclasses.fields(result):
        value = getattr(result, field.name)
        if isinstance(value, (list, tuple)) and value and dataclasses.is_dataclass(value[0]):
            _print(_table_of_records(list(value), field.name))
        else:
            scalars.add_row(field.name, _cell(value))
    _print(scalars)


def print_demo_epilogue() -> None:
    """Where to look after the demo: the MLflow UI on the same store, and SQL for the results."""
    settings = get_settings()
    console.print("\n[bold]Open the MLflow UI on this store:[/bold]")
    console.print(
        f"  .venv/bin/mlflow ui --backend-store-uri {settings.mlflow_tracking_uri} --port 5000"
    )
    console.print("\n[bold]Query the results:[/bold]")
    console.print(f"  warehouse: {settings.warehouse_url}")
    console.print(
        "  SELECT entity, ts, score, threshold, p_value, top_sensors FROM anomaly_scores\n"
        "  WHERE is_anomaly ORDER BY score DESC LIMIT 20;"
    )


def serve_scoring(source: str, *, cron: str, interval: int | None) -> None:
    """Serve the scoring flow on a schedule from this process (Ctrl-C stops it).

    Raises:
        AtpError: an invalid cron expression, or no Prefect server (``PREFECT_API_URL`` unset):
            the temporary API a command starts without one runs no scheduler, so no scheduled
            run would ever start.
        ContractError: no data contract named ``source`` (every scheduled run would fail).
    """
    from prefect.schedules import Cron, Interval
    from prefect.settings import PREFECT_API_URL

    from data_contracts import load_contract
    from flows.scoring import scoring_flow

    try:
        schedule = Interval(interval) if interval is not None else Cron(cron)
    except ValueError as error:
        raise AtpError(f"--cron {cron!r}: {error}") from None
    load_contract(source)
    if not PREFECT_API_URL.value():
        raise AtpError(
            "a schedule needs a Prefect server: run `prefect server start` and set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api"
        )

    scoring_flow.serve(
        name=f"score-{source}", parameters={"source": source}, limit=1, schedule=schedule
    )
