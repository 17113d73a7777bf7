"""Calibration methods and scopes, on a real SQLite warehouse and a tiny untrained model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from data_contracts import Contract, load_contract
from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import ModelConfig
from model.metrics import evaluate_scores
from model.network import AnomalyTransformer
from model.thresholds import (
    conformal_threshold,
    leaky_reference_threshold,
    p_values,
    pot_threshold,
)
from tasks.alarm_rule import alarm_rule
from tasks.calibrate import calibrate, fit_thresholds, labelled_range_scores, training_range_scores
from tasks.errors import DataContractError
from tasks.evaluate import evaluate_model
from tasks.registry import LoadedModel
from tasks.scoring import score_rows
from tasks.warehouse import ensure_schema, get_engine, read_readings, upsert_readings
from tasks.windowing import DatasetRef, build_dataset

WIN = 10
TRAIN_ROWS, TEST_ROWS = 400, 100


def _readings(contract: Contract) -> pd.DataFrame:
    """Two entities; entity b is noisier, so per-entity thresholds must differ."""
    rng = np.random.default_rng(1)
    frames = []
    for entity, noise in (("a", 0.01), ("b", 0.1)):
        rows = TRAIN_ROWS + TEST_ROWS
        values = np.clip(0.5 + rng.normal(0, noise, (rows, len(contract.sensor_names))), 0, 1)
        frame = pd.DataFrame(values, columns=contract.sensor_names)
        frame.insert(0, "ts", pd.date_range("2020-01-01", periods=rows, freq="min"))
        frame.insert(0, "entity", entity)
        frame["label"] = [None] * TRAIN_ROWS + [0] * (TEST_ROWS - 10) + [1] * 10
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Contract, DatasetRef, Path]:
    """A warehouse, its windowed dataset and an untrained tiny model, shared by this module."""
    tmp_path = tmp_path_factory.mktemp("calibrate")
    sqlite_url = f"sqlite:///{tmp_path / 'warehouse.db'}"
    contract = load_contract("smd")
    engine = get_engine(sqlite_url)
    ensure_schema(engine, contract)
    upsert_readings(engine, contract, _readings(contract))
    dataset = build_dataset(sqlite_url, contract, tmp_path / "ds", win_size=WIN, val_fraction=0.5)
    torch.manual_seed(0)
    cfg = ModelConfig(
        n_channels=len(contract.sensor_names),
        win_size=WIN,
        d_model=8,
        n_heads=1,
        e_layers=1,
        d_ff=8,
    )
    extras = {
        "source": "smd",
        "sensors": contract.sensor_names,
        "scalers": {name: s.to_dict() for name, s in dataset.scalers().items()},
        "scoring_method": "recon_last",
    }
    path = tmp_path / "trained.ckpt"
    save_checkpoint(path, AnomalyTransformer(cfg), cfg, extras)
    return sqlite_url, contract, dataset, path


def test_conformal_per_entity_keeps_global_keys_and_adds_entity_keys(setup, tmp_path: Path) -> None:
    _, _, dataset, trained = setup
    result = calibrate(
        trained, dataset, tmp_path / "m.ckpt", method="conformal", alpha=0.02, scope="entity"
    )
    extras = load_checkpoint(result.checkpoint).extras
    pooled = np.asarray(extras["calibration_scores"])
    assert pooled.size == result.n_scores == 2 * (TRAIN_ROWS // 2)
    assert extras["threshold"] == pytest.approx(conformal_threshold(pooled, 0.02))
    for entity in ("a", "b"):
        own = extras["entity_calibration_scores"][entity]
        assert extras["thresholds"][entity] == pytest.approx(conformal_threshold(own, 0.02))
        rule = alarm_rule(extras, entity)
        assert rule.threshold == extras["thresholds"][entity] and rule.alpha == 0.02
        np.testing.assert_array_equal(rule.null_scores, own)
    assert extras["thresholds"]["a"] < extras["thresholds"]["b"]
    assert extras["calibration"] == {
        "method": "conformal",
        "alpha": 0.02,
        "scope": "entity",
        "n_scores": pooled.size,
        "leaks_test_data": False,
    }


def test_global_scope_writes_no_entity_keys(setup, tmp_path: Path) -> None:
    _, _, dataset, trained = setup
    result = calibrate(trained, dataset, tmp_path / "m.ckpt", method="quantile", alpha=0.05)
    extras = load_checkpoint(result.checkpoint).extras
    assert "thresholds" not in extras and "entity_calibration_scores" not in extras
    rule = alarm_rule(extras, "a")
    assert rule.threshold == result.threshold == extras["threshold"]
    np.testing.assert_array_equal(rule.null_scores, extras["calibration_scores"])
    assert result.label == "quantile" and not result.leaks_test_data


def test_reference_reads_train_and_test_scores_and_is_labelled_leaky(setup, tmp_path: Path) -> None:
    url, contract, dataset, trained = setup
    with pytest.raises(ValueError, match="needs warehouse_url"):
        calibrate(trained, dataset, tmp_path / "m.ckpt", method="reference")
    result = calibrate(
        trained,
        dataset,
        tmp_path / "m.ckpt",
        method="reference",
        alpha=0.01,
        warehouse_url=url,
        contract=contract,
    )
    checkpoint = load_checkpoint(trained)
    train = training_range_scores(checkpoint, dataset)
    test = labelled_range_scores(checkpoint, url, contract, dataset.entities)
    assert {e: s.size for e, s in test.items()} == {"a": TEST_ROWS, "b": TEST_ROWS}
    expected = leaky_reference_threshold(
        np.concatenate([*train.values()]), np.concatenate([*test.values()]), 1.0
    )
    assert result.threshold == pytest.approx(expected)
    assert result.leaks_test_data and result.label == "reference (LEAKS TEST DATA)"
    assert load_checkpoint(result.checkpoint).extras["calibration"]["leaks_test_data"] is True


def test_fit_thresholds_pot_per_entity() -> None:
    rng = np.random.default_rng(0)
    held_out = {"a": rng.exponential(1.0, 4000), "b": rng.exponential(3.0, 4000)}
    threshold, per_entity = fit_thresholds("pot", 0.001, held_out, {}, "entity", "src")
    assert threshold == pytest.approx(
        pot_threshold(np.concatenate([held_out["a"], held_out["b"]]), 0.001)
    )
    assert per_entity["a"] == pytest.approx(pot_threshold(held_out["a"], 0.001))
    assert 3 * 0.8 < per_entity["b"] / per_entity["a"] < 3 * 1.25


@pytest.mark.parametrize(
    ("method", "rule"), [("conformal", "cannot support"), ("pot", "pot calibration")]
)
def test_too_few_scores_name_the_entity(method: str, rule: str) -> None:
    held_out = {"a": np.linspace(0, 1, 5000), "tiny": np.linspace(0, 1, 20)}
    with pytest.raises(
        DataContractError, match=f"src entity 'tiny'.*{rule}|{rule}.*src entity 'tiny'"
    ):
        fit_thresholds(method, 0.005, held_out, {}, "entity", "src")


def test_scores_use_the_entity_rule_when_calibrated_per_entity(setup, tmp_path: Path) -> None:
    url, contract, dataset, trained = setup
    result = calibrate(trained, dataset, tmp_path / "m.ckpt", alpha=0.02, scope="entity")
    checkpoint = load_checkpoint(result.checkpoint)
    loaded = LoadedModel("m", 1, "run", checkpoint, checkpoint.extras)
    readings = read_readings(url, contract)
    for entity in ("a", "b"):
        frame = readings[readings["entity"] == entity].reset_index(drop=True)
        rows = score_rows(loaded, entity, frame, WIN)
        own = checkpoint.extras["thresholds"][entity]
        assert (rows["threshold"] == own).all()
        assert (rows["is_anomaly"] == (rows["score"] > own)).all()
        null = np.asarray(checkpoint.extras["entity_calibration_scores"][entity])
        np.testing.assert_allclose(rows["p_value"], p_values(null, rows["score"].to_numpy()))


def test_labelled_rows_before_train_end_are_not_test_data(setup, tmp_path: Path) -> None:
    """With ``train_end`` inside the labelled range (a file labelled throughout), the rows before
    it were trained on: evaluation and the reference's test scores start at ``train_end``."""
    url, contract, dataset, trained = setup
    train_end = pd.Timestamp("2020-01-01") + pd.Timedelta(minutes=TRAIN_ROWS + 50)
    checkpoint = load_checkpoint(trained)
    full = labelled_range_scores(checkpoint, url, contract, ["a"])["a"]
    test = labelled_range_scores(checkpoint, url, contract, ["a"], train_end)["a"]
    np.testing.assert_allclose(test, full[50:], rtol=1e-5)
    calibrated = calibrate(trained, dataset, tmp_path / "m.ckpt", alpha=0.02)
    evaluation = evaluate_model(
        url, contract, calibrated.checkpoint, tmp_path / "plots", train_end=train_end
    )
    labels = np.array([0] * (TEST_ROWS - 60) + [1] * 10)
    expected = evaluate_scores(labels, test, calibrated.threshold)
    assert evaluation.per_entity["a"] == pytest.approx(expected)


def test_false_alarms_of_an_entity_labelled_all_normal_count_in_fpr_normal(
    setup, tmp_path: Path
) -> None:
    """An entity whose test range holds no anomaly has no ranking metrics, but its false alarms
    still belong in ``fpr_normal``: the promotion gate's budget reads it."""
    _, contract, dataset, trained = setup
    url = f"sqlite:///{tmp_path / 'normal.db'}"
    readings = _readings(contract)
    readings.loc[readings["entity"] == "b", "label"] = readings["label"].where(
        readings["label"].isna(), 0
    )
    ensure_schema(get_engine(url), contract)
    upsert_readings(get_engine(url), contract, readings)
    calibrated = calibrate(trained, dataset, tmp_path / "m.ckpt", alpha=0.02)
    evaluation = evaluate_model(url, contract, calibrated.checkpoint, tmp_path / "plots")
    assert set(evaluation.per_entity["a"]) > {"fpr_normal", "vus_pr"}
    assert set(evaluation.per_entity["b"]) == {"fpr_normal"}
    rates = [evaluation.per_entity[e]["fpr_normal"] for e in ("a", "b")]
    assert evaluation.metrics["fpr_normal"] == pytest.approx(np.mean(rates))
    assert evaluation.metrics["vus_pr"] == evaluation.per_entity["a"]["vus_pr"]
