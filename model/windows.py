"""Sliding windows over several entities' series, never crossing from one entity to the next."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def window_starts(lengths: Sequence[int], win_size: int, stride: int = 1) -> np.ndarray:
    """Start rows of every window when the entities' series are stacked end to end.

    Entity ``e`` occupies rows ``offset_e .. offset_e + lengths[e] - 1``; its windows start at
    ``offset_e, offset_e + stride, ...`` while they fit inside it. An entity shorter than a window
    contributes none.

    Returns:
        int64 array `(n_windows,)` of start rows in the stacked series.
    """
    if win_size < 1 or stride < 1:
        raise ValueError(f"invalid win_size={win_size} / stride={stride}: expected integers >= 1")
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)[:-1]]).astype(np.int64)
    per_entity = [
        offset + np.arange(0, length - win_size + 1, stride, dtype=np.int64)
        for offset, length in zip(offsets, lengths, strict=True)
        if length >= win_size
    ]
    return np.concatenate(per_entity) if per_entity else np.zeros(0, dtype=np.int64)


class WindowSet:
    """Windows of stacked series held as one ``(rows, C)`` tensor, gathered batch by batch.

    The rows stay on ``device`` when ``resident`` (no host copy per batch); otherwise they stay on
    the host (pinned when the device is CUDA) and each batch is copied over.
    """

    def __init__(
        self,
        series: Sequence[np.ndarray],
        win_size: int,
        stride: int,
        device: torch.device,
        resident: bool,
    ) -> None:
        rows = torch.from_numpy(np.concatenate([np.asarray(s, dtype=np.float32) for s in series]))
        if resident:
            rows = rows.to(device)
        elif device.type == "cuda":
            rows = rows.pin_memory()
        self.rows = rows  # (total rows, C)
        self.device = device
        starts = window_starts([len(s) for s in series], win_size, stride)
        self.starts = torch.from_numpy(starts).to(rows.device)  # (n_windows,)
        self.offsets = torch.arange(win_size, device=rows.device)  # (L,)

    def __len__(self) -> int:
        return int(self.starts.shape[0])

    def batch(self, window_ids: torch.Tensor) -> torch.Tensor:
        """Windows ``window_ids`` (indices into the start list) as `(batch, L, C)` on the device."""
        starts = self.starts[window_ids.to(self.starts.device)]  # (B,)
        windows = self.rows[starts[:, None] + self.offsets]  # (B, L, C)
        return windows.to(self.device, non_blocking=True)
