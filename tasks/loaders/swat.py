"""SWaT-style CSV: a leading timestamp column, one column per sensor or actuator, and a label
column ``Normal/Attack``; files named ``*normal*`` hold the normal run (the training range)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from tasks.contract_infer import sensor_identifier
from tasks.errors import IngestError
from tasks.ingest import read_text
from tasks.loaders.common import SourceLoad, concat, labels, read_csv_text, read_each

LABEL = "normal/attack"
ENTITY = "swat"
DAY_FIRST = "%d/%m/%Y %I:%M:%S %p"  # '28/12/2015 10:00:00 AM', as SWaT publishes


def _table(path: Path) -> pd.DataFrame:
    """The CSV from its header line on (the published sheets may carry a line above it)."""
    lines = read_text(path).splitlines()
    header = next((i for i, line in enumerate(lines[:5]) if LABEL in line.lower()), None)
    if header is None:
        raise IngestError(f"{path}: no 'Normal/Attack' column in the first 5 lines")
    table = "\n".join(lines[header:])
    return read_csv_text(path, table, dtype="str", skipinitialspace=True)


def _timestamps(text: pd.Series, path: Path) -> pd.Series:
    text = text.str.strip()
    for fmt in (DAY_FIRST, "ISO8601"):
        parsed = pd.to_datetime(text, format=fmt, errors="coerce")
        if parsed.notna().all():
            return parsed.dt.as_unit("us")
    bad = text[pd.to_datetime(text, format="ISO8601", errors="coerce").isna()]
    raise IngestError(
        f"{path}: timestamps neither '{DAY_FIRST}' nor ISO 8601, e.g. {bad.head(3).tolist()}"
    )


def _read_file(path: Path) -> pd.DataFrame:
    raw = _table(path)
    raw.columns = [str(c).strip() for c in raw.columns]
    label_column = next(c for c in raw.columns if c.lower() == LABEL)
    flags = raw.pop(label_column).str.replace(" ", "").str.lower()  # SWaT 2015 has 'A ttack'
    unknown = flags[~flags.isin(["normal", "attack"])]
    if len(unknown):
        raise IngestError(
            f"{path}: labels other than Normal/Attack, e.g. {unknown.head(3).tolist()}"
        )
    ts = _timestamps(raw.pop(raw.columns[0]), path)
    sensors = raw.rename(columns=sensor_identifier).apply(pd.to_numeric, errors="coerce")
    text = raw.notna().to_numpy() & sensors.isna().to_numpy()
    if text.any():
        row, col = (int(i[0]) for i in text.nonzero())
        raise IngestError(
            f"{path}: column {raw.columns[col]!r}, data row {row + 1} is not a number:"
            f" {raw.iat[row, col]!r}"
        )
    attack = (flags == "attack").astype("int64").to_numpy()
    normal_run = "normal" in path.name.lower()
    if normal_run and attack.any():
        raise IngestError(f"{path}: a normal-run file holds {int(attack.sum())} Attack rows")
    frame = sensors.astype("float64")
    frame.insert(0, "entity", pd.Series(ENTITY, index=frame.index, dtype="str"))
    frame.insert(1, "ts", ts)
    frame["label"] = labels(len(frame), []) if normal_run else labels(0, attack)
    return frame


def read_swat(root: Path) -> SourceLoad:
    """One entity ``swat``: the ``*normal*`` CSVs first (label null), then the others (Attack = 1,
    Normal = 0). Columns become identifiers (``FIT101`` -> ``fit101``); the contract checks them.
    A file without data rows is skipped and reported."""
    root = Path(root)
    paths = [root] if root.is_file() else sorted(root.glob("*.csv"))
    paths.sort(key=lambda p: "normal" not in p.name.lower())
    frames, skipped = read_each(paths, _read_file, lambda p: p.name)
    return SourceLoad(concat(frames, root), skipped)
