"""Anomaly scores of a whole series, batch by batch, with per-sensor contributions.

Methods (``docs/interfaces.md``, "Scores and their span"):

* ``recon_last``: per-point MSE at the last position of the window ending at the point;
* ``reference_last``: the reference score at the last position of the window ending at the point;
* ``reference``: the paper's score on non-overlapping windows from index 0; the tail that does
  not fill a window comes from the window ending at the last point;
* ``recon_mean``: per-point MSE averaged over every window containing the point.

For the streaming methods (``*_last``) the first ``L - 1`` points take their values from the first
window at their own positions. ``contributions[t, c]`` is channel ``c``'s squared error weighted
like the score, divided by the channel count, so every row sums to the score.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np
import torch

from model.config import Precision
from model.device import resolve_device
from model.losses import association_discrepancy
from model.network import AnomalyTransformer, at_least_float32

Method = Literal["reference", "reference_last", "recon_last", "recon_mean"]
METHODS: tuple[str, ...] = ("reference", "reference_last", "recon_last", "recon_mean")


class ScoreResult(NamedTuple):
    scores: np.ndarray  # (T - skip,) float32
    contributions: np.ndarray  # (T - skip, C) float32, rows sum to the score


def window_contributions(
    model: AnomalyTransformer, x: torch.Tensor, method: str, precision: Precision
) -> torch.Tensor:
    """Weighted squared error per window position and channel, `(batch, L, C)` in float32.

    ``recon_*`` methods weight every position by ``1 / C``; ``reference*`` methods by
    ``softmax_over_positions(-T * sum_over_layers(discrepancy)) / C``, computed in float32.
    """
    n_channels = x.shape[-1]
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        if method.startswith("recon"):
            recon, weights = model.reconstruct(x, check_finite=False), None  # (b, L, C)
        else:
            out = model(x, check_finite=False)
            recon = out.recon  # (b, L, C)
            summed = association_discrepancy(out.series, out.prior) * len(out.series)  # (b, L)
            weights = torch.softmax(-model.cfg.temperature * summed, dim=-1)  # (b, L)
    squared = (at_least_float32(recon) - x) ** 2 / n_channels  # (b, L, C)
    return squared if weights is None else squared * weights.unsqueeze(-1)


def designated_starts(points: torch.Tensor, method: str, n_points: int, win: int) -> torch.Tensor:
    """For the methods that take each point from one window: that window's start row."""
    if method == "reference":
        grid = torch.div(points, win, rounding_mode="floor") * win
        return torch.where(grid + win <= n_points, grid, torch.full_like(grid, n_points - win))
    return (points - win + 1).clamp(min=0)


def _window_starts(method: str, n_points: int, win: int, skip: int) -> torch.Tensor:
    """Starts of the windows needed to score points ``skip .. n_points - 1``."""
    if method == "recon_mean":
        return torch.arange(max(0, skip - win + 1), n_points - win + 1)
    points = torch.arange(skip, n_points)
    return torch.unique(designated_starts(points, method, n_points, win))


def _as_series(values: np.ndarray | torch.Tensor, model: AnomalyTransformer, device: torch.device) -> torch.Tensor:
    series = torch.as_tensor(values, dtype=torch.float32).to(device)  # (T, C)
    win, n_channels = model.cfg.win_size, model.cfg.n_channels
    if series.dim() != 2 or series.shape[1] != n_channels or series.shape[0] < win:
        raise ValueError(
            f"invalid values of shape {tuple(series.shape)}: expected (T >= win_size={win}, "
            f"n_channels={n_channels})"
        )
    bad = (~torch.isfinite(series)).nonzero()  # (n_bad, 2)
    if len(bad):
        row, column = bad[0].tolist()
        raise ValueError(
            f"invalid values: {len(bad)} non-finite value(s), the first is "
            f"{series[row, column].item()} at row {row}, column {column}"
        )
    return series


def _check_arguments(method: str, skip: int, n_points: int, batch_size: int, precision: str) -> None:
    if method not in METHODS:
        raise ValueError(f"invalid method={method!r}: expected one of {METHODS}")
    if not 0 <= skip < n_points:
        raise ValueError(f"invalid skip={skip}: expected 0 <= skip < T={n_points}")
    if batch_size < 1:
        raise ValueError(f"invalid batch_size={batch_size}: expected an integer >= 1")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"invalid precision={precision!r}: expected 'fp32' or 'bf16'")


def _assemble(
    out: torch.Tensor, weighted: torch.Tensor, rows: torch.Tensor, method: str, win: int, skip: int
) -> None:
    """Write (or, for ``recon_mean``, add) a batch's window values into ``out`` `(T - skip, C)`."""
    n_points = out.shape[0] + skip
    if method == "recon_mean":
        keep = rows >= skip  # (b, L)
        out.index_put_((rows[keep] - skip,), weighted[keep], accumulate=True)
        return
    starts = rows[:, :1]  # (b, 1)
    keep = (designated_starts(rows, method, n_points, win) == starts) & (rows >= skip)  # (b, L)
    out[rows[keep] - skip] = weighted[keep]


def _coverage(n_points: int, win: int, skip: int, device: torch.device) -> torch.Tensor:
    """How many windows contain each point ``skip .. n_points - 1``, as `(T - skip, 1)`."""
    points = torch.arange(skip, n_points, device=device)
    first = (points - win + 1).clamp(min=0)
    last = points.clamp(max=n_points - win)
    return (last - first + 1).unsqueeze(-1).float()


def score_series(
    model: AnomalyTransformer,
    values: np.ndarray | torch.Tensor,
    method: str = "recon_last",
    *,
    skip: int = 0,
    batch_size: int = 512,
    device: str | torch.device | None = None,
    precision: Precision = "fp32",
    compile: bool = False,
) -> ScoreResult:
    """Score every point of a scaled `(T, C)` series; the result covers ``values[skip:]``.

    Windows are built batch by batch (``batch_size`` at a time) under inference mode. ``device``
    defaults to the model's (the model is moved there otherwise); ``precision="bf16"`` runs the
    network under bf16 autocast; ``compile`` compiles the per-window computation.

    Raises:
        ValueError: unknown method, wrong shape, ``T < win_size``, NaN/inf values, bad ``skip``.
    """
    target = next(model.parameters()).device if device is None else resolve_device(str(device))
    model.to(target)
    series = _as_series(values, model, target)  # (T, C)
    n_points, win = series.shape[0], model.cfg.win_size
    _check_arguments(method, skip, n_points, batch_size, precision)
    contribute = torch.compile(window_contributions, dynamic=False) if compile else window_contributions
    out = torch.zeros(n_points - skip, model.cfg.n_channels, device=target)  # (T - skip, C)
    offsets = torch.arange(win, device=target)  # (L,)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for batch in _window_starts(method, n_points, win, skip).to(target).split(batch_size):
            n_windows = len(batch)
            if compile:  # one shape for every call: top the last batch up with its last window
                batch = torch.cat([batch, batch[-1:].expand(batch_size - n_windows)])
            rows = batch[:, None] + offsets  # (b, L)
            weighted = contribute(model, series[rows], method, precision)[:n_windows]  # (b, L, C)
            _assemble(out, weighted, rows[:n_windows], method, win, skip)
        if method == "recon_mean":
            out /= _coverage(n_points, win, skip, target)
    model.train(was_training)
    return ScoreResult(out.sum(dim=1).cpu().numpy(), out.cpu().numpy())
