"""What the detectors of :mod:`model.baselines` share: input checks and standardisation (numpy)."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from numpy.typing import ArrayLike, NDArray

from model.scaling import Scaler

Scores = tuple[NDArray[np.float64], NDArray[np.float64]]


def spread(scores: NDArray[np.float64], weights: NDArray[np.float64]) -> Scores:
    """``scores`` with contributions in proportion to the non-negative `(T, C)` ``weights``
    (evenly where a row's weights are all 0)."""
    totals = weights.sum(axis=1, keepdims=True)
    even = np.full_like(weights, 1.0 / weights.shape[1])
    shares = np.divide(weights, totals, out=even, where=totals > 0)
    return scores, shares * scores[:, None]


def as_matrix(values: ArrayLike, name: str, n_channels: int | None = None) -> NDArray[np.float64]:
    """``values`` as a finite float64 `(T, C)` array, T, C >= 1, with ``n_channels`` columns."""
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be a numeric (T, C) array, got {values!r:.80}") from error
    if array.ndim != 2 or 0 in array.shape:
        raise ValueError(f"{name} must be a non-empty (T, C) array, got shape {array.shape}")
    bad = np.argwhere(~np.isfinite(array))
    if bad.size:
        row, column = bad[0]
        raise ValueError(f"{name} must be finite, got {array[row, column]} at ({row}, {column})")
    if n_channels is not None and array.shape[1] != n_channels:
        raise ValueError(f"{name} must have {n_channels} columns as in fit, got {array.shape[1]}")
    return array


def positive_int(value: object, name: str) -> int:
    """``value`` if it is an int >= 1, else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


class Standardised:
    """Shared state of the detectors: the training statistics used to standardise inputs."""

    name: ClassVar[str]
    scaler: Scaler | None = None

    @property
    def win_size(self) -> int:
        """Rows a point's score depends on: the point and the ``win_size - 1`` before it."""
        return 1

    def _fit_rows(self, train: ArrayLike) -> NDArray[np.float64]:
        """Fit the scaler on ``train`` and return the standardised training rows."""
        rows = as_matrix(train, "train")
        self.scaler = Scaler.fit(rows, unit=1.0)
        return (rows - self.scaler.mean) / self.scaler.scale

    def _standardise(self, values: ArrayLike) -> NDArray[np.float64]:
        if self.scaler is None:
            raise ValueError(f"{self.name} detector must be fitted before score, got scaler None")
        rows = as_matrix(values, "values", self.scaler.n_channels)
        return (rows - self.scaler.mean) / self.scaler.scale

    def _state(self, **fitted: Any) -> dict[str, Any]:
        if self.scaler is None:
            raise ValueError(f"{self.name} detector must be fitted before to_dict, got None")
        return {"name": self.name, "scaler": self.scaler.to_dict(), **fitted}


def seed_value(value: object) -> int:
    """``value`` if it is an int >= 0 (a generator seed), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"seed must be an int >= 0, got {value!r}")
    return value
