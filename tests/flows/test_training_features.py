"""Training flow features: per-entity calibration, profiles, evaluation extras, the gate, leaks."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import pytest
from mlflow.artifacts import download_artifacts
from mlflow.tracking import MlflowClient

from flows.benchmark import benchmark_flow
from flows.ingest import ingest_flow
from flows.params import CalibrationParams, GateParams, TrainFlowParams
from flows.training import training_flow
from model.drift import TrainingProfile
from tasks.registry import CHAMPION, get_alias_version, load_model_version
from tasks.settings import get_settings


@pytest.fixture
def sqlite_env(
    tmp_path: Path, sqlite_url: str, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch
) -> str:
    """Fresh ATP_HOME, SQLite warehouse and MLflow store (the flows' warehouse code is tested on
    both backends by test_pipeline.py)."""
    monkeypatch.setenv("ATP_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ATP_WAREHOUSE_URL", sqlite_url)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    monkeypatch.setenv("ATP_MODEL_NAME", "features-model")
    return sqlite_url


def _run(version: int) -> tuple[dict[str, float], dict[str, str], dict[str, str]]:
    client = MlflowClient(get_settings().mlflow_tracking_uri)
    run = client.get_run(client.get_model_version("features-model", str(version)).run_id)
    return run.data.metrics, run.data.tags, run.data.params


def test_per_entity_calibration_gate_and_leaky_reference(
    sqlite_env: str, smd_folder: Path, tiny_training: TrainFlowParams, tmp_path: Path
) -> None:
    ingest_flow(str(smd_folder), kind="smd")
    per_entity = tiny_training.model_copy(
        update={
            "calibration": CalibrationParams(alpha=0.02, scope="entity"),
            "gate": GateParams(false_alarm_budget=0.5),
        }
    )
    first = training_flow(per_entity)
    assert get_alias_version("features-model", CHAMPION) == first.version
    extras = load_model_version("features-model", CHAMPION).extras
    entities = {"machine-9-1", "machine-9-2"}
    assert set(extras["thresholds"]) == set(extras["entity_calibration_scores"]) == entities
    assert isinstance(extras["threshold"], float) and extras["calibration"]["scope"] == "entity"
    profile = TrainingProfile.from_dict(extras["training_profiles"]["machine-9-1"])
    assert (
        profile.n_sensors == 38 and 0.0 <= min(profile.sketch[0]) <= max(profile.sketch[0]) <= 1.0
    )

    metrics, tags, _ = _run(first.version)
    assert {f"test_fpr_normal.{e}" for e in entities} <= set(metrics)
    assert 0.0 <= metrics["control_random_auc_pr"] <= 1.0 and "control_random_pa_f1" in metrics
    assert tags["gate.decision"] == "promoted" and tags["leaks_test_data"] == "false"
    figures = download_artifacts(run_id=first.run_id, artifact_path="figures", dst_path=tmp_path)
    plots = sorted(Path(figures).glob("*.png"))
    assert len(plots) == 2 and matplotlib.image.imread(plots[0]).shape[2] in (3, 4)
    assert list((tmp_path / "home" / "runs" / "smd").iterdir()) == [], "a training run left files"

    leaky = tiny_training.model_copy(
        update={"calibration": CalibrationParams(method="reference", alpha=0.02)}
    )
    second = training_flow(leaky)
    metrics, tags, params = _run(second.version)
    assert tags["leaks_test_data"] == "true" and "LEAKS TEST DATA" in tags["calibration_warning"]
    assert params["calibration_method"] == "reference (LEAKS TEST DATA)"
    assert tags["gate.decision"] == "rejected" and "leaky" in tags["gate.reason"]
    assert get_alias_version("features-model", CHAMPION) == first.version


def test_benchmark_flow_writes_tables_and_logs_them(
    sqlite_env: str, smd_folder: Path, tmp_path: Path
) -> None:
    tables = benchmark_flow(
        str(smd_folder), detectors=("random", "pca"), seeds=(0, 1), out_dir=str(tmp_path / "b")
    )
    assert (
        tables.markdown.read_text().count("\n") == 4 and tables.summary.loc["random", "runs"] == 4
    )
    client = MlflowClient(get_settings().mlflow_tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("atp-benchmark").experiment_id])
    assert 0.0 <= run.data.metrics["pca.honest_vus_pr_mean"] <= 1.0
    assert "LEAKS TEST DATA" in run.data.tags["reference_protocol"]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {
        "benchmark.csv",
        "benchmark.md",
    }


def test_the_training_flow_trains_each_network_in_torchrun_workers(
    sqlite_env: str, smd_folder: Path, tiny_training: TrainFlowParams
) -> None:
    """``training.processes``: data-parallel training through ``model.distributed`` (gloo CPU
    processes here; by default one process per GPU where several are present)."""
    ingest_flow(str(smd_folder), kind="smd")
    training = tiny_training.training.model_copy(update={"processes": 2, "device": "cpu"})
    summary = training_flow(tiny_training.model_copy(update={"training": training}))
    metrics, _, params = _run(summary.version)
    assert metrics["member0.processes"] == metrics["member1.processes"] == 2.0
    assert params["training.processes"] == "2" and "member1.val_rec" in metrics
