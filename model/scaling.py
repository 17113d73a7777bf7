"""Per-channel standardisation fitted on training data only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# A column whose standard deviation is at most this share of its magnitude counts as constant.
CONSTANT_TOLERANCE = 1e-10
# Standardised values are clipped to +- this many training deviations: far beyond any normal
# reading (alarms anyway), and small enough that squared errors stay finite in float32.
STANDARD_SCORE_LIMIT = 1e6


def _as_matrix(values: np.ndarray, name: str, *, missing_ok: bool = False) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] == 0:
        raise ValueError(f"invalid {name} of shape {array.shape}: expected (T >= 1, C)")
    bad = np.argwhere(np.isinf(array) if missing_ok else ~np.isfinite(array))
    if len(bad):
        row, column = bad[0]
        raise ValueError(
            f"invalid {name}: {len(bad)} non-finite value(s), the first is {array[row, column]} "
            f"at row {row}, column {column}"
        )
    return array


@dataclass(frozen=True)
class Scaler:
    """``(values - mean) / scale`` per channel; zero-variance channels get scale 1.

    Missing values (NaN, from sensors a contract declares nullable) are allowed where asked for:
    ``fit`` ignores them and ``impute`` replaces them with the channel's training mean, which
    scales to 0. The imputation is stateless, so a point scores the same in any batch.
    """

    mean: np.ndarray  # (C,)
    scale: np.ndarray  # (C,)

    @classmethod
    def fit(cls, values: np.ndarray, *, missing_ok: bool = False, unit: float = 0.0) -> Scaler:
        """Statistics of ``values`` `(T, C)` (population standard deviation, as sklearn's);
        with ``missing_ok``, of the observed values of each channel.

        A channel is constant when its deviation is at most ``CONSTANT_TOLERANCE`` x
        ``max(|mean|, unit)``: ``unit`` 0 for raw readings, whose units are arbitrary (1e-10 +-
        1e-11 varies), 1 for inputs already standardised (their rounding noise is no signal).
        """
        array = _as_matrix(values, "values", missing_ok=missing_ok)
        observed = (~np.isnan(array)).sum(axis=0)
        if not observed.all():
            empty = np.flatnonzero(observed == 0).tolist()
            raise ValueError(f"invalid values: channel(s) {empty} hold no observed value")
        mean = np.nanmean(array, axis=0)
        std = np.nanstd(array, axis=0)
        constant = std <= CONSTANT_TOLERANCE * np.maximum(np.abs(mean), unit)
        return cls(mean=mean, scale=np.where(constant, 1.0, std))

    @property
    def n_channels(self) -> int:
        return int(self.mean.shape[0])

    def impute(self, values: np.ndarray) -> np.ndarray:
        """A float64 copy of ``values`` `(T, C)` with each NaN replaced by its channel's mean."""
        array = self._check_channels(_as_matrix(values, "values", missing_ok=True))
        return np.where(np.isnan(array), self.mean, array)

    def _check_channels(self, array: np.ndarray) -> np.ndarray:
        if array.shape[1] != self.n_channels:
            raise ValueError(
                f"invalid values with {array.shape[1]} channels: this scaler was fitted on "
                f"{self.n_channels}"
            )
        return array

    def transform(self, values: np.ndarray) -> np.ndarray:
        """Standardised float32 copy of ``values`` `(T, C)`, clipped to +-
        ``STANDARD_SCORE_LIMIT``."""
        array = self._check_channels(_as_matrix(values, "values"))
        standard = (array - self.mean) / self.scale
        return np.clip(standard, -STANDARD_SCORE_LIMIT, STANDARD_SCORE_LIMIT).astype(np.float32)

    def inverse_transform(self, scaled: np.ndarray) -> np.ndarray:
        """Raw float64 values of standardised ``scaled`` `(T, C)`."""
        return np.asarray(scaled, np.float64) * self.scale + self.mean

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
