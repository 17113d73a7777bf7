"""Benchmark loaders on tiny fixtures written in each published layout, quirks included."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data_contracts import load_contract
from tasks.errors import IngestError
from tasks.loaders import LOADERS
from tasks.loaders.nab import read_nab
from tasks.loaders.psm import read_psm
from tasks.loaders.skab import SENSORS as SKAB_SENSORS
from tasks.loaders.skab import read_skab
from tasks.loaders.swat import read_swat
from tasks.loaders.telemanom import read_msl, read_smap
from tasks.loaders.ucr import read_ucr
from tasks.validate import coerce_readings, validate_readings


def _wave(rows: int, seed: int = 0) -> np.ndarray:
    return np.sin(np.arange(rows) / 5) + np.random.default_rng(seed).normal(0, 0.05, rows)


def write_nab(root: Path) -> dict[str, int]:
    """Two labelled series (one with a DST repeat) and one file the windows file does not list."""
    stamps = pd.date_range("2014-04-01", periods=140, freq="5min")
    clean = stamps.strftime("%Y-%m-%d %H:%M:%S").tolist()
    repeated = [*clean[:60], clean[59], *clean[60:]]  # as in NAB's ec2_* files
    for group, name, text in (
        ("realX", "a", repeated),
        ("artificialNoAnomaly", "b", clean[:120]),
        ("realX", "c", clean[:120]),
    ):
        path = root / "data" / group / f"{name}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"timestamp": text, "value": _wave(len(text))}).to_csv(path, index=False)
    window = ["2014-04-01 08:20:00.000000", "2014-04-01 08:45:00.000000"]  # rows 100..105
    labels = {"realX/a.csv": [window], "artificialNoAnomaly/b.csv": []}
    (root / "labels").mkdir(parents=True)
    (root / "labels" / "combined_windows.json").write_text(json.dumps(labels, indent=4))
    return {"realX/a": 140, "artificialNoAnomaly/b": 120}


def _skab_run(rows: int, labelled: bool) -> pd.DataFrame:
    frame = pd.DataFrame({"datetime": pd.date_range("2020-03-09 10:14:33", periods=rows, freq="s")})
    for i, column in enumerate(SKAB_SENSORS):
        frame[column] = _wave(rows, i)
    if labelled:
        frame["anomaly"] = (np.arange(rows) >= 150).astype(float)
        frame["changepoint"] = (np.arange(rows) == 150).astype(float)
    return frame


def write_skab(root: Path) -> dict[str, int]:
    """The anomaly-free run and one valve run (anomaly from row 150), ';'-separated."""
    for folder, name, rows, labelled in (
        ("anomaly-free", "anomaly-free", 150, False),
        ("valve1", "0", 200, True),
    ):
        path = root / "data" / folder / f"{name}.csv"
        path.parent.mkdir(parents=True)
        _skab_run(rows, labelled).to_csv(path, sep=";", index=False)
    return {"anomaly-free/anomaly-free": 150, "valve1/0": 200}


def write_ucr(root: Path) -> dict[str, int]:
    """One file with a value per line, one with whitespace-separated values on a few lines."""
    root.mkdir(parents=True, exist_ok=True)
    values = _wave(150)
    text = "".join(f"   {v:.7e}\n" for v in values)
    (root / "001_UCR_Anomaly_Toy_60_100_105.txt").write_text(text)
    rows = [" ".join(f"{v:.7e}" for v in chunk) for chunk in np.array_split(values, 3)]
    (root / "002_UCR_Anomaly_ToyTwo_50_120_130.txt").write_text("\n".join(rows))
    return {"001_Toy": 150, "002_ToyTwo": 150}


def write_telemanom(root: Path) -> None:
    """SMAP P-1 and MSL M-1 with labels; SMAP A-9 listed twice; D-1 with data but no label row."""
    channels = {"P-1": 25, "A-9": 25, "D-1": 25, "M-1": 55}
    for number, (chan, width) in enumerate(channels.items()):
        for part, rows in (("train", 120), ("test", 110)):
            values = np.zeros((rows, width), np.float32)
            values[:, 0] = _wave(rows, number)
            values[::7, 1] = 1.0  # a command flag
            (root / part).mkdir(parents=True, exist_ok=True)
            np.save(root / part / f"{chan}.npy", values)
    rows = [
        ("P-1", "SMAP", "[[10, 20], [100, 109]]", "[point, contextual]", 110),
        ("A-9", "SMAP", "[[5, 9]]", "[point]", 110),
        ("A-9", "SMAP", "[[50, 60]]", "[point]", 110),
        ("M-1", "MSL", "[[0, 0]]", "[point]", 110),
    ]
    columns = ["chan_id", "spacecraft", "anomaly_sequences", "class", "num_values"]
    pd.DataFrame(rows, columns=columns).to_csv(root / "labeled_anomalies.csv", index=False)


def write_smap(root: Path) -> dict[str, int]:
    write_telemanom(root)
    return {"P-1": 230}


def write_msl(root: Path) -> dict[str, int]:
    write_telemanom(root)
    return {"M-1": 230}


def write_psm(root: Path) -> dict[str, int]:
    """Minutes 0..129 for train, 130..249 for test, with leading and inner NaNs."""
    root.mkdir(parents=True, exist_ok=True)
    for name, start, rows in (("train", 0, 130), ("test", 130, 120)):
        frame = pd.DataFrame({"timestamp_(min)": np.arange(start, start + rows, dtype=float)})
        for i in range(25):
            frame[f"feature_{i}"] = _wave(rows, i)
        if name == "train":
            frame.loc[:2, "feature_3"] = np.nan
            frame.loc[40:41, "feature_7"] = np.nan
        frame.to_csv(root / f"{name}.csv", index=False)
    label = (np.arange(120) >= 90) & (np.arange(120) < 95)
    pd.DataFrame(
        {"timestamp_(min)": np.arange(130, 250, dtype=float), "label": label.astype(float)}
    ).to_csv(root / "test_label.csv", index=False)
    return {"psm": 250}


def write_swat(root: Path) -> dict[str, int]:
    """A normal run with a spare line above the header, an attack run with the 'A ttack' typo."""
    root.mkdir(parents=True, exist_ok=True)
    sensors = [s.upper() for s in load_contract("swat").sensor_names]
    for name, start, rows in (
        ("SWaT_Dataset_Normal_v1", "2015-12-22 16:00", 110),
        ("SWaT_Dataset_Attack_v0", "2015-12-28 10:00", 110),
    ):
        stamps = pd.date_range(start, periods=rows, freq="s").strftime("%d/%m/%Y %I:%M:%S %p")
        frame = pd.DataFrame({" Timestamp": [f" {s}" for s in stamps]})
        for i, sensor in enumerate(sensors):
            frame[sensor] = np.abs(_wave(rows, i))
        flags = np.array(["Normal"] * rows, dtype=object)
        if "Attack" in name:
            flags[50:55], flags[55] = "Attack", "A ttack"
        frame["Normal/Attack"] = flags
        prefix = ",".join(["P1"] * (len(frame.columns))) + "\n" if "Normal" in name else ""
        (root / f"{name}.csv").write_text(prefix + frame.to_csv(index=False))
    return {"swat": 220}


LAYOUT_WRITERS = {
    "nab": write_nab,
    "skab": write_skab,
    "ucr": write_ucr,
    "smap": write_smap,
    "msl": write_msl,
    "psm": write_psm,
    "swat": write_swat,
}


@pytest.mark.parametrize("kind", sorted(LAYOUT_WRITERS))
def test_every_loader_gives_valid_warehouse_rows(tmp_path: Path, kind: str) -> None:
    expected = LAYOUT_WRITERS[kind](tmp_path)
    contract = load_contract(kind)
    frame = LOADERS[kind](tmp_path).frame
    assert list(frame.columns) == contract.warehouse_columns
    assert frame.groupby("entity").size().to_dict() == expected
    readings = coerce_readings(frame, contract, source=kind)
    assert validate_readings(readings, contract, source=kind).rows == sum(expected.values())
    for _, rows in frame.groupby("entity"):  # training range first, then labels
        labelled = rows["label"].notna().to_numpy()
        assert labelled.any() or kind == "skab"
        assert (np.diff(labelled.astype(int)) >= 0).all()


def test_nab_windows_probation_and_quirks(tmp_path: Path) -> None:
    write_nab(tmp_path)
    load = read_nab(tmp_path)
    a = load.frame[load.frame["entity"] == "realX/a"].reset_index(drop=True)
    assert a["label"].iloc[:21].isna().all() and a["label"].iloc[21:].notna().all()  # 15 %
    assert np.flatnonzero(a["label"].fillna(0).to_numpy()).tolist() == list(range(100, 106))
    assert load.skipped == ["realX/c.csv: no entry in labels/combined_windows.json"]
    assert load.notes == ["realX/a.csv: dropped 1 rows whose timestamp does not advance"]


def test_a_comma_ending_every_line_of_a_nab_file_adds_no_column(tmp_path: Path) -> None:
    write_nab(tmp_path)
    before = read_nab(tmp_path).frame
    path = tmp_path / "data" / "realX" / "a.csv"
    path.write_text("".join(f"{line},\n" for line in path.read_text().splitlines()))
    pd.testing.assert_frame_equal(read_nab(tmp_path).frame, before)


def test_nab_window_inside_probation_cuts_the_training_range(tmp_path: Path) -> None:
    write_nab(tmp_path)
    early = {
        "realX/a.csv": [["2014-04-01 01:00:00", "2014-04-01 01:10:00"]],
        "artificialNoAnomaly/b.csv": [],
        "realX/c.csv": [],
    }
    (tmp_path / "labels" / "combined_windows.json").write_text(json.dumps(early))
    a = read_nab(tmp_path).frame.query("entity == 'realX/a'")
    assert int(a["label"].isna().sum()) == 12 and a["label"].sum() == 3


def test_skab_runs_are_entities_with_a_normal_head(tmp_path: Path) -> None:
    write_skab(tmp_path)
    frame = read_skab(tmp_path, train_rows=100).frame
    run = frame[frame["entity"] == "valve1/0"]
    assert run["label"].iloc[:100].isna().all() and int(run["label"].sum()) == 50
    assert frame[frame["entity"] == "anomaly-free/anomaly-free"]["label"].isna().all()
    early = read_skab(tmp_path, train_rows=180)
    assert early.frame.query("entity == 'valve1/0'")["label"].isna().sum() == 150
    assert early.notes == [
        "valve1/0: an anomaly starts inside the first 180 rows; training "
        "range cut to its first 150 rows"
    ]


def test_ucr_labels_follow_the_file_name(tmp_path: Path) -> None:
    write_ucr(tmp_path)
    frame = read_ucr(tmp_path).frame
    one = frame[frame["entity"] == "001_Toy"]["label"]
    assert one.iloc[:60].isna().all()
    assert np.flatnonzero(one.fillna(0).to_numpy()).tolist() == list(range(100, 105))
    two = frame[frame["entity"] == "002_ToyTwo"]
    np.testing.assert_allclose(two["value"].to_numpy(), one.index.map(frame["value"]), atol=1e-6)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("003_UCR_Anomaly_X_10_5_8.txt", "1\n" * 20, "train_end <= begin"),
        ("003_UCR_Anomaly_X_5_10_30.txt", "1\n" * 20, "end <= 20"),
        (
            "003_UCR_Anomaly_X_5_10_12.txt",
            "1\n" * 10 + "n/a\n" + "1\n" * 9,
            "value 11 is not a number",
        ),
        ("Anomaly_X_5_10_12.txt", "1\n" * 20, None),
    ],
)
def test_ucr_bad_files(tmp_path: Path, name: str, content: str, message: str | None) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(IngestError, match=message or "no series found"):
        read_ucr(tmp_path)


def test_telemanom_channels_labels_and_skips(tmp_path: Path) -> None:
    write_telemanom(tmp_path)
    smap = read_smap(tmp_path)
    assert smap.skipped == [
        "A-9: listed 2 times in labeled_anomalies.csv",
        "D-1: data but no row in labeled_anomalies.csv",
    ]
    label = smap.frame["label"]
    assert label.iloc[:120].isna().all()
    anomalous = np.flatnonzero(label.iloc[120:].to_numpy(dtype=float))
    assert anomalous.tolist() == [*range(10, 21), *range(100, 110)]  # both ends inclusive
    msl = read_msl(tmp_path).frame
    assert len(load_contract("msl").sensor_names) == 55 and msl["label"].sum() == 1


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.assign(num_values=111), "num_values 111 but test/P-1.npy has 110"),
        (lambda t: t.assign(anomaly_sequences="[[100, 110]]"), r"\[100, 110\] outside"),
        (lambda t: t.assign(anomaly_sequences="100-110"), "is not \\[\\[start, end\\]"),
    ],
)
def test_telemanom_bad_labels(tmp_path: Path, edit, message: str) -> None:
    write_telemanom(tmp_path)
    path = tmp_path / "labeled_anomalies.csv"
    table = pd.read_csv(path)
    edit(table[table["chan_id"] == "P-1"]).to_csv(path, index=False)
    with pytest.raises(IngestError, match=message):
        read_smap(tmp_path)


def test_telemanom_wrong_width_names_the_file(tmp_path: Path) -> None:
    write_telemanom(tmp_path)
    np.save(tmp_path / "test" / "P-1.npy", np.zeros((110, 24)))
    with pytest.raises(IngestError, match=r"test/P-1.npy: expected a numeric \(rows, 25\)"):
        read_smap(tmp_path)


def test_psm_fills_gaps_and_keeps_minutes(tmp_path: Path) -> None:
    write_psm(tmp_path)
    load = read_psm(tmp_path)
    frame = load.frame
    assert not frame[load_contract("psm").sensor_names].isna().any().any()
    assert frame["feature_3"].iloc[0] == frame["feature_3"].iloc[3]  # leading gap: first value
    assert frame["feature_7"].iloc[41] == frame["feature_7"].iloc[39]  # carried forward
    assert frame["ts"].iloc[130] - frame["ts"].iloc[0] == pd.Timedelta(minutes=130)
    assert int(frame["label"].sum()) == 5 and frame["label"].iloc[:130].isna().all()
    assert load.notes == [
        "psm: filled 5 missing values in 2 features (last value carried forward; "
        "leading gaps take the first value)"
    ]


def test_psm_test_before_train_is_refused(tmp_path: Path) -> None:
    write_psm(tmp_path)
    for name in ("test", "test_label"):
        table = pd.read_csv(tmp_path / f"{name}.csv")
        table["timestamp_(min)"] -= 200
        table.to_csv(tmp_path / f"{name}.csv", index=False)
    with pytest.raises(IngestError, match="not after the last train minute 129"):
        read_psm(tmp_path)


def test_swat_labels_and_day_first_timestamps(tmp_path: Path) -> None:
    write_swat(tmp_path)
    frame = read_swat(tmp_path).frame
    assert frame["ts"].iloc[0] == pd.Timestamp("2015-12-22 16:00")
    assert frame["label"].iloc[:110].isna().all()
    assert np.flatnonzero(frame["label"].iloc[110:].to_numpy(dtype=float)).tolist() == list(
        range(50, 56)
    )


def test_swat_unknown_label_names_the_file(tmp_path: Path) -> None:
    write_swat(tmp_path)
    path = tmp_path / "SWaT_Dataset_Attack_v0.csv"
    path.write_text(path.read_text().replace(",Normal\n", ",Maybe\n", 1))
    with pytest.raises(IngestError, match="SWaT_Dataset_Attack_v0.csv: labels other than"):
        read_swat(tmp_path)


@pytest.mark.parametrize(
    ("kind", "file", "content", "key"),
    [
        ("nab", "data/realX/a.csv", None, "realX/a.csv"),
        ("nab", "data/realX/a.csv", "", "realX/a.csv"),
        ("skab", "data/valve1/0.csv", None, "valve1/0"),
        ("ucr", "003_UCR_Anomaly_X_5_10_12.txt", " \n", "003_UCR_Anomaly_X_5_10_12.txt"),
        ("swat", "SWaT_Dataset_Attack_v0.csv", None, "SWaT_Dataset_Attack_v0.csv"),
    ],
    ids=["nab header only", "nab empty", "skab header only", "ucr blank", "swat header only"],
)
def test_a_file_without_data_rows_is_skipped_and_reported(
    tmp_path: Path, kind: str, file: str, content: str | None, key: str
) -> None:
    expected = LAYOUT_WRITERS[kind](tmp_path)
    path = tmp_path / file
    path.write_text(path.read_text().partition("\n")[0] + "\n" if content is None else content)
    load = LOADERS[kind](tmp_path)
    assert f"{key}: no data rows" in load.skipped
    assert sorted(load.frame["entity"].unique()) == sorted(set(expected) - {"realX/a", "valve1/0"})


@pytest.mark.parametrize(
    ("kind", "file", "column", "sep"),
    [("skab", "data/valve1/0.csv", "anomaly", ";"), ("psm", "test_label.csv", "label", ",")],
)
def test_labels_other_than_0_1_are_counted_with_rows_and_values(
    tmp_path: Path, kind: str, file: str, column: str, sep: str
) -> None:
    LAYOUT_WRITERS[kind](tmp_path)
    path = tmp_path / file
    table = pd.read_csv(path, sep=sep)
    table.loc[[3, 100], column] = [2.0, 0.5] if kind == "skab" else [-1.0, np.nan]
    table.to_csv(path, sep=sep, index=False)
    shown = "2.0, data row 101: 0.5" if kind == "skab" else "-1.0, data row 101: nan"
    with pytest.raises(IngestError) as raised:
        LOADERS[kind](tmp_path)
    assert str(raised.value) == (
        f"{path}: column {column!r} holds values other than 0/1: 2; e.g. data row 4: {shown}"
    )


def test_a_decimal_comma_in_a_skab_file_is_named_as_such(tmp_path: Path) -> None:
    write_skab(tmp_path)
    path = tmp_path / "data" / "valve1" / "0.csv"
    _edit_line(path, 4, lambda s: s.replace(".", ",", 2).replace(",", ".", 1))
    with pytest.raises(IngestError, match=r"data row 3 is not a number: '[-\d]+,\d+' .*\(decimal"):
        read_skab(tmp_path)


def _edit_line(path: Path, line: int, edit) -> None:
    lines = path.read_text().splitlines()
    lines[line - 1] = edit(lines[line - 1])
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    ("kind", "change", "message"),
    [
        (
            "nab",
            lambda root: (root / "labels" / "combined_windows.json").unlink(),
            r"labels/combined_windows.json: cannot be read \(No such file",
        ),
        (
            "smap",
            lambda root: (root / "labeled_anomalies.csv").unlink(),
            r"labeled_anomalies.csv: cannot be read \(No such file",
        ),
        (
            "psm",
            lambda root: (root / "train.csv").write_text("timestamp_(min),feature_0\n"),
            "train.csv: no data rows",
        ),
        (
            "smap",  # a first data row one field longer: pandas would read it as an index
            lambda root: _edit_line(root / "labeled_anomalies.csv", 2, lambda s: f"x,{s}"),
            "labeled_anomalies.csv: lines without the header's 5 fields: 1; e.g. line 2: 6",
        ),
        (
            "smap",
            lambda root: _edit_line(
                root / "labeled_anomalies.csv", 2, lambda s: s.rsplit(",", 1)[0] + ",1l0"
            ),
            "row 'P-1': num_values 1l0 but test/P-1.npy has 110 rows",
        ),
        (
            "smap",
            lambda root: _edit_line(root / "labeled_anomalies.csv", 2, lambda s: s[3:]),
            "labeled_anomalies.csv: chan_id is blank on 1 rows; e.g. data row 1",
        ),
        (
            "swat",  # a cut-off last line, not 'labels other than Normal/Attack'
            lambda root: _edit_line(root / "SWaT_Dataset_Attack_v0.csv", 12, lambda s: s[:30]),
            r"SWaT_Dataset_Attack_v0.csv: lines without the header's 53 fields: 1; e.g. line 12",
        ),
        (
            "nab",
            lambda root: _edit_line(
                root / "data" / "realX" / "a.csv", 6, lambda s: "01/04/2014 00:20," + s[20:]
            ),
            r"a.csv: column 'timestamp', data row 5 is not an ISO 8601 timestamp: '01/04/2014",
        ),
        (
            "nab",
            lambda root: _edit_line(
                root / "data" / "realX" / "a.csv", 6, lambda s: s.replace(",", "+02:00,")
            ),
            r"a.csv: column 'timestamp', data row 5 has another UTC offset than data row 1",
        ),
        (
            "skab",
            lambda root: _edit_line(
                root / "data" / "valve1" / "0.csv", 4, lambda s: ";" + s.split(";", 1)[1]
            ),
            r"0.csv: column 'datetime', data row 3 is not an ISO 8601 timestamp: nan",
        ),
    ],
    ids=[
        "nab windows file missing",
        "telemanom label file missing",
        "psm header only",
        "telemanom ragged label row",
        "telemanom num_values not a number",
        "telemanom blank chan_id",
        "swat short row",
        "nab day-first timestamp",
        "nab offset beside none",
        "skab blank timestamp",
    ],
)
def test_a_broken_layout_is_an_ingest_error_naming_the_file(
    tmp_path: Path, kind: str, change, message: str
) -> None:
    LAYOUT_WRITERS[kind](tmp_path)
    change(tmp_path)
    with pytest.raises(IngestError, match=message) as raised:
        LOADERS[kind](tmp_path)
    assert str(tmp_path) in str(raised.value) and "\n" not in str(raised.value)
