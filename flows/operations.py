"""Promotion, status and the demo: small flows an operator runs by hand."""

from pathlib import Path

from prefect import flow

from flows.ingest import ingest_flow
from flows.params import DEMO_TRAINING
from flows.scoring import scoring_flow
from flows.training import training_flow
from tasks.contract_infer import ContractDraft, draft_contract_task
from tasks.events import AlarmEvent, list_events_task
from tasks.registry import promote_task
from tasks.settings import get_settings
from tasks.status import Status, collect_status_task

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "data" / "sample"


@flow(name="promote", log_prints=True)
def promote_flow(version: int | None = None) -> int | None:
    """Move ``champion`` to ``version`` (default: the challenger); return the previous one."""
    return promote_task(get_settings().model_name, version)


@flow(name="status")
def status_flow() -> Status:
    """What is in the warehouse and the registry right now."""
    settings = get_settings()
    return collect_status_task(
        settings.warehouse_url, settings.mlflow_tracking_uri, settings.model_name
    )


@flow(name="events")
def events_flow(
    source: str | None = None, open_only: bool = True, limit: int = 100
) -> list[AlarmEvent]:
    """Alarm events, newest first: open ones only unless ``open_only`` is off."""
    return list_events_task(
        get_settings().warehouse_url, source=source, open_only=open_only, limit=limit
    )


@flow(name="draft-contract", log_prints=True)
def contract_flow(
    path: str,
    name: str,
    out: str | None = None,
    overwrite: bool = False,
    columns: dict[str, str] | None = None,
) -> ContractDraft:
    """Draft a data contract for a CSV/Parquet file and write it as YAML for review."""
    target = Path(out) if out else None
    return draft_contract_task(
        Path(path), name=name, out=target, overwrite=overwrite, columns=columns
    )


@flow(name="demo", log_prints=True)
def demo_flow(sample: str = str(SAMPLE_DIR)) -> Status:
    """The main job on embedded defaults: ingest the bundled SMD sample, train, promote, score."""
    ingest_flow(sample, kind="smd", contract="smd")
    training_flow(DEMO_TRAINING)
    scoring_flow(source="smd")
    return status_flow()
