"""Scores of a whole series against a window-by-window computation written out plainly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.config import ModelConfig
from model.losses import association_discrepancy
from model.network import AnomalyTransformer
from model.scoring import (
    METHODS,
    _overlap_add,
    _take_from_windows,
    _WindowBatches,
    provisional_points,
    score_series,
)


@pytest.fixture
def model(tiny_cfg: ModelConfig) -> AnomalyTransformer:
    torch.manual_seed(0)
    return AnomalyTransformer(tiny_cfg).eval()


@pytest.fixture
def values(tiny_cfg: ModelConfig) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.standard_normal((61, tiny_cfg.n_channels)).astype(np.float32)  # 61 = 3 * 16 + 13


def _window_table(model: AnomalyTransformer, values: np.ndarray, weighted: bool) -> np.ndarray:
    """Weighted squared error of every stride-1 window, `(n_windows, L, C)`."""
    win, temperature = model.cfg.win_size, model.cfg.temperature
    windows = np.stack([values[s : s + win] for s in range(len(values) - win + 1)])
    x = torch.from_numpy(windows)  # (n_windows, L, C)
    with torch.no_grad():
        out = model(x)
        squared = (out.recon - x) ** 2 / x.shape[-1]  # (n_windows, L, C)
        if weighted:
            summed = len(out.series) * association_discrepancy(out.series, out.prior)
            squared = squared * torch.softmax(-temperature * summed, dim=1).unsqueeze(-1)
    return squared.numpy()


def _plain_scores(model: AnomalyTransformer, values: np.ndarray, method: str) -> np.ndarray:
    """Contributions `(T, C)` assembled point by point as docs/interfaces.md describes."""
    n_points, win = len(values), model.cfg.win_size
    table = _window_table(model, values, weighted=method.startswith("reference"))
    rows = []
    for t in range(n_points):
        if method == "recon_mean":
            starts = range(max(0, t - win + 1), min(t, n_points - win) + 1)
            rows.append(np.mean([table[s][t - s] for s in starts], axis=0))
            continue
        if method == "reference":
            start = (t // win) * win
            start = start if start + win <= n_points else n_points - win
        else:
            start = max(0, t - win + 1)
        rows.append(table[start][t - start])
    return np.stack(rows)


@pytest.mark.parametrize("method", METHODS)
def test_each_method_matches_the_plain_computation(
    model: AnomalyTransformer, values: np.ndarray, method: str
) -> None:
    result = score_series(model, values, method, batch_size=7)
    expected = _plain_scores(model, values, method)
    np.testing.assert_allclose(result.contributions, expected, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(result.scores, result.contributions.sum(axis=1), rtol=1e-6)
    assert result.scores.shape == (len(values),)
    assert (result.scores >= 0).all()


@pytest.mark.parametrize("n_windows", [1, 3, 40])
def test_overlap_add_sums_every_window_value_at_its_point(n_windows: int) -> None:
    windows = torch.randn(n_windows, 16, 3, dtype=torch.float64)
    expected = torch.zeros(n_windows + 15, 3, dtype=torch.float64)
    for start in range(n_windows):
        expected[start : start + 16] += windows[start]
    torch.testing.assert_close(_overlap_add(windows), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("skip", [0, 5, 20, 60])
def test_padded_batches_take_recon_last_from_the_last_position_alone(
    model: AnomalyTransformer, values: np.ndarray, skip: int
) -> None:
    """Padded batches (GPU, compiled) compute each window's last position alone."""
    batches = _WindowBatches(model, torch.from_numpy(values), "recon_last", "fp32", 7, False)
    batches.padded = True
    with torch.inference_mode():
        found = _take_from_windows(batches, skip).numpy()
    expected = _plain_scores(model, values, "recon_last")[skip:]
    np.testing.assert_allclose(found, expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("method", METHODS)
def test_skip_drops_the_context_points(
    model: AnomalyTransformer, values: np.ndarray, method: str
) -> None:
    full = score_series(model, values, method, batch_size=5)
    for skip in (1, 15, 20, 60):
        part = score_series(model, values, method, skip=skip, batch_size=5)
        assert part.scores.shape == (len(values) - skip,)
        expected = full.contributions[skip:]
        np.testing.assert_allclose(part.contributions, expected, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("method", ["recon_last", "reference_last"])
def test_streaming_scores_do_not_depend_on_later_points(
    model: AnomalyTransformer, values: np.ndarray, method: str
) -> None:
    short = score_series(model, values[:40], method).scores
    longer = score_series(model, values, method).scores
    np.testing.assert_allclose(short, longer[:40], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("method", METHODS)
def test_scores_before_the_provisional_tail_are_final(
    model: AnomalyTransformer, values: np.ndarray, method: str
) -> None:
    """Points with ``provisional_points`` rows after them keep their score when rows arrive."""
    win = model.cfg.win_size
    lag = provisional_points(method, win)
    assert lag == (win - 1 if method in ("recon_mean", "reference") else 0)
    longer = score_series(model, values, method).scores
    for end in (win, 33, 48):
        short = score_series(model, values[:end], method).scores
        if method == "reference":  # the grid's last full window: final only on the grid
            end = end // win * win
        np.testing.assert_allclose(short[: end - lag], longer[: end - lag], rtol=1e-5, atol=1e-8)


def test_reference_weights_of_a_full_window_sum_to_one(model: AnomalyTransformer) -> None:
    """With the same error at every position, a window's scores sum to that error."""
    values = np.zeros((32, 3), np.float32)
    with torch.no_grad():
        model.projection.weight.zero_()
        model.projection.bias.fill_(1.0)  # recon == 1 everywhere, so every squared error is 1
    scores = score_series(model, values, "reference").scores
    np.testing.assert_allclose([scores[:16].sum(), scores[16:].sum()], [1.0, 1.0], rtol=1e-5)


def test_bf16_scores_are_close_to_fp32(model: AnomalyTransformer, values: np.ndarray) -> None:
    fp32 = score_series(model, values, "recon_last").scores
    bf16 = score_series(model, values, "recon_last", precision="bf16").scores
    assert np.linalg.norm(bf16 - fp32) / np.linalg.norm(fp32) < 0.05


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "paper"}, "invalid method='paper'"),
        ({"skip": 61}, "invalid skip=61"),
        ({"batch_size": 0}, "invalid batch_size=0"),
        ({"precision": "fp16"}, "invalid precision='fp16'"),
    ],
)
def test_invalid_arguments_are_rejected(
    model: AnomalyTransformer, values: np.ndarray, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        score_series(model, values, **kwargs)  # type: ignore[arg-type]


def test_invalid_series_are_rejected(model: AnomalyTransformer, values: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"shape \(15, 3\): expected \(T >= win_size=16"):
        score_series(model, values[:15])
    with pytest.raises(ValueError, match="n_channels=3"):
        score_series(model, values[:, :2])
    values[30, 1] = np.nan
    with pytest.raises(ValueError, match="the first is nan at row 30, column 1"):
        score_series(model, values)


def test_scoring_leaves_the_model_mode_as_it_was(
    model: AnomalyTransformer, values: np.ndarray
) -> None:
    model.train()
    score_series(model, values)
    assert model.training
