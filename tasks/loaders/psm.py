"""PSM (eBay Pooled Server Metrics): ``train.csv``, ``test.csv``, ``test_label.csv``, first
column ``timestamp_(min)``, 25 features ``feature_0..feature_24``, NaNs in the features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from tasks.errors import IngestError
from tasks.loaders.common import (
    ORIGIN,
    SourceLoad,
    binary_labels,
    labels,
    numeric_columns,
    read_csv_text,
    warehouse_frame,
)

TIME = "timestamp_(min)"
ENTITY = "psm"


def _minutes(frame: pd.DataFrame, path: Path) -> np.ndarray:
    if TIME not in frame.columns:
        raise IngestError(f"{path}: no {TIME!r} column; found {list(frame.columns)[:5]}...")
    minutes = numeric_columns(frame, [TIME], path)[TIME].to_numpy()
    if np.isnan(minutes).any() or (minutes != np.round(minutes)).any():
        raise IngestError(f"{path}: {TIME!r} must hold whole minutes, without gaps in the column")
    return minutes.astype(np.int64)


def _filled(values: pd.DataFrame, notes: list[str]) -> pd.DataFrame:
    """Forward-fill each feature over train then test; leading NaNs take the first value."""
    missing = values.isna()
    if missing.all().any():
        raise IngestError(f"PSM: features without any value: {list(values.columns[missing.all()])}")
    if missing.any().any():
        notes.append(
            f"{ENTITY}: filled {int(missing.sum().sum())} missing values in "
            f"{int(missing.any().sum())} features (last value carried forward; leading "
            "gaps take the first value)"
        )
    return values.ffill().bfill()


def read_psm(root: Path) -> SourceLoad:
    """One entity ``psm``: train rows (label null) then test rows (``test_label.csv``); ``ts`` is
    ``ORIGIN`` plus ``timestamp_(min)`` minutes. Test minutes must follow the train minutes and
    match the label file's minutes row for row."""
    root = Path(root)
    train, test, label = (read_csv_text(root / f"{n}.csv") for n in ("train", "test", "test_label"))
    minutes = [
        _minutes(f, root / f"{n}.csv")
        for f, n in ((train, "train"), (test, "test"), (label, "test_label"))
    ]
    if not np.array_equal(minutes[1], minutes[2]):
        raise IngestError(
            f"{root / 'test_label.csv'}: its {TIME} do not match test.csv row for row"
        )
    if minutes[1].min() <= minutes[0].max():
        raise IngestError(
            f"{root / 'test.csv'}: test minutes start at {minutes[1].min()}, not "
            f"after the last train minute {minutes[0].max()}"
        )
    features = [c for c in train.columns if c != TIME]
    if [c for c in test.columns if c != TIME] != features:
        raise IngestError(f"{root / 'test.csv'}: columns differ from train.csv")
    notes: list[str] = []
    raw = numeric_columns(pd.concat([train, test], ignore_index=True), features, root / "train.csv")
    path = root / "test_label.csv"
    flags = binary_labels(numeric_columns(label, ["label"], path), "label", path)
    ts = pd.Timestamp(ORIGIN) + pd.to_timedelta(np.concatenate(minutes[:2]), unit="min")
    frame = warehouse_frame(
        ENTITY, ts, _filled(raw[features], notes), labels(len(train), flags.to_numpy())
    )
    return SourceLoad(frame, [], notes)
