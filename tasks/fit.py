"""Train a model on a windowed dataset and save a self-contained checkpoint.

The model is the Anomaly Transformer (``detector="anomaly_transformer"``; one network, or an
ensemble of networks of different windows) or a baseline detector of
:mod:`model.baselines` fitted per entity on the same scaled fit parts; every checkpoint carries the
same extras, so calibration, evaluation, registration and scoring treat them alike.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from model.artifact import ScoringModel
from model.checkpoint import Checkpoint
from model.config import ModelConfig, TrainConfig
from model.detector_checkpoint import SCORING_METHOD, fit_detectors
from model.distributed import default_processes, fit_in_processes
from model.drift import TrainingProfile
from model.ensemble import EnsembleCheckpoint
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
        profiles[entity] = TrainingProfile.fit(scaler.inverse_transform(fit_part)).to_dict()
    return profiles


def sensor_scales(
    model: AnomalyTransformer, dataset: DatasetRef, method: str
) -> dict[str, list[float]]:
    """Per entity, each sensor's mean error by ``method``'s base on its validation tail (with the
    fit part as context; on the fit part where there is no tail), over the points where the
    sensor reported: the divisors of ``method``."""
    scales = {}
    for entity in dataset.entities:
        values, skip = dataset.tail_with_context(entity, model.cfg.win_size - 1)
        fit_observed, observed = dataset.observed(entity)
        if len(values) == skip:  # no tail
            values, observed = dataset.load(entity)[0], fit_observed
        scales[entity] = tail_sensor_scales(model, values, skip, method, observed)
    return scales


def tail_sensor_scales(
    model: AnomalyTransformer,
    values: np.ndarray,
    skip: int,
    method: str,
    observed: np.ndarray | None = None,
) -> list[float]:
    """Each sensor's mean error by ``method``'s base over ``values[skip:]`` (``values[:skip]``:
    context; ``observed`` `(T - skip, C)`: where each sensor reported, when not everywhere): the
    divisors of a ``SENSOR_NORMALISED`` method."""
    errors = score_series(model, values, SENSOR_NORMALISED[method], skip=skip).contributions
    return sensor_error_scales(errors, observed).tolist()


AT = "anomaly_transformer"
# Baselines grown from a random seed (training.seed); the others are deterministic.
SEEDED_DETECTORS = frozenset({"isolation_forest"})


def common_extras(dataset: DatasetRef, detector: str, scoring_method: str) -> dict[str, Any]:
    """What every checkpoint carries: source, sensors, scalers, scoring method, drift profiles."""
    return {
        "source": dataset.source,
        "detector": detector,
        "sensors": list(dataset.sensors),
        "nullable_sensors": list(dataset.nullable),
        "scalers": {name: scaler.to_dict() for name, scaler in dataset.scalers().items()},
        "scoring_method": scoring_method,
        "training_profiles": training_profiles(dataset),
    }


def train_model(
    dataset: DatasetRef,
    model_cfgs: Sequence[ModelConfig],
    train_cfg: TrainConfig,
    out_path: Path,
    *,
    scoring_method: str,
    score_smoothing: int,
    detector: str = AT,
    processes: int | None = None,
) -> TrainedModel:
    """Fit ``detector`` on every entity's fit part and save the checkpoint.

    The Anomaly Transformer fits one network per config of ``model_cfgs`` (several: an ensemble,
    :mod:`model.ensemble`), each stopping early on the validation tails, and scores with
    ``scoring_method``, each score averaged over the ``score_smoothing`` rows ending at it; a
    baseline ignores those and ``model_cfgs``, seeded by ``train_cfg.seed``. Each network trains
    data-parallel in ``processes`` torchrun workers where that is more than one (default: one per
    visible GPU, ``model.distributed.default_processes``).
    """
    if not model_cfgs:
        raise ValueError("invalid model_cfgs: expected at least one ModelConfig")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if detector != AT:
        return fit_baseline(dataset, detector, train_cfg.seed, out_path)
    parts = [dataset.load(entity) for entity in dataset.entities]  # (fit part, tail) each
    started = time.perf_counter()
    processes = processes or default_processes(train_cfg.device)
    members = [
        fit_member(dataset, parts, cfg, train_cfg, scoring_method, processes) for cfg in model_cfgs
    ]
    seconds = time.perf_counter() - started
    extras = common_extras(dataset, AT, scoring_method) | {
        "train_config": train_cfg.to_dict(),
        "score_smoothing": score_smoothing,
    }
    checkpoints = [checkpoint for checkpoint, _ in members]
    if len(checkpoints) == 1:
        only = checkpoints[0]
        scoring_model: ScoringModel = Checkpoint(only.model, only.model_cfg, extras | only.extras)
        history = members[0][1]
    else:
        scoring_model = EnsembleCheckpoint(tuple(checkpoints), extras)
        history = {
            f"member{i}.{key}": value
            for i, (_, member_history) in enumerate(members)
            for key, value in member_history.items()
        }
    scoring_model.save(out_path)
    n_parameters = sum(p.numel() for c in checkpoints for p in c.model.parameters())
    return TrainedModel(out_path, history, seconds, n_parameters, scoring_model.model_cfg.win_size)


def fit_member(
    dataset: DatasetRef,
    parts: list[tuple[np.ndarray, np.ndarray]],
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    scoring_method: str,
    processes: int = 1,
) -> tuple[Checkpoint, dict[str, Any]]:
    """One network fit on the entities' fit parts (``parts``: the dataset's (fit part, tail) per
    entity), stopping early on the tails at least one window long, with its own
    ``sensor_scales`` where ``scoring_method`` needs them; its training history (with the number
    of ``processes``: > 1 trains data-parallel in that many torchrun workers)."""
    fit_parts = [fit_part for fit_part, _ in parts]
    tails = [tail for _, tail in parts if len(tail) >= model_cfg.win_size]
    if processes > 1:
        result = fit_in_processes(model_cfg, train_cfg, fit_parts, tails, processes)
    else:
        result = fit(model_cfg, train_cfg, fit_parts, tails)
    extras = {}
    if scoring_method in SENSOR_NORMALISED:
        extras["sensor_scales"] = sensor_scales(result.model, dataset, scoring_method)
    history = result.history.to_dict() | {"processes": processes}
    return Checkpoint(result.model, model_cfg, extras), history


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
