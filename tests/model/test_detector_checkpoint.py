"""Baseline checkpoints and the one loader: both kinds score through ``ScoringModel``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model.artifact import load_scoring_model
from model.checkpoint import Checkpoint, save_checkpoint
from model.config import ModelConfig
from model.detector_checkpoint import SCORING_METHOD, DetectorCheckpoint, fit_detectors
from model.network import AnomalyTransformer
from model.scoring import score_series

EXTRAS = {"sensors": ["a", "b", "c"], "scoring_method": SCORING_METHOD, "threshold": 1.0}


def _series(rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, 3)).astype(np.float32)


def _fitted(name: str, **params: object) -> DetectorCheckpoint:
    return fit_detectors(name, {"e1": _series(200, 0), "e2": _series(200, 1) * 3}, EXTRAS, **params)


@pytest.mark.parametrize(
    ("name", "params", "win"),
    [
        ("knn", {"window": 5, "k": 2}, 5),
        ("pca", {"n_components": 1}, 1),
        ("isolation_forest", {"seed": 3}, 1),
    ],
)
def test_save_load_and_score_from_a_skip(
    tmp_path: Path, name: str, params: dict[str, object], win: int
) -> None:
    fitted = _fitted(name, **params)
    fitted.save(tmp_path / "m.ckpt", {**EXTRAS, "threshold": 2.0})
    loaded = load_scoring_model(tmp_path / "m.ckpt", device="auto")
    assert isinstance(loaded, DetectorCheckpoint)
    assert loaded.model_cfg == fitted.model_cfg and loaded.model_cfg.win_size == win
    assert loaded.extras == {**EXTRAS, "threshold": 2.0}
    values = _series(50, 2)
    result = loaded.score(values, entity="e2", skip=7)
    scores, contributions = fitted.detectors["e2"].score_contributions(values)
    assert result.scores.dtype == np.float32 and result.contributions.shape == (43, 3)
    np.testing.assert_array_equal(result.scores, scores[7:].astype(np.float32))
    np.testing.assert_array_equal(result.contributions, contributions[7:].astype(np.float32))
    other = loaded.score(values, entity="e1", skip=7).scores
    assert not np.allclose(other, result.scores)


def test_the_loader_gives_the_transformer_checkpoint_its_own_scores(tmp_path: Path) -> None:
    cfg = ModelConfig(n_channels=3, win_size=8, d_model=8, n_heads=2, e_layers=1, d_ff=8)
    model = AnomalyTransformer(cfg).eval()
    save_checkpoint(tmp_path / "at.ckpt", model, cfg, {"scoring_method": "recon_last"})
    loaded = load_scoring_model(tmp_path / "at.ckpt")
    assert isinstance(loaded, Checkpoint) and loaded.model_cfg.win_size == 8
    values = _series(30, 3)
    got = loaded.score(values, entity="any", skip=4)
    want = score_series(model, values, "recon_last", skip=4)
    np.testing.assert_array_equal(got.scores, want.scores)
    loaded.save(tmp_path / "again.ckpt", {"scoring_method": "recon_last", "threshold": 0.1})
    assert load_scoring_model(tmp_path / "again.ckpt").extras["threshold"] == 0.1


def test_bad_scoring_input_raises() -> None:
    fitted = _fitted("knn", window=5, k=2)
    with pytest.raises(ValueError, match="invalid entity 'e9': expected one of \\['e1', 'e2'\\]"):
        fitted.score(_series(10, 0), entity="e9")
    with pytest.raises(ValueError, match="expected \\(T >= win_size=5, n_channels=3\\)"):
        fitted.score(_series(4, 0), entity="e1")
    with pytest.raises(ValueError, match="expected \\(T >= win_size=5, n_channels=3\\)"):
        fitted.score(np.zeros((10, 2)), entity="e1")
    with pytest.raises(ValueError, match="invalid skip=10: expected 0 <= skip < T=10"):
        fitted.score(_series(10, 0), entity="e1", skip=10)
    values = _series(10, 0)
    values[3, 1] = np.nan
    with pytest.raises(ValueError, match="values must be finite, got nan at \\(3, 1\\)"):
        fitted.score(values, entity="e1")


def test_bad_fits_and_files_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fit_parts must name at least one entity"):
        fit_detectors("pca", {}, EXTRAS)
    with pytest.raises(ValueError, match="knn on entity 'short': train must give at least k=5"):
        fit_detectors("knn", {"short": _series(6, 0)}, EXTRAS)
    with pytest.raises(ValueError, match="name must be one of"):
        fit_detectors("lstm", {"e1": _series(20, 0)}, EXTRAS)
    with pytest.raises(ValueError, match="not JSON"):
        _fitted("max_z").save(tmp_path / "x.ckpt", {"threshold": float("nan")})
    torch.save({"format": "something-else/1"}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="format 'something-else/1', expected one of"):
        load_scoring_model(tmp_path / "other.ckpt")
    torch.save({"format": "atp-detector-checkpoint/1", "model_config": {}}, tmp_path / "cut.ckpt")
    with pytest.raises(ValueError, match="invalid checkpoint .*cut.ckpt"):
        load_scoring_model(tmp_path / "cut.ckpt")
