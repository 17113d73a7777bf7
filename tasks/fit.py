"""Train the Anomaly Transformer on a windowed dataset and save a self-contained checkpoint."""

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
from model.drift import TrainingProfile
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


def train_model(
    dataset: DatasetRef,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    out_path: Path,
    *,
    scoring_method: str,
) -> TrainedModel:
    """Fit on every entity's fit part, stop early on the validation tails; save the checkpoint."""
    fit_parts, val_parts = zip(*(dataset.load(entity) for entity in dataset.entities), strict=True)
    started = time.perf_counter()
    result = fit(
        model_cfg,
        train_cfg,
        list(fit_parts),
        [v for v in val_parts if len(v) >= model_cfg.win_size],
    )
    seconds = time.perf_counter() - started
    extras = {
        "source": dataset.source,
        "sensors": list(dataset.sensors),
        "scalers": {name: scaler.to_dict() for name, scaler in dataset.scalers().items()},
        "scoring_method": scoring_method,
        "train_config": train_cfg.to_dict(),
        "training_profiles": training_profiles(dataset),
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out_path, result.model, model_cfg, extras)
    n_parameters = sum(p.numel() for p in result.model.parameters())
    return TrainedModel(
        out_path, result.history.to_dict(), seconds, n_parameters, model_cfg.win_size
    )


train_model_task = task(name="train-model", cache_policy=NO_CACHE)(train_model)
