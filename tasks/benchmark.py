"""Benchmark detectors on a dataset in SMD layout under the reference and the honest protocol.

Per machine: the fit part is the first ``1 - val_fraction`` of ``train`` (z-scored with its
statistics), the validation tail the rest. Each detector is fitted on the fit part and scores
train and test in one streaming pass.

* Honest protocol: the split-conformal threshold at ``alpha`` on the validation-tail scores;
  threshold-free VUS-PR / AUC-PR / AUROC and point-wise F1 and false-alarm rate on normal points.
* Reference protocol (the paper's, LEAKS TEST DATA): the percentile ``100 - anomaly_ratio`` of
  train + test scores as threshold, then point adjustment (``reference_pa_f1``).

Detectors with a seed (``random``, ``anomaly_transformer``) run once per seed; deterministic ones
run once. The Anomaly Transformer is trained per machine (``AT_MODEL``, ``AT_TRAINING``: a small
model, few epochs) with the validation tail for early stopping; its honest score is
``recon_last`` and its reference score the paper's ``reference`` (train and test scored apart).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from model.baselines import make_detector
from model.config import ModelConfig, TrainConfig
from model.metrics import auc_pr, auroc, pa_f1, point_metrics, vus_pr
from model.scaling import Scaler
from model.scoring import score_series
from model.thresholds import conformal_threshold, leaky_reference_threshold
from model.train import fit
from tasks.errors import IngestError
from tasks.registry import configure_tracking
from tasks.settings import Settings

log = logging.getLogger(__name__)

DETECTOR_PARAMS: dict[str, dict[str, Any]] = {
    "random": {},
    "pca": {"variance": 0.95},
    "max_z": {},
    "knn": {"window": 10, "k": 5, "stride": 2},
}
AT = "anomaly_transformer"
AT_MODEL = {"win_size": 100, "d_model": 128, "n_heads": 8, "e_layers": 3, "d_ff": 128}
AT_TRAINING = {"lr": 1e-4, "batch_size": 256, "max_epochs": 3, "stride": 5, "progress": False}
SEEDED = frozenset({"random", AT})
METRICS = (
    "honest_vus_pr", "honest_auc_pr", "honest_auroc", "honest_f1", "honest_fpr_normal",
    "reference_pa_f1", "reference_f1",
)  # fmt: skip
EXPERIMENT = "atp-benchmark"


@dataclass(frozen=True)
class Machine:
    """One entity of an SMD-layout folder: train rows, test rows and test labels."""

    name: str
    train: np.ndarray
    test: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class BenchmarkTables:
    """The per-run rows (CSV), the summary table (markdown) and the summary itself."""

    csv: Path
    markdown: Path
    summary: pd.DataFrame


def smd_machines(root: Path) -> list[str]:
    """Machines with ``train/``, ``test/`` and ``test_label/`` files (``.txt`` or ``.txt.gz``)."""
    names = {p.name.split(".txt")[0] for p in (root / "train").glob("*.txt*")}
    found = sorted(
        n
        for n in names
        if list((root / "test").glob(f"{n}.txt*")) and list((root / "test_label").glob(f"{n}.txt*"))
    )
    if not found:
        raise IngestError(
            f"{root}: no machine has train/, test/ and test_label/ files (SMD layout)"
        )
    return found


def load_machine(root: Path, name: str) -> Machine:
    """One machine's arrays; a label count that differs from the test rows is an error."""
    (train_file,), (test_file,) = (
        (root / "train").glob(f"{name}.txt*"),
        (root / "test").glob(f"{name}.txt*"),
    )
    (label_file,) = (root / "test_label").glob(f"{name}.txt*")
    train = np.loadtxt(train_file, delimiter=",", dtype=np.float64, ndmin=2)
    test = np.loadtxt(test_file, delimiter=",", dtype=np.float64, ndmin=2)
    labels = np.loadtxt(label_file, dtype=np.int64, ndmin=1)
    if labels.shape[0] != test.shape[0]:
        raise IngestError(
            f"{label_file}: {labels.shape[0]} labels for {test.shape[0]} rows of {test_file}"
        )
    return Machine(name, train, test, labels)


def transformer_scores(
    rows: np.ndarray, n_fit: int, n_train: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Train a small Anomaly Transformer on ``rows[:n_fit]``; (honest, reference) scores."""
    values = rows.astype(np.float32)
    cfg, train_cfg = (
        ModelConfig(n_channels=rows.shape[1], **AT_MODEL),
        TrainConfig(seed=seed, **AT_TRAINING),
    )
    tail = values[n_fit:n_train]
    model = fit(cfg, train_cfg, [values[:n_fit]], [tail] if len(tail) >= cfg.win_size else []).model
    honest = score_series(model, values, "recon_last", batch_size=1024).scores
    parts = (values[:n_train], values[n_train:])
    reference = [score_series(model, part, "reference", batch_size=1024).scores for part in parts]
    return honest, np.concatenate(reference)


def detector_scores(
    name: str, seed: int | None, rows: np.ndarray, n_fit: int, n_train: int
) -> tuple[np.ndarray, np.ndarray]:
    """(honest, reference) scores of train + test; the same array for a baseline detector."""
    if name == AT:
        return transformer_scores(rows, n_fit, n_train, seed or 0)
    params = DETECTOR_PARAMS[name] | ({} if seed is None else {"seed": seed})
    scores = make_detector(name, **params).fit(rows[:n_fit]).score(rows)
    return scores, scores


def protocol_metrics(
    scores: tuple[np.ndarray, np.ndarray],
    n_fit: int,
    n_train: int,
    labels: np.ndarray,
    alpha: float,
    anomaly_ratio: float,
) -> dict[str, float]:
    """Both protocols' metrics from (honest, reference) scores of train + test (``n_train`` rows
    of train)."""
    validation, test = scores[0][n_fit:n_train], scores[0][n_train:]
    honest = test > conformal_threshold(validation, alpha)
    train_ref, test_ref = scores[1][:n_train], scores[1][n_train:]
    leaky = test_ref > leaky_reference_threshold(train_ref, test_ref, anomaly_ratio)
    return {
        "honest_vus_pr": vus_pr(labels, test),
        "honest_auc_pr": auc_pr(labels, test),
        "honest_auroc": auroc(labels, test),
        "honest_f1": point_metrics(labels, honest)["f1"],
        "honest_fpr_normal": float(honest[labels == 0].mean()),
        "reference_pa_f1": pa_f1(labels, leaky),
        "reference_f1": point_metrics(labels, leaky)["f1"],
    }


def benchmark_machine(
    machine: Machine,
    detectors: list[str],
    seeds: list[int],
    alpha: float,
    anomaly_ratio: float,
    val_fraction: float,
) -> list[dict[str, Any]]:
    """Rows of (detector, machine, seed, metrics) for one machine."""
    n_train = machine.train.shape[0]
    n_fit = int(round((1 - val_fraction) * n_train))
    rows = Scaler.fit(machine.train[:n_fit]).transform(
        np.concatenate((machine.train, machine.test))
    )
    results = []
    for name in detectors:
        for seed in seeds if name in SEEDED else [None]:
            scores = detector_scores(name, seed, rows, n_fit, n_train)
            metrics = protocol_metrics(scores, n_fit, n_train, machine.labels, alpha, anomaly_ratio)
            results.append({"detector": name, "machine": machine.name, "seed": seed, **metrics})
            log.info(
                "%s %s seed %s: VUS-PR %.3f", machine.name, name, seed, metrics["honest_vus_pr"]
            )
    return results


def run_benchmark(
    root: Path,
    detectors: list[str],
    seeds: list[int],
    *,
    alpha: float = 0.005,
    anomaly_ratio: float = 0.5,
    val_fraction: float = 0.2,
) -> pd.DataFrame:
    """Every detector on every machine of ``root``: one row per (detector, machine, seed)."""
    known = [*DETECTOR_PARAMS, AT]
    unknown = sorted(set(detectors) - set(known))
    if unknown:
        raise ValueError(f"unknown detectors {unknown}: choose from {sorted(known)}")
    rows = []
    for name in smd_machines(root):
        rows += benchmark_machine(
            load_machine(root, name), detectors, seeds, alpha, anomaly_ratio, val_fraction
        )
    return pd.DataFrame(rows)


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation of each metric over machines and seeds, per detector."""
    grouped = rows.groupby("detector", sort=False)[list(METRICS)]
    summary = grouped.mean().add_suffix("_mean").join(grouped.std(ddof=0).add_suffix("_std"))
    summary.insert(0, "runs", rows.groupby("detector", sort=False).size())
    return summary


def markdown_table(summary: pd.DataFrame) -> str:
    """``mean ± std`` per metric, one row per detector."""
    header = "| detector | runs | " + " | ".join(METRICS) + " |"
    lines = [header, "|" + "---|" * (len(METRICS) + 2)]
    for detector, row in summary.iterrows():
        cells = [f"{row[f'{m}_mean']:.3f} ± {row[f'{m}_std']:.3f}" for m in METRICS]
        lines.append(f"| {detector} | {int(row['runs'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_tables(rows: pd.DataFrame, out_dir: Path) -> BenchmarkTables:
    """``benchmark.csv`` (every run) and ``benchmark.md`` (the summary) under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarise(rows)
    csv, markdown = out_dir / "benchmark.csv", out_dir / "benchmark.md"
    rows.to_csv(csv, index=False, float_format="%.6g")
    markdown.write_text(markdown_table(summary))
    return BenchmarkTables(csv, markdown, summary)


def log_benchmark(settings: Settings, tables: BenchmarkTables, params: dict[str, Any]) -> str:
    """One MLflow run in ``atp-benchmark``: params, ``<detector>.<metric>_mean`` metrics, tables."""
    experiment = configure_tracking(
        settings.mlflow_tracking_uri, settings.artifact_root, EXPERIMENT
    )
    with mlflow.start_run(experiment_id=experiment, run_name="benchmark") as run:
        mlflow.set_tag("reference_protocol", "LEAKS TEST DATA (threshold from train + test scores)")
        mlflow.log_params({k: str(v) for k, v in params.items()})
        for detector, row in tables.summary.iterrows():
            mlflow.log_metrics(
                {f"{detector}.{k}": float(v) for k, v in row.items() if k.endswith("_mean")}
            )
        mlflow.log_artifact(str(tables.csv))
        mlflow.log_artifact(str(tables.markdown))
    return str(run.info.run_id)


run_benchmark_task = task(name="run-benchmark", cache_policy=NO_CACHE)(run_benchmark)
write_tables_task = task(name="write-benchmark-tables", cache_policy=NO_CACHE)(write_tables)
log_benchmark_task = task(name="log-benchmark", cache_policy=NO_CACHE)(log_benchmark)
