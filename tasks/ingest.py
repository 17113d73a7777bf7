"""Read source files faithfully: SMD in its published layout, and generic CSV or Parquet files.

Every reader reads and checks everything before it returns, so a bad file loads nothing; errors are
IngestError naming the file and, where there is one, the line and an example.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import re
import zlib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from data_contracts.contract import Contract, load_contract
from tasks.errors import PERMANENT_OS_ERRORS, IngestError, NoDataError

SMD_ORIGIN = datetime(2020, 1, 1)  # naive UTC; SMD has no timestamps, so rows count from here
SMD_PARTS = ("train", "test", "test_label")
_SMD_FILE = re.compile(r"(machine-\d+-\d+)\.txt(\.gz)?")
_NUMBER = re.compile(r"\s*[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?\s*")
_DECIMAL_COMMA = r"\s*[-+]?\d*,\d+\s*"
_GZIP_MAGIC = b"\x1f\x8b"
_PARQUET_MAGIC = b"PAR1"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
EXAMPLES = 5  # offending values an error message shows
MISSING_TEXT = (  # what pandas reads as missing by default (``read_csv``'s ``na_values``)
    *("", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND"),
    *("1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"),
)


@dataclass(frozen=True)
class SmdLoad:
    """All machines with data as one frame (warehouse columns), machines skipped, files read."""

    frame: pd.DataFrame
    skipped: list[str]
    files: list[Path]


def row_examples(series: pd.Series, mask: Any) -> str:
    """Up to ``EXAMPLES`` values of ``series`` where ``mask`` holds, with their data row (1-based
    position of a frame read from a file: its index)."""
    shown = series[mask].head(EXAMPLES)
    return ", ".join(f"data row {int(i) + 1}: {v!r}" for i, v in shown.items())


def decimal_comma_hint(values: pd.Series) -> str:
    """`` (decimal commas: write 1.5, not 1,5)`` when every one of ``values`` (those that are
    not numbers) is a number written with a decimal comma; else ``""``."""
    text = values.dropna().astype("str")
    commas = len(text) > 0 and bool(text.str.fullmatch(_DECIMAL_COMMA).all())
    return " (decimal commas: write 1.5, not 1,5)" if commas else ""


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, for the ingest log."""
    with Path(path).open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def read_text(path: Path) -> str:
    """The decoded text of a plain or gzip file; refuses a file that is not what its name says."""
    try:
        raw = path.read_bytes()
    except PERMANENT_OS_ERRORS as error:
        raise IngestError(f"{path}: cannot be read ({error.strerror})") from error
    if path.suffix == ".gz":
        if not raw.startswith(_GZIP_MAGIC):
            raise IngestError(f"{path}: named .gz but is not gzip data")
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as error:
            raise IngestError(f"{path}: truncated or corrupt gzip data ({error})") from error
    elif raw.startswith(_GZIP_MAGIC):
        raise IngestError(f"{path}: gzip data in a file not named .gz")
    if raw.startswith(_UTF16_BOMS):
        raise IngestError(f"{path}: UTF-16 text; save it as UTF-8")
    if raw.startswith(_PARQUET_MAGIC) or b"\x00" in raw[:65536]:
        raise IngestError(f"{path}: binary data, not text")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise IngestError(f"{path}: not UTF-8 text (byte {error.start})") from error
    if not text.strip():
        raise NoDataError(f"{path}: empty file")
    return text


def read_number_rows(path: Path, width: int) -> np.ndarray:
    """A headerless comma-separated file of exactly ``width`` numbers per line, as float64;
    blank lines at the end are ignored, any other line of another width is refused."""
    text = read_text(path).rstrip()
    lines = text.splitlines()
    for number, line in enumerate(lines, start=1):
        if line.count(",") != width - 1:
            raise IngestError(
                f"{path}: line {number} has {line.count(',') + 1} values, expected "
                f"{width}: {line[:80]!r}"
            )
    try:
        frame = pd.read_csv(io.StringIO(text), header=None, dtype=np.float64, na_filter=False)
    except ValueError as error:
        raise _not_a_number(path, lines, error) from error
    return frame.to_numpy()


def _not_a_number(path: Path, lines: list[str], error: ValueError) -> IngestError:
    for number, line in enumerate(lines, start=1):
        for column, token in enumerate(line.split(","), start=1):
            if not _NUMBER.fullmatch(token):
                return IngestError(
                    f"{path}: line {number}, value {column} is not a number: {token[:40]!r}"
                )
    return IngestError(f"{path}: {error}")


def read_label_lines(path: Path) -> np.ndarray:
    """One 0/1 label per line (blank lines at the end are ignored)."""
    lines = read_text(path).rstrip().splitlines()
    for number, line in enumerate(lines, start=1):
        if line.strip() not in ("0", "1"):
            raise IngestError(f"{path}: line {number} is not a 0/1 label: {line[:40]!r}")
    return np.array([int(line) for line in lines], dtype=np.int64)


def _smd_files(root: Path) -> dict[str, dict[str, Path]]:
    """Machine name -> {part: file} for the parts present under ``root``."""
    if (root / "ServerMachineDataset").is_dir():
        root = root / "ServerMachineDataset"
    missing = [part for part in SMD_PARTS if not (root / part).is_dir()]
    if missing:
        raise IngestError(f"{root}: not the SMD layout, missing folders {missing}")
    machines: dict[str, dict[str, Path]] = {}
    for part in SMD_PARTS:
        for path in sorted((root / part).glob("machine-*")):
            match = _SMD_FILE.fullmatch(path.name)
            if match is None:
                raise IngestError(f"{path}: expected machine-<g>-<i>.txt or .txt.gz")
            if part in machines.setdefault(match[1], {}):
                raise IngestError(f"{path}: {part} holds both .txt and .txt.gz for {match[1]}")
            machines[match[1]][part] = path
    return machines


def _read_machine(
    name: str, files: dict[str, Path], sensors: list[str], cadence: int
) -> pd.DataFrame:
    """Train rows then test rows as one series; label null on train rows, 0/1 on test rows."""
    train = read_number_rows(files["train"], len(sensors))
    test = read_number_rows(files["test"], len(sensors))
    labels = read_label_lines(files["test_label"])
    if len(labels) != len(test):
        raise IngestError(
            f"{files['test_label']}: {len(labels)} labels, but {files['test']} has {len(test)} rows"
        )
    frame = pd.DataFrame(np.vstack([train, test]), columns=sensors)
    frame.insert(0, "entity", pd.Series(name, index=frame.index, dtype="str"))
    frame.insert(
        1, "ts", pd.date_range(SMD_ORIGIN, periods=len(frame), freq=f"{cadence}s", unit="us")
    )
    unlabelled = np.arange(len(frame)) < len(train)
    values = np.concatenate([np.zeros(len(train), np.int64), labels])
    frame["label"] = pd.arrays.IntegerArray(values, unlabelled)
    return frame


def read_smd(root: Path) -> SmdLoad:
    """Read SMD's published layout ``root/{train,test,test_label}/machine-*.txt[.gz]``.

    ``root`` may also be the folder that holds ``ServerMachineDataset/``. Each machine's train
    rows then test rows form one series, one row per ``cadence_seconds`` of the smd contract from
    ``SMD_ORIGIN``, with columns ``entity, ts, m01..m38, label``. A machine with labels but no data
    is listed in ``skipped``; any other incomplete machine or bad file raises IngestError.
    """
    contract = load_contract("smd")
    if contract.cadence_seconds is None:
        raise ValueError("the smd contract must set cadence_seconds")
    frames: list[pd.DataFrame] = []
    skipped: list[str] = []
    files: list[Path] = []
    for name, parts in sorted(_smd_files(Path(root)).items()):
        if set(parts) == {"test_label"}:
            skipped.append(name)
            continue
        absent = [part for part in SMD_PARTS if part not in parts]
        if absent:
            found = ", ".join(str(path) for path in parts.values())
            raise IngestError(f"{name}: found {found} but no {' or '.join(absent)} file")
        frames.append(_read_machine(name, parts, contract.sensor_names, contract.cadence_seconds))
        files += [parts[part] for part in SMD_PARTS]
    if not frames:
        raise IngestError(f"{root}: no machine has train and test data")
    return SmdLoad(pd.concat(frames, ignore_index=True), skipped, files)


def read_table(path: Path, contract: Contract) -> pd.DataFrame:
    """A CSV (``,`` or ``;`` separated, optionally .csv.gz) or Parquet file, columns as written.

    CSV entity and timestamp columns stay text (parsing is validation's job); nothing is renamed.
    A CSV whose header repeats a name, or with a line of another width than the header, raises
    IngestError naming the lines; Parquet decimals become float64.
    """
    path = Path(path)
    if not path.is_file():
        raise IngestError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise NoDataError(f"{path}: empty file")
    name = path.name.lower()
    if name.endswith(".parquet"):
        frame = _read_parquet(path)
    elif name.endswith((".csv", ".csv.gz")):
        frame = _read_csv(path, contract)
    else:
        raise IngestError(f"{path}: unsupported file type; use .csv, .csv.gz or .parquet")
    if frame.empty:
        raise NoDataError(f"{path}: no data rows")
    return frame


def _read_csv(path: Path, contract: Contract) -> pd.DataFrame:
    """Every line as many fields as the header, whose names are distinct. Names (the entity, a
    long file's sensor) are read as written: only a blank is missing there, not ``NA``."""
    text = read_text(path)
    header = text.partition("\n")[0]
    separator = ";" if header.count(";") > header.count(",") else ","
    names = header_names(path, text, separator)
    kept = {contract.entity_column, contract.sensor_column}
    missing = {i: [""] if name in kept else MISSING_TEXT for i, name in enumerate(names)}
    text_columns = {contract.entity_column: "str", contract.timestamp_column: "str"}
    try:
        return pd.read_csv(
            io.StringIO(text),
            sep=separator,
            usecols=range(len(names)),
            dtype=text_columns,
            keep_default_na=False,
            na_values=missing,
        )
    except ValueError as error:
        raise IngestError(f"{path}: {error}") from error


def header_names(path: Path, text: str, separator: str) -> list[str]:
    """The header's column names, less an unnamed last column that every line leaves empty (a
    separator ending every line: read the file with ``usecols=range(len(names))``); IngestError
    for repeated names, a line of another width than the header (which pandas would read as
    shifted columns or an index) or text that is no CSV."""
    try:
        return _header(path, text, separator)
    except csv.Error as error:
        raise IngestError(f"{path}: not a CSV file ({error})") from error


def _header(path: Path, text: str, separator: str) -> list[str]:
    rows = csv.reader(io.StringIO(text), delimiter=separator)
    names = next(rows)
    if len(names) == 1 and (other := next((s for s in "\t|" if s in names[0]), None)):
        raise IngestError(
            f"{path}: the header is one column separated by {other!r}; "
            "separate CSV columns by ',' or ';'"
        )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise IngestError(f"{path}: the header names columns {repeated} more than once")
    if '"' in text:
        widths = ((rows.line_num, len(row), "".join(row)) for row in rows)
    else:  # unquoted: a line's fields are its separators plus one, much faster than csv
        lines = enumerate(text.split("\n")[1:], start=2)
        widths = ((n, line.count(separator) + 1, line) for n, line in lines)
    ragged = [
        f"line {number}: {width} fields"
        for number, width, content in widths
        if width != len(names) and (width > 1 or content.strip())  # blank lines are skipped
    ]
    if ragged:
        raise IngestError(
            f"{path}: lines without the header's {len(names)} fields: {len(ragged)}; "
            f"e.g. {', '.join(ragged[:5])}"
        )
    if len(names) > 1 and not names[-1].strip() and _ends_empty(text, separator):
        return names[:-1]
    return names


def _ends_empty(text: str, separator: str) -> bool:
    """Every data line ends with an empty field (blank lines are no data lines)."""
    rows = csv.reader(io.StringIO(text), delimiter=separator)
    next(rows)
    return all(not row or not row[-1].strip() for row in rows)


def _read_parquet(path: Path) -> pd.DataFrame:
    """Decimal columns become float64, as every other number does in the warehouse; columns
    pandas stored as a named index (``df.set_index("time").to_parquet()``) are columns again."""
    try:
        table = pq.read_table(path)
        for i, field in enumerate(table.schema):
            if pa.types.is_decimal(field.type):
                table = table.set_column(i, field.name, table.column(i).cast(pa.float64()))
    except (pa.ArrowInvalid, OSError) as error:
        raise IngestError(f"{path}: not a readable Parquet file ({error})") from error
    frame = table.to_pandas()
    if isinstance(frame.index, pd.RangeIndex):
        return frame
    named = [n for n in frame.index.names if n is not None and n not in frame.columns]
    return (frame.reset_index(named) if named else frame).reset_index(drop=True)


def to_wide(frame: pd.DataFrame, contract: Contract, *, source: str) -> pd.DataFrame:
    """A source table with one column per sensor, named as in the warehouse.

    A ``layout: long`` table (entity, ts, sensor, value[, label]) is pivoted first, one row per
    (entity, ts), sorted by entity then time (rows of a long file may come in any order).
    Sensors are renamed from their ``source`` names; entity, ts and label keep their source names
    (``coerce_readings`` maps them).
    """
    if contract.layout == "long":
        frame = _pivot_long(frame, contract, source)
    return frame.rename(columns=contract.source_sensor_names)


def _pivot_long(frame: pd.DataFrame, contract: Contract, source: str) -> pd.DataFrame:
    keys = [contract.entity_column, contract.timestamp_column]
    sensor, value = contract.sensor_column, contract.value_column
    assert sensor is not None and value is not None
    needed = [*keys, sensor, value, *([contract.label_column] if contract.label_column else [])]
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        found = list(frame.columns)
        raise IngestError(f"{source}: long layout needs columns {missing}; found {found}")
    data = frame[needed].copy()
    data[sensor] = data[sensor].astype("str")
    known = set(contract.source_sensor_names)
    unknown = data.loc[~data[sensor].isin(known), sensor]
    if len(unknown) and contract.extra_columns == "forbid":
        raise IngestError(
            f"{source}: {len(unknown)} rows name sensors not in the contract, e.g. "
            f"{sorted(set(unknown))[:5]} (line {unknown.index[0] + 2})"
        )
    data = data[data[sensor].isin(known)]
    numbers = pd.to_numeric(data[value], errors="coerce")
    bad = data[value].notna() & numbers.isna()
    if bad.any():
        examples = [f"line {i + 2}: {data[value][i]!r}" for i in data.index[bad][:5]]
        raise IngestError(
            f"{source}: column {value!r} has {int(bad.sum())} values that are not "
            f"numbers{decimal_comma_hint(data[value][bad])}, e.g. {', '.join(examples)}"
        )
    data[value] = numbers.astype("float64")
    repeated = data.duplicated([*keys, sensor], keep=False)
    if repeated.any():
        examples = data.loc[repeated, [*keys, sensor]].head(5).itertuples(index=False)
        raise IngestError(
            f"{source}: {int(repeated.sum())} rows repeat an (entity, ts, sensor), "
            f"e.g. {[tuple(e) for e in examples]}"
        )
    return _spread(data, contract, keys, source)


def _time_order(keys: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """(entity, ts) pairs sorted by entity, then parsed time; unparseable times keep their place
    at the end of their entity, for validation to report."""
    parsed = pd.to_datetime(keys[columns[1]], format="ISO8601", utc=True, errors="coerce")
    order = keys.assign(_entity=keys[columns[0]].astype("str"), _at=parsed)
    return order.sort_values(["_entity", "_at"], kind="stable")[columns]


def _spread(data: pd.DataFrame, contract: Contract, keys: list[str], source: str) -> pd.DataFrame:
    """One row per (entity, ts) in first-appearance order, one column per sensor, and the label."""
    order = _time_order(data[keys].drop_duplicates(), keys)
    wide = data.set_index([*keys, contract.sensor_column])[contract.value_column].unstack()
    wide = wide.reindex(pd.MultiIndex.from_frame(order)).reset_index()
    wide.columns.name = None
    if contract.label_column is not None:
        label = contract.label_column
        labels = data.groupby(keys, sort=False)[label].agg(["nunique", "first"])
        conflicting = labels[labels["nunique"] > 1]
        if len(conflicting):
            raise IngestError(
                f"{source}: {len(conflicting)} (entity, ts) carry different labels "
                f"on different sensor rows, e.g. {list(conflicting.index[:5])}"
            )
        wide[label] = labels["first"].reindex(pd.MultiIndex.from_frame(order)).to_numpy()
    return wide
