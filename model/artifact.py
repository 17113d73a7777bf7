"""What the pipeline scores with: an Anomaly Transformer checkpoint, an ensemble of them
(:mod:`model.ensemble`) or a baseline detector's.

Every kind is one file, loaded with ``torch.load(weights_only=True)`` by
:func:`load_scoring_model`, and satisfy :class:`ScoringModel`, so that calibration, evaluation,
registration, scheduled scoring and the MLflow pyfunc treat them alike.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from model import checkpoint, detector_checkpoint, ensemble
from model.device import resolve_device
from model.scoring import ScoreResult

# Windows per scoring batch wherever the pipeline scores (scheduled scoring, calibration, the MLflow
# pyfunc): on a GPU every batch has this many windows, so a point's score does not depend on the
# caller.
BATCH_WINDOWS = 1024


class WindowConfig(Protocol):
    """The part of a model's config the pipeline reads."""

    @property
    def n_channels(self) -> int: ...

    @property
    def win_size(self) -> int:
        """Context: a point's score depends on it and the ``win_size - 1`` rows before it."""
        ...


class ScoringModel(Protocol):
    """A fitted model with its extras (sensors, scalers, ``scoring_method``, thresholds...)."""

    @property
    def model_cfg(self) -> WindowConfig: ...

    @property
    def extras(self) -> dict[str, Any]: ...

    @property
    def provisional_points(self) -> int:
        """How many of a series' last scores rows after them still change (0: final at once)."""
        ...

    @property
    def context_points(self) -> int:
        """How many rows before a point its score reads (at least ``win_size - 1``)."""
        ...

    def score(
        self, values: np.ndarray, *, entity: str, skip: int = 0, batch_size: int = 512
    ) -> ScoreResult:
        """Score ``entity``'s scaled `(T >= win_size, C)` series; the result covers
        ``values[skip:]`` with per-sensor contributions whose rows sum to the score."""
        ...

    def save(self, path: str | Path, extras: dict[str, Any] | None = None) -> None:
        """Write the model to one file atomically, ``extras`` replacing its own when given."""
        ...


def _detectors(payload: dict[str, Any], path: Path, _: torch.device) -> ScoringModel:
    return detector_checkpoint.DetectorCheckpoint.from_payload(payload, path)


LOADERS: dict[str, Callable[[dict[str, Any], Path, torch.device], ScoringModel]] = {
    checkpoint.FORMAT: checkpoint.checkpoint_from_payload,
    ensemble.FORMAT: ensemble.ensemble_from_payload,
    detector_checkpoint.FORMAT: _detectors,
}


def load_scoring_model(path: str | Path, device: str = "cpu") -> ScoringModel:
    """Load either kind of checkpoint; an Anomaly Transformer's network goes onto ``device``.

    Raises:
        ValueError: the file is neither kind (pickled objects are refused by ``torch.load``).
    """
    target = resolve_device(device)
    payload = checkpoint.read_payload(path, target)
    loader = LOADERS.get(str(payload.get("format")))
    if loader is None:
        raise ValueError(
            f"invalid checkpoint {path}: format {payload.get('format')!r}, expected one of "
            f"{sorted(LOADERS)}"
        )
    return loader(payload, Path(path), target)
