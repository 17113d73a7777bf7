"""Log a training run to MLflow and register its model: the last step of the training flow."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from data_contracts import Contract
from tasks.calibrate import LEAK_WARNING, Calibration
from tasks.evaluate import Evaluation
from tasks.fit import TrainedModel
from tasks.registry import configure_tracking, log_and_register
from tasks.settings import Settings
from tasks.warehouse import get_engine, read_readings
from tasks.windowing import DatasetRef


@dataclass(frozen=True)
class TrainingSummary:
    """What a training run produced: the registered version and its headline numbers."""

    source: str
    model_name: str
    version: int
    run_id: str
    entities: int
    skipped: tuple[str, ...]
    threshold: float
    train_seconds: float
    metrics: dict[str, float]
    promotion: str = "not asked (promote off): challenger"


def evaluation_metrics(evaluation: Evaluation) -> dict[str, float]:
    """Mean test metrics, each entity's false-alarm rate on normal points, the random control."""
    metrics = {f"test_{k}": v for k, v in evaluation.metrics.items()}
    metrics |= {f"test_fpr_normal.{e}": m["fpr_normal"] for e, m in evaluation.per_entity.items()}
    metrics |= {f"control_random_{k}": v for k, v in evaluation.random_control.items()}
    return metrics


def run_tags(contract: Contract, calibration: Calibration) -> dict[str, str]:
    """Source tags, and the leak label that a ``reference`` calibration carries everywhere."""
    tags = {
        "source": contract.name,
        "contract_version": str(contract.version),
        "leaks_test_data": str(calibration.leaks_test_data).lower(),
    }
    if calibration.leaks_test_data:
        tags["calibration_warning"] = LEAK_WARNING
    return tags


def publish(
    settings: Settings,
    contract: Contract,
    params: dict[str, Any],
    dataset: DatasetRef,
    trained: TrainedModel,
    calibration: Calibration,
    evaluation: Evaluation,
) -> TrainingSummary:
    """One MLflow run (params, metrics, curves, plots) and a new model version, the challenger."""
    configure_tracking(settings.mlflow_tracking_uri, settings.artifact_root)
    metrics = evaluation_metrics(evaluation)
    metrics |= {
        "threshold": calibration.threshold,
        "calibration_scores": float(calibration.n_scores),
        "train_seconds": trained.seconds,
        "n_parameters": float(trained.n_parameters),
        "entities_trained": float(len(dataset.entities)),
    }
    example = read_readings(
        get_engine(settings.warehouse_url), contract, entity=dataset.entities[0]
    )
    registered = log_and_register(
        checkpoint_path=calibration.checkpoint,
        model_name=settings.model_name,
        run_name=f"train-{contract.name}",
        params={
            **params,
            "calibration_method": calibration.label,
            "calibration_scope": calibration.scope,
        },
        metrics=metrics,
        history=trained.history,
        figures={path.stem: path for path in evaluation.figures},
        tags=run_tags(contract, calibration),
        input_example=example.head(trained.win_size),
    )
    shown = {k: round(v, 4) for k, v in evaluation.metrics.items() if k in HEADLINE_METRICS}
    return TrainingSummary(
        contract.name,
        registered.name,
        registered.version,
        registered.run_id,
        len(dataset.entities),
        dataset.skipped,
        calibration.threshold,
        round(trained.seconds, 1),
        shown,
    )


HEADLINE_METRICS = ("auc_pr", "auroc", "vus_pr", "f1", "precision", "recall", "pa_f1")

publish_task = task(name="publish-model", cache_policy=NO_CACHE)(publish)
