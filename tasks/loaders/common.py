"""What every benchmark loader returns, and the small helpers they share."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.errors import IngestError, NoDataError
from tasks.ingest import decimal_comma_hint, header_names, read_text, row_examples

ORIGIN = datetime(2020, 1, 1)  # naive UTC start of series that carry no timestamps


@dataclass(frozen=True)
class SourceLoad:
    """Rows in warehouse form (``entity, ts, sensors..., label``), what was skipped and why,
    and notes on quirks repaired (rows dropped, values filled)."""

    frame: pd.DataFrame
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def read_csv_text(path: Path, text: str | None = None, **options: object) -> pd.DataFrame:
    """A CSV file (or ``text`` read from it) whose lines all have the header's width;
    pandas errors become IngestError naming the file, no data rows NoDataError."""
    text = read_text(path) if text is None else text
    names = header_names(path, text, str(options.get("sep", ",")))
    try:
        columns = range(len(names))  # less a last column that every line leaves empty
        frame = pd.read_csv(io.StringIO(text), usecols=columns, **options)  # type: ignore[arg-type]
    except ValueError as error:
        raise IngestError(f"{path}: {error}") from error
    if frame.empty:
        raise NoDataError(f"{path}: no data rows")
    return frame


def read_each(
    paths: list[Path], read: Callable[[Path], pd.DataFrame], key: Callable[[Path], str]
) -> tuple[list[pd.DataFrame], list[str]]:
    """``read`` of every path, and ``"<key>: no data rows"`` for each file that has none (empty,
    blank or only a header): such a file is skipped and reported, not loaded as nothing."""
    frames, skipped = [], []
    for path in paths:
        try:
            frames.append(read(path))
        except NoDataError:
            skipped.append(f"{key(path)}: no data rows")
    return frames, skipped


def numeric_columns(frame: pd.DataFrame, columns: list[str], path: Path) -> pd.DataFrame:
    """``columns`` as float64; IngestError with the first offending line and value otherwise."""
    out = frame.copy()
    for column in columns:
        values = pd.to_numeric(out[column], errors="coerce")
        bad = out[column].notna() & values.isna()
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise IngestError(
                f"{path}: column {column!r}, data row {row + 1} is not a number: "
                f"{out[column].iat[row]!r} ({int(bad.sum())} such values)"
                f"{decimal_comma_hint(out[column][bad])}"
            )
        out[column] = values.astype("float64")
    return out


def binary_labels(frame: pd.DataFrame, column: str, path: Path) -> pd.Series:
    """``column`` when it holds only 0 and 1; IngestError with the count of other values (blanks
    included) and examples with their data row otherwise."""
    values = frame[column]
    bad = ~values.isin([0, 1])
    if bad.any():
        raise IngestError(
            f"{path}: column {column!r} holds values other than 0/1: {int(bad.sum())}; "
            f"e.g. {row_examples(values, bad)}"
        )
    return values


def iso_timestamps(frame: pd.DataFrame, column: str, path: Path) -> pd.Series:
    """``column`` (ISO 8601 text, one time zone) as datetime64[us]; IngestError with the first
    offending line and value otherwise (blank, not ISO 8601, or offsets that differ)."""
    values = frame[column]
    try:
        parsed = pd.to_datetime(values, format="ISO8601", errors="coerce")
    except ValueError:  # offsets beside none, or several offsets
        offsets = values.map(_utc_offset)
        row = int(np.argmax((offsets != offsets.iat[0]).to_numpy(bool)))
        raise IngestError(
            f"{path}: column {column!r}, data row {row + 1} has another UTC offset than data "
            f"row 1: {values.iat[row]!r} after {values.iat[0]!r}"
        ) from None
    bad = parsed.isna().to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise IngestError(
            f"{path}: column {column!r}, data row {row + 1} is not an ISO 8601 timestamp: "
            f"{values.iat[row]!r} ({int(bad.sum())} such values)"
        )
    return parsed.dt.as_unit("us")


def _utc_offset(value: object) -> str:
    try:
        return str(pd.Timestamp(value).utcoffset())  # type: ignore[arg-type]
    except (ValueError, TypeError):
        return "unreadable"


def synthetic_ts(rows: int, cadence_seconds: int) -> pd.DatetimeIndex:
    """``rows`` timestamps from ``ORIGIN``, one every ``cadence_seconds`` (for unstamped series)."""
    return pd.date_range(ORIGIN, periods=rows, freq=f"{cadence_seconds}s", unit="us")


def labels(unlabelled: int, values: np.ndarray) -> pd.arrays.IntegerArray:
    """Null for the first ``unlabelled`` rows (the training range), then the 0/1 ``values``."""
    data = np.concatenate([np.zeros(unlabelled, np.int64), np.asarray(values, np.int64)])
    return pd.arrays.IntegerArray(data, np.arange(data.size) < unlabelled)


def warehouse_frame(
    entity: str,
    ts: pd.Series | pd.DatetimeIndex,
    values: pd.DataFrame,
    label: pd.arrays.IntegerArray,
) -> pd.DataFrame:
    """``entity, ts, <values columns>, label`` for one entity."""
    frame = values.reset_index(drop=True).astype("float64")
    frame.insert(0, "entity", pd.Series(entity, index=frame.index, dtype="str"))
    frame.insert(1, "ts", pd.Series(pd.DatetimeIndex(ts).as_unit("us"), index=frame.index))
    frame["label"] = label
    return frame


def concat(frames: list[pd.DataFrame], root: Path) -> pd.DataFrame:
    """All entities as one frame; IngestError when there is none."""
    if not frames:
        raise IngestError(f"{root}: no series found to load")
    return pd.concat(frames, ignore_index=True)
