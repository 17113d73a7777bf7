"""Benchmark detectors on any layout the loaders read, under the reference and the honest protocol.

Per entity (``tasks.benchmark_entities``: the same split and skips for every layout): the fit
part is the first ``1 - val_fraction`` of the training range (z-scored with its statistics), the
validation tail the rest. Each detector is fitted on the fit part and scores train and test in
one streaming pass.

* Honest protocol: the split-conformal threshold at ``alpha`` on the validation-tail scores;
  threshold-free VUS-PR / AUC-PR / AUROC and point-wise F1 and false-alarm rate on normal points.
* Reference protocol (the paper's, LEAKS TEST DATA): the percentile ``100 - anomaly_ratio`` of
  train + test scores as threshold, then point adjustment (``reference_pa_f1``).

Detectors with a seed (``random``, ``anomaly_transformer``, any baseline whose constructor takes
``seed``) run once per seed; deterministic ones run once. The Anomaly Transformer is trained per
entity (``AT_MODEL``, ``AT_TRAINING``: a small model, few epochs) with the validation tail for
early stopping; its honest score is the pipeline's default (``DEFAULT_SCORING_METHOD``, with its
sensor scales from the validation tail, smoothed over ``DEFAULT_SCORE_SMOOTHING`` rows, through
``Checkpoint.score`` as the pipeline scores) and its reference score the paper's ``reference``
(train and test scored apart).
"""

from __future__ import annotations

import inspect
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from model.baselines import DETECTORS, make_detector
from model.checkpoint import Checkpoint
from model.config import (
    DEFAULT_SCORE_SMOOTHING,
    DEFAULT_SCORING_METHOD,
    ModelConfig,
    TrainConfig,
)
from model.metrics import auc_pr, auroc, pa_f1, point_metrics, vus_pr
from model.scaling import Scaler
from model.scoring import score_series
from model.thresholds import conformal_threshold, leaky_reference_threshold
from model.train import fit
from tasks.benchmark_entities import MIN_FIT_ROWS, Entity, select_entities
from tasks.errors import AtpError
from tasks.fit import tail_sensor_scales
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
METRICS = (
    "honest_vus_pr", "honest_auc_pr", "honest_auroc", "honest_f1", "honest_fpr_normal",
    "reference_pa_f1", "reference_f1",
)  # fmt: skip
EXPERIMENT = "atp-benchmark"
ENTITY = "entity"  # the one entity of a per-entity checkpoint


@dataclass(frozen=True)
class BenchmarkRun:
    """One row per (detector, entity, seed) with both protocols' metrics, and the skipped
    entities as ``"<entity>: <reason>"``."""

    rows: pd.DataFrame
    skipped: list[str]


@dataclass(frozen=True)
class BenchmarkTables:
    """The per-run rows (CSV), the summary table (markdown), the summary and the skips."""

    csv: Path
    markdown: Path
    summary: pd.DataFrame
    skipped: list[str]


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
    method = DEFAULT_SCORING_METHOD
    if n_train > n_fit:  # the validation tail, led by up to win_size - 1 fit rows of context
        begin = max(0, n_fit - (cfg.win_size - 1))
        scales = tail_sensor_scales(model, values[begin:n_train], n_fit - begin, method)
    else:
        scales = tail_sensor_scales(model, values[:n_fit], 0, method)
    extras = {
        "scoring_method": method,
        "score_smoothing": DEFAULT_SCORE_SMOOTHING,
        "sensor_scales": {ENTITY: scales},
    }
    checkpoint = Checkpoint(model.eval(), cfg, extras)
    honest = checkpoint.score(values, entity=ENTITY, batch_size=1024).scores
    parts = (values[:n_train], values[n_train:])
    reference = [score_series(model, part, "reference", batch_size=1024).scores for part in parts]
    return honest, np.concatenate(reference)


def detector_scores(
    name: str, seed: int | None, rows: np.ndarray, n_fit: int, n_train: int
) -> tuple[np.ndarray, np.ndarray]:
    """(honest, reference) scores of train + test; the same array for a baseline detector."""
    if name == AT:
        return transformer_scores(rows, n_fit, n_train, seed or 0)
    params = DETECTOR_PARAMS.get(name, {}) | ({} if seed is None else {"seed": seed})
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


def seeded(name: str) -> bool:
    """Whether ``name`` runs once per seed: the Anomaly Transformer or a baseline taking a seed."""
    return name == AT or "seed" in inspect.signature(DETECTORS[name]).parameters


def benchmark_entity(
    entity: Entity,
    detectors: list[str],
    seeds: list[int],
    alpha: float,
    anomaly_ratio: float,
    val_fraction: float,
) -> list[dict[str, Any]]:
    """Rows of (detector, entity, seed, validation rows, metrics) for one entity."""
    n_train, n_fit = entity.train.shape[0], entity.fit_rows(val_fraction)
    rows = Scaler.fit(entity.train[:n_fit]).transform(np.concatenate((entity.train, entity.test)))
    results = []
    for name in detectors:
        for seed in seeds if seeded(name) else [None]:
            scores = detector_scores(name, seed, rows, n_fit, n_train)
            metrics = protocol_metrics(scores, n_fit, n_train, entity.labels, alpha, anomaly_ratio)
            run = {
                "detector": name,
                "entity": entity.name,
                "seed": seed,
                "val_rows": n_train - n_fit,
            }
            results.append(run | metrics)
            log.info(
                "%s %s seed %s: VUS-PR %.3f", entity.name, name, seed, metrics["honest_vus_pr"]
            )
    return results


def _repeated(values: list[Any]) -> list[Any]:
    return sorted({value for value in values if values.count(value) > 1})


def check_options(
    detectors: list[str], seeds: list[int], alpha: float, anomaly_ratio: float, min_fit_rows: int
) -> None:
    """Refuse, before any entity is read, options that would crash a run half-way or write a
    misleading table (a detector or seed counted twice, a seeded detector with no seed).

    Raises:
        AtpError: naming the option and the values it accepts.
    """
    known = [*DETECTORS, AT]
    unknown = sorted(set(detectors) - set(known))
    problems = [f"unknown detectors {unknown}: choose from {sorted(known)}"] if unknown else []
    if not detectors:
        problems.append(f"no detector given: choose from {sorted(known)}")
    for name, values in (("detectors", detectors), ("seeds", seeds)):
        if _repeated(values):
            problems.append(f"{name} {_repeated(values)} given more than once")
    if any(seed < 0 for seed in seeds):
        problems.append(f"seeds must be integers >= 0, got {[seed for seed in seeds if seed < 0]}")
    needing = [name for name in detectors if name in known and seeded(name)]
    if needing and not seeds:
        problems.append(f"no seed given for the seeded detectors {needing}")
    if not 0.0 < alpha < 1.0:
        problems.append(f"alpha must be in (0, 1), got {alpha}")
    if not 0.0 < anomaly_ratio < 100.0:
        problems.append(f"anomaly_ratio must be a percentage in (0, 100), got {anomaly_ratio}")
    if AT in detectors and min_fit_rows < AT_MODEL["win_size"]:
        problems.append(
            f"{AT} trains on windows of {AT_MODEL['win_size']} rows: min_fit_rows must be at least "
            f"that, got {min_fit_rows}"
        )
    if problems:
        raise AtpError("; ".join(problems))


def run_benchmark(
    root: Path,
    detectors: list[str],
    seeds: list[int],
    *,
    layout: str = "smd",
    alpha: float = 0.005,
    anomaly_ratio: float = 0.5,
    val_fraction: float = 0.2,
    min_fit_rows: int = MIN_FIT_ROWS,
) -> BenchmarkRun:
    """Every detector on every entity of ``root`` (in ``layout``) that can be benchmarked.

    Raises:
        AtpError: bad options (``check_options``); IngestError: nothing to benchmark.
    """
    check_options(detectors, seeds, alpha, anomaly_ratio, min_fit_rows)
    selection = select_entities(root, layout, val_fraction=val_fraction, min_fit_rows=min_fit_rows)
    for skip in selection.skipped:
        log.info("skipped %s", skip)
    rows = []
    for entity in selection.entities:
        rows += benchmark_entity(entity, detectors, seeds, alpha, anomaly_ratio, val_fraction)
    return BenchmarkRun(pd.DataFrame(rows), selection.skipped)


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation of each metric over entities and seeds, per detector."""
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


def prepare_out_dir(out_dir: Path) -> Path:
    """Create ``out_dir`` and check that files can be written there, before a run that may take
    hours.

    Raises:
        AtpError: the folder cannot be created or written to.
    """
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()
    except OSError as error:
        raise AtpError(f"cannot write the benchmark tables to {out_dir}: {error}") from error
    return out_dir


def write_tables(run: BenchmarkRun, out_dir: Path) -> BenchmarkTables:
    """``benchmark.csv`` (every run) and ``benchmark.md`` (the summary, then the skipped
    entities) under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarise(run.rows)
    csv, markdown = out_dir / "benchmark.csv", out_dir / "benchmark.md"
    run.rows.to_csv(csv, index=False, float_format="%.6g")
    skipped = "".join(f"- {skip}\n" for skip in run.skipped)
    header = f"\nSkipped {len(run.skipped)} entities:\n\n" if run.skipped else ""
    markdown.write_text(markdown_table(summary) + header + skipped)
    return BenchmarkTables(csv, markdown, summary, run.skipped)


def log_benchmark(settings: Settings, tables: BenchmarkTables, params: dict[str, Any]) -> str:
    """One MLflow run in ``atp-benchmark``: params, ``<detector>.<metric>_mean`` metrics, tables."""
    experiment = configure_tracking(
        settings.mlflow_tracking_uri, settings.artifact_root, EXPERIMENT
    )
    with mlflow.start_run(experiment_id=experiment, run_name="benchmark") as run:
        mlflow.set_tag("reference_protocol", "LEAKS TEST DATA (threshold from train + test scores)")
        mlflow.log_params({k: str(v) for k, v in params.items()})
        mlflow.log_metric("entities_skipped", len(tables.skipped))
        for detector, row in tables.summary.iterrows():
            mlflow.log_metrics(
                {f"{detector}.{k}": float(v) for k, v in row.items() if k.endswith("_mean")}
            )
        mlflow.log_artifact(str(tables.csv))
        mlflow.log_artifact(str(tables.markdown))
    return str(run.info.run_id)


run_benchmark_task = task(name="run-benchmark", cache_policy=NO_CACHE)(run_benchmark)
prepare_out_dir_task = task(name="prepare-benchmark-out-dir", cache_policy=NO_CACHE)(
    prepare_out_dir
)
write_tables_task = task(name="write-benchmark-tables", cache_policy=NO_CACHE)(write_tables)
log_benchmark_task = task(name="log-benchmark", cache_policy=NO_CACHE)(log_benchmark)
