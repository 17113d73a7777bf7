"""One file holding the weights, the architecture and JSON-able extras (scalers, thresholds...).

A :class:`Checkpoint` is a :class:`model.artifact.ScoringModel`: the pipeline scores, calibrates
and saves it through that interface, as it does a baseline's :mod:`model.detector_checkpoint`.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.config import ModelConfig
from model.device import resolve_device
from model.network import AnomalyTransformer
from model.scoring import (
    SENSOR_NORMALISED,
    ScoreResult,
    provisional_points,
    score_series,
    scoring_precision,
    smoothed,
)

FORMAT = "anomaly-transformer-checkpoint/1"


@dataclass(frozen=True)
class Checkpoint:
    model: AnomalyTransformer  # in eval mode
    model_cfg: ModelConfig
    extras: dict[str, Any]

    def score(
        self, values: np.ndarray, *, entity: str, skip: int = 0, batch_size: int = 512
    ) -> ScoreResult:
        """Score a scaled `(T, C)` series with ``extras["scoring_method"]`` (one network for every
        ``entity``), smoothed over ``score_smoothing`` rows; the result covers ``values[skip:]``.

        The network runs in its device's ``scoring_precision`` (bf16 on a GPU that has it), so
        calibration and scoring on the same kind of device see the same scores.
        """
        method, smoothing = self.extras["scoring_method"], self.score_smoothing
        if method not in SENSOR_NORMALISED and smoothing == 1:
            return self._score_series(values, method, skip, batch_size)
        first = max(0, skip - (smoothing - 1))  # the rows the smoothing of row ``skip`` reads
        contributions = self.sensor_contributions(
            values, entity=entity, skip=first, batch_size=batch_size, method=method
        )
        return smoothed(contributions, smoothing, skip - first)

    def sensor_contributions(
        self, values: np.ndarray, *, entity: str, skip: int, batch_size: int, method: str
    ) -> np.ndarray:
        """Unsmoothed per-sensor errors `(T - skip, C)` by ``method``; a ``SENSOR_NORMALISED``
        method divides each sensor's by ``entity``'s scale in ``extras["sensor_scales"]``."""
        base = SENSOR_NORMALISED.get(method, method)
        contributions = self._score_series(values, base, skip, batch_size).contributions
        if base == method:
            return contributions
        scales = self.extras.get("sensor_scales", {})
        if entity not in scales:
            raise ValueError(
                f"invalid checkpoint: scoring method {method!r} needs sensor_scales for "
                f"entity {entity!r}; it has them for {sorted(scales)}"
            )
        return (contributions / np.asarray(scales[entity])).astype(np.float32)

    def _score_series(
        self, values: np.ndarray, method: str, skip: int, batch_size: int
    ) -> ScoreResult:
        device = next(self.model.parameters()).device
        return score_series(
            self.model,
            values,
            method,
            skip=skip,
            batch_size=batch_size,
            precision=scoring_precision(device),
        )

    @property
    def score_smoothing(self) -> int:
        """How many rows, ending at a point, its score averages (``extras``; 1: none)."""
        return int(self.extras.get("score_smoothing", 1))

    @property
    def provisional_points(self) -> int:
        """How many of a series' last scores later rows still change (``recon_mean``: L - 1)."""
        return provisional_points(self.extras["scoring_method"], self.model_cfg.win_size)

    @property
    def context_points(self) -> int:
        """How many rows before a point its score reads: ``win_size - 1`` for the windows, plus
        ``score_smoothing - 1`` for the smoothing."""
        return self.model_cfg.win_size - 1 + self.score_smoothing - 1

    def save(self, path: str | Path, extras: dict[str, Any] | None = None) -> None:
        """Write this checkpoint, with ``extras`` in place of its own when given."""
        save_checkpoint(path, self.model, self.model_cfg, self.extras if extras is None else extras)


def save_checkpoint(
    path: str | Path,
    model: AnomalyTransformer,
    model_cfg: ModelConfig,
    extras: dict[str, Any] | None = None,
) -> None:
    """Write the checkpoint atomically (a temporary file, then a rename).

    Raises:
        ValueError: ``extras`` is not JSON-serialisable, or ``model_cfg`` is not the model's.
    """
    write_payload(path, checkpoint_payload(model, model_cfg, extras))


def checkpoint_payload(
    model: AnomalyTransformer, model_cfg: ModelConfig, extras: dict[str, Any] | None
) -> dict[str, Any]:
    """What ``save_checkpoint`` writes: format, config, CPU weights and the extras as JSON.

    Raises:
        ValueError: as ``save_checkpoint``.
    """
    if model_cfg != model.cfg:
        raise ValueError(f"invalid model_cfg {model_cfg}: the model was built with {model.cfg}")
    return {
        "format": FORMAT,
        "model_config": model_cfg.to_dict(),
        "state_dict": {name: t.detach().cpu() for name, t in model.state_dict().items()},
        "extras_json": extras_json(extras or {}),
    }


def extras_json(extras: dict[str, Any]) -> str:
    """``extras`` as strict JSON (no NaN).

    Raises:
        ValueError: ``extras`` is not JSON-serialisable.
    """
    try:
        return json.dumps(extras, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"invalid extras: not JSON-serialisable ({error})") from error


def write_payload(path: str | Path, payload: dict[str, Any]) -> None:
    """``torch.save`` the payload atomically (a temporary file, then a rename)."""
    target = Path(path)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(handle)
    try:
        torch.save(payload, temporary)
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def load_checkpoint(path: str | Path, device: str = "cpu") -> Checkpoint:
    """Load with ``torch.load(weights_only=True)`` onto ``device`` (``"cpu"``, ``"cuda"``...).

    Raises:
        ValueError: the file is not a checkpoint of this format.
    """
    target = resolve_device(device)
    return checkpoint_from_payload(read_payload(path, target), path, target)


def read_payload(path: str | Path, device: torch.device) -> dict[str, Any]:
    """The payload dict, read with ``torch.load(weights_only=True)``; tensors on ``device``."""
    payload = torch.load(Path(path), map_location=device, weights_only=True)
    if not isinstance(payload, dict):
        raise ValueError(f"invalid checkpoint {path}: a {type(payload).__name__}, not a dict")
    return payload


def checkpoint_from_payload(
    payload: dict[str, Any], path: str | Path, target: torch.device
) -> Checkpoint:
    """The Anomaly Transformer checkpoint in a payload, its model on ``target``."""
    if payload.get("format") != FORMAT:
        found = payload.get("format")
        raise ValueError(f"invalid checkpoint {path}: format {found!r}, expected {FORMAT!r}")
    model_cfg = ModelConfig.from_dict(payload["model_config"])
    model = AnomalyTransformer(model_cfg)
    model.load_state_dict(payload["state_dict"])
    return Checkpoint(model.to(target).eval(), model_cfg, json.loads(payload["extras_json"]))
