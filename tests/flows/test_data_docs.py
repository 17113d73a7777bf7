"""Data Docs of the flows' validation runs: kept under ATP_HOME, linked from the Prefect flow run,
and logged to the MLflow run by the training flow; a failed validation has its page too. SQLite
only: the pages do not depend on the warehouse."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from urllib.parse import unquote, urlparse
from uuid import UUID

import pytest
import sqlalchemy as sa
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
)

from data_contracts import load_contract
from flows.ingest import ingest_flow
from flows.params import TrainFlowParams
from flows.scoring import scoring_flow
from flows.training import training_flow
from tasks.errors import DataContractError
from tasks.ingest import read_smd
from tasks.settings import get_settings
from tasks.warehouse import get_engine, readings_table


def linked_pages(flow_run_id: UUID) -> dict[Path, str]:
    """Each Data Docs page linked from the flow run (a link artifact), with its description."""
    wanted = ArtifactFilter(
        flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
        key=ArtifactFilterKey(like_="data-docs-%"),
    )
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=wanted)
    pages = {}
    for artifact in artifacts:
        link = str(artifact.data).rsplit("](", 1)[1].removesuffix(")")
        pages[Path(unquote(urlparse(link).path))] = str(artifact.description)
    return pages


def docs_home() -> Path:
    return get_settings().home / "data_docs"


def _rows(url: str) -> int:
    with get_engine(url).connect() as conn:
        return int(conn.scalar(sa.text("SELECT count(*) FROM smd_readings")))


@pytest.mark.parametrize("warehouse_url", ["sqlite"], indirect=True)
def test_failed_ingest_links_the_page_naming_the_broken_rule(
    atp_env: str, smd_folder: Path, tmp_path: Path
) -> None:
    good = ingest_flow(str(smd_folder), kind="smd", return_state=True)
    bad = read_smd(smd_folder).frame.query("entity == 'machine-9-1'").reset_index(drop=True)
    bad.loc[7, "m03"] = 42.0
    (path := tmp_path / "bad.csv").write_text(bad.to_csv(index=False))

    state = ingest_flow(str(path), kind="csv", contract="smd", return_state=True)
    assert state.is_failed()
    with pytest.raises(DataContractError) as caught:
        state.result()
    assert _rows(atp_env) == 1000  # the good load only

    flow_run_id = state.state_details.flow_run_id
    pages = linked_pages(flow_run_id)
    assert len(pages) == 1
    page, description = next(iter(pages.items()))
    assert page.parent == docs_home() / str(flow_run_id)
    assert caught.value.report.endswith(f"Data Docs: {page}")
    assert description.startswith(f"Data contract smd v1 on {path}: failed: 1 rule(s) broken")
    html = page.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>")
    assert "Data contract smd v1" in html and "expect_column_values_to_be_between" in html
    assert "42.0" in html

    (passed,) = linked_pages(good.state_details.flow_run_id)
    assert "-smd-passed-" in passed.name and passed.is_file()


@pytest.mark.parametrize("warehouse_url", ["sqlite"], indirect=True)
def test_training_logs_its_pages_to_mlflow_and_scoring_pages_name_the_rejected_entity(
    atp_env: str, smd_folder: Path, tiny_training: TrainFlowParams, tmp_path: Path
) -> None:
    ingest_flow(str(smd_folder), kind="smd")
    state = training_flow(tiny_training, return_state=True)
    summary = state.result()

    flow_run_id = state.state_details.flow_run_id
    pages = sorted((docs_home() / str(flow_run_id)).glob("*.html"))
    assert len(pages) == 1 and "-smd-passed-" in pages[0].name  # the training range's validation
    assert list(linked_pages(flow_run_id)) == pages
    client = MlflowClient(get_settings().mlflow_tracking_uri)
    logged = [item.path for item in client.list_artifacts(summary.run_id, "data_docs")]
    assert logged == [f"data_docs/{pages[0].name}"]
    copy = Path(client.download_artifacts(summary.run_id, logged[0], str(tmp_path)))
    assert copy.read_bytes() == pages[0].read_bytes()
    assert "Data contract smd v1 on smd_readings (training range)" in copy.read_text()

    table = readings_table(load_contract("smd"), sa.MetaData())
    row = (table.c.entity == "machine-9-2") & (table.c.ts == datetime(2020, 1, 1, 7))
    with get_engine(atp_env).begin() as conn:  # a writer that bypassed ingest's validation
        conn.execute(sa.update(table).where(row).values(m01=99.0))
    scoring = scoring_flow(source="smd", return_state=True)
    with pytest.raises(DataContractError) as caught:
        scoring.result()
    linked = linked_pages(scoring.state_details.flow_run_id)
    verdicts = sorted((d.split(" on ")[1].split(":")[0], "failed" in d) for d in linked.values())
    assert verdicts == [  # the batch of both entities, then each entity alone
        ("smd_readings", True),
        ("smd_readings entity 'machine-9-1'", False),
        ("smd_readings entity 'machine-9-2'", True),
    ]
    (rejected,) = (page for page, d in linked.items() if "machine-9-2': failed" in d)
    assert f"Data Docs: {rejected}" in caught.value.report
    assert "expect_column_values_to_be_between" in rejected.read_text(encoding="utf-8")
