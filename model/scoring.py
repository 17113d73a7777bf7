"""Anomaly scores of a whole series, batch by batch, with per-sensor contributions.

Methods (``docs/interfaces.md``, "Scores and their span"):

* ``recon_last``: per-point MSE at the last position of the window ending at the point;
* ``reference_last``: the reference score at the last position of the window ending at the point;
* ``reference``: the paper's score on non-overlapping windows from index 0; the tail that does
  not fill a window comes from the window ending at the last point;
* ``recon_mean``: per-point MSE averaged over every window containing the point;
* ``recon_mean_norm`` (``SENSOR_NORMALISED``): ``recon_mean`` with each sensor's error divided by
  its mean on the validation tail, per entity (scored by ``model.checkpoint.Checkpoint.score``).

For the streaming methods (``*_last``) the first ``L - 1`` points take their values from the first
window at their own positions. ``recon_mean`` averages the first and last ``L - 1`` points of a
series over the fewer windows there are; the last ones are provisional until ``L - 1`` more rows
arrive (:func:`provisional_points`). ``contributions[t, c]`` is channel ``c``'s squared error
weighted like the score, divided by the channel count, so every row sums to the score.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from model.config import Precision
from model.device import accelerated, resolve_device
from model.losses import association_discrepancy
from model.network import AnomalyTransformer, at_least_float32
from model.steps import compile_options

METHODS: tuple[str, ...] = ("reference", "reference_last", "recon_last", "recon_mean")
# Methods that divide each sensor's error by its mean on held-out normal data, and the method
# whose errors they divide (the division needs per-entity scales: ``model.checkpoint``).
SENSOR_NORMALISED: dict[str, str] = {"recon_mean_norm": "recon_mean"}
SCALE_FLOOR = 1e-12


class ScoreResult(NamedTuple):
    scores: np.ndarray  # (T - skip,) float32
    contributions: np.ndarray  # (T - skip, C) float32, rows sum to the score


def window_contributions(
    model: AnomalyTransformer,
    x: torch.Tensor,
    method: str,
    precision: Precision,
    last_only: bool = False,
) -> torch.Tensor:
    """Weighted squared error per window position and channel, `(batch, L, C)` in float32.

    ``recon_*`` methods weight every position by ``1 / C``; ``reference*`` methods by
    ``softmax_over_positions(-T * sum_over_layers(discrepancy)) / C``, computed in float32.
    ``last_only`` (``recon_*`` methods) computes the last position alone: `(batch, 1, C)`.
    """
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        if method.startswith("recon"):
            recon = model.reconstruct(x, check_finite=False, last_only=last_only)  # (b, l, C)
        else:
            out = model(x, check_finite=False)
            recon = out.recon  # (b, L, C)
    squared = (at_least_float32(recon) - x[:, -recon.shape[1] :]) ** 2 / x.shape[-1]  # (b, l, C)
    if method.startswith("recon"):
        return squared
    summed = association_discrepancy(out.series, out.prior) * len(out.series)  # (b, L), fp32
    weights = torch.softmax(-model.cfg.temperature * summed, dim=-1)  # (b, L)
    return squared * weights.unsqueeze(-1)


def scoring_precision(device: torch.device) -> Precision:
    """The pipeline's precision on ``device``: bf16 on a GPU with bf16 support (4.5x the fp32
    rate, the same top-0.5% points at 0.99: docs/performance.md), fp32 elsewhere (bf16 is slower
    on CPUs)."""
    return "bf16" if accelerated(device) else "fp32"


def provisional_points(method: str, win_size: int) -> int:
    """How many of a series' last points hold a score that later rows still change.

    ``win_size - 1`` for the methods that use windows after a point (``recon_mean``, whose point
    is final once the window starting at it is complete, and ``reference``); 0 for the ``*_last``
    methods, whose point is final when the window ending at it is.
    """
    base = SENSOR_NORMALISED.get(method, method)
    if base not in METHODS:
        raise ValueError(f"invalid method={method!r}: expected one of {METHODS}")
    return win_size - 1 if base in ("recon_mean", "reference") else 0


def trailing_mean(contributions: np.ndarray, width: int) -> np.ndarray:
    """Each row `(T, C)` averaged with the ``width - 1`` rows before it (fewer at the start).

    The smoothing of a checkpoint's ``score_smoothing``: it keeps rows summing to the score and
    adds no provisional rows (a row's mean is final when the row is), but a point's smoothed
    score needs the ``width - 1`` scores before it.
    """
    if width < 1:
        raise ValueError(f"invalid width={width}: expected an integer >= 1")
    rows = np.asarray(contributions, np.float64)
    sums = np.concatenate([np.zeros((1, rows.shape[1])), np.cumsum(rows, axis=0)])  # (T + 1, C)
    ends = np.arange(1, len(rows) + 1)
    starts = np.maximum(ends - width, 0)
    return ((sums[ends] - sums[starts]) / (ends - starts)[:, None]).astype(np.float32)


def smoothed(contributions: np.ndarray, smoothing: int, skip: int) -> ScoreResult:
    """Per-sensor errors averaged over the ``smoothing`` rows ending at each row
    (``trailing_mean``), from row ``skip`` on (the rows before are the smoothing's context)."""
    rows = trailing_mean(contributions, smoothing)[skip:]
    return ScoreResult(rows.sum(axis=1), rows)


def sensor_error_scales(
    contributions: np.ndarray, observed: np.ndarray | None = None
) -> np.ndarray:
    """Each sensor's mean error `(C,)` over held-out normal points `(T, C)`: what the
    ``SENSOR_NORMALISED`` methods divide that sensor's error by.

    ``observed`` `(T, C)` restricts each sensor's mean to the points where it reported: a filled
    gap is easy to reconstruct, and would shrink the divisor of a sensor that reports later. A
    sensor that never reported takes the mean over every point.
    """
    errors = np.asarray(contributions, np.float64)
    every = errors.mean(axis=0)
    if observed is None:
        return every + SCALE_FLOOR
    counts = observed.sum(axis=0)
    sums = np.where(observed, errors, 0.0).sum(axis=0)
    return np.where(counts > 0, sums / np.maximum(counts, 1), every) + SCALE_FLOOR


def designated_starts(points: torch.Tensor, method: str, n_points: int, win: int) -> torch.Tensor:
    """For the methods that take each point from one window: that window's start row."""
    if method == "reference":
        grid = torch.div(points, win, rounding_mode="floor") * win
        return torch.where(grid + win <= n_points, grid, torch.full_like(grid, n_points - win))
    return (points - win + 1).clamp(min=0)


def _as_series(
    values: np.ndarray | torch.Tensor, model: AnomalyTransformer, device: torch.device
) -> torch.Tensor:
    series = torch.as_tensor(values, dtype=torch.float32)  # (T, C)
    if device.type == "cuda" and series.device.type == "cpu":
        series = series.pin_memory()  # pageable host-to-device copies are far slower
    series = series.to(device)
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


def _check_arguments(
    method: str, skip: int, n_points: int, batch_size: int, precision: str
) -> None:
    if method not in METHODS:
        raise ValueError(f"invalid method={method!r}: expected one of {METHODS}")
    if not 0 <= skip < n_points:
        raise ValueError(f"invalid skip={skip}: expected 0 <= skip < T={n_points}")
    if batch_size < 1:
        raise ValueError(f"invalid batch_size={batch_size}: expected an integer >= 1")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"invalid precision={precision!r}: expected 'fp32' or 'bf16'")


class _WindowBatches:
    """Weighted squared errors of windows of one series, computed a batch at a time."""

    def __init__(
        self,
        model: AnomalyTransformer,
        series: torch.Tensor,
        method: str,
        precision: Precision,
        batch_size: int,
        compile: bool,
    ) -> None:
        self.model, self.series, self.method, self.precision = model, series, method, precision
        self.batch_size, self.compile = batch_size, compile
        # One batch shape for every call on a GPU too: the kernels (and so the rounding of each
        # window's result) then do not depend on how a series falls into batches.
        self.padded = compile or series.device.type == "cuda"
        self.offsets = torch.arange(model.cfg.win_size, device=series.device)  # (L,)
        self.contribute = window_contributions
        if compile:
            options = compile_options(cuda_graphs=False)
            self.contribute = torch.compile(window_contributions, dynamic=False, options=options)

    def weighted(self, starts: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """`(n, L, C)` for the windows starting at ``starts`` `(n,)` (device rows); `(n, 1, C)`
        with ``last_only``."""
        n_windows = len(starts)
        if self.padded:  # top the last batch up with its last window
            starts = torch.cat([starts, starts[-1:].expand(self.batch_size - n_windows)])
        rows = starts[:, None] + self.offsets  # (b, L)
        windows = self.series[rows]  # (b, L, C)
        weighted = self.contribute(self.model, windows, self.method, self.precision, last_only)
        return weighted[:n_windows]


def _take_last_positions(batches: _WindowBatches, skip: int) -> torch.Tensor:
    """``recon_last`` for points ``skip..T-1``: `(T - skip, C)`. Each point after the first
    ``L - 1`` is the last position of its own window, computed alone; the first points come
    from the first window at their own positions."""
    n_points, win = batches.series.shape[0], batches.model.cfg.win_size
    device = batches.series.device
    head = max(0, win - 1 - skip)  # points before the first window's end
    out = torch.empty(n_points - skip, batches.series.shape[1], device=device)  # (P, C)
    if head:
        out[:head] = batches.weighted(torch.zeros(1, dtype=torch.long, device=device))[
            0, skip : win - 1
        ]
    starts = torch.arange(skip + head - win + 1, n_points - win + 1, device=device)  # (P - head,)
    for first in range(0, len(starts), batches.batch_size):
        batch = starts[first : first + batches.batch_size]
        out[head + first : head + first + len(batch)] = batches.weighted(batch, True)[:, 0]
    return out


def _take_from_windows(batches: _WindowBatches, skip: int) -> torch.Tensor:
    """Each point ``skip..T-1`` takes its value from its designated window: `(T - skip, C)`."""
    if batches.method == "recon_last" and batches.padded:
        # Unpadded (CPU), the last layer would run on as few rows as a batch has windows, and
        # matmul kernels, so their rounding, change with the row count: a point's score would
        # depend on how its series is cut into calls.
        return _take_last_positions(batches, skip)
    n_points, win = batches.series.shape[0], batches.model.cfg.win_size
    device, size = batches.series.device, batches.batch_size
    points = torch.arange(skip, n_points, device=device)  # (P,)
    designated = designated_starts(points, batches.method, n_points, win)  # (P,) non-decreasing
    starts = torch.unique_consecutive(designated)  # (n_windows,)
    window_index = torch.searchsorted(starts, designated)  # (P,)
    firsts = torch.arange(0, len(starts) + size, size, device=device)  # first window per batch
    bounds = torch.searchsorted(window_index, firsts).tolist()  # first point per batch
    position = points - designated  # (P,)
    out = torch.empty(len(points), batches.series.shape[1], device=device)  # (P, C)
    for batch, first in enumerate(range(0, len(starts), size)):
        weighted = batches.weighted(starts[first : first + size])  # (b, L, C)
        low, high = bounds[batch], bounds[batch + 1]
        out[low:high] = weighted[window_index[low:high] - first, position[low:high]]
    return out


def _overlap_add(windows: torch.Tensor) -> torch.Tensor:
    """Per-point sums of consecutive stride-1 windows' values `(b, L, C)`: `(b + L - 1, C)`,
    where window ``w``'s position ``l`` is point ``w + l``.

    Each sum runs over one diagonal of the windows in a fixed order, read through a strided view
    of the windows between ``L - 1`` zero windows on each side: no scatter, no atomics.
    """
    n_windows, win, channels = windows.shape
    zeros = windows.new_zeros(win - 1, win, channels)
    padded = torch.cat([zeros, windows, zeros])  # (b + 2L - 2, L, C)
    # diagonals[p, k] = padded[p + k, L - 1 - k] = windows[p - (L - 1 - k), L - 1 - k]
    diagonals = padded.as_strided(
        (n_windows + win - 1, win, channels),
        (win * channels, (win - 1) * channels, 1),
        (win - 1) * channels,
    )
    return diagonals.sum(dim=1)


def _mean_over_windows(batches: _WindowBatches, skip: int) -> torch.Tensor:
    """Each point's average over every window containing it: `(T - skip, C)`.

    Sums in float64, so that how the windows fall into batches (which differs between a scheduled
    chunk and a backfill) does not change the float32 result.
    """
    n_points, win = batches.series.shape[0], batches.model.cfg.win_size
    device = batches.series.device
    out = torch.zeros(n_points - skip, batches.series.shape[1], device=device, dtype=torch.float64)
    for first in range(max(0, skip - win + 1), n_points - win + 1, batches.batch_size):
        last = min(first + batches.batch_size, n_points - win + 1)  # windows first..last-1
        weighted = batches.weighted(torch.arange(first, last, device=device))  # (b, L, C)
        sums = _overlap_add(weighted.double())  # (b + L - 1, C): points first..last+L-2
        context = max(0, skip - first)  # points before skip add nothing
        out[first + context - skip : last + win - 1 - skip] += sums[context:]
    points = torch.arange(skip, n_points, device=device)
    coverage = points.clamp(max=n_points - win) - (points - win + 1).clamp(min=0) + 1  # (P,)
    return (out / coverage.unsqueeze(-1)).float()


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

    Windows are built batch by batch (``batch_size`` at a time) under inference mode; on a GPU
    every batch has ``batch_size`` windows (the last one is topped up), so that a window's result
    does not depend on its batch. ``device`` defaults to the model's (the model is moved there
    otherwise); ``precision="bf16"`` runs the network under bf16 autocast; ``compile`` compiles
    the per-window computation.

    Raises:
        ValueError: unknown method, wrong shape, ``T < win_size``, NaN/inf values, bad ``skip``.
    """
    target = next(model.parameters()).device if device is None else resolve_device(str(device))
    model.to(target)
    series = _as_series(values, model, target)  # (T, C)
    _check_arguments(method, skip, series.shape[0], batch_size, precision)
    batches = _WindowBatches(model, series, method, precision, batch_size, compile)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        if method == "recon_mean":
            contributions = _mean_over_windows(batches, skip)  # (T - skip, C)
        else:
            contributions = _take_from_windows(batches, skip)  # (T - skip, C)
    model.train(was_training)
    return ScoreResult(_to_host(contributions.sum(dim=1)), _to_host(contributions))


def _to_host(tensor: torch.Tensor) -> np.ndarray:
    """Copy to a numpy array, through pinned memory from CUDA (pageable copies were 30x slower)."""
    if tensor.device.type != "cuda":
        return tensor.numpy()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor).numpy()
