"""The registered model's MLflow pyfunc: raw readings of one entity in, scores and attributions out.

MLflow logs this file as code ("models from code"): it is copied into each registered model and
run when the model is loaded, so no Python object is unpickled, and ``model/`` travels with it
through ``code_paths``. It imports only the standard library, numpy, pandas, mlflow and ``model``,
so a registered model loads where this project is not installed. The project itself loads models
through ``tasks.registry.load_model_version``, which never runs this file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel, PythonModelContext
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

from model.artifact import ScoringModel, load_scoring_model
from model.scaling import Scaler

CHECKPOINT_ARTIFACT = "checkpoint"
SHA256_KEY = "checkpoint_sha256"
ENTITY_PARAM = "entity"
SCORE_COLUMN = "score"
CONTRIBUTION_PREFIX = "contribution_"
PROVISIONAL_COLUMN = "provisional"


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def model_signature(sensors: list[str]) -> ModelSignature:
    """float32 sensor columns in; float64 score and contributions and the boolean provisional
    flag out; the entity as a parameter."""
    inputs = Schema([ColSpec(DataType.float, sensor) for sensor in sensors])
    outputs = Schema(
        [ColSpec(DataType.double, SCORE_COLUMN)]
        + [ColSpec(DataType.double, CONTRIBUTION_PREFIX + sensor) for sensor in sensors]
        + [ColSpec(DataType.boolean, PROVISIONAL_COLUMN)]
    )
    params = ParamSchema([ParamSpec(ENTITY_PARAM, DataType.string, "")])
    return ModelSignature(inputs, outputs, params)


class AnomalyTransformerPyfunc(PythonModel):
    """Scores one entity's raw readings with the checkpoint's scaler for it and its model: the
    Anomaly Transformer with its scoring method, or the entity's baseline detector.

    ``predict`` takes a frame with one float32 column per sensor (the checkpoint's sensors, rows in
    time order, at least ``win_size`` of them) and ``params={"entity": <name>}``, the entity whose
    scaler applies. It returns ``score``, one ``contribution_<sensor>`` column per sensor and
    ``provisional``: true for the last rows whose score rows after them would still change
    (``win_size - 1`` rows with the ``recon_mean*`` methods, none otherwise).
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
        entity = str((params or {}).get(ENTITY_PARAM) or "")
        if entity not in scalers:
            raise ValueError(
                f"params['{ENTITY_PARAM}']={entity!r} names no entity this model was trained on; "
                f"expected one of {sorted(scalers)}"
            )
        raw = model_input[sensors].to_numpy(np.float64)
        scaler = Scaler.from_dict(scalers[entity])
        scaled = scaler.transform(scaler.impute(raw))
        result = self.checkpoint.score(scaled, entity=entity)
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
