"""Load a data contract from YAML into a frozen, validated description of a source."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from dotenv import dotenv_values

CONTRACT_DIR = Path(__file__).parent
_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_RESERVED = {"entity", "ts", "label"}


class ContractError(ValueError):
    """A contract is missing, unreadable or breaks a rule of the contract format; the message
    names the file or contract and the key."""


class ContractNotFoundError(ContractError, FileNotFoundError):
    """No contract of that name or path."""


def check_identifier(value: str, what: str) -> str:
    """Return ``value`` if it is a safe SQL identifier (lower-case, digits, '_'), else raise."""
    if not isinstance(value, str) or not _IDENTIFIER.fullmatch(value):
        raise ContractError(
            f"{what} {value!r} is not a valid identifier: use 1-63 characters of "
            "lower-case letters, digits and '_', not starting with a digit"
        )
    return value


@dataclass(frozen=True)
class SensorRule:
    """One numeric sensor column: its allowed range and whether nulls are allowed.

    ``source`` is its name in source files (a column header, or a sensor name in a long file)
    when that differs from ``name``, its warehouse column.
    """

    name: str
    min: float | None = None
    max: float | None = None
    nullable: bool = False
    source: str | None = None


@dataclass(frozen=True)
class Contract:
    """What a source's readings must look like before anything is written or scored.

    The warehouse table ``<name>_readings`` has columns ``entity``, ``ts`` (UTC), one float column
    per sensor and, when ``has_label``, an integer ``label`` (null outside the labelled range).
    ``entity_column``/``timestamp_column``/``label_column`` name those columns in source files.
    ``layout: long`` files hold one reading per row in ``sensor_column`` and ``value_column``;
    ingest pivots them to one column per sensor.
    """

    name: str
    version: int
    sensors: tuple[SensorRule, ...]
    entity_column: str = "entity"
    timestamp_column: str = "ts"
    label_column: str | None = None
    timestamp_timezone: Literal["aware", "naive_utc"] = "naive_utc"
    cadence_seconds: int | None = None
    min_rows_per_entity: int = 100
    extra_columns: Literal["forbid", "ignore"] = "forbid"
    description: str = ""
    layout: Literal["wide", "long"] = "wide"
    sensor_column: str | None = None
    value_column: str | None = None

    @property
    def sensor_names(self) -> list[str]:
        return [s.name for s in self.sensors]

    @property
    def has_label(self) -> bool:
        return self.label_column is not None

    @property
    def table_name(self) -> str:
        return f"{self.name}_readings"

    @property
    def warehouse_columns(self) -> list[str]:
        """Column names of the readings table, in table order."""
        return ["entity", "ts", *self.sensor_names, *(["label"] if self.has_label else [])]

    @property
    def source_sensor_names(self) -> dict[str, str]:
        """Source name -> warehouse column of every sensor."""
        return {s.source or s.name: s.name for s in self.sensors}


_TOP_KEYS = frozenset(
    {
        "name",
        "version",
        "description",
        "sensors",
        "entity_column",
        "timestamp_column",
        "label_column",
        "timestamp_timezone",
        "cadence_seconds",
        "min_rows_per_entity",
        "extra_columns",
        "layout",
        "sensor_column",
        "value_column",
    }
)
_SENSOR_SECTION_KEYS = frozenset({"defaults", "columns"})
_SENSOR_KEYS = frozenset({"name", "min", "max", "nullable", "source"})


def _positive_int(value: Any, key: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ContractError(f"{where}: {key} must be an integer >= 1, got {value!r}")
    return value


def _bound(value: Any, key: str, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ContractError(f"{where}: {key} must be a number or null, got {value!r}")
    return float(value)


def _sensor_rule(entry: Any, defaults: dict[str, Any], where: str) -> SensorRule:
    spec = {**defaults, **(entry if isinstance(entry, dict) else {"name": entry})}
    unknown = set(spec) - _SENSOR_KEYS
    if unknown:
        allowed = sorted(_SENSOR_KEYS)
        raise ContractError(f"{where}: unknown sensor keys {sorted(unknown)}; allowed {allowed}")
    name = check_identifier(spec.get("name"), f"{where} sensor")
    if name in _RESERVED:
        raise ContractError(f"{where}: sensor name {name!r} is reserved")
    low = _bound(spec.get("min"), f"sensor {name!r} min", where)
    high = _bound(spec.get("max"), f"sensor {name!r} max", where)
    if low is not None and high is not None and low > high:
        raise ContractError(f"{where}: sensor {name!r} has min {low} > max {high}")
    nullable = spec.get("nullable", False)
    if not isinstance(nullable, bool):
        raise ContractError(
            f"{where}: sensor {name!r} nullable must be a boolean, not {nullable!r}"
        )
    source = spec.get("source")
    if source is not None and (not isinstance(source, str) or not source.strip()):
        raise ContractError(f"{where}: sensor {name!r} source must be a non-empty string")
    return SensorRule(name=name, min=low, max=high, nullable=nullable, source=source)


def _sensor_rules(raw: Any, contract_name: str) -> tuple[SensorRule, ...]:
    where = f"contract {contract_name!r}"
    if not isinstance(raw, dict):
        keys = sorted(_SENSOR_SECTION_KEYS)
        raise ContractError(f"{where}: sensors must be a mapping with keys {keys}, got {raw!r}")
    unknown = set(raw) - _SENSOR_SECTION_KEYS
    if unknown:
        raise ContractError(f"{where}: unknown keys under sensors {sorted(unknown)}")
    defaults = raw.get("defaults") or {}
    columns = raw.get("columns")
    if not isinstance(defaults, dict):
        raise ContractError(f"{where}: sensors.defaults must be a mapping")
    if not isinstance(columns, list) or not columns:
        raise ContractError(f"{where}: sensors.columns must list at least one column")
    rules = tuple(_sensor_rule(entry, defaults, where) for entry in columns)
    names = [r.name for r in rules]
    sources = [r.source or r.name for r in rules]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    duplicates += sorted({n for n in sources if sources.count(n) > 1} - set(duplicates))
    if duplicates:
        raise ContractError(f"{where}: duplicate sensor columns {duplicates}")
    return rules


def _layout(raw: dict[str, Any], where: str) -> tuple[str, str | None, str | None]:
    """``wide`` (one column per sensor) or ``long`` with its sensor-name and value columns."""
    layout = raw.get("layout", "wide")
    sensor_column, value_column = raw.get("sensor_column"), raw.get("value_column")
    if layout == "wide":
        if sensor_column is not None or value_column is not None:
            raise ContractError(f"{where}: sensor_column and value_column need layout: long")
        return layout, None, None
    if layout != "long":
        raise ContractError(f"{where}: layout must be 'wide' or 'long', got {layout!r}")
    for key, value in (("sensor_column", sensor_column), ("value_column", value_column)):
        if not isinstance(value, str) or not value.strip():
            raise ContractError(f"{where}: layout long needs {key}, a non-empty string")
    if sensor_column == value_column:
        raise ContractError(f"{where}: sensor_column and value_column must differ")
    return layout, sensor_column, value_column


def _source_columns(raw: dict[str, Any], where: str) -> tuple[str, str, str | None]:
    """The source names of the entity, timestamp and label columns: non-empty and distinct."""
    names = {
        "entity_column": raw.get("entity_column", "entity"),
        "timestamp_column": raw.get("timestamp_column", "ts"),
        "label_column": raw.get("label_column"),
    }
    for key, value in names.items():
        if value is None and key == "label_column":
            continue
        if not isinstance(value, str) or not value.strip():
            raise ContractError(f"{where}: {key} must be a non-empty string, got {value!r}")
    given = [v for v in names.values() if v is not None]
    if len(set(given)) != len(given):
        raise ContractError(
            f"{where}: entity_column, timestamp_column and label_column must differ"
        )
    return names["entity_column"], names["timestamp_column"], names["label_column"]


def contract_from_dict(raw: dict[str, Any]) -> Contract:
    """Build a Contract from its YAML mapping, naming the offending key on error."""
    name = check_identifier(raw.get("name", ""), "contract name")
    where = f"contract {name!r}"
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise ContractError(f"{where}: unknown keys {sorted(unknown)}; allowed {sorted(_TOP_KEYS)}")
    version = _positive_int(raw.get("version"), "version", where)
    min_rows = _positive_int(raw.get("min_rows_per_entity", 100), "min_rows_per_entity", where)
    cadence = raw.get("cadence_seconds")
    if cadence is not None:
        _positive_int(cadence, "cadence_seconds", where)
    timezone = raw.get("timestamp_timezone", "naive_utc")
    if timezone not in ("aware", "naive_utc"):
        allowed = "'aware' or 'naive_utc'"
        raise ContractError(f"{where}: timestamp_timezone must be {allowed}, got {timezone!r}")
    extra = raw.get("extra_columns", "forbid")
    if extra not in ("forbid", "ignore"):
        raise ContractError(f"{where}: extra_columns must be 'forbid' or 'ignore', got {extra!r}")
    sensors = _sensor_rules(raw.get("sensors"), name)
    entity_column, timestamp_column, label_column = _source_columns(raw, where)
    clash = {entity_column, timestamp_column, label_column} & {s.name for s in sensors}
    if clash:
        raise ContractError(f"{where}: source columns {sorted(clash)} are also sensor names")
    layout, sensor_column, value_column = _layout(raw, where)
    named = {entity_column, timestamp_column, label_column}
    if layout == "long" and {sensor_column, value_column} & named:
        raise ContractError(f"{where}: sensor_column and value_column must differ from the others")
    return Contract(
        name=name,
        version=version,
        sensors=sensors,
        entity_column=entity_column,
        timestamp_column=timestamp_column,
        label_column=label_column,
        timestamp_timezone=timezone,
        cadence_seconds=cadence,
        min_rows_per_entity=min_rows,
        extra_columns=extra,
        description=str(raw.get("description", "")),
        layout=layout,
        sensor_column=sensor_column,
        value_column=value_column,
    )


def user_contract_dir() -> Path:
    """Where ingest keeps the contracts it was given by path: ``$ATP_HOME/contracts``, ATP_HOME
    resolved as ``tasks.settings`` resolves it (the environment, else ``./.env``; empty: unset)."""
    home = os.environ.get("ATP_HOME") or dotenv_values(Path.cwd() / ".env").get("ATP_HOME")
    return Path(home or ".atp").expanduser().resolve() / "contracts"


def is_contract_path(name_or_path: str | Path) -> bool:
    """Whether ``name_or_path`` is a YAML file's path (``.yaml`` or ``.yml``, any case), not a
    contract's name."""
    return Path(name_or_path).suffix.lower() in (".yaml", ".yml")


def load_contract(name_or_path: str | Path) -> Contract:
    """Load a contract by name (bundled, else ``user_contract_dir()``) or any YAML file by path."""
    path = Path(name_or_path)
    if not is_contract_path(path):
        path = CONTRACT_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            path = user_contract_dir() / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ContractNotFoundError(
            f"no data contract {str(name_or_path)!r}: bundled contracts are {list_contracts()}; "
            f"ingest --contract PATH registers others in {user_contract_dir()}"
        )
    try:
        with path.open(encoding="utf-8") as handle:
            raw = yaml.safe_load(handle)
    except yaml.YAMLError as exc:
        raise ContractError(f"contract file {path}: not valid YAML: {exc}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ContractError(f"contract file {path}: cannot be read ({exc})") from exc
    if not isinstance(raw, dict):
        raise ContractError(f"contract file {path}: expected a YAML mapping at the top level")
    try:
        return contract_from_dict(raw)
    except ContractError as exc:
        raise ContractError(f"contract file {path}: {exc}") from exc


def list_contracts() -> list[str]:
    """Names of the contracts shipped in this package."""
    return sorted(p.stem for p in CONTRACT_DIR.glob("*.yaml"))
