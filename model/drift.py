"""Drift tests between a training profile and a scoring batch (numpy only).

Inputs: per sensor, a two-sample Kolmogorov-Smirnov test of the batch against a compact sketch of
the training values (:class:`TrainingProfile`), with a Bonferroni or Benjamini-Hochberg correction
over the sensors. Scores: a one-sided binomial test of whether more scores exceed the calibration
threshold than the target false-alarm rate allows (:func:`exceedance_test`).

Both tests assume independent points. Time series are autocorrelated, which makes the p-values far
too small on long batches: a real but harmless shift is then "significant". ``min_statistic`` (a
floor on the KS distance) and ``min_rate_ratio`` (a floor on observed / target alarm rate) keep
the flags to shifts large enough to matter.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from model.range_metrics import finite_array

__all__ = [
    "DriftReport",
    "ScoreTest",
    "TrainingProfile",
    "adjust_p_values",
    "detect_drift",
    "exceedance_test",
    "kolmogorov_sf",
    "ks_2samp",
]

Correction = Literal["bh", "bonferroni"]
_SERIES_TERMS = 101


def kolmogorov_sf(x: ArrayLike) -> NDArray[np.float64]:
    """Survival function of the Kolmogorov distribution, P(K > x), elementwise.

    K = sup |B(t)| of a Brownian bridge: 2 sum_k (-1)^(k-1) exp(-2 k^2 x^2) for x >= 1, and the
    equivalent theta-function form 1 - sqrt(2 pi) / x sum_k exp(-(2k-1)^2 pi^2 / (8 x^2)) below 1,
    where each series converges fast. 1.0 for x <= 0.
    """
    values = np.atleast_1d(np.asarray(x, dtype=np.float64))
    if np.any(np.isnan(values)):
        raise ValueError(f"x must not be NaN, got {values[np.isnan(values)][:1]}")
    k = np.arange(1, _SERIES_TERMS + 1, dtype=np.float64)[:, None]
    large = np.maximum(values, 1.0)[None, :]
    upper = 2.0 * np.sum((-1.0) ** (k - 1) * np.exp(-2.0 * k**2 * large**2), axis=0)
    small = np.clip(values, 1e-3, 1.0)[None, :]
    theta = np.sum(np.exp(-((2 * k - 1) ** 2) * math.pi**2 / (8 * small**2)), axis=0)
    lower = 1.0 - math.sqrt(2 * math.pi) / small[0] * theta
    result = np.where(values >= 1.0, upper, lower)
    return np.clip(np.where(values <= 1e-3, 1.0, result), 0.0, 1.0)


def _ks_statistic(reference: NDArray[np.float64], batch: NDArray[np.float64]) -> float:
    """sup |F_reference - F_batch| over all values, from sorted copies of both samples."""
    reference, batch = np.sort(reference), np.sort(batch)
    points = np.concatenate((reference, batch))
    first = np.searchsorted(reference, points, side="right") / reference.size
    second = np.searchsorted(batch, points, side="right") / batch.size
    return float(np.max(np.abs(first - second)))


def _ks_p_value(statistic: float, n_first: int, n_second: int) -> float:
    """Asymptotic two-sided p-value: P(K > sqrt(n m / (n + m)) D)."""
    effective = n_first * n_second / (n_first + n_second)
    return float(kolmogorov_sf(math.sqrt(effective) * statistic)[0])


def ks_2samp(first: ArrayLike, second: ArrayLike) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov statistic D and its asymptotic two-sided p-value."""
    a, b = finite_array(first, "first"), finite_array(second, "second")
    statistic = _ks_statistic(a, b)
    return statistic, _ks_p_value(statistic, a.size, b.size)


def adjust_p_values(p: ArrayLike, method: Correction = "bh") -> NDArray[np.float64]:
    """p-values adjusted for testing them all: ``bonferroni`` (family-wise error) or ``bh``
    (Benjamini-Hochberg step-up, false discovery rate). Reject where the adjusted value <= level.
    """
    values = finite_array(p, "p")
    if np.any((values < 0) | (values > 1)):
        raise ValueError(f"p must be in [0, 1], got min {values.min()} and max {values.max()}")
    m = values.size
    if method == "bonferroni":
        return np.minimum(values * m, 1.0)
    if method != "bh":
        raise ValueError(f"method must be 'bh' or 'bonferroni', got {method!r}")
    order = np.argsort(values)
    scaled = values[order] * m / np.arange(1, m + 1)
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    return adjusted


def _binomial_sf(k: int, n: int, rate: float) -> float:
    """P(X >= k) for X ~ Binomial(n, rate), summed in log space."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    steps = np.log(np.arange(n, 0, -1, dtype=np.float64)) - np.log(np.arange(1, n + 1))
    log_comb = np.concatenate(([0.0], np.cumsum(steps)))[k:]
    j = np.arange(k, n + 1)
    log_pmf = log_comb + j * math.log(rate) + (n - j) * math.log1p(-rate)
    top = float(log_pmf.max())
    return min(1.0, math.exp(top) * float(np.sum(np.exp(log_pmf - top))))


def _check_fraction(value: float, name: str) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {value!r}")


@dataclass(frozen=True)
class ScoreTest:
    """Exceedances of the calibration threshold in a batch against the promised rate ``alpha``."""

    n: int
    exceedances: int
    rate: float
    alpha: float
    p_value: float
    flagged: bool


def exceedance_test(
    scores: ArrayLike,
    threshold: float,
    alpha: float,
    *,
    significance: float = 0.01,
    min_rate_ratio: float = 1.0,
) -> ScoreTest:
    """One-sided binomial test of H0 "P(score > threshold) <= alpha" on a batch of scores.

    p = P(Binomial(n, alpha) >= exceedances). Flagged when p <= ``significance`` and the observed
    rate is at least ``min_rate_ratio`` x ``alpha``. Real anomalies raise the rate as drift does.
    """
    s = finite_array(scores, "scores")
    if math.isnan(threshold):
        raise ValueError(f"threshold must not be NaN, got {threshold}")
    _check_fraction(alpha, "alpha")
    _check_fraction(significance, "significance")
    if not min_rate_ratio >= 0:
        raise ValueError(f"min_rate_ratio must be >= 0, got {min_rate_ratio!r}")
    exceedances = int(np.sum(s > threshold))
    p_value = _binomial_sf(exceedances, s.size, alpha)
    rate = exceedances / s.size
    flagged = p_value <= significance and rate >= min_rate_ratio * alpha
    return ScoreTest(s.size, exceedances, rate, alpha, p_value, flagged)


@dataclass(frozen=True)
class TrainingProfile:
    """Per-sensor sketch of the training values, small enough for a model checkpoint.

    ``sketch[c]`` holds the sorted values of sensor ``c`` when there are at most ``size`` of them,
    else ``size`` quantiles at probabilities (i - 1/2) / size (the inverted-CDF definition). The
    sketch's CDF is then within 1 / (2 size) of the training data's empirical CDF everywhere, so
    a KS distance against it is within that of the distance against the full training data.
    """

    n_rows: int
    sketch: tuple[tuple[float, ...], ...]

    @classmethod
    def fit(cls, train: ArrayLike, size: int = 1000) -> TrainingProfile:
        values = np.asarray(train, dtype=np.float64)
        if values.ndim != 2 or 0 in values.shape or not np.all(np.isfinite(values)):
            raise ValueError(f"train must be a finite non-empty (T, C) array, got {values.shape}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be an int >= 1, got {size!r}")
        ordered = np.sort(values, axis=0)
        n = ordered.shape[0]
        if n > size:
            ranks = np.ceil(n * (np.arange(1, size + 1) - 0.5) / size).astype(np.int64)
            ordered = ordered[ranks - 1]
        return cls(n, tuple(tuple(column) for column in ordered.T.tolist()))

    @property
    def n_sensors(self) -> int:
        return len(self.sketch)

    def to_dict(self) -> dict[str, Any]:
        return {"n_rows": self.n_rows, "sketch": [list(column) for column in self.sketch]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingProfile:
        sketch = tuple(tuple(float(v) for v in column) for column in data["sketch"])
        sizes = {len(column) for column in sketch}
        if data["n_rows"] < 1 or len(sizes) != 1 or 0 in sizes:
            raise ValueError(f"data must hold n_rows >= 1 and equal-size sketches, got {sizes}")
        return cls(int(data["n_rows"]), sketch)


@dataclass(frozen=True)
class DriftReport:
    """Per-sensor KS results (index = sensor), the optional score test, and the overall flag."""

    flag: bool
    statistics: tuple[float, ...]
    p_values: tuple[float, ...]
    p_adjusted: tuple[float, ...]
    sensors_flagged: tuple[bool, ...]
    correction: str
    significance: float
    score_test: ScoreTest | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def detect_drift(
    profile: TrainingProfile,
    batch: ArrayLike,
    *,
    significance: float = 0.01,
    correction: Correction = "bh",
    min_statistic: float = 0.0,
    score_test: ScoreTest | None = None,
) -> DriftReport:
    """Compare each sensor of ``batch`` `(T, C)` with ``profile``; flag on any sensor or the score.

    A sensor is flagged when its corrected p-value is <= ``significance`` and its KS distance is
    at least ``min_statistic``. The p-values use the profile's full row count as the training
    sample size.
    """
    values = np.asarray(batch, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] != profile.n_sensors or values.shape[0] == 0:
        raise ValueError(f"batch must be (T >= 1, {profile.n_sensors}), got {values.shape}")
    _check_fraction(significance, "significance")
    columns = zip(profile.sketch, values.T, strict=True)
    statistics = np.array(
        [_ks_statistic(np.asarray(ref), finite_array(column, "batch")) for ref, column in columns]
    )
    p = np.array([_ks_p_value(d, profile.n_rows, values.shape[0]) for d in statistics])
    adjusted = adjust_p_values(p, correction)
    sensors = (adjusted <= significance) & (statistics >= min_statistic)
    flag = bool(sensors.any()) or (score_test is not None and score_test.flagged)
    return DriftReport(
        flag,
        tuple(statistics.tolist()),
        tuple(p.tolist()),
        tuple(adjusted.tolist()),
        tuple(sensors.tolist()),
        correction,
        significance,
        score_test,
    )
