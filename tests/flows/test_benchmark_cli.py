"""`atp benchmark PATH --layout L`: the flow runs on a loader's layout, lists its skips in the
table and in MLflow, and refuses a folder with nothing to benchmark."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from flows.cli import BENCHMARK_LAYOUTS, main
from tasks.benchmark_entities import LAYOUTS
from tests.tasks.test_loaders import write_nab


def test_benchmark_layouts_are_the_loaders() -> None:
    assert BENCHMARK_LAYOUTS == list(LAYOUTS)


@pytest.fixture
def nab_home(tmp_path: Path, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A NAB folder at ``tmp_path / "nab"``, with ATP_HOME and the MLflow store set."""
    monkeypatch.setenv("ATP_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    write_nab(tmp_path / "nab")
    return tmp_path


def test_benchmark_command_on_nab(
    nab_home: Path, mlflow_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    tmp_path = nab_home
    options = ["--layout=nab", "--detectors=max_z,random", "--seeds=3", "--anomaly-ratio=5"]
    out = tmp_path / "out"
    assert (
        main(["benchmark", str(tmp_path / "nab"), *options, "--min-fit-rows=12", f"--out={out}"])
        == 0
    )
    assert out.joinpath("benchmark.csv").read_text().count("realX/a") == 2
    markdown = out.joinpath("benchmark.md").read_text()
    assert "| max_z | 1 |" in markdown and "Skipped 2 entities:" in markdown
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("atp-benchmark").experiment_id])
    assert run.data.params["layout"] == "nab" and run.data.params["anomaly_ratio"] == "5.0"
    assert run.data.params["seeds"] == "(3,)" and run.data.metrics["entities_skipped"] == 2
    assert main(["benchmark", str(tmp_path / "nab"), "--layout=nab", f"--out={out}"]) == 2
    assert "no nab entity to benchmark" in capsys.readouterr().err


def test_bad_options_and_an_unwritable_out_exit_2_before_any_detector_runs(
    nab_home: Path, mlflow_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    tmp_path = nab_home
    nab = [str(tmp_path / "nab"), "--layout=nab", "--min-fit-rows=12"]
    assert main(["benchmark", *nab, "--detectors=max_z,lstm"]) == 2
    assert "unknown detectors ['lstm']" in capsys.readouterr().err
    assert main(["benchmark", *nab, "--detectors=random", "--seeds=0,0"]) == 2
    assert "seeds [0] given more than once" in capsys.readouterr().err
    blocker = tmp_path / "taken"
    blocker.write_text("a file, not a folder")
    assert main(["benchmark", *nab, "--detectors=max_z", f"--out={blocker / 'out'}"]) == 2
    assert f"cannot write the benchmark tables to {blocker / 'out'}" in capsys.readouterr().err
    client = MlflowClient(mlflow_uri)
    assert client.get_experiment_by_name("atp-benchmark") is None  # nothing ran, nothing logged
