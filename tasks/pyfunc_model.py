"""The registered model's MLflow pyfunc: raw readings of one entity in, scores and attributions out.

MLflow logs this file as code ("models from code"): it is copied into each registered model and
run when the model is loaded, so no Python object is unpickled, and ``model/`` travels with it
through ``code_paths``. It imports only the standard library, numpy, pandas, mlflow and ``model``,
so a registered model loads where this project is not installed, and each version runs the
``model/`` logged with it, also beside another version in one process. The project itself loads
models through ``tasks.registry.load_model_version``, which never runs this file.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel, PythonModelContext
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import AnyType


def _sources(package: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(package.glob("*.py"))}


def use_logged_model_package(logged: Path) -> None:
    """Make ``import model`` load ``logged`` (the ``model/`` logged with this version).

    MLflow puts each loaded model's code first on ``sys.path``, but Python reuses the ``model``
    package a process imported before: another version's, whose code may differ (a champion and
    a challenger loaded side by side). Forget that package when its sources differ from
    ``logged``'s; a package with the same sources is kept.
    """
    loaded = sys.modules.get("model")
    if loaded is None or loaded.__file__ is None or not logged.is_dir():
        return
    if _sources(Path(loaded.__file__).parent) != _sources(logged):
        for name in [name for name in sys.modules if name.split(".")[0] == "model"]:
            del sys.modules[name]


use_logged_model_package(Path(__file__).resolve().parent / "code" / "model")

from model.artifact import BATCH_WINDOWS, ScoringModel, load_scoring_model  # noqa: E402
from model.scaling import Scaler  # noqa: E402

CHECKPOINT_ARTIFACT = "checkpoint"
SHA256_KEY = "checkpoint_sha256"
ENTITY_PARAM = "entity"
SCORE_COLUMN = "score"
CONTRIBUTION_PREFIX = "contribution_"
PROVISIONAL_COLUMN = "provisional"
ENTITY_COLUMN = "entity"
TS_COLUMN = "ts"


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def model_signature(sensors: list[str]) -> ModelSignature:
    """float32 sensor columns (the precision scoring reads from the warehouse) and the optional
    ``entity`` and ``ts`` (timestamps or their text) columns in; float64 score and contributions
    and the boolean provisional flag out; the entity as a parameter."""
    inputs = Schema(
        [ColSpec(DataType.float, sensor) for sensor in sensors]
        + [
            ColSpec(DataType.string, ENTITY_COLUMN, required=False),
            ColSpec(AnyType(), TS_COLUMN, required=False),  # datetimes or text, any zone
        ]
    )
    outputs = Schema(
        [ColSpec(DataType.double, SCORE_COLUMN)]
        + [ColSpec(DataType.double, CONTRIBUTION_PREFIX + sensor) for sensor in sensors]
        + [ColSpec(DataType.boolean, PROVISIONAL_COLUMN)]
    )
    params = ParamSchema([ParamSpec(ENTITY_PARAM, DataType.string, "")])
    return ModelSignature(inputs, outputs, params)


def input_entity(model_input: pd.DataFrame, params: dict[str, Any] | None) -> str:
    """``params["entity"]``, else the ``entity`` column's one value; the two must agree.

    Raises:
        ValueError: the ``entity`` column holds several entities, or another than the one named.
    """
    named = str((params or {}).get(ENTITY_PARAM) or "")
    if ENTITY_COLUMN not in model_input.columns:
        return named
    found = list(dict.fromkeys(model_input[ENTITY_COLUMN].astype(str)))
    if len(found) > 1:
        raise ValueError(
            f"column '{ENTITY_COLUMN}' holds rows of {len(found)} entities, e.g. {found[:5]}: "
            "score one entity's rows per call"
        )
    if named and found and found != [named]:
        raise ValueError(
            f"column '{ENTITY_COLUMN}' holds {found[0]!r}, params['{ENTITY_PARAM}'] names {named!r}"
        )
    return named or "".join(found)


def check_readings(
    frame: pd.DataFrame,
    raw: np.ndarray,
    sensors: list[str],
    win: int,
    nullable: list[str] | None = None,
) -> None:
    """Refuse what would score silently wrong or fail deep inside the model.

    Raises:
        ValueError: fewer than ``win`` rows, an infinite reading, a gap (NaN) in a sensor not in
            ``nullable`` (``None``: a model trained before it was recorded, any sensor may have
            gaps), or ``ts`` not strictly increasing, naming the column and the first rows.
    """
    if len(raw) < win:
        raise ValueError(
            f"{len(raw)} rows: this model scores windows of {win} rows; send at least {win} rows "
            "of the entity in time order (the first ones are context for the later ones)"
        )
    _refuse_cells(np.isinf(raw), sensors, "infinite reading(s)", "send finite numbers, gaps as NaN")
    if nullable is not None:
        gaps = np.isnan(raw) & ~np.isin(sensors, nullable)[None, :]
        why = "its data contract does not declare it nullable, so it must always report"
        _refuse_cells(gaps, sensors, "missing reading(s) (NaN)", why)
    if TS_COLUMN in frame.columns:
        try:
            ts = pd.to_datetime(frame[TS_COLUMN]).to_numpy()
        except (TypeError, ValueError) as error:
            message = f"column '{TS_COLUMN}' holds values that are no timestamps: {error}"
            raise ValueError(message) from error
        unordered = np.flatnonzero(~(ts[1:] > ts[:-1])) + 1
        if len(unordered):
            first = int(unordered[0])
            raise ValueError(
                f"column '{TS_COLUMN}' is not strictly increasing: {len(unordered)} row(s) not "
                f"after the row before them, the first is row {first} ({ts[first]} after "
                f"{ts[first - 1]}); sort the rows by {TS_COLUMN} and drop duplicates"
            )


def _refuse_cells(bad: np.ndarray, sensors: list[str], what: str, why: str) -> None:
    """ValueError naming the first column of ``bad`` `(T, C)` that holds a cell, and its rows."""
    if bad.any():
        column = int(np.flatnonzero(bad.any(axis=0))[0])
        rows = np.flatnonzero(bad[:, column])
        raise ValueError(
            f"column {sensors[column]!r} holds {len(rows)} {what}, rows {rows[:5].tolist()}: {why}"
        )


class AnomalyTransformerPyfunc(PythonModel):
    """Scores one entity's raw readings with the checkpoint's scaler for it and its model: the
    Anomaly Transformer with its scoring method, or the entity's baseline detector.

    ``predict`` takes a frame with one float32 column per sensor (the checkpoint's sensors; NaN a
    gap of a sensor its contract declares nullable, filled as in scoring), rows in time order, at
    least ``win_size`` of them, and ``params={"entity": <name>}``, the entity whose scaler
    applies. Optional columns ``entity`` (one value: it names the entity when params do not) and
    ``ts`` (strictly increasing) are checked; other columns are ignored. It returns ``score``,
    one ``contribution_<sensor>`` column per sensor and ``provisional``: true for the last rows
    whose score rows after them would still change (``win_size - 1`` rows with the
    ``recon_mean*`` methods, none otherwise).
    A row's score is the one ``atp score`` writes when the frame starts at the entity's first row
    or holds the ``context_points`` rows before it; the first rows of a frame cut from the middle
    of a series lack that context.
    """

    checkpoint: ScoringModel

    def load_context(self, context: PythonModelContext) -> None:
        """Verify the checkpoint against the sha256 recorded at logging, then load it."""
        path = Path(context.artifacts[CHECKPOINT_ARTIFACT])
        expected = (context.model_config or {}).get(SHA256_KEY)
        actual = file_sha256(path)
        if actual != expected:
            raise ValueError(
                f"refusing the altered checkpoint {path}: its sha256 is {actual}, "
                f"the model recorded {expected} when it was logged"
            )
        self.checkpoint = load_scoring_model(path, device="auto")

    def predict(
        self,
        context: PythonModelContext,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        """Score every row with the checkpoint's method (``docs/interfaces.md``, scores' span)."""
        extras = self.checkpoint.extras
        sensors = list(extras["sensors"])
        scalers = extras["scalers"]
        entity = input_entity(model_input, params)
        if entity not in scalers:
            raise ValueError(
                f"params['{ENTITY_PARAM}']={entity!r} names no entity this model was trained on; "
                f"expected one of {sorted(scalers)}"
            )
        raw = model_input[sensors].to_numpy(np.float64)
        nullable = extras.get("nullable_sensors")
        check_readings(model_input, raw, sensors, self.checkpoint.model_cfg.win_size, nullable)
        scaler = Scaler.from_dict(scalers[entity])
        scaled = scaler.transform(scaler.impute(raw))
        result = self.checkpoint.score(scaled, entity=entity, batch_size=BATCH_WINDOWS)
        contributions = result.contributions.astype(np.float64)
        columns = {SCORE_COLUMN: result.scores.astype(np.float64)}
        for index, sensor in enumerate(sensors):
            columns[CONTRIBUTION_PREFIX + sensor] = contributions[:, index]
        rows_after = np.arange(len(raw))[::-1]
        columns[PROVISIONAL_COLUMN] = rows_after < self.checkpoint.provisional_points
        return pd.DataFrame(columns, index=model_input.index)


# MLflow runs this file under a module name of its own when it logs or loads the model; importing
# it as part of this package registers nothing.
if __name__ != "tasks.pyfunc_model":
    mlflow.models.set_model(AnomalyTransformerPyfunc())
