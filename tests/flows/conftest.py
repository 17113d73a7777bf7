"""Flow tests run through a real (temporary) Prefect API, MLflow store and warehouse."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from flows.params import CalibrationParams, ModelParams, TrainFlowParams, TrainingParams

N_SENSORS = 38
TRAIN_ROWS = 300
TEST_ROWS = 200


@pytest.fixture(scope="session", autouse=True)
def flows_run_on_prefect_api(prefect_api: None) -> None:
    """Every flow test talks to the session's temporary Prefect server."""


@pytest.fixture
def atp_env(
    tmp_path: Path, warehouse_url: str, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch
) -> str:
    """Point every setting at fresh state: ATP_HOME, the warehouse under test, an MLflow store."""
    monkeypatch.setenv("ATP_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ATP_WAREHOUSE_URL", warehouse_url)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    monkeypatch.setenv("ATP_MODEL_NAME", "test-model")
    return warehouse_url


def _write_machine(root: Path, name: str, rng: np.random.Generator) -> None:
    t = np.arange(TRAIN_ROWS + TEST_ROWS)
    phases = rng.uniform(0, 2 * np.pi, N_SENSORS)
    values = (
        0.5
        + 0.3 * np.sin(2 * np.pi * t[:, None] / 50 + phases)
        + rng.normal(0, 0.02, (t.size, N_SENSORS))
    )
    labels = np.zeros(TEST_ROWS, dtype=int)
    labels[120:140] = 1
    values[TRAIN_ROWS + 120 : TRAIN_ROWS + 140, :5] += 0.4
    values = np.clip(values, 0, 1)
    for part, rows in (("train", values[:TRAIN_ROWS]), ("test", values[TRAIN_ROWS:])):
        (root / part).mkdir(parents=True, exist_ok=True)
        text = "\n".join(",".join(f"{v:.5f}" for v in row) for row in rows) + "\n"
        with gzip.open(root / part / f"{name}.txt.gz", "wt") as handle:
            handle.write(text)
    (root / "test_label").mkdir(exist_ok=True)
    (root / "test_label" / f"{name}.txt").write_text("\n".join(map(str, labels)) + "\n")


@pytest.fixture
def smd_folder(tmp_path: Path) -> Path:
    """A small SMD layout: two machines of synthetic sine readings with a labelled level shift."""
    root = tmp_path / "smd"
    rng = np.random.default_rng(0)
    for name in ("machine-9-1", "machine-9-2"):
        _write_machine(root, name, rng)
    return root


@pytest.fixture
def tiny_training() -> TrainFlowParams:
    """Models small enough to train in seconds on the CPU: an ensemble of two windows, as the
    product's default."""
    return TrainFlowParams(
        models=[
            ModelParams(win_size=20, d_model=16, n_heads=2, e_layers=1, d_ff=16),
            ModelParams(win_size=12, d_model=8, n_heads=2, e_layers=1, d_ff=8),
        ],
        training=TrainingParams(max_epochs=1, max_steps=15, batch_size=32, stride=2, lr=1e-3),
        calibration=CalibrationParams(alpha=0.02),
        promote=True,
    )
