"""Evaluate a calibrated model on the labelled range: honest metrics, point adjustment named so."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from data_contracts import Contract
from model.artifact import ScoringModel, load_scoring_model
from model.metrics import evaluate_scores
from tasks.alarm_rule import alarm_rule
from tasks.plots import plot_scores
from tasks.scoring import score_values
from tasks.warehouse import get_engine, read_readings


@dataclass(frozen=True)
class Evaluation:
    """Mean metrics over labelled entities, per-entity metrics, the random-score control's mean
    metrics (same labels, uniform scores, threshold at their 1 - alpha quantile), and the plots.

    An entity whose labelled rows are all normal has only ``fpr_normal`` (its false alarms count
    against the gate's budget); each mean runs over the entities that have the metric."""

    metrics: dict[str, float]
    per_entity: dict[str, dict[str, float]]
    random_control: dict[str, float]
    figures: tuple[Path, ...]


def random_control(labels: np.ndarray, alpha: float) -> dict[str, float]:
    """Metrics of uniform random scores on ``labels``: what chance scores under each metric."""
    scores = np.random.default_rng(0).random(labels.size)
    return evaluate_scores(labels, scores, 1.0 - alpha)


def _mean(per_entity: dict[str, dict[str, float]]) -> dict[str, float]:
    keys = dict.fromkeys(key for metrics in per_entity.values() for key in metrics)
    return {key: float(np.mean([m[key] for m in per_entity.values() if key in m])) for key in keys}


def labelled_scores(
    frame: pd.DataFrame, checkpoint: ScoringModel, entity: str, train_end: datetime | None = None
) -> pd.DataFrame | None:
    """Scores, labels and timestamps of an entity's labelled rows (context read from before);
    with ``train_end``, only those from it on: the labelled rows before it were trained on."""
    tested = frame["label"].notna()
    if train_end is not None:
        tested &= frame["ts"] >= pd.Timestamp(train_end)
    labelled = tested.to_numpy()
    if not labelled.any():
        return None
    first = int(np.argmax(labelled))
    begin = max(0, first - checkpoint.context_points)
    values = frame[list(checkpoint.extras["sensors"])].to_numpy(np.float64)[begin:]
    scores, _ = score_values(checkpoint, entity, values, skip=first - begin)
    scored = pd.DataFrame({"ts": frame["ts"].iloc[first:].to_numpy(), "score": scores})
    scored["label"] = frame["label"].iloc[first:].to_numpy()
    return scored[scored["label"].notna()]


def evaluate_model(
    warehouse_url: str,
    contract: Contract,
    checkpoint_path: Path,
    out_dir: Path,
    train_end: datetime | None = None,
) -> Evaluation:
    """Score each entity's labelled rows (from ``train_end`` on when the training range ended
    there); metrics per entity, their unweighted mean, the control."""
    checkpoint = load_scoring_model(checkpoint_path, device="auto")
    alpha = float(checkpoint.extras["calibration"]["alpha"])
    engine = get_engine(warehouse_url)
    per_entity: dict[str, dict[str, float]] = {}
    control: dict[str, dict[str, float]] = {}
    figures = []
    for entity in sorted(checkpoint.extras["scalers"]):
        frame = read_readings(engine, contract, entity=entity)
        scored = labelled_scores(frame, checkpoint, entity, train_end)
        if scored is None or not (scored["label"] == 0).any():
            continue
        labels = scored["label"].to_numpy(np.int64)
        scores = scored["score"].to_numpy()
        threshold = alarm_rule(checkpoint.extras, entity).threshold
        if labels.any():
            per_entity[entity] = evaluate_scores(labels, scores, threshold)
            control[entity] = random_control(labels, alpha)
        else:
            per_entity[entity] = {"fpr_normal": float(np.mean(scores > threshold))}
        figures.append(
            plot_scores(scored, threshold, entity, out_dir / f"scores-{len(figures):03d}.png")
        )
    metrics = _mean(per_entity)
    metrics["entities_evaluated"] = float(len(per_entity))
    return Evaluation(metrics, per_entity, _mean(control), tuple(figures))


evaluate_model_task = task(name="evaluate-model", cache_policy=NO_CACHE)(evaluate_model)
