"""NASA SMAP and MSL in telemanom's layout: ``train/<chan>.npy``, ``test/<chan>.npy`` and
``labeled_anomalies.csv`` (chan_id, spacecraft, anomaly_sequences, class, num_values)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from data_contracts import load_contract
from tasks.errors import IngestError
from tasks.loaders.common import (
    SourceLoad,
    concat,
    labels,
    read_csv_text,
    synthetic_ts,
    warehouse_frame,
)

LABEL_FILE = "labeled_anomalies.csv"
LABEL_COLUMNS = ["chan_id", "spacecraft", "anomaly_sequences", "class", "num_values"]


def _array(path: Path, width: int) -> np.ndarray:
    try:
        values = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise IngestError(f"{path}: not a readable .npy array ({error})") from error
    if values.ndim != 2 or values.shape[1] != width or not np.issubdtype(values.dtype, np.number):
        raise IngestError(
            f"{path}: expected a numeric (rows, {width}) array, got {values.dtype} {values.shape}"
        )
    return values.astype(np.float64)


def _sequences(text: str, test_rows: int, where: str) -> np.ndarray:
    """0/1 per test row from ``[[start, end], ...]`` (0-based, both ends inclusive)."""
    try:
        spans = json.loads(text)
        pairs = [(int(s), int(e)) for s, e in spans]
    except (json.JSONDecodeError, TypeError, ValueError) as error:
        raise IngestError(
            f"{where}: anomaly_sequences {text!r} is not [[start, end], ...]"
        ) from error
    out = np.zeros(test_rows, np.int64)
    for start, end in pairs:
        if not 0 <= start <= end < test_rows:
            raise IngestError(
                f"{where}: sequence [{start}, {end}] outside the {test_rows} test rows"
            )
        out[start : end + 1] = 1
    return out


def _label_rows(root: Path) -> pd.DataFrame:
    path = root / LABEL_FILE
    table = read_csv_text(path, dtype={"chan_id": "str", "spacecraft": "str"})
    missing = [c for c in LABEL_COLUMNS if c not in table.columns]
    if missing:
        raise IngestError(f"{path}: missing columns {missing}")
    blank = table["chan_id"].isna().to_numpy()
    if blank.any():
        rows = ", ".join(str(i + 1) for i in np.flatnonzero(blank)[:5])
        raise IngestError(
            f"{path}: chan_id is blank on {int(blank.sum())} rows; e.g. data row {rows}"
        )
    return table


def _channel(root: Path, row: pd.Series, sensors: list[str], cadence: int) -> pd.DataFrame:
    chan = row["chan_id"]
    train = _array(root / "train" / f"{chan}.npy", len(sensors))
    test = _array(root / "test" / f"{chan}.npy", len(sensors))
    where = f"{root / LABEL_FILE} row {chan!r}"
    if pd.to_numeric(row["num_values"], errors="coerce") != len(test):  # NaN: never equal
        raise IngestError(
            f"{where}: num_values {row['num_values']} but test/{chan}.npy has {len(test)} rows"
        )
    values = pd.DataFrame(np.vstack([train, test]), columns=sensors)
    label = labels(len(train), _sequences(row["anomaly_sequences"], len(test), where))
    return warehouse_frame(chan, synthetic_ts(len(values), cadence), values, label)


def read_telemanom(root: Path, spacecraft: str) -> SourceLoad:
    """The channels of ``spacecraft`` (``SMAP`` or ``MSL``): one entity per channel, train rows
    then test rows, sensors ``value`` and the command flags of the bundled contract. A channel
    listed more than once, with data but no label row, or with a label row but no data is
    skipped and reported."""
    root = Path(root)
    contract = load_contract(spacecraft.lower())
    table = _label_rows(root)
    counts = table["chan_id"].value_counts()
    have_data = {p.stem for p in (root / "train").glob("*.npy")} & {
        p.stem for p in (root / "test").glob("*.npy")
    }
    skipped = [
        f"{c}: data but no row in {LABEL_FILE}" for c in sorted(have_data - set(counts.index))
    ]
    frames = []
    for _, row in table[table["spacecraft"].str.upper() == spacecraft.upper()].iterrows():
        chan = row["chan_id"]
        if counts[chan] > 1:
            skipped.append(f"{chan}: listed {counts[chan]} times in {LABEL_FILE}")
        elif chan not in have_data:
            skipped.append(f"{chan}: in {LABEL_FILE} but no train/ and test/ .npy files")
        else:
            frames.append(
                _channel(root, row, contract.sensor_names, contract.cadence_seconds or 60)
            )
    return SourceLoad(concat(frames, root), sorted(set(skipped)))


def read_smap(root: Path) -> SourceLoad:
    """SMAP channels of a telemanom folder."""
    return read_telemanom(root, "SMAP")


def read_msl(root: Path) -> SourceLoad:
    """MSL channels of a telemanom folder."""
    return read_telemanom(root, "MSL")
