"""SKAB: ``;``-separated CSVs with a ``datetime`` column, 8 sensors, ``anomaly`` and
``changepoint``; ``anomaly-free/`` holds a normal run without label columns."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from tasks.errors import IngestError
from tasks.loaders.common import (
    SourceLoad,
    binary_labels,
    concat,
    iso_timestamps,
    labels,
    numeric_columns,
    read_csv_text,
    read_each,
)

SENSORS = {
    "Accelerometer1RMS": "accelerometer1rms",
    "Accelerometer2RMS": "accelerometer2rms",
    "Current": "current",
    "Pressure": "pressure",
    "Temperature": "temperature",
    "Thermocouple": "thermocouple",
    "Voltage": "voltage",
    "Volume Flow RateRMS": "volume_flow_rate_rms",
}
TRAIN_ROWS = 400  # the leading rows of each labelled run are normal operation (SKAB protocol)


def _read_run(
    path: Path, entity: str, labelled: bool, train_rows: int, notes: list[str]
) -> pd.DataFrame:
    raw = read_csv_text(path, sep=";", dtype={"datetime": "str"})
    expected = ["datetime", *SENSORS, *(["anomaly", "changepoint"] if labelled else [])]
    if sorted(raw.columns) != sorted(expected):
        raise IngestError(f"{path}: expected columns {expected}, got {list(raw.columns)}")
    frame = numeric_columns(raw, [*SENSORS, *(["anomaly"] if labelled else [])], path)
    ts = iso_timestamps(frame, "datetime", path)
    out = frame[list(SENSORS)].rename(columns=SENSORS)
    out.insert(0, "entity", pd.Series(entity, index=out.index, dtype="str"))
    out.insert(1, "ts", ts)
    if not labelled:
        out["label"] = labels(len(out), [])
        return out
    anomaly = binary_labels(frame, "anomaly", path)
    head = min(train_rows, len(out))
    if anomaly.iloc[:head].any():
        head = int(anomaly.to_numpy().argmax())
        notes.append(
            f"{entity}: an anomaly starts inside the first {train_rows} rows; training "
            f"range cut to its first {head} rows"
        )
    out["label"] = labels(head, anomaly.iloc[head:].to_numpy())
    return out


def _entity(path: Path) -> str:
    return f"{path.parent.name}/{path.stem}"


def read_skab(root: Path, *, train_rows: int = TRAIN_ROWS) -> SourceLoad:
    """Each run (file) is an entity ``<folder>/<stem>``, since runs overlap in time. The
    anomaly-free run is all training range; a labelled run's first ``train_rows`` rows are its
    training range (label null; cut short before an anomaly inside it), the rest carry
    ``anomaly``; ``changepoint`` is not loaded. A run without data rows is skipped and
    reported."""
    root = Path(root)
    if (root / "data").is_dir():
        root = root / "data"
    notes: list[str] = []
    frames, skipped = read_each(
        sorted(root.glob("*/*.csv")),
        lambda p: _read_run(p, _entity(p), p.parent.name != "anomaly-free", train_rows, notes),
        _entity,
    )
    return SourceLoad(concat(frames, root), skipped, notes)
