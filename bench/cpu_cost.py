"""CPU cost of the product's networks: training and ``recon_mean`` scoring windows/s per config.

Each ``WIN:D_MODEL`` config (d_ff = d_model, 8 heads, 3 layers) is fit by ``model.train.fit`` in
fp32 on an SMD-shaped synthetic series (38 sensors) for a few steps of 256 stride-1 windows after
one warm-up step, then scores 2,000 points with ``recon_mean``. From the repository root::

    python -m bench.cpu_cost --threads 2 25:512 100:128 100:512
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.measure import smd_like
from model.config import ModelConfig, TrainConfig
from model.scoring import score_series
from model.train import fit

CHANNELS, ROWS, SCORED = 38, 6_000, 2_000


def rates(win: int, d_model: int, steps: int) -> tuple[float, float]:
    """(training, scoring) windows/s of one config on the CPU."""
    rows = smd_like(ROWS, CHANNELS, seed=0)
    cfg = ModelConfig(n_channels=CHANNELS, win_size=win, d_model=d_model, d_ff=d_model)

    def train_cfg(max_steps: int) -> TrainConfig:
        return TrainConfig(max_steps=max_steps, max_epochs=1, progress=False, device="cpu")

    fit(cfg, train_cfg(1), [rows], [])  # warm-up
    started = time.perf_counter()
    model = fit(cfg, train_cfg(steps), [rows], []).model
    train = steps * TrainConfig.batch_size / (time.perf_counter() - started)
    started = time.perf_counter()
    score_series(model, rows[: SCORED + win - 1], "recon_mean", batch_size=256)
    return train, SCORED / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", help="WIN:D_MODEL, e.g. 25:512")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--steps", type=int, default=6, help="timed training steps")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"| window | d_model | training windows/s | scoring windows/s ({args.threads} threads) |")
    print("| --- | --- | --- | --- |")
    for config in args.configs:
        win, d_model = (int(part) for part in config.split(":"))
        train, score = rates(win, d_model, args.steps)
        print(f"| {win} | {d_model} | {train:.0f} | {score:.0f} |", flush=True)


if __name__ == "__main__":
    main()
