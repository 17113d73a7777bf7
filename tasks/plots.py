"""Plots logged with each run: scores against the threshold and the labels."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def plot_scores(scored: pd.DataFrame, threshold: float, entity: str, path: Path) -> Path:
    """Score over time (log scale), the threshold line and the labelled anomalies shaded; PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(12, 3.5))
    ax.plot(scored["ts"], scored["score"].clip(lower=1e-12), lw=0.6, label="score")
    ax.axhline(threshold, color="red", lw=1, ls="--", label=f"threshold {threshold:.3g}")
    anomalous = scored["label"].to_numpy() == 1
    ax.fill_between(
        scored["ts"],
        0,
        1,
        where=anomalous,
        transform=ax.get_xaxis_transform(),
        color="orange",
        alpha=0.3,
        label="labelled anomaly",
    )
    ax.set_yscale("log")
    ax.set_title(f"{entity}: anomaly score vs threshold vs labels")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
