"""The Anomaly Transformer network (Xu et al., ICLR 2022) as the reference code builds it.

Differences from the reference that change nothing numerically but do change the state-dict
layout (so reference checkpoints do not load as they are):

* the feed-forward block uses ``nn.Linear`` where the reference uses ``Conv1d(kernel_size=1)``;
* Q, K, V and the sigma projection are one ``nn.Linear`` (``in_proj``, rows in that order);
* the prior is returned row-normalised: ``exp(-(i - j)^2 / (2 sigma_i^2))`` divided by its row
  sum (the reference returns the Gaussian with its ``1/(sqrt(2 pi) sigma)`` factor, which cancels,
  and divides by the row sum later). The diagonal term is ``exp(0) = 1``, so no max-subtraction
  is needed and the row sum is at least 1.

The token embedding is the reference's circular ``Conv1d(kernel_size=3, bias=False)``, computed
as a matmul over shifted copies; its weight keeps the ``Conv1d`` shape ``(d_model, C, 3)``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig

SIGMA_SHARPNESS = 5.0
SIGMA_BASE = 3.0
SIGMA_FLOOR = 1e-5


class ModelOutput(NamedTuple):
    """What one forward pass returns; the lists hold one tensor per encoder layer."""

    recon: torch.Tensor  # (B, L, C)
    series: list[torch.Tensor]  # each (B, H, L, L), rows sum to 1
    prior: list[torch.Tensor]  # each (B, H, L, L), rows sum to 1
    sigma: list[torch.Tensor]  # each (B, H, L)


class DiscrepancyOutput(NamedTuple):
    """What the fused forward pass returns; the lists hold one tensor per encoder layer.

    Both row lists hold the same values, the symmetric KL between series and prior per head and
    query; ``series_side`` carries gradient to the series only, ``prior_side`` to sigma only.
    """

    recon: torch.Tensor  # (B, L, C)
    series_side: list[torch.Tensor]  # each (B, H, L)
    prior_side: list[torch.Tensor]  # each (B, H, L)


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """Upcast half-precision tensors to float32; keep float32 and float64 as they are."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def squash_sigma(raw: torch.Tensor) -> torch.Tensor:
    """The reference's squashing ``3^(sigmoid(5 s) + 1e-5) - 1``, in [1.0986e-5, 2.00003].

    Computed as ``expm1(ln 3 * (sigmoid(5 s) + 1e-5))``, which keeps full relative precision
    near the lower bound (``pow(3, a) - 1`` in float32 loses about 0.2% there).
    """
    raw = at_least_float32(raw)
    exponent = torch.sigmoid(SIGMA_SHARPNESS * raw) + SIGMA_FLOOR
    return torch.expm1(math.log(SIGMA_BASE) * exponent)


def sinusoidal_positions(length: int, d_model: int) -> torch.Tensor:
    """Fixed positional encoding ``(length, d_model)``: sin on even channels, cos on odd ones."""
    position = torch.arange(length, dtype=torch.float32)[:, None]  # (L, 1)
    frequency = torch.exp(
        torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model)
    )  # (ceil(d/2),)
    angles = position * frequency  # (L, ceil(d/2))
    encoding = torch.zeros(length, d_model)
    encoding[:, 0::2] = torch.sin(angles)
    encoding[:, 1::2] = torch.cos(angles[:, : d_model // 2])
    return encoding


class AutocastLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` that returns the autocast dtype under autocast (statistics in float32).

    Plain autocast returns layer norms in float32, so the residual stream between layers and its
    gradients would be float32, though every product casts them to bf16 anyway. In bf16 the fused
    training step on an H200 is 4.2% faster this way (58,125 -> 60,552 windows/s) with the same
    gradient distance to float32 (2.57e-3); with the embedding's output in bf16 too, 0.9% more,
    and `recon_mean` scoring 1.7% (docs/performance.md, 2026-12-04).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normalised = super().forward(x)
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            return normalised.to(torch.get_autocast_dtype(device_type))
        return normalised


class DataEmbedding(nn.Module):
    """Circular token convolution (kernel 3, no bias) plus sinusoidal positions.

    The convolution runs as one matmul over the three circularly shifted copies of the window
    (same weight layout ``(d_model, C, 3)`` and result as ``Conv1d(padding_mode="circular")``,
    without the layout transposes a cuDNN convolution needs).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.token_weight = nn.Parameter(torch.empty(cfg.d_model, cfg.n_channels, 3))
        nn.init.kaiming_normal_(self.token_weight, mode="fan_in", nonlinearity="leaky_relu")
        positions = sinusoidal_positions(cfg.win_size, cfg.d_model)
        self.register_buffer("positions", positions, persistent=False)  # (L, d)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        padded = torch.cat([x[:, -1:], x, x[:, :1]], dim=1)  # (B, L + 2, C)
        taps = torch.stack([padded[:, k : k + length] for k in range(3)], dim=-1)  # (B, L, C, 3)
        tokens = taps.flatten(2) @ self.token_weight.flatten(1).T  # (B, L, d)
        # In the products' dtype (bf16 under autocast): the residual stream starts here.
        return self.dropout((tokens + self.positions).to(tokens.dtype))


class AnomalyAttention(nn.Module):
    """Self-attention that also returns the series association, the Gaussian prior and sigma."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.d_model = cfg.d_model
        self.in_proj = nn.Linear(cfg.d_model, 3 * cfg.d_model + cfg.n_heads)  # [Q | K | V | sigma]
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.attn_dropout = nn.Dropout(cfg.dropout)
        self.dropout_p = cfg.dropout
        index = torch.arange(cfg.win_size, dtype=torch.float32)
        half_sq_distance = -0.5 * (index[:, None] - index[None, :]) ** 2  # (L, L)
        self.register_buffer("half_sq_distance", half_sq_distance, persistent=False)

    def _packed_heads(self, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Q, K, V `(B, H, L, E)` and raw sigma `(B, H, L)` as views of one product with
        ``in_proj``: what the plain attention products fuse with best under Inductor (the
        compiled training step is 3% slower with ``_queries_keys_values``; docs/performance.md)."""
        batch, length, _ = h.shape
        d, n_heads = self.d_model, self.n_heads
        q, k, v, raw_sigma = self.in_proj(h).split([d, d, d, n_heads], dim=-1)
        shape = (batch, length, n_heads, d // n_heads)
        q, k, v = (t.reshape(shape).transpose(1, 2) for t in (q, k, v))  # each (B, H, L, E)
        return q, k, v, raw_sigma.transpose(1, 2)  # raw_sigma (B, H, L)

    def _queries_keys_values(
        self, h: torch.Tensor, *, last_query: bool = False
    ) -> tuple[torch.Tensor, ...]:
        """Q, K, V `(B, H, L, E)` of ``h`` `(B, L, d)` (with ``last_query``, Q of the last row
        only: `(B, H, 1, E)`), each its own product with a slice of ``in_proj``.

        Contiguous tensors for the fused kernels: cuDNN's attention copied the strided views of
        one packed product (18% of the scoring time), and the Triton kernels' training step is
        21% faster with these (docs/performance.md).
        """
        batch, d, n_heads = h.shape[0], self.d_model, self.n_heads
        weight, bias = self.in_proj.weight, self.in_proj.bias
        shape = (batch, -1, n_heads, d // n_heads)
        queries = h[:, -1:] if last_query else h
        q, k, v = (
            F.linear(rows, weight[i * d : (i + 1) * d], bias[i * d : (i + 1) * d])
            .reshape(shape)
            .transpose(1, 2)
            for i, rows in enumerate((queries, h, h))
        )
        return q, k, v

    def _raw_sigma(self, h: torch.Tensor) -> torch.Tensor:
        """The sigma rows of ``in_proj`` applied to ``h``: `(B, H, L)`."""
        d = self.d_model
        weight, bias = self.in_proj.weight[3 * d :], self.in_proj.bias[3 * d :]
        return F.linear(h, weight, bias).transpose(1, 2)

    def _merge(self, heads: torch.Tensor) -> torch.Tensor:
        batch, _, length, _ = heads.shape
        merged = heads.transpose(1, 2).reshape(batch, length, self.d_model)  # (B, L, d)
        return self.out_proj(merged)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q, k, v, raw_sigma = self._packed_heads(h)
        sigma = squash_sigma(raw_sigma)  # (B, H, L)
        heads, series, prior = self.associations(q, k, v, sigma)
        return self._merge(heads), series, prior, sigma

    def associations(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """Per-head output `(B, H, L, E)`, series and prior `(B, H, L, L)` from q, k, v and the
        squashed sigma `(B, H, L)`: the plain counterpart of ``model.fused_attention``."""
        scale = q.shape[-1] ** -0.5
        scores = torch.matmul(q * scale, k.transpose(-1, -2))  # (B, H, L, L)
        series = torch.softmax(at_least_float32(scores), dim=-1)  # (B, H, L, L)
        heads = torch.matmul(self.attn_dropout(series).to(v.dtype), v)  # (B, H, L, E)
        inverse_variance = sigma.pow(-2).unsqueeze(-1)  # (B, H, L, 1)
        gaussian = torch.exp(self.half_sq_distance * inverse_variance)  # (B, H, L, L), in [0, 1]
        prior = gaussian / gaussian.sum(dim=-1, keepdim=True)  # (B, H, L, L)
        return heads, series, prior

    def discrepancy_rows(self, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The attention output and the per-row discrepancies, through the Triton kernels.

        Returns ``(attended, series_side, prior_side)`` (see ``DiscrepancyOutput``).

        Raises:
            ValueError: attention dropout while training (the kernels have none).
        """
        from model.fused_attention import anomaly_attention  # imports Triton

        if self.training and self.dropout_p > 0:
            raise ValueError(
                f"invalid dropout={self.dropout_p} for fused attention: expected 0 while training"
            )
        q, k, v = self._queries_keys_values(h)
        sigma = squash_sigma(self._raw_sigma(h))  # (B, H, L)
        heads, series_side, prior_side = anomaly_attention(q, k, v, sigma)
        return self._merge(heads), series_side, prior_side

    def reconstruct(self, h: torch.Tensor, *, last_only: bool = False) -> torch.Tensor:
        """The attention output alone, through fused attention (no association tensors):
        `(B, L, d)`, or `(B, 1, d)` for the last query only."""
        q, k, v = self._queries_keys_values(h, last_query=last_only)
        dropout = self.dropout_p if self.training else 0.0
        heads = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)  # (B, H, L, E)
        return self._merge(heads)


class EncoderLayer(nn.Module):
    """Post-LayerNorm block: anomaly attention, then a GELU feed-forward network."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attention = AnomalyAttention(cfg)
        self.norm1 = AutocastLayerNorm(cfg.d_model)
        self.norm2 = AutocastLayerNorm(cfg.d_model)
        self.ffn = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.d_ff),
            nn.GELU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.d_ff, cfg.d_model),
            nn.Dropout(cfg.dropout),
        )
        self.dropout = nn.Dropout(cfg.dropout)

    def _feed_forward(self, h: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        h = self.norm1(h + self.dropout(attended))  # (B, L, d)
        return self.norm2(h + self.ffn(h))  # (B, L, d)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        attended, series, prior, sigma = self.attention(h)
        return self._feed_forward(h, attended), series, prior, sigma

    def discrepancy_rows(self, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        attended, series_side, prior_side = self.attention.discrepancy_rows(h)
        return self._feed_forward(h, attended), series_side, prior_side

    def reconstruct(self, h: torch.Tensor, *, last_only: bool = False) -> torch.Tensor:
        attended = self.attention.reconstruct(h, last_only=last_only)
        return self._feed_forward(h[:, -1:] if last_only else h, attended)


class AnomalyTransformer(nn.Module):
    """Reconstructs windows ``(B, L, C)`` and exposes the associations of every layer."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embedding = DataEmbedding(cfg)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.e_layers))
        self.norm = AutocastLayerNorm(cfg.d_model)
        self.projection = nn.Linear(cfg.d_model, cfg.n_channels)

    def forward(self, x: torch.Tensor, *, check_finite: bool = True) -> ModelOutput:
        """Reconstruct ``x`` (`torch.Tensor` of shape `(batch, win_size, n_channels)`).

        Raises:
            ValueError: wrong shape, or (when ``check_finite``) NaN/inf values in ``x``.
        """
        self.check_input(x, check_finite=check_finite)
        h = self.embedding(x)  # (B, L, d)
        series, prior, sigma = [], [], []
        for layer in self.layers:
            h, layer_series, layer_prior, layer_sigma = layer(h)
            series.append(layer_series)
            prior.append(layer_prior)
            sigma.append(layer_sigma)
        recon = self.projection(self.norm(h))  # (B, L, C)
        return ModelOutput(recon, series, prior, sigma)

    def discrepancy_rows(self, x: torch.Tensor, *, check_finite: bool = True) -> DiscrepancyOutput:
        """``forward(x)`` for training through the fused kernels (``model.fused_attention``):
        the reconstruction and each layer's discrepancy rows instead of the association tensors.
        """
        self.check_input(x, check_finite=check_finite)
        h = self.embedding(x)  # (B, L, d)
        series_side, prior_side = [], []
        for layer in self.layers:
            h, layer_series_side, layer_prior_side = layer.discrepancy_rows(h)
            series_side.append(layer_series_side)
            prior_side.append(layer_prior_side)
        recon = self.projection(self.norm(h))  # (B, L, C)
        return DiscrepancyOutput(recon, series_side, prior_side)

    def reconstruct(
        self, x: torch.Tensor, *, check_finite: bool = True, last_only: bool = False
    ) -> torch.Tensor:
        """``forward(x).recon`` without building the association tensors (fused attention).

        ``last_only`` returns the last position alone, `(B, 1, C)`: the last layer then attends
        from the last query only and skips its other rows' feed-forward work.
        """
        self.check_input(x, check_finite=check_finite)
        h = self.embedding(x)  # (B, L, d)
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            h = layer.reconstruct(h, last_only=last_only and index == last)
        return self.projection(self.norm(h))  # (B, L, C) or (B, 1, C)

    def check_input(self, x: torch.Tensor, *, check_finite: bool) -> None:
        """Raise ``ValueError`` naming the problem if ``x`` is not a valid batch of windows."""
        expected = (self.cfg.win_size, self.cfg.n_channels)
        if x.dim() != 3 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"invalid input shape {tuple(x.shape)}: expected (batch, win_size={expected[0]}, "
                f"n_channels={expected[1]})"
            )
        if not x.is_floating_point():
            raise ValueError(f"invalid input dtype {x.dtype}: expected a floating-point tensor")
        if check_finite and not torch.compiler.is_compiling():
            bad = (~torch.isfinite(x)).nonzero()  # (n_bad, 3)
            if len(bad):
                window, position, channel = bad[0].tolist()
                raise ValueError(
                    f"invalid input: {len(bad)} non-finite value(s), the first is "
                    f"{x[window, position, channel].item()} at window {window}, position "
                    f"{position}, channel {channel}"
                )
