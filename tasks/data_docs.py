"""Great Expectations Data Docs of validation runs: one HTML page per run, kept under ATP_HOME.

Pages live in ``$ATP_HOME/data_docs/<flow run id>/`` (``outside-flow-runs/`` when no Prefect run
is active). Inside a run each page is also linked from it as a Prefect link artifact (key
``data-docs-<contract>``); the training flow logs its run's pages to its MLflow run.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from prefect import task
from prefect.artifacts import create_link_artifact
from prefect.cache_policies import NO_CACHE
from prefect.utilities.context import get_task_and_flow_run_ids

from data_contracts import Contract
from data_contracts.gx_suite import DocsSummary, data_docs_html, suite_name
from tasks.errors import TRANSIENT_RETRIES
from tasks.settings import get_settings

if TYPE_CHECKING:
    from great_expectations.core import ExpectationSuiteValidationResult

OUTSIDE_RUNS = "outside-flow-runs"
MLFLOW_FOLDER = "data_docs"
BROKEN_RULE_COLUMNS = ("rule", "column", "count", "what", "examples")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "contract"


def data_docs_dir(home: Path | None = None) -> Path:
    """The folder of the current Prefect flow run's pages (``home`` defaults to ATP_HOME)."""
    _, flow_run_id = get_task_and_flow_run_ids()
    root = (home or get_settings().home) / "data_docs"
    return root / (str(flow_run_id) if flow_run_id is not None else OUTSIDE_RUNS)


def validation_docs(
    contract: Contract,
    source: str,
    checks: int,
    broken: Sequence[Sequence[str]],
    result: ExpectationSuiteValidationResult | None,
) -> Path:
    """Write one validation run's page and link it from the active Prefect run, if any.

    Args:
        contract: the contract validated against.
        source: what was validated (a file, a table, an entity).
        checks: how many checks ran.
        broken: one row per broken rule (``BROKEN_RULE_COLUMNS``); empty when the run passed.
        result: GX's result of the suite, rendered below the broken rules; None if GX never ran.

    Returns:
        The page.
    """
    title = f"Data contract {contract.name} v{contract.version} on {source}"
    if broken:
        status = f"failed: {len(broken)} rule(s) broken out of {checks} checked"
    else:
        status = f"passed: all {checks} checks"
    rows = tuple(tuple(row) for row in broken)
    summary = DocsSummary(suite_name(contract), title, status, BROKEN_RULE_COLUMNS, rows)
    folder = data_docs_dir()
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    verdict = "failed" if broken else "passed"
    name = f"{stamp}-{_slug(contract.name)}-{verdict}-{secrets.token_hex(2)}.html"
    page = folder / name
    page.write_text(data_docs_html(summary, result), encoding="utf-8")
    if get_task_and_flow_run_ids()[1] is not None:
        create_link_artifact(
            link=page.as_uri(),
            link_text=str(page),
            key=f"data-docs-{_slug(contract.name)}",
            description=f"{title}: {status}",
        )
    return page


def log_data_docs(tracking_uri: str, run_id: str, folder: Path) -> list[str]:
    """Log every page in ``folder`` to the MLflow run under ``data_docs/``; the pages' names."""
    from mlflow.tracking import MlflowClient

    pages = sorted(folder.glob("*.html")) if folder.is_dir() else []
    client = MlflowClient(tracking_uri)
    for page in pages:
        client.log_artifact(run_id, str(page), MLFLOW_FOLDER)
    return [page.name for page in pages]


log_data_docs_task = task(name="log-data-docs", cache_policy=NO_CACHE, **TRANSIENT_RETRIES)(
    log_data_docs
)
