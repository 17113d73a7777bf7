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


def test_sensor_normalised_scores_divide_each_sensor_by_its_entity_scale(
    tiny_cfg: ModelConfig, tmp_path: Path
) -> None:
    model = _trained_like_model(tiny_cfg)
    values = np.random.default_rng(1).normal(size=(50, 3)).astype(np.float32)
    scales = {"pump-1": [0.5, 2.0, 4.0]}
    extras = {"scoring_method": "recon_mean_norm", "sensor_scales": scales}
    save_checkpoint(tmp_path / "model.ckpt", model, tiny_cfg, extras)
    checkpoint = load_checkpoint(tmp_path / "model.ckpt")
    assert checkpoint.provisional_points == tiny_cfg.win_size - 1
    plain = score_series(model, values, "recon_mean", skip=5)
    result = checkpoint.score(values, entity="pump-1", skip=5)
    expected = plain.contributions / np.array(scales["pump-1"])
    np.testing.assert_allclose(result.contributions, expected, rtol=1e-6)
    np.testing.assert_allclose(result.scores, expected.sum(axis=1), rtol=1e-5)
    with pytest.raises(ValueError, match="needs sensor_scales for entity 'pump-2'"):
        checkpoint.score(values, entity="pump-2")
