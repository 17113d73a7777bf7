"""Input checks, anomaly segments, event-level metrics and VUS (numpy only).

An anomaly segment is a maximal run of label-1 points, given as inclusive ``(start, end)`` indices.
VUS follows the "opt" volume under the surface of Paparrizos et al., "Volume Under the Surface: A
New Accuracy Evaluation Measure for Time-Series Anomaly Detection", VLDB 2022.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "anomaly_segments",
    "binary_array",
    "checked_flags",
    "checked_scores",
    "event_recall",
    "false_alarm_events",
    "finite_array",
    "require_both_classes",
    "segment_hits",
    "vus",
    "vus_pr",
    "vus_roc",
]


def _one_d(values: ArrayLike, name: str) -> NDArray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} must not be empty, got {array!r}")
    return array


def binary_array(values: ArrayLike, name: str) -> NDArray[np.bool_]:
    """``values`` as booleans; raises ValueError unless it is a non-empty 1-D array of 0/1."""
    array = _one_d(values, name)
    if array.dtype == np.bool_:
        return array
    if not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{name} must be numeric 0/1, got dtype {array.dtype}")
    bad = array[(array != 0) & (array != 1)]
    if bad.size:
        raise ValueError(f"{name} must contain only 0 and 1, got {np.unique(bad)[:5].tolist()}")
    return array == 1


def finite_array(values: ArrayLike, name: str) -> NDArray[np.float64]:
    """``values`` as float64; raises ValueError unless it is non-empty, finite, 1-D and numeric."""
    array = _one_d(values, name)
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise ValueError(f"{name} must be numeric, got dtype {array.dtype}")
    array = array.astype(np.float64)
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        raise ValueError(f"{name} must be finite, got {array[bad[0]]} at index {bad[0]}")
    return array


def _same_length(first: NDArray, second: NDArray, names: str) -> None:
    if first.shape != second.shape:
        raise ValueError(f"{names} must have the same length, got {first.size} and {second.size}")


def checked_flags(
    labels: ArrayLike, predictions: ArrayLike
) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    """Validated (labels, predictions) as booleans of the same length."""
    y = binary_array(labels, "labels")
    flags = binary_array(predictions, "predictions")
    _same_length(y, flags, "labels and predictions")
    return y, flags


def checked_scores(
    labels: ArrayLike, scores: ArrayLike
) -> tuple[NDArray[np.bool_], NDArray[np.float64]]:
    """Validated (labels as booleans, finite float64 scores) of the same length."""
    y = binary_array(labels, "labels")
    s = finite_array(scores, "scores")
    _same_length(y, s, "labels and scores")
    return y, s


def require_both_classes(y: NDArray[np.bool_]) -> None:
    """Raise ValueError unless ``y`` holds both normal and anomalous points."""
    if y.all() or not y.any():
        raise ValueError(f"labels must contain both 0 and 1, got only {int(y[0])}")


def anomaly_segments(labels: ArrayLike) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
    """Inclusive start and end indices of the maximal runs of 1 in ``labels``."""
    padded = np.concatenate(([0], binary_array(labels, "labels").astype(np.int8), [0]))
    steps = np.diff(padded)
    return np.flatnonzero(steps == 1), np.flatnonzero(steps == -1) - 1


def segment_hits(
    labels: NDArray[np.bool_], predictions: NDArray[np.bool_]
) -> tuple[NDArray[np.intp], NDArray[np.intp], NDArray[np.intp]]:
    """Segments of ``labels`` as (starts, ends, number of flagged points in each segment)."""
    starts, ends = anomaly_segments(labels)
    flagged = np.concatenate(([0], np.cumsum(predictions)))
    return starts, ends, flagged[ends + 1] - flagged[starts]


def event_recall(labels: ArrayLike, predictions: ArrayLike) -> float:
    """Fraction of anomaly segments with at least one flagged point (0.0 when there are none)."""
    _, _, hits = segment_hits(*checked_flags(labels, predictions))
    return float(np.mean(hits > 0)) if hits.size else 0.0


def false_alarm_events(labels: ArrayLike, predictions: ArrayLike) -> int:
    """Number of maximal runs of flagged points that touch no label-1 point."""
    y, flags = checked_flags(labels, predictions)
    _, _, true_points = segment_hits(flags, y)
    return int(np.sum(true_points == 0))


def _soft_labels(labels: NDArray[np.bool_], starts: NDArray, ends: NDArray, window: int) -> NDArray:
    """Labels plus sqrt(1 - d / window) at distance d <= window // 2 outside each segment, capped
    at 1."""
    n, half = labels.size, window // 2
    soft = labels.astype(np.float64)
    if half == 0:
        return soft
    distance = np.arange(1, half + 1)
    after, before = ends[:, None] + distance, starts[:, None] - distance
    positions = np.concatenate((after.ravel(), before.ravel()))
    weights = np.tile(np.sqrt(1.0 - distance / window), 2 * starts.size)
    inside = (positions >= 0) & (positions < n)
    soft += np.bincount(positions[inside], weights[inside], minlength=n)
    return np.minimum(soft, 1.0)


def _existence(
    padded_scores: NDArray, starts: NDArray, ends: NDArray, half: int, thresholds: NDArray
) -> NDArray:
    """Share of the widened ranges (segments +- ``half``, clipped, overlaps merged) holding a
    score >= each threshold. ``padded_scores`` ends with a -inf sentinel."""
    opens = np.concatenate(([True], starts[1:] - half > ends[:-1] + half))
    closes = np.concatenate((opens[1:], [True]))
    lows = np.maximum(starts[opens] - half, 0)
    highs = np.minimum(ends[closes] + half, padded_scores.size - 2)
    bounds = np.column_stack((lows, highs + 1)).ravel()
    range_max = np.sort(np.maximum.reduceat(padded_scores, bounds)[::2])
    return 1.0 - np.searchsorted(range_max, thresholds, side="left") / lows.size


def _vus_inputs(
    labels: ArrayLike, scores: ArrayLike, sliding_window: int, n_thresholds: int
) -> tuple[NDArray[np.bool_], NDArray[np.float64]]:
    y, s = checked_scores(labels, scores)
    require_both_classes(y)
    limits = (("sliding_window", sliding_window, 0), ("n_thresholds", n_thresholds, 1))
    for name, value, least in limits:
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    return y, s


def vus(
    labels: ArrayLike, scores: ArrayLike, *, sliding_window: int = 100, n_thresholds: int = 250
) -> dict[str, float]:
    """VUS-PR and VUS-ROC ("opt" definition of Paparrizos et al. 2022), as ``vus_pr``/``vus_roc``.

    For each buffer length w in 0..sliding_window, labels get a soft sqrt-shaped buffer of w // 2
    points on each side of each segment. At ``n_thresholds`` thresholds taken at evenly spaced
    ranks of the descending scores (a point is flagged when ``score >= threshold``), the range
    recall TP / P_new (capped at 1) is multiplied by the existence reward (share of the widened
    ranges with a flagged point); TP sums the soft labels of flagged points and P_new = P + (soft
    labels of flagged normal points) / 2. The range-AP (recall steps times precision TP / flagged)
    and the range-ROC area (trapezoid from (0, 0) to (1, 1), FPR = (flagged - TP) / (n - P_new))
    are averaged over the buffer lengths. Needs both classes in ``labels``.
    """
    y, s = _vus_inputs(labels, scores, sliding_window, n_thresholds)
    n, positives = s.size, float(y.sum())
    order = np.argsort(-s, kind="stable")
    thresholds = s[order][np.linspace(0, n - 1, n_thresholds).astype(np.int64)]
    flagged = n - np.searchsorted(s[order][::-1], thresholds, side="left")
    true_hits = np.cumsum(y[order])[flagged - 1]
    starts, ends = anomaly_segments(y)
    padded = np.append(s, -np.inf)
    pr_areas, roc_areas = [], []
    for window in range(sliding_window + 1):
        tp = np.cumsum(_soft_labels(y, starts, ends, window)[order])[flagged - 1]
        p_new = positives + (tp - true_hits) / 2
        existence = _existence(padded, starts, ends, window // 2, thresholds)
        tpr = np.minimum(tp / p_new, 1.0) * existence
        fpr = (flagged - tp) / (n - p_new)
        pr_areas.append(np.sum(np.diff(tpr, prepend=0.0) * tp / flagged))
        roc_areas.append(np.trapezoid(np.r_[0.0, tpr, 1.0], np.r_[0.0, fpr, 1.0]))
    return {"vus_pr": float(np.mean(pr_areas)), "vus_roc": float(np.mean(roc_areas))}


def vus_pr(
    labels: ArrayLike, scores: ArrayLike, *, sliding_window: int = 100, n_thresholds: int = 250
) -> float:
    """Range-AP averaged over buffer lengths 0..sliding_window; see :func:`vus`."""
    return vus(labels, scores, sliding_window=sliding_window, n_thresholds=n_thresholds)["vus_pr"]


def vus_roc(
    labels: ArrayLike, scores: ArrayLike, *, sliding_window: int = 100, n_thresholds: int = 250
) -> float:
    """Range-ROC area averaged over buffer lengths 0..sliding_window; see :func:`vus`."""
    return vus(labels, scores, sliding_window=sliding_window, n_thresholds=n_thresholds)["vus_roc"]
