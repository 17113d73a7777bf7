"""Which column of a user's file is what, for drafting its contract: timestamp, label, entity
and a long layout's sensor and value columns; refusals, with examples, for columns a draft would
get wrong (a label that is not 0/1, a sensor with values that are not numbers, mixed time zones).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from tasks.errors import IngestError
from tasks.ingest import decimal_comma_hint, row_examples

TIMESTAMP_NAMES = ("ts", "timestamp", "time", "datetime", "date", "timestamp_(min)")
ENTITY_NAMES = ("entity", "machine", "device", "asset", "unit", "host", "id", "series", "channel")
LABEL_NAMES = ("label", "anomaly", "is_anomaly", "attack", "target")
SENSOR_NAMES = ("sensor", "metric", "signal", "variable", "tag", "name", "measurement")
VALUE_NAMES = ("value", "reading", "val", "measurement_value")


def is_text(series: pd.Series) -> bool:
    """Neither numbers, booleans nor datetimes."""
    return not (
        pd.api.types.is_numeric_dtype(series)
        or pd.api.types.is_bool_dtype(series)
        or pd.api.types.is_datetime64_any_dtype(series)
    )


def _parses_as_time(series: pd.Series) -> bool:
    if pd.api.types.is_datetime64_any_dtype(series):
        return True
    if not is_text(series):
        return False
    sample = series.dropna().astype(str).head(200)
    parsed = pd.to_datetime(sample, format="ISO8601", errors="coerce", utc=True)
    return len(sample) > 0 and parsed.notna().mean() >= 0.95


def _pick(frame: pd.DataFrame, names: tuple[str, ...], fits: Any, taken: set[str]) -> str | None:
    """The first column not taken that ``fits``: preferred names first, sensor-like names last."""

    def rank(column: Any) -> int:
        name = str(column).strip().lower()
        return 0 if name in names else 2 if name in SENSOR_NAMES else 1

    columns = sorted((c for c in frame.columns if c not in taken), key=rank)
    return next((c for c in columns if fits(frame[c])), None)


def _binary(series: pd.Series) -> bool:
    """Only 0, 1 and blanks (a column of blanks too: no row labelled yet)."""
    return set(pd.to_numeric(series.dropna(), errors="coerce").unique().tolist()) <= {0, 1}


def _is_label(series: pd.Series) -> bool:
    return str(series.name).strip().lower() in LABEL_NAMES and _binary(series)


def _number_share(series: pd.Series) -> float:
    """The share of non-blank values that read as numbers, with '.' or with ',' as decimal mark."""
    values = series.dropna().astype(str).str.strip()
    values = values[values != ""]
    if values.empty:
        return 0.0
    dot = pd.to_numeric(values, errors="coerce").notna().mean()
    comma = pd.to_numeric(values.str.replace(",", ".", regex=False), errors="coerce").notna()
    return float(max(dot, comma.mean()))


def _is_entity(series: pd.Series) -> bool:
    """Text that is not mostly numbers; under an entity-like name, text or whole numbers."""
    named = str(series.name).strip().lower() in ENTITY_NAMES
    if named and pd.api.types.is_integer_dtype(series):
        return True
    return is_text(series) and (named or _number_share(series) <= 0.5)


def refuse_bad_columns(frame: pd.DataFrame, columns: dict[str, Any], path: Path) -> None:
    """IngestError for a blank entity, a label column that is not 0/1 and a text column that is
    mostly numbers (a sensor with some values that are not: drafting would silently drop it)."""
    taken = {v for v in columns.values() if v is not None}
    entity = frame[columns["entity_column"]]
    blank = entity.isna() | (entity.astype(str).str.strip() == "")
    if blank.any():
        raise IngestError(
            f"{path}: entity column {entity.name!r} is blank in {int(blank.sum())} of "
            f"{len(entity)} rows; e.g. {row_examples(entity.fillna(''), blank)}; every row needs "
            "the name of its series (machine, device, ...)"
        )
    label = columns["label_column"]
    named = [c for c in frame.columns if str(c).strip().lower() in LABEL_NAMES and c not in taken]
    what = "label column" if label is not None else "column named like a label"
    for column in [label] if label is not None else named:
        values = pd.to_numeric(frame[column], errors="coerce")
        bad = frame[column].notna() & ~values.isin([0, 1])
        if bad.any():
            raise IngestError(
                f"{path}: {what} {column!r} holds values other than 0, 1 and blank: "
                f"{int(bad.sum())}; e.g. {row_examples(frame[column], bad)}; write labels as "
                "0/1 (blank: unlabelled), or rename the column if it is a sensor"
            )
    if columns.get("sensor_column") is not None:
        return  # the long layout's values are checked by to_wide
    for column in [c for c in frame.columns if c not in taken and is_text(frame[c])]:
        if _number_share(frame[column]) <= 0.5:
            continue
        values = frame[column].astype("str").str.strip()
        bad = frame[column].notna() & pd.to_numeric(values, errors="coerce").isna()
        if not bad.any():
            raise IngestError(
                f"{path}: column {column!r} holds numbers as text ({frame[column].dtype}); "
                "store them as numbers"
            )
        raise IngestError(
            f"{path}: column {column!r} holds numbers, but values that are not numbers"
            f"{decimal_comma_hint(values[bad])}: {int(bad.sum())}; e.g. "
            f"{row_examples(frame[column], bad)}; correct or "
            "blank them (blank: missing), or drop the column if it is not a sensor"
        )


def detect_columns(
    frame: pd.DataFrame, given: dict[str, str | None], why: list[str], path: Path
) -> dict[str, str | None]:
    """Timestamp, label, entity and (long layout) sensor/value columns, given or detected."""
    found = dict(given)
    detectors = [
        (
            "timestamp_column",
            TIMESTAMP_NAMES,
            _parses_as_time,
            "its values parse as ISO 8601 times",
        ),
        ("label_column", LABEL_NAMES, _is_label, "it is named like a label and holds only 0/1"),
        ("entity_column", ENTITY_NAMES, _is_entity, "it names the series"),
    ]
    for key, names, fits, reason in detectors:
        taken = {v for v in found.values() if v is not None}
        if found.get(key) is not None:
            why.append(f"{key}: {found[key]!r} (given)")
            continue
        found[key] = _pick(frame, names, fits, taken)
        if found[key] is not None:
            why.append(f"{key}: {found[key]!r} because {reason}")
    if found["timestamp_column"] is None:
        named = [c for c in frame.columns if str(c).strip().lower() in TIMESTAMP_NAMES]
        shown = f" ({named[0]!r} holds e.g. {frame[named[0]].iloc[0]!r})" if named else ""
        raise IngestError(
            f"{path}: no timestamp column found among {list(frame.columns)}{shown}; name it "
            "explicitly (its values must be ISO 8601, e.g. 2024-01-31T13:05:00)"
        )
    if found["entity_column"] is None:
        raise IngestError(
            f"{path}: no entity column found among {list(frame.columns)}; name it "
            "explicitly, or add a text column naming the series of each row"
        )
    taken = {v for v in found.values() if v is not None}
    rest = [c for c in frame.columns if c not in taken]
    text = [c for c in rest if is_text(frame[c])]
    numbers = [c for c in rest if not is_text(frame[c])]
    keys = [found["entity_column"], found["timestamp_column"]]
    if found.get("sensor_column") or (
        len(text) == 1
        and len(numbers) == 1
        and frame.duplicated(keys).any()
        and not frame.duplicated([*keys, text[0]]).any()
    ):
        found["sensor_column"] = found.get("sensor_column") or text[0]
        found["value_column"] = found.get("value_column") or numbers[0]
        why.append(
            f"layout: long, because (entity, ts) repeat once per sensor: sensor names in "
            f"{found['sensor_column']!r}, values in {found['value_column']!r}"
        )
    elif found.get("value_column") is not None:
        raise IngestError(
            f"{path}: value column {found['value_column']!r} given, but no column naming the "
            "sensor of each row was found; name it too (sensor column), or neither (wide file)"
        )
    return found


def parse_times(values: pd.Series, path: Path) -> tuple[pd.Series, bool]:
    """Timestamps (UTC when they carry offsets) and whether they do; IngestError with examples
    for values that are not ISO 8601 and for offsets beside none (several offsets are fine:
    an ``aware`` contract converts each to UTC)."""
    where = f"{path}: timestamp column {values.name!r}"
    if pd.api.types.is_datetime64_any_dtype(values):
        return values, isinstance(values.dtype, pd.DatetimeTZDtype)
    if not is_text(values):
        raise IngestError(f"{where} holds {values.dtype} values, not ISO 8601 timestamps")
    parsed = pd.to_datetime(values, format="ISO8601", utc=True, errors="coerce")
    bad = values.notna() & parsed.isna()
    if bad.any():
        raise IngestError(
            f"{where}: values that are not ISO 8601 timestamps: {int(bad.sum())}; "
            f"e.g. {row_examples(values, bad)}"
        )
    try:
        single = pd.to_datetime(values, format="ISO8601")
    except (ValueError, TypeError):  # several offsets, or offsets beside none
        present = values.dropna()
        aware = present.map(lambda v: pd.Timestamp(v).tzinfo is not None).astype(bool)
        if not aware.all():
            fewer = values.index.isin(
                present.index[aware if aware.sum() < (~aware).sum() else ~aware]
            )
            raise IngestError(
                f"{where}: {int((~aware).sum())} timestamps carry no UTC offset beside "
                f"{int(aware.sum())} that do, e.g. {row_examples(values, fewer)}; "
                "give every timestamp an offset, or none"
            ) from None
        return parsed, True
    return parsed, isinstance(single.dtype, pd.DatetimeTZDtype)
