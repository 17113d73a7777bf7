"""Isolation forest (Liu, Ting and Zhou, ICDM 2008) in numpy, trees stored as arrays.

Each tree is grown on ``max_samples`` rows drawn without replacement, to the height limit
``ceil(log2(max_samples))``: a node splits on a channel drawn uniformly among those that vary in its
rows, at a threshold drawn uniformly between their minimum and maximum. Trees are kept in heap order
(node ``i`` has children ``2i + 1`` and ``2i + 2``), all grown at once, level by level. A row's
score is ``2 ** (-mean path length / c(max_samples))``, in (0, 1], higher is more anomalous.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Self

import numpy as np
from numpy.typing import ArrayLike, NDArray

from model.detector_base import Scores, Standardised, positive_int, seed_value
from model.scaling import Scaler

# Rows scored per block, so that the (trees, rows) work arrays stay small.
_BLOCK_ROWS = 4096


def average_path_length(n: NDArray[Any] | float) -> NDArray[np.float64]:
    """``c(n)``: the mean path length of an unsuccessful search in a binary tree of ``n`` points."""
    sizes = np.asarray(n, dtype=np.float64)
    out = np.where(sizes == 2, 1.0, 0.0)
    big = sizes > 2
    safe = np.where(big, sizes, 3.0)
    harmonic = np.log(safe - 1.0) + np.euler_gamma
    return np.where(big, 2.0 * harmonic - 2.0 * (safe - 1.0) / safe, out)


@dataclass(frozen=True)
class Forest:
    """The trees as `(n_trees, n_nodes)` arrays in heap order."""

    feature: NDArray[np.int64]  # split channel; -1 at a leaf or an unused slot
    threshold: NDArray[np.float64]  # rows with value >= threshold go right
    size: NDArray[np.int64]  # training rows that reached the node (used at leaves)
    max_samples: int  # rows each tree was grown on

    @property
    def height(self) -> int:
        return int(math.log2(self.feature.shape[1] + 1)) - 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "feature": self.feature.tolist(),
            "threshold": self.threshold.tolist(),
            "size": self.size.tolist(),
            "max_samples": self.max_samples,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Forest:
        feature = np.asarray(data["feature"], dtype=np.int64)
        threshold = np.asarray(data["threshold"], dtype=np.float64)
        size = np.asarray(data["size"], dtype=np.int64)
        nodes = feature.shape[-1] if feature.ndim == 2 else 0
        if not (feature.shape == threshold.shape == size.shape) or (nodes + 1) & nodes:
            raise ValueError(
                f"forest arrays must share a (n_trees, 2**k - 1) shape, got {feature.shape}, "
                f"{threshold.shape}, {size.shape}"
            )
        return cls(feature, threshold, size, int(data["max_samples"]))


def grow_forest(
    rows: NDArray[np.float64], n_trees: int, max_samples: int, rng: np.random.Generator
) -> Forest:
    """Grow ``n_trees`` isolation trees on ``rows`` `(T >= 2, C)`."""
    n_rows, n_channels = rows.shape
    psi = min(max_samples, n_rows)
    height = math.ceil(math.log2(psi))
    n_nodes = 2 ** (height + 1) - 1
    feature = np.full((n_trees, n_nodes), -1, dtype=np.int64)
    threshold = np.zeros((n_trees, n_nodes))
    samples = np.stack([rows[rng.choice(n_rows, psi, replace=False)] for _ in range(n_trees)])
    flat = samples.reshape(-1, n_channels)  # (n_trees * psi, C)
    tree = np.repeat(np.arange(n_trees), psi)
    node = np.zeros(n_trees * psi, dtype=np.int64)
    active = np.ones(n_trees * psi, dtype=bool)
    for _ in range(height):
        index = np.flatnonzero(active)
        if index.size == 0:  # every node is a leaf already (few distinct values)
            break
        key = tree[index] * n_nodes + node[index]
        order = np.argsort(key, kind="stable")
        index, key = index[order], key[order]
        starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
        values = flat[index]
        low, high = np.minimum.reduceat(values, starts), np.maximum.reduceat(values, starts)
        varies = high > low  # (segments, C)
        splits = varies.any(axis=1) & (np.diff(np.r_[starts, len(index)]) > 1)
        pick = np.argmax(rng.random(varies.shape) * varies, axis=1)
        segment = np.arange(len(starts))
        cut = low[segment, pick] + rng.random(len(starts)) * (high - low)[segment, pick]
        split_keys = key[starts][splits]
        feature.flat[split_keys] = pick[splits]
        threshold.flat[split_keys] = cut[splits]
        of_row = np.repeat(segment, np.diff(np.r_[starts, len(index)]))
        moving = splits[of_row]
        right = values[np.arange(len(index)), pick[of_row]] >= cut[of_row]
        node[index[moving]] = 2 * node[index[moving]] + 1 + right[moving]
        active[index[~moving]] = False
    size = np.bincount(tree * n_nodes + node, minlength=n_trees * n_nodes)
    return Forest(feature, threshold, size.reshape(n_trees, n_nodes), psi)


def _paths(forest: Forest, rows: NDArray[np.float64]) -> tuple[NDArray[Any], NDArray[Any]]:
    """Per tree and row, the path length (splits + ``c(leaf size)``) and the channel split on at
    each level (-1 once at a leaf): `(n_trees, T)` and `(height, n_trees, T)`."""
    n_trees = forest.feature.shape[0]
    trees = np.arange(n_trees)[:, None]
    columns = np.arange(rows.shape[0])[None, :]
    node = np.zeros((n_trees, rows.shape[0]), dtype=np.int64)
    channels = np.full((forest.height, n_trees, rows.shape[0]), -1, dtype=np.int64)
    for level in range(forest.height):
        split = forest.feature[trees, node]  # (n_trees, T)
        inner = split >= 0
        value = rows[columns, np.maximum(split, 0)]
        right = value >= forest.threshold[trees, node]
        node = np.where(inner, 2 * node + 1 + right, node)
        channels[level] = split
    depth = (channels >= 0).sum(axis=0)
    return depth + average_path_length(forest.size[trees, node]), channels


def forest_scores(
    forest: Forest, rows: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Scores `(T,)` and per-channel contributions `(T, C)` whose rows sum to the score.

    A row's contribution of channel ``c`` is its score times the share of ``c`` among the splits
    on the row's paths, each tree's splits sharing one vote (a short path gives each split more).
    Rows no tree splits on spread their score evenly.
    """
    n_rows, n_channels = rows.shape
    scores = np.empty(n_rows)
    contributions = np.empty((n_rows, n_channels))
    norm = float(average_path_length(forest.max_samples))
    for start in range(0, n_rows, _BLOCK_ROWS):
        block = rows[start : start + _BLOCK_ROWS]
        lengths, channels = _paths(forest, block)
        score = 2.0 ** (-lengths.mean(axis=0) / norm) if norm > 0 else np.ones(len(block))
        depth = (channels >= 0).sum(axis=0)  # (n_trees, T)
        vote = np.broadcast_to(1.0 / np.maximum(depth, 1), channels.shape)
        position = np.broadcast_to(np.arange(len(block)), channels.shape)
        used = channels >= 0
        votes = np.bincount(
            position[used] * n_channels + channels[used],
            weights=vote[used],
            minlength=len(block) * n_channels,
        ).reshape(len(block), n_channels)
        totals = votes.sum(axis=1, keepdims=True)
        shares = np.where(totals > 0, votes / np.where(totals > 0, totals, 1.0), 1.0 / n_channels)
        scores[start : start + len(block)] = score
        contributions[start : start + len(block)] = shares * score[:, None]
    return scores, contributions


class IsolationForestDetector(Standardised):
    """Isolation forest score of each row (:mod:`model.isolation_forest`): ``n_trees`` trees of
    ``max_samples`` training rows each, grown from ``seed``."""

    name = "isolation_forest"

    def __init__(self, n_trees: int = 100, max_samples: int = 256, seed: int = 0) -> None:
        self.n_trees = positive_int(n_trees, "n_trees")
        self.max_samples = positive_int(max_samples, "max_samples")
        self.seed = seed_value(seed)
        self.forest: Forest | None = None

    def fit(self, train: ArrayLike) -> Self:
        rows = self._fit_rows(train)
        if rows.shape[0] < 2:
            raise ValueError(f"train must have at least 2 rows, got {rows.shape[0]}")
        rng = np.random.default_rng(self.seed)
        self.forest = grow_forest(rows, self.n_trees, self.max_samples, rng)
        return self

    def score(self, values: ArrayLike) -> NDArray[np.float64]:
        return self.score_contributions(values)[0]

    def score_contributions(self, values: ArrayLike) -> Scores:
        """Contributions: the score split by the channels' shares of the splits on the row's
        paths (:func:`model.isolation_forest.forest_scores`)."""
        rows = self._standardise(values)
        if self.forest is None:
            raise ValueError("isolation_forest detector must be fitted before score, got None")
        return forest_scores(self.forest, rows)

    def to_dict(self) -> dict[str, Any]:
        forest = None if self.forest is None else self.forest.to_dict()
        return self._state(
            n_trees=self.n_trees, max_samples=self.max_samples, seed=self.seed, forest=forest
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IsolationForestDetector:
        detector = cls(data["n_trees"], data["max_samples"], data["seed"])
        detector.scaler = Scaler.from_dict(data["scaler"])
        detector.forest = Forest.from_dict(data["forest"])
        if detector.forest.feature.max(initial=-1) >= detector.scaler.n_channels:
            raise ValueError(f"forest splits on a channel >= {detector.scaler.n_channels}")
        return detector
