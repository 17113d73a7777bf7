"""Tests for model.metrics and model.range_metrics: cases by hand, cross-checks, properties."""

from __future__ import annotations

import math
import re
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from sklearn.metrics import (
    average_precision_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from model.metrics import (
    anomaly_segments,
    auc_pr,
    auroc,
    best_f1,
    evaluate_scores,
    event_recall,
    false_alarm_events,
    pa_f1,
    pa_k_auc,
    pa_k_f1,
    point_adjust,
    point_metrics,
    vus,
    vus_pr,
    vus_roc,
)

SQRT_HALF = math.sqrt(0.5)


def _random_labels(rng: np.random.Generator, n: int, n_segments: int, max_len: int) -> np.ndarray:
    labels = np.zeros(n, dtype=int)
    for start in rng.integers(0, n, n_segments):
        labels[start : start + rng.integers(1, max_len + 1)] = 1
    return labels


# --- point-wise and rank metrics -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "predictions", "expected"),
    [
        ([0, 1, 1, 0], [0, 1, 0, 1], (0.5, 0.5, 0.5)),
        ([1, 1, 1, 0, 0], [1, 0, 0, 0, 0], (1.0, 1 / 3, 0.5)),
        ([0, 0, 1, 1], [0, 0, 0, 0], (0.0, 0.0, 0.0)),
        ([0, 0, 0, 0], [1, 1, 0, 0], (0.0, 0.0, 0.0)),
        ([True, False], [True, False], (1.0, 1.0, 1.0)),
    ],
)
def test_point_metrics_by_hand(labels, predictions, expected) -> None:
    result = point_metrics(labels, predictions)
    assert (result["precision"], result["recall"], result["f1"]) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("labels", "scores", "expected"),
    [
        ([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], 0.75),
        ([0, 1], [1.0, 1.0], 0.5),
        ([0, 0, 1, 1], [1, 2, 2, 3], 0.875),  # one tied pair counts 1/2
        ([1, 0], [0.0, 1.0], 0.0),
    ],
)
def test_auroc_by_hand(labels, scores, expected) -> None:
    assert auroc(labels, scores) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("labels", "scores", "expected"),
    [
        ([0, 1, 1, 0], [0.9, 0.8, 0.1, 0.2], 0.5 * 0.5 + 0.5 * 0.5),
        ([1, 0, 1], [0.9, 0.8, 0.7], 0.5 * 1 + 0.5 * 2 / 3),
        ([1, 0, 1, 0], [1.0, 1.0, 0.5, 0.0], 0.5 * 0.5 + 0.5 * 2 / 3),  # tie at the top
        ([0, 1, 1], [0.0, 2.0, 1.0], 1.0),
    ],
)
def test_auc_pr_by_hand(labels, scores, expected) -> None:
    assert auc_pr(labels, scores) == pytest.approx(expected)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("decimals", [1, 6])
def test_rank_metrics_match_sklearn(seed: int, decimals: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.random(500) < 0.1 + 0.05 * seed
    scores = np.round(rng.random(500) + 0.4 * labels, decimals)  # decimals=1 gives many ties
    assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    expected_ap = average_precision_score(labels, scores)
    assert auc_pr(labels, scores) == pytest.approx(expected_ap, abs=1e-12)
    flags = scores > 0.8
    expected = tuple(f(labels, flags) for f in (precision_score, recall_score, f1_score))
    result = point_metrics(labels, flags)
    assert (result["precision"], result["recall"], result["f1"]) == pytest.approx(expected)


@pytest.mark.parametrize("seed", range(3))
def test_best_f1_oracle_is_the_maximum_over_thresholds(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.random(300) < 0.2
    scores = np.round(rng.random(300) + 0.3 * labels, 2)
    brute = max(f1_score(labels, scores >= t) for t in np.unique(scores))
    result = best_f1(labels, scores)
    assert result["best_f1_oracle"] == pytest.approx(brute)
    reproduced = point_metrics(labels, scores > result["best_f1_oracle_threshold"])
    assert reproduced["f1"] == pytest.approx(result["best_f1_oracle"])
    assert reproduced["precision"] == pytest.approx(result["best_f1_oracle_precision"])
    assert reproduced["recall"] == pytest.approx(result["best_f1_oracle_recall"])


def test_best_f1_by_hand() -> None:
    # Flag top-1: F1 2/3; top-2: 1/2; top-3 (score >= 0.3): 2*2/(2*2+1) = 0.8; all: 2/3.
    result = best_f1([0, 1, 1, 0], [0.1, 0.9, 0.3, 0.4])
    assert result["best_f1_oracle"] == pytest.approx(0.8)
    assert 0.1 < result["best_f1_oracle_threshold"] < 0.3
    assert all(key.startswith("best_f1_oracle") for key in result)


def test_rank_invariances() -> None:
    rng = np.random.default_rng(7)
    labels = rng.random(400) < 0.15
    scores = rng.normal(size=400) + labels
    assert auroc(labels, -scores) == pytest.approx(1 - auroc(labels, scores))
    assert auroc(labels, np.exp(scores)) == pytest.approx(auroc(labels, scores))
    assert auc_pr(labels, 3 * scores + 1) == pytest.approx(auc_pr(labels, scores))
    assert vus_pr(labels, np.exp(scores), sliding_window=10) == pytest.approx(
        vus_pr(labels, scores, sliding_window=10)
    )


# --- point adjustment, PA%K and events ---------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "predictions", "expected"),
    [
        # segment at index 0 first flagged at index 1: index 0 is adjusted (upstream skips it)
        ([1, 1, 1, 0, 0, 1, 1, 0], [0, 1, 0, 0, 1, 0, 0, 0], [1, 1, 1, 0, 1, 0, 0, 0]),
        ([0, 1, 1, 1, 0, 1, 1], [0, 0, 0, 1, 0, 0, 1], [0, 1, 1, 1, 0, 1, 1]),
        ([1, 1, 0, 1], [0, 0, 1, 0], [0, 0, 1, 0]),
        ([0, 0, 0], [1, 0, 1], [1, 0, 1]),
        ([1], [1], [1]),
    ],
)
def test_point_adjust_by_hand(labels, predictions, expected) -> None:
    assert point_adjust(labels, predictions).tolist() == [bool(v) for v in expected]


def test_pa_f1_by_hand() -> None:
    # Adjusted flags [1,1,1,0,1,0,0,0]: TP 3, FP 1, FN 2 -> F1 = 6 / 9.
    assert pa_f1([1, 1, 1, 0, 0, 1, 1, 0], [0, 1, 0, 0, 1, 0, 0, 0]) == pytest.approx(6 / 9)


@pytest.mark.parametrize(
    ("k", "expected"), [(0, 1.0), (20, 1.0), (29.9, 1.0), (30, 6 / 13), (100, 6 / 13)]
)
def test_pa_k_f1_by_hand(k: float, expected: float) -> None:
    # A 10-point segment with 3 flagged (30 %) is adjusted only when 30 > K; else F1 = 2*3/(6+7).
    labels = [0] + [1] * 10 + [0]
    predictions = [0, 1, 1, 1] + [0] * 8
    assert pa_k_f1(labels, predictions, k) == pytest.approx(expected)


def test_pa_k_auc_by_hand() -> None:
    # 25 % flagged: F1 = 1 for K = 0..24, 2/(2+3) = 0.4 for K = 25..100.
    expected = 0.24 * 1.0 + 0.01 * (1.0 + 0.4) / 2 + 0.75 * 0.4
    assert pa_k_auc([1, 1, 1, 1, 0], [1, 0, 0, 0, 0]) == pytest.approx(expected)


def test_event_metrics_by_hand() -> None:
    labels = [0, 1, 1, 0, 0, 1, 0, 0, 0, 0]
    predictions = [1, 1, 0, 0, 1, 0, 0, 1, 1, 0]
    assert event_recall(labels, predictions) == pytest.approx(0.5)
    # Flagged runs [0, 1], [4], [7, 8]; the first touches a segment.
    assert false_alarm_events(labels, predictions) == 2
    assert event_recall([0, 0], [1, 0]) == 0.0
    starts, ends = anomaly_segments(labels)
    assert starts.tolist() == [1, 5] and ends.tolist() == [2, 5]


# --- VUS -----------------------------------------------------------------------------------------


def _vus_by_definition(labels, scores, max_window: int, n_thresholds: int) -> tuple[float, float]:
    """Direct, loop-based transcription of the VUS "opt" definition, for cross-checking."""
    labels, scores = np.asarray(labels, dtype=bool), np.asarray(scores, dtype=float)
    n, positives = labels.size, labels.sum()
    segments = list(zip(*anomaly_segments(labels), strict=True))
    descending = np.sort(scores)[::-1]
    thresholds = [descending[int(i)] for i in np.linspace(0, n - 1, n_thresholds)]
    aps, rocs = [], []
    for window in range(max_window + 1):
        half = window // 2
        soft = labels.astype(float)
        ranges: list[list[int]] = []
        for start, end in segments:
            for d in range(1, half + 1):
                for position in (start - d, end + d):
                    if 0 <= position < n:
                        soft[position] += math.sqrt(1 - d / window)
            low, high = max(start - half, 0), min(end + half, n - 1)
            if ranges and low <= ranges[-1][1]:
                ranges[-1][1] = high
            else:
                ranges.append([low, high])
        soft = np.minimum(soft, 1.0)
        tprs, fprs, precisions = [], [], []
        for threshold in thresholds:
            flagged = scores >= threshold
            tp = soft[flagged].sum()
            n_labels = positives + soft[flagged & ~labels].sum()
            p_new = (positives + n_labels) / 2
            existence = np.mean([flagged[low : high + 1].any() for low, high in ranges])
            tprs.append(min(tp / p_new, 1.0) * existence)
            fprs.append((flagged.sum() - tp) / (n - p_new))
            precisions.append(tp / flagged.sum())
        steps = np.diff(tprs, prepend=0.0)
        aps.append(sum(step * precision for step, precision in zip(steps, precisions, strict=True)))
        xs, ys = [0.0, *fprs, 1.0], [0.0, *tprs, 1.0]
        rocs.append(sum((xs[i + 1] - xs[i]) * (ys[i + 1] + ys[i]) / 2 for i in range(len(xs) - 1)))
    return float(np.mean(aps)), float(np.mean(rocs))


def test_vus_by_hand() -> None:
    # Anomaly at index 2; its neighbour 1 scores highest. Buffers 0 and 1 have no soft points:
    # AP = 0 * 0 + 1 * 1/2, ROC area 3/4. Buffer 2 gives soft labels [0, s, 1, s, 0], s = sqrt(1/2):
    # flagging {1}: TP = s, P_new = (1 + 1 + s) / 2, recall r = s / P_new, precision s;
    # flagging {1, 2}: recall 1 (capped), precision (1 + s) / 2, FPR (2 - (1 + s)) / (5 - P_new).
    s = SQRT_HALF
    p_new = (2 + s) / 2
    r, fpr = s / p_new, (1 - s) / (5 - p_new)
    ap_2, roc_2 = r * s + (1 - r) * (1 + s) / 2, fpr * r / 2 + (1 - fpr)
    result = vus([0, 0, 1, 0, 0], [0.1, 0.9, 0.5, 0.2, 0.3], sliding_window=2, n_thresholds=5)
    assert result["vus_pr"] == pytest.approx((0.5 + 0.5 + ap_2) / 3)
    assert result["vus_roc"] == pytest.approx((0.75 + 0.75 + roc_2) / 3)


@pytest.mark.parametrize("seed", range(6))
def test_vus_matches_the_definition(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(60, 400))
    labels = _random_labels(rng, n, n_segments=int(rng.integers(1, 6)), max_len=15)
    labels[0], labels[-1] = seed % 3 == 0, seed % 2  # segments touching either end on some seeds
    if labels.all() or not labels.any():
        labels[n // 2] = 1 - labels[n // 2]
    scores = np.round(rng.random(n) + 0.5 * labels, 2)
    max_window, n_thresholds = int(rng.integers(0, 25)), int(rng.choice([7, 50, 250]))
    expected = _vus_by_definition(labels, scores, max_window, n_thresholds)
    result = vus(labels, scores, sliding_window=max_window, n_thresholds=n_thresholds)
    assert (result["vus_pr"], result["vus_roc"]) == pytest.approx(expected, abs=1e-10)


def test_vus_merges_close_segments_like_the_definition() -> None:
    labels = np.zeros(120, dtype=int)
    for start, end in [(0, 2), (10, 12), (15, 15), (40, 44), (117, 119)]:
        labels[start : end + 1] = 1  # gaps of 7, 2 and 24 points merge at different buffers
    scores = np.random.default_rng(9).random(120) + 0.3 * labels
    result = vus(labels, scores, sliding_window=30, n_thresholds=40)
    expected = _vus_by_definition(labels, scores, 30, 40)
    assert (result["vus_pr"], result["vus_roc"]) == pytest.approx(expected, abs=1e-10)


@pytest.mark.parametrize("seed", range(3))
def test_vus_without_buffer_on_one_segment_is_ap_and_auroc(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = np.zeros(200, dtype=int)
    labels[50 + seed : 80] = 1
    scores = rng.random(200) + 0.3 * labels
    result = vus(labels, scores, sliding_window=0, n_thresholds=200)
    assert result["vus_pr"] == pytest.approx(average_precision_score(labels, scores))
    assert result["vus_roc"] == pytest.approx(roc_auc_score(labels, scores))


def test_vus_of_perfect_and_random_scores() -> None:
    rng = np.random.default_rng(3)
    labels = np.zeros(20_000, dtype=int)
    for start in range(1_000, 20_000, 4_000):
        labels[start : start + 200] = 1  # 5 segments, anomaly rate 0.05
    rate = labels.mean()
    assert vus_pr(labels, labels.astype(float)) == pytest.approx(1.0)
    assert vus_pr(labels, labels + 0.1 * rng.random(labels.size)) > 0.98
    assert vus_roc(labels, labels + 0.1 * rng.random(labels.size)) > 0.98
    random_scores = rng.random(labels.size)
    assert vus_pr(labels, random_scores, sliding_window=0) == pytest.approx(rate, abs=0.01)
    # Buffers count as soft positives, so random scores land a little above the anomaly rate.
    assert rate < vus_pr(labels, random_scores) < 1.5 * rate
    assert vus_roc(labels, random_scores, sliding_window=0) == pytest.approx(0.5, abs=0.02)


def test_vus_is_fast_on_25k_points() -> None:
    rng = np.random.default_rng(0)
    labels = _random_labels(rng, 25_000, n_segments=30, max_len=300)
    scores = rng.random(25_000)
    started = time.perf_counter()
    vus(labels, scores)
    assert time.perf_counter() - started < 2.0


# --- evaluate_scores and input validation --------------------------------------------------------


def test_evaluate_scores_is_flat_and_consistent() -> None:
    rng = np.random.default_rng(11)
    labels = _random_labels(rng, 3_000, n_segments=8, max_len=60)
    scores = rng.random(3_000) + 0.6 * labels
    result = evaluate_scores(labels, scores, threshold=1.0, sliding_window=20)
    flags = scores > 1.0
    assert all(re.fullmatch(r"[a-z0-9_]+", key) for key in result)
    assert all(type(value) is float for value in result.values())
    assert result["auroc"] == auroc(labels, scores)
    assert result["vus_pr"] == vus_pr(labels, scores, sliding_window=20)
    assert result["f1"] == point_metrics(labels, flags)["f1"]
    assert result["pa_f1"] == pa_f1(labels, flags)
    assert result["best_f1_oracle"] == best_f1(labels, scores)["best_f1_oracle"]
    assert result["fpr_normal"] == pytest.approx(np.mean(flags[labels == 0]))
    events = false_alarm_events(labels, flags)
    assert result["false_alarm_events_per_1k"] == pytest.approx(events / 3)
    assert evaluate_scores(labels, scores, math.inf)["recall"] == 0.0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: point_metrics([0, 1], [0, 1, 1]),
            "labels and predictions must have the same length, got 2 and 3",
        ),
        (lambda: auroc([0, 1], [0.5, math.nan]), r"scores must be finite, got nan at index 1"),
        (lambda: auc_pr([0, 2], [0.1, 0.2]), r"labels must contain only 0 and 1, got \[2\]"),
        (lambda: auroc([], []), "labels must not be empty"),
        (lambda: auroc([1, 1], [0.1, 0.2]), "labels must contain both 0 and 1, got only 1"),
        (lambda: point_adjust([[0, 1]], [[0, 1]]), r"labels must be 1-D, got shape \(1, 2\)"),
        (lambda: pa_f1([0, 1], [0, 0.5]), r"predictions must contain only 0 and 1, got \[0.5\]"),
        (lambda: pa_k_f1([0, 1], [0, 1], 101), "k must be in \\[0, 100\\], got 101"),
        (lambda: vus([0, 1], [0, 1], sliding_window=-1), "sliding_window must be an int >= 0"),
        (lambda: vus([0, 1], [0, 1], n_thresholds=0), "n_thresholds must be an int >= 1, got 0"),
        (lambda: evaluate_scores([0, 1], [0, 1], math.nan), "threshold must not be NaN, got nan"),
        (lambda: best_f1([0, 1], ["a", "b"]), "scores must be numeric, got dtype <U1"),
    ],
)
def test_bad_input_raises(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


# --- properties ----------------------------------------------------------------------------------

_binary = arrays(np.int8, st.integers(1, 60), elements=st.integers(0, 1))


@st.composite
def _labelled_flags(draw):
    labels = draw(_binary)
    return labels, draw(arrays(np.int8, labels.size, elements=st.integers(0, 1)))


@st.composite
def _labelled_scores(draw):
    labels = draw(_binary.filter(lambda a: 0 < a.sum() < a.size))
    scores = draw(arrays(np.float64, labels.size, elements=st.integers(-5, 5).map(float)))
    return labels, scores


@settings(max_examples=60, deadline=None)
@given(_labelled_flags())
def test_adjustment_properties(case) -> None:
    labels, predictions = case
    adjusted = point_adjust(labels, predictions)
    assert adjusted.shape == labels.shape
    assert np.all(adjusted >= predictions) and np.all(adjusted <= (labels | predictions))
    assert np.array_equal(point_adjust(labels, adjusted), adjusted)
    curve = [pa_k_f1(labels, predictions, k) for k in (0, 25, 50, 75, 100)]
    assert curve[0] == pytest.approx(pa_f1(labels, predictions))
    assert curve[-1] == pytest.approx(point_metrics(labels, predictions)["f1"])
    assert all(a >= b - 1e-12 for a, b in zip(curve, curve[1:], strict=False))
    assert 0.0 <= pa_k_auc(labels, predictions) <= 1.0
    assert 0.0 <= event_recall(labels, predictions) <= 1.0
    assert 0 <= false_alarm_events(labels, predictions) <= int(predictions.sum())


@settings(max_examples=60, deadline=None)
@given(_labelled_scores(), st.integers(0, 12), st.integers(1, 30))
def test_score_metric_ranges(case, max_window: int, n_thresholds: int) -> None:
    labels, scores = case
    assert 0.0 <= auroc(labels, scores) <= 1.0
    assert labels.mean() - 1e-12 <= best_f1(labels, scores)["best_f1_oracle"] <= 1.0
    assert 0.0 < auc_pr(labels, scores) <= 1.0
    result = vus(labels, scores, sliding_window=max_window, n_thresholds=n_thresholds)
    assert 0.0 <= result["vus_pr"] <= 1.0 + 1e-12 and 0.0 <= result["vus_roc"] <= 1.0 + 1e-12
