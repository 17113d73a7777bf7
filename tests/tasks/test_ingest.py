"""Ingest: the bundled SMD sample, broken SMD files built in tmp_path, generic CSV/Parquet."""

from __future__ import annotations

import gzip
import hashlib
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data_contracts.contract import load_contract
from tasks.errors import IngestError
from tasks.ingest import SMD_ORIGIN, file_sha256, read_smd, read_table

SAMPLE = Path(__file__).parents[2] / "data" / "sample"
SMD = load_contract("smd")
WIDTH = len(SMD.sensor_names)
SAMPLE_MACHINES = {  # machine: (train rows, test rows, anomalous test rows)
    "machine-1-7": (23697, 23697, 2398),
    "machine-2-3": (23688, 23689, 269),
    "machine-2-8": (23702, 23703, 161),
}


def smd_lines(n: int, offset: float = 0.0) -> str:
    values = np.arange(n * WIDTH).reshape(n, WIDTH) % 97 / 100 + offset
    return "".join(",".join(f"{v:g}" for v in row) + "\n" for row in values)


def write_smd(root: Path, files: dict[str, str | bytes], name: str = "machine-9-1") -> Path:
    """Write ``{part/suffix: content}`` for one machine; str content is gzipped for .txt.gz."""
    for where, content in files.items():
        part, _, suffix = where.partition("/")
        path = root / part / f"{name}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            content = gzip.compress(content.encode()) if suffix == ".txt.gz" else content.encode()
        path.write_bytes(content)
    for part in ("train", "test", "test_label"):
        (root / part).mkdir(parents=True, exist_ok=True)
    return root


def good_machine(
    train: str | bytes | None = None,
    test: str | bytes | None = None,
    labels: str | bytes = "0\n1\n0\n",
) -> dict[str, str | bytes]:
    return {
        "train/.txt.gz": smd_lines(4) if train is None else train,
        "test/.txt.gz": smd_lines(3, 0.5) if test is None else test,
        "test_label/.txt": labels,
    }


def test_sample_is_one_minute_series_per_machine_with_test_labels() -> None:
    load = read_smd(SAMPLE)
    frame = load.frame
    assert load.skipped == ["machine-1-1"]
    assert list(frame.columns) == ["entity", "ts", *SMD.sensor_names, "label"]
    assert [path.parent.name for path in load.files] == ["train", "test", "test_label"] * 3
    for entity, (train, test, anomalies) in SAMPLE_MACHINES.items():
        rows = frame[frame["entity"] == entity]
        assert len(rows) == train + test
        assert rows["label"].iloc[:train].isna().all()
        assert rows["label"].iloc[train:].notna().all()
        assert int(rows["label"].sum()) == anomalies
        assert rows["ts"].iloc[0] == pd.Timestamp(SMD_ORIGIN)
        assert (rows["ts"].diff().iloc[1:] == pd.Timedelta(minutes=1)).all()
    with gzip.open(SAMPLE / "test" / "machine-2-3.txt.gz", "rt") as handle:
        first_test_row = [float(v) for v in handle.readline().split(",")]
    rows = frame[frame["entity"] == "machine-2-3"]
    assert rows[SMD.sensor_names].iloc[23688].tolist() == first_test_row
    assert frame[SMD.sensor_names].dtypes.eq(np.float64).all()
    assert str(frame["label"].dtype) == "Int64"


def test_parent_folder_and_plain_text_files_are_accepted(tmp_path: Path) -> None:
    files = {"train/.txt": smd_lines(4), "test/.txt": smd_lines(3), "test_label/.txt": "0\n0\n1\n"}
    write_smd(tmp_path / "ServerMachineDataset", files)
    load = read_smd(tmp_path)
    assert len(load.frame) == 7
    assert load.frame["label"].tolist()[4:] == [0, 0, 1]
    assert load.skipped == []


def test_blank_lines_at_the_end_of_smd_files_are_not_rows(tmp_path: Path) -> None:
    files = {"train/.txt": smd_lines(4), "test/.txt": smd_lines(3), "test_label/.txt": "0\n0\n1\n"}
    write_smd(tmp_path / "plain", files)
    padded = {name: text + "\n \n\n" for name, text in files.items()}
    write_smd(tmp_path / "padded", padded)
    pd.testing.assert_frame_equal(
        read_smd(tmp_path / "padded").frame, read_smd(tmp_path / "plain").frame
    )


def test_label_only_machine_is_skipped_not_loaded(tmp_path: Path) -> None:
    write_smd(tmp_path, good_machine())
    write_smd(tmp_path, {"test_label/.txt": "0\n1\n"}, name="machine-9-2")
    load = read_smd(tmp_path)
    assert load.skipped == ["machine-9-2"]
    assert set(load.frame["entity"]) == {"machine-9-1"}


def truncated_gzip() -> bytes:
    data = gzip.compress(smd_lines(50).encode())
    return data[: len(data) // 2]


BROKEN = {
    "ragged row": (
        good_machine(train=smd_lines(2) + "1,2,3\n"),
        r"train/machine-9-1\.txt\.gz: line 3 has 3 values, expected 38: '1,2,3'",
    ),
    "blank line": (
        good_machine(test=smd_lines(1) + "\n" + smd_lines(1)),
        r"test/machine-9-1\.txt\.gz: line 2 has 1 values",
    ),
    "text value": (
        good_machine(test=smd_lines(1) + "abc" + smd_lines(1)[1:] + smd_lines(1)),
        r"test/machine-9-1\.txt\.gz: line 2, value 1 is not a number: 'abc",
    ),
    "nan value": (
        good_machine(train="nan" + smd_lines(1)[1:]),
        r"train/machine-9-1\.txt\.gz: line 1, value 1 is not a number: 'nan'",
    ),
    "label length": (
        good_machine(labels="0\n1\n"),
        r"test_label/machine-9-1\.txt: 2 labels, but .*/test/machine-9-1\.txt\.gz "
        "has 3 rows",
    ),
    "label value": (
        good_machine(labels="0\n2\n0\n"),
        r"test_label/machine-9-1\.txt: line 2 is not a 0/1 label: '2'",
    ),
    "truncated gzip": (
        good_machine(train=truncated_gzip()),
        r"train/machine-9-1\.txt\.gz: truncated or corrupt gzip",
    ),
    "plain text named .gz": (
        good_machine(test=smd_lines(3).encode()),
        r"test/machine-9-1\.txt\.gz: named \.gz but is not gzip",
    ),
    "gzip named .txt": (
        good_machine(labels=gzip.compress(b"0\n1\n0\n")),
        r"test_label/machine-9-1\.txt: gzip data in a file not named \.gz",
    ),
    "empty file": (good_machine(train=b""), r"train/machine-9-1\.txt\.gz: named \.gz but is not"),
    "empty text": (good_machine(train=""), r"train/machine-9-1\.txt\.gz: empty file"),
    "binary": (good_machine(labels=b"0\n\x00\x01\n"), r"test_label/machine-9-1\.txt: binary data"),
    "test missing": (
        {"train/.txt.gz": smd_lines(3), "test_label/.txt": "0\n"},
        r"machine-9-1: found .* but no test file",
    ),
    "labels missing": (
        {"train/.txt.gz": smd_lines(3), "test/.txt.gz": smd_lines(3)},
        r"machine-9-1: found .* but no test_label file",
    ),
}


@pytest.mark.parametrize("files, message", BROKEN.values(), ids=BROKEN.keys())
def test_broken_smd_files_raise_naming_the_file(
    tmp_path: Path, files: dict[str, str | bytes], message: str
) -> None:
    write_smd(tmp_path, good_machine(), name="machine-1-1")  # a good machine does not save the load
    write_smd(tmp_path, files)
    with pytest.raises(IngestError, match=message):
        read_smd(tmp_path)


def test_smd_layout_problems_are_errors(tmp_path: Path) -> None:
    with pytest.raises(IngestError, match="not the SMD layout, missing folders"):
        read_smd(tmp_path)
    write_smd(tmp_path, {**good_machine(), "train/.txt": smd_lines(4)})
    with pytest.raises(IngestError, match=r"train holds both \.txt and \.txt\.gz"):
        read_smd(tmp_path)


def test_smd_with_no_data_at_all_is_an_error(tmp_path: Path) -> None:
    write_smd(tmp_path, {"test_label/.txt": "0\n"})
    with pytest.raises(IngestError, match="no machine has train and test data"):
        read_smd(tmp_path)


CSV = "entity,ts,m01,m02\n007,2024-01-01T00:00:00Z,0.5,1\n007,2024-01-01T00:01:00Z,0.25,2\n"


@pytest.mark.parametrize(
    "name, content",
    [
        ("a.csv", CSV.encode()),
        ("a.csv", CSV.replace(",", ";").encode()),
        ("a.csv", ("\ufeff" + CSV).encode()),
        ("a.csv.gz", gzip.compress(CSV.encode())),
    ],
    ids=["comma", "semicolon", "bom", "gzip"],
)
def test_csv_is_read_as_written(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    frame = read_table(path, SMD)
    assert list(frame.columns) == ["entity", "ts", "m01", "m02"]
    assert frame["entity"].tolist() == ["007", "007"]
    assert frame["ts"].tolist() == ["2024-01-01T00:00:00Z", "2024-01-01T00:01:00Z"]
    assert frame["m01"].tolist() == [0.5, 0.25]


def test_parquet_is_read_as_written(tmp_path: Path) -> None:
    expected = pd.DataFrame(
        {"entity": ["a", "b"], "ts": pd.to_datetime(["2024-01-01"] * 2), "m01": [0.5, 0.25]}
    )
    expected.to_parquet(tmp_path / "a.parquet")
    pd.testing.assert_frame_equal(read_table(tmp_path / "a.parquet", SMD), expected)


def parquet_bytes() -> bytes:
    buffer = io.BytesIO()
    pd.DataFrame({"m01": [1.0]}).to_parquet(buffer)
    return buffer.getvalue()


BAD_TABLES = {
    "empty": ("a.csv", b"", "empty file"),
    "blank": ("a.csv", b"\n \n", "empty file"),
    "header only": ("a.csv", b"entity,ts,m01\n", "no data rows"),
    "parquet named csv": ("a.csv", parquet_bytes(), "binary data, not text"),
    "csv named parquet": ("a.parquet", CSV.encode(), "not a readable Parquet file"),
    "empty parquet": ("a.parquet", b"", "empty file"),
    "plain named gz": ("a.csv.gz", CSV.encode(), r"named \.gz but is not gzip"),
    "ragged": ("a.csv", b"entity,ts,m01\na,b,1\na,b,1,2\n", "line 3: 4 fields"),
    "latin-1": ("a.csv", "entity,ts\nm\xfcnchen,1\n".encode("latin-1"), "not UTF-8 text"),
    "unknown type": ("a.xlsx", b"x", "unsupported file type"),
}


@pytest.mark.parametrize("name, content, message", BAD_TABLES.values(), ids=BAD_TABLES.keys())
def test_bad_tables_raise_naming_the_file(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(IngestError, match=message) as raised:
        read_table(path, SMD)
    assert str(path) in str(raised.value)


def test_missing_table_file_is_an_ingest_error(tmp_path: Path) -> None:
    with pytest.raises(IngestError, match="no such file"):
        read_table(tmp_path / "absent.csv", SMD)


def test_file_sha256_hashes_the_bytes_on_disk() -> None:
    path = SAMPLE / "test_label" / "machine-2-8.txt"
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
