"""Check readings against their data contract before anything is written.

The contract's Great Expectations suite (``data_contracts.gx_suite``) checks columns, types, nulls,
ranges and labels. The rules GX cannot express are checked here in pandas: the time-zone policy,
finite values, unique and strictly increasing timestamps per entity, and rows per entity. Every
broken rule becomes one line of the ``DataContractError`` report, with up to five examples.
Every validation run, passed or failed, writes a Data Docs page (``tasks.data_docs``): the
contract's broken rules first, then GX's rendering of the suite's results.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from data_contracts import Contract
from data_contracts.gx_suite import EXAMPLES, LABEL_VALUES, Outcome, build_suite, run_suite
from tasks.data_docs import validation_docs
from tasks.errors import DataContractError
from tasks.ingest import decimal_comma_hint

if TYPE_CHECKING:
    from great_expectations.core import ExpectationSuiteValidationResult

TYPE_RULE = "expect_column_values_to_be_in_type_list"
LABEL_RULE = "expect_column_values_to_be_in_set"  # the label's 0/1 rule
_VALUE_RULES = {
    "expect_column_values_to_not_be_null": "null or NaN values",
    "expect_column_values_to_be_between": "values outside [{min_value}, {max_value}]",
    LABEL_RULE: "values not in {value_set}",
}


@dataclass(frozen=True)
class ValidationReport:
    """What a successful validation covered: every check run passed; ``docs``: its page."""

    source: str
    rows: int
    entities: int
    checks: int
    passed: int
    docs: Path


@dataclass(frozen=True)
class RuleFailure:
    """One broken rule: ``count`` offending items described by ``what``, and a few examples."""

    rule: str
    column: str | None
    count: int
    what: str
    examples: tuple[str, ...] = ()

    def line(self) -> str:
        where = f" [{self.column}]" if self.column is not None else ""
        shown = f"; e.g. {', '.join(self.examples)}" if self.examples else ""
        return f"- {self.rule}{where}: {self.what}: {self.count}{shown}"

    def cells(self) -> tuple[str, ...]:
        """The failure as a row of the Data Docs page (``tasks.data_docs.BROKEN_RULE_COLUMNS``)."""
        examples = "; ".join(self.examples)
        return (self.rule, self.column or "-", str(self.count), self.what, examples)


def _raise(
    contract: Contract,
    source: str,
    failures: Sequence[RuleFailure],
    checks: int,
    result: ExpectationSuiteValidationResult | None = None,
) -> NoReturn:
    head = (
        f"data contract {contract.name} v{contract.version} broken by {source}: "
        f"{len(failures)} rule(s) failed out of {checks} checked"
    )
    page = validation_docs(contract, source, checks, [f.cells() for f in failures], result)
    lines = [head, *(f.line() for f in failures), f"Data Docs: {page}"]
    raise DataContractError("\n".join(lines))


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _failure(rule: str, frame: pd.DataFrame, mask: Any, what: str, column: str) -> RuleFailure:
    """The rows where ``mask`` holds, with ``(entity, ts, value)`` examples from ``frame``."""
    rows = np.flatnonzero(np.asarray(mask, dtype=bool))
    return RuleFailure(rule, column, len(rows), what, _examples(frame, rows, column))


def _examples(frame: pd.DataFrame, rows: Sequence[int], column: str | None) -> tuple[str, ...]:
    def cell(name: str | None, row: int) -> str:
        return _show(frame[name].iat[row]) if name in frame.columns else "-"

    return tuple(
        f"({cell('entity', r)}, {cell('ts', r)}, {cell(column, r)})" for r in list(rows)[:EXAMPLES]
    )


def _unique_names(frame: pd.DataFrame) -> list[RuleFailure]:
    names = [str(c) for c in frame.columns]
    repeated = sorted({n for n in names if names.count(n) > 1})
    what = f"columns present more than once {repeated}"
    return [RuleFailure("unique_column_names", None, len(repeated), what)] if repeated else []


def _kind(value: Any) -> bool | None:
    """Whether one cell is a time-zone-aware timestamp; None when it is no timestamp at all."""
    if not isinstance(value, (str, datetime, np.datetime64)):
        return None
    try:
        stamp = pd.Timestamp(value)
    except (ValueError, TypeError, OverflowError):
        return None
    return None if stamp is pd.NaT else stamp.tzinfo is not None


def _kinds(ts: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Per row: holds a time-zone-aware timestamp; holds a naive one."""
    present = ts.notna().to_numpy(bool)
    if isinstance(ts.dtype, pd.DatetimeTZDtype):
        return present, np.zeros(len(ts), bool)
    if pd.api.types.is_datetime64_dtype(ts.dtype):
        return np.zeros(len(ts), bool), present
    kinds = ts.map(_kind, na_action="ignore").tolist()
    return np.array([k is True for k in kinds], bool), np.array([k is False for k in kinds], bool)


def _timezone_failures(
    frame: pd.DataFrame, contract: Contract, aware: np.ndarray, naive: np.ndarray, naive_ok: bool
) -> list[RuleFailure]:
    """The contract's time-zone policy over per-row kinds; a mix of both kinds always fails."""
    wants_naive = contract.timestamp_timezone == "naive_utc"
    if aware.any() and naive.any():
        mix = f"{naive.sum()} naive, {aware.sum()} aware"
        what = f"mixed naive and aware timestamps ({mix}); rows of the wrong kind"
    elif aware.any() and wants_naive:
        what = "time-zone-aware timestamps where naive UTC is required"
    elif naive.any() and not naive_ok:
        what = "naive timestamps where time-zone-aware ones are required"
    else:
        return []
    return [_failure("timestamp_timezone", frame, aware if wants_naive else naive, what, "ts")]


def _gx_failure(outcome: Outcome, data: pd.DataFrame, skip: set[str]) -> RuleFailure | None:
    """One failed GX outcome as a report line; None when its root cause is reported elsewhere."""
    rule, column, result = outcome.rule, outcome.column, outcome.result
    if outcome.error is not None:
        if column in skip:
            return None
        return RuleFailure(rule, column, len(data), f"not evaluated ({outcome.error}); rows")
    if rule == "expect_table_row_count_to_be_between":
        return RuleFailure(rule, None, len(data), "rows, at least 1 is required")
    if rule == "expect_column_to_exist":
        return RuleFailure(rule, column, len(data), "column missing; rows affected")
    if rule == "expect_table_columns_to_match_set":
        mismatched = result.get("details", {}).get("mismatched", {})
        extra = sorted(map(str, mismatched.get("unexpected", [])))
        what = f"columns not in the contract {extra}"
        return RuleFailure(rule, None, len(extra), what) if extra else None
    if rule == TYPE_RULE and column is not None:
        return _type_failure(column, data)
    if rule == LABEL_RULE and not pd.api.types.is_numeric_dtype(data["label"]):
        return _text_label_failure(data)
    what = _VALUE_RULES.get(rule, "unexpected values").format(**outcome.kwargs)
    rows = result.get("partial_unexpected_index_list") or []
    count = int(result.get("unexpected_count", 0))
    return RuleFailure(rule, column, count, what, _examples(data, rows, column))


def _type_failure(column: str, data: pd.DataFrame) -> RuleFailure:
    """Wrong dtype: point at the values that are not numbers (sensors), else at every value."""
    values = data[column]
    offending = values.notna().to_numpy(bool)
    if column != "ts":
        numbers = pd.to_numeric(values.astype(object), errors="coerce").notna().to_numpy(bool)
        if (offending & ~numbers).any():
            offending = offending & ~numbers
    expected = "naive datetimes" if column == "ts" else "float or int"
    hint = "" if column == "ts" else decimal_comma_hint(values[offending])
    what = f"values in a column of dtype {values.dtype}, expected {expected}{hint}"
    return _failure(TYPE_RULE, data, offending, what, column)


def _text_label_failure(data: pd.DataFrame) -> RuleFailure:
    """Labels read as text (a CSV with a word among them): the values that are not 0 or 1 as
    numbers, not every label; every label when all of them are (numbers stored as text)."""
    values = data["label"]
    present = values.notna().to_numpy(bool)
    numbers = pd.to_numeric(values.astype(object), errors="coerce")
    offending = present & ~numbers.isin(LABEL_VALUES).to_numpy(bool)
    if offending.any():
        what = f"values other than 0, 1 and blank (dtype {values.dtype})"
    else:
        offending, what = present, f"labels stored as text (dtype {values.dtype}), not numbers"
    return _failure(LABEL_RULE, data, offending, what, "label")


def _finite_failures(data: pd.DataFrame, contract: Contract) -> list[RuleFailure]:
    """±inf in any float sensor column, nullable or not."""
    names = [s for s in contract.sensor_names if s in data and pd.api.types.is_float_dtype(data[s])]
    if not names:
        return []
    infinite = np.isinf(data[names].to_numpy(dtype="float64", na_value=np.nan))
    return [
        _failure("finite_values", data, infinite[:, j], "infinite values", names[j])
        for j in np.flatnonzero(infinite.any(axis=0))
    ]


def _series_failures(data: pd.DataFrame, min_rows: int) -> list[RuleFailure]:
    """Unique, strictly increasing timestamps per entity; at least ``min_rows`` rows per entity."""
    keys = data[["entity", "ts"]]
    failures = []
    repeated = keys.duplicated(keep=False) & keys.notna().all(axis=1)
    if repeated.any():
        what = "rows sharing their (entity, ts) with another row"
        failures.append(_failure("unique_timestamps_per_entity", data, repeated, what, "ts"))
    earlier = data.groupby("entity", sort=False)["ts"].diff() < pd.Timedelta(0)
    if earlier.any():
        what = "rows earlier than the previous row of their entity"
        failures.append(_failure("increasing_timestamps_per_entity", data, earlier, what, "ts"))
    sizes = data.groupby("entity", sort=False).size()
    short = sizes[sizes < min_rows]
    if len(short):
        shown = tuple(f"({_show(e)}, -, {n} rows)" for e, n in short.head(EXAMPLES).items())
        what = f"entities with fewer than {min_rows} rows"
        failures.append(RuleFailure("min_rows_per_entity", "entity", len(short), what, shown))
    return failures


def validate_readings(
    frame: pd.DataFrame, contract: Contract, *, source: str, min_rows: int | None = None
) -> ValidationReport:
    """Check ``frame`` (warehouse column names) against ``contract``; writes nothing.

    ``min_rows`` overrides ``contract.min_rows_per_entity`` (pass the window size). Naive ``ts``
    are UTC; tz-aware ``ts`` pass only under an ``aware`` contract. Raises ``DataContractError``
    naming ``source`` and, per broken rule, the column, the count and up to five examples.
    """
    need = contract.min_rows_per_entity if min_rows is None else min_rows
    if need < 1:
        raise ValueError(f"min_rows must be >= 1, got {need}")
    if failures := _unique_names(frame):
        _raise(contract, source, failures, 1)
    data = frame.reset_index(drop=True).rename(columns=str)
    has_ts = "ts" in data
    if has_ts and not isinstance(data["ts"].dtype, pd.StringDtype):
        failures += _timezone_failures(data, contract, *_kinds(data["ts"]), naive_ok=True)
        if isinstance(data["ts"].dtype, pd.DatetimeTZDtype):
            data["ts"] = data["ts"].dt.tz_convert("UTC").dt.tz_localize(None)
    run = run_suite(build_suite(contract), data)
    outcomes = run.outcomes
    wrong_type = {str(o.column) for o in outcomes if o.rule == TYPE_RULE and not o.success}
    skip = (set(contract.warehouse_columns) - set(data.columns)) | wrong_type
    failures += [f for o in outcomes if not o.success and (f := _gx_failure(o, data, skip))]
    failures += _finite_failures(data, contract)
    series = has_ts and "entity" in data and "ts" not in wrong_type
    if series:
        failures += _series_failures(data, need)
    sensors = sum(s in data for s in contract.sensor_names)
    checks = len(outcomes) + int(has_ts) + sensors + 3 * int(series)
    if failures:
        _raise(contract, source, failures, checks, run.result)
    entities = int(data["entity"].nunique()) if "entity" in data else 0
    page = validation_docs(contract, source, checks, [], run.result)
    return ValidationReport(source, len(data), entities, checks, checks, page)


def _parse_timestamps(
    data: pd.DataFrame, contract: Contract
) -> tuple[pd.Series, list[RuleFailure]]:
    """Source timestamps as naive UTC, plus parse and time-zone policy failures."""
    ts = data["ts"]
    if pd.api.types.is_bool_dtype(ts) or pd.api.types.is_numeric_dtype(ts):
        what = f"values of dtype {ts.dtype}, expected ISO 8601 text or datetimes"
        present = ts.notna()
        return ts, [_failure("timestamp_parse", data, present, what, "ts")] if present.any() else []
    try:  # one kind of timestamp throughout: the common, fast case
        parsed = pd.to_datetime(ts, format="ISO8601")
        aware, naive = _kinds(parsed)
    except (ValueError, TypeError, OverflowError):
        parsed = pd.to_datetime(ts.astype(object), format="ISO8601", utc=True, errors="coerce")
        known = parsed.notna().to_numpy(bool)
        aware, naive = (mask & known for mask in _kinds(ts))
    unparsed = ts.notna().to_numpy(bool) & parsed.isna().to_numpy(bool)
    if unparsed.any():  # blank text is a missing timestamp, reported by validation as null
        unparsed &= ~ts.map(lambda v: isinstance(v, str) and not v.strip()).to_numpy(bool)
    failures = []
    if unparsed.any():
        what = "values that are not ISO 8601 timestamps"
        failures.append(_failure("timestamp_parse", data, unparsed, what, "ts"))
    naive_ok = contract.timestamp_timezone == "naive_utc"
    failures += _timezone_failures(data, contract, aware, naive, naive_ok)
    if isinstance(parsed.dtype, pd.DatetimeTZDtype):
        parsed = parsed.dt.tz_convert("UTC").dt.tz_localize(None)
    return parsed, failures


def _nullable_number(dtype: Any) -> bool:
    """One of pandas' nullable number dtypes (Int64, Float32, Arrow's); not boolean."""
    types = pd.api.types
    extension = isinstance(dtype, pd.api.extensions.ExtensionDtype)
    return extension and types.is_numeric_dtype(dtype) and not types.is_bool_dtype(dtype)


def _entity_ids(values: pd.Series) -> pd.Series:
    """Entity ids as text; numbers in their canonical form, whole ones without a fraction, so
    that ``1.0`` (a float column of a Parquet file) is the entity ``1`` that a CSV names."""
    if not pd.api.types.is_float_dtype(values):
        return values.astype("str")
    ids = {v: str(int(v)) if float(v).is_integer() else str(v) for v in values.dropna().unique()}
    return values.map(ids).astype("str")


def coerce_readings(frame: pd.DataFrame, contract: Contract, *, source: str) -> pd.DataFrame:
    """Source columns renamed to warehouse names and put in table order, ``ts`` as naive UTC.

    Columns the contract does not know are kept last when it forbids them (validation rejects
    them) and dropped when it ignores them. Numeric entity ids become canonical text (``1.0``
    is ``"1"``); text ones are kept as written. Sensors of pandas' nullable number dtypes become
    float64 (``NA`` as NaN), as the warehouse stores them, and ``ts`` is cut to whole
    microseconds, as stored. Unparseable timestamps or ones that break the contract's time-zone
    policy raise ``DataContractError`` with examples.
    """
    renames = {contract.entity_column: "entity", contract.timestamp_column: "ts"}
    if contract.label_column is not None:
        renames[contract.label_column] = "label"
    data = frame.rename(columns=lambda c: renames.get(str(c), str(c)))
    if failures := _unique_names(data):
        _raise(contract, source, failures, 1)
    known = contract.warehouse_columns
    forbid = contract.extra_columns == "forbid"
    extra = [c for c in data.columns if c not in known] if forbid else []
    data = data[[c for c in known if c in data.columns] + extra].reset_index(drop=True)
    if "entity" in data:
        data["entity"] = _entity_ids(data["entity"])
    for name in [s for s in contract.sensor_names if s in data]:
        if _nullable_number(data[name].dtype):
            data[name] = data[name].astype("float64")
    if "ts" in data:
        data["ts"], failures = _parse_timestamps(data, contract)
        if failures:
            _raise(contract, source, failures, 2)
        if pd.api.types.is_datetime64_dtype(data["ts"]):  # as stored: validation sees collisions
            data["ts"] = data["ts"].dt.floor("us")
    return data


validate_readings_task = task(name="validate-readings", cache_policy=NO_CACHE)(validate_readings)
