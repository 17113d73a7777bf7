"""Run parameters as pydantic models: validated by Prefect and rendered as forms in its UI."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from model.config import (
    DEFAULT_SCORE_SMOOTHING,
    DEFAULT_SCORING_METHOD,
    ModelConfig,
    TrainConfig,
)
from model.device import accelerated, resolve_device


class _Params(BaseModel):
    """Refuses unknown fields: a misspelt or retired parameter is an error, not ignored."""

    model_config = ConfigDict(extra="forbid")


class ModelParams(_Params):
    """Architecture; defaults are the reference implementation's."""

    win_size: int = Field(100, ge=2)
    d_model: int = Field(512, ge=1)
    n_heads: int = Field(8, ge=1)
    e_layers: int = Field(3, ge=1)
    d_ff: int = Field(512, ge=1)
    k: float = Field(3.0, ge=0)

    def to_config(self, n_channels: int) -> ModelConfig:
        return ModelConfig(n_channels=n_channels, **self.model_dump())


# Chosen on the shared SMD, NAB, SKAB and UCR data (docs/at_smd.md, 2026-12-03).
DEFAULT_ENSEMBLE = (ModelParams(win_size=25), ModelParams(win_size=100, d_model=128, d_ff=128))


class TrainingParams(_Params):
    """Optimisation; defaults follow the reference (Adam 1e-4, batch 256, LR halving)."""

    max_epochs: int = Field(10, ge=1)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(256, ge=1)
    lr: float = Field(1e-4, gt=0)
    patience: int = Field(3, ge=1)
    stride: int = Field(1, ge=1)
    val_fraction: float = Field(0.2, gt=0, lt=1)
    seed: int = 0
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on a CUDA GPU that supports it, else fp32"
    )
    compile: bool | None = Field(
        None, description="torch.compile the training step; default: where precision auto is bf16"
    )
    attention: Literal["auto", "plain", "fused"] = Field(
        "auto",
        description=(
            "auto: the fused Triton kernels on a CUDA GPU with bf16 support where they train "
            "the model faster (window 64 to 128, head dimension >= 32, no dropout), else plain "
            "PyTorch attention"
        ),
    )
    processes: int | None = Field(
        None,
        ge=1,
        description=(
            "data-parallel training processes, one per GPU, started with torchrun "
            "(model.distributed); default: one per visible GPU where device is auto or cuda, "
            "else 1"
        ),
    )

    def to_config(self) -> TrainConfig:
        """The model's config, with ``auto`` precision and compile resolved for the device."""
        fast = accelerated(resolve_device(self.device))
        precision = ("bf16" if fast else "fp32") if self.precision == "auto" else self.precision
        compile_step = fast if self.compile is None else self.compile
        fields = self.model_dump(exclude={"precision", "compile", "processes"})
        return TrainConfig(**fields, precision=precision, compile=compile_step)


class CalibrationParams(_Params):
    """Threshold fit on the validation tail of the training range (``docs/calibration.md``)."""

    method: Literal["conformal", "quantile", "pot", "reference"] = Field(
        "conformal",
        description=(
            "conformal: split-conformal, P(false alarm) <= alpha if scores are exchangeable; "
            "quantile: empirical 1 - alpha quantile; pot: peaks-over-threshold tail fit, "
            "risk alpha; "
            "reference: LEAKS TEST DATA (the paper's percentile over train + test scores), "
            "only to reproduce published numbers, never to deploy"
        ),
    )
    alpha: float = Field(0.005, gt=0, lt=1, description="target false-alarm rate on normal points")
    scope: Literal["global", "entity"] = Field(
        "global", description="one threshold for all entities, or one per entity"
    )


class GateParams(_Params):
    """Promotion gate: the challenger must beat the champion and keep the false-alarm budget."""

    metric: Literal["vus_pr", "auc_pr", "auroc", "f1", "event_recall"] = Field(
        "vus_pr", description="honest evaluation metric compared (higher is better)"
    )
    margin: float = Field(
        0.0, ge=0, description="the challenger must beat the champion by this much"
    )
    false_alarm_budget: float | None = Field(
        None,
        gt=0,
        lt=1,
        description=(
            "highest mean false-alarm rate on normal test points; default 2 x calibration alpha"
        ),
    )
    force: bool = Field(False, description="promote whatever the gate decides (logged as forced)")


ScoringMethod = Literal["recon_mean_norm", "recon_mean", "recon_last", "reference_last"]


class TrainFlowParams(_Params):
    """Everything a training run needs besides settings from the environment."""

    source: str = "smd"
    train_end: datetime | None = None
    scoring_method: ScoringMethod = Field(
        DEFAULT_SCORING_METHOD,
        description=(
            "recon_mean_norm: error averaged over the windows holding a point, each sensor's "
            "divided by its mean on the validation tail; recon_mean: without that division; "
            "both final win_size - 1 rows later. recon_last, reference_last: final at once"
        ),
    )
    score_smoothing: int = Field(
        DEFAULT_SCORE_SMOOTHING,
        ge=1,
        description=(
            "the Anomaly Transformer's score of a point is the mean of the scores of the "
            "score_smoothing rows ending at it (1: no smoothing); adds no provisional rows"
        ),
    )
    detector: Literal["anomaly_transformer", "pca", "knn", "max_z", "isolation_forest"] = Field(
        "anomaly_transformer",
        description=(
            "the model trained: the Anomaly Transformer, or a baseline fitted per entity on the "
            "same scaled fit part and split (the longest of models' win_size still sets the "
            "split, training.seed seeds isolation_forest; the other model and training settings "
            "are unused)"
        ),
    )
    models: list[ModelParams] = Field(
        default_factory=lambda: list(DEFAULT_ENSEMBLE),
        min_length=1,
        description=(
            "the Anomaly Transformer's networks: one, or several whose per-sensor errors are "
            "averaged (an ensemble); default: window 25 with d_model 512 and window 100 with "
            "d_model 128, the best on the shared SMD machines (docs/at_smd.md)"
        ),
    )
    training: TrainingParams = TrainingParams()
    calibration: CalibrationParams = CalibrationParams()
    gate: GateParams = GateParams()
    promote: bool = Field(False, description="make the new version champion if it passes the gate")

    @property
    def win_size(self) -> int:
        """The longest window of ``models``: what a point's score reads, and sets the split."""
        return max(model.win_size for model in self.models)

    def network_configs(self, n_channels: int) -> list[ModelConfig]:
        return [model.to_config(n_channels) for model in self.models]

    def gate_settings(self) -> dict[str, object]:
        """The gate's keyword arguments, with the default budget resolved from the calibration."""
        budget = self.gate.false_alarm_budget or 2 * self.calibration.alpha
        return {**self.gate.model_dump(), "false_alarm_budget": budget}


DEMO_TRAINING = TrainFlowParams(
    models=[ModelParams(d_model=64, n_heads=4, e_layers=2, d_ff=64)],
    training=TrainingParams(max_epochs=3, max_steps=300, batch_size=64, stride=5, lr=1e-3),
    promote=True,
    # The demo always serves its model; the gate's decision is still logged (as "forced").
    gate=GateParams(force=True),
)


def train_preset(name: str) -> TrainFlowParams:
    """``default``: the ensemble of ``DEFAULT_ENSEMBLE``; ``reference``: the paper's architecture
    alone; ``demo``: ``DEMO_TRAINING``.

    Raises:
        ValueError: another name.
    """
    presets = {
        "default": TrainFlowParams(),
        "reference": TrainFlowParams(models=[ModelParams()]),
        "demo": DEMO_TRAINING,
    }
    if name not in presets:
        raise ValueError(f"invalid preset {name!r}: expected one of {sorted(presets)}")
    return presets[name]
