"""Evaluation metrics for anomaly scores and flags (numpy only).

Labels and predictions are 1-D arrays of 0/1 (1 = anomalous); scores are finite floats where higher
means more anomalous; :func:`evaluate_scores` flags ``score > threshold``. Bad input raises
ValueError naming the argument and the value. Point-adjusted numbers (``pa_*``) reproduce the
published protocol and inflate results; report them next to the honest metrics, never alone.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from model.range_metrics import (
    anomaly_segments,
    checked_flags,
    checked_scores,
    event_recall,
    false_alarm_events,
    require_both_classes,
    segment_hits,
    vus,
    vus_pr,
    vus_roc,
)

__all__ = [
    "anomaly_segments",
    "auc_pr",
    "auroc",
    "best_f1",
    "evaluate_scores",
    "event_recall",
    "false_alarm_events",
    "pa_f1",
    "pa_k_auc",
    "pa_k_f1",
    "point_adjust",
    "point_metrics",
    "vus",
    "vus_pr",
    "vus_roc",
]


def _f1(tp: NDArray | float, fp: NDArray | float, fn: NDArray | float) -> NDArray:
    """F1 = 2TP / (2TP + FP + FN), 0.0 where TP is 0 (vectorised)."""
    tp = np.asarray(tp, dtype=np.float64)
    denominator = np.asarray(2 * tp + fp + fn, dtype=np.float64)
    return np.divide(2 * tp, denominator, out=np.zeros_like(denominator), where=tp > 0)


def point_metrics(labels: ArrayLike, predictions: ArrayLike) -> dict[str, float]:
    """Point-wise precision, recall and F1 without any adjustment; a zero division gives 0.0."""
    y, flags = checked_flags(labels, predictions)
    tp = int(np.sum(y & flags))
    fp, fn = int(np.sum(~y & flags)), int(np.sum(y & ~flags))
    return {
        "precision": tp / (tp + fp) if tp else 0.0,
        "recall": tp / (tp + fn) if tp else 0.0,
        "f1": float(_f1(tp, fp, fn)),
    }


def auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve from the Mann-Whitney rank sum; tied scores get average ranks."""
    y, s = checked_scores(labels, scores)
    require_both_classes(y)
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]
    positives, negatives = int(y.sum()), int((~y).sum())
    return float((ranks[y].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def _ranked_counts(
    y: NDArray[np.bool_], s: NDArray[np.float64]
) -> tuple[NDArray, NDArray, NDArray]:
    """Distinct scores in descending order with the TP and FP counts of flagging ``score >= it``."""
    order = np.argsort(-s, kind="stable")
    ordered, hits = s[order], y[order]
    last_of_value = np.concatenate((ordered[1:] != ordered[:-1], [True]))
    tp = np.cumsum(hits)[last_of_value]
    return ordered[last_of_value], tp, np.flatnonzero(last_of_value) + 1 - tp


def auc_pr(labels: ArrayLike, scores: ArrayLike) -> float:
    """Average precision: sum over distinct thresholds of (recall step) x precision.

    Same definition as scikit-learn's ``average_precision_score`` (no interpolation).
    """
    y, s = checked_scores(labels, scores)
    require_both_classes(y)
    _, tp, fp = _ranked_counts(y, s)
    recall = tp / y.sum()
    return float(np.sum(np.diff(recall, prepend=0.0) * tp / (tp + fp)))


def best_f1(labels: ArrayLike, scores: ArrayLike) -> dict[str, float]:
    """ORACLE: the best point-wise F1 over all thresholds, chosen with the test labels.

    An upper bound, not a deployable result. Returns ``best_f1_oracle`` with its precision, recall
    and a threshold such that ``score > best_f1_oracle_threshold`` reproduces the flags.
    """
    y, s = checked_scores(labels, scores)
    values, tp, fp = _ranked_counts(y, s)
    positives = int(y.sum())
    f1 = _f1(tp, fp, positives - tp)
    best = int(np.argmax(f1))
    return {
        "best_f1_oracle": float(f1[best]),
        "best_f1_oracle_precision": float(tp[best] / (tp[best] + fp[best])),
        "best_f1_oracle_recall": float(tp[best] / positives) if positives else 0.0,
        "best_f1_oracle_threshold": float(np.nextafter(values[best], -np.inf)),
    }


def point_adjust(labels: ArrayLike, predictions: ArrayLike) -> NDArray[np.bool_]:
    """Detection adjustment of Xu et al. (WWW 2018) as used by the Anomaly Transformer.

    Every anomaly segment with at least one flagged point is flagged whole; flags outside segments
    are kept. Upstream's loop (``range(i, 0, -1)``) never revisits index 0, so a segment starting
    at index 0 and first flagged later keeps index 0 unflagged there; here index 0 is adjusted too.
    """
    y, flags = checked_flags(labels, predictions)
    starts, ends, hits = segment_hits(y, flags)
    marks = np.zeros(y.size + 1, dtype=np.int64)
    np.add.at(marks, starts[hits > 0], 1)
    np.add.at(marks, ends[hits > 0] + 1, -1)
    return flags | (np.cumsum(marks[:-1]) > 0)


def pa_f1(labels: ArrayLike, predictions: ArrayLike) -> float:
    """Point-adjusted F1 (inflated; the paper's protocol): F1 after :func:`point_adjust`."""
    return point_metrics(labels, point_adjust(labels, predictions))["f1"]


def _pa_k_curve(labels: ArrayLike, predictions: ArrayLike, ks: NDArray[np.float64]) -> NDArray:
    """F1 after PA%K adjustment for each K in ``ks`` (vectorised over K and segments)."""
    y, flags = checked_flags(labels, predictions)
    starts, ends, hits = segment_hits(y, flags)
    lengths = ends - starts + 1
    adjusted = hits[None, :] * 100 > ks[:, None] * lengths[None, :]
    tp = int(np.sum(y & flags)) + np.sum(adjusted * (lengths - hits)[None, :], axis=1)
    return _f1(tp, int(np.sum(~y & flags)), int(y.sum()) - tp)


def pa_k_f1(labels: ArrayLike, predictions: ArrayLike, k: float) -> float:
    """PA%K F1 of Kim et al. (AAAI 2022): a segment is flagged whole only when more than K % of it
    is flagged. K = 0 is :func:`pa_f1`; K = 100 is the point-wise F1.
    """
    if not 0 <= k <= 100:
        raise ValueError(f"k must be in [0, 100], got {k}")
    return float(_pa_k_curve(labels, predictions, np.array([k], dtype=np.float64))[0])


def pa_k_auc(labels: ArrayLike, predictions: ArrayLike) -> float:
    """Area under PA%K F1 over K = 0, 1, ..., 100 with K rescaled to [0, 1] (trapezoid rule)."""
    f1 = _pa_k_curve(labels, predictions, np.arange(101, dtype=np.float64))
    return float(np.sum(f1[1:] + f1[:-1]) / 200)


def evaluate_scores(
    labels: ArrayLike, scores: ArrayLike, threshold: float, *, sliding_window: int = 100
) -> dict[str, float]:
    """All metrics as one flat dict of floats for MLflow; flags are ``score > threshold``.

    Honest: ``auroc``, ``auc_pr``, ``vus_pr``, ``vus_roc`` (buffer up to ``sliding_window``), point-
    wise ``precision``, ``recall``, ``f1``, ``fpr_normal`` (flagged share of label-0 points),
    ``event_recall``, ``false_alarm_events`` and ``false_alarm_events_per_1k`` points. Partly
    adjusted: ``pa_k_auc`` (PA%K area; K = 0 is full adjustment). Inflated, for comparison with
    published numbers: ``pa_f1`` (point-adjusted) and ``best_f1_oracle`` (threshold chosen with
    the labels). Needs both classes in ``labels``.
    """
    y, s = checked_scores(labels, scores)
    require_both_classes(y)
    if np.isnan(threshold):
        raise ValueError(f"threshold must not be NaN, got {threshold}")
    flags = s > threshold
    false_alarms = false_alarm_events(y, flags)
    return {
        "auroc": auroc(y, s),
        "auc_pr": auc_pr(y, s),
        **vus(y, s, sliding_window=sliding_window),
        **point_metrics(y, flags),
        "fpr_normal": float(np.mean(flags[~y])),
        "pa_k_auc": pa_k_auc(y, flags),
        "event_recall": event_recall(y, flags),
        "false_alarm_events": float(false_alarms),
        "false_alarm_events_per_1k": 1000.0 * false_alarms / y.size,
        "pa_f1": pa_f1(y, flags),
        "best_f1_oracle": best_f1(y, s)["best_f1_oracle"],
    }
