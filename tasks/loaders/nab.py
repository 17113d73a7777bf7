"""NAB: ``data/<group>/<name>.csv`` (timestamp,value) and ``labels/combined_windows.json``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.errors import IngestError
from tasks.ingest import read_text
from tasks.loaders.common import (
    SourceLoad,
    concat,
    iso_timestamps,
    labels,
    numeric_columns,
    read_csv_text,
    read_each,
)

PROBATION = 0.15  # NAB's probationary period: the first 15 % of each file is not scored


def _windows(root: Path) -> dict[str, list[tuple[pd.Timestamp, pd.Timestamp]]]:
    path = root / "labels" / "combined_windows.json"
    try:
        raw = json.loads(read_text(path))
        return {
            key: [(pd.Timestamp(s), pd.Timestamp(e)) for s, e in spans]
            for key, spans in raw.items()
        }
    except (json.JSONDecodeError, ValueError, TypeError, AttributeError) as error:
        raise IngestError(
            f"{path}: not a mapping of file -> [[start, end], ...] ({error})"
        ) from error


def _advancing(frame: pd.DataFrame) -> np.ndarray:
    """Rows whose timestamp is later than every row before them (drops DST repeats)."""
    ns = frame["ts"].to_numpy("datetime64[ns]").astype(np.int64)
    earlier_max = np.maximum.accumulate(np.concatenate([[np.iinfo(np.int64).min], ns[:-1]]))
    return ns > earlier_max


def _read_series(
    path: Path, key: str, spans: list[tuple[pd.Timestamp, pd.Timestamp]], notes: list[str]
) -> pd.DataFrame:
    raw = read_csv_text(path, dtype={"timestamp": "str"})
    if list(raw.columns) != ["timestamp", "value"]:
        raise IngestError(
            f"{path}: expected columns ['timestamp', 'value'], got {list(raw.columns)}"
        )
    frame = numeric_columns(raw, ["value"], path)
    frame["ts"] = iso_timestamps(frame, "timestamp", path)
    frame = frame.drop(columns="timestamp")
    keep = _advancing(frame)
    if not keep.all():
        notes.append(f"{key}: dropped {int((~keep).sum())} rows whose timestamp does not advance")
    frame = frame[keep].reset_index(drop=True)
    inside = np.zeros(len(frame), bool)
    for start, end in spans:
        inside |= ((frame["ts"] >= start) & (frame["ts"] <= end)).to_numpy()
    train = int(len(frame) * PROBATION)
    if inside[:train].any():
        train = int(np.argmax(inside))
        notes.append(
            f"{key}: a window starts inside the probationary period; training range "
            f"cut to its first {train} rows"
        )
    frame.insert(0, "entity", pd.Series(key.removesuffix(".csv"), index=frame.index, dtype="str"))
    frame["label"] = labels(train, inside[train:].astype(np.int64))
    return frame[["entity", "ts", "value", "label"]]


def _key(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


def read_nab(root: Path) -> SourceLoad:
    """Every NAB series as entity ``<group>/<name>``; label null in the probationary period
    (cut short before any window inside it), 1 inside a window (ends inclusive), else 0.
    A CSV without an entry in the windows file or without data rows is skipped and reported."""
    root = Path(root)
    windows = _windows(root)
    paths = sorted((root / "data").glob("*/*.csv"))
    skipped = [
        f"{_key(p)}: no entry in labels/combined_windows.json"
        for p in paths
        if _key(p) not in windows
    ]
    notes: list[str] = []
    frames, empty = read_each(
        [p for p in paths if _key(p) in windows],
        lambda p: _read_series(p, _key(p), windows[_key(p)], notes),
        _key,
    )
    return SourceLoad(concat(frames, root), sorted(skipped + empty), notes)
