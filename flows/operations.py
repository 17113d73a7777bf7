"""Promotion, status and the demo: small flows an operator runs by hand."""

from pathlib import Path

from prefect import flow

from flows.ingest import ingest_flow
from flows.params import DEMO_TRAINING
from flows.scoring import scoring_flow
from flows.training import training_flow
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


@flow(name="demo", log_prints=True)
def demo_flow(sample: str = str(SAMPLE_DIR)) -> Status:
    """The main job on embedded defaults: ingest the bundled SMD sample, train, promote, score."""
    ingest_flow(sample, kind="smd", contract="smd")
    training_flow(DEMO_TRAINING)
    scoring_flow(source="smd")
    return status_flow()
