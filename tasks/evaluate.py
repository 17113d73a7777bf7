"""Evaluate a calibrated model on the labelled range: honest metrics, plus point adjustment named as such."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from data_contracts import Contract
from model.checkpoint import Checkpoint, load_checkpoint
from model.metrics import evaluate_scores
from tasks.plots import plot_scores
from tasks.scoring import score_values
from tasks.warehouse import get_engine, read_readings


@dataclass(frozen=True)
class Evaluation:
    """Mean metrics over labelled entities, per-entity metrics, and the plots written."""

    metrics: dict[str, float]
    per_entity: dict[str, dict[str, float]]
    figures: tuple[Path, ...]


def labelled_scores(frame: pd.DataFrame, checkpoint: Checkpoint, entity: str) -> pd.DataFrame | None:
    """Scores, labels and timestamps of an entity's labelled rows (context read from before them)."""
    labelled = frame["label"].notna().to_numpy()
    if not labelled.any():
        return None
    first = int(np.argmax(labelled))
    begin = max(0, first - (checkpoint.model_cfg.win_size - 1))
    values = frame[list(checkpoint.extras["sensors"])].to_numpy(np.float64)[begin:]
    scores, _ = score_values(checkpoint, entity, values, skip=first - begin)
    scored = pd.DataFrame({"ts": frame["ts"].iloc[first:].to_numpy(), "score": scores})
    scored["label"] = frame["label"].iloc[first:].to_numpy()
    return scored[scored["label"].notna()]


def evaluate_model(
    warehouse_url: str, contract: Contract, checkpoint_path: Path, out_dir: Path
) -> Evaluation:
    """Score each entity's labelled rows; metrics per entity and their unweighted mean."""
    checkpoint = load_checkpoint(checkpoint_path)
    threshold = float(checkpoint.extras["threshold"])
    engine = get_engine(warehouse_url)
    per_entity: dict[str, dict[str, float]] = {}
    figures = []
    for entity in sorted(checkpoint.extras["scalers"]):
        scored = labelled_scores(read_readings(engine, contract, entity=entity), checkpoint, entity)
        if scored is None or scored["label"].nunique() < 2:
            continue
        labels = scored["label"].to_numpy(np.int64)
        per_entity[entity] = evaluate_scores(labels, scored["score"].to_numpy(), threshold)
        figures.append(plot_scores(scored, threshold, entity, out_dir / f"scores-{len(figures):03d}.png"))
    metrics = (
        {key: float(np.mean([m[key] for m in per_entity.values()])) for key in next(iter(per_entity.values()))}
        if per_entity
        else {}
    )
    metrics["entities_evaluated"] = float(len(per_entity))
    return Evaluation(metrics, per_entity, tuple(figures))


evaluate_model_task = task(name="evaluate-model", cache_policy=NO_CACHE)(evaluate_model)
