"""The reference protocol of the Anomaly Transformer paper on the shared SMD machines (issue 8).

Reproduces what the reference implementation reports (point-adjusted F1 about 0.90 on these 14
machines, ``shared/docs/performance_anchor.md`` section 5) and shows it next to honest metrics of
the same scores. As upstream: the machines are concatenated in sorted order and z-scored with the
statistics of the concatenated ``train``; one model (the reference architecture) trains on
stride-``win`` windows; the score is the paper's ``reference`` score (non-overlapping windows);
the threshold is the 99.5th percentile of train and test scores together (**LEAKS TEST DATA**);
predictions are point-adjusted before F1. Unlike upstream, early stopping uses the last 20 % of
each machine's ``train`` instead of the test set. Needs torch and numpy only::

    PYTHONUNBUFFERED=1 python3 -m bench.at_reference PATH/ServerMachineDataset --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from bench.baselines_smd import FIT_SHARE, load_machine, machines
from model.config import ModelConfig, TrainConfig
from model.metrics import auc_pr, auroc, pa_f1, point_metrics
from model.scaling import Scaler
from model.scoring import score_series
from model.thresholds import leaky_reference_threshold
from model.train import fit

ANOMALY_RATIO_PERCENT = 0.5


def run_seed(
    trains: list[np.ndarray],
    test: np.ndarray,
    labels: np.ndarray,
    seed: int,
    args: argparse.Namespace,
) -> dict[str, float]:
    """Train one model and score it under the reference protocol and honestly."""
    scaler = Scaler.fit(np.concatenate(trains))
    scaled = [scaler.transform(t) for t in trains]
    cfg = ModelConfig(n_channels=test.shape[1])
    fits = [t[: int(FIT_SHARE * len(t))] for t in scaled]
    tails = [t[int(FIT_SHARE * len(t)) :] for t in scaled]
    train_cfg = TrainConfig(
        seed=seed,
        device=args.device,
        precision=args.precision,
        max_epochs=args.epochs,
        stride=cfg.win_size,
        progress=False,
    )
    started = time.perf_counter()
    result = fit(cfg, train_cfg, fits, tails)
    train_scores = score_series(result.model, np.concatenate(scaled), "reference").scores
    test_scores = score_series(result.model, scaler.transform(test), "reference").scores
    threshold = leaky_reference_threshold(train_scores, test_scores, ANOMALY_RATIO_PERCENT)
    flags = test_scores > threshold
    return {
        "seed": seed,
        "epochs": len(result.history.epochs),
        "seconds": time.perf_counter() - started,
        "reference_pa_f1": pa_f1(labels, flags),
        "reference_f1": point_metrics(labels, flags)["f1"],
        "auroc": auroc(labels, test_scores),
        "auc_pr": auc_pr(labels, test_scores),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="ServerMachineDataset folder")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    args = parser.parse_args()
    loaded = [load_machine(args.root, name) for name in machines(args.root)]
    trains = [train for train, _, _ in loaded]
    test = np.concatenate([t for _, t, _ in loaded])
    labels = np.concatenate([y for _, _, y in loaded])
    rows = []
    for seed in args.seeds:
        rows.append(run_seed(trains, test, labels, seed, args))
        print(
            " ".join(
                f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()
            ),
            flush=True,
        )
    for key in ("reference_pa_f1", "reference_f1", "auroc", "auc_pr"):
        values = [r[key] for r in rows]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{key}: {statistics.mean(values):.4f} ± {spread:.4f}")


if __name__ == "__main__":
    main()
