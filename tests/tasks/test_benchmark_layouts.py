"""The benchmark on every loader's layout (test_loaders.py's fixtures): one split, explicit skips,
labels aligned with the test rows, and the arrays bench/export_arrays.py writes for the same
entities."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench.export_arrays import export, file_name
from tasks.benchmark import AT_MODEL, METRICS, run_benchmark, seeded, write_tables
from tasks.benchmark_entities import MIN_FIT_ROWS, frame_entities, select_entities
from tasks.errors import IngestError
from tasks.loaders import LOADERS
from tests.tasks.test_loaders import LAYOUT_WRITERS, _skab_run, _wave, write_skab

SHORT = 12  # a fit part the fixtures' entities reach (their training ranges are 18..130 rows)
# layout -> (benchmarked entities, skip reasons by their start)
EXPECTED: dict[str, tuple[set[str], list[str]]] = {
    "nab": (
        {"realX/a"},
        [
            "realX/c.csv: no entry in labels/combined_windows.json",
            "artificialNoAnomaly/b: no labelled anomaly in its 102 test rows",
        ],
    ),
    "ucr": ({"001_Toy", "002_ToyTwo"}, []),
    "smap": ({"P-1"}, ["A-9: listed 2 times", "D-1: data but no row"]),
    "msl": ({"M-1"}, ["D-1: data but no row"]),
    "psm": ({"psm"}, []),
    "swat": ({"swat"}, []),
}


@pytest.mark.parametrize("layout", sorted(EXPECTED))
def test_every_layout_runs_on_one_split_with_explicit_skips(tmp_path: Path, layout: str) -> None:
    LAYOUT_WRITERS[layout](tmp_path)
    run = run_benchmark(
        tmp_path,
        ["random", "pca", "max_z", "isolation_forest"],
        [0, 1],
        layout=layout,
        min_fit_rows=SHORT,
    )
    entities, skips = EXPECTED[layout]
    assert set(run.rows["entity"]) == entities
    assert len(run.skipped) == len(skips)
    assert all(s.startswith(p) for s, p in zip(sorted(run.skipped), sorted(skips), strict=True))
    assert run.rows.groupby("entity").size().to_dict() == dict.fromkeys(entities, 6)
    frame = LOADERS[layout](tmp_path).frame
    train_rows = frame[frame["label"].isna()].groupby("entity").size()
    expected_val = train_rows - (0.8 * train_rows).round().astype(int)
    assert (run.rows["val_rows"] == run.rows["entity"].map(expected_val)).all()
    assert run.rows[list(METRICS)].apply(lambda c: c.between(0, 1)).all().all()


def test_skab_skips_a_run_without_test_rows_and_one_without_normal_points(tmp_path: Path) -> None:
    write_skab(tmp_path)
    run = _skab_run(600, labelled=True)
    run["anomaly"] = ((run.index >= 450) & (run.index < 500)).astype(float)
    (tmp_path / "data" / "valve1" / "1.csv").write_text(run.to_csv(sep=";", index=False))
    result = run_benchmark(tmp_path, ["max_z"], [0], layout="skab")
    assert list(result.rows["entity"]) == ["valve1/1"]
    assert result.rows["val_rows"].tolist() == [80]  # the 400 normal rows of the SKAB protocol
    assert result.skipped == [
        "anomaly-free/anomaly-free: no test range (every row is in the training range)",
        "valve1/0: no normal point in its 50 test rows",
    ]
    markdown = write_tables(result, tmp_path / "out").markdown.read_text()
    assert "Skipped 2 entities:" in markdown and "- valve1/0: no normal point" in markdown


def test_too_short_training_ranges_are_skipped_and_none_left_is_an_error(tmp_path: Path) -> None:
    LAYOUT_WRITERS["psm"](tmp_path / "psm")
    with pytest.raises(IngestError, match="no psm entity to benchmark.*psm: training range of 130"):
        run_benchmark(tmp_path / "psm", ["pca"], [0], layout="psm", min_fit_rows=105)
    LAYOUT_WRITERS["ucr"](tmp_path / "ucr")
    with pytest.raises(IngestError, match="fit part 48 rows, needs 100"):
        run_benchmark(tmp_path / "ucr", ["pca"], [0], layout="ucr")


def test_labels_line_up_with_the_test_rows(tmp_path: Path) -> None:
    values = _wave(1500)
    values[1200:1210] += 6.0  # the labelled anomaly of the file name below
    path = tmp_path / "ucr" / "007_UCR_Anomaly_Spike_1000_1200_1210.txt"
    path.parent.mkdir()
    path.write_text("\n".join(f"{v:.6f}" for v in values))
    rows = run_benchmark(path.parent, ["max_z", "random"], [0], layout="ucr").rows
    by_detector = rows.set_index("detector")
    max_z, chance = by_detector.loc["max_z"], by_detector.loc["random"]
    assert max_z["honest_vus_pr"] > 0.8 > 0.2 > chance["honest_vus_pr"]
    assert max_z["honest_f1"] > 0.5 and max_z["val_rows"] == 200


def test_bad_frames_are_named() -> None:
    frame = pd.DataFrame(
        {
            "entity": ["e"] * 4,
            "ts": pd.date_range("2020-01-01", periods=4, freq="s"),
            "value": [1.0, np.nan, 2.0, 3.0],
            "label": pd.array([None, None, 0, 1], dtype="Int64"),
        }
    )
    with pytest.raises(IngestError, match="entity 'e', sensor 'value', row 1: nan"):
        frame_entities(frame, Path("src"))
    frame["value"] = 1.0
    frame["label"] = pd.array([None, 0, None, 1], dtype="Int64")
    with pytest.raises(IngestError, match="'e' has unlabelled rows after labelled ones"):
        frame_entities(frame, Path("src"))


def test_seeded_detectors_and_the_minimum_fit_part() -> None:
    assert seeded("random") and seeded("anomaly_transformer") and seeded("isolation_forest")
    assert not seeded("pca") and not seeded("knn")
    assert AT_MODEL["win_size"] == MIN_FIT_ROWS  # every detector sees the entities AT can use


def test_exported_arrays_are_the_benchmarked_entities(tmp_path: Path) -> None:
    LAYOUT_WRITERS["nab"](tmp_path / "nab")
    selection = select_entities(tmp_path / "nab", "nab", min_fit_rows=SHORT)
    size = export(selection, tmp_path / "out")
    manifest = pd.read_csv(tmp_path / "out" / "manifest.csv")
    assert manifest.to_dict("records") == [
        {"entity": "realX/a", "file": "realX__a.npz", "train_rows": 21, "fit_rows": 17}
        | {"test_rows": 119, "anomalies": 6}
    ]
    frame = LOADERS["nab"](tmp_path / "nab").frame.query("entity == 'realX/a'")
    with np.load(tmp_path / "out" / file_name("realX/a")) as arrays:
        assert arrays["train"].dtype == np.float32 and arrays["labels"].dtype == np.int8
        assert arrays["train"].shape == (21, 1) and arrays["test"].shape == (119, 1)
        values = np.concatenate([arrays["train"], arrays["test"]])[:, 0]
        assert np.allclose(values, frame["value"], rtol=1e-6)
        assert arrays["labels"].tolist() == frame["label"].iloc[21:].tolist()
    skipped = (tmp_path / "out" / "skipped.txt").read_text().splitlines()
    assert skipped == selection.skipped and len(skipped) == 2
    assert size == sum(p.stat().st_size for p in (tmp_path / "out").iterdir())
    other = select_entities(tmp_path / "nab", "nab", min_fit_rows=SHORT)
    export(other, tmp_path / "out")  # the same entities again: overwritten
    (tmp_path / "out" / "old.npz").write_bytes(b"")
    with pytest.raises(FileExistsError, match="other entities, e.g. \\['old.npz'\\]"):
        export(other, tmp_path / "out")
