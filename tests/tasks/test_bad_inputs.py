"""Bad and unusual user files: each is refused with a message naming the file, the column or line
and examples, and writes nothing; or, when it is valid, it loads as written and drafts a contract
that accepts it."""

from __future__ import annotations

import decimal
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from data_contracts.contract import (
    Contract,
    ContractError,
    ContractNotFoundError,
    load_contract,
)
from tasks.contract_infer import infer_contract, write_contract
from tasks.errors import DataContractError, IngestError
from tasks.ingest import read_table
from tasks.load import ingest_table
from tasks.validate import coerce_readings

ROWS = 120


def _frame(rows: int = ROWS) -> pd.DataFrame:
    """Two pumps, one row a minute, temperature and flow, the last 20 rows of each labelled."""
    t = np.arange(rows)
    stamps = pd.date_range("2024-01-01", periods=rows, freq="min").strftime("%Y-%m-%dT%H:%M:%S")
    label = pd.array([None] * (rows - 20) + [0] * 20, dtype="Int64")
    parts = [
        pd.DataFrame(
            {
                "machine": pump,
                "time": stamps,
                "temp": 50.0 + np.sin(t / 5),
                "flow": 10.0 + np.cos(t / 7),
                "label": label,
            }
        )
        for pump in ("pump-a", "pump-b")
    ]
    return pd.concat(parts, ignore_index=True)


def _csv(path: Path, frame: pd.DataFrame) -> Path:
    frame.to_csv(path, index=False)
    return path


def _rows(url: str, table: str = "plant_readings") -> int:
    with sa.create_engine(url).connect() as conn:
        if not sa.inspect(conn).has_table(table):
            return 0
        return int(conn.execute(sa.text(f"select count(*) from {table}")).scalar_one())


@pytest.fixture
def plant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The contract drafted from a good file, as a YAML path; ATP_HOME under tmp_path."""
    monkeypatch.setenv("ATP_HOME", str(tmp_path / "home"))
    contract, why = infer_contract(_csv(tmp_path / "good.csv", _frame()), name="plant")
    return str(write_contract(contract, tmp_path / "plant.yaml", why))


def _draft_and_load(path: Path, url: str) -> int:
    """Draft a contract from ``path`` and ingest ``path`` through it; the rows that were new."""
    contract, why = infer_contract(path, name="draft")
    written = write_contract(contract, path.with_suffix(".yaml"), why)
    return ingest_table(url, path, str(written)).rows_new


# --- reading CSV and Parquet files -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("entity,ts,m01,m01\na,2024-01-01,1,2\n", r"names columns \['m01'\] more than once"),
        ("entity,ts,m01\na,2024-01-01,1,9\n", "line 2: 4 fields"),
        ("entity,ts,m01\na,2024-01-01,1\na,2024-01-02\n", "line 3: 2 fields"),
        ('entity,ts,m01\n"a,b",2024-01-01\n', "line 2: 2 fields"),
        ("entity\tts\tm01\na\t2024-01-01\t1\n", r"separated by '\\t'"),
        ("# export\nentity,ts,m01\na,2024-01-01,1\n", "header's 1 fields"),
    ],
    ids=["repeated header", "long row", "short row", "quoted short row", "tabs", "comment line"],
)
def test_malformed_csv_is_refused_naming_the_file_and_line(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(IngestError, match=message) as raised:
        read_table(path, load_contract("smd"))
    assert str(path) in str(raised.value)


def test_a_separator_ending_every_line_adds_no_column(
    tmp_path: Path, sqlite_url: str, plant: str
) -> None:
    path = tmp_path / "trailing.csv"
    lines = _frame().to_csv(index=False, sep=";").splitlines()
    path.write_text("".join(f"{line};\n" for line in lines))
    assert list(read_table(path, load_contract(plant)).columns) == list(_frame().columns)
    assert ingest_table(sqlite_url, path, plant).rows_new == 2 * ROWS
    drafted, _ = infer_contract(path, name="draft")
    assert drafted.sensor_names == ["temp", "flow"] and drafted.extra_columns == "forbid"
    path.write_text(path.read_text().replace(";\n", ";7\n", 1))  # a value: a column after all
    assert len(read_table(path, load_contract(plant)).columns) == len(_frame().columns) + 1


def test_utf16_text_is_refused_as_such(tmp_path: Path) -> None:
    path = tmp_path / "excel.csv"
    path.write_text("entity,ts,m01\na,2024-01-01,1\n", encoding="utf-16")
    with pytest.raises(IngestError, match=f"{path}: UTF-16 text; save it as UTF-8"):
        read_table(path, load_contract("smd"))


def test_blank_lines_are_not_rows(tmp_path: Path) -> None:
    path = tmp_path / "ok.csv"
    path.write_text("entity,ts,m01\n\na,2024-01-01,1\n\n")
    assert len(read_table(path, load_contract("smd"))) == 1


def test_entity_names_are_read_as_written_not_as_missing(
    tmp_path: Path, sqlite_url: str, plant: str
) -> None:
    frame = _frame()
    frame["machine"] = np.repeat(["NA", "null"], ROWS)
    frame.loc[3, "temp"] = None  # a blank sensor value is still missing
    path = _csv(tmp_path / "regions.csv", frame)
    table = read_table(path, load_contract(plant))
    assert list(table["machine"].unique()) == ["NA", "null"] and np.isnan(table["temp"].iat[3])
    frame.loc[3, "temp"] = 50.0
    summary = ingest_table(sqlite_url, _csv(path, frame), plant)
    assert summary.entities == ("NA", "null") and summary.rows_new == 2 * ROWS


def test_parquet_decimal_and_nullable_integer_sensors_become_floats(
    tmp_path: Path, sqlite_url: str, plant: str
) -> None:
    frame = _frame()
    frame["time"] = pd.to_datetime(frame["time"])
    frame["temp"] = frame["temp"].round(3).map(lambda v: decimal.Decimal(str(v)))
    frame["flow"] = frame["flow"].round().astype("Int64")
    path = tmp_path / "typed.parquet"
    frame.to_parquet(path)
    assert ingest_table(sqlite_url, path, plant).rows_new == 2 * ROWS
    frame.loc[3, "flow"] = pd.NA
    frame.to_parquet(path)
    contract = load_contract(plant)
    readings = coerce_readings(read_table(path, contract), contract, source=str(path))
    assert readings["flow"].dtype == np.float64 and np.isnan(readings["flow"].iat[3])


@pytest.mark.parametrize("index", [["time"], ["machine", "time"]])
def test_parquet_columns_stored_as_a_pandas_index_are_read_as_columns(
    tmp_path: Path, sqlite_url: str, plant: str, index: list[str]
) -> None:
    frame = _frame().assign(time=lambda f: pd.to_datetime(f["time"]))
    path = tmp_path / "indexed.parquet"
    frame.set_index(index).to_parquet(path)
    assert ingest_table(sqlite_url, path, plant).rows_new == 2 * ROWS
    contract, _ = infer_contract(path, name="draft")
    assert (contract.entity_column, contract.timestamp_column) == ("machine", "time")


def test_a_word_among_labels_is_named_not_every_label(
    tmp_path: Path, sqlite_url: str, plant: str
) -> None:
    frame = _frame()
    frame["label"] = frame["label"].astype(object)
    frame.loc[150, "label"] = "yes"
    with pytest.raises(DataContractError, match="values other than 0, 1 and blank") as raised:
        ingest_table(sqlite_url, _csv(tmp_path / "words.csv", frame), plant)
    assert "[label]: values other than 0, 1 and blank (dtype str): 1; e.g. ('pump-b', " in str(
        raised.value
    ) and "'yes')" in str(raised.value)
    assert _rows(sqlite_url) == 0


def test_timestamps_are_checked_as_stored_in_whole_microseconds(
    tmp_path: Path, sqlite_url: str, plant: str
) -> None:
    frame = _frame()
    frame["time"] = frame["time"] + ".000000100"
    frame.loc[1, "time"] = frame.loc[0, "time"][:-3] + "900"  # the same microsecond as row 0
    with pytest.raises(DataContractError, match="unique_timestamps_per_entity") as raised:
        ingest_table(sqlite_url, _csv(tmp_path / "ns.csv", frame), plant)
    assert "contradict" not in str(raised.value) and _rows(sqlite_url) == 0
    frame = frame.drop(index=1)
    path = _csv(tmp_path / "ns.csv", frame)
    assert ingest_table(sqlite_url, path, plant).rows_new == len(frame)
    assert ingest_table(sqlite_url, path, plant).rows_new == 0


@pytest.mark.parametrize("layout", ["wide", "long"])
def test_decimal_commas_are_named_as_such_at_ingest(
    tmp_path: Path, sqlite_url: str, plant: str, layout: str
) -> None:
    frame, contract = _frame(), plant
    if layout == "long":
        frame = frame.drop(columns="label").melt(["machine", "time"], var_name="tag")
        drafted, why = infer_contract(_csv(tmp_path / "long.csv", frame), name="plant_long")
        contract = str(write_contract(drafted, tmp_path / "plant_long.yaml", why))
    numbers = "temp" if layout == "wide" else "value"
    frame[numbers] = frame[numbers].map(lambda v: f"{v:.3f}".replace(".", ","))
    path = tmp_path / "semicolons.csv"
    frame.to_csv(path, sep=";", index=False)
    hint = r"\(decimal commas: write 1.5, not 1,5\)"
    with pytest.raises((DataContractError, IngestError), match=hint) as raised:
        ingest_table(sqlite_url, path, contract)
    assert str(path) in str(raised.value)
    assert _rows(sqlite_url) == _rows(sqlite_url, "plant_long_readings") == 0


def test_a_numeric_entity_id_names_one_entity_whatever_the_file_format(
    tmp_path: Path, sqlite_url: str, plant: str
) -> None:
    frame = _frame().assign(machine=np.repeat([1.0, 2.5], ROWS))  # float64, as Parquet keeps it
    frame.to_parquet(tmp_path / "day1.parquet")
    later = frame.assign(time=(pd.to_datetime(frame["time"]) + pd.Timedelta("2h")).astype(str))
    _csv(tmp_path / "day2.csv", later.assign(machine=np.repeat(["1", "2.5"], ROWS)))
    assert ingest_table(sqlite_url, tmp_path / "day1.parquet", plant).entities == ("1", "2.5")
    assert ingest_table(sqlite_url, tmp_path / "day2.csv", plant).entities == ("1", "2.5")
    with sa.create_engine(sqlite_url).connect() as conn:
        stored = conn.execute(sa.text("select entity, count(*) from plant_readings group by 1"))
        assert sorted(stored.tuples()) == [("1", 2 * ROWS), ("2.5", 2 * ROWS)]


# --- re-loading: idempotent, and stored readings are never changed ----------------------------


def test_reloads_add_only_new_rows_and_a_changed_value_is_refused_naming_the_file(
    tmp_path: Path, sqlite_url: str, plant: str
) -> None:
    frame = _frame()
    path = _csv(tmp_path / "day1.csv", frame)
    assert ingest_table(sqlite_url, path, plant).rows_new == 2 * ROWS
    assert ingest_table(sqlite_url, path, plant).rows_new == 0
    later = frame.assign(time=(pd.to_datetime(frame["time"]) + pd.Timedelta("2h")).astype(str))
    both = _csv(tmp_path / "both.csv", pd.concat([frame, later]))
    assert ingest_table(sqlite_url, both, plant).rows_new == 2 * ROWS
    changed = frame.copy()
    changed.loc[7, "temp"] += 0.5
    changed = _csv(tmp_path / "changed.csv", pd.concat([changed, later.assign(flow=10.5)]))
    with pytest.raises(DataContractError, match="rows contradict") as raised:
        ingest_table(sqlite_url, changed, plant)
    assert str(changed) in str(raised.value) and "temp: stored" in str(raised.value)
    assert _rows(sqlite_url) == 4 * ROWS


# --- drafting a contract: refusals that name the column and show examples ---------------------


@pytest.mark.parametrize(
    ("column", "values", "message"),
    [
        ("temp", {3: "1,5", 150: "2,5"}, r"'temp'.*decimal commas.*data row 4: '1,5'"),
        ("temp", {3: "ERR"}, r"'temp' holds numbers, but values that are not numbers: 1"),
        ("label", {100: 2, 230: -1}, r"'label' holds values other than 0, 1 and blank: 2"),
        ("label", {100: "true", 230: "false"}, r"data row 101: 'true'"),
        ("time", {4: "yesterday"}, r"'time'.*not ISO 8601 timestamps: 1; e.g. data row 5"),
        ("time", {4: "2024-01-01T00:04:00Z"}, r"'time': 239 timestamps carry no UTC offset"),
    ],
    ids=["decimal commas", "text in a sensor", "label 2", "label true", "bad time", "mixed tz"],
)
def test_draft_refuses_a_column_it_would_get_wrong(
    tmp_path: Path, column: str, values: dict[int, object], message: str
) -> None:
    frame = _frame()
    frame[column] = frame[column].astype(object)
    for row, value in values.items():
        frame.loc[row, column] = value
    path = _csv(tmp_path / "bad.csv", frame)
    with pytest.raises(IngestError, match=message) as raised:
        infer_contract(path, name="bad")
    assert str(path) in str(raised.value)


@pytest.mark.parametrize(
    ("blank_rows", "message"),
    [
        (range(2 * ROWS), r"blank in 240 of 240 rows; e.g. data row 1: '', data row 2: ''"),
        ([7, 130], r"blank in 2 of 240 rows; e.g. data row 8: '', data row 131: ''"),
    ],
    ids=["all", "some"],
)
def test_draft_refuses_a_blank_entity_naming_the_rows(
    tmp_path: Path, blank_rows: range | list[int], message: str
) -> None:
    frame = _frame()
    frame.loc[list(blank_rows), "machine"] = None
    path = _csv(tmp_path / "blank.csv", frame)
    with pytest.raises(IngestError, match=rf"{path}: entity column 'machine' is {message}"):
        infer_contract(path, name="bad", entity_column="machine")


def test_draft_refuses_numbers_stored_as_text(tmp_path: Path) -> None:
    frame = _frame()
    frame["temp"] = frame["temp"].astype(str)
    frame.to_parquet(tmp_path / "text.parquet")
    with pytest.raises(IngestError, match="'temp' holds numbers as text"):
        infer_contract(tmp_path / "text.parquet", name="bad")


def test_draft_names_a_timestamp_column_in_another_format(tmp_path: Path) -> None:
    frame = _frame()
    frame["time"] = pd.to_datetime(frame["time"]).dt.strftime("%d/%m/%Y %H:%M")
    with pytest.raises(IngestError, match=r"'time' holds e.g. '01/01/2024 00:00'"):
        infer_contract(_csv(tmp_path / "dayfirst.csv", frame), name="bad")


# --- drafting a contract: unusual but valid files draft a contract that accepts them ----------


def _unlabelled(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.assign(label=pd.array([None] * len(frame), dtype="Int64"))


def _sensor_names_like_key_columns(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.assign(Time=np.arange(len(frame), dtype=float))


def _infinite_value(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.assign(flow=frame["flow"].where(frame.index != 3, np.inf))


def _empty_sensor(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.assign(pressure=np.nan)


def _offsets_across_dst(frame: pd.DataFrame) -> pd.DataFrame:
    utc = pd.date_range("2024-10-27T00:00:00Z", periods=ROWS, freq="min")
    local = utc.tz_convert("Europe/Berlin").strftime("%Y-%m-%dT%H:%M:%S%z")
    return frame.assign(time=list(local) * 2)


def _integer_units(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.rename(columns={"machine": "unit"}).assign(unit=np.repeat([7, 8], ROWS))


def _non_latin_names(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.rename(columns={"temp": "温度", "flow": "Давление"})


def _one_row_each(frame: pd.DataFrame) -> pd.DataFrame:
    return _unlabelled(frame.groupby("machine").head(1))


@pytest.mark.parametrize(
    ("change", "check"),
    [
        (_unlabelled, lambda c: c.label_column == "label"),
        (_sensor_names_like_key_columns, lambda c: "s_time" in c.sensor_names),
        (_infinite_value, lambda c: np.isfinite([c.sensors[1].min, c.sensors[1].max]).all()),
        (_empty_sensor, lambda c: "pressure" not in c.sensor_names),
        (_offsets_across_dst, lambda c: c.timestamp_timezone == "aware"),
        (_integer_units, lambda c: c.entity_column == "unit"),
        (_one_row_each, lambda c: c.min_rows_per_entity == 1),
        (_non_latin_names, lambda c: [s.source for s in c.sensors] == ["温度", "Давление"]),
    ],
    ids=[
        *("no label yet", "Time beside time", "inf", "empty sensor", "DST", "unit 7", "one row"),
        "non-Latin sensor names",
    ],
)
def test_draft_of_an_unusual_file_accepts_it(
    tmp_path: Path,
    sqlite_url: str,
    change: Callable[[pd.DataFrame], pd.DataFrame],
    check: Callable[[Contract], bool],
) -> None:
    path = _csv(tmp_path / "unusual.csv", change(_frame()))
    contract, _ = infer_contract(path, name="draft")
    assert check(contract)
    if change is _infinite_value:  # drafted from the finite values; the inf is still refused
        with pytest.raises(DataContractError, match="finite_values"):
            _draft_and_load(path, sqlite_url)
        assert _rows(sqlite_url, "draft_readings") == 0
    else:
        assert _draft_and_load(path, sqlite_url) == len(pd.read_csv(path))


def test_draft_of_a_long_file_with_a_sensor_named_like_a_key_column(
    tmp_path: Path, sqlite_url: str
) -> None:
    long = _frame().drop(columns="label").melt(["machine", "time"], var_name="tag")
    long["tag"] = long["tag"].replace({"flow": "ts"})
    path = _csv(tmp_path / "long.csv", long)
    contract, _ = infer_contract(path, name="draft")
    assert contract.layout == "long" and contract.sensor_names == ["temp", "s_ts"]
    assert _draft_and_load(path, sqlite_url) == 2 * ROWS


# --- contract files ---------------------------------------------------------------------------


def test_a_contract_path_with_an_upper_case_suffix_is_read_and_registered(
    tmp_path: Path, sqlite_url: str, plant: str
) -> None:
    upper = Path(plant).rename(Path(plant).with_suffix(".YML"))
    assert ingest_table(sqlite_url, _csv(tmp_path / "day.csv", _frame()), str(upper)).rows_new
    assert load_contract("plant") == load_contract(upper)


def test_a_broken_or_missing_contract_file_is_a_contract_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text("name: plant\nversion: 1\nsensors:\n  colums: [a]\n")
    with pytest.raises(ContractError, match=rf"{path}.*unknown keys under sensors \['colums'\]"):
        load_contract(path)
    path.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ContractError, match="cannot be read"):
        load_contract(path)
    with pytest.raises(ContractNotFoundError):
        load_contract(tmp_path / "absent.yaml")
