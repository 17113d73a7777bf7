"""Training: the step, the schedule, early stopping, determinism and input checks."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest
import torch

from model.config import ModelConfig, TrainConfig
from model.network import AnomalyTransformer
from model.steps import (
    TrainStep,
    compile_options,
    epoch_batches,
    make_optimizer,
    validation_rec,
)
from model.train import EpochRecord, fit, reference_lr
from model.windows import WindowSet

Series = Callable[..., np.ndarray]
FAST = TrainConfig(batch_size=32, max_epochs=2, device="cpu", progress=False, stride=4)


def _step(
    cfg: ModelConfig,
    train_cfg: TrainConfig,
    backend: str = "inductor",
    dtype: torch.dtype = torch.float32,
) -> TrainStep:
    torch.manual_seed(0)
    model = AnomalyTransformer(cfg).to(dtype)
    return TrainStep(model, make_optimizer(model, train_cfg), cfg, train_cfg, backend=backend)


def test_a_tiny_model_overfits_a_tiny_batch(tiny_cfg: ModelConfig, windows: torch.Tensor) -> None:
    step = _step(tiny_cfg, replace(FAST, lr=1e-2))
    first_rec = float(step(windows)[1])
    for _ in range(40):
        last_rec = float(step(windows)[1])
    assert last_rec < first_rec / 5


def test_two_backward_and_surrogate_steps_give_the_same_weights(
    tiny_cfg: ModelConfig, windows: torch.Tensor
) -> None:
    """In float64, so that Adam does not amplify rounding noise in exactly-zero gradients."""
    modes = ("two_backward", "surrogate")
    steps = [_step(tiny_cfg, replace(FAST, minimax=m), dtype=torch.float64) for m in modes]
    for _ in range(3):
        stats = [step(windows.double()) for step in steps]
        torch.testing.assert_close(stats[0], stats[1])
    for a, b in zip(steps[0].model.parameters(), steps[1].model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_the_compiled_step_trains_like_the_eager_step(
    tiny_cfg: ModelConfig, windows: torch.Tensor
) -> None:
    eager = _step(tiny_cfg, FAST)
    compiled = _step(tiny_cfg, replace(FAST, compile=True), backend="eager")  # dynamo, no codegen
    for _ in range(2):
        torch.testing.assert_close(compiled(windows), eager(windows))
    for a, b in zip(compiled.model.parameters(), eager.model.parameters(), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("training", [False, True])
def test_this_torch_knows_every_inductor_option_we_set(training: bool) -> None:
    """``torch.compile`` checks option names when called (no compilation here): a torch release
    that renames one fails this test instead of every compiled step on a GPU."""
    options = compile_options(cuda_graphs=True, training=training)
    assert callable(torch.compile(torch.nn.Identity(), options=options))
    with pytest.raises(RuntimeError, match="Unexpected optimization option"):
        torch.compile(torch.nn.Identity(), options={**options, "triton.no_such_option": True})


def test_gradient_clipping_bounds_the_gradient_norm(
    tiny_cfg: ModelConfig, windows: torch.Tensor
) -> None:
    step = _step(tiny_cfg, replace(FAST, grad_clip=1e-3))
    step(windows)
    grads = [p.grad.flatten() for p in step.model.parameters() if p.grad is not None]
    norm = torch.cat(grads).norm()
    assert float(norm) <= 1e-3 * (1 + 1e-4)


def test_bf16_step_on_cpu_is_finite(tiny_cfg: ModelConfig, windows: torch.Tensor) -> None:
    step = _step(tiny_cfg, replace(FAST, precision="bf16"))
    assert torch.isfinite(step(windows)).all()
    assert all(torch.isfinite(p).all() for p in step.model.parameters())


def test_epoch_batches_cover_every_window_in_equal_batches() -> None:
    batches = epoch_batches(10, 4, torch.Generator().manual_seed(0))
    assert batches.shape == (3, 4)
    assert set(batches.flatten().tolist()) == set(range(10))
    assert epoch_batches(3, 8, torch.Generator()).shape == (1, 3)


def test_reference_learning_rate_schedule() -> None:
    rates = [reference_lr(1e-4, epoch, halving=True) for epoch in range(1, 5)]
    assert rates == [1e-4, 1e-4, 5e-5, 2.5e-5]
    assert reference_lr(1e-4, 4, halving=False) == 1e-4


def test_fit_records_history_and_keeps_the_best_validation_weights(
    tiny_cfg: ModelConfig, periodic_series: Series
) -> None:
    train = [periodic_series(300, 3, seed=0), periodic_series(200, 3, seed=1)]
    val = [periodic_series(80, 3, seed=2)]
    records: list[EpochRecord] = []
    train_cfg = replace(FAST, max_epochs=4, lr=3e-3)
    result = fit(tiny_cfg, train_cfg, train, val, on_epoch=records.append)
    history = result.history.to_dict()
    json.dumps(history)
    assert [r.epoch for r in records] == [1, 2, 3, 4]
    assert history["lr"] == [3e-3, 3e-3, 1.5e-3, 7.5e-4]
    assert history["steps"] == [4, 4, 4, 4]  # 72 + 47 windows at stride 4, batches of 32
    best = int(np.argmin(history["val_rec"]))
    assert history["best_epoch"] == best + 1
    windows = WindowSet(val, tiny_cfg.win_size, 4, torch.device("cpu"), resident=True)
    refit = validation_rec(result.model, windows, 32, "fp32")
    assert refit == pytest.approx(history["val_rec"][best], rel=1e-5)
    assert not result.model.training


def test_fit_stops_after_patience_epochs_without_improvement(
    tiny_cfg: ModelConfig, periodic_series: Series
) -> None:
    train = [periodic_series(100, 3, seed=0)]  # 22 windows at stride 4: one step per epoch
    val = [periodic_series(40, 3, seed=1)]
    train_cfg = replace(FAST, max_epochs=12, patience=1, lr=3e-2, lr_halving=False)
    history = fit(tiny_cfg, train_cfg, train, val).history
    assert history.stopped_early
    assert len(history.epochs) < 12
    assert history.best_epoch == len(history.epochs) - 1


def test_fit_honours_max_steps_and_runs_without_validation_or_log_lines(
    tiny_cfg: ModelConfig, periodic_series: Series, caplog: pytest.LogCaptureFixture
) -> None:
    train_cfg = replace(FAST, max_steps=4, max_epochs=10)
    with caplog.at_level(logging.INFO, logger="model.train"):
        history = fit(tiny_cfg, train_cfg, [periodic_series(300, 3, seed=0)], []).history
    assert not caplog.records
    assert sum(r.steps for r in history.epochs) == 4
    assert history.best_epoch == len(history.epochs) == 2
    assert history.epochs[-1].val_rec is None


def test_deterministic_fits_with_one_seed_are_identical(
    tiny_cfg: ModelConfig, periodic_series: Series
) -> None:
    train = [periodic_series(150, 3, seed=0)]
    train_cfg = replace(FAST, deterministic=True, seed=7)
    first, second = (fit(tiny_cfg, train_cfg, train, []).model for _ in range(2))
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert not torch.are_deterministic_algorithms_enabled()


def test_fit_logs_progress_lines_when_asked(
    tiny_cfg: ModelConfig, periodic_series: Series, caplog: pytest.LogCaptureFixture
) -> None:
    train = [periodic_series(220, 3, seed=0)]  # 52 windows at stride 4: one step each
    train_cfg = replace(FAST, max_epochs=1, batch_size=1, progress=True)
    with caplog.at_level(logging.INFO, logger="model.train"):
        fit(tiny_cfg, train_cfg, train, [])
    assert "epoch 1: step 5/52, loss1" in caplog.text
    assert "epoch 1/1: 52 steps, loss1" in caplog.text


@pytest.mark.parametrize(
    ("train", "val", "message"),
    [
        ([], [], "invalid train_series: expected at least one"),
        ([np.zeros((100, 2), np.float32)], [], r"train_series\[0\] of shape \(100, 2\)"),
        ([np.zeros((10, 3), np.float32)], [], r"T >= win_size=16"),
        ([np.zeros((100, 3), np.float32)], [np.zeros((5, 3))], r"val_series\[0\] of shape"),
        ([np.full((100, 3), np.inf, np.float32)], [], "the first is inf at row 0, column 0"),
    ],
)
def test_fit_rejects_invalid_series(
    tiny_cfg: ModelConfig, train: list[np.ndarray], val: list[np.ndarray], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        fit(tiny_cfg, FAST, train, val)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"lr": 0.0}, "lr=0.0"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"precision": "fp16"}, "precision='fp16'"),
        ({"compile": True, "minimax": "two_backward"}, "minimax='two_backward'"),
    ],
)
def test_invalid_train_config_names_the_field(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=f"invalid {field}"):
        TrainConfig(**overrides)  # type: ignore[arg-type]
