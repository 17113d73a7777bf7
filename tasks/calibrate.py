"""Fit the alarm threshold on held-out normal data: the validation tail of the training range."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from model.checkpoint import load_checkpoint, save_checkpoint
from model.scoring import score_series
from model.thresholds import conformal_threshold, quantile_threshold
from tasks.errors import DataContractError
from tasks.scoring import BATCH_WINDOWS
from tasks.windowing import DatasetRef

CalibrationMethod = Literal["conformal", "quantile"]


@dataclass(frozen=True)
class Calibration:
    """The threshold, how it was fit, and the checkpoint that now carries it."""

    threshold: float
    method: str
    alpha: float
    n_scores: int
    checkpoint: Path


def validation_scores(checkpoint_path: Path, dataset: DatasetRef) -> np.ndarray:
    """Streaming scores of every entity's validation tail, each with its fit part as context."""
    checkpoint = load_checkpoint(checkpoint_path)
    win = checkpoint.model_cfg.win_size
    method = checkpoint.extras["scoring_method"]
    scores = []
    for entity in dataset.entities:
        fit_part, val_part = dataset.load(entity)
        if len(val_part) == 0:
            continue
        context = fit_part[-(win - 1) :]
        values = np.concatenate([context, val_part])
        result = score_series(checkpoint.model, values, method, skip=len(context), batch_size=BATCH_WINDOWS)
        scores.append(result.scores)
    if not scores:
        raise DataContractError(
            f"{dataset.source}: no validation tail to calibrate on; use a val_fraction > 0"
        )
    return np.concatenate(scores)


def calibrate(
    checkpoint_path: Path,
    dataset: DatasetRef,
    out_path: Path,
    *,
    method: CalibrationMethod = "conformal",
    alpha: float = 0.005,
) -> Calibration:
    """Threshold at false-alarm rate ``alpha`` on validation scores; never sees test data."""
    scores = validation_scores(checkpoint_path, dataset)
    fit_threshold = conformal_threshold if method == "conformal" else quantile_threshold
    threshold = float(fit_threshold(scores, alpha))
    if not np.isfinite(threshold):
        raise DataContractError(
            f"{dataset.source}: {scores.size} held-out scores cannot support a false-alarm rate of "
            f"{alpha}: conformal calibration needs at least {int(np.ceil(1 / alpha)) - 1}; "
            "raise alpha, val_fraction or the length of the training range"
        )
    checkpoint = load_checkpoint(checkpoint_path)
    extras = {
        **checkpoint.extras,
        "threshold": threshold,
        "calibration": {"method": method, "alpha": alpha, "n_scores": int(scores.size)},
        "calibration_scores": np.sort(scores).astype(float).tolist(),
    }
    save_checkpoint(out_path, checkpoint.model, checkpoint.model_cfg, extras)
    return Calibration(threshold, method, alpha, int(scores.size), out_path)


calibrate_task = task(name="calibrate-threshold", cache_policy=NO_CACHE)(calibrate)
