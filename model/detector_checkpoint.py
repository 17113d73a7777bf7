"""A baseline detector fitted per entity, as one checkpoint file the pipeline scores like the AT's.

The file is a ``torch.save`` payload of JSON strings (no tensors, nothing pickled), read with
``weights_only=True`` as the Anomaly Transformer's checkpoint is. Its scores are final as soon as
the window of ``win_size`` rows ending at the point exists (:data:`SCORING_METHOD`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from model.baselines import Detector, detector_from_dict, make_detector
from model.checkpoint import write_payload
from model.scoring import ScoreResult

FORMAT = "atp-detector-checkpoint/1"
# A detector's score of a point comes from the ``win_size`` rows ending at it, as ``recon_last``.
SCORING_METHOD = "detector_last"


@dataclass(frozen=True)
class DetectorConfig:
    """Which detector, with which parameters, on how many channels; ``win_size`` is its context:
    a point's score depends on it and the ``win_size - 1`` rows before it."""

    detector: str
    n_channels: int
    win_size: int
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DetectorConfig:
        return cls(
            str(data["detector"]),
            int(data["n_channels"]),
            int(data["win_size"]),
            dict(data["params"]),
        )


@dataclass(frozen=True)
class DetectorCheckpoint:
    """One fitted detector per entity, their config and the JSON-able extras."""

    detectors: dict[str, Detector]
    model_cfg: DetectorConfig
    extras: dict[str, Any]

    @property
    def provisional_points(self) -> int:
        """0: a detector's score is final once the window ending at the point is there."""
        return 0

    @property
    def context_points(self) -> int:
        """``win_size - 1``: a point's score reads the window ending at it."""
        return self.model_cfg.win_size - 1

    def score(
        self, values: np.ndarray, *, entity: str, skip: int = 0, batch_size: int = 512
    ) -> ScoreResult:
        """Score a scaled `(T >= win_size, C)` series with ``entity``'s detector; the result covers
        ``values[skip:]`` (float32, contributions' rows sum to the score). ``batch_size`` is the
        Anomaly Transformer's; detectors bound their memory themselves.

        Raises:
            ValueError: unknown entity, wrong shape, non-finite values, bad ``skip``.
        """
        if entity not in self.detectors:
            raise ValueError(f"invalid entity {entity!r}: expected one of {sorted(self.detectors)}")
        shape, win = np.shape(values), self.model_cfg.win_size
        if len(shape) != 2 or shape[0] < win or shape[1] != self.model_cfg.n_channels:
            raise ValueError(
                f"invalid values of shape {shape}: expected (T >= win_size={win}, "
                f"n_channels={self.model_cfg.n_channels})"
            )
        if not 0 <= skip < shape[0]:
            raise ValueError(f"invalid skip={skip}: expected 0 <= skip < T={shape[0]}")
        scores, contributions = self.detectors[entity].score_contributions(values)
        return ScoreResult(
            scores[skip:].astype(np.float32), contributions[skip:].astype(np.float32)
        )

    def save(self, path: str | Path, extras: dict[str, Any] | None = None) -> None:
        """Write atomically, with ``extras`` in place of this checkpoint's own when given.

        Raises:
            ValueError: ``extras`` or a detector's state is not JSON-serialisable.
        """
        state = {entity: detector.to_dict() for entity, detector in self.detectors.items()}
        try:
            detectors_json = json.dumps(state, allow_nan=False)
            extras_json = json.dumps(self.extras if extras is None else extras, allow_nan=False)
        except (TypeError, ValueError) as error:
            raise ValueError(f"invalid extras or detector state: not JSON ({error})") from error
        payload = {
            "format": FORMAT,
            "model_config": self.model_cfg.to_dict(),
            "detectors_json": detectors_json,
            "extras_json": extras_json,
        }
        write_payload(path, payload)

    @classmethod
    def from_payload(cls, payload: dict[str, Any], path: str | Path) -> DetectorCheckpoint:
        """The checkpoint in a payload read by :func:`model.checkpoint.read_payload`."""
        if payload.get("format") != FORMAT:
            found = payload.get("format")
            raise ValueError(f"invalid checkpoint {path}: format {found!r}, expected {FORMAT!r}")
        try:
            model_cfg = DetectorConfig.from_dict(payload["model_config"])
            state = json.loads(payload["detectors_json"])
            extras = json.loads(payload["extras_json"])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"invalid checkpoint {path}: {error!r}") from error
        detectors = {entity: detector_from_dict(data) for entity, data in state.items()}
        return cls(detectors, model_cfg, extras)


def fit_detectors(
    name: str,
    fit_parts: Mapping[str, np.ndarray],
    extras: dict[str, Any],
    **params: Any,
) -> DetectorCheckpoint:
    """Fit detector ``name`` (with ``params``) on each entity's `(T, C)` fit part.

    Raises:
        ValueError: an unknown detector, bad parameters, no entity, or a fit part it cannot fit.
    """
    if not fit_parts:
        raise ValueError("fit_parts must name at least one entity, got none")
    detectors = {}
    for entity, rows in fit_parts.items():
        try:
            detectors[entity] = make_detector(name, **params).fit(rows)
        except ValueError as error:
            raise ValueError(f"{name} on entity {entity!r}: {error}") from error
    first = next(iter(detectors.values()))
    n_channels = int(np.shape(next(iter(fit_parts.values())))[1])
    model_cfg = DetectorConfig(name, n_channels, first.win_size, dict(params))
    return DetectorCheckpoint(detectors, model_cfg, extras)
