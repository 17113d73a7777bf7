"""One file holding the weights, the architecture and JSON-able extras (scalers, thresholds...)."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model.config import ModelConfig
from model.device import resolve_device
from model.network import AnomalyTransformer

FORMAT = "anomaly-transformer-checkpoint/1"


@dataclass(frozen=True)
class Checkpoint:
    model: AnomalyTransformer  # in eval mode
    model_cfg: ModelConfig
    extras: dict[str, Any]


def save_checkpoint(
    path: str | Path,
    model: AnomalyTransformer,
    model_cfg: ModelConfig,
    extras: dict[str, Any] | None = None,
) -> None:
    """Write the checkpoint atomically (a temporary file, then a rename).

    Raises:
        ValueError: ``extras`` is not JSON-serialisable, or ``model_cfg`` is not the model's.
    """
    if model_cfg != model.cfg:
        raise ValueError(f"invalid model_cfg {model_cfg}: the model was built with {model.cfg}")
    try:
        extras_json = json.dumps(extras or {}, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"invalid extras: not JSON-serialisable ({error})") from error
    payload = {
        "format": FORMAT,
        "model_config": model_cfg.to_dict(),
        "state_dict": {name: t.detach().cpu() for name, t in model.state_dict().items()},
        "extras_json": extras_json,
    }
    target = Path(path)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(handle)
    try:
        torch.save(payload, temporary)
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def load_checkpoint(path: str | Path, device: str = "cpu") -> Checkpoint:
    """Load with ``torch.load(weights_only=True)`` onto ``device`` (``"cpu"``, ``"cuda"``...).

    Raises:
        ValueError: the file is not a checkpoint of this format.
    """
    target = resolve_device(device)
    payload = torch.load(Path(path), map_location=target, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"invalid checkpoint {path}: format {found!r}, expected {FORMAT!r}")
    model_cfg = ModelConfig.from_dict(payload["model_config"])
    model = AnomalyTransformer(model_cfg)
    model.load_state_dict(payload["state_dict"])
    return Checkpoint(model.to(target).eval(), model_cfg, json.loads(payload["extras_json"]))
