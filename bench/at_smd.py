"""The Anomaly Transformer per SMD machine, scored several ways, under the honest protocol.

Per machine and seed: fit ``model.train.fit`` (the product's reference architecture and training
defaults) on the first 80 % of ``train``, z-scored with that part's statistics; early stopping on
the last 20 % (the validation tail). Then score the fit part, the tail and ``test`` with
``recon_last`` (streaming-final) and ``recon_mean`` (averaged over the windows that hold a point),
keeping the per-sensor errors, and derive the variants:

* ``last``/``mean``: the sum over sensors (the product's scores);
* ``last_norm``/``mean_norm``: each sensor's error divided by that sensor's mean error on the
  validation tail, then summed (no sensor dominates by its own noise level);
* ``last_norm_max``: the largest normalised sensor error;
* ``*_ens``: the mean over seeds of a variant, each seed's score divided by its median on the tail.

Test labels only score. Metrics: VUS-PR, AUC-PR, AUROC on ``test``; the false-alarm rate on
normal test points at the split-conformal threshold (alpha 0.005) fitted on the tail. Needs torch
and numpy only. From the repository root::

    PYTHONUNBUFFERED=1 python3 -m bench.at_smd PATH/ServerMachineDataset --seeds 0 1 2 --out DIR

``--quick`` trains a tiny model for a few steps (a CPU smoke test).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.baselines_smd import ALPHA, FIT_SHARE, load_machine, machines
from model.config import ModelConfig, TrainConfig
from model.metrics import auc_pr, auroc, vus_pr
from model.scaling import Scaler
from model.scoring import score_series
from model.thresholds import conformal_threshold
from model.train import fit

QUICK_MODEL = {"win_size": 20, "d_model": 16, "n_heads": 2, "e_layers": 1, "d_ff": 16}
VARIANTS = ("last", "mean", "last_norm", "mean_norm", "last_norm_max")


def _errors(model: torch.nn.Module, rows: np.ndarray, method: str, win: int) -> np.ndarray:
    """Per-sensor errors ``(T - win + 1, C)`` of every point from the first full window on."""
    return score_series(model, rows, method).contributions.astype(np.float64)[win - 1 :]


def variant_scores(last: np.ndarray, mean: np.ndarray, tail: slice) -> dict[str, np.ndarray]:
    """Each variant's score per point from the per-sensor errors; ``tail`` indexes the val tail."""
    scale_last = last[tail].mean(axis=0) + 1e-12
    scale_mean = mean[tail].mean(axis=0) + 1e-12
    return {
        "last": last.sum(axis=1),
        "mean": mean.sum(axis=1),
        "last_norm": (last / scale_last).sum(axis=1),
        "mean_norm": (mean / scale_mean).sum(axis=1),
        "last_norm_max": (last / scale_last).max(axis=1),
    }


def metrics(scores: np.ndarray, tail: slice, test: slice, labels: np.ndarray) -> dict[str, float]:
    threshold = conformal_threshold(scores[tail], ALPHA)
    scored = scores[test]
    return {
        "vus_pr": vus_pr(labels, scored),
        "auc_pr": auc_pr(labels, scored),
        "auroc": auroc(labels, scored),
        "fpr_normal": float((scored[labels == 0] > threshold).mean()),
    }


def train_and_score(
    rows: np.ndarray, n_fit: int, n_train: int, seed: int, args: argparse.Namespace
) -> tuple[dict[str, np.ndarray], float, int]:
    """Fit one model; the variants' scores for rows ``n_fit ..``, seconds, epochs run."""
    model_kw = QUICK_MODEL if args.quick else {}
    cfg = ModelConfig(n_channels=rows.shape[1], **model_kw)
    train_cfg = TrainConfig(
        seed=seed,
        device=args.device,
        precision=args.precision,
        compile=args.compile,
        max_steps=20 if args.quick else None,
        progress=False,
    )
    started = time.perf_counter()
    result = fit(cfg, train_cfg, [rows[:n_fit]], [rows[n_fit:n_train]])
    scored = rows[n_fit - (cfg.win_size - 1) :]  # the tail and test, with one window of context
    last = _errors(result.model, scored, "recon_last", cfg.win_size)
    mean = _errors(result.model, scored, "recon_mean", cfg.win_size)
    tail = slice(0, n_train - n_fit)
    seconds = time.perf_counter() - started
    return variant_scores(last, mean, tail), seconds, len(result.history.epochs)


def run_machine(root: Path, name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    train, test, labels = load_machine(root, name)
    if args.quick:  # a short stretch of test around its first anomaly
        first = max(int(np.argmax(labels)) - 200, 0)
        train, test, labels = train[:600], test[first : first + 400], labels[first : first + 400]
    n_fit = int(FIT_SHARE * len(train))
    rows = Scaler.fit(train[:n_fit]).transform(np.concatenate([train, test]))
    tail, test_part = slice(0, len(train) - n_fit), slice(len(train) - n_fit, None)
    out, per_seed = [], []
    for seed in args.seeds:
        scores, seconds, epochs = train_and_score(rows, n_fit, len(train), seed, args)
        per_seed.append(scores)
        for variant, values in scores.items():
            row = metrics(values, tail, test_part, labels)
            out.append({"machine": name, "variant": variant, "seed": seed, **row})
            out[-1] |= {"seconds": seconds, "epochs": epochs}
    if len(per_seed) > 1:
        for variant in VARIANTS:
            normed = [s[variant] / np.median(s[variant][tail]) for s in per_seed]
            row = metrics(np.mean(normed, axis=0), tail, test_part, labels)
            out.append({"machine": name, "variant": f"{variant}_ens", "seed": -1, **row})
    return out


def _append_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)


def summary(rows: list[dict[str, Any]]) -> str:
    """Mean over machines per variant and seed, then mean ± sd over seeds."""
    lines = [
        "| variant | VUS-PR | AUC-PR | AUROC | FPR normal | runs |",
        "|---|---|---|---|---|---|",
    ]
    for variant in dict.fromkeys(r["variant"] for r in rows):
        cells = []
        for key in ("vus_pr", "auc_pr", "auroc", "fpr_normal"):
            by_seed: dict[int, list[float]] = {}
            for r in rows:
                if r["variant"] == variant:
                    by_seed.setdefault(r["seed"], []).append(r[key])
            means = [statistics.mean(v) for v in by_seed.values()]
            spread = f" ± {statistics.stdev(means):.3f}" if len(means) > 1 else ""
            cells.append(f"{statistics.mean(means):.3f}{spread}")
        runs = sum(r["variant"] == variant for r in rows)
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {runs} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="ServerMachineDataset folder")
    parser.add_argument("--machines", nargs="*", help="default: every machine with labels")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training step")
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps (smoke test)")
    parser.add_argument("--out", type=Path, help="folder for at_smd.csv (appended per machine)")
    args = parser.parse_args()
    rows = []
    for name in args.machines or machines(args.root):
        started = time.perf_counter()
        found = run_machine(args.root, name, args)
        rows += found
        if args.out:  # after each machine, so that a run cut short keeps what it measured
            _append_csv(args.out / "at_smd.csv", found)
        best = max(found, key=lambda r: r["vus_pr"])
        print(
            f"{name}: {time.perf_counter() - started:.0f} s, best {best['variant']} "
            f"seed {best['seed']} VUS-PR {best['vus_pr']:.3f}",
            flush=True,
        )
    print(summary(rows))


if __name__ == "__main__":
    main()
