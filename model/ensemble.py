"""Several Anomaly Transformers, of different windows or sizes, scored as one model.

Each member computes its per-sensor errors with the ensemble's scoring method and its own
per-sensor scales (``recon_mean_norm``: every sensor's error divided by its mean on the validation
tail, so the members' errors share one scale); the ensemble's error of a sensor is the members'
mean, smoothed as one checkpoint's is. A point's score reads the longest member's window and is
provisional as long as that member's is. docs/at_smd.md measures why: networks of a short and a
long window each see anomalies the other misses.

The file is one ``torch.save`` payload holding each member's checkpoint payload and the shared
extras (sensors, scalers, thresholds, scoring method...), read with ``weights_only=True``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.checkpoint import (
    Checkpoint,
    checkpoint_from_payload,
    checkpoint_payload,
    extras_json,
    write_payload,
)
from model.config import ModelConfig
from model.scoring import ScoreResult, provisional_points, smoothed

FORMAT = "anomaly-transformer-ensemble/1"


@dataclass(frozen=True)
class EnsembleConfig:
    """The members' architectures; the ensemble reads the longest member's window."""

    members: tuple[ModelConfig, ...]

    def __post_init__(self) -> None:
        channels = {member.n_channels for member in self.members}
        if len(channels) != 1:
            raise ValueError(
                f"invalid ensemble members: expected one n_channels, got {sorted(channels)}"
            )

    @property
    def n_channels(self) -> int:
        return self.members[0].n_channels

    @property
    def win_size(self) -> int:
        return max(member.win_size for member in self.members)

    def to_dict(self) -> dict[str, Any]:
        return {"members": [member.to_dict() for member in self.members]}


@dataclass(frozen=True)
class EnsembleCheckpoint:
    """Members (each a :class:`Checkpoint` whose extras hold its own ``sensor_scales``) and the
    shared extras; a :class:`model.artifact.ScoringModel`."""

    members: tuple[Checkpoint, ...]
    extras: dict[str, Any]

    def __post_init__(self) -> None:
        """Refuses no members, or members of different channels (``EnsembleConfig``)."""
        if not self.members:
            raise ValueError("invalid ensemble: expected at least one member")
        _ = self.model_cfg

    @property
    def model_cfg(self) -> EnsembleConfig:
        return EnsembleConfig(tuple(member.model_cfg for member in self.members))

    @property
    def score_smoothing(self) -> int:
        return int(self.extras.get("score_smoothing", 1))

    @property
    def provisional_points(self) -> int:
        """The longest member's: a point's score is final once every member's is."""
        method = self.extras["scoring_method"]
        return max(provisional_points(method, m.model_cfg.win_size) for m in self.members)

    @property
    def context_points(self) -> int:
        return self.model_cfg.win_size - 1 + self.score_smoothing - 1

    def score(
        self, values: np.ndarray, *, entity: str, skip: int = 0, batch_size: int = 512
    ) -> ScoreResult:
        """The members' mean per-sensor errors of a scaled `(T, C)` series, smoothed over
        ``score_smoothing`` rows; the result covers ``values[skip:]``."""
        smoothing, method = self.score_smoothing, self.extras["scoring_method"]
        first = max(0, skip - (smoothing - 1))
        errors = [
            member.sensor_contributions(
                values, entity=entity, skip=first, batch_size=batch_size, method=method
            )
            for member in self.members
        ]
        return smoothed(np.mean(errors, axis=0, dtype=np.float64), smoothing, skip - first)

    def save(self, path: str | Path, extras: dict[str, Any] | None = None) -> None:
        """Write the ensemble atomically, ``extras`` replacing the shared extras when given."""
        payload = {
            "format": FORMAT,
            "members": [
                checkpoint_payload(member.model, member.model_cfg, member.extras)
                for member in self.members
            ],
            "extras_json": extras_json(self.extras if extras is None else extras),
        }
        write_payload(path, payload)


def ensemble_from_payload(
    payload: dict[str, Any], path: str | Path, target: torch.device
) -> EnsembleCheckpoint:
    """The ensemble in a payload, its members' networks on ``target``.

    Raises:
        ValueError: not an ensemble payload, no member, or members of different channels.
    """
    members = payload.get("members")
    if payload.get("format") != FORMAT or not isinstance(members, list) or not members:
        raise ValueError(f"invalid checkpoint {path}: expected {FORMAT!r} with members")
    loaded = tuple(checkpoint_from_payload(member, path, target) for member in members)
    return EnsembleCheckpoint(loaded, json.loads(payload["extras_json"]))
