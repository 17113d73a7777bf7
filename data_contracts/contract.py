"""Load a data contract from YAML into a frozen, validated description of a source."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

CONTRACT_DIR = Path(__file__).parent
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_RESERVED = {"entity", "ts", "label"}


def check_identifier(value: str, what: str) -> str:
    """Return ``value`` if it is a safe SQL identifier (lower-case, digits, underscore), else raise."""
    if not isinstance(value, str) or not _IDENTIFIER.match(value):
        raise ValueError(
            f"{what} {value!r} is not a valid identifier: use 1-63 characters of "
            "lower-case letters, digits and '_', not starting with a digit"
        )
    return value


@dataclass(frozen=True)
class SensorRule:
    """One numeric sensor column: its allowed range and whether nulls are allowed."""

    name: str
    min: float | None = None
    max: float | None = None
    nullable: bool = False


@dataclass(frozen=True)
class Contract:
    """What a source's readings must look like before anything is written or scored.

    The warehouse table ``<name>_readings`` has columns ``entity``, ``ts`` (UTC), one float column
    per sensor and, when ``has_label``, an integer ``label`` (null outside the labelled range).
    ``entity_column``/``timestamp_column``/``label_column`` name those columns in source files.
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

    @property
    def sensor_names(self) -> list[str]:
        return [s.name for s in self.sensors]

    @property
    def has_label(self) -> bool:
        return self.label_column is not None

    @property
    def table_name(self) -> str:
        return f"{self.name}_readings"


def _sensor_rules(raw: dict[str, Any], contract_name: str) -> tuple[SensorRule, ...]:
    defaults = dict(raw.get("defaults", {}))
    columns = raw.get("columns")
    if not columns:
        raise ValueError(f"contract {contract_name!r}: sensors.columns must list at least one column")
    rules = []
    for entry in columns:
        spec = {**defaults, **(entry if isinstance(entry, dict) else {"name": entry})}
        unknown = set(spec) - {"name", "min", "max", "nullable"}
        if unknown:
            raise ValueError(f"contract {contract_name!r}: unknown sensor keys {sorted(unknown)}")
        name = check_identifier(str(spec["name"]), f"contract {contract_name!r} sensor")
        if name in _RESERVED:
            raise ValueError(f"contract {contract_name!r}: sensor name {name!r} is reserved")
        rules.append(
            SensorRule(
                name=name,
                min=None if spec.get("min") is None else float(spec["min"]),
                max=None if spec.get("max") is None else float(spec["max"]),
                nullable=bool(spec.get("nullable", False)),
            )
        )
    names = [r.name for r in rules]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"contract {contract_name!r}: duplicate sensor columns {duplicates}")
    return tuple(rules)


def contract_from_dict(raw: dict[str, Any]) -> Contract:
    """Build a Contract from its YAML mapping, naming the offending key on error."""
    name = check_identifier(str(raw.get("name", "")), "contract name")
    known = {
        "name", "version", "description", "sensors", "entity_column", "timestamp_column",
        "label_column", "timestamp_timezone", "cadence_seconds", "min_rows_per_entity",
        "extra_columns",
    }
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"contract {name!r}: unknown keys {sorted(unknown)}; allowed {sorted(known)}")
    version = raw.get("version")
    if not isinstance(version, int) or version < 1:
        raise ValueError(f"contract {name!r}: version must be an integer >= 1, got {version!r}")
    min_rows = raw.get("min_rows_per_entity", 100)
    if not isinstance(min_rows, int) or min_rows < 1:
        raise ValueError(f"contract {name!r}: min_rows_per_entity must be >= 1, got {min_rows!r}")
    timezone = raw.get("timestamp_timezone", "naive_utc")
    if timezone not in ("aware", "naive_utc"):
        raise ValueError(f"contract {name!r}: timestamp_timezone must be 'aware' or 'naive_utc'")
    extra = raw.get("extra_columns", "forbid")
    if extra not in ("forbid", "ignore"):
        raise ValueError(f"contract {name!r}: extra_columns must be 'forbid' or 'ignore'")
    return Contract(
        name=name,
        version=version,
        sensors=_sensor_rules(raw.get("sensors") or {}, name),
        entity_column=str(raw.get("entity_column", "entity")),
        timestamp_column=str(raw.get("timestamp_column", "ts")),
        label_column=raw.get("label_column"),
        timestamp_timezone=timezone,
        cadence_seconds=raw.get("cadence_seconds"),
        min_rows_per_entity=min_rows,
        extra_columns=extra,
        description=str(raw.get("description", "")),
    )


def load_contract(name_or_path: str | Path) -> Contract:
    """Load a bundled contract by name (``smd``) or any contract YAML file by path."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = CONTRACT_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"no data contract {str(name_or_path)!r}: bundled contracts are {list_contracts()}"
        )
    with path.open() as handle:
        raw = yaml.safe_load(handle)
    if not isinstance(raw, dict):
        raise ValueError(f"contract file {path}: expected a YAML mapping at the top level")
    return contract_from_dict(raw)


def list_contracts() -> list[str]:
    """Names of the contracts shipped in this package."""
    return sorted(p.stem for p in CONTRACT_DIR.glob("*.yaml"))
