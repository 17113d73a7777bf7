"""An ensemble of networks of different windows: its score, its span, its file."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from model.artifact import load_scoring_model
from model.checkpoint import Checkpoint, save_checkpoint
from model.config import ModelConfig
from model.ensemble import FORMAT, EnsembleCheckpoint, EnsembleConfig, ensemble_from_payload
from model.network import AnomalyTransformer
from model.scoring import trailing_mean

ENTITY = "e1"


def _member(cfg: ModelConfig, seed: int, scales: list[float]) -> Checkpoint:
    torch.manual_seed(seed)
    model = AnomalyTransformer(cfg).eval()
    return Checkpoint(model, cfg, {"sensor_scales": {ENTITY: scales}})


@pytest.fixture
def ensemble(tiny_cfg: ModelConfig) -> EnsembleCheckpoint:
    short = replace(tiny_cfg, win_size=6, d_model=8, d_ff=8)
    members = (_member(tiny_cfg, 0, [1.0, 2.0, 0.5]), _member(short, 1, [0.3, 1.0, 4.0]))
    extras = {"scoring_method": "recon_mean_norm", "score_smoothing": 3, "sensors": ["a", "b", "c"]}
    return EnsembleCheckpoint(members, extras)


@pytest.fixture
def values() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(60, 3)).astype(np.float32)


def test_the_score_is_the_smoothed_mean_of_the_members_normalised_errors(
    ensemble: EnsembleCheckpoint, values: np.ndarray
) -> None:
    result = ensemble.score(values, entity=ENTITY, skip=20)
    errors = [
        member.sensor_contributions(
            values, entity=ENTITY, skip=0, batch_size=512, method="recon_mean_norm"
        )
        for member in ensemble.members
    ]
    expected = trailing_mean(np.mean(errors, axis=0), 3)[20:]
    np.testing.assert_allclose(result.contributions, expected, rtol=1e-6)
    np.testing.assert_allclose(result.scores, expected.sum(axis=1), rtol=1e-6)
    unscaled = ensemble.members[0].sensor_contributions(
        values, entity=ENTITY, skip=0, batch_size=512, method="recon_mean"
    )
    np.testing.assert_allclose(errors[0], unscaled / np.array([1.0, 2.0, 0.5]), rtol=1e-6)


def test_the_span_is_the_longest_members(ensemble: EnsembleCheckpoint) -> None:
    assert ensemble.model_cfg.win_size == 16 and ensemble.model_cfg.n_channels == 3
    assert ensemble.provisional_points == 15  # recon_mean: the 16-row member's L - 1
    assert ensemble.context_points == 15 + 2


def test_scores_do_not_depend_on_where_a_series_is_cut(
    ensemble: EnsembleCheckpoint, values: np.ndarray
) -> None:
    """A scheduled run and a backfill read the rows a point's score needs and agree."""
    whole = ensemble.score(values, entity=ENTITY, skip=ensemble.context_points).scores
    cut, lag, context = 40, ensemble.provisional_points, ensemble.context_points
    first = ensemble.score(values[: cut + lag], entity=ENTITY, skip=context).scores
    second = ensemble.score(values[cut - context :], entity=ENTITY, skip=context).scores
    parts = np.concatenate([first[: cut - context], second])
    np.testing.assert_allclose(parts, whole, rtol=1e-5)


def test_a_saved_ensemble_loads_with_the_same_scores_and_extras(
    ensemble: EnsembleCheckpoint, values: np.ndarray, tmp_path: Path
) -> None:
    path = tmp_path / "model.ckpt"
    ensemble.save(path, extras=ensemble.extras | {"threshold": 1.5})
    loaded = load_scoring_model(path)
    assert isinstance(loaded, EnsembleCheckpoint)
    assert loaded.extras == ensemble.extras | {"threshold": 1.5}
    assert loaded.model_cfg == ensemble.model_cfg
    assert [m.extras for m in loaded.members] == [m.extras for m in ensemble.members]
    np.testing.assert_array_equal(
        loaded.score(values, entity=ENTITY).scores, ensemble.score(values, entity=ENTITY).scores
    )
    assert list(tmp_path.iterdir()) == [path]


def test_members_of_other_channels_or_no_members_are_refused(
    tiny_cfg: ModelConfig, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="one n_channels, got \\[3, 4\\]"):
        EnsembleConfig((tiny_cfg, replace(tiny_cfg, n_channels=4)))
    with pytest.raises(ValueError, match=f"expected {FORMAT!r} with members"):
        ensemble_from_payload({"format": FORMAT, "members": []}, "x.ckpt", torch.device("cpu"))
    single = tmp_path / "single.ckpt"
    save_checkpoint(single, AnomalyTransformer(tiny_cfg), tiny_cfg, {})
    assert isinstance(load_scoring_model(single), Checkpoint)


def test_a_member_without_its_sensor_scales_names_the_entity(
    ensemble: EnsembleCheckpoint, values: np.ndarray
) -> None:
    with pytest.raises(ValueError, match="sensor_scales for entity 'other'"):
        ensemble.score(values, entity="other")
