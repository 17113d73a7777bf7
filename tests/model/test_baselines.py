"""Tests for model.baselines: by hand, against sklearn, injected anomalies, properties."""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.decomposition import PCA
from sklearn.ensemble import IsolationForest
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import StandardScaler

import model.baselines as baselines
from model.baselines import (
    DETECTORS,
    IsolationForestDetector,
    KnnDetector,
    MaxZDetector,
    PcaDetector,
    RandomDetector,
    detector_from_dict,
    make_detector,
)

NAMES = sorted(DETECTORS)


def _normal(length: int, seed: int, n_channels: int = 6) -> np.ndarray:
    """Correlated channels: two smooth latent factors mixed into ``n_channels``, plus noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(length)[:, None]
    latent = np.hstack((np.sin(2 * np.pi * t / 50), np.cos(2 * np.pi * t / 37)))
    mixing = np.random.default_rng(99).standard_normal((2, n_channels))
    return latent @ mixing + 0.1 * rng.standard_normal((length, n_channels))


def _windows(rows: np.ndarray, window: int) -> np.ndarray:
    """Flattened windows ending at each row, the first row repeated before the start."""
    padded = np.vstack([rows[:1]] * (window - 1) + [rows])
    return np.stack([padded[t : t + window].ravel() for t in range(rows.shape[0])])


def test_registry_names_and_unknown_name() -> None:
    assert NAMES == ["isolation_forest", "knn", "max_z", "pca", "random"]
    assert isinstance(make_detector("knn", window=3, k=2), KnnDetector)
    with pytest.raises(ValueError, match="name must be one of .* got 'iforest'"):
        make_detector("iforest")


def test_max_z_by_hand() -> None:
    detector = MaxZDetector().fit([[0.0, 5.0], [2.0, 5.0]])  # mean (1, 5), scale (1, 1)
    assert detector.score([[1.0, 2.0], [4.0, 5.0]]).tolist() == [3.0, 3.0]


def test_pca_by_hand() -> None:
    # Two perfectly correlated channels: one component (1, 1) / sqrt(2) explains everything.
    detector = PcaDetector().fit([[-1.0, -1.0], [1.0, 1.0]])
    assert detector.components.shape == (1, 2)
    assert detector.score([[1.0, -1.0], [2.0, 2.0]]) == pytest.approx([2.0, 0.0], abs=1e-12)


def test_pca_leaves_a_residual_to_score_where_every_component_is_needed() -> None:
    """One channel, or independent ones: 95 % of the variance needs every component, which would
    leave a residual of 0 everywhere (a detector that never alarms)."""
    rng = np.random.default_rng(0)
    univariate = PcaDetector().fit(rng.normal(5.0, 2.0, (200, 1)))
    assert univariate.components.shape == (0, 1)
    assert univariate.score([[5.0], [9.0]]) == pytest.approx([0.0, 4.0], abs=0.5)
    independent = PcaDetector().fit(rng.standard_normal((500, 4)))
    assert independent.components.shape == (3, 4)
    assert (independent.score(rng.standard_normal((50, 4)) * 3) > 1e-6).all()


def test_knn_by_hand() -> None:
    # Standardised train is itself; full windows (-1, 1), (1, -1), (-1, 1).
    detector = KnnDetector(window=2, k=2, stride=1).fit([[-1.0], [1.0], [-1.0], [1.0]])
    # t=0 sees (-1, -1): distance 2 to every reference; t=1 sees (-1, 1): two exact matches.
    assert detector.score([[-1.0], [1.0]]) == pytest.approx([2.0, 0.0], abs=1e-7)


def test_knn_reference_set_is_every_stride_th_window() -> None:
    # Standardised: -0.5, 0.5, 1.5, -1.5, 0; with stride 2 the references start at rows 0 and 2:
    # (-0.5, 0.5) and (1.5, -1.5). The window starting at row 1, (0.5, 1.5), is not one of them.
    train = np.array([[-1.0], [1.0], [3.0], [-3.0], [0.0]])
    every_2nd = KnnDetector(window=2, k=1, stride=2).fit(train)
    every_1st = KnnDetector(window=2, k=1, stride=1).fit(train)
    assert every_2nd.score(train[0:2])[1] == pytest.approx(0.0, abs=1e-7)
    assert every_2nd.score(train[1:3])[1] == pytest.approx(np.hypot(1.0, 1.0))  # to (-0.5, 0.5)
    assert every_1st.score(train[1:3])[1] == pytest.approx(0.0, abs=1e-7)


def test_pca_matches_sklearn() -> None:
    train, test = _normal(800, 1, 8), _normal(300, 2, 8) + [[0.0] * 7 + [0.5]]
    detector = PcaDetector(variance=0.95).fit(train)
    scaler = StandardScaler().fit(train)
    reference = PCA(n_components=0.95, svd_solver="full").fit(scaler.transform(train))
    assert detector.components.shape[0] == reference.n_components_
    z = scaler.transform(test)
    residual = z - reference.inverse_transform(reference.transform(z))
    np.testing.assert_allclose(detector.score(test), np.sum(residual**2, axis=1), rtol=1e-8)


def test_pca_fixed_number_of_components_matches_sklearn() -> None:
    train = _normal(500, 3, 8)
    detector = PcaDetector(n_components=3).fit(train)
    z = StandardScaler().fit_transform(train)
    reference = PCA(n_components=3, svd_solver="full").fit(z)
    residual = z - reference.inverse_transform(reference.transform(z))
    np.testing.assert_allclose(detector.score(train), np.sum(residual**2, axis=1), rtol=1e-8)


@pytest.mark.parametrize("block_bytes", [64 * 2**20, 8 * 1000])
def test_knn_matches_sklearn(block_bytes: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(baselines, "_KNN_BLOCK_BYTES", block_bytes)  # 1 query row per block
    train, test = _normal(2001, 4), _normal(400, 5)
    scaler = StandardScaler().fit(train)
    reference = _windows(scaler.transform(train), 10)[9::2]  # full windows, every 2nd
    assert reference.shape[0] == 996
    neighbours = NearestNeighbors(n_neighbors=5, algorithm="brute").fit(reference)
    distances, _ = neighbours.kneighbors(_windows(scaler.transform(test), 10))
    detector = KnnDetector().fit(train)
    np.testing.assert_allclose(detector.score(test), distances.mean(axis=1), rtol=1e-7)


@pytest.mark.parametrize("name", ["isolation_forest", "knn", "max_z", "pca"])
def test_injected_spike_and_level_shift_rank_above_normal_points(name: str) -> None:
    train, test = _normal(3000, 6), _normal(1000, 7)
    spread = train.std(axis=0)
    test[300, 2] += 6.0 * spread[2]  # spike on one channel
    test[600:650, 4] += 4.0 * spread[4]  # level shift on another
    scores = make_detector(name).fit(train).score(test)
    normal = np.delete(scores, np.r_[300:310, 600:660])  # kNN windows trail the anomalies
    # The forest's axis-aligned splits see a shift within the other channels' range less well.
    ceiling = np.quantile(normal, 0.95 if name == "isolation_forest" else 0.99)
    assert scores[300] > normal.max()
    assert np.median(scores[600:650]) > ceiling


def test_random_control_is_seeded_and_uniform() -> None:
    train = _normal(100, 8)
    first = RandomDetector(seed=3).fit(train).score(np.zeros((5000, 6)))
    assert np.array_equal(first, RandomDetector(seed=3).fit(train).score(np.ones((5000, 6))))
    assert not np.array_equal(first, RandomDetector(seed=4).fit(train).score(np.ones((5000, 6))))
    assert 0.0 <= first.min() and first.max() < 1.0 and abs(first.mean() - 0.5) < 0.02


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(NAMES), cut=st.integers(1, 59), seed=st.integers(0, 1000))
def test_scores_are_streaming_safe(name: str, cut: int, seed: int) -> None:
    detector = make_detector(name).fit(_normal(200, 9))
    values = _normal(60, seed)
    changed_future = values.copy()
    changed_future[cut:] = np.random.default_rng(seed).normal(5.0, 3.0, changed_future[cut:].shape)
    full = detector.score(values)
    np.testing.assert_allclose(detector.score(values[:cut]), full[:cut], rtol=1e-12)
    np.testing.assert_allclose(detector.score(changed_future)[:cut], full[:cut], rtol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_raw_inputs_score_like_z_scored_inputs(name: str) -> None:
    train, test = _normal(600, 10), _normal(200, 11)
    scale = np.array([1e-3, 0.5, 2.0, 40.0, 1e3, 7.0])
    offset = np.array([0.0, -3.0, 100.0, 1e4, -2.0, 0.5])
    z_scored = make_detector(name).fit(train).score(test)
    raw = make_detector(name).fit(train * scale + offset).score(test * scale + offset)
    np.testing.assert_allclose(raw, z_scored, rtol=1e-6, atol=1e-9)


def test_constant_channels_are_kept_finite() -> None:
    train = _normal(300, 12)
    train[:, 1] = 7.0
    for name in NAMES:
        scores = make_detector(name).fit(train).score(_normal(50, 13))
        assert np.all(np.isfinite(scores)), name


@pytest.mark.parametrize("name", NAMES)
def test_state_round_trips_through_json(name: str) -> None:
    params = {
        "knn": {"window": 4, "k": 3},
        "pca": {"variance": 0.9},
        "random": {"seed": 5},
        "isolation_forest": {"n_trees": 10, "max_samples": 64, "seed": 2},
    }
    detector = make_detector(name, **params.get(name, {})).fit(_normal(300, 14))
    restored = detector_from_dict(json.loads(json.dumps(detector.to_dict())))
    assert type(restored) is type(detector)
    test = _normal(80, 15)
    np.testing.assert_allclose(restored.score(test), detector.score(test), rtol=1e-12)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: PcaDetector(variance=0.0), "variance must be in"),
        (lambda: PcaDetector(n_components=0), "n_components must be an int >= 1, got 0"),
        (lambda: KnnDetector(window=2.5), "window must be an int >= 1, got 2.5"),
        (lambda: KnnDetector(k=True), "k must be an int >= 1, got True"),
        (lambda: RandomDetector(seed=-1), "seed must be an int >= 0, got -1"),
        (lambda: KnnDetector(window=5, k=3).fit(np.zeros((6, 2))), "at least k=3 reference"),
        (lambda: MaxZDetector().fit(np.zeros(5)), r"train must be a non-empty \(T, C\)"),
        (lambda: MaxZDetector().fit([[1.0, np.nan]]), r"train must be finite, got nan at \(0, 1\)"),
        (lambda: MaxZDetector().fit([["a"]]), "train must be a numeric"),
        (lambda: MaxZDetector().score([[1.0]]), "must be fitted before score"),
        (lambda: PcaDetector().to_dict(), "must be fitted before to_dict"),
        (lambda: MaxZDetector().fit([[1.0, 2.0]]).score([[1.0]]), "values must have 2 columns"),
        (lambda: detector_from_dict({"name": "lstm"}), "data\\['name'\\] must be one of"),
        (lambda: detector_from_dict({"name": "knn", "k": 3}), "data must be a fitted knn state"),
        (lambda: PcaDetector(variance="high"), "variance must be in \\(0, 1\\], got 'high'"),
        (lambda: IsolationForestDetector(n_trees=0), "n_trees must be an int >= 1, got 0"),
        (lambda: IsolationForestDetector(seed=-2), "seed must be an int >= 0, got -2"),
        (lambda: IsolationForestDetector().fit([[1.0, 2.0]]), "train must have at least 2 rows"),
        (lambda: IsolationForestDetector().score([[1.0]]), "must be fitted before score"),
    ],
)
def test_bad_input_raises(make: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_isolation_forest_ranks_like_sklearn() -> None:
    train, test = _normal(2000, 16), _normal(500, 17)
    ours = IsolationForestDetector(seed=1).fit(train).score(test)
    z = StandardScaler().fit(train)
    forest = IsolationForest(random_state=1).fit(z.transform(train))
    theirs = -forest.score_samples(z.transform(test))
    assert np.corrcoef(ours, theirs)[0, 1] > 0.85  # two forests grown from different draws
    assert ours[theirs.argmax()] > np.quantile(ours, 0.95)
    assert 0.0 < ours.min() and ours.max() <= 1.0


def test_isolation_forest_by_hand() -> None:
    # Two training rows: one split separates them, so each leaf holds one row at depth 1;
    # c(2) = 1 and the score of every row is 2 ** (-1 / 1) = 0.5.
    detector = IsolationForestDetector(n_trees=5).fit([[0.0], [1.0]])
    assert detector.score([[-3.0], [0.5], [9.0]]) == pytest.approx([0.5, 0.5, 0.5])


def test_isolation_forest_fits_rows_with_few_distinct_values() -> None:
    # Every tree runs out of splits before its height limit: two values, one split each.
    train = np.repeat([[0.0, 5.0], [1.0, 5.0]], 200, axis=0)
    detector = IsolationForestDetector(n_trees=20).fit(train)
    scores = detector.score([[0.0, 5.0], [1.0, 5.0], [3.0, 5.0]])
    assert np.all((0.0 < scores) & (scores <= 1.0))
    assert scores[2] == scores[1]  # beyond the range: the same side of every split as 1.0
    assert detector.forest is not None and (detector.forest.feature >= 0).sum() == 20


def test_knn_contributions_by_hand() -> None:
    # Standardised train (-1, -1), (1, 1); the query (3, 1) is nearest to (1, 1): difference
    # (2, 0), so the whole distance 2 falls on the first channel.
    detector = KnnDetector(window=1, k=1, stride=1).fit([[-1.0, -1.0], [1.0, 1.0]])
    scores, contributions = detector.score_contributions([[3.0, 1.0]])
    assert scores == pytest.approx([2.0]) and contributions[0] == pytest.approx([2.0, 0.0])


@pytest.mark.parametrize("name", NAMES)
def test_contributions_sum_to_the_score_and_name_the_spiked_channel(name: str) -> None:
    train, test = _normal(1500, 18), _normal(300, 19)
    test[150, 3] += 8.0 * train[:, 3].std()
    detector = make_detector(name).fit(train)
    scores, contributions = detector.score_contributions(test)
    np.testing.assert_allclose(scores, detector.score(test), rtol=1e-12)
    np.testing.assert_allclose(contributions.sum(axis=1), scores, rtol=1e-9)
    assert contributions.shape == test.shape and contributions.min() >= 0.0
    if name != "random":
        assert contributions[150].argmax() == 3
    assert detector.win_size == (10 if name == "knn" else 1)
