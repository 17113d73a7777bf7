"""Baseline detectors on a dataset in SMD layout: honest metrics and false-alarm rates.

Reproduces the protocol of shared/docs/baselines_smd.md for the detectors in model.baselines. Per
machine: fit on the first 80 % of ``train`` (z-scored with that part's statistics), score the
held-out validation tail (the last 20 % of ``train``) and ``test``; VUS-PR, AUC-PR and AUROC on
``test``; the split-conformal threshold at alpha = 0.005 fitted on the validation-tail scores,
applied statically and through adaptive conformal inference (ACI, starting at the first test
point), with the false-alarm rate on normal test points, the recall and the overall alarm rate.
Test labels are used only to score. Windows at the start of the tail and of ``test`` reach back
into the preceding rows (``test`` follows ``train`` in time). From the repository root::

    python -m bench.baselines_smd /path/to/ServerMachineDataset [--csv rows.csv] [--gamma 0.005]

Prints markdown tables (means over machines, per machine) to stdout.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from model.adaptive import AciState, aci_scores
from model.baselines import make_detector
from model.drift import TrainingProfile, detect_drift, exceedance_test
from model.metrics import auc_pr, auroc, event_recall, vus_pr
from model.scaling import Scaler
from model.thresholds import conformal_threshold

# label: (registry name, parameters, mean VUS-PR in baselines_smd.md)
DETECTORS: dict[str, tuple[str, dict[str, Any], float]] = {
    "Random (uniform)": ("random", {"seed": 0}, 0.076),
    "PCA recon. (95% var)": ("pca", {"variance": 0.95}, 0.452),
    "max abs z-score": ("max_z", {}, 0.444),
    "kNN windows (w=10, k=5)": ("knn", {"window": 10, "k": 5, "stride": 2}, 0.528),
}
ALPHA = 0.005
FIT_SHARE = 0.8
CONTEXT = 9  # rows before the scored span, enough for the kNN window of 10


def machines(root: Path) -> list[str]:
    """Names of the machines that have train, test and test_label files, in sorted order."""
    names = [path.name.removesuffix(".txt.gz") for path in (root / "train").glob("*.txt.gz")]
    return sorted(
        name
        for name in names
        if (root / "test" / f"{name}.txt.gz").exists()
        and (root / "test_label" / f"{name}.txt").exists()
    )


def load_machine(root: Path, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, test, test labels); values read as float32 like the upstream arrays."""
    train = np.loadtxt(root / "train" / f"{name}.txt.gz", delimiter=",", dtype=np.float32)
    test = np.loadtxt(root / "test" / f"{name}.txt.gz", delimiter=",", dtype=np.float32)
    labels = np.loadtxt(root / "test_label" / f"{name}.txt", dtype=np.int64)
    if labels.shape[0] != test.shape[0]:
        raise ValueError(f"{name}: {labels.shape[0]} labels for {test.shape[0]} test rows")
    return train, test, labels


def _rates(flags: np.ndarray, labels: np.ndarray, prefix: str) -> dict[str, float]:
    """False-alarm rate on label-0 points, point and event recall, overall alarm rate."""
    normal = labels == 0
    return {
        f"fpr_{prefix}": float(flags[normal].mean()),
        f"recall_{prefix}": float(flags[~normal].mean()),
        f"event_recall_{prefix}": event_recall(labels, flags),
        f"alarms_{prefix}": float(flags.mean()),
    }


def evaluate_detector(
    label: str, rows: np.ndarray, n_fit: int, n_train: int, labels: np.ndarray, gamma: float
) -> dict[str, Any]:
    """Fit one detector on ``rows[:n_fit]`` and return its metrics on one machine as a flat row.

    ``rows`` are the z-scored train rows followed by the test rows; ``n_train`` of them are train.
    """
    name, params, _ = DETECTORS[label]
    started = time.perf_counter()
    detector = make_detector(name, **params).fit(rows[:n_fit])
    scores = detector.score(rows[n_fit - CONTEXT :])[CONTEXT:]
    seconds = time.perf_counter() - started
    validation, scored = scores[: n_train - n_fit], scores[n_train - n_fit :]
    threshold = conformal_threshold(validation, ALPHA)
    adaptive = aci_scores(AciState(ALPHA, gamma), validation, scored)
    return {
        "detector": label,
        "vus_pr": vus_pr(labels, scored),
        "auc_pr": auc_pr(labels, scored),
        "auroc": auroc(labels, scored),
        **_rates(scored > threshold, labels, "static"),
        **_rates(adaptive.is_anomaly, labels, "aci"),
        "score_test_flag": float(exceedance_test(scored, threshold, ALPHA).flagged),
        "seconds": seconds,
    }


def input_drift(rows: np.ndarray, n_fit: int, n_train: int) -> dict[str, float]:
    """Sensors whose KS test against the fit part's profile flags (BH, 0.01) and the largest KS
    distance, for the validation tail and for test."""
    profile = TrainingProfile.fit(rows[:n_fit])
    tail, test = detect_drift(profile, rows[n_fit:n_train]), detect_drift(profile, rows[n_train:])
    return {
        "sensors_tail": float(sum(tail.sensors_flagged)),
        "sensors_test": float(sum(test.sensors_flagged)),
        "max_ks_tail": max(tail.statistics),
        "max_ks_test": max(test.statistics),
    }


def run(root: Path, gamma: float) -> list[dict[str, Any]]:
    """Every detector on every machine under ``root``; progress goes to stderr."""
    rows = []
    for name in machines(root):
        train, test, labels = load_machine(root, name)
        n_fit = int(FIT_SHARE * train.shape[0])
        scaled = Scaler.fit(train[:n_fit]).transform(np.concatenate((train, test)))
        drift = input_drift(scaled, n_fit, train.shape[0])
        for label in DETECTORS:
            metrics = evaluate_detector(label, scaled, n_fit, train.shape[0], labels, gamma)
            row = {"machine": name, **metrics, **drift}
            print(f"{name} {label}: VUS-PR {row['vus_pr']:.3f}", file=sys.stderr, flush=True)
            rows.append(row)
    return rows


# Mean-table columns: header, row key, decimals.
MEAN_COLUMNS = [
    ("AUC-PR", "auc_pr", 3),
    ("AUROC", "auroc", 3),
    ("FPR normal static", "fpr_static", 4),
    ("FPR normal ACI", "fpr_aci", 4),
    ("recall static", "recall_static", 3),
    ("recall ACI", "recall_aci", 3),
    ("event recall static", "event_recall_static", 3),
    ("event recall ACI", "event_recall_aci", 3),
    ("s/machine", "seconds", 2),
]


def mean_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: means over machines per detector, next to baselines_smd.md's VUS-PR, with the
    number of machines whose FPR on normal points exceeds 2 % and the ACI alarm-rate range."""
    headers = ["detector", "VUS-PR", "in baselines_smd.md", "diff"]
    headers += [header for header, _, _ in MEAN_COLUMNS]
    headers += ["machines FPR > 2 % static / ACI", "ACI alarm rate min-max", "score test flags"]
    lines = ["| " + " | ".join(headers) + " |", "|---|" + "---|" * (len(headers) - 1)]
    for label, (_, _, reference) in DETECTORS.items():
        mine = [row for row in rows if row["detector"] == label]
        vus = statistics.fmean(row["vus_pr"] for row in mine)
        cells = [label, f"{vus:.3f}", f"{reference:.3f}", f"{vus - reference:+.3f}"]
        for _, key, digits in MEAN_COLUMNS:
            cells.append(f"{statistics.fmean(row[key] for row in mine):.{digits}f}")
        over = [sum(row[key] > 0.02 for row in mine) for key in ("fpr_static", "fpr_aci")]
        alarms = [row["alarms_aci"] for row in mine]
        cells += [
            f"{over[0]} / {over[1]}",
            f"{min(alarms):.4f}-{max(alarms):.4f}",
            str(int(sum(row["score_test_flag"] for row in mine))),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def drift_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: per machine, the input-drift numbers (they do not depend on the detector)."""
    lines = [
        "| machine | sensors flagged: validation tail | test | max KS D: validation tail | test |",
        "|---|---|---|---|---|",
    ]
    for row in {row["machine"]: row for row in rows}.values():
        lines.append(
            f"| {row['machine']} | {row['sensors_tail']:.0f} | {row['sensors_test']:.0f} "
            f"| {row['max_ks_tail']:.3f} | {row['max_ks_test']:.3f} |"
        )
    return "\n".join(lines)


def machine_table(rows: list[dict[str, Any]], key: str, digits: int) -> str:
    """Markdown: one row per machine, one column per detector, values of ``key``."""
    labels = list(DETECTORS)
    lines = ["| machine | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for name in dict.fromkeys(row["machine"] for row in rows):
        values = {row["detector"]: row[key] for row in rows if row["machine"] == name}
        lines.append(f"| {name} | " + " | ".join(f"{values[x]:.{digits}f}" for x in labels) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="folder with train/, test/, test_label/")
    parser.add_argument("--gamma", type=float, default=0.005, help="ACI step size")
    parser.add_argument("--csv", type=Path, help="also write one row per machine and detector")
    args = parser.parse_args(argv)
    if not machines(args.root):
        parser.error(f"no machine with train, test and test_label files under {args.root}")
    rows = run(args.root, args.gamma)
    if args.csv:
        with args.csv.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    count = len(rows) // len(DETECTORS)
    print(f"Means over {count} machines (alpha = {ALPHA}, ACI gamma = {args.gamma}):\n")
    print(f"{mean_table(rows)}\n")
    for key, title, digits in [
        ("vus_pr", "VUS-PR", 3),
        ("fpr_static", "FPR on normal test points, static conformal threshold", 4),
        ("fpr_aci", "FPR on normal test points, ACI", 4),
        ("alarms_aci", "Overall alarm rate (all test points), ACI", 4),
        ("score_test_flag", "Score test flag on test (1 = flagged), static threshold", 0),
    ]:
        print(f"{title}:\n\n{machine_table(rows, key, digits)}\n")
    print(f"Input drift against the fit part's profile:\n\n{drift_table(rows)}")


if __name__ == "__main__":
    main()
