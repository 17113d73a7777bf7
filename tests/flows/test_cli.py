"""The ``atp`` command line: options reach the flows, and `contract infer` drafts a usable file."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import get_args

import numpy as np
import pandas as pd
import pytest

from data_contracts import load_contract
from flows.cli import (
    INGEST_KINDS,
    SCORING_METHODS,
    TRAIN_MODELS,
    _parser,
    _train_params,
    main,
)
from flows.ingest import Kind
from flows.params import TrainFlowParams, TrainingParams
from tasks.settings import get_settings


def test_ingest_choices_are_the_ingest_flow_kinds() -> None:
    assert INGEST_KINDS == list(get_args(Kind))


def test_train_options_reach_the_flow_parameters() -> None:
    args = _parser().parse_args(
        [
            "train",
            "--preset=demo",
            "--source=pumps",
            "--max-epochs=2",
            "--precision=fp32",
            "--alpha=0.01",
            "--calibration-method=pot",
            "--scope=entity",
            "--gate-metric=auc_pr",
            "--gate-margin=0.02",
            "--false-alarm-budget=0.05",
            "--force",
            "--scoring-method=recon_last",
            "--score-smoothing=3",
        ]
    )
    params = _train_params(args)
    assert params.source == "pumps" and params.scoring_method == "recon_last"
    assert params.score_smoothing == 3
    assert (params.training.max_epochs, params.training.precision) == (2, "fp32")
    calibration = params.calibration
    assert (calibration.alpha, calibration.method, calibration.scope) == (0.01, "pot", "entity")
    gate = params.gate
    assert (gate.metric, gate.margin, gate.false_alarm_budget, gate.force) == (
        "auc_pr",
        0.02,
        0.05,
        True,
    )


def test_train_model_choices_are_the_flow_detectors() -> None:
    assert TRAIN_MODELS == list(get_args(TrainFlowParams.model_fields["detector"].annotation))
    params = _train_params(_parser().parse_args(["train", "--preset=demo", "--model=knn"]))
    assert params.detector == "knn" and params.promote
    assert _train_params(_parser().parse_args(["train"])).detector == "anomaly_transformer"
    with pytest.raises(SystemExit):
        _parser().parse_args(["train", "--model=random"])
    methods = TrainFlowParams.model_fields["scoring_method"].annotation
    assert SCORING_METHODS == list(get_args(methods))
    defaults = _train_params(_parser().parse_args(["train"]))
    assert (defaults.scoring_method, defaults.score_smoothing) == ("recon_mean_norm", 10)


def test_train_options_left_out_keep_the_preset() -> None:
    demo = _train_params(_parser().parse_args(["train", "--preset=demo"]))
    default = _train_params(_parser().parse_args(["train"]))
    reference = _train_params(_parser().parse_args(["train", "--preset=reference"]))
    assert len(demo.models) == 1 and demo.models[0].d_model < 128
    assert [(m.win_size, m.d_model) for m in default.models] == [(25, 512), (100, 128)]
    assert default.win_size == 100
    assert [(m.win_size, m.d_model) for m in reference.models] == [(100, 512)]
    assert default.training.precision == "auto" and default.gate.force is False
    assert default.training.attention == "auto" and default.training.processes is None
    two = _train_params(_parser().parse_args(["train", "--processes=2", "--device=cpu"]))
    assert (two.training.processes, two.training.device) == (2, "cpu")


@pytest.mark.parametrize(
    ("option", "problem"),
    [
        ("--score-smoothing=0", "score_smoothing Input should be greater than or equal to 1"),
        ("--max-epochs=0", "training.max_epochs Input should be greater than or equal to 1"),
        ("--alpha=1.5", "calibration.alpha Input should be less than 1"),
        ("--processes=0", "training.processes Input should be greater than or equal to 1"),
    ],
)
def test_train_options_out_of_range_are_refused_by_name(
    option: str, problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", option]) == 2
    message = capsys.readouterr().err
    assert message.startswith("atp train: invalid options: ") and problem in message


def test_auto_precision_resolves_to_fp32_without_compile_on_the_cpu() -> None:
    config = TrainingParams(device="cpu").to_config()
    assert (config.precision, config.compile) == ("fp32", False)
    explicit = TrainingParams(device="cpu", precision="bf16", compile=True).to_config()
    assert (explicit.precision, explicit.compile) == ("bf16", True)


def _readings(path: Path) -> None:
    rows = 60
    frame = pd.DataFrame(
        {
            "when": pd.date_range("2024-03-01", periods=rows, freq="1min").astype(str),
            "pump": np.repeat(["P1", "P2"], rows // 2),
            "pressure": np.linspace(1.0, 2.0, rows),
            "flow": np.linspace(10.0, 20.0, rows),
        }
    )
    frame.to_csv(path, index=False)


def test_contract_infer_writes_a_loadable_draft_and_never_overwrites_silently(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    _readings(tmp_path / "pumps.csv")
    assert main(["contract", "infer", "pumps.csv", "--name=pumps", "--entity-column=pump"]) == 0
    contract = load_contract(str(tmp_path / "pumps.yaml"))
    assert (contract.entity_column, contract.timestamp_column) == ("pump", "when")
    assert [sensor.name for sensor in contract.sensors] == ["pressure", "flow"]

    before = (tmp_path / "pumps.yaml").read_text()
    assert main(["contract", "infer", "pumps.csv", "--name=pumps"]) == 2
    assert "pumps.yaml exists" in capsys.readouterr().err
    assert (tmp_path / "pumps.yaml").read_text() == before
    assert main(["contract", "infer", "pumps.csv", "--name=pumps", "--overwrite"]) == 0


def test_a_retired_or_misspelt_training_parameter_is_refused() -> None:
    """``model`` (one network) became ``models``: an old deployment fails instead of silently
    training the default ensemble."""
    from pydantic import ValidationError

    from flows.params import TrainFlowParams

    with pytest.raises(ValidationError, match="model\n  Extra inputs are not permitted"):
        TrainFlowParams.model_validate({"model": {"d_model": 64}})
    with pytest.raises(ValidationError, match="max_epoch\n"):
        TrainFlowParams.model_validate({"training": {"max_epoch": 3}})


@pytest.mark.parametrize(
    ("setting", "value", "problem"),
    [
        ("ATP_HOME", "FILE", "cannot be a state directory: File exists"),
        ("ATP_WAREHOUSE_URL", "warehouse.db", "the warehouse URL is not a SQLAlchemy URL"),
        ("ATP_WAREHOUSE_URL", "mysql://atp:pw@db/atp", "mysql://atp:***@db/atp is not supported"),
    ],
)
def test_unusable_settings_exit_2_naming_the_setting(
    setting: str,
    value: str,
    problem: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "FILE").touch()
    monkeypatch.setenv("ATP_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(setting, str(tmp_path / value) if value == "FILE" else value)
    assert main(["events"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("atp events: ") and problem in error and "pw" not in error


@pytest.mark.parametrize(
    ("command", "option", "low"),
    [
        (["events"], "limit", 0),
        (["score"], "event-gap", 0),
        (["backfill"], "event-gap", 0),
        (["score"], "event-min-length", 1),
        (["backfill"], "event-min-length", 1),
    ],
)
def test_counts_below_their_least_value_are_refused_by_the_parser(
    command: list[str], option: str, low: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not in the flow: events --limit=-1 listed everything on SQLite and failed on PostgreSQL;
    --event-gap=-1 failed with a ValueError traceback once a chunk was written."""
    with pytest.raises(SystemExit) as exited:
        _parser().parse_args([*command, f"--{option}={low - 1}"])
    assert exited.value.code == 2
    assert f"argument --{option}: must be at least {low}, got {low - 1}" in capsys.readouterr().err
    assert (
        getattr(_parser().parse_args([*command, f"--{option}={low}"]), option.replace("-", "_"))
        == low
    )


def test_seeds_that_are_no_whole_numbers_are_refused_by_the_parser(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert _parser().parse_args(["benchmark", "root"]).seeds == (0, 1, 2)
    assert _parser().parse_args(["benchmark", "root", "--seeds=4, 5"]).seeds == (4, 5)
    with pytest.raises(SystemExit) as exited:
        _parser().parse_args(["benchmark", "root", "--seeds=1,a"])
    assert exited.value.code == 2
    assert "argument --seeds: not comma-separated whole numbers: '1,a'" in capsys.readouterr().err


def test_dotenv_settings_are_read_as_prefect_reads_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Values may carry quotes, ``export`` and a trailing comment; the environment wins."""
    monkeypatch.chdir(tmp_path)
    for name in ("ATP_HOME", "ATP_WAREHOUSE_URL", "ATP_MODEL_NAME"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / ".env").write_text(
        "# state\n"
        "export ATP_HOME=state  # one folder per host\n"
        'ATP_WAREHOUSE_URL="sqlite:///w.db"  # the embedded warehouse\n'
        "ATP_MODEL_NAME='detector #2'\n"
        "ATP_DASK_ADDRESS\n"
    )
    settings = get_settings()
    assert settings.home == tmp_path / "state" and settings.home.is_dir()
    assert (settings.warehouse_url, settings.model_name) == ("sqlite:///w.db", "detector #2")
    assert settings.dask_address is None
    monkeypatch.setenv("ATP_MODEL_NAME", "from-env")
    assert get_settings().model_name == "from-env"


def test_a_refusal_inside_a_flow_is_logged_without_a_traceback(
    atp_env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Prefect logs a failed run's exception with its traceback: not for a deliberate refusal."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("prefect.flow_runs")
    logger.addHandler(handler)
    try:
        assert main(["score", "--source=nosuch"]) == 2
    finally:
        logger.removeHandler(handler)
    assert "atp score: no data contract 'nosuch'" in capsys.readouterr().err
    (failure,) = [r for r in records if "Encountered exception" in r.getMessage()]
    assert "no data contract 'nosuch'" in failure.getMessage() and failure.exc_info is None


def test_empty_settings_take_their_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ATP_HOME=`` put the state (warehouse, MLflow store) in the working directory itself."""
    monkeypatch.chdir(tmp_path)
    for name in ("ATP_HOME", "ATP_WAREHOUSE_URL", "MLFLOW_TRACKING_URI", "ATP_MODEL_NAME"):
        monkeypatch.setenv(name, "")
    settings = get_settings()
    assert settings.home == tmp_path / ".atp"
    assert settings.warehouse_url == f"sqlite:///{tmp_path / '.atp' / 'warehouse.db'}"
    assert settings.model_name == "anomaly-transformer"


def test_tables_are_not_cut_when_stdout_is_no_terminal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Piped or logged, `atp status`/`atp events` keep every header whole (rich cut them at 80)."""
    from dataclasses import dataclass

    from flows.report import print_result

    @dataclass
    class Row:
        source: str
        entity: str
        last_ts: str
        scored_until: str
        unscored_rows: int
        late_rows: int
        anomalies: int
        open_events: int
        top_sensors: list[tuple[str, float]]

    monkeypatch.delenv("COLUMNS", raising=False)
    row = Row(
        "plant",
        "compressor-A",
        "2024-03-02 23:59:00",
        "2024-03-02 23:59:00",
        0,
        120,
        149,
        0,
        [("vibration", 0.9904), ("flow", 0.0081)],
    )
    print_result([row])
    out = capsys.readouterr().out
    for header in ("last_ts", "scored_until", "unscored_rows", "late_rows", "open_events"):
        assert header in out
    assert "vibration=0.9904, flow=0.0081" in out
    print_result([])
    assert capsys.readouterr().out.strip() == "(none)"
