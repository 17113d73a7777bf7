"""The training range and its fit/validation split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data_contracts import load_contract
from tasks.errors import DataContractError
from tasks.warehouse import ensure_schema, get_engine, upsert_readings
from tasks.windowing import build_dataset, split_entity, training_range


def _frame() -> pd.DataFrame:
    ts = pd.date_range("2020-01-01", periods=6, freq="min")
    return pd.DataFrame(
        {
            "entity": ["a"] * 6 + ["b"] * 6,
            "ts": list(ts) * 2,
            "label": [np.nan, np.nan, np.nan, 0, 1, 0] + [np.nan] * 6,
        }
    )


def test_training_range_stops_at_first_labelled_row_per_entity() -> None:
    kept = training_range(_frame(), load_contract("smd"), train_end=None)
    assert (kept["entity"] == "a").sum() == 3
    assert (kept["entity"] == "b").sum() == 6
    assert kept["label"].isna().all()


def test_training_range_with_explicit_end_ignores_labels() -> None:
    kept = training_range(
        _frame(), load_contract("smd"), train_end=pd.Timestamp("2020-01-01 00:02")
    )
    assert kept.groupby("entity").size().to_dict() == {"a": 2, "b": 2}


@pytest.mark.parametrize(
    ("rows", "fraction", "win", "expected"),
    [(1000, 0.2, 100, (800, 200)), (300, 0.1, 100, (200, 100)), (500, 0.0, 100, (500, 0))],
)
def test_split_keeps_a_full_validation_window(
    rows: int, fraction: float, win: int, expected: tuple[int, int]
) -> None:
    assert split_entity(rows, fraction, win) == expected


def _labelled_from_row_0(folder: Path, entities: dict[str, float | None]) -> str:
    """A warehouse of 60-row entities, each labelled from its first row with the given label."""
    folder.mkdir(parents=True, exist_ok=True)
    contract = load_contract("smd")
    frames = []
    for entity, label in entities.items():
        sensors = contract.sensor_names
        frame = pd.DataFrame(np.full((60, len(sensors)), 0.5), columns=sensors)
        frame.insert(0, "ts", pd.date_range("2020-01-01", periods=60, freq="min"))
        frame.insert(0, "entity", entity)
        frame["label"] = label
        frames.append(frame)
    url = f"sqlite:///{folder / 'w.db'}"
    ensure_schema(get_engine(url), contract)
    upsert_readings(get_engine(url), contract, pd.concat(frames, ignore_index=True))
    return url


def test_an_entity_labelled_from_its_first_row_is_named_as_skipped(tmp_path: Path) -> None:
    url = _labelled_from_row_0(tmp_path, {"all-labelled": 0, "fine": None})
    contract = load_contract("smd")
    dataset = build_dataset(url, contract, tmp_path / "ds", win_size=10, val_fraction=0.2)
    assert dataset.entities == ["fine"]
    assert dataset.skipped == (
        "all-labelled: no training rows (none before its first labelled row)",
    )
    only = _labelled_from_row_0(tmp_path / "only", {"all-labelled": 0})
    with pytest.raises(DataContractError, match="entities: \\['all-labelled: no training rows"):
        build_dataset(only, contract, tmp_path / "ds2", win_size=10, val_fraction=0.2)
