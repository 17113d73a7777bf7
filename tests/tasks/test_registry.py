"""The registry on a real temporary sqlite store: register, move aliases, load verified models."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import pytest
import torch
from prefect.states import Failed

from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import ModelConfig
from model.detector_checkpoint import SCORING_METHOD, DetectorCheckpoint, fit_detectors
from model.network import AnomalyTransformer
from model.scaling import Scaler
from model.scoring import score_series
from tasks.errors import DataContractError, ModelRegistryError, is_transient, retry_if_transient
from tasks.registry import (
    CHALLENGER,
    CHAMPION,
    DETECTOR_TAG,
    SHA256_TAG,
    artifact_location,
    configure_tracking,
    flatten_params,
    get_alias_version,
    load_model_version,
    log_and_register,
    name_challenger,
    promote,
    set_alias,
)
from tasks.status import model_status

REPO = Path(__file__).resolve().parents[2]
NAME = "toy-detector"
SENSORS = ["s1", "s2", "s3"]
CFG = ModelConfig(n_channels=3, win_size=8, d_model=8, n_heads=2, e_layers=1, d_ff=8)


def readings(seed: int, rows: int = 40) -> pd.DataFrame:
    """Raw float32 readings of one entity, on a scale far from the scaled one."""
    values = np.random.default_rng(seed).normal(50.0, 5.0, size=(rows, len(SENSORS)))
    return pd.DataFrame(values.astype(np.float32), columns=SENSORS)


def make_checkpoint(path: Path, seed: int, scoring_method: str = "recon_last") -> Path:
    torch.manual_seed(seed)
    scalers = {e: Scaler.fit(readings(i).to_numpy()).to_dict() for i, e in enumerate(["e1", "e2"])}
    extras = {
        "source": "toy",
        "contract_version": 1,
        "code_version": "test",
        "sensors": SENSORS,
        "nullable_sensors": ["s3"],
        "scalers": scalers,
        "scoring_method": scoring_method,
        "threshold": 0.5,
        "calibration_scores": [0.1, 0.2, 0.3],
    }
    save_checkpoint(path, AnomalyTransformer(CFG).eval(), CFG, extras)
    return path


def register(tmp_path: Path, seed: int, figures: dict[str, Any] | None = None) -> int:
    """Register a fresh tiny model; its version number."""
    registered = log_and_register(
        checkpoint_path=make_checkpoint(tmp_path / f"model-{seed}.ckpt", seed),
        model_name=NAME,
        run_name=f"run-{seed}",
        params={"model": CFG.to_dict(), "seed": seed},
        metrics={"f1": 0.5},
        history={"train_loss": [1.0, 0.5, 0.25], "val_rec": [0.9, None], "best_epoch": 2},
        figures=figures,
        tags={"purpose": "test"},
        input_example=readings(7, rows=CFG.win_size),
    )
    return registered.version


def scaled(frame: pd.DataFrame, extras: dict[str, object], entity: str) -> np.ndarray:
    scalers = extras["scalers"]
    assert isinstance(scalers, dict)
    return Scaler.from_dict(scalers[entity]).transform(frame[SENSORS].to_numpy(np.float64))


def stored_checkpoint(version: int) -> Path:
    """The checkpoint file of ``version`` in the artifact store itself."""
    from mlflow import MlflowClient

    root = Path(urlparse(MlflowClient().get_model_version_download_uri(NAME, str(version))).path)
    (path,) = (root / "artifacts").glob("*.ckpt")
    return path


@pytest.fixture
def artifact_root(
    tmp_path: Path, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    """A fresh store under ``tmp_path``, run from there; the artifact root."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    configure_tracking(mlflow_uri, tmp_path / "mlartifacts")
    yield tmp_path / "mlartifacts"
    mlflow.set_tracking_uri(None)


def test_register_twice_gives_two_versions_with_challenger_on_the_second(
    artifact_root: Path, tmp_path: Path
) -> None:
    import matplotlib.pyplot as plt
    from mlflow import MlflowClient

    figure = plt.figure()
    (tmp_path / "scores.png").write_bytes(b"\x89PNG")
    figures = {"curves": figure, "kept-file-name": tmp_path / "scores.png"}
    assert (register(tmp_path, 1), register(tmp_path, 2, figures)) == (1, 2)
    plt.close(figure)
    assert get_alias_version(NAME, CHALLENGER) == 2
    assert get_alias_version(NAME, CHAMPION) is None
    client = MlflowClient()
    version = client.get_model_version(NAME, "2")
    run_id = version.run_id
    run = client.get_run(run_id)
    assert run.data.params["model.d_model"] == "8" and run.data.tags["purpose"] == "test"
    assert [m.value for m in client.get_metric_history(run_id, "train_loss")] == [1.0, 0.5, 0.25]
    assert [m.step for m in client.get_metric_history(run_id, "val_rec")] == [0]
    listed = {a.path for a in client.list_artifacts(run_id, "figures")}
    assert listed == {"figures/curves.png", "figures/scores.png"}
    assert version.tags[SHA256_TAG] and stored_checkpoint(2).is_relative_to(artifact_root)
    requirements = (stored_checkpoint(2).parents[1] / "requirements.txt").read_text().split()
    assert "torch==2.13.0" in requirements and not any("+" in r for r in requirements)
    assert not (tmp_path / "mlruns").exists()


def test_a_training_that_registers_last_never_names_an_older_challenger(
    artifact_root: Path, tmp_path: Path
) -> None:
    """Two trainings at once: version 1's run may reach its alias after version 2's did."""
    register(tmp_path, 1)
    register(tmp_path, 2)
    name_challenger(NAME, 1)
    assert get_alias_version(NAME, CHALLENGER) == 2


def test_promote_moves_champion_and_returns_the_previous(
    artifact_root: Path, tmp_path: Path
) -> None:
    with pytest.raises(ModelRegistryError, match="no 'challenger'"):
        promote(NAME)
    register(tmp_path, 1)
    register(tmp_path, 2)
    assert promote(NAME) is None
    assert get_alias_version(NAME, CHAMPION) == 2
    assert promote(NAME, version=1) == 2
    assert get_alias_version(NAME, CHAMPION) == 1
    with pytest.raises(ModelRegistryError, match="no version 9"):
        set_alias(NAME, CHAMPION, 9)


def test_load_by_alias_resolves_once_and_scores_like_model_scoring(
    artifact_root: Path, tmp_path: Path
) -> None:
    register(tmp_path, 1)
    register(tmp_path, 2)
    promote(NAME, version=1)
    loaded = load_model_version(NAME, CHAMPION)
    promote(NAME)  # the alias moves; the loaded model stays version 1
    original = load_checkpoint(tmp_path / "model-1.ckpt")
    assert (loaded.name, loaded.version, loaded.extras) == (NAME, 1, original.extras)
    values = scaled(readings(3), original.extras, "e1")
    got = score_series(loaded.checkpoint.model, values, "recon_last")
    want = score_series(original.model, values, "recon_last")
    np.testing.assert_array_equal(got.scores, want.scores)
    np.testing.assert_array_equal(got.contributions, want.contributions)


def test_pyfunc_loads_by_alias_and_predicts_float32_readings(
    artifact_root: Path, tmp_path: Path
) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException

    register(tmp_path, 1)
    promote(NAME)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{NAME}@{CHAMPION}")
    frame = readings(3)
    out = pyfunc.predict(frame, params={"entity": "e2"})
    original = load_checkpoint(tmp_path / "model-1.ckpt")
    want = score_series(original.model, scaled(frame, original.extras, "e2"), "recon_last")
    contribution_columns = [f"contribution_{s}" for s in SENSORS]
    assert list(out.columns) == ["score", *contribution_columns, "provisional"]
    np.testing.assert_array_equal(out["score"].to_numpy(), want.scores)
    np.testing.assert_array_equal(out[contribution_columns].to_numpy(), want.contributions)
    assert not out["provisional"].any()  # recon_last: every score is final
    assert pyfunc.metadata.metadata["code_version"] == "test"
    with pytest.raises(ValueError, match="params\\['entity'\\]=''"):
        pyfunc.predict(frame)
    with pytest.raises(MlflowException, match="float64"):
        pyfunc.predict(frame.astype(np.float64), params={"entity": "e2"})


def test_pyfunc_refuses_odd_frames_naming_the_column_and_rows(
    artifact_root: Path, tmp_path: Path
) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException

    register(tmp_path, 1)
    promote(NAME)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{NAME}@{CHAMPION}")
    ts = pd.date_range("2024-03-01", periods=20, freq="1min")
    frame = readings(3, rows=20).assign(entity="e1", ts=ts)
    e1 = {"entity": "e1"}
    scored = pyfunc.predict(frame, params=e1)
    by_column = pyfunc.predict(frame)  # the entity column names the entity
    np.testing.assert_array_equal(scored["score"], by_column["score"])
    mixed = frame.assign(entity=["e1", "e2"] * 10)
    with pytest.raises(ValueError, match="holds rows of 2 entities, e.g. \\['e1', 'e2'\\]"):
        pyfunc.predict(mixed, params=e1)
    with pytest.raises(ValueError, match="holds 'e1', params\\['entity'\\] names 'e2'"):
        pyfunc.predict(frame, params={"entity": "e2"})
    repeated = frame.assign(ts=ts.where(ts != ts[5], ts[4]))
    with pytest.raises(ValueError, match="'ts' is not strictly increasing: 1 row.*row 5"):
        pyfunc.predict(repeated, params=e1)
    with pytest.raises(ValueError, match="'ts' is not strictly increasing: 19 row"):
        pyfunc.predict(frame.iloc[::-1], params=e1)
    with pytest.raises(ValueError, match="5 rows: this model scores windows of 8 rows"):
        pyfunc.predict(frame.head(5), params=e1)
    with pytest.raises(ValueError, match="0 rows: this model scores windows of 8 rows"):
        pyfunc.predict(frame.head(0), params=e1)
    infinite = frame.copy()
    infinite.loc[[3, 7], "s2"] = np.inf
    with pytest.raises(
        ValueError, match="column 's2' holds 2 infinite reading\\(s\\), rows \\[3, 7\\]"
    ):
        pyfunc.predict(infinite, params=e1)
    gaps = frame.copy()
    gaps.loc[[2, 4], "s3"] = np.nan  # s3 is nullable: filled as scoring fills it
    assert np.isfinite(pyfunc.predict(gaps, params=e1)["score"]).all()
    gaps.loc[[6], "s1"] = np.nan
    with pytest.raises(ValueError, match="column 's1' holds 1 missing reading.*rows \\[6\\]: its"):
        pyfunc.predict(gaps, params=e1)
    with pytest.raises(MlflowException, match="missing inputs.*s1"):
        pyfunc.predict(frame.drop(columns="s1"), params=e1)
    for stamps in (ts.astype(str), ts.tz_localize("Europe/Berlin")):  # as SQL reads them, zoned
        same = pyfunc.predict(frame.assign(ts=stamps), params=e1)["score"]
        np.testing.assert_array_equal(same, scored["score"])
    with pytest.raises(ValueError, match="'ts' holds values that are no timestamps"):
        pyfunc.predict(frame.assign(ts="soon"), params=e1)
    shuffled = frame[["ts", "s3", "s1", "s2", "entity"]].assign(note="ignored")
    np.testing.assert_array_equal(pyfunc.predict(shuffled, params=e1)["score"], scored["score"])


def test_pyfunc_flags_the_rows_later_rows_still_change(tmp_path: Path) -> None:
    from tasks.pyfunc_model import AnomalyTransformerPyfunc

    pyfunc = AnomalyTransformerPyfunc()
    pyfunc.checkpoint = load_checkpoint(make_checkpoint(tmp_path / "m.ckpt", 0, "recon_mean"))
    frame = readings(3)
    out = pyfunc.predict(None, frame, params={"entity": "e2"})  # type: ignore[arg-type]
    win = CFG.win_size
    assert out["provisional"].tolist() == [False] * (len(frame) - win + 1) + [True] * (win - 1)
    want = score_series(pyfunc.checkpoint.model, scaled(frame, pyfunc.checkpoint.extras, "e2"))
    assert not np.allclose(out["score"], want.scores)  # recon_mean, not recon_last


def test_a_baseline_registers_loads_and_serves_the_pyfunc_like_the_transformer(
    artifact_root: Path, tmp_path: Path
) -> None:
    import mlflow

    frames = {e: readings(i) for i, e in enumerate(["e1", "e2"])}
    scalers = {e: Scaler.fit(f.to_numpy()) for e, f in frames.items()}
    extras = {
        "source": "toy",
        "detector": "knn",
        "sensors": SENSORS,
        "scalers": {e: s.to_dict() for e, s in scalers.items()},
        "scoring_method": SCORING_METHOD,
        "threshold": 0.5,
        "calibration_scores": [0.1, 0.2, 0.3],
    }
    fit_parts = {e: scalers[e].transform(f.to_numpy()) for e, f in frames.items()}
    path = tmp_path / "knn.ckpt"
    fit_detectors("knn", fit_parts, extras, window=4, k=2).save(path)
    registered = log_and_register(
        checkpoint_path=path,
        model_name=NAME,
        run_name="knn",
        params={"detector": "knn"},
        metrics={"f1": 0.5},
        input_example=readings(7, rows=4),
    )
    promote(NAME)
    client = mlflow.MlflowClient()
    assert client.get_model_version(NAME, str(registered.version)).tags[DETECTOR_TAG] == "knn"
    loaded = load_model_version(NAME, CHAMPION)
    assert isinstance(loaded.checkpoint, DetectorCheckpoint)
    assert loaded.checkpoint.model_cfg.win_size == 4 and loaded.extras == extras

    frame = readings(3)
    values = scaled(frame, extras, "e2")
    want_scores, want_contributions = loaded.checkpoint.detectors["e2"].score_contributions(values)
    out = mlflow.pyfunc.load_model(f"models:/{NAME}@{CHAMPION}").predict(
        frame, params={"entity": "e2"}
    )
    np.testing.assert_array_equal(out["score"], want_scores.astype(np.float32))
    np.testing.assert_array_equal(out.iloc[:, 1:-1], want_contributions.astype(np.float32))
    assert not out["provisional"].any()
    e1 = loaded.checkpoint.score(scaled(frame, extras, "e1"), entity="e1").scores
    assert not np.allclose(e1, out["score"])  # each entity has its own detector


def _run_outside_the_project(script: str, cwd: Path) -> str:
    """Standard output of ``python -c script`` run in ``cwd`` without PYTHONPATH; it must pass."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    command = [sys.executable, "-c", script]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_pyfunc_loads_without_the_project_on_the_path(artifact_root: Path, tmp_path: Path) -> None:
    register(tmp_path, 1)
    promote(NAME)
    script = (
        "import sys, mlflow, numpy as np, pandas as pd\n"
        f"m = mlflow.pyfunc.load_model('models:/{NAME}@{CHAMPION}')\n"
        "x = pd.DataFrame(np.ones((10, 3), np.float32), columns=['s1', 's2', 's3'])\n"
        "print(len(m.predict(x, params={'entity': 'e1'})), sys.modules['model'].__file__)\n"
    )
    rows, model_file = _run_outside_the_project(script, tmp_path).split()[-2:]
    assert rows == "10"
    assert Path(model_file).parts[-3] == "code" and not Path(model_file).is_relative_to(REPO)


def test_two_versions_in_one_process_each_run_their_own_model_code(
    artifact_root: Path, tmp_path: Path
) -> None:
    """A champion and a challenger compared side by side: the second loaded used the ``model``
    package the first had imported (or failed to import a name that package lacked)."""
    register(tmp_path, 1)
    register(tmp_path, 2)
    with (stored_checkpoint(1).parents[1] / "code" / "model" / "artifact.py").open("a") as handle:
        handle.write("\nOLD_CODE = True\n")  # version 1 logged other model code
    script = (
        "import sys, mlflow, numpy as np, pandas as pd\n"
        "x = pd.DataFrame(np.ones((10, 3), np.float32), columns=['s1', 's2', 's3'])\n"
        "for version in (1, 2, 1):\n"
        f"    m = mlflow.pyfunc.load_model(f'models:/{NAME}/{{version}}')\n"
        "    assert len(m.predict(x, params={'entity': 'e1'})) == 10\n"
        "    print(hasattr(sys.modules['model.artifact'], 'OLD_CODE'))\n"
    )
    assert _run_outside_the_project(script, tmp_path).split() == ["True", "False", "True"]


def test_a_fresh_process_finds_the_models_on_the_default_store(
    tmp_path: Path, mlflow_template: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No MLFLOW_TRACKING_URI anywhere: training and a later run both use the store in ATP_HOME."""
    import mlflow

    from tasks.settings import get_settings

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ATP_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    settings = get_settings()
    shutil.copy(mlflow_template, settings.home / "mlflow.db")
    configure_tracking(settings.mlflow_tracking_uri, settings.artifact_root)
    register(tmp_path, 1)
    mlflow.set_tracking_uri(None)  # what a new process starts with
    promote(NAME)
    assert load_model_version(NAME, CHAMPION).version == 1
    assert not (tmp_path / "mlflow.db").exists()


def test_altered_artifact_is_refused(artifact_root: Path, tmp_path: Path) -> None:
    import mlflow

    register(tmp_path, 1)
    promote(NAME)
    path = stored_checkpoint(1)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelRegistryError, match="altered"):
        load_model_version(NAME, CHAMPION)
    with pytest.raises(ValueError, match="altered"):
        mlflow.pyfunc.load_model(f"models:/{NAME}@{CHAMPION}")


@pytest.mark.parametrize(
    ("whole_model", "message"), [(True, "cannot be read"), (False, "no checkpoint file")]
)
def test_missing_artifact_is_refused(
    artifact_root: Path, tmp_path: Path, whole_model: bool, message: str
) -> None:
    register(tmp_path, 1)
    promote(NAME)
    path = stored_checkpoint(1)
    if whole_model:
        shutil.rmtree(path.parents[1])
    else:
        path.unlink()
    with pytest.raises(ModelRegistryError, match=message):
        load_model_version(NAME, CHAMPION)


def test_version_without_a_recorded_checksum_is_refused(
    artifact_root: Path, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    register(tmp_path, 1)
    promote(NAME)
    MlflowClient().delete_model_version_tag(NAME, "1", SHA256_TAG)
    with pytest.raises(ModelRegistryError, match="no checkpoint_sha256 tag"):
        load_model_version(NAME, CHAMPION)


def test_missing_alias_or_model_is_refused_with_a_clear_message(
    artifact_root: Path, tmp_path: Path
) -> None:
    with pytest.raises(ModelRegistryError, match=f"no registered model named '{NAME}'"):
        load_model_version(NAME, CHAMPION)
    register(tmp_path, 1)
    aliases = r"\(aliases: \{'challenger': 1\}\)"
    with pytest.raises(ModelRegistryError, match=f"has no alias 'champion' {aliases}"):
        load_model_version(NAME, CHAMPION)


def test_an_unreachable_registry_is_refused_not_taken_for_an_empty_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``atp promote``/``score`` fail naming the outage (no MlflowException traceback), and
    ``atp status`` does not report "no models" while the registry is away."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # port 9: nothing listens
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    for call in (lambda: promote(NAME), lambda: model_status("http://127.0.0.1:9", NAME)):
        with pytest.raises(ModelRegistryError, match="registry cannot be read: .*127.0.0.1"):
            call()


def test_registration_needs_an_experiment_and_a_full_window_example(
    artifact_root: Path, tmp_path: Path
) -> None:
    common = {"model_name": NAME, "run_name": "r", "params": {}, "metrics": {}}
    path = make_checkpoint(tmp_path / "m.ckpt", 1)
    with pytest.raises(ModelRegistryError, match="configure_tracking"):
        log_and_register(checkpoint_path=path, experiment="elsewhere", **common)
    with pytest.raises(ValueError, match="a window needs 8"):
        log_and_register(checkpoint_path=path, input_example=readings(1, rows=7), **common)
    assert get_alias_version(NAME, CHALLENGER) is None


def test_artifacts_stay_local_unless_a_server_keeps_them(tmp_path: Path) -> None:
    assert artifact_location("sqlite:///x.db", tmp_path / "a") == (tmp_path / "a").as_uri()
    assert artifact_location("https://mlflow.example", tmp_path / "a") is None


def test_params_are_flattened_with_dotted_keys() -> None:
    nested = {"a": {"b": 1, "c": {"d": "x"}}, "e": 2, "models": [{"w": 25}, {"w": 100}], "f": [1]}
    assert flatten_params(nested) == {
        "a.b": 1,
        "a.c.d": "x",
        "e": 2,
        "models.0.w": 25,
        "models.1.w": 100,
        "f": [1],
    }


def test_only_transient_io_failures_are_retried() -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE

    wrapped = MlflowException("API request failed")
    wrapped.__cause__ = ConnectionError("refused")
    assert is_transient(wrapped) and is_transient(TimeoutError())
    assert is_transient(MlflowException("locked", error_code=TEMPORARILY_UNAVAILABLE))
    refusal = ModelRegistryError("altered")
    refusal.__cause__ = OSError("read")
    invalid = MlflowException("x", INVALID_PARAMETER_VALUE)
    deliberate = (refusal, DataContractError("bad"), ValueError(), invalid)
    assert not any(is_transient(e) for e in deliberate)
    assert retry_if_transient(None, None, Failed(data=ConnectionError()))
    assert not retry_if_transient(None, None, Failed(data=ModelRegistryError("no alias")))
