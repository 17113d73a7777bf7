"""Simple anomaly detectors used as baselines and challengers (numpy only).

Every detector follows :class:`Detector`: ``fit(train)`` on a `(T, C)` float array returns the
detector, ``score(values)`` gives `(T,)` scores where higher means more anomalous, and the score of
row ``t`` depends only on rows ``t - win_size + 1 .. t`` (streaming-safe).
``score_contributions(values)`` gives the same scores and a `(T, C)` attribution per channel whose
rows sum to the score. Each detector standardises its inputs with the mean and standard deviation
of its training rows (:class:`model.scaling.Scaler`), which is a no-op on inputs the caller already
z-scored and makes raw inputs work too. ``to_dict()`` gives the fitted state as JSON-able data;
:func:`detector_from_dict` restores any detector from it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar, Protocol, Self

import numpy as np
from numpy.typing import ArrayLike, NDArray

from model.detector_base import Scores, Standardised, positive_int, seed_value, spread
from model.isolation_forest import IsolationForestDetector
from model.scaling import Scaler

__all__ = [
    "DETECTORS",
    "Detector",
    "IsolationForestDetector",
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

    @property
    def win_size(self) -> int: ...

    def fit(self, train: ArrayLike) -> Self: ...

    def score(self, values: ArrayLike) -> NDArray[np.float64]: ...

    def score_contributions(
        self, values: ArrayLike
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]: ...

    def to_dict(self) -> dict[str, Any]: ...


class PcaDetector(Standardised):
    """Sum over channels of the squared residual after projection onto the principal components.

    Keeps the fewest components whose cumulative share of the training variance is at least
    ``variance`` but never all of them (no residual would be left to score: one channel, or a few
    independent ones), or exactly ``n_components`` when given.
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
            n_components = positive_int(n_components, "n_components")
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
            keep = min(int(np.searchsorted(share, self.variance - 1e-12)) + 1, len(share) - 1)
        else:
            keep = 0
        self.components = basis[:keep]
        return self

    def score(self, values: ArrayLike) -> NDArray[np.float64]:
        return self.score_contributions(values)[0]

    def score_contributions(self, values: ArrayLike) -> Scores:
        """Contributions: each channel's squared residual."""
        rows = self._standardise(values)
        squared = (rows - (rows @ self.components.T) @ self.components) ** 2
        return np.sum(squared, axis=1), squared

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


class KnnDetector(Standardised):
    """Mean Euclidean distance from the window ending at each row to its ``k`` nearest reference
    windows.

    Windows are the last ``window`` rows, flattened; rows before the first get the first row
    repeated. The reference set is every ``stride``-th full window of the training rows. The search
    is brute force in blocks of query rows, so memory stays bounded. The fitted state stores the
    standardised training rows (``window`` x fewer numbers than the reference windows).
    """

    name = "knn"

    def __init__(self, window: int = 10, k: int = 5, stride: int = 2) -> None:
        self.window = positive_int(window, "window")
        self.k = positive_int(k, "k")
        self.stride = positive_int(stride, "stride")
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

    @property
    def win_size(self) -> int:
        return self.window

    def _nearest(self, values: ArrayLike, *, exact: bool) -> Iterator[tuple[int, Any, Any, Any]]:
        """Per block of query rows: its first row, the flattened query windows `(b, W C)`, the
        indices `(b, k)` of the ``k`` nearest references and their squared distances `(b, k)`.
        The block is small enough for the ``(b, k, W C)`` differences when ``exact``."""
        rows = self._standardise(values)
        padded = np.concatenate((np.repeat(rows[:1], self.window - 1, axis=0), rows))
        windows = np.lib.stride_tricks.sliding_window_view(padded, self.window, axis=0)
        n_reference, width = self._reference.shape
        per_row = max(n_reference, self.k * width) if exact else n_reference
        block = max(1, _KNN_BLOCK_BYTES // (8 * per_row))
        for start in range(0, rows.shape[0], block):
            queries = windows[start : start + block].transpose(0, 2, 1).reshape(-1, width)
            squared = (
                np.sum(queries**2, axis=1)[:, None]
                + self._reference_norms[None, :]
                - 2.0 * (queries @ self._reference.T)
            )
            nearest = np.argpartition(squared, self.k - 1, axis=1)[:, : self.k]
            yield start, queries, nearest, np.take_along_axis(squared, nearest, axis=1)

    def score(self, values: ArrayLike) -> NDArray[np.float64]:
        scores = np.empty(np.shape(values)[0])
        for start, _, _, squared in self._nearest(values, exact=False):
            scores[start : start + len(squared)] = np.sqrt(np.maximum(squared, 0.0)).mean(axis=1)
        return scores

    def score_contributions(self, values: ArrayLike) -> Scores:
        """Contributions: each neighbour's distance split by the channels' shares of its squared
        difference over the window, averaged over the neighbours."""
        n_rows, n_channels = np.shape(values)[0], self._reference.shape[1] // self.window
        scores, contributions = np.empty(n_rows), np.empty((n_rows, n_channels))
        for start, queries, nearest, squared in self._nearest(values, exact=True):
            distance = np.sqrt(np.maximum(squared, 0.0))  # (b, k)
            difference = queries[:, None, :] - self._reference[nearest]  # (b, k, W C)
            shape = (*nearest.shape, self.window, n_channels)
            per_channel = np.sum(difference.reshape(shape) ** 2, axis=2)  # (b, k, C)
            _, split = spread(distance.reshape(-1), per_channel.reshape(-1, n_channels))
            stop = start + len(nearest)
            scores[start:stop] = distance.mean(axis=1)
            contributions[start:stop] = split.reshape(shape[0], self.k, n_channels).mean(axis=1)
        return scores, contributions

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


class MaxZDetector(Standardised):
    """The largest absolute z-score over the channels, with the training mean and deviation."""

    name = "max_z"

    def fit(self, train: ArrayLike) -> Self:
        self._fit_rows(train)
        return self

    def score(self, values: ArrayLike) -> NDArray[np.float64]:
        return np.max(np.abs(self._standardise(values)), axis=1)

    def score_contributions(self, values: ArrayLike) -> Scores:
        """Contributions: the score split in proportion to the channels' absolute z-scores."""
        z = np.abs(self._standardise(values))
        return spread(np.max(z, axis=1), z)

    def to_dict(self) -> dict[str, Any]:
        return self._state()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MaxZDetector:
        detector = cls()
        detector.scaler = Scaler.from_dict(data["scaler"])
        return detector


class RandomDetector(Standardised):
    """Control: uniform [0, 1) scores from ``seed``, ignoring the values (only their shape is
    checked). Each call starts the generator afresh, so equal-length inputs get equal scores."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed_value(seed)

    def fit(self, train: ArrayLike) -> Self:
        self._fit_rows(train)
        return self

    def score(self, values: ArrayLike) -> NDArray[np.float64]:
        rows = self._standardise(values)
        return np.random.default_rng(self.seed).random(rows.shape[0])

    def score_contributions(self, values: ArrayLike) -> Scores:
        """Contributions: the score spread evenly over the channels."""
        scores = self.score(values)
        return spread(scores, np.zeros((scores.size, np.shape(values)[1])))

    def to_dict(self) -> dict[str, Any]:
        return self._state(seed=self.seed)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RandomDetector:
        detector = cls(data["seed"])
        detector.scaler = Scaler.from_dict(data["scaler"])
        return detector


AnyDetector = PcaDetector | KnnDetector | MaxZDetector | RandomDetector | IsolationForestDetector
DETECTORS: dict[str, type[AnyDetector]] = {
    cls.name: cls
    for cls in (PcaDetector, KnnDetector, MaxZDetector, RandomDetector, IsolationForestDetector)
}


def make_detector(name: str, **params: Any) -> Detector:
    """An unfitted detector by registry name (``pca``, ``knn``, ``max_z``, ``random``,
    ``isolation_forest``)."""
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
    except (KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"data must be a fitted {name} state, got {error!r}") from error
