"""What the fault tests run in child processes (forked from a server that imported the pipeline).

Every function takes its warehouse URL and files as arguments: a child of the fork server sees
the environment of the moment the server started, not the test's.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
import torch

from data_contracts import load_contract
from flows.params import CalibrationParams, ModelParams, TrainFlowParams, TrainingParams
from flows.training import training_flow
from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import ModelConfig
from model.network import AnomalyTransformer
from model.scaling import Scaler
from tasks.gates import gate_and_promote
from tasks.load import ingest_table
from tasks.registry import LoadedModel
from tasks.scoring import backfill_range, score_new_rows
from tasks.warehouse import get_engine, list_entities

SMD = load_contract("smd")
ENTITIES = ("machine-1", "machine-2")
T0 = datetime(2024, 1, 1)
MODEL_NAME = "fault-model"
PRELOAD = ["tasks.load", "tasks.scoring", "flows.training", "fault_workers"]
# Training small enough to take seconds on the CPU, scored on the readings' last rows.
TINY_TRAINING = TrainFlowParams(
    models=[ModelParams(win_size=20, d_model=16, n_heads=2, e_layers=1, d_ff=16)],
    training=TrainingParams(max_epochs=1, max_steps=10, batch_size=32, stride=2, device="cpu"),
    calibration=CalibrationParams(alpha=0.02),
)


def fork_server() -> Any:
    """A multiprocessing context whose children start with the pipeline already imported."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def readings(n: int, entities: tuple[str, ...] = ENTITIES, seed: int = 0) -> pd.DataFrame:
    """``n`` one-minute rows per entity of smooth readings in [0, 1]."""
    rng = np.random.default_rng(seed)
    frames = []
    for entity in entities:
        t = np.arange(n)[:, None]
        values = 0.5 + 0.3 * np.sin(t / 15 + rng.uniform(0, 6, len(SMD.sensor_names)))
        frame = pd.DataFrame(values + rng.normal(0, 0.02, values.shape), columns=SMD.sensor_names)
        frame.insert(0, "entity", entity)
        frame.insert(1, "ts", pd.date_range(T0, periods=n, freq="60s"))
        frame["label"] = pd.array([None] * n, dtype="Int64")
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def save_tiny_checkpoint(path: Path, train: pd.DataFrame) -> None:
    """A small untrained network with the extras scoring needs (scalers from ``train``)."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        n_channels=len(SMD.sensor_names), win_size=20, d_model=16, n_heads=2, e_layers=1, d_ff=16
    )
    scalers = {
        entity: Scaler.fit(part[SMD.sensor_names].to_numpy()).to_dict()
        for entity, part in train.groupby("entity")
    }
    extras = {
        "sensors": SMD.sensor_names,
        "scalers": scalers,
        "scoring_method": "recon_last",
        "threshold": 1.0,
        "calibration_scores": [0.1, 0.5, 1.0, 2.0],
        "calibration": {"method": "conformal", "alpha": 0.01},
    }
    save_checkpoint(path, AnomalyTransformer(cfg).eval(), cfg, extras)


def local_model(path: Path) -> LoadedModel:
    """The checkpoint as a loaded version 1 (the registry's checks are tested elsewhere)."""
    checkpoint = load_checkpoint(path)
    return LoadedModel(MODEL_NAME, 1, "run-1", checkpoint, checkpoint.extras)


def pace_commits(url: str, seconds: float) -> None:
    """Hold every commit on ``url`` for ``seconds``, so that a kill can land between or inside
    transactions however fast the machine is (a kill test without it races the child's end)."""
    if seconds > 0:
        sa.event.listen(get_engine(url), "commit", lambda _conn: time.sleep(seconds))


def score_all(
    url: str, checkpoint: Path, chunk_rows: int, barrier: Any = None, pace_seconds: float = 0.0
) -> None:
    """The scheduled scoring pass over every entity, as the scoring flow runs it."""
    torch.set_num_threads(1)
    pace_commits(url, pace_seconds)
    loaded = local_model(checkpoint)
    if barrier is not None:
        barrier.wait()
    entities = list_entities(url, SMD)
    score_new_rows(url, SMD, loaded, entities, run_id="scheduled", chunk_rows=chunk_rows)


def backfill_all(
    url: str,
    checkpoint: Path,
    chunk_rows: int,
    start: datetime | None,
    end: datetime | None,
    barrier: Any = None,
    pace_seconds: float = 0.0,
) -> None:
    """A backfill of ``start <= ts < end`` over every entity, as the backfill flow runs it."""
    torch.set_num_threads(1)
    pace_commits(url, pace_seconds)
    loaded = local_model(checkpoint)
    if barrier is not None:
        barrier.wait()
    entities = list_entities(url, SMD)
    backfill_range(
        url, SMD, loaded, entities, start=start, end=end, run_id="backfill", chunk_rows=chunk_rows
    )


def ingest_file(url: str, path: Path, staging: Any = None, barrier: Any = None) -> None:
    """``atp ingest csv``'s work; ``staging`` is set when the load starts writing its stage."""
    if staging is not None:
        sa.event.listen(get_engine(url), "before_cursor_execute", _signal_on_stage(staging))
    if barrier is not None:
        barrier.wait()
    ingest_table(url, path, SMD.name)


def _signal_on_stage(event: Any) -> Any:
    def listener(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("CREATE TEMPORARY TABLE"):
            event.set()

    return listener


def train(env: dict[str, str], api_url: str, detector: str, barrier: Any = None) -> None:
    """``atp train --model detector`` on the tiny network, with settings ``env``, on the Prefect
    API at ``api_url``."""
    from prefect.settings import temporary_settings

    torch.set_num_threads(1)
    os.environ.update(env)
    if barrier is not None:
        barrier.wait()
    with temporary_settings(updates={"api.url": api_url}):
        training_flow(TINY_TRAINING.model_copy(update={"detector": detector}))


def gate(env: dict[str, str], version: int, barrier: Any = None) -> None:
    """The promotion gate of ``atp train --promote`` on ``version`` of ``MODEL_NAME``."""
    os.environ.update(env)
    if barrier is not None:
        barrier.wait()
    gate_and_promote(MODEL_NAME, version)
