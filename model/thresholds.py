"""Alarm thresholds fitted on held-out normal scores (numpy only).

Every threshold ``t`` is used as ``is_anomaly = score > t``. Fit them on scores of held-out normal
data from the training range (never on test data); only :func:`leaky_reference_threshold` breaks
that rule, to reproduce the published protocol.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, NDArray

from model.range_metrics import finite_array

__all__ = [
    "conformal_threshold",
    "fit_gpd",
    "leaky_reference_threshold",
    "p_values",
    "pot_threshold",
    "quantile_threshold",
]

_MIN_PEAKS = 10


def _check_fraction(value: float, name: str) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {value}")


def _rank(count: float) -> int:
    """ceil(count), tolerant of float error just above an integer (e.g. 199.00000000000003)."""
    return math.ceil(count - 1e-9)


def quantile_threshold(calibration_scores: ArrayLike, alpha: float) -> float:
    """The smallest calibration score with at most a fraction ``alpha`` of them above it.

    This is the ceil(n (1 - alpha))-th order statistic: the false-alarm rate on the calibration
    scores themselves is <= alpha, but new points get no finite-sample guarantee (see
    :func:`conformal_threshold`).
    """
    ordered = np.sort(finite_array(calibration_scores, "calibration_scores"))
    _check_fraction(alpha, "alpha")
    return float(ordered[_rank(ordered.size * (1 - alpha)) - 1])


def conformal_threshold(calibration_scores: ArrayLike, alpha: float) -> float:
    """Split-conformal threshold: the k-th smallest of n scores, k = ceil((n + 1)(1 - alpha)).

    Guarantee: if the calibration scores and the score S of a new point are exchangeable (e.g.
    i.i.d. normal behaviour without drift), then P(S > t) <= alpha for any n, marginally over the
    calibration draw; without ties also P(S > t) >= alpha - 1 / (n + 1). Returns +inf (never
    alarm) when k > n, i.e. when n < 1 / alpha - 1 scores are too few for the target. Drift breaks
    exchangeability and with it the guarantee.
    """
    ordered = np.sort(finite_array(calibration_scores, "calibration_scores"))
    _check_fraction(alpha, "alpha")
    rank = _rank((ordered.size + 1) * (1 - alpha))
    return math.inf if rank > ordered.size else float(ordered[rank - 1])


def p_values(calibration_scores: ArrayLike, scores: ArrayLike) -> NDArray[np.float64]:
    """Conformal p-values (1 + #{calibration >= s}) / (n + 1), in [1 / (n + 1), 1].

    Under exchangeability P(p <= u) <= u for every u; ``p <= alpha`` flags exactly the points with
    ``score > conformal_threshold(calibration_scores, alpha)``.
    """
    ordered = np.sort(finite_array(calibration_scores, "calibration_scores"))
    at_least = ordered.size - np.searchsorted(ordered, finite_array(scores, "scores"), side="left")
    return (1.0 + at_least) / (ordered.size + 1.0)


def fit_gpd(excesses: ArrayLike) -> tuple[float, float]:
    """Generalised Pareto (shape xi, scale sigma) fitted to positive excesses by
    probability-weighted moments (Hosking & Wallis 1987, Technometrics 29(3)).

    Survival function (1 + xi y / sigma)^(-1 / xi). With a0 = mean(y) and the unbiased estimate a1
    of E[y (1 - F(y))]: xi = 2 - a0 / (a0 - 2 a1), sigma = 2 a0 a1 / (a0 - 2 a1). Closed form, no
    iterations, always finite, xi < 1; chosen over maximum likelihood (Grimshaw) for robustness on
    small tails.
    """
    y = np.sort(finite_array(excesses, "excesses"))
    if y.size < 2 or y[0] <= 0:
        raise ValueError(
            f"excesses must be at least 2 positive values, got {y.size} with min {y[0]}"
        )
    m = y.size
    a0 = float(y.mean())
    a1 = float(np.sum(y * (m - np.arange(1, m + 1)) / (m - 1)) / m)
    spread = a0 - 2 * a1
    if spread <= 0:
        raise ValueError(f"excesses must not all be equal, got {m} values of {y[0]}")
    return 2.0 - a0 / spread, 2.0 * a0 * a1 / spread


def pot_threshold(calibration_scores: ArrayLike, q: float, level: float = 0.98) -> float:
    """Peaks-over-threshold (Siffer et al., KDD 2017) threshold with exceedance probability ``q``.

    The ``level`` quantile u of the calibration scores is the initial threshold; a generalised
    Pareto fitted (:func:`fit_gpd`) to the N_u excesses over u extrapolates the tail:
    t = u + sigma / xi ((q n / N_u)^(-xi) - 1) (u - sigma log(q n / N_u) when xi = 0).
    Needs q below the tail fraction N_u / n and at least 10 excesses.
    """
    s = finite_array(calibration_scores, "calibration_scores")
    _check_fraction(q, "q")
    _check_fraction(level, "level")
    initial = float(np.quantile(s, level))
    excesses = s[s > initial] - initial
    if excesses.size < _MIN_PEAKS:
        raise ValueError(
            f"calibration_scores must have at least {_MIN_PEAKS} values above the level {level} "
            f"quantile, got {excesses.size}"
        )
    tail = excesses.size / s.size
    if q >= tail:
        raise ValueError(f"q must be below the tail fraction {tail:.6g} above level, got {q}")
    shape, scale = fit_gpd(excesses)
    ratio = q / tail
    if abs(shape) < 1e-9:
        return initial - scale * math.log(ratio)
    return initial + scale / shape * (ratio ** (-shape) - 1.0)


def leaky_reference_threshold(
    train_scores: ArrayLike, test_scores: ArrayLike, anomaly_ratio_percent: float
) -> float:
    """LEAKS TEST DATA. Upstream Anomaly Transformer threshold, for reproducing the paper only.

    ``np.percentile(concat(train_scores, test_scores), 100 - anomaly_ratio_percent)``: the
    unlabelled test scores set the threshold (transductive), so results with it are not
    deployable.
    """
    pooled = np.concatenate(
        (finite_array(train_scores, "train_scores"), finite_array(test_scores, "test_scores"))
    )
    if not 0.0 < anomaly_ratio_percent < 100.0:
        raise ValueError(f"anomaly_ratio_percent must be in (0, 100), got {anomaly_ratio_percent}")
    return float(np.percentile(pooled, 100.0 - anomaly_ratio_percent))
