"""One-file checkpoints: identical outputs after a round trip, extras kept, bad files refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import ModelConfig
from model.network import AnomalyTransformer
from model.scaling import Scaler
from model.scoring import score_series


def _trained_like_model(cfg: ModelConfig) -> AnomalyTransformer:
    torch.manual_seed(3)
    model = AnomalyTransformer(cfg)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    return model.eval()


def test_round_trip_gives_identical_outputs_and_extras(
    tiny_cfg: ModelConfig, windows: torch.Tensor, tmp_path: Path
) -> None:
    model = _trained_like_model(tiny_cfg)
    scaler = Scaler.fit(np.random.default_rng(0).normal(size=(40, 3)))
    extras = {"scaler": scaler.to_dict(), "threshold": 0.25, "sensors": ["a", "b", "c"]}
    path = tmp_path / "model.ckpt"
    save_checkpoint(path, model, tiny_cfg, extras)
    loaded = load_checkpoint(path)
    assert loaded.model_cfg == tiny_cfg
    assert loaded.extras == extras
    assert not loaded.model.training
    before, after = model(windows), loaded.model(windows)
    assert torch.equal(before.recon, after.recon)
    assert all(torch.equal(a, b) for a, b in zip(before.prior, after.prior, strict=True))
    values = np.random.default_rng(1).normal(size=(40, 3)).astype(np.float32)
    np.testing.assert_array_equal(
        score_series(model, values).scores, score_series(loaded.model, values).scores
    )
    assert list(tmp_path.iterdir()) == [path]


def test_non_json_extras_and_a_foreign_config_are_refused(
    tiny_cfg: ModelConfig, tmp_path: Path
) -> None:
    model = _trained_like_model(tiny_cfg)
    with pytest.raises(ValueError, match="invalid extras: not JSON-serialisable"):
        save_checkpoint(tmp_path / "a.ckpt", model, tiny_cfg, {"mean": np.zeros(2)})
    with pytest.raises(ValueError, match="invalid extras"):
        save_checkpoint(tmp_path / "a.ckpt", model, tiny_cfg, {"threshold": float("nan")})
    other = ModelConfig(n_channels=3, win_size=16, d_model=16, n_heads=2, e_layers=1, d_ff=16)
    with pytest.raises(ValueError, match="invalid model_cfg"):
        save_checkpoint(tmp_path / "a.ckpt", model, other)
    assert list(tmp_path.iterdir()) == []


def test_a_file_of_another_format_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": {}}, path)
    expected = "format None, expected 'anomaly-transformer-checkpoint/1'"
    with pytest.raises(ValueError, match=expected):
        load_checkpoint(path)
