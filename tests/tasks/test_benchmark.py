"""The benchmark on a tiny SMD-layout folder: both protocols, seeds, tables, bad layouts.
The other layouts: tests/tasks/test_benchmark_layouts.py."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from tasks.benchmark import run_benchmark, write_tables
from tasks.errors import AtpError, IngestError

TRAIN, TEST = 400, 300


def write_smd(root: Path, machines: tuple[str, ...] = ("m-1", "m-2")) -> Path:
    """Machines of 3 noisy sensors; a level shift on sensor 0 at test rows 200..229 is labelled."""
    rng = np.random.default_rng(0)
    for name in machines:
        values = rng.normal(0.5, 0.05, (TRAIN + TEST, 3))
        values[TRAIN + 200 : TRAIN + 230, 0] += 0.5
        labels = np.zeros(TEST, dtype=int)
        labels[200:230] = 1
        for part, rows in (("train", values[:TRAIN]), ("test", values[TRAIN:])):
            (root / part).mkdir(parents=True, exist_ok=True)
            with gzip.open(root / part / f"{name}.txt.gz", "wt") as handle:
                np.savetxt(handle, rows, delimiter=",", fmt="%.5f")
        (root / "test_label").mkdir(exist_ok=True)
        np.savetxt(root / "test_label" / f"{name}.txt", labels, fmt="%d")
    return root


def test_both_protocols_over_machines_and_seeds(tmp_path: Path) -> None:
    run = run_benchmark(write_smd(tmp_path / "smd"), ["random", "max_z"], [0, 1])
    rows = run.rows
    assert rows.groupby("detector").size().to_dict() == {"random": 4, "max_z": 2}
    max_z, chance = rows[rows["detector"] == "max_z"], rows[rows["detector"] == "random"]
    assert max_z["honest_vus_pr"].min() > 0.8 > 0.3 > chance["honest_vus_pr"].max()
    assert (rows["reference_pa_f1"] >= rows["reference_f1"]).all()
    assert chance["honest_fpr_normal"].between(0, 0.05).all()
    assert run.skipped == [] and (rows["val_rows"] == TRAIN - round(0.8 * TRAIN)).all()
    tables = write_tables(run, tmp_path / "out")
    assert tables.summary.loc["random", "runs"] == 4
    assert tables.summary.loc["max_z", "honest_vus_pr_std"] >= 0
    text = tables.markdown.read_text()
    assert "| max_z | 2 |" in text and "±" in text
    assert len(tables.csv.read_text().splitlines()) == 7


def test_unknown_detector_and_bad_layouts_are_named(tmp_path: Path) -> None:
    root = write_smd(tmp_path / "smd", ("m-1",))
    with pytest.raises(AtpError, match="unknown detectors \\['lstm'\\]"):
        run_benchmark(root, ["lstm"], [0])
    with pytest.raises(ValueError, match="unknown layout 'yahoo'"):
        run_benchmark(root, ["pca"], [0], layout="yahoo")
    with pytest.raises(IngestError, match="no machine has train/, test/ and test_label/"):
        run_benchmark(tmp_path, ["pca"], [0])
    np.savetxt(root / "test_label" / "m-1.txt", np.zeros(TEST - 1), fmt="%d")
    with pytest.raises(IngestError, match=f"{TEST - 1} labels for {TEST} rows"):
        run_benchmark(root, ["pca"], [0])


@pytest.mark.parametrize(
    ("detectors", "seeds", "alpha", "ratio", "message"),
    [
        ([], [0], 0.005, 0.5, "no detector given"),
        (
            ["random", "max_z"],
            [],
            0.005,
            0.5,
            "no seed given for the seeded detectors \\['random'\\]",
        ),
        (["max_z", "max_z"], [0], 0.005, 0.5, "detectors \\['max_z'\\] given more than once"),
        (["random"], [1, 1], 0.005, 0.5, "seeds \\[1\\] given more than once"),
        (["random"], [0, -1], 0.005, 0.5, "seeds must be integers >= 0, got \\[-1\\]"),
        (["max_z"], [0], 5.0, 0.5, "alpha must be in \\(0, 1\\), got 5.0"),
        (["max_z"], [0], 0.005, 100.0, "anomaly_ratio must be a percentage in \\(0, 100\\)"),
    ],
)
def test_options_that_would_crash_or_double_count_are_refused_up_front(
    detectors: list[str], seeds: list[int], alpha: float, ratio: float, message: str
) -> None:
    with pytest.raises(AtpError, match=message):  # before the folder is even read
        run_benchmark(Path("/nonexistent"), detectors, seeds, alpha=alpha, anomaly_ratio=ratio)
    with pytest.raises(AtpError, match="windows of 100 rows: min_fit_rows must be at least"):
        run_benchmark(Path("/nonexistent"), ["max_z", "anomaly_transformer"], [0], min_fit_rows=12)


@pytest.mark.parametrize(
    ("part", "line", "message"),
    [
        ("train", "nan,0.5,0.5", "train/m-1.txt: line 11, value 1 is not a number: 'nan'"),
        ("train", ",0.5,0.5", "train/m-1.txt: line 11, value 1 is not a number: ''"),
        ("test", "0.5,0.5", "test/m-1.txt: line 11 has 2 values, expected 3"),
        ("test", "0.5,inf,0.5", "test/m-1.txt, value 2, row 10: inf \\(1 non-finite values\\)"),
        ("test_label", "2", "test_label/m-1.txt: line 11 is not a 0/1 label: '2'"),
    ],
)
def test_a_bad_smd_file_is_named_with_its_line(
    tmp_path: Path, part: str, line: str, message: str
) -> None:
    root = write_smd(tmp_path / "smd", ("m-1",))
    for gz in root.glob("*/m-1.txt.gz"):
        gz.with_suffix("").write_text(gzip.decompress(gz.read_bytes()).decode())
        gz.unlink()
    path = root / part / "m-1.txt"
    lines = path.read_text().splitlines()
    lines[10] = line
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(IngestError, match=message):
        run_benchmark(root, ["max_z"], [0])


def test_an_incomplete_smd_machine_is_listed_as_skipped(tmp_path: Path) -> None:
    root = write_smd(tmp_path / "smd", ("m-1", "m-2", "m-3"))
    (root / "train" / "m-2.txt.gz").unlink()
    (root / "test" / "m-3.txt.gz").unlink()
    (root / "test_label" / "m-3.txt").unlink()
    run = run_benchmark(root, ["max_z"], [0])
    assert list(run.rows["entity"]) == ["m-1"]
    assert run.skipped == ["m-2: no train/ file", "m-3: no test/ or test_label/ file"]


def test_anomaly_transformer_runs_under_both_protocols(tmp_path: Path) -> None:
    run = run_benchmark(write_smd(tmp_path / "smd", ("m-1",)), ["anomaly_transformer"], [0])
    (row,) = run.rows.to_dict("records")
    assert row["detector"] == "anomaly_transformer" and row["seed"] == 0
    assert 0.0 <= row["honest_vus_pr"] <= 1.0 and row["reference_pa_f1"] >= row["reference_f1"]
