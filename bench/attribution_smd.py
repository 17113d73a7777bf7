"""HitRate@P% of per-sensor attribution on SMD's interpretation labels: AT against a |z| baseline.

SMD's ``interpretation_label/<machine>.txt`` lists, per labelled anomaly segment of ``test``, the
metrics that explain it: ``start-end:d1,d2,...`` (rows of ``test``, dimensions 1-based). For a
ranking of the sensors and a segment with truth set G, HitRate@P% = |G ∩ top ⌊|G| P/100⌋| / |G|
(Su et al., KDD 2019). Two averages are reported:

- ``point``: a ranking per labelled point (as OmniAnomaly and InterFusion rank per point), the
  mean over every point of every segment;
- ``segment``: one ranking per segment from its summed per-point weights, the mean over segments.

Rankers, both measured in the same run on the same scaled data:

- ``AT``: the pipeline's ``recon_last`` contributions (per-channel squared reconstruction error of
  the window ending at the point), from a small Anomaly Transformer trained per machine on the
  first 80 % of ``train`` with the project's own ``model.train.fit`` (early stopping on the rest);
- ``|z|``: the absolute z-score of the point against the same 80 % (the scaler's statistics).

From the repository root (CPU, about a minute per machine with the defaults)::

    python -m bench.attribution_smd /path/to/ServerMachineDataset [--machines machine-1-1 ...]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from bench.baselines_smd import FIT_SHARE, load_machine, machines
from model.config import ModelConfig, TrainConfig
from model.scaling import Scaler
from model.scoring import score_series
from model.train import fit

PERCENTS = (100, 150)
SMALL_MODEL = {"win_size": 50, "d_model": 64, "n_heads": 4, "e_layers": 2, "d_ff": 64}
Segment = tuple[int, int, frozenset[int]]


def read_segments(path: Path) -> list[Segment]:
    """``start-end:d,d,...`` lines as (start, end inclusive, 0-based dimensions)."""
    segments = []
    for line in path.read_text().split():
        span, dims = line.split(":")
        start, end = (int(v) for v in span.split("-"))
        segments.append((start, end, frozenset(int(d) - 1 for d in dims.split(","))))
    return segments


def hit_rate(weights: np.ndarray, truth: frozenset[int], percent: int) -> float:
    """Share of ``truth`` among the ⌊|truth| percent / 100⌋ sensors of largest weight."""
    top = np.argsort(-weights, kind="stable")[: len(truth) * percent // 100]
    return len(truth.intersection(top.tolist())) / len(truth)


def hit_rates(weights: np.ndarray, segments: list[Segment]) -> dict[str, float]:
    """Point- and segment-averaged HitRate@P% of per-point sensor ``weights`` ``(T, C)``."""
    rates: dict[str, float] = {}
    for percent in PERCENTS:
        points = [
            hit_rate(weights[t], truth, percent)
            for start, end, truth in segments
            for t in range(start, end + 1)
        ]
        whole = [
            hit_rate(weights[start : end + 1].sum(axis=0), truth, percent)
            for start, end, truth in segments
        ]
        rates[f"point@{percent}"] = float(np.mean(points))
        rates[f"segment@{percent}"] = float(np.mean(whole))
    return rates


def at_contributions(train: np.ndarray, test: np.ndarray, steps: int, device: str) -> np.ndarray:
    """Train a small AT on the scaled fit part, return ``recon_last`` contributions on ``test``."""
    n_fit = int(len(train) * FIT_SHARE)
    cfg = ModelConfig(n_channels=train.shape[1], **SMALL_MODEL)
    train_cfg = TrainConfig(
        lr=1e-3,
        batch_size=64,
        max_epochs=50,
        max_steps=steps,
        stride=5,
        patience=3,
        device=device,
        progress=False,
    )
    result = fit(cfg, train_cfg, [train[:n_fit]], [train[n_fit:]])
    context = train[-(cfg.win_size - 1) :]
    series = np.concatenate([context, test]).astype(np.float32)
    return score_series(result.model, series, "recon_last", skip=len(context)).contributions


def run_machine(root: Path, name: str, steps: int, device: str) -> dict[str, dict[str, float]]:
    train, test, _ = load_machine(root, name)
    scaler = Scaler.fit(train[: int(len(train) * FIT_SHARE)])
    train_s, test_s = (scaler.transform(v).astype(np.float32) for v in (train, test))
    segments = read_segments(root / "interpretation_label" / f"{name}.txt")
    at = at_contributions(train_s, test_s, steps, device)
    return {"AT": hit_rates(at, segments), "|z|": hit_rates(np.abs(test_s), segments)}


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    keys = [f"{avg}@{p}" for avg in ("point", "segment") for p in PERCENTS]
    lines = [
        "| machine | ranker | " + " | ".join(f"HitRate {k}%" for k in keys) + " |",
        "|---" * (len(keys) + 2) + "|",
    ]
    for name, by_ranker in results.items():
        for ranker, rates in by_ranker.items():
            lines.append(
                f"| {name} | {_cell(ranker)} | "
                + " | ".join(f"{rates[k]:.3f}" for k in keys)
                + " |"
            )
    for ranker in ("AT", "|z|"):
        means = [statistics.mean(r[ranker][k] for r in results.values()) for k in keys]
        lines.append(
            f"| **mean** | {_cell(ranker)} | " + " | ".join(f"**{m:.3f}**" for m in means) + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="ServerMachineDataset folder")
    parser.add_argument("--machines", nargs="*", help="default: all with interpretation labels")
    parser.add_argument("--steps", type=int, default=300, help="optimiser steps per machine")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    labelled = {p.stem for p in (args.root / "interpretation_label").glob("*.txt")}
    names = args.machines or [m for m in machines(args.root) if m in labelled]
    results = {}
    for name in names:
        started = time.perf_counter()
        results[name] = run_machine(args.root, name, args.steps, args.device)
        print(f"{name}: {results[name]} ({time.perf_counter() - started:.0f} s)", flush=True)
    print(_table(results))


if __name__ == "__main__":
    main()
