"""Simple anomaly detectors used as baselines and challengers (numpy only).

Every detector follows :class:`Detector`: ``fit(train)`` on a `(T, C)` float array returns the
detector, ``score(values)`` gives `(T,)` scores where higher means more anomalous, and the score of
row ``t`` depends only on rows ``<= t`` (streaming-safe). Each detector standardises its inputs with
the mean and standard deviation of its training rows (:class:`model.scaling.Scaler`), which is a
no-op on inputs the caller already z-scored and makes raw inputs work too. ``to_dict()`` gives the
fitted state as JSON-able data; :func:`detector_from_dict` restores any detector from it.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, Self

import numpy as np
from numpy.typing import ArrayLike, NDArray

from model.scaling import Scaler

__all__ = [
    "DETECTORS",
    "Detector",
    "KnnDetector",
    "MaxZDetector",
    "PcaDetector",
    "RandomDetector",
    "detector_from_dict",
    "make_detector",
]

# Query rows per block in the kNN search, so that a block's distance matrix stays near 64 MiB.
_KNN_BLOCK_BYTES = 64 * 2**20


class Detector(Protocol):
    """Fit on training rows, then score rows; see the module docstring for the contract."""

    name: ClassVar[str]

    def fit(self, train: ArrayLike) -> Self: ...

    def score(self, values: ArrayLike) -> NDArray[np.float64]: ...

    def to_dict(self) -> dict[str, Any]: ...


def _matrix(values: ArrayLike, name: str, n_channels: int | None = None) -> NDArray[np.float64]:
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


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


class _Standardised:
    """Shared state of the detectors: the training statistics used to standardise inputs."""

    name: ClassVar[str]
    scaler: Scaler | None = None

    def _fit_rows(self, train: ArrayLike) -> NDArray[np.float64]:
        """Fit the scaler on ``train`` and return the standardised training rows."""
        rows = _matrix(train, "train")
        self.scaler = Scaler.fit(rows)
        return (rows - self.scaler.mean) / self.scaler.scale

    def _standardise(self, values: ArrayLike) -> NDArray[np.float64]:
        if self.scaler is None:
            raise ValueError(f"{self.name} detector must be fitted before score, got scaler None")
        rows = _matrix(values, "values", self.scaler.n_channels)
        return (rows - self.scaler.mean) / self.scaler.scale

    def _state(self, **fitted: Any) -> dict[str, Any]:
        if self.scaler is None:
            raise ValueError(f"{self.name} detector must be fitted before to_dict, got None")
        return {"name": self.name, "scaler": self.scaler.to_dict(), **fitted}


class PcaDetector(_Standardised):
    """Sum over channels of the squared residual after projection onto the principal components.

    Keeps the fewest components whose cumulative share of the training variance is at least
    ``variance``, or exactly ``n_components`` when given.
    """

    name = "pca"

    def __init__(self, variance: float = 0.95, n_components: int | None = None) -> None:
        if (
            isinstance(variance, bool)
            or not isinstance(variance, int | float)
            or not (0.0 < variance <= 1.0)
        ):
            raise ValueError(f"variance must be in (0, 1], got {variance!r}")
        self.variance = float(variance)
        if n_components is not None:
            n_components = _positive_int(n_components, "n_components")
        self.n_components = n_components
        self.components = np.zeros((0, 0))

    def fit(self, train: ArrayLike) -> Self:
        rows = self._fit_rows(train)
        _, singular, basis = np.linalg.svd(rows, full_matrices=False)
        explained = singular**2
        if self.n_components is not None:
            keep = min(self.n_components, basis.shape[0])
        elif explained.sum() > 0:
            share = np.cumsum(explained) / explained.sum()
            keep = int(np.searchsorted(share, self.variance - 1e-12)) + 1
        else:
            keep = 0
        self.components = basis[:keep]
        return self

    def score(self, values: ArrayLike) -> NDArray[np.float64]:
        rows = self._standardise(values)
        residual = rows - (rows @ self.components.T) @ self.components
        return np.sum(residual**2, axis=1)

    def to_dict(self) -> dict[str, Any]:
        return self._state(
            variance=self.variance,
            n_components=self.n_components,
            components=self.components.tolist(),
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PcaDetector:
        detector = cls(data["variance"], data["n_components"])
        detector.scaler = Scaler.from_dict(data["scaler"])
        components = np.asarray(data["components"], dtype=np.float64)
        detector.components = components.reshape(-1, detector.scaler.n_channels)
        return detector


class KnnDetector(_Standardised):
    """Mean Euclidean distance from the window ending at each row to its ``k`` nearest reference
    windows.

    Windows are the last ``window`` rows, flattened; rows before the first get the first row
    repeated. The reference set is every ``stride``-th full window of the training rows. The search
    is brute force in blocks of query rows, so memory stays bounded. The fitted state stores the
    standardised training rows (``window`` x fewer numbers than the reference windows).
    """

    name = "knn"

    def __init__(self, window: int = 10, k: int = 5, stride: int = 2) -> None:
        self.window = _positive_int(window, "window")
        self.k = _positive_int(k, "k")
        self.stride = _positive_int(stride, "stride")
        self.rows = np.zeros((0, 0))
        self._reference = np.zeros((0, 0))
        self._reference_norms = np.zeros(0)

    def fit(self, train: ArrayLike) -> Self:
        self._set_rows(self._fit_rows(train))
        return self

    def _set_rows(self, rows: NDArray[np.float64]) -> None:
        starts = np.arange(0, rows.shape[0] - self.window + 1, self.stride)
        if starts.size < self.k:
            raise ValueError(
                f"train must give at least k={self.k} reference windows of {self.window} rows "
                f"every {self.stride}, got {rows.shape[0]} rows"
            )
        self.rows = rows
        windows = np.lib.stride_tricks.sliding_window_view(rows, self.window, axis=0)
        self._reference = windows[starts].transpose(0, 2, 1).reshape(starts.size, -1)
        self._reference_norms = np.sum(self._reference**2, axis=1)

    def score(self, values: ArrayLike) -> NDArray[np.float64]:
        rows = self._standardise(values)
        padded = np.concatenate((np.repeat(rows[:1], self.window - 1, axis=0), rows))
        windows = np.lib.stride_tricks.sliding_window_view(padded, self.window, axis=0)
        block = max(1, _KNN_BLOCK_BYTES // (8 * self._reference.shape[0]))
        scores, width = np.empty(rows.shape[0]), self._reference.shape[1]
        for start in range(0, rows.shape[0], block):
            queries = windows[start : start + block].transpose(0, 2, 1).reshape(-1, width)
            squared = (
                np.sum(queries**2, axis=1)[:, None]
                + self._reference_norms[None, :]
                - 2.0 * (queries @ self._reference.T)
            )
            nearest = np.partition(squared, self.k - 1, axis=1)[:, : self.k]
            scores[start : start + block] = np.sqrt(np.maximum(nearest, 0.0)).mean(axis=1)
        return scores

    def to_dict(self) -> dict[str, Any]:
        rows = self.rows.tolist()
        return self._state(window=self.window, k=self.k, stride=self.stride, rows=rows)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KnnDetector:
        detector = cls(data["window"], data["k"], data["stride"])
        detector.scaler = Scaler.from_dict(data["scaler"])
        rows = np.asarray(data["rows"], dtype=np.float64).reshape(-1, detector.scaler.n_channels)
        detector._set_rows(rows)
        return detector


class MaxZDetector(_Standardised):
    """The largest absolute z-score over the channels, with the training mean and deviation."""

    name = "max_z"

    def fit(self, train: ArrayLike) -> Self:
        self._fit_rows(train)
        return self

    def score(self, values: ArrayLike) -> NDArray[np.float64]:
        return np.max(np.abs(self._standardise(values)), axis=1)

    def to_dict(self) -> dict[str, Any]:
        return self._state()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MaxZDetector:
        detector = cls()
        detector.scaler = Scaler.from_dict(data["scaler"])
        return detector


class RandomDetector(_Standardised):
    """Control: uniform [0, 1) scores from ``seed``, ignoring the values (only their shape is
    checked). Each call starts the generator afresh, so equal-length inputs get equal scores."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        self.seed = seed

    def fit(self, train: ArrayLike) -> Self:
        self._fit_rows(train)
        return self

    def score(self, values: ArrayLike) -> NDArray[np.float64]:
        rows = self._standardise(values)
        return np.random.default_rng(self.seed).random(rows.shape[0])

    def to_dict(self) -> dict[str, Any]:
        return self._state(seed=self.seed)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RandomDetector:
        detector = cls(data["seed"])
        detector.scaler = Scaler.from_dict(data["scaler"])
        return detector


DETECTORS: dict[str, type[PcaDetector | KnnDetector | MaxZDetector | RandomDetector]] = {
    cls.name: cls for cls in (PcaDetector, KnnDetector, MaxZDetector, RandomDetector)
}


def make_detector(name: str, **params: Any) -> Detector:
    """An unfitted detector by registry name (``pca``, ``knn``, ``max_z``, ``random``)."""
    if name not in DETECTORS:
        raise ValueError(f"name must be one of {sorted(DETECTORS)}, got {name!r}")
    return DETECTORS[name](**params)


def detector_from_dict(data: dict[str, Any]) -> Detector:
    """A fitted detector restored from its ``to_dict()`` output."""
    name = data.get("name") if isinstance(data, dict) else None
    if name not in DETECTORS:
        raise ValueError(f"data['name'] must be one of {sorted(DETECTORS)}, got {name!r}")
    try:
        return DETECTORS[name].from_dict(data)
    except (KeyError, TypeError) as error:
        raise ValueError(f"data must be a fitted {name} state, got {error!r}") from error
