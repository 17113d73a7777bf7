"""Contract inference from wide and long files, its YAML round trip, and long-file pivoting."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from data_contracts import load_contract
from data_contracts.contract import check_identifier, contract_from_dict
from tasks.contract_infer import infer_contract, sensor_identifier, write_contract
from tasks.errors import AtpError, IngestError
from tasks.ingest import to_wide
from tasks.load import register_contract


def _wide(rows: int = 120) -> pd.DataFrame:
    t = np.arange(rows)
    parts = []
    for unit in ("U1", "U2"):
        parts.append(
            pd.DataFrame(
                {
                    "stamp": pd.date_range("2024-01-01", periods=rows, freq="10s").strftime(
                        "%Y-%m-%d %H:%M:%S"
                    ),
                    "unit": unit,
                    "Motor Temp": 50.0 + np.sin(t / 4),
                    "rpm": np.where(t == 3, np.nan, 1000.0 + t),
                    "site": "A",
                }
            )
        )
    return pd.concat(parts, ignore_index=True)


def _long(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns="site").melt(
        id_vars=["unit", "stamp"], var_name="metric", value_name="value"
    )


def test_wide_file_rules_and_explanation(tmp_path: Path) -> None:
    path = tmp_path / "units.csv"
    _wide().to_csv(path, index=False)
    contract, why = infer_contract(path, name="units")
    assert (contract.entity_column, contract.timestamp_column, contract.label_column) == (
        "unit",
        "stamp",
        None,
    )
    assert contract.layout == "wide" and contract.extra_columns == "ignore"
    temp, rpm = contract.sensors
    assert (temp.name, temp.source, temp.nullable) == ("motor_temp", "Motor Temp", False)
    assert (rpm.name, rpm.source, rpm.nullable) == ("rpm", None, True)
    assert rpm.min == pytest.approx(1000 - 0.5 * 119, abs=0.1) and rpm.max >= 1119 + 59
    assert contract.cadence_seconds == 10 and contract.min_rows_per_entity == 100
    assert contract.timestamp_timezone == "naive_utc"
    assert any("['site'] are not numeric" in line for line in why)
    assert any(line.startswith("sensor rpm: observed [1000, 1119]") for line in why)


def test_written_contract_reads_back_identically_with_comments(tmp_path: Path) -> None:
    path = tmp_path / "units.csv"
    _long(_wide()).to_csv(path, index=False)
    contract, why = infer_contract(path, name="units")
    written = write_contract(contract, tmp_path / "units.yaml", why)
    assert load_contract(written) == contract
    text = written.read_text()
    assert all(f"# {line}" in text for line in why)
    with pytest.raises(AtpError, match="units.yaml exists"):
        write_contract(contract, written)
    write_contract(contract, written, overwrite=True)


def test_long_file_pivots_to_the_wide_values(tmp_path: Path) -> None:
    wide = _wide()
    path = tmp_path / "units.parquet"
    _long(wide).sample(frac=1.0, random_state=1).to_parquet(path)
    contract, _ = infer_contract(path, name="units")
    assert (contract.layout, contract.sensor_column, contract.value_column) == (
        "long",
        "metric",
        "value",
    )
    pivoted = to_wide(_long(wide).iloc[::-1], contract, source="units")
    expected = to_wide(
        wide.drop(columns="site"),
        contract_from_dict(
            {
                "name": "units",
                "version": 1,
                "entity_column": "unit",
                "timestamp_column": "stamp",
                "sensors": {"columns": [{"name": "motor_temp", "source": "Motor Temp"}, "rpm"]},
            }
        ),
        source="units",
    )
    columns = ["unit", "stamp", "motor_temp", "rpm"]
    pd.testing.assert_frame_equal(
        pivoted[columns].reset_index(drop=True),
        expected[columns].reset_index(drop=True),
        check_dtype=False,
    )


def test_given_columns_win_and_aware_times_are_kept(tmp_path: Path) -> None:
    frame = pd.DataFrame(
        {
            "when": pd.date_range("2024-01-01", periods=150, freq="min", tz="UTC").strftime(
                "%Y-%m-%dT%H:%M:%S%z"
            ),
            "asset_no": 7,
            "x": np.arange(150.0),
            "flag": np.r_[np.full(100, np.nan), np.zeros(50)],
        }
    )
    path = tmp_path / "assets.csv"
    frame.to_csv(path, index=False)
    contract, why = infer_contract(
        path, name="assets", entity_column="asset_no", label_column="flag"
    )
    assert contract.entity_column == "asset_no" and contract.label_column == "flag"
    assert contract.sensor_names == ["x"] and contract.timestamp_timezone == "aware"
    assert "entity_column: 'asset_no' (given)" in why


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (pd.DataFrame({"unit": ["a"] * 3, "x": [1.0, 2, 3]}), "no timestamp column"),
        (pd.DataFrame({"ts": ["2024-01-01"] * 2, "x": [1.0, 2]}), "no entity column"),
        (
            pd.DataFrame({"ts": ["2024-01-01", "2024-01-02"], "unit": "a", "note": "n"}),
            "no numeric sensor column",
        ),
        (
            pd.DataFrame({"ts": ["2024-01-01", "2024-01-02"], "unit": "a", "A b": 1.0, "a-b": 2.0}),
            "collide once made identifiers",
        ),
    ],
)
def test_files_that_cannot_be_drafted(tmp_path: Path, frame: pd.DataFrame, message: str) -> None:
    path = tmp_path / "bad.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(IngestError, match=message):
        infer_contract(path, name="bad")


def test_sensor_identifier() -> None:
    assert sensor_identifier("Volume Flow RateRMS") == "volume_flow_raterms"
    assert sensor_identifier("2nd stage (bar)") == "s_2nd_stage_bar"
    assert sensor_identifier("%%") == "sensor"
    assert sensor_identifier("Température (°C)") == "temperature_c"  # accents folded


def test_non_latin_sensor_names_get_distinct_stable_identifiers() -> None:
    names = ["温度", "流量", "Давление", "温度 (C)", "流量 (C)"]
    ids = [sensor_identifier(n) for n in names]
    digest = hashlib.sha256("温度".encode()).hexdigest()[:8]
    assert ids[0] == f"sensor_{digest}" and ids[3].startswith("c_") and len(set(ids)) == 5
    assert all(check_identifier(i, "sensor") for i in ids)
    assert sensor_identifier("温度", taken={f"sensor_{digest}"}) == f"s_sensor_{digest}"


LONG = {
    "name": "units",
    "version": 1,
    "entity_column": "unit",
    "timestamp_column": "stamp",
    "label_column": "label",
    "layout": "long",
    "sensor_column": "metric",
    "value_column": "value",
    "sensors": {"columns": ["a", "b"]},
}


def _long_rows(*rows: tuple[Any, ...]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["unit", "stamp", "metric", "value", "label"])


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (
            [("u", "t1", "a", 1.0, 0), ("u", "t1", "zz", 2.0, 0)],
            r"sensors not in the contract.*'zz'",
        ),
        (
            [("u", "t1", "a", 1.0, 0), ("u", "t1", "a", 2.0, 0)],
            "repeat an \\(entity, ts, sensor\\)",
        ),
        ([("u", "t1", "a", "high", 0), ("u", "t1", "b", 2.0, 0)], "line 2: 'high'"),
        ([("u", "t1", "a", 1.0, 0), ("u", "t1", "b", 2.0, 1)], "carry different labels"),
    ],
)
def test_bad_long_files(rows: list[tuple[Any, ...]], message: str) -> None:
    with pytest.raises(IngestError, match=message):
        to_wide(_long_rows(*rows), contract_from_dict(LONG), source="units.csv")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"layout": "tall"}, "layout must be 'wide' or 'long'"),
        ({"sensor_column": None}, "layout long needs sensor_column"),
        ({"layout": "wide"}, "need layout: long"),
        ({"value_column": "metric"}, "must differ"),
        ({"value_column": "unit"}, "must differ from the others"),
        (
            {"sensors": {"columns": ["a", {"name": "b", "source": "a"}]}},
            r"duplicate sensor .*\['a'\]",
        ),
        ({"sensors": {"columns": [{"name": "b", "source": ""}]}}, "source must be a non-empty"),
    ],
)
def test_layout_keys_are_checked(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        contract_from_dict({**LONG, **changes})


def test_registered_contract_is_found_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ATP_HOME", str(tmp_path / "home"))
    contract = contract_from_dict(LONG)
    source = write_contract(contract, tmp_path / "review" / "units.yaml")
    with pytest.raises(FileNotFoundError, match="ingest --contract PATH registers"):
        load_contract("units")
    assert register_contract(source) == tmp_path / "home" / "contracts" / "units.yaml"
    assert load_contract("units") == contract


@pytest.mark.parametrize(
    ("observed", "bounds"),
    [
        ((101315.0, 101335.0), (101300.0, 101400.0)),  # air pressure in Pa: a small span
        ((-5.123, -5.0), (-5.185, -4.938)),
        ((9.0, 11.0), (8.0, 12.0)),
        ((-1e-5, 1e-5), (-2e-5, 2e-5)),
    ],
)
def test_drafted_bounds_are_rounded_outwards_around_the_margin(
    tmp_path: Path, observed: tuple[float, float], bounds: tuple[float, float]
) -> None:
    values = np.linspace(*observed, 120)
    path = tmp_path / "pressure.csv"
    pd.DataFrame(
        {
            "unit": "u1",
            "stamp": pd.date_range("2024-01-01", periods=120, freq="min").astype(str),
            "p": values,
        }
    ).to_csv(path, index=False)
    (sensor,) = infer_contract(path, name="air")[0].sensors
    margin = (observed[1] - observed[0]) / 2
    assert (sensor.min, sensor.max) == bounds
    assert sensor.min <= observed[0] - margin and sensor.max >= observed[1] + margin


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"entity_column": "machine"}, r"no such column\(s\) \{'entity_column': 'machine'\}"),
        ({"label_column": "anomaly"}, r"no such column\(s\) \{'label_column': 'anomaly'\}"),
        ({"value_column": "rpm"}, "value column 'rpm' given, but no column naming the sensor"),
    ],
)
def test_columns_given_that_the_file_lacks_or_cannot_use_are_refused(
    tmp_path: Path, given: dict[str, str], message: str
) -> None:
    path = tmp_path / "units.csv"
    _wide().to_csv(path, index=False)
    with pytest.raises(IngestError, match=message) as raised:
        infer_contract(path, name="units", **given)
    assert str(raised.value).startswith(f"{path}: ")
