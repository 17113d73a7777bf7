"""Contract YAML loading, its error messages, and the GX suite built from every bundled contract."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from data_contracts import list_contracts, load_contract
from data_contracts.contract import check_identifier, contract_from_dict, user_contract_dir
from data_contracts.gx_suite import build_suite


def _raw(**changes: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": "plant",
        "version": 1,
        "label_column": "label",
        "sensors": {"defaults": {"min": 0, "max": 10}, "columns": ["a", "b", {"name": "c"}]},
    }
    raw.update(changes)
    return raw


@pytest.mark.parametrize("name", list_contracts())
def test_every_bundled_contract_loads_and_builds_a_suite(name: str) -> None:
    contract = load_contract(name)
    suite = build_suite(contract)
    assert suite.name == f"{contract.name}_v{contract.version}"
    columns = {e.column for e in suite.expectations if hasattr(e, "column")}
    assert set(contract.warehouse_columns) <= columns


def test_smd_contract_shape() -> None:
    smd = load_contract("smd")
    assert len(smd.sensors) == 38 and smd.has_label and smd.timestamp_timezone == "naive_utc"
    assert smd.warehouse_columns == ["entity", "ts", *(f"m{i:02d}" for i in range(1, 39)), "label"]
    assert all(s.min == -1.0 and s.max == 2.0 and not s.nullable for s in smd.sensors)


def test_suite_follows_the_rules() -> None:
    contract = contract_from_dict(
        _raw(extra_columns="ignore", sensors={"columns": [{"name": "a", "nullable": True}]})
    )
    expectations = build_suite(contract).expectations
    types = [e.expectation_type for e in expectations]
    assert "expect_table_columns_to_match_set" not in types  # extra columns ignored
    assert "expect_column_values_to_be_between" not in types  # no range set
    rule = "expect_column_values_to_not_be_null"
    not_null = [e.column for e in expectations if e.expectation_type == rule]
    assert not_null == ["entity", "ts"]  # the nullable sensor is not required


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"colour": "red"}, r"unknown keys \['colour'\]"),
        ({"sensors": {"columns": ["x; DROP TABLE"]}}, r"sensor 'x; DROP TABLE' is not a valid"),
        ({"name": "x; DROP TABLE"}, r"contract name 'x; DROP TABLE'"),
        ({"name": "plant\n"}, r"contract name 'plant\\n'"),
        ({"sensors": {"columns": ["a", "b", "a"]}}, r"duplicate sensor columns \['a'\]"),
        ({"version": 0}, r"version must be an integer >= 1, got 0"),
        ({"version": True}, r"version must be an integer"),
        ({"min_rows_per_entity": 0}, r"min_rows_per_entity"),
        ({"cadence_seconds": "1m"}, r"cadence_seconds"),
        ({"timestamp_timezone": "local"}, r"timestamp_timezone"),
        ({"extra_columns": "allow"}, r"extra_columns"),
        ({"sensors": ["a", "b"]}, r"sensors must be a mapping"),
        ({"sensors": {"columns": []}}, r"sensors.columns"),
        ({"sensors": {"column": ["a"]}}, r"unknown keys under sensors \['column'\]"),
        ({"sensors": {"columns": [{"name": "a", "unit": "C"}]}}, r"unknown sensor keys \['unit'\]"),
        ({"sensors": {"columns": [{"name": "a", "min": 5, "max": 1}]}}, r"'a' has min 5.0 > max"),
        ({"sensors": {"columns": [{"name": "a", "max": "hot"}]}}, r"sensor 'a' max"),
        ({"sensors": {"columns": [{"name": "a", "nullable": "yes"}]}}, r"nullable"),
        ({"sensors": {"columns": ["ts"]}}, r"'ts' is reserved"),
        ({"entity_column": ""}, r"entity_column"),
        ({"timestamp_column": "label"}, r"must differ"),
        ({"entity_column": "a"}, r"also sensor names"),
    ],
)
def test_bad_contract_names_the_key(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        contract_from_dict(_raw(**changes))


def test_bad_contract_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: plant\nversion: 1\nsensors: {columns: [a]}\nunits: SI\n")
    with pytest.raises(ValueError, match=r"unknown keys \['units'\]"):
        load_contract(path)
    path.write_text("name: plant\n  version: [1\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_contract(path)
    path.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="mapping"):
        load_contract(path)
    with pytest.raises(FileNotFoundError, match="smd"):
        load_contract("no_such_contract")


@pytest.mark.parametrize("suffix", [".yaml", ".YAML", ".yml", ".YML"])
def test_a_contract_path_is_read_whatever_the_case_of_its_suffix(
    tmp_path: Path, suffix: str
) -> None:
    path = tmp_path / f"plant{suffix}"
    path.write_text("name: plant\nversion: 1\nsensors: {columns: [a]}\n")
    assert load_contract(path).name == load_contract(str(path)).name == "plant"


def test_user_contracts_live_under_the_home_the_settings_resolve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ATP_HOME from ``./.env`` (no environment variable) holds the registered contracts too."""
    from tasks.settings import get_settings

    monkeypatch.delenv("ATP_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("ATP_HOME=state  # kept apart\n")
    assert user_contract_dir() == get_settings().home / "contracts" == tmp_path / "state/contracts"
    monkeypatch.setenv("ATP_HOME", "")  # empty: unset, so ./.env still decides
    assert user_contract_dir() == get_settings().home / "contracts" == tmp_path / "state/contracts"


def test_check_identifier() -> None:
    assert check_identifier("m_01", "column") == "m_01"
    for bad in ["", "1a", "A", "a-b", "a b", "a" * 64, "a\n", "drop;--"]:
        with pytest.raises(ValueError, match="not a valid identifier"):
            check_identifier(bad, "column")
