"""GPU smoke run of the public API: fit's compiled bf16 path (plain, fused and auto attention),
that fused attention trains as well as plain attention over 3,000 steps, determinism, every
scoring method, and that a point's bf16 score on the GPU, of one network or an ensemble, does
not depend on how its series is cut into calls.

From the repository root on a CUDA machine: ``python3 -m bench.smoke_gpu``. Prints one line per
check and raises on the first failure.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch

from bench.measure import inject_anomalies, smd_like
from model.checkpoint import Checkpoint
from model.config import (
    DEFAULT_SCORE_SMOOTHING,
    DEFAULT_SCORING_METHOD,
    ModelConfig,
    TrainConfig,
)
from model.ensemble import EnsembleCheckpoint
from model.scoring import METHODS, provisional_points, score_series
from model.steps import resolve_attention
from model.train import FitResult, fit


def _fit(
    train_cfg: TrainConfig,
    train: list[np.ndarray],
    val: list[np.ndarray],
    model_cfg: ModelConfig = ModelConfig(n_channels=38),  # noqa: B008
) -> FitResult:
    started = time.perf_counter()
    result = fit(model_cfg, train_cfg, train, val)
    history = result.history.to_dict()
    print(
        f"fit {train_cfg.precision} compile={train_cfg.compile} {train_cfg.attention} "
        f"deterministic={train_cfg.deterministic}: {time.perf_counter() - started:.1f} s, "
        f"steps {history['steps']}, "
        f"val_rec {[round(v, 4) for v in history['val_rec']]}, best epoch {history['best_epoch']}",
        flush=True,
    )
    return result


def main() -> None:
    rows = smd_like(40_000, 38, seed=0)
    train = [rows[:15_000], rows[15_000:30_000]]  # two entities
    val = [rows[30_000:36_000]]
    fast_cfg = TrainConfig(precision="bf16", compile=True, max_epochs=3, stride=10, progress=False)
    model = _fit(fast_cfg, train, val).model
    assert all(torch.isfinite(p).all() for p in model.parameters())
    fused = _fit(replace(fast_cfg, attention="fused"), train, val).model
    assert all(torch.isfinite(p).all() for p in fused.parameters())
    _check_fused_trains_like_plain(fast_cfg)
    exact = TrainConfig(deterministic=True, max_epochs=1, stride=50, progress=False, seed=3)
    first, second = (_fit(exact, train, val).model.state_dict() for _ in range(2))
    same = all(torch.equal(first[name], second[name]) for name in first)
    print(f"deterministic fits identical: {same}", flush=True)
    assert same
    test = inject_anomalies(smd_like(5_000, 38, seed=1), seed=2)
    for method in METHODS:
        eager = score_series(model, test, method, skip=99, batch_size=256)
        fast = score_series(
            model, test, method, skip=99, batch_size=256, precision="bf16", compile=True
        )
        difference = np.linalg.norm(fast.scores - eager.scores) / np.linalg.norm(eager.scores)
        rows_sum = np.allclose(fast.contributions.sum(1), fast.scores, rtol=1e-4)
        print(
            f"score {method}: bf16 compiled vs fp32 eager rel. L2 {difference:.2e}, "
            f"rows sum to the score: {rows_sum}"
        )
        assert np.isfinite(fast.scores).all() and rows_sum and len(eager.scores) == 4_901
    win = model.cfg.win_size
    for method in ("recon_last", "recon_mean", "reference_last"):

        def network(values: np.ndarray, method: str = method) -> np.ndarray:
            return score_series(model, values, method, skip=win - 1, precision="bf16").scores

        _check_cut_invariance(network, test, win - 1, provisional_points(method, win), method)
    auto, short_cfg = replace(fast_cfg, attention="auto"), ModelConfig(n_channels=38, win_size=25)
    resolved = {
        cfg.win_size: resolve_attention(auto, cfg, torch.device("cuda")).attention
        for cfg in (model.cfg, short_cfg)
    }
    print(f"attention='auto' on this GPU for windows 100 and 25: {resolved}", flush=True)
    assert resolved == {100: "fused", 25: "plain"}  # where each trains faster
    short = _fit(auto, train, val, short_cfg).model
    scales = {"sensor_scales": {"e": [1.0] * 38}}
    ensemble = EnsembleCheckpoint(
        (Checkpoint(model, model.cfg, scales), Checkpoint(short, short.cfg, scales)),
        {"scoring_method": DEFAULT_SCORING_METHOD, "score_smoothing": DEFAULT_SCORE_SMOOTHING},
    )
    context = ensemble.context_points

    def ensemble_scores(values: np.ndarray) -> np.ndarray:
        return ensemble.score(values, entity="e", skip=context).scores

    lag = ensemble.provisional_points
    _check_cut_invariance(ensemble_scores, test, context, lag, "ensemble (windows 100 and 25)")


def _check_fused_trains_like_plain(fast_cfg: TrainConfig, steps: int = 3_000) -> None:
    """The best validation MSE of ``steps`` bf16 steps (stride 1) with fused attention is within
    1.5x of plain attention's. The 36-step fits above agree to 4 digits even for kernels that
    train worse over thousands of steps: kernels that did reached 0.165 in 2,767 steps where the
    kernels before them reached 0.0040 (docs/performance.md, third version)."""
    rows = smd_like(250_000, 38, seed=3)
    train, val = [rows[:230_000]], [rows[230_000:]]
    long_cfg = replace(fast_cfg, stride=1, max_steps=steps, max_epochs=1_000)
    best = {}
    for attention in ("plain", "fused"):
        history = _fit(replace(long_cfg, attention=attention), train, val).history
        best[attention] = min(r.val_rec for r in history.epochs if r.val_rec is not None)
    print(f"best validation MSE after {steps} steps: {best}", flush=True)
    assert best["fused"] <= 1.5 * best["plain"] + 1e-4


def _check_cut_invariance(
    scores: Callable[[np.ndarray], np.ndarray], test: np.ndarray, context: int, lag: int, what: str
) -> None:
    """bf16 scores of the whole series against two calls split at row ``cut``, each with the
    ``context`` rows before and, for the first, the ``lag`` provisional rows after (as a
    scheduled run and a backfill read them): bit-equal."""
    cut = 3_000
    whole = scores(test)
    parts = np.concatenate(
        [scores(test[: cut + lag])[: cut - context], scores(test[cut - context :])]
    )
    same = np.array_equal(whole, parts)
    print(f"score {what}: bf16 on the GPU, whole series vs two calls bit-equal: {same}")
    assert same


if __name__ == "__main__":
    main()
