"""Association discrepancy and the minimax objective: the one implementation of both.

``series_loss`` and ``prior_loss`` have the same value; they differ only in which side is
detached. The maximise phase (``loss1``) moves the series association away from a fixed prior,
the minimise phase (``loss2``) moves the prior towards a fixed series association.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from model.network import DiscrepancyOutput, ModelOutput, at_least_float32

KL_EPS = 1e-4


class MinimaxLosses(NamedTuple):
    """Scalar losses of one batch (``discrepancy`` is detached, for logging)."""

    loss1: torch.Tensor  # rec - k * series_loss, prior detached
    loss2: torch.Tensor  # rec + k * prior_loss, series detached
    rec: torch.Tensor  # mean squared reconstruction error
    discrepancy: torch.Tensor  # value of series_loss == prior_loss


def kl_rows(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` over keys with 1e-4 inside both logs, averaged over heads.

    Args:
        p, q: distributions over the last axis, of shape `(batch, heads, L, L)`.

    Returns:
        `(batch, L)`: one value per query position.
    """
    p, q = at_least_float32(p), at_least_float32(q)
    terms = p * (torch.log(p + KL_EPS) - torch.log(q + KL_EPS))  # (B, H, L, L)
    return terms.sum(dim=-1).mean(dim=1)  # (B, L)


def association_discrepancy(series: list[torch.Tensor], prior: list[torch.Tensor]) -> torch.Tensor:
    """Symmetric KL between series and prior per point, averaged over heads and layers.

    Returns:
        `(batch, L)`. The reference score uses the sum over layers: multiply by the layer count.
    """
    per_layer = [kl_rows(s, p) + kl_rows(p, s) for s, p in zip(series, prior, strict=True)]
    return torch.stack(per_layer).mean(dim=0)  # (B, L)


def row_discrepancy(rows: list[torch.Tensor]) -> torch.Tensor:
    """``association_discrepancy`` from per-layer rows `(batch, heads, L)` of the fused kernels.

    Returns:
        `(batch, L)`: the mean over heads and layers.
    """
    return torch.stack(rows).mean(dim=(0, 2))  # (B, L)


def reconstruction_loss(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every element, computed in at least float32."""
    return F.mse_loss(at_least_float32(recon), at_least_float32(x))


def minimax_losses(out: ModelOutput, x: torch.Tensor, k: float) -> MinimaxLosses:
    """The reference's two phase losses for windows ``x`` of shape `(batch, L, C)`."""
    fixed_prior = [p.detach() for p in out.prior]
    fixed_series = [s.detach() for s in out.series]
    return _phase_losses(
        reconstruction_loss(out.recon, x),
        association_discrepancy(out.series, fixed_prior).mean(),
        association_discrepancy(fixed_series, out.prior).mean(),
        k,
    )


def fused_minimax_losses(out: DiscrepancyOutput, x: torch.Tensor, k: float) -> MinimaxLosses:
    """``minimax_losses`` from the fused forward pass (``AnomalyTransformer.discrepancy_rows``)."""
    return _phase_losses(
        reconstruction_loss(out.recon, x),
        row_discrepancy(out.series_side).mean(),
        row_discrepancy(out.prior_side).mean(),
        k,
    )


def _phase_losses(
    rec: torch.Tensor, series_loss: torch.Tensor, prior_loss: torch.Tensor, k: float
) -> MinimaxLosses:
    return MinimaxLosses(
        loss1=rec - k * series_loss,
        loss2=rec + k * prior_loss,
        rec=rec,
        discrepancy=series_loss.detach(),
    )


def surrogate_loss(losses: MinimaxLosses) -> torch.Tensor:
    """``2 rec - k series_loss + k prior_loss``: one backward of it equals backward(loss1) then
    backward(loss2), because both accumulate into the same gradients before one optimiser step."""
    return losses.loss1 + losses.loss2
