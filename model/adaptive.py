"""Adaptive conformal thresholds for scheduled scoring (numpy only).

Adaptive conformal inference (ACI; Gibbs & Candes, "Adaptive Conformal Inference Under
Distribution Shift", NeurIPS 2021) turns the split-conformal threshold of
:func:`model.thresholds.conformal_threshold` into one that follows drift. Point ``t`` is flagged
when its score exceeds the ``(1 - alpha_t)`` conformal quantile of the calibration scores, i.e. the
k_t-th smallest with k_t = ceil((n + 1)(1 - alpha_t)) (+inf when k_t > n, -inf when k_t < 1); then

    alpha_{t+1} = alpha_t + gamma (alpha - err_t),   err_t = 1 if point t was flagged else 0.

Guarantee (their Proposition 4.1), for ANY sequence of scores, drifting or adversarial: after T
points, |(1/T) sum_t err_t - alpha| <= (max(alpha_1, 1 - alpha_1) + gamma) / (gamma T), so the
long-run alarm rate tends to ``alpha``. No exchangeability is needed.

Cost: the rate promise covers ALL alarms, real anomalies included, so recall is what gives. Each
alarm lowers alpha_t by gamma (1 - alpha), which (1 - alpha) / alpha quiet points win back (199 at
alpha = 0.5 %); a burst of alarms raises the threshold and silences the rest of a long anomaly, and
point recall is capped near alpha / (share of anomalous points). A larger ``gamma`` follows drift
faster but moves the threshold further after each alarm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from model.range_metrics import finite_array

__all__ = ["AciResult", "AciState", "aci_scores"]


@dataclass(frozen=True)
class AciState:
    """What ACI carries from one batch to the next for one entity; JSON-able via ``to_dict``."""

    alpha: float
    gamma: float = 0.005
    alpha_t: float | None = None
    n_scored: int = 0
    n_alarms: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha!r}")
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma!r}")
        if self.alpha_t is None:
            object.__setattr__(self, "alpha_t", self.alpha)
        elif not math.isfinite(self.alpha_t):
            raise ValueError(f"alpha_t must be finite, got {self.alpha_t!r}")
        if not 0 <= self.n_alarms <= self.n_scored:
            raise ValueError(
                f"n_alarms must be in [0, n_scored={self.n_scored}], got {self.n_alarms!r}"
            )

    @property
    def alarm_rate(self) -> float:
        """Share of all points scored so far that raised an alarm (nan before the first)."""
        return self.n_alarms / self.n_scored if self.n_scored else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "gamma": self.gamma,
            "alpha_t": self.alpha_t,
            "n_scored": self.n_scored,
            "n_alarms": self.n_alarms,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AciState:
        return cls(
            float(data["alpha"]),
            float(data["gamma"]),
            float(data["alpha_t"]),
            int(data["n_scored"]),
            int(data["n_alarms"]),
        )


@dataclass(frozen=True)
class AciResult:
    """Per-point thresholds and flags (``is_anomaly == scores > thresholds``), and the new state."""

    thresholds: NDArray[np.float64]
    is_anomaly: NDArray[np.bool_]
    state: AciState


def aci_scores(state: AciState, calibration_scores: ArrayLike, scores: ArrayLike) -> AciResult:
    """Flag ``scores`` in order with ACI, starting from ``state``; see the module docstring.

    The update is sequential: each flag changes the next threshold. The scores' positions among
    the calibration scores are found for the whole batch at once; a plain loop over Python numbers
    then compares each with k_t (about 1 s per million points on one core).
    """
    calibration = np.sort(finite_array(calibration_scores, "calibration_scores"))
    s = finite_array(scores, "scores")
    n = calibration.size
    # s_t > the k-th smallest calibration score iff at least k calibration scores are below s_t.
    below = np.searchsorted(calibration, s, side="left").tolist()
    alpha, gamma, alpha_t = state.alpha, state.gamma, float(state.alpha_t)
    ranks, flags = [0] * s.size, [False] * s.size
    for t, count in enumerate(below):
        rank = math.ceil((n + 1) * (1.0 - alpha_t) - 1e-9)
        flag = count >= rank
        ranks[t], flags[t] = rank, flag
        alpha_t += gamma * (alpha - flag)
    padded = np.concatenate(([-np.inf], calibration, [np.inf]))
    thresholds = padded[np.clip(np.asarray(ranks, dtype=np.int64), 0, n + 1)]
    is_anomaly = np.asarray(flags, dtype=bool)
    new_state = replace(
        state,
        alpha_t=alpha_t,
        n_scored=state.n_scored + s.size,
        n_alarms=state.n_alarms + int(is_anomaly.sum()),
    )
    return AciResult(thresholds, is_anomaly, new_state)
