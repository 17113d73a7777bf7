"""Readings validation: clean frames pass, broken rules are named with examples, nothing crashes."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from html import escape
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from data_contracts import Contract, load_contract
from data_contracts.contract import contract_from_dict
from tasks.errors import DataContractError
from tasks.validate import ValidationReport, coerce_readings, validate_readings

SMD = load_contract("smd")
# Same rules as SMD on three sensors: GX costs about 6 ms per expectation, so tests stay fast.
SMALL = dataclasses.replace(SMD, sensors=SMD.sensors[:3], min_rows_per_entity=10)
SOURCE = "data/machine.csv"


@pytest.fixture(scope="module", autouse=True)
def atp_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every validation run writes a Data Docs page under ATP_HOME: a temporary one here."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ATP_HOME", str(home))
        yield home


def readings(contract: Contract = SMALL, rows: int = 20) -> pd.DataFrame:
    rng = np.random.default_rng(7)
    parts = [
        pd.DataFrame(
            {
                "entity": entity,
                "ts": pd.date_range("2020-01-01", periods=rows, freq="min"),
                **{name: rng.uniform(0.0, 1.0, rows) for name in contract.sensor_names},
                "label": rng.integers(0, 2, rows),
            }
        )
        for entity in ("m-1", "m-2")
    ]
    return pd.concat(parts, ignore_index=True)


def report_of(frame: pd.DataFrame, contract: Contract = SMALL, **kwargs: int) -> str:
    with pytest.raises(DataContractError) as caught:
        validate_readings(frame, contract, source=SOURCE, **kwargs)
    return caught.value.report


def docs_of(report: str) -> str:
    """The HTML of the Data Docs page that the report's last line names."""
    prefix = "Data Docs: "
    last = report.splitlines()[-1]
    assert last.startswith(prefix), report
    return Path(last.removeprefix(prefix)).read_text(encoding="utf-8")


def line_of(report: str, rule: str, column: str | None) -> str:
    prefix = f"- {rule} [{column}]:" if column else f"- {rule}:"
    lines = [line for line in report.splitlines() if line.startswith(prefix)]
    assert lines, f"no {prefix!r} line in:\n{report}"
    return lines[0]


def test_clean_smd_frame_passes() -> None:
    report = validate_readings(readings(SMD, rows=120), SMD, source=SOURCE)
    assert report == ValidationReport(SOURCE, 240, 2, report.checks, report.checks, report.docs)
    assert report.checks > 3 * len(SMD.sensors)


def test_smd_frame_with_nan_fails_on_the_full_contract() -> None:
    frame = readings(SMD, rows=120)
    frame.loc[130, "m38"] = np.nan
    line = line_of(report_of(frame, SMD), "expect_column_values_to_not_be_null", "m38")
    assert "null or NaN values: 1; e.g. ('m-2', 2020-01-01 00:10:00, nan)" in line


def _set(row: int, column: str, value: object) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def mutate(frame: pd.DataFrame) -> pd.DataFrame:
        frame[column] = frame[column].astype(object) if isinstance(value, str) else frame[column]
        frame.loc[row, column] = value
        return frame

    return mutate


def _text_column(frame: pd.DataFrame) -> pd.DataFrame:
    frame["m01"] = frame["m01"].astype(str)  # what a CSV reader gives for a column holding text
    frame.loc[2, "m01"] = "n/a"
    return frame


def _swap_ts(frame: pd.DataFrame) -> pd.DataFrame:
    frame.loc[[8, 9], "ts"] = frame.loc[[9, 8], "ts"].to_numpy()
    return frame


CASES = {
    "nan": (_set(3, "m02", np.nan), "expect_column_values_to_not_be_null", "m02", "00:03:00, nan)"),
    "inf": (_set(4, "m01", np.inf), "finite_values", "m01", "('m-1', 2020-01-01 00:04:00, inf)"),
    "range": (_set(5, "m03", 1e6), "expect_column_values_to_be_between", "m03", "1000000.0)"),
    "missing": (lambda f: f.drop(columns="m02"), "expect_column_to_exist", "m02", "affected: 40"),
    "extra": (
        lambda f: f.assign(pressure=1.0),
        "expect_table_columns_to_match_set",
        None,
        "['pressure']",
    ),
    "text": (_text_column, "expect_column_values_to_be_in_type_list", "m01", "00:02:00, 'n/a')"),
    "mixed": (_set(6, "m01", "oops"), "expect_column_values_to_be_in_type_list", "m01", "'oops')"),
    "dup": (
        _set(7, "ts", pd.Timestamp("2020-01-01 00:06")),
        "unique_timestamps_per_entity",
        "ts",
        "('m-1', 2020-01-01 00:06:00, 2020-01-01 00:06:00)",
    ),
    "decreasing": (
        _swap_ts,
        "increasing_timestamps_per_entity",
        "ts",
        "('m-1', 2020-01-01 00:08:00",
    ),
    "aware": (
        lambda f: f.assign(ts=f["ts"].dt.tz_localize("UTC")),
        "timestamp_timezone",
        "ts",
        "2020-01-01 00:00:00+00:00",
    ),
    "label": (_set(1, "label", 2), "expect_column_values_to_be_in_set", "label", "00:01:00, 2)"),
    "empty": (lambda f: f.iloc[:0], "expect_table_row_count_to_be_between", None, "required: 0"),
}


@pytest.mark.parametrize("case", CASES)
def test_broken_rule_is_named_with_examples(case: str) -> None:
    mutate, rule, column, example = CASES[case]
    report = report_of(mutate(readings()))
    assert report.splitlines()[0].startswith(f"data contract smd v1 broken by {SOURCE}:")
    assert example in line_of(report, rule, column)


def test_series_shorter_than_min_rows_fails() -> None:
    validate_readings(readings(rows=20), SMALL, source=SOURCE, min_rows=20)
    line = line_of(report_of(readings(rows=20), min_rows=21), "min_rows_per_entity", "entity")
    assert "fewer than 21 rows: 2; e.g. ('m-1', -, 20 rows), ('m-2', -, 20 rows)" in line
    line_of(report_of(readings(rows=5)), "min_rows_per_entity", "entity")  # contract's 10


def test_every_broken_rule_is_reported_with_at_most_five_examples() -> None:
    frame = readings()
    frame.loc[0:9, "m02"] = np.nan
    frame.loc[3, "m03"] = -np.inf
    report = report_of(frame.drop(columns="label"))
    assert len(report.splitlines()) == 1 + 4 + 1  # not null, range, finite, missing label; docs
    assert line_of(report, "expect_column_values_to_not_be_null", "m02").count("('m-1'") == 5
    assert ": 10; e.g." in report


def test_accepted_variants() -> None:
    frame = readings()
    validate_readings(frame[frame.columns[::-1]], SMALL, source=SOURCE)  # column order
    validate_readings(frame.set_index(frame.index + 100), SMALL, source=SOURCE)  # any index
    ints = frame.assign(m01=np.arange(len(frame)) % 2, m02=frame["m02"].astype("Float64"))
    validate_readings(ints, SMALL, source=SOURCE)  # int and nullable float sensors
    first = dataclasses.replace(SMALL.sensors[0], nullable=True)
    nullable = dataclasses.replace(SMALL, sensors=(first, *SMALL.sensors[1:]))
    validate_readings(frame.assign(m01=np.nan), nullable, source=SOURCE)
    unlabelled = dataclasses.replace(SMALL, label_column=None)
    validate_readings(frame.drop(columns="label"), unlabelled, source=SOURCE)
    with_nulls = frame.assign(label=pd.array([pd.NA] * len(frame), dtype="Int64"))
    validate_readings(with_nulls, SMALL, source=SOURCE)


def test_aware_contract_accepts_aware_and_warehouse_naive_timestamps() -> None:
    aware = dataclasses.replace(SMALL, timestamp_timezone="aware")
    frame = readings()
    paris = frame.assign(ts=frame["ts"].dt.tz_localize("Europe/Paris"))
    validate_readings(paris, aware, source=SOURCE)
    validate_readings(frame, aware, source=SOURCE)
    mixed = frame.astype({"ts": object})
    mixed.loc[3, "ts"] = pd.Timestamp("2020-01-01 00:03", tz="UTC")
    line = line_of(report_of(mixed), "timestamp_timezone", "ts")
    assert "mixed naive and aware timestamps (39 naive, 1 aware)" in line


def test_validation_writes_nothing_back() -> None:
    frame = readings()
    frame.loc[3, "m02"] = np.inf
    before = frame.copy()
    report_of(frame.assign(ts=frame["ts"].dt.tz_localize("UTC")))
    pd.testing.assert_frame_equal(frame, before)


PASSED = ("passed",)


def verdict(frame: pd.DataFrame, contract: Contract = SMALL) -> tuple[str, ...]:
    """A run's outcome: ``PASSED``, or its report without the Data Docs line."""
    try:
        validate_readings(frame, contract, source=SOURCE)
    except DataContractError as error:
        return tuple(error.report.splitlines()[:-1])
    return PASSED


def test_verdicts_do_not_depend_on_other_runs() -> None:
    """No state leaks between runs: in turn, between contracts, or across threads at once."""
    good, bad = readings(), _set(5, "m03", 1e6)(readings())
    failed = verdict(bad)
    assert failed == (
        f"data contract smd v1 broken by {SOURCE}: 1 rule(s) failed out of 28 checked",
        "- expect_column_values_to_be_between [m03]: values outside [-1.0, 2.0]: 1; "
        "e.g. ('m-1', 2020-01-01 00:05:00, 1000000.0)",
    )
    assert [verdict(good), verdict(bad), verdict(good)] == [PASSED, failed, PASSED]
    # same name and version, one rule apart: each run follows the contract it is given
    m03 = dataclasses.replace(SMALL.sensors[2], max=1e7)
    wider = dataclasses.replace(SMALL, sensors=(*SMALL.sensors[:2], m03))
    assert [verdict(bad, wider), verdict(bad), verdict(bad, wider)] == [PASSED, failed, PASSED]
    with ThreadPoolExecutor(4) as pool:
        verdicts = list(pool.map(verdict, [good, bad] * 4))
    assert verdicts == [PASSED, failed] * 4


# --- coerce_readings: source names and text timestamps to the warehouse form --------------------

PLANT = contract_from_dict(
    {
        "name": "plant",
        "version": 2,
        "entity_column": "machine",
        "timestamp_column": "time",
        "label_column": "anomaly",
        "timestamp_timezone": "aware",
        "min_rows_per_entity": 2,
        "sensors": {"columns": ["temp", {"name": "flow", "nullable": True}]},
    }
)


def plant_source(times: list[str]) -> pd.DataFrame:
    rows = len(times)
    return pd.DataFrame(
        {
            "flow": [1.0] * rows,
            "anomaly": [0] * rows,
            "time": times,
            "machine": ["p1"] * rows,
            "temp": np.linspace(0, 1, rows),
        }
    )


def coerce_report(frame: pd.DataFrame, contract: Contract = PLANT) -> str:
    with pytest.raises(DataContractError) as caught:
        coerce_readings(frame, contract, source="plant.csv")
    return caught.value.report


def test_coerce_renames_orders_and_converts_to_naive_utc() -> None:
    times = ["2024-03-31T00:30:00+01:00", "2024-03-31T03:30:00+02:00", "2024-03-31T02:00:00Z"]
    out = coerce_readings(plant_source(times), PLANT, source="plant.csv")
    assert list(out.columns) == ["entity", "ts", "temp", "flow", "label"]
    assert list(out["ts"]) == [
        pd.Timestamp("2024-03-30 23:30"),
        pd.Timestamp("2024-03-31 01:30"),
        pd.Timestamp("2024-03-31 02:00"),
    ]
    assert validate_readings(out, PLANT, source="plant.csv").rows == 3


def test_coerce_naive_text_for_a_naive_contract() -> None:
    frame = readings().astype({"ts": str})
    frame["ts"] = frame["ts"].str.replace(" ", "T")
    out = coerce_readings(frame, SMALL, source=SOURCE)
    pd.testing.assert_series_equal(out["ts"], readings()["ts"], check_dtype=False)
    validate_readings(out, SMALL, source=SOURCE)


@pytest.mark.parametrize(
    ("times", "rule", "example"),
    [
        (["2024-01-01T00:00Z", "yesterday"], "timestamp_parse", "('p1', 'yesterday', 'yesterday')"),
        (["2024-01-01T00:00", "2024-01-01T00:01"], "timestamp_timezone", "naive timestamps where"),
        (["2024-01-01T00:00Z", "2024-01-01T00:01"], "timestamp_timezone", "(1 naive, 1 aware)"),
    ],
)
def test_coerce_reports_bad_timestamps(times: list[str], rule: str, example: str) -> None:
    assert example in line_of(coerce_report(plant_source(times)), rule, "ts")


def test_coerce_reports_aware_text_for_a_naive_contract_and_numbers() -> None:
    frame = readings().astype({"ts": str})
    report = coerce_report(frame.assign(ts=frame["ts"] + "Z"), SMALL)
    line = line_of(report, "timestamp_timezone", "ts")
    assert "time-zone-aware timestamps where naive UTC is required: 40" in line
    line = line_of(coerce_report(frame.assign(ts=range(40)), SMALL), "timestamp_parse", "ts")
    assert "values of dtype int64" in line


def test_coerce_columns() -> None:
    source = plant_source(["2024-01-01T00:00:00Z", "2024-01-01T00:01:00Z"])
    assert list(coerce_readings(source.assign(x=1), PLANT, source="p").columns) == [
        "entity",
        "ts",
        "temp",
        "flow",
        "label",
        "x",
    ]
    ignoring = dataclasses.replace(PLANT, extra_columns="ignore")
    assert "x" not in coerce_readings(source.assign(x=1), ignoring, source="p").columns
    line = line_of(coerce_report(source.assign(entity="p2")), "unique_column_names", None)
    assert "['entity']" in line
    blank = coerce_readings(source.assign(time=["2024-01-01T00:00:00Z", " "]), PLANT, source="p")
    line_of(report_of(blank, PLANT), "expect_column_values_to_not_be_null", "ts")


# --- property: random frames give a report or a contract error, never another exception --------

CELLS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-3, 3),
    st.none(),
    st.sampled_from(["n/a", "1.5", "", "inf"]),
)
TIMES = st.one_of(
    st.integers(0, 40).map(lambda m: f"2020-01-01T00:{m:02d}:00"),
    st.integers(0, 40).map(lambda m: f"2020-01-01T00:{m:02d}:00+01:00"),
    st.sampled_from(["", "garbage", "2020-13-45T00:00:00"]),
)


@st.composite
def frames(draw: st.DrawFn) -> tuple[pd.DataFrame, bool]:
    """Mostly clean frames with, each now and then, one kind of damage or more."""
    rows = draw(st.integers(0, 24))

    def column(values: st.SearchStrategy) -> list:
        return draw(st.lists(values, min_size=rows, max_size=rows))

    def now_and_then() -> bool:
        return draw(st.integers(0, 5)) == 5

    minutes = sorted(draw(st.lists(st.integers(0, 500), min_size=rows, max_size=rows, unique=True)))
    if now_and_then():
        minutes = column(st.integers(0, 30))  # duplicates and decreasing timestamps
    data: dict[str, object] = {
        "entity": column(st.sampled_from(["a", "b", "c"])),
        "ts": pd.Timestamp("2020-01-01") + pd.to_timedelta(minutes, unit="min"),
    }
    clean = st.floats(-1.0, 2.0)
    for name in SMALL.sensor_names:
        data[name] = column(st.one_of(clean, CELLS) if now_and_then() else clean)
    data["label"] = column(st.sampled_from([0, 1, 2, None] if now_and_then() else [0, 1]))
    frame = pd.DataFrame(data)
    if now_and_then():
        frame = frame.drop(columns=draw(st.sampled_from(list(frame.columns))))
    if now_and_then():
        frame["extra"] = 0.0
    as_text = "ts" in frame and now_and_then()
    if as_text:
        frame["ts"] = column(TIMES)
    return frame, as_text


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames())
def test_random_frames_pass_or_fail_cleanly(case: tuple[pd.DataFrame, bool]) -> None:
    frame, as_text = case
    before = frame.copy()
    try:
        readings_ = coerce_readings(frame, SMALL, source="random.csv") if as_text else frame
        report = validate_readings(readings_, SMALL, source="random.csv", min_rows=1)
    except DataContractError as error:
        assert error.report.startswith("data contract smd v1 broken by random.csv:")
        assert len(error.report.splitlines()) >= 2
        event("contract error")
    else:
        assert report.rows == len(frame) > 0 and report.checks == report.passed
        event("clean")
    pd.testing.assert_frame_equal(frame, before)


# --- Data Docs: one HTML page per validation run, passed or failed ------------------------------


def test_each_run_writes_its_own_data_docs_page_under_atp_home(atp_home: Path) -> None:
    first = validate_readings(readings(), SMALL, source=SOURCE)
    second = validate_readings(readings(), SMALL, source=SOURCE)
    assert first.docs != second.docs and first.docs.is_file() and second.docs.is_file()
    assert first.docs.parent == atp_home / "data_docs" / "outside-flow-runs"
    assert re.fullmatch(r"\d{8}T\d{12}Z-smd-passed-[0-9a-f]{4}\.html", first.docs.name)
    html = first.docs.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    assert f"Data contract smd v1 on {SOURCE}" in html
    assert f"passed: all {first.checks} checks" in html
    assert "Expectation Validation Result" in html and "smd_v1" in html  # GX's own rendering


def test_failing_run_page_names_the_contract_and_each_broken_rule() -> None:
    frame = _swap_ts(_set(5, "m03", 1e6)(readings()))
    report = report_of(frame)
    html = docs_of(report)
    assert "-smd-failed-" in report.splitlines()[-1]
    assert f"Data contract smd v1 on {SOURCE}" in html
    assert "failed: 2 rule(s) broken" in html
    for rule, example in (
        ("expect_column_values_to_be_between", "1000000.0"),  # a GX rule
        ("increasing_timestamps_per_entity", "('m-1', 2020-01-01 00:08:00"),  # a pandas rule
    ):
        assert rule in html and escape(example) in html
    assert "Unsuccessful Expectations" in html  # GX's statistics of the suite


def test_page_escapes_values_from_the_data() -> None:
    frame = readings().replace({"entity": {"m-1": "<script>alert(1)</script>"}})
    frame.loc[5, "m03"] = 1e6
    html = docs_of(report_of(frame))
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_failure_found_before_great_expectations_runs_has_its_page_too() -> None:
    html = docs_of(coerce_report(plant_source(["2024-01-01T00:00Z", "yesterday"])))
    assert "Data contract plant v2 on plant.csv" in html
    assert "timestamp_parse" in html and "values that are not ISO 8601 timestamps" in html
