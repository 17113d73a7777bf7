"""Settings, synthetic SMD-shaped data, timing and the train/score measurements of the benchmark."""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from model.config import ModelConfig, TrainConfig
from model.network import AnomalyTransformer
from model.scoring import score_series
from model.steps import TrainStep, make_optimizer
from model.windows import WindowSet

BF16_PEAK_FLOPS = 777e12  # measured bf16 GEMM rate on this machine kind (performance_anchor.md)
TOP_SHARE = 0.005


@dataclass(frozen=True)
class Settings:
    model: ModelConfig
    batch: int = 256
    train_rows: int = 708_405
    test_rows: int = 708_420
    recon_points: int = 100_000
    score_batch: int = 1024
    warmup: int = 20
    blocks: int = 3
    iterations: int = 100


FULL = Settings(ModelConfig(n_channels=38))
QUICK = Settings(
    ModelConfig(n_channels=38, d_model=32, n_heads=4, d_ff=32),
    batch=16,
    train_rows=3_000,
    test_rows=3_050,
    recon_points=600,
    score_batch=64,
    warmup=2,
    blocks=2,
    iterations=3,
)


@dataclass(frozen=True)
class TrainVariant:
    name: str
    precision: str
    compile: bool
    minimax: str
    attention: str = "plain"


TRAIN_VARIANTS = (
    TrainVariant("fp32 eager, two backward (reference-equivalent)", "fp32", False, "two_backward"),
    TrainVariant("fp32 eager, surrogate (one backward)", "fp32", False, "surrogate"),
    TrainVariant("bf16 eager, surrogate", "bf16", False, "surrogate"),
    TrainVariant(
        "bf16 compile + CUDA graphs, surrogate (fit's fast path)", "bf16", True, "surrogate"
    ),
    TrainVariant(
        "bf16 compile + CUDA graphs + fused attention, surrogate",
        "bf16",
        True,
        "surrogate",
        attention="fused",
    ),
)
SCORE_VARIANTS = (  # (method, precision, compile); the fp32 eager row of a method is its baseline
    ("reference", "fp32", False),
    ("reference", "bf16", False),
    ("reference", "bf16", True),
    ("recon_last", "fp32", False),
    ("recon_last", "bf16", False),
    ("recon_last", "bf16", True),
    ("recon_mean", "fp32", False),
    ("recon_mean", "bf16", False),
    ("recon_mean", "bf16", True),
)


def flops_per_window(cfg: ModelConfig) -> dict[str, float]:
    """Matmul FLOPs per window as performance_anchor.md §2 counts them."""
    length, d, heads, d_ff = cfg.win_size, cfg.d_model, cfg.n_heads, cfg.d_ff
    channels, head_dim = cfg.n_channels, d // heads
    embedding = 2 * length * channels * 3 * d
    layer = 8 * length * d * d + 2 * length * d * heads + 4 * heads * length**2 * head_dim
    layer += 4 * length * d * d_ff
    forward = embedding + cfg.e_layers * layer + 2 * length * d * channels
    backward = 2 * forward - embedding
    return {
        "forward": forward,
        "one_backward": forward + backward,
        "two_backward": forward + 2 * backward,
    }


def smd_like(rows: int, channels: int, seed: int) -> np.ndarray:
    """Standardised sinusoids of random period, phase and amplitude plus noise, `(rows, C)`."""
    rng = np.random.default_rng(seed)
    t = np.arange(rows, dtype=np.float64)[:, None]
    period = rng.uniform(20, 500, channels)
    phase = rng.uniform(0, 2 * np.pi, channels)
    amplitude = rng.uniform(0.5, 1.5, channels)
    values = amplitude * np.sin(2 * np.pi * t / period + phase)
    values += 0.3 * rng.standard_normal((rows, channels))
    return ((values - values.mean(0)) / values.std(0)).astype(np.float32)


def inject_anomalies(values: np.ndarray, seed: int, per_10k: float = 3.0) -> np.ndarray:
    """Spikes (60%) and level shifts of 10-50 points (40%), magnitude 1-6, in random channels."""
    rng = np.random.default_rng(seed)
    values = values.copy()
    for _ in range(max(1, int(len(values) * per_10k / 10_000))):
        start, channel = rng.integers(0, len(values) - 50), rng.integers(0, values.shape[1])
        length = 1 if rng.random() < 0.6 else int(rng.integers(10, 51))
        values[start : start + length, channel] += rng.choice([-1, 1]) * rng.uniform(1, 6)
    return values


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    synchronize(device)
    started = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - started


def reset_memory(device: torch.device) -> None:
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def flat_grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])


def relative_l2(value: torch.Tensor | np.ndarray, reference: torch.Tensor | np.ndarray) -> float:
    value, reference = np.asarray(value, np.float64), np.asarray(reference, np.float64)
    return float(np.linalg.norm(value - reference) / np.linalg.norm(reference))


def top_overlap(scores: np.ndarray, reference: np.ndarray, share: float = TOP_SHARE) -> float:
    count = max(1, math.ceil(share * len(reference)))
    top = set(np.argsort(-scores, kind="stable")[:count].tolist())
    top_reference = set(np.argsort(-reference, kind="stable")[:count].tolist())
    return len(top & top_reference) / count


def make_step(variant: TrainVariant, settings: Settings, device: torch.device) -> TrainStep:
    torch.manual_seed(0)  # every variant starts from the same weights
    model = AnomalyTransformer(settings.model).to(device)
    train_cfg = TrainConfig(
        batch_size=settings.batch,
        precision=variant.precision,  # type: ignore[arg-type]
        compile=variant.compile,
        minimax=variant.minimax,  # type: ignore[arg-type]
        attention=variant.attention,  # type: ignore[arg-type]
        device=str(device),
        progress=False,
    )
    return TrainStep(model, make_optimizer(model, train_cfg), settings.model, train_cfg)


def bench_train(
    variant: TrainVariant, settings: Settings, windows: WindowSet, probe: torch.Tensor
) -> tuple[dict[str, Any], torch.Tensor, TrainStep]:
    """Gradient on ``probe`` (this compiles), warm-up, then timed blocks of training steps."""
    device = windows.device
    reset_memory(device)
    step = make_step(variant, settings, device)
    generator = torch.Generator(device=device).manual_seed(1)

    def steps(count: int) -> None:
        for _ in range(count):
            ids = torch.randint(len(windows), (settings.batch,), device=device, generator=generator)
            step(windows.batch(ids))  # (B, L, C) gathered on the device

    warm_seconds = timed(lambda: step.backward(probe), device)
    grads = flat_grads(step.model).cpu()
    if not torch.isfinite(grads).all():
        raise FloatingPointError(f"{variant.name}: non-finite gradient on the probe batch")
    warm_seconds += timed(lambda: steps(settings.warmup), device)
    warm_peak = peak_gib(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    blocks = [timed(lambda: steps(settings.iterations), device) for _ in range(settings.blocks)]
    per_block = settings.batch * settings.iterations
    rate = per_block / statistics.median(blocks)
    flops = flops_per_window(settings.model)
    executed = flops["two_backward" if variant.minimax == "two_backward" else "one_backward"]
    row = {
        "variant": variant.name,
        "windows_per_s": rate,
        "block_range": [per_block / max(blocks), per_block / min(blocks)],
        "ms_per_step": 1e3 * settings.batch / rate,
        "peak_gib": peak_gib(device),
        "warmup_peak_gib": warm_peak,
        "tflops": rate * executed / 1e12,
        "floor_share": rate * flops["one_backward"] / BF16_PEAK_FLOPS,
        "warmup_s": warm_seconds,
    }
    if not all(torch.isfinite(p).all() for p in step.model.parameters()):
        raise FloatingPointError(f"{variant.name}: non-finite weights after training")
    return row, grads, step


def host_copy_of(tensor: torch.Tensor) -> np.ndarray:
    """The copy ``score_series`` makes of its result (pinned memory from CUDA)."""
    pinned = tensor.device.type == "cuda"
    return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pinned).copy_(tensor).numpy()


def windows_scored(method: str, n_points: int, win: int) -> int:
    if method == "reference":
        return n_points // win + (1 if n_points % win else 0)
    return n_points - win + 1


def bench_score(
    method: str,
    precision: str,
    compile: bool,
    model: AnomalyTransformer,
    values: torch.Tensor,
    settings: Settings,
) -> tuple[dict[str, Any], np.ndarray]:
    """One warm-up call (compiles), then timed calls of ``score_series`` on the whole series."""
    device = values.device
    reset_memory(device)

    def run() -> np.ndarray:
        return score_series(
            model,
            values,
            method,
            batch_size=settings.score_batch,
            precision=precision,
            compile=compile,  # type: ignore[arg-type]
        ).scores

    warm_seconds = timed(run, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    blocks = [timed(run, device) for _ in range(settings.blocks)]
    contributions = torch.ones(len(values), values.shape[1], device=device)  # (T, C), as returned
    host_copy = min(timed(lambda: host_copy_of(contributions), device) for _ in range(3))
    n_windows = windows_scored(method, len(values), settings.model.win_size)
    rate = n_windows / statistics.median(blocks)
    flops = flops_per_window(settings.model)["forward"]
    row = {
        "variant": f"{method}, {precision} {'compile' if compile else 'eager'}",
        "method": method,
        "windows": n_windows,
        "windows_per_s": rate,
        "points_per_s": len(values) / statistics.median(blocks),
        "ms_per_batch": 1e3 * settings.score_batch / rate,
        "peak_gib": peak_gib(device),
        "floor_share": rate * flops / BF16_PEAK_FLOPS,
        "host_copy_ms": 1e3 * host_copy,
        "warmup_s": warm_seconds,
    }
    scores = run()
    if not np.isfinite(scores).all():
        raise FloatingPointError(f"{row['variant']}: non-finite scores")
    return row, scores
