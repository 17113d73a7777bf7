"""Draft a data contract from a user's CSV or Parquet file, and explain every rule it proposes.

The draft is a starting point for review: ranges are the observed ones widened by
``RANGE_MARGIN`` of their span on each side, a sensor is nullable when any value is missing,
``cadence_seconds`` is the median timestamp step, ``min_rows_per_entity`` the smallest entity.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from prefect import task
from prefect.cache_policies import NO_CACHE

from data_contracts.contract import Contract, SensorRule, contract_from_dict
from tasks.contract_infer_columns import detect_columns, is_text, parse_times, refuse_bad_columns
from tasks.errors import AtpError, IngestError
from tasks.ingest import read_table, to_wide

RANGE_MARGIN = 0.5  # bounds = observed [min, max] widened by half the observed span on each side
DIGITS = 4  # significant digits of a drafted bound
RESERVED = ("entity", "ts", "label")  # warehouse columns no sensor may take
HASH_DIGITS = 8  # of a non-ASCII sensor name's SHA-256 in its identifier


def sensor_identifier(name: str, taken: Collection[str] = ()) -> str:
    """A warehouse column name for a source name: accents dropped (``é`` -> ``e``), lower case,
    runs of other characters as '_'. A name with letters or digits outside ASCII (``温度``,
    ``Давление``) ends in ``_`` and ``HASH_DIGITS`` hex digits of its SHA-256, so that such names
    stay distinct and stable (``sensor_<hash>`` when nothing else is left); ``s_`` in front of a
    leading digit, a reserved name (``entity``, ``ts``, ``label``) or one in ``taken``."""
    text = str(name).strip()
    folded = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    cleaned = re.sub(r"[^a-z0-9]+", "_", folded.lower()).strip("_")
    if any(c.isalnum() and not c.isascii() for c in folded):
        digest = hashlib.sha256(text.encode()).hexdigest()[:HASH_DIGITS]
        kept = cleaned[: 60 - HASH_DIGITS].rstrip("_")  # 63 with "s_" and "_<digest>"
        cleaned = f"{kept or 'sensor'}_{digest}"
    cleaned = cleaned or "sensor"
    clash = cleaned[0].isdigit() or cleaned in RESERVED or cleaned in taken
    return (f"s_{cleaned}" if clash else cleaned)[:63]


def _reading_contract(
    entity_column: str | None, timestamp_column: str | None, sensor_column: str | None = None
) -> Contract:
    """A contract that only tells ``read_table`` which columns to keep as text."""
    return Contract(
        "draft",
        1,
        (SensorRule("x"),),
        entity_column=entity_column or "entity",
        timestamp_column=timestamp_column or "ts",
        sensor_column=sensor_column,
    )


def _bounds(values: pd.Series) -> tuple[float, float]:
    """Observed range widened by ``RANGE_MARGIN`` of its span (of its magnitude, or 1, if flat),
    rounded outwards to ``DIGITS`` significant digits (so never inside the widened range)."""
    low, high = float(values.min()), float(values.max())
    span = high - low or max(abs(high), 1.0)
    return (
        _round_outwards(low - RANGE_MARGIN * span, ROUND_FLOOR),
        _round_outwards(high + RANGE_MARGIN * span, ROUND_CEILING),
    )


def _round_outwards(value: float, rounding: str) -> float:
    """``value`` to ``DIGITS`` significant digits, towards -inf (ROUND_FLOOR) or +inf."""
    exact = Decimal(repr(value))  # the shortest decimal that reads back as value
    if not exact.is_finite() or exact.is_zero():
        return value
    step = Decimal(1).scaleb(exact.adjusted() - DIGITS + 1)
    return float(exact.quantize(step, rounding=rounding))


def _sensor_entries(
    wide: pd.DataFrame, sources: dict[str, str], why: list[str]
) -> tuple[list[dict[str, Any]], list[str]]:
    """One contract entry per numeric sensor column of ``wide`` (warehouse name -> source name),
    and the sources left out because they hold no finite value."""
    entries, left_out = [], []
    for name, source in sources.items():
        values = pd.to_numeric(wide[name], errors="coerce")
        missing = float(values.isna().mean())
        infinite = int(np.isinf(values).sum())
        finite = values[np.isfinite(values)]
        if finite.empty:
            why.append(f"sensor {source!r}: left out, it has no finite value")
            left_out.append(source)
            continue
        if infinite:
            why.append(
                f"sensor {source!r}: {infinite} infinite values, left out of its range; "
                "ingest refuses them (finite_values)"
            )
        low, high = _bounds(finite)
        entry: dict[str, Any] = {"name": name, "min": low, "max": high, "nullable": missing > 0}
        if source != name:
            entry["source"] = source
        entries.append(entry)
        rate = (
            "no missing values"
            if not missing
            else (
                f"{missing:.2%} missing, so nullable (each gap takes the entity's training mean "
                "in training and scoring; a sensor that never reports in training is refused)"
            )
        )
        why.append(
            f"sensor {name}{f' (from {source!r})' if source != name else ''}: observed "
            f"[{finite.min():.6g}, {finite.max():.6g}], allowed [{low:.6g}, {high:.6g}]; {rate}"
        )
    if not entries:
        raise IngestError(f"no numeric sensor column with values among {list(sources.values())}")
    return entries, left_out


def _timing(
    wide: pd.DataFrame, columns: dict[str, str | None], why: list[str], path: Path
) -> dict[str, Any]:
    """Time-zone policy, cadence (median step) and rows per entity from the parsed timestamps."""
    entity, stamp = columns["entity_column"], columns["timestamp_column"]
    parsed, aware = parse_times(wide[stamp], path)
    why.append(
        "timestamp_timezone: "
        + (
            "aware, the timestamps carry offsets"
            if aware
            else "naive_utc, the timestamps carry no offset"
        )
    )
    ordered = pd.DataFrame({"entity": wide[entity], "ts": parsed}).sort_values(["entity", "ts"])
    steps = ordered.groupby("entity")["ts"].diff().dropna().dt.total_seconds()
    cadence = int(round(steps.median())) if len(steps) and steps.median() >= 1 else None
    why.append(
        f"cadence_seconds: {cadence}, the median step between rows of an entity (informational)"
    )
    sizes = wide.groupby(entity).size()
    min_rows = int(min(100, sizes.min()))
    why.append(
        f"min_rows_per_entity: {min_rows}: the smallest of {len(sizes)} entities has "
        f"{sizes.min()} rows (capped at 100: every later load must bring this many per entity)"
    )
    return {
        "timestamp_timezone": "aware" if aware else "naive_utc",
        "cadence_seconds": cadence,
        "min_rows_per_entity": min_rows,
    }


def infer_contract(
    path: Path,
    *,
    name: str,
    entity_column: str | None = None,
    timestamp_column: str | None = None,
    label_column: str | None = None,
    sensor_column: str | None = None,
    value_column: str | None = None,
) -> tuple[Contract, list[str]]:
    """Draft a contract for the CSV/Parquet file at ``path`` and the reasons for each rule.

    Columns not given are detected: the timestamp (ISO 8601 text), a 0/1 label named like one,
    the entity (text), and, when (entity, ts) repeat once per sensor, the long layout's sensor
    and value columns. Every other numeric column is a sensor; other text columns are ignored.
    """
    path = Path(path)
    frame = read_table(path, _reading_contract(entity_column, timestamp_column, sensor_column))
    why = [f"drafted from {path.name}: {len(frame)} rows, columns {list(frame.columns)}"]
    given = dict(
        entity_column=entity_column,
        timestamp_column=timestamp_column,
        label_column=label_column,
        sensor_column=sensor_column,
        value_column=value_column,
    )
    absent = {key: column for key, column in given.items() if column not in (None, *frame.columns)}
    if absent:
        raise IngestError(f"{path}: no such column(s) {absent}; the file has {list(frame.columns)}")
    columns = detect_columns(frame, given, why, path)
    name_keys = ("entity_column", "timestamp_column", "sensor_column")
    name_columns = tuple(columns.get(k) for k in name_keys)
    if name_columns != (entity_column, timestamp_column, sensor_column):  # as written: "NA", "007"
        frame = read_table(path, _reading_contract(*name_columns))
    refuse_bad_columns(frame, columns, path)
    names = _sensor_names(frame, columns, path)
    keys = {k: columns[k] for k in ("entity_column", "timestamp_column", "label_column")}
    if columns.get("sensor_column") is not None:
        keys.update(
            layout="long",
            sensor_column=columns["sensor_column"],
            value_column=columns["value_column"],
        )
    draft = {
        "name": name,
        "version": 1,
        **keys,
        "sensors": {"columns": [{"name": n, "source": s} for n, s in names.items()]},
    }
    wide = to_wide(frame, contract_from_dict(draft), source=str(path))
    timing = _timing(wide, columns, why, path)
    sensors, left_out = _sensor_entries(wide, names, why)
    taken = {v for v in columns.values() if v is not None}
    ignored = [c for c in frame.columns if c not in taken and str(c) not in names.values()]
    ignored = ignored if "layout" not in keys else []
    if ignored:
        why.append(f"extra_columns: ignore, the columns {ignored} are not numeric")
    if left_out:
        why.append(f"extra_columns: ignore, so that {left_out} (no finite value) are dropped")
    raw = {
        **draft,
        "description": f"Drafted from {path.name}; review before use.",
        **timing,
        "extra_columns": "ignore" if ignored or left_out else "forbid",
        "sensors": {"columns": sensors},
    }
    if columns["label_column"] is not None:
        why.append(_label_summary(wide[columns["label_column"]]))
    return contract_from_dict(raw), why


def _label_summary(label: pd.Series) -> str:
    values = pd.to_numeric(label, errors="coerce")
    return (
        f"label_column: {int(values.notna().sum())} labelled rows, "
        f"{int((values == 1).sum())} anomalous; unlabelled rows form the training range"
    )


def _sensor_names(frame: pd.DataFrame, columns: dict[str, Any], path: Path) -> dict[str, str]:
    """Warehouse name -> source name of every sensor: the long layout's sensor names, sorted,
    or the wide layout's numeric columns in file order."""
    if columns.get("sensor_column") is not None:
        sources = sorted({str(s) for s in frame[columns["sensor_column"]].dropna()})
    else:
        taken = {v for v in columns.values() if v is not None}
        sources = [
            str(c)
            for c in frame.columns
            if c not in taken and not is_text(frame[c]) and not pd.api.types.is_bool_dtype(frame[c])
        ]
    if not sources:
        raise IngestError(f"{path}: no numeric sensor column among {list(frame.columns)}")
    keys = {str(columns[k]) for k in ("entity_column", "timestamp_column", "label_column")}
    names = {sensor_identifier(s, keys): s for s in sources}
    if len(names) < len(sources):
        raise IngestError(f"{path}: sensor names {sources} collide once made identifiers")
    return names


def contract_to_dict(contract: Contract) -> dict[str, Any]:
    """The YAML mapping that ``contract_from_dict`` turns back into an equal contract."""
    raw: dict[str, Any] = {
        "name": contract.name,
        "version": contract.version,
        "description": contract.description,
        "entity_column": contract.entity_column,
        "timestamp_column": contract.timestamp_column,
        "label_column": contract.label_column,
        "timestamp_timezone": contract.timestamp_timezone,
        "cadence_seconds": contract.cadence_seconds,
        "min_rows_per_entity": contract.min_rows_per_entity,
        "extra_columns": contract.extra_columns,
        "layout": contract.layout,
    }
    if contract.layout == "long":
        raw.update(sensor_column=contract.sensor_column, value_column=contract.value_column)
    columns = []
    for sensor in contract.sensors:
        entry = {
            "name": sensor.name,
            "min": sensor.min,
            "max": sensor.max,
            "nullable": sensor.nullable,
        }
        columns.append({**entry, "source": sensor.source} if sensor.source else entry)
    raw["sensors"] = {"columns": columns}
    return raw


def write_contract(
    contract: Contract, path: Path, explanation: Sequence[str] = (), *, overwrite: bool = False
) -> Path:
    """Write ``contract`` as YAML under a header of ``explanation`` comments; refuses to
    replace an existing file unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise AtpError(f"{path} exists; choose another path or overwrite it explicitly")
    header = "".join(f"# {line}\n" for text in explanation for line in str(text).splitlines())
    body = yaml.safe_dump(contract_to_dict(contract), sort_keys=False, allow_unicode=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + body)
    return path


@dataclass(frozen=True)
class ContractDraft:
    """A drafted contract written for review, and why each rule is what it is."""

    path: str
    name: str
    layout: str
    sensors: int
    reasons: list[str]


def draft_contract(
    path: Path,
    *,
    name: str,
    out: Path | None = None,
    overwrite: bool = False,
    columns: Mapping[str, str | None] | None = None,
) -> ContractDraft:
    """Infer a contract for ``path`` and write it to ``out`` (default ``./<name>.yaml``).

    ``columns`` names any of ``entity_column``, ``timestamp_column``, ``label_column``,
    ``sensor_column`` and ``value_column`` instead of detecting them.
    """
    contract, reasons = infer_contract(Path(path), name=name, **dict(columns or {}))
    target = Path(out) if out is not None else Path(f"{name}.yaml")
    written = write_contract(contract, target, reasons, overwrite=overwrite)
    return ContractDraft(str(written), name, contract.layout, len(contract.sensors), reasons)


draft_contract_task = task(name="draft-contract", cache_policy=NO_CACHE)(draft_contract)
