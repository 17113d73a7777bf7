"""MLflow tracking and model registry: log and register a checkpoint, move aliases, load a version.

A registered version is self-contained (weights or fitted detectors, config, scalers, threshold,
calibration scores, contract and code version in the checkpoint; ``model/`` as code; explicit pip
requirements) and carries the checkpoint's sha256 and its detector (``anomaly_transformer`` or a
baseline's name) as version tags, written in the same call that creates it.
Loading resolves an alias once, to a concrete version, and refuses anything that does not check out.
Aliases and loading use the store the settings name, read on every call, so a fresh process (a
scheduled run, ``atp promote``) finds the models that training registered.
"""

from __future__ import annotations

import logging
import re
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
import pandas as pd
import sqlalchemy as sa
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from mlflow.entities import LoggedModelStatus, Metric
from mlflow.exceptions import MlflowException
from packaging.version import Version
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.utilities.context import get_task_and_flow_run_ids

import model
from model.artifact import ScoringModel, load_scoring_model
from tasks.errors import TRANSIENT_RETRIES, ModelRegistryError
from tasks.locks import file_lock
from tasks.pyfunc_model import (
    CHECKPOINT_ARTIFACT,
    ENTITY_PARAM,
    SHA256_KEY,
    file_sha256,
    model_signature,
)
from tasks.settings import get_settings
from tasks.warehouse import connect, get_engine, warehouse_url

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

EXPERIMENT = "anomaly-transformer"
CHAMPION = "champion"
CHALLENGER = "challenger"
SHA256_TAG = "checkpoint_sha256"
DETECTOR_TAG = "detector"
FLOW_RUN_TAG = "prefect_flow_run_id"
MODEL_ARTIFACT = "model"
FIGURES_DIR = "figures"
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
MODEL_PACKAGE = Path(model.__file__).parent
RUNTIME_PACKAGES = ("torch", "numpy", "pandas")
SERVER_SCHEMES = ("http://", "https://", "databricks")


@dataclass(frozen=True)
class RegisteredModel:
    """A model version just registered (with the ``challenger`` alias)."""

    name: str
    version: int
    run_id: str
    model_uri: str
    checksum: str


@dataclass(frozen=True)
class LoadedModel:
    """One concrete model version, verified and loaded; a run uses it from start to end."""

    name: str
    version: int
    run_id: str
    checkpoint: ScoringModel
    extras: dict[str, Any]


def artifact_location(tracking_uri: str, artifact_root: Path) -> str | None:
    """Where a new experiment keeps artifacts: under ``artifact_root`` unless a server decides."""
    if tracking_uri.startswith(SERVER_SCHEMES):
        return None
    return artifact_root.resolve().as_uri()


def configure_tracking(tracking_uri: str, artifact_root: Path, experiment: str = EXPERIMENT) -> str:
    """Point MLflow at ``tracking_uri`` and make sure ``experiment`` exists; return its id.

    Against a database URI the experiment keeps its artifacts under ``artifact_root`` (not the
    working directory); a tracking server keeps them where the server is configured to.
    """
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        return str(found.experiment_id)
    return client.create_experiment(experiment, artifact_location(tracking_uri, artifact_root))


def pip_requirements() -> list[str]:
    """Exact versions of the runtime packages, without local labels such as ``+cpu``."""
    return [f"{name}=={Version(metadata.version(name)).public}" for name in RUNTIME_PACKAGES]


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested parameters as ``a.b`` keys, the way MLflow shows them; a list of mappings (an
    ensemble's ``models``) as ``a.0.b``, ``a.1.b``..."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, f"{prefix}{key}."))
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            flat.update(flatten_params({str(i): v for i, v in enumerate(value)}, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def history_metrics(history: Mapping[str, Any]) -> list[Metric]:
    """Per-epoch lists as step metrics (``None`` entries skipped), scalars at step 0."""
    now = int(time.time() * 1000)
    metrics = []
    for key, value in history.items():
        steps = value if isinstance(value, list | tuple) else [value]
        metrics += [Metric(key, float(v), now, i) for i, v in enumerate(steps) if v is not None]
    return metrics


def _log_figures(figures: Mapping[str, Figure | Path]) -> None:
    """A Figure as ``figures/<name>.png``; an image file under ``figures/`` with its own name."""
    for name, figure in figures.items():
        if isinstance(figure, Path):
            mlflow.log_artifact(str(figure), FIGURES_DIR)
        else:
            mlflow.log_figure(figure, f"{FIGURES_DIR}/{name}.png")


def _example(checkpoint: ScoringModel, frame: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, str]]:
    """The input example as the pyfunc takes it: float32 sensors, plus a trained entity."""
    sensors = list(checkpoint.extras["sensors"])
    win_size = checkpoint.model_cfg.win_size
    if len(frame) < win_size:
        raise ValueError(f"input_example has {len(frame)} rows: a window needs {win_size}")
    entity = sorted(checkpoint.extras["scalers"])[0]
    return frame[sensors].astype(np.float32), {ENTITY_PARAM: entity}


def _model_metadata(extras: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint's small facts (contract, code version, method, threshold...) and sensors."""
    small = {k: v for k, v in extras.items() if isinstance(v, str | int | float | bool)}
    return {**small, "sensors": list(extras["sensors"])}


def log_and_register(
    *,
    checkpoint_path: Path,
    model_name: str,
    run_name: str,
    params: Mapping[str, Any],
    metrics: Mapping[str, float],
    history: Mapping[str, Any] | None = None,
    figures: Mapping[str, Figure | Path] | None = None,
    tags: Mapping[str, str] | None = None,
    input_example: pd.DataFrame | None = None,
    experiment: str = EXPERIMENT,
) -> RegisteredModel:
    """Log one run and register its pyfunc as a new version of ``model_name``, the challenger.

    Call ``configure_tracking`` first: the experiment must exist, so that artifacts never land
    in the working directory. ``input_example`` holds raw readings (at least ``win_size`` rows).
    """
    found = MlflowClient().get_experiment_by_name(experiment)
    if found is None:
        raise ModelRegistryError(f"no experiment {experiment!r}: call configure_tracking first")
    checkpoint = load_scoring_model(checkpoint_path)
    checksum = file_sha256(checkpoint_path)
    example = None if input_example is None else _example(checkpoint, input_example)
    run_tags, experiment_id = dict(tags or {}), found.experiment_id
    _, flow_run_id = get_task_and_flow_run_ids()
    if flow_run_id is not None:  # what end_killed_runs finds it by if this process is killed
        run_tags[FLOW_RUN_TAG] = str(flow_run_id)
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=run_tags) as run:
        mlflow.log_params(flatten_params(params))
        mlflow.log_metrics(dict(metrics))
        if history:
            MlflowClient().log_batch(run.info.run_id, metrics=history_metrics(history))
        _log_figures(figures or {})
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT,
            python_model=PYFUNC_CODE,
            artifacts={CHECKPOINT_ARTIFACT: str(checkpoint_path)},
            code_paths=[str(MODEL_PACKAGE)],
            model_config={SHA256_KEY: checksum},
            signature=model_signature(list(checkpoint.extras["sensors"])),
            input_example=example,
            pip_requirements=pip_requirements(),
            metadata=_model_metadata(checkpoint.extras),
        )
    detector = str(checkpoint.extras.get("detector", "anomaly_transformer"))
    version_tags = {SHA256_TAG: checksum, DETECTOR_TAG: detector}
    version = mlflow.register_model(info.model_uri, model_name, tags=version_tags)
    name_challenger(model_name, int(version.version))
    log.info("registered %s version %s (run %s)", model_name, version.version, run.info.run_id)
    uri = f"models:/{model_name}/{version.version}"
    return RegisteredModel(model_name, int(version.version), run.info.run_id, uri, checksum)


def _client() -> MlflowClient:
    """A client on the settings' store (``MLFLOW_TRACKING_URI``, else the one under ATP_HOME)."""
    return MlflowClient(get_settings().mlflow_tracking_uri)


def registered_aliases(client: MlflowClient, model_name: str) -> dict[str, int] | None:
    """The registered model's aliases, or ``None`` when no model has that name.

    Raises:
        ModelRegistryError: the registry cannot be read (server away, after MLflow's own retries).
    """
    try:
        registered = client.get_registered_model(model_name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise ModelRegistryError(f"the model registry cannot be read: {exc.message}") from exc
    return {alias: int(version) for alias, version in registered.aliases.items()}


def get_alias_version(model_name: str, alias: str) -> int | None:
    """The version ``alias`` points to now, or ``None`` (no such model or alias)."""
    return (registered_aliases(_client(), model_name) or {}).get(alias)


def set_alias(model_name: str, alias: str, version: int) -> None:
    """Point ``alias`` at ``version``, which must exist."""
    client = _client()
    try:
        client.get_model_version(model_name, str(version))
    except MlflowException as exc:
        raise ModelRegistryError(f"model {model_name!r} has no version {version}") from exc
    client.set_registered_model_alias(model_name, alias, str(version))


def name_challenger(model_name: str, version: int) -> None:
    """Point ``challenger`` at ``version``, the newest registered, unless a training that ran at
    once registered a newer one and named it first (under :func:`alias_lock`)."""
    with alias_lock(model_name):
        current = get_alias_version(model_name, CHALLENGER)
        if current is None or current < version:
            set_alias(model_name, CHALLENGER, version)


@contextmanager
def alias_lock(model_name: str) -> Iterator[None]:
    """Hold the right to move ``model_name``'s aliases, waiting for its holder if any.

    MLflow cannot compare and set an alias, so whoever reads the champion and then moves it (the
    promotion gate, :func:`promote`) does both under this lock: two promotions at once act one
    after the other, each on the champion the other left. On a PostgreSQL warehouse, which every
    worker shares, it is a session advisory lock there; on SQLite a file lock under ATP_HOME. A
    killed holder's lock is released with its connection or process.
    """
    settings = get_settings()
    if warehouse_url(settings.warehouse_url).get_backend_name() != "postgresql":
        name = re.sub(r"[^A-Za-z0-9._-]", "_", model_name)
        with file_lock(settings.home / "locks" / f"aliases-{name}.lock"):
            yield
        return
    key = sa.func.hashtext(f"model-aliases\x1f{model_name}")
    with connect(get_engine(settings.warehouse_url)) as conn:
        conn.execute(sa.select(sa.func.pg_advisory_lock(key)))
        try:
            yield
        finally:
            conn.execute(sa.select(sa.func.pg_advisory_unlock(key)))


def promote(model_name: str, version: int | None = None) -> int | None:
    """Move ``champion`` to ``version`` (default: the challenger); return the previous champion."""
    with alias_lock(model_name):
        return move_champion(model_name, version)


def move_champion(model_name: str, version: int | None = None) -> int | None:
    """:func:`promote` for a caller that holds :func:`alias_lock`."""
    target = version if version is not None else get_alias_version(model_name, CHALLENGER)
    if target is None:
        raise ModelRegistryError(f"nothing to promote: model {model_name!r} has no {CHALLENGER!r}")
    previous = get_alias_version(model_name, CHAMPION)
    set_alias(model_name, CHAMPION, target)
    log.info("%s: %s moved from version %s to %s", model_name, CHAMPION, previous, target)
    return previous


def end_killed_runs(tracking_uri: str, flow_run_id: str, experiment: str = EXPERIMENT) -> int:
    """Mark ``KILLED`` the MLflow runs that flow run ``flow_run_id`` left ``RUNNING`` (its process
    was killed while logging), and ``FAILED`` the models they left ``PENDING``; how many runs."""
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return 0
    ids = [found.experiment_id]
    query = f"tags.{FLOW_RUN_TAG} = '{flow_run_id}' and attributes.status = 'RUNNING'"
    runs = client.search_runs(ids, filter_string=query)
    for run in runs:
        run_id = run.info.run_id
        for logged in client.search_logged_models(ids, filter_string=f"source_run_id = '{run_id}'"):
            if logged.status == LoggedModelStatus.PENDING:
                client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        client.set_terminated(run_id, "KILLED")
        log.warning("MLflow run %s of killed flow run %s: KILLED", run_id, flow_run_id)
    return len(runs)


def _download_checkpoint(client: MlflowClient, model_name: str, version: int, into: Path) -> Path:
    """Download the version's model directory; the path of its checkpoint file."""
    uri = f"models:/{model_name}/{version}"
    try:
        source = client.get_model_version_download_uri(model_name, str(version))
        tracking = client.tracking_uri
        local = Path(download_artifacts(source, dst_path=str(into), tracking_uri=tracking))
        flavor = mlflow.models.Model.load(str(local)).flavors["python_function"]
        path = local / flavor["artifacts"][CHECKPOINT_ARTIFACT]["path"]
    except (OSError, KeyError, MlflowException) as exc:
        raise ModelRegistryError(f"the artifact of {uri} cannot be read: {exc}") from exc
    if not path.is_file():
        raise ModelRegistryError(f"the artifact of {uri} has no checkpoint file {path.name}")
    return path


def load_model_version(model_name: str, alias: str) -> LoadedModel:
    """Resolve ``alias`` once and load that version, after checking its checkpoint's sha256.

    Raises:
        ModelRegistryError: no such model or alias, an unreadable artifact, or a checkpoint whose
            sha256 differs from the one recorded at registration. Never falls back to another model.
    """
    client = _client()
    aliases = registered_aliases(client, model_name)
    if aliases is None:
        raise ModelRegistryError(f"no registered model named {model_name!r}: register one first")
    if alias not in aliases:
        raise ModelRegistryError(
            f"model {model_name!r} has no alias {alias!r} (aliases: {aliases or 'none'}); "
            f"promote a version (atp promote, or the MLflow UI) before using it"
        )
    version = aliases[alias]
    registered = client.get_model_version(model_name, str(version))
    expected = registered.tags.get(SHA256_TAG)
    if not expected:
        raise ModelRegistryError(f"{model_name} v{version} has no {SHA256_TAG} tag: refusing it")
    with tempfile.TemporaryDirectory(prefix="atp-model-") as tmp:
        path = _download_checkpoint(client, model_name, version, Path(tmp))
        actual = file_sha256(path)
        if actual != expected:
            raise ModelRegistryError(
                f"{model_name} version {version}: checkpoint sha256 {actual} differs from "
                f"{expected} recorded at registration; the artifact was altered, refusing it"
            )
        checkpoint = load_scoring_model(path, device="auto")
    log.info("using %s version %s (alias %s)", model_name, version, alias)
    run_id = registered.run_id or ""
    return LoadedModel(model_name, version, run_id, checkpoint, checkpoint.extras)


log_and_register_task = task(name="log-and-register", cache_policy=NO_CACHE)(log_and_register)
promote_task = task(name="promote", cache_policy=NO_CACHE, **TRANSIENT_RETRIES)(promote)
load_model_version_task = task(
    name="load-model-version", cache_policy=NO_CACHE, **TRANSIENT_RETRIES
)(load_model_version)
