"""Train a model on a windowed dataset and save a self-contained checkpoint.

The model is the Anomaly Transformer (``detector="anomaly_transformer"``) or a baseline detector of
:mod:`model.baselines` fitted per entity on the same scaled fit parts; both checkpoints carry the
same extras, so calibration, evaluation, registration and scoring treat them alike.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from model.checkpoint import save_checkpoint
from model.config import ModelConfig, TrainConfig
from model.detector_checkpoint import SCORING_METHOD, fit_detectors
from model.drift import TrainingProfile
from model.network import AnomalyTransformer
from model.scoring import SENSOR_NORMALISED, score_series, sensor_error_scales
from model.train import fit
from tasks.windowing import DatasetRef


@dataclass(frozen=True)
class TrainedModel:
    """Where the trained weights are and how training went."""

    checkpoint: Path
    history: dict[str, Any]
    seconds: float
    n_parameters: int
    win_size: int


def training_profiles(dataset: DatasetRef) -> dict[str, dict[str, Any]]:
    """Per entity, a :class:`TrainingProfile` of its fit part in raw sensor units (drift tests)."""
    scalers = dataset.scalers()
    profiles = {}
    for entity in dataset.entities:
        scaler, (fit_part, _) = scalers[entity], dataset.load(entity)
        raw = fit_part.astype(np.float64) * scaler.scale + scaler.mean
        profiles[entity] = TrainingProfile.fit(raw).to_dict()
    return profiles


def sensor_scales(
    model: AnomalyTransformer, dataset: DatasetRef, method: str
) -> dict[str, list[float]]:
    """Per entity, each sensor's mean error by ``method``'s base on its validation tail (with the
    fit part as context; on the fit part where there is no tail): the divisors of ``method``."""
    scales = {}
    for entity in dataset.entities:
        values, skip = dataset.tail_with_context(entity, model.cfg.win_size - 1)
        if len(values) == skip:  # no tail
            values = dataset.load(entity)[0]
        scales[entity] = tail_sensor_scales(model, values, skip, method)
    return scales


def tail_sensor_scales(
    model: AnomalyTransformer, values: np.ndarray, skip: int, method: str
) -> list[float]:
    """Each sensor's mean error by ``method``'s base over ``values[skip:]`` (``values[:skip]``:
    context): the divisors of a ``SENSOR_NORMALISED`` method."""
    errors = score_series(model, values, SENSOR_NORMALISED[method], skip=skip).contributions
    return sensor_error_scales(errors).tolist()


AT = "anomaly_transformer"
# Baselines grown from a random seed (training.seed); the others are deterministic.
SEEDED_DETECTORS = frozenset({"isolation_forest"})


def common_extras(dataset: DatasetRef, detector: str, scoring_method: str) -> dict[str, Any]:
    """What every checkpoint carries: source, sensors, scalers, scoring method, drift profiles."""
    return {
        "source": dataset.source,
        "detector": detector,
        "sensors": list(dataset.sensors),
        "scalers": {name: scaler.to_dict() for name, scaler in dataset.scalers().items()},
        "scoring_method": scoring_method,
        "training_profiles": training_profiles(dataset),
    }


def train_model(
    dataset: DatasetRef,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    out_path: Path,
    *,
    scoring_method: str,
    score_smoothing: int,
    detector: str = AT,
) -> TrainedModel:
    """Fit ``detector`` on every entity's fit part and save the checkpoint.

    The Anomaly Transformer stops early on the validation tails and scores with
    ``scoring_method``, each score averaged over the ``score_smoothing`` rows ending at it; a
    baseline ignores those and ``model_cfg``, seeded by ``train_cfg.seed``.
    """
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if detector != AT:
        return fit_baseline(dataset, detector, train_cfg.seed, out_path)
    fit_parts, val_parts = zip(*(dataset.load(entity) for entity in dataset.entities), strict=True)
    started = time.perf_counter()
    result = fit(
        model_cfg,
        train_cfg,
        list(fit_parts),
        [v for v in val_parts if len(v) >= model_cfg.win_size],
    )
    seconds = time.perf_counter() - started
    extras = common_extras(dataset, AT, scoring_method) | {
        "train_config": train_cfg.to_dict(),
        "score_smoothing": score_smoothing,
    }
    if scoring_method in SENSOR_NORMALISED:
        extras["sensor_scales"] = sensor_scales(result.model, dataset, scoring_method)
    save_checkpoint(out_path, result.model, model_cfg, extras)
    n_parameters = sum(p.numel() for p in result.model.parameters())
    return TrainedModel(
        out_path, result.history.to_dict(), seconds, n_parameters, model_cfg.win_size
    )


def fit_baseline(dataset: DatasetRef, detector: str, seed: int, out_path: Path) -> TrainedModel:
    """Fit baseline ``detector`` per entity on its scaled fit part; save its checkpoint."""
    params = {"seed": seed} if detector in SEEDED_DETECTORS else {}
    started = time.perf_counter()
    fitted = fit_detectors(
        detector,
        {entity: dataset.load(entity)[0] for entity in dataset.entities},
        common_extras(dataset, detector, SCORING_METHOD),
        **params,
    )
    seconds = time.perf_counter() - started
    fitted.save(out_path)
    return TrainedModel(out_path, {}, seconds, 0, fitted.model_cfg.win_size)


train_model_task = task(name="train-model", cache_policy=NO_CACHE)(train_model)
