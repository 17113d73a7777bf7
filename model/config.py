"""Configuration of the network and of its training; importable without torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

Precision = Literal["fp32", "bf16"]
MinimaxMode = Literal["surrogate", "two_backward"]
AttentionMode = Literal["auto", "plain", "fused"]

# The pipeline's default score (``model.scoring``) and its smoothing, chosen on the shared SMD
# machines (docs/at_smd.md): recon_mean with per-sensor division, averaged over 10 rows.
DEFAULT_SCORING_METHOD = "recon_mean_norm"
DEFAULT_SCORE_SMOOTHING = 10


def _require(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise ValueError(f"invalid {name}={value!r}: expected {allowed}")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the Anomaly Transformer; defaults are the reference code's."""

    n_channels: int
    win_size: int = 100
    d_model: int = 512
    n_heads: int = 8
    e_layers: int = 3
    d_ff: int = 512
    dropout: float = 0.0
    k: float = 3.0
    temperature: float = 50.0

    def __post_init__(self) -> None:
        for name in ("n_channels", "win_size", "d_model", "n_heads", "e_layers", "d_ff"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 1, name, value, "an integer >= 1")
        _require(self.win_size >= 2, "win_size", self.win_size, "an integer >= 2")
        _require(
            self.d_model % self.n_heads == 0,
            "d_model",
            self.d_model,
            f"a multiple of n_heads={self.n_heads}",
        )
        _require(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "a float in [0, 1)")
        _require(self.k >= 0.0, "k", self.k, "a float >= 0")
        _require(self.temperature > 0.0, "temperature", self.temperature, "a float > 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return cls(**_known_fields(cls, data))


@dataclass(frozen=True)
class TrainConfig:
    """How to train: the reference's optimiser and schedule, plus our switches."""

    lr: float = 1e-4
    batch_size: int = 256
    max_epochs: int = 10
    max_steps: int | None = None
    patience: int = 3
    val_fraction: float = 0.2
    stride: int = 1
    seed: int = 0
    deterministic: bool = False
    precision: Precision = "fp32"
    compile: bool = False
    grad_clip: float | None = None
    minimax: MinimaxMode = "surrogate"
    attention: AttentionMode = "plain"  # "fused": Triton kernels (model.fused_attention), CUDA;
    # "auto": fused where they run on a GPU with bf16 support and train faster: windows >= 64,
    # head dimension >= 32 (model.steps.resolve_attention)
    lr_halving: bool = True
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        _require(self.lr > 0, "lr", self.lr, "a float > 0")
        for name in ("batch_size", "max_epochs", "patience", "stride"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 1, name, value, "an integer >= 1")
        _require(
            self.max_steps is None or (isinstance(self.max_steps, int) and self.max_steps >= 1),
            "max_steps",
            self.max_steps,
            "None or an integer >= 1",
        )
        _require(
            0.0 <= self.val_fraction < 1.0, "val_fraction", self.val_fraction, "a float in [0, 1)"
        )
        _require(
            self.precision in ("fp32", "bf16"), "precision", self.precision, "'fp32' or 'bf16'"
        )
        _require(
            self.minimax in ("surrogate", "two_backward"),
            "minimax",
            self.minimax,
            "'surrogate' or 'two_backward'",
        )
        _require(
            self.attention in ("auto", "plain", "fused"),
            "attention",
            self.attention,
            "'auto', 'plain' or 'fused'",
        )
        _require(
            not (self.compile and self.minimax == "two_backward"),
            "minimax",
            self.minimax,
            "'surrogate' when compile=True (the compiled backward cannot be run twice)",
        )
        _require(
            self.grad_clip is None or self.grad_clip > 0,
            "grad_clip",
            self.grad_clip,
            "None or a float > 0",
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return cls(**_known_fields(cls, data))


def _known_fields(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(
            f"unknown {cls.__name__} fields {unknown}: expected a subset of {sorted(names)}"
        )
    return dict(data)
