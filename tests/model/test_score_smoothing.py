"""Score smoothing: a trailing mean over rows that keeps chunked scoring equal to one pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.checkpoint import Checkpoint
from model.config import ModelConfig
from model.network import AnomalyTransformer
from model.scoring import score_series, trailing_mean


def test_trailing_mean_averages_the_rows_ending_at_each_row() -> None:
    rows = np.array([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0]])
    assert np.allclose(trailing_mean(rows, 2), [[1, 10], [1.5, 15], [2.5, 25], [3.5, 35]])
    assert np.allclose(trailing_mean(rows, 3)[2:], [[2, 20], [3, 30]])
    assert np.array_equal(trailing_mean(rows, 1), rows.astype(np.float32))
    with pytest.raises(ValueError, match="width=0"):
        trailing_mean(rows, 0)


def _checkpoint(cfg: ModelConfig, method: str, smoothing: int) -> Checkpoint:
    torch.manual_seed(5)
    model = AnomalyTransformer(cfg).eval()
    extras = {
        "scoring_method": method,
        "score_smoothing": smoothing,
        "sensor_scales": {"m1": [0.5, 2.0, 1.0]},
    }
    return Checkpoint(model, cfg, extras)


@pytest.mark.parametrize("method", ["recon_mean_norm", "recon_last"])
def test_smoothed_score_is_the_trailing_mean_of_the_unsmoothed(
    tiny_cfg: ModelConfig, method: str
) -> None:
    values = np.random.default_rng(1).normal(size=(60, tiny_cfg.n_channels))
    plain = _checkpoint(tiny_cfg, method, 1).score(values, entity="m1")
    smoothed = _checkpoint(tiny_cfg, method, 4).score(values, entity="m1")
    expected = trailing_mean(plain.contributions, 4)
    assert np.allclose(smoothed.contributions, expected, atol=1e-6)
    assert np.allclose(smoothed.scores, smoothed.contributions.sum(axis=1), atol=1e-5)
    assert not np.allclose(smoothed.scores, plain.scores)


def test_context_points_rows_of_context_give_the_one_pass_scores(tiny_cfg: ModelConfig) -> None:
    """What the scoring flow relies on: a chunk led by ``context_points`` rows scores its rows as
    one pass over the whole series does (recon_mean's lookahead rows included)."""
    checkpoint = _checkpoint(tiny_cfg, "recon_mean_norm", 5)
    assert checkpoint.context_points == tiny_cfg.win_size - 1 + 4
    values = np.random.default_rng(2).normal(size=(80, tiny_cfg.n_channels))
    whole = checkpoint.score(values, entity="m1").scores
    start = 40
    begin = start - checkpoint.context_points
    chunk = checkpoint.score(values[begin:], entity="m1", skip=start - begin).scores
    assert np.allclose(chunk, whole[start:], rtol=1e-5, atol=1e-6)
    short = checkpoint.score(values[begin + 1 :], entity="m1", skip=start - begin - 1).scores
    assert not np.allclose(short[0], whole[start], rtol=1e-5, atol=1e-6)


def test_unsmoothed_checkpoint_scores_as_score_series(tiny_cfg: ModelConfig) -> None:
    checkpoint = _checkpoint(tiny_cfg, "recon_mean", 1)
    values = np.random.default_rng(3).normal(size=(40, tiny_cfg.n_channels))
    assert checkpoint.context_points == tiny_cfg.win_size - 1
    direct = score_series(checkpoint.model, values, "recon_mean").scores
    assert np.array_equal(checkpoint.score(values, entity="m1").scores, direct)
