"""Checkpoints load with weights_only: a file carrying a pickled object is refused, not run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from model.checkpoint import load_checkpoint


class Payload:
    """An object whose unpickling would run a command."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, ("touch PWNED",)


def test_a_checkpoint_with_a_pickled_object_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"format": "anomaly-transformer-checkpoint/1", "extras_json": Payload()}, path)
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        load_checkpoint(path)
    assert not (tmp_path / "PWNED").exists()
