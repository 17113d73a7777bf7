"""Per-channel standardisation fitted on training data only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# A column whose standard deviation is below this share of its magnitude counts as constant.
CONSTANT_TOLERANCE = 1e-10


def _as_matrix(values: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] == 0:
        raise ValueError(f"invalid {name} of shape {array.shape}: expected (T >= 1, C)")
    bad = np.argwhere(~np.isfinite(array))
    if len(bad):
        row, column = bad[0]
        raise ValueError(
            f"invalid {name}: {len(bad)} non-finite value(s), the first is {array[row, column]} "
            f"at row {row}, column {column}"
        )
    return array


@dataclass(frozen=True)
class Scaler:
    """``(values - mean) / scale`` per channel; zero-variance channels get scale 1."""

    mean: np.ndarray  # (C,)
    scale: np.ndarray  # (C,)

    @classmethod
    def fit(cls, values: np.ndarray) -> Scaler:
        """Statistics of ``values`` `(T, C)` (population standard deviation, as sklearn's)."""
        array = _as_matrix(values, "values")
        mean = array.mean(axis=0)
        std = array.std(axis=0)
        constant = std <= CONSTANT_TOLERANCE * np.maximum(np.abs(mean), 1.0)
        return cls(mean=mean, scale=np.where(constant, 1.0, std))

    @property
    def n_channels(self) -> int:
        return int(self.mean.shape[0])

    def transform(self, values: np.ndarray) -> np.ndarray:
        """Standardised float32 copy of ``values`` `(T, C)`."""
        array = _as_matrix(values, "values")
        if array.shape[1] != self.n_channels:
            raise ValueError(
                f"invalid values with {array.shape[1]} channels: this scaler was fitted on "
                f"{self.n_channels}"
            )
        return ((array - self.mean) / self.scale).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.tolist(), "scale": self.scale.tolist()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scaler:
        mean = np.asarray(data["mean"], dtype=np.float64)
        scale = np.asarray(data["scale"], dtype=np.float64)
        if mean.ndim != 1 or mean.shape != scale.shape or not np.all(scale > 0):
            raise ValueError(
                f"invalid scaler: mean {mean.shape} and scale {scale.shape} must be equal-length "
                "vectors with every scale > 0"
            )
        return cls(mean=mean, scale=scale)
