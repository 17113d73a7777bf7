"""The alarm rule a calibrated checkpoint carries for one entity: threshold, alpha, null scores.

``calibrate`` stores a global rule (``threshold``, ``calibration_scores``) and, with
``scope="entity"``, one per entity (``thresholds[entity]``, ``entity_calibration_scores[entity]``);
an entity's own rule wins over the global one wherever scores become alarms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class AlarmRule:
    """``score > threshold`` alarms at false-alarm rate ``alpha``; p-values against ``null``."""

    threshold: float
    alpha: float
    null_scores: np.ndarray


def alarm_rule(extras: dict[str, Any], entity: str) -> AlarmRule:
    """The rule for ``entity``: its own when calibrated per entity, else the global one."""
    threshold = extras.get("thresholds", {}).get(entity, extras["threshold"])
    null = extras.get("entity_calibration_scores", {}).get(entity, extras["calibration_scores"])
    return AlarmRule(
        float(threshold),
        float(extras["calibration"]["alpha"]),
        np.asarray(null, dtype=np.float64),
    )
