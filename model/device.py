"""Pick the torch device to run on; no other module hard-codes one."""

from __future__ import annotations

import torch


def accelerated(device: torch.device) -> bool:
    """Whether bf16 autocast and ``torch.compile`` pay off on ``device``: CUDA with bf16 support."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def resolve_device(name: str = "auto") -> torch.device:
    """Turn ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` into an available device.

    ``"auto"`` takes the first CUDA device when one is present, else the CPU.

    Raises:
        ValueError: the name is not a device, or names a CUDA device this machine lacks.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as error:
        allowed = "expected 'auto', 'cpu' or 'cuda[:N]'"
        raise ValueError(f"invalid device={name!r}: {allowed}") from error
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"invalid device={name!r}: expected 'auto', 'cpu' or 'cuda[:N]'")
    if device.type == "cuda":
        count = torch.cuda.device_count()
        index = device.index or 0
        if index >= count:
            raise ValueError(f"invalid device={name!r}: this machine has {count} CUDA device(s)")
    return device
