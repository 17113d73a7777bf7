"""Fit the alarm threshold on held-out normal data: the validation tail of the training range.

Methods (``docs/calibration.md``): ``conformal`` (default), ``quantile`` and ``pot`` see only the
validation-tail scores. ``reference`` is the paper's percentile over train + test scores: it
LEAKS TEST DATA and exists only to reproduce published numbers. Scope ``global`` fits one
threshold on all entities' scores; ``entity`` fits one per entity as well and stores both.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from data_contracts import Contract
from model.artifact import BATCH_WINDOWS, ScoringModel, load_scoring_model
from model.thresholds import (
    conformal_threshold,
    leaky_reference_threshold,
    pot_threshold,
    quantile_threshold,
)
from tasks.errors import DataContractError
from tasks.evaluate import labelled_scores
from tasks.warehouse import get_engine, read_readings
from tasks.windowing import DatasetRef

log = logging.getLogger(__name__)

CalibrationMethod = Literal["conformal", "quantile", "pot", "reference"]
CalibrationScope = Literal["global", "entity"]
LEAKY_METHODS = frozenset({"reference"})
LEAK_WARNING = (
    "LEAKS TEST DATA: the 'reference' threshold is a percentile over train + test scores "
    "(the paper's protocol); use it only to reproduce published numbers, never to deploy"
)


@dataclass(frozen=True)
class Calibration:
    """The threshold(s), how they were fit, and the checkpoint that now carries them."""

    threshold: float
    method: str
    alpha: float
    n_scores: int
    checkpoint: Path
    scope: str = "global"
    thresholds: dict[str, float] = field(default_factory=dict)

    @property
    def leaks_test_data(self) -> bool:
        return self.method in LEAKY_METHODS

    @property
    def label(self) -> str:
        """The method as MLflow and logs show it: ``reference (LEAKS TEST DATA)`` when leaky."""
        return f"{self.method} (LEAKS TEST DATA)" if self.leaks_test_data else self.method


def _score(checkpoint: ScoringModel, entity: str, values: np.ndarray, skip: int) -> np.ndarray:
    return checkpoint.score(values, entity=entity, skip=skip, batch_size=BATCH_WINDOWS).scores


def validation_scores(checkpoint: ScoringModel, dataset: DatasetRef) -> dict[str, np.ndarray]:
    """Per entity, streaming scores of its validation tail, with its fit part as context."""
    context_rows = checkpoint.context_points
    scores = {}
    for entity in dataset.entities:
        values, skip = dataset.tail_with_context(entity, context_rows)
        if len(values) > skip:
            scores[entity] = _score(checkpoint, entity, values, skip)
    if not scores:
        raise DataContractError(
            f"{dataset.source}: no validation tail to calibrate on; use a val_fraction > 0"
        )
    return scores


def training_range_scores(checkpoint: ScoringModel, dataset: DatasetRef) -> dict[str, np.ndarray]:
    """Per entity, scores of its whole training range (fit part + validation tail)."""
    return {
        entity: _score(checkpoint, entity, np.concatenate(dataset.load(entity)), 0)
        for entity in dataset.entities
    }


def labelled_range_scores(
    checkpoint: ScoringModel,
    warehouse_url: str,
    contract: Contract,
    entities: list[str],
    train_end: datetime | None = None,
) -> dict[str, np.ndarray]:
    """Per entity, scores of its labelled rows (from ``train_end`` on): TEST DATA, read only by
    the leaky reference."""
    engine = get_engine(warehouse_url)
    scores = {}
    for entity in entities:
        frame = read_readings(engine, contract, entity=entity)
        scored = labelled_scores(frame, checkpoint, entity, train_end)
        scores[entity] = np.empty(0) if scored is None else scored["score"].to_numpy()
    return scores


def honest_threshold(method: str, scores: np.ndarray, alpha: float, where: str) -> float:
    """``conformal``/``quantile``/``pot`` threshold on held-out normal ``scores``; clear errors."""
    fitters: dict[str, Callable[[np.ndarray, float], float]] = {
        "conformal": conformal_threshold,
        "quantile": quantile_threshold,
        "pot": pot_threshold,
    }
    try:
        threshold = float(fitters[method](scores, alpha))
    except ValueError as error:
        raise DataContractError(
            f"{where}: {method} calibration at alpha={alpha} failed: {error}"
        ) from error
    if not np.isfinite(threshold):
        raise DataContractError(
            f"{where}: {scores.size} held-out scores cannot support a false-alarm rate of {alpha}: "
            f"conformal calibration needs at least {int(np.ceil(1 / alpha)) - 1}; "
            "raise alpha, val_fraction or the length of the training range"
        )
    return threshold


def _pooled(parts: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate(list(parts.values()))


def fit_thresholds(
    method: str,
    alpha: float,
    held_out: dict[str, np.ndarray],
    test: dict[str, np.ndarray],
    scope: str,
    source: str,
) -> tuple[float, dict[str, float]]:
    """The global threshold and, for scope ``entity``, one per entity (``test``: reference only)."""

    def one(entity: str | None) -> float:
        where = source if entity is None else f"{source} entity {entity!r}"
        scores = _pooled(held_out) if entity is None else held_out[entity]
        if method not in LEAKY_METHODS:
            return honest_threshold(method, scores, alpha, where)
        tested = _pooled(test) if entity is None else test[entity]
        return leaky_reference_threshold(scores, tested, 100.0 * alpha)

    per_entity = {entity: one(entity) for entity in held_out} if scope == "entity" else {}
    return one(None), per_entity


def calibrate(
    checkpoint_path: Path,
    dataset: DatasetRef,
    out_path: Path,
    *,
    method: CalibrationMethod = "conformal",
    alpha: float = 0.005,
    scope: CalibrationScope = "global",
    warehouse_url: str | None = None,
    contract: Contract | None = None,
    train_end: datetime | None = None,
) -> Calibration:
    """Threshold(s) at false-alarm rate ``alpha``; only ``reference`` reads (and leaks) test data.

    ``reference`` needs ``warehouse_url`` and ``contract`` to read the labelled range (from
    ``train_end`` on, where the training range ended there); its percentile is
    ``100 (1 - alpha)`` over the training-range and test scores.
    """
    checkpoint = load_scoring_model(checkpoint_path, device="auto")
    val = validation_scores(checkpoint, dataset)
    held_out, test = val, {}
    if method in LEAKY_METHODS:
        if warehouse_url is None or contract is None:
            raise ValueError(
                "method 'reference' needs warehouse_url and contract to read test scores"
            )
        log.warning("%s: %s", dataset.source, LEAK_WARNING)
        held_out = training_range_scores(checkpoint, dataset)
        test = labelled_range_scores(
            checkpoint, warehouse_url, contract, dataset.entities, train_end
        )
    threshold, per_entity = fit_thresholds(method, alpha, held_out, test, scope, dataset.source)
    pooled = _pooled(val)
    extras = {
        **checkpoint.extras,
        "threshold": threshold,
        "calibration": {
            "method": method,
            "alpha": alpha,
            "scope": scope,
            "n_scores": int(pooled.size),
            "leaks_test_data": method in LEAKY_METHODS,
        },
        "calibration_scores": np.sort(pooled).astype(float).tolist(),
    }
    if scope == "entity":
        extras["thresholds"] = per_entity
        extras["entity_calibration_scores"] = {
            e: np.sort(s).astype(float).tolist() for e, s in val.items()
        }
    checkpoint.save(out_path, extras)
    return Calibration(threshold, method, alpha, int(pooled.size), out_path, scope, per_entity)


calibrate_task = task(name="calibrate-threshold", cache_policy=NO_CACHE)(calibrate)
