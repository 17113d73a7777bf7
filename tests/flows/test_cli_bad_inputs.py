"""The command line on bad input: a deliberate refusal exits 2 with the message, no traceback."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from flows.cli import main


def _readings(path: Path, label: list[object]) -> Path:
    pd.DataFrame(
        {
            "when": pd.date_range("2024-03-01", periods=4, freq="1min").astype(str),
            "pump": "P1",
            "flow": [1.0, 2.0, 3.0, 4.0],
            "label": label,
        }
    ).to_csv(path, index=False)
    return path


def test_a_broken_contract_file_exits_2_naming_the_file_and_the_key(
    tmp_path: Path, atp_env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    contract = tmp_path / "typo.yaml"
    contract.write_text("name: pumps\nversion: 1\nsensors:\n  colums: [flow]\n")
    readings = _readings(tmp_path / "pumps.csv", [None] * 4)
    assert main(["ingest", "csv", str(readings), f"--contract={contract}"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"atp ingest: contract file {contract}") and "colums" in error
    assert main(["train", "--source=nosuch"]) == 2
    assert "no data contract 'nosuch'" in capsys.readouterr().err


def test_contract_infer_drafts_an_unlabelled_file_and_refuses_a_bad_label(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    _readings(tmp_path / "normal.csv", [None] * 4)
    assert main(["contract", "infer", "normal.csv", "--name=normal"]) == 0
    assert "label_column: label" in (tmp_path / "normal.yaml").read_text()
    _readings(tmp_path / "graded.csv", [None, None, 2, 0])
    assert main(["contract", "infer", "graded.csv", "--name=graded"]) == 2
    assert "'label' holds values other than 0, 1 and blank" in capsys.readouterr().err
    assert not (tmp_path / "graded.yaml").exists()
