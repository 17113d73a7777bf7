"""Minimax training with the reference's schedule, early stopping on a validation split."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from model.config import ModelConfig, TrainConfig
from model.device import resolve_device
from model.network import AnomalyTransformer
from model.steps import (
    TrainStep,
    deterministic_mode,
    epoch_batches,
    make_optimizer,
    resolve_attention,
    validation_rec,
)
from model.windows import WindowSet

log = logging.getLogger(__name__)

# Keep the training rows on the GPU when they take at most this share of its free memory.
RESIDENT_SHARE = 0.25
# Epochs of at least MIN_STEPS_FOR_LINES steps also log about PROGRESS_LINES lines mid-epoch.
PROGRESS_LINES = 10
MIN_STEPS_FOR_LINES = 50


@dataclass(frozen=True)
class EpochRecord:
    """Means over one epoch's batches, the validation MSE and the learning rate used."""

    epoch: int
    steps: int
    train_loss: float  # loss1 = rec - k * discrepancy, as the reference prints it
    train_rec: float
    train_discrepancy: float
    val_rec: float | None
    lr: float
    seconds: float


@dataclass
class History:
    """Per-epoch records, the epoch whose weights were kept, and whether patience ran out."""

    epochs: list[EpochRecord] = field(default_factory=list)
    best_epoch: int | None = None
    stopped_early: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Per-epoch lists keyed by field name, plus ``best_epoch`` and ``stopped_early``."""
        rows = [asdict(record) for record in self.epochs]
        columns = {name: [row[name] for row in rows] for name in EpochRecord.__annotations__}
        return {**columns, "best_epoch": self.best_epoch, "stopped_early": self.stopped_early}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> History:
        """The ``History`` whose ``to_dict()`` is ``data``."""
        names = list(EpochRecord.__annotations__)
        rows = zip(*(data[name] for name in names), strict=True)
        epochs = [EpochRecord(**dict(zip(names, row, strict=True))) for row in rows]
        return cls(epochs, data["best_epoch"], data["stopped_early"])


@dataclass(frozen=True)
class FitResult:
    model: AnomalyTransformer
    history: History


class _EarlyStopping:
    """Remembers the weights with the lowest validation MSE; counts epochs without improvement."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best = math.inf
        self.best_epoch: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.epochs_without_gain = 0

    def update(self, epoch: int, val_rec: float, model: torch.nn.Module) -> bool:
        """Record ``epoch``; True once ``patience`` epochs in a row brought no improvement."""
        if val_rec < self.best:
            self.best, self.best_epoch, self.epochs_without_gain = val_rec, epoch, 0
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            self.epochs_without_gain += 1
        return self.epochs_without_gain >= self.patience


def check_fit_series(
    model_cfg: ModelConfig, train_series: Sequence[np.ndarray], val_series: Sequence[np.ndarray]
) -> None:
    """Raise ``ValueError`` for no training series, or a series that ``check_series`` refuses."""
    if len(train_series) == 0:
        raise ValueError("invalid train_series: expected at least one (T, C) array")
    check_series(train_series, model_cfg, "train_series")
    check_series(val_series, model_cfg, "val_series")


def check_series(series: Sequence[np.ndarray], cfg: ModelConfig, name: str) -> None:
    """Raise ``ValueError`` naming the entity if a series is not a finite `(T >= L, C)` array."""
    for index, values in enumerate(series):
        shape = np.shape(values)
        if len(shape) != 2 or shape[1] != cfg.n_channels or shape[0] < cfg.win_size:
            raise ValueError(
                f"invalid {name}[{index}] of shape {shape}: expected (T >= win_size="
                f"{cfg.win_size}, n_channels={cfg.n_channels})"
            )
        bad = np.argwhere(~np.isfinite(values))
        if len(bad):
            row, column = bad[0]
            raise ValueError(
                f"invalid {name}[{index}]: {len(bad)} non-finite value(s), the first is "
                f"{values[row, column]} at row {row}, column {column}"
            )


def reference_lr(base_lr: float, epoch: int, halving: bool) -> float:
    """The reference's schedule: epochs 1 and 2 at ``base_lr``, then halved every epoch."""
    return base_lr * 0.5 ** max(0, epoch - 2) if halving else base_lr


def _fits_on_device(series: Sequence[np.ndarray], device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    n_bytes = sum(np.shape(s)[0] * np.shape(s)[1] * 4 for s in series)
    free, _ = torch.cuda.mem_get_info(device)
    return n_bytes <= RESIDENT_SHARE * free


def _window_set(
    series: Sequence[np.ndarray], cfg: ModelConfig, stride: int, device: torch.device
) -> WindowSet:
    resident = _fits_on_device(series, device)
    return WindowSet(series, cfg.win_size, stride, device, resident=resident)


def fit(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    train_series: Sequence[np.ndarray],
    val_series: Sequence[np.ndarray],
    on_epoch: Callable[[EpochRecord], None] | None = None,
) -> FitResult:
    """Train a fresh network on scaled `(T, C)` float32 series, one array per entity.

    ``val_series`` (cut from the training range, never test data) drives early stopping and the
    choice of weights; with no validation series the last epoch's weights are kept.
    ``on_epoch`` is called with each epoch's record; ``train_cfg.progress`` logs progress lines.

    Raises:
        ValueError: empty ``train_series``, a series of the wrong shape or with NaN/inf, or
            ``train_cfg.attention="fused"`` where it cannot run (``resolve_attention``).
        RuntimeError: the training loss became NaN/inf.
    """
    check_fit_series(model_cfg, train_series, val_series)
    device = resolve_device(train_cfg.device)
    train_cfg = resolve_attention(train_cfg, model_cfg, device)
    with deterministic_mode(train_cfg.deterministic):
        torch.manual_seed(train_cfg.seed)
        model = AnomalyTransformer(model_cfg).to(device)
        train_windows = _window_set(train_series, model_cfg, train_cfg.stride, device)
        val_windows = None
        if len(val_series):
            val_windows = _window_set(val_series, model_cfg, train_cfg.stride, device)
        history = _train(model, model_cfg, train_cfg, train_windows, val_windows, on_epoch)
    return FitResult(model.eval(), history)


def _train(
    model: AnomalyTransformer,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    train_windows: WindowSet,
    val_windows: WindowSet | None,
    on_epoch: Callable[[EpochRecord], None] | None,
) -> History:
    optimizer = make_optimizer(model, train_cfg)
    step = TrainStep(model, optimizer, model_cfg, train_cfg)
    generator = torch.Generator().manual_seed(train_cfg.seed)
    stopping = _EarlyStopping(train_cfg.patience)
    history = History()
    total_steps = 0
    for epoch in range(1, train_cfg.max_epochs + 1):
        lr = reference_lr(train_cfg.lr, epoch, train_cfg.lr_halving)
        for group in optimizer.param_groups:
            group["lr"] = lr
        started = time.perf_counter()
        means, steps = _train_epoch(step, train_windows, train_cfg, generator, epoch, total_steps)
        total_steps += steps
        val_rec = None
        if val_windows is not None:
            val_rec = validation_rec(model, val_windows, train_cfg.batch_size, train_cfg.precision)
        record = EpochRecord(epoch, steps, *means, val_rec, lr, time.perf_counter() - started)
        history.epochs.append(record)
        _report(record, train_cfg, on_epoch)
        if val_rec is not None and stopping.update(epoch, val_rec, model):
            history.stopped_early = True
            break
        if train_cfg.max_steps is not None and total_steps >= train_cfg.max_steps:
            break
    if stopping.best_state is not None:
        model.load_state_dict(stopping.best_state)
    history.best_epoch = stopping.best_epoch if val_windows is not None else len(history.epochs)
    return history


def _train_epoch(
    step: TrainStep,
    windows: WindowSet,
    train_cfg: TrainConfig,
    generator: torch.Generator,
    epoch: int,
    steps_before: int,
) -> tuple[list[float], int]:
    """One epoch (or up to ``max_steps``); the mean ``(loss1, rec, discrepancy)`` and step count."""
    step.model.train()
    batches = epoch_batches(len(windows), train_cfg.batch_size, generator)  # (n_batches, B)
    batches = batches.to(windows.starts.device)  # one copy per epoch, none per step
    every = max(1, len(batches) // PROGRESS_LINES) if len(batches) >= MIN_STEPS_FOR_LINES else 0
    sums = torch.zeros(3, device=windows.device)
    steps = 0
    for window_ids in batches:
        sums += step(windows.batch(window_ids))
        steps += 1
        if train_cfg.progress and every and steps % every == 0:
            loss1, rec, _ = (sums / steps).tolist()
            log.info(
                "epoch %d: step %d/%d, loss1 %.5f, rec %.5f", epoch, steps, len(batches), loss1, rec
            )
        if train_cfg.max_steps is not None and steps_before + steps >= train_cfg.max_steps:
            break
    means = (sums / steps).tolist()
    if not all(math.isfinite(m) for m in means):
        raise RuntimeError(f"training diverged: non-finite loss in epoch {epoch} ({means})")
    return means, steps


def _report(
    record: EpochRecord, train_cfg: TrainConfig, on_epoch: Callable[[EpochRecord], None] | None
) -> None:
    if train_cfg.progress:
        val = "n/a" if record.val_rec is None else f"{record.val_rec:.5f}"
        log.info(
            "epoch %d/%d: %d steps, loss1 %.5f, rec %.5f, discrepancy %.4f, val_rec %s, "
            "lr %.2e, %.1f s",
            record.epoch,
            train_cfg.max_epochs,
            record.steps,
            record.train_loss,
            record.train_rec,
            record.train_discrepancy,
            val,
            record.lr,
            record.seconds,
        )
    if on_epoch is not None:
        on_epoch(record)
