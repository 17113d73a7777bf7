"""The training range and its fit/validation split."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from data_contracts import load_contract
from tasks.windowing import split_entity, training_range


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
