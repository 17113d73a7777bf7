"""GPU smoke run of the public API: fit's compiled bf16 path (plain and fused attention),
determinism, every scoring method, and that a point's bf16 score on the GPU does not depend on
how its series is cut into calls.

From the repository root on a CUDA machine: ``python3 -m bench.smoke_gpu``. Prints one line per
check and raises on the first failure.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch

from bench.measure import inject_anomalies, smd_like
from model.config import ModelConfig, TrainConfig
from model.scoring import METHODS, provisional_points, score_series
from model.train import fit


def _fit(train_cfg: TrainConfig, train: list[np.ndarray], val: list[np.ndarray]) -> torch.nn.Module:
    started = time.perf_counter()
    result = fit(ModelConfig(n_channels=38), train_cfg, train, val)
    history = result.history.to_dict()
    print(
        f"fit {train_cfg.precision} compile={train_cfg.compile} {train_cfg.attention} "
        f"deterministic={train_cfg.deterministic}: {time.perf_counter() - started:.1f} s, "
        f"steps {history['steps']}, "
        f"val_rec {[round(v, 4) for v in history['val_rec']]}, best epoch {history['best_epoch']}",
        flush=True,
    )
    return result.model


def main() -> None:
    rows = smd_like(40_000, 38, seed=0)
    train = [rows[:15_000], rows[15_000:30_000]]  # two entities
    val = [rows[30_000:36_000]]
    fast_cfg = TrainConfig(precision="bf16", compile=True, max_epochs=3, stride=10, progress=False)
    model = _fit(fast_cfg, train, val)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    fused = _fit(replace(fast_cfg, attention="fused"), train, val)
    assert all(torch.isfinite(p).all() for p in fused.parameters())
    exact = TrainConfig(deterministic=True, max_epochs=1, stride=50, progress=False, seed=3)
    first, second = (_fit(exact, train, val).state_dict() for _ in range(2))
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
    for method in ("recon_last", "recon_mean", "reference_last"):
        _check_cut_invariance(model, test, method)


def _check_cut_invariance(model: torch.nn.Module, test: np.ndarray, method: str) -> None:
    """bf16 eager scores of the whole series against two calls split at row ``cut``, each with
    the context it needs (as a scheduled run and a backfill read them): bit-equal."""
    win, cut = model.cfg.win_size, 3_000
    lag = provisional_points(method, win)

    def scores(values: np.ndarray) -> np.ndarray:
        return score_series(model, values, method, skip=win - 1, precision="bf16").scores

    whole = scores(test)
    parts = np.concatenate(
        [scores(test[: cut + lag])[: cut - win + 1], scores(test[cut - win + 1 :])]
    )
    same = np.array_equal(whole, parts)
    print(f"score {method}: bf16 on the GPU, whole series vs two calls bit-equal: {same}")
    assert same


if __name__ == "__main__":
    main()
