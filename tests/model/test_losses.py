"""KL rows, association discrepancy, and which parameters each minimax phase trains."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.config import ModelConfig
from model.losses import (
    association_discrepancy,
    kl_rows,
    minimax_losses,
    reconstruction_loss,
    surrogate_loss,
)
from model.network import AnomalyTransformer, ModelOutput


def _distributions(*shape: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.softmax(3 * torch.randn(*shape, generator=generator), dim=-1)


def test_kl_of_a_distribution_with_itself_is_zero() -> None:
    p = _distributions(2, 3, 5, 5, seed=0)
    assert torch.equal(kl_rows(p, p), torch.zeros(2, 5))


def test_kl_rows_matches_the_formula_with_eps_inside_the_logs_and_a_head_mean() -> None:
    p, q = _distributions(2, 3, 4, 6, seed=1), _distributions(2, 3, 4, 6, seed=2)
    pn, qn = p.double().numpy(), q.double().numpy()
    expected = (pn * (np.log(pn + 1e-4) - np.log(qn + 1e-4))).sum(-1).mean(1)  # (B, L)
    np.testing.assert_allclose(kl_rows(p, q).numpy(), expected, rtol=1e-5)
    assert (kl_rows(p, q) > 0).all()


def test_association_discrepancy_is_symmetric_and_averages_layers() -> None:
    series = [_distributions(2, 3, 4, 4, seed=s) for s in (3, 4)]
    prior = [_distributions(2, 3, 4, 4, seed=s) for s in (5, 6)]
    discrepancy = association_discrepancy(series, prior)
    torch.testing.assert_close(discrepancy, association_discrepancy(prior, series))
    per_layer = [kl_rows(s, p) + kl_rows(p, s) for s, p in zip(series, prior, strict=True)]
    torch.testing.assert_close(discrepancy, (per_layer[0] + per_layer[1]) / 2)


def _model_and_output(cfg: ModelConfig, x: torch.Tensor) -> tuple[AnomalyTransformer, ModelOutput]:
    torch.manual_seed(0)
    model = AnomalyTransformer(cfg).to(x.dtype)
    return model, model(x)


def test_phase_losses_have_the_reference_values(
    tiny_cfg: ModelConfig, windows: torch.Tensor
) -> None:
    _, out = _model_and_output(tiny_cfg, windows)
    losses = minimax_losses(out, windows, tiny_cfg.k)
    discrepancy = association_discrepancy(out.series, out.prior).mean()
    rec = ((out.recon - windows) ** 2).mean()
    torch.testing.assert_close(losses.rec, rec)
    torch.testing.assert_close(losses.loss1, rec - tiny_cfg.k * discrepancy)
    torch.testing.assert_close(losses.loss2, rec + tiny_cfg.k * discrepancy)
    torch.testing.assert_close(surrogate_loss(losses), 2 * rec)
    assert not losses.discrepancy.requires_grad


def _grads(loss: torch.Tensor, model: AnomalyTransformer) -> dict[str, torch.Tensor]:
    names, params = zip(*model.named_parameters(), strict=True)
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return {
        n: torch.zeros_like(p) if g is None else g
        for n, p, g in zip(names, params, grads, strict=True)
    }


def _rows(grads: dict[str, torch.Tensor], layer: int, part: str, cfg: ModelConfig) -> torch.Tensor:
    """Gradient rows of one part of a layer's fused ``in_proj`` (weight and bias together)."""
    d, h = cfg.d_model, cfg.n_heads
    bounds = {"q": (0, d), "k": (d, 2 * d), "v": (2 * d, 3 * d), "sigma": (3 * d, 3 * d + h)}
    start, stop = bounds[part]
    prefix = f"layers.{layer}.attention.in_proj"
    weight, bias = grads[f"{prefix}.weight"][start:stop], grads[f"{prefix}.bias"][start:stop]
    return torch.cat([weight.flatten(), bias])


def _routing(cfg: ModelConfig, x: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    model, out = _model_and_output(cfg, x)
    fixed_prior = [p.detach() for p in out.prior]
    fixed_series = [s.detach() for s in out.series]
    losses = minimax_losses(out, x, cfg.k)
    return {
        "rec": _grads(reconstruction_loss(out.recon, x), model),
        "series": _grads(association_discrepancy(out.series, fixed_prior).mean(), model),
        "prior": _grads(association_discrepancy(fixed_series, out.prior).mean(), model),
        "loss1": _grads(losses.loss1, model),
        "loss2": _grads(losses.loss2, model),
    }


def test_maximise_phase_trains_the_series_side_only(
    tiny_cfg: ModelConfig, windows: torch.Tensor
) -> None:
    grads = _routing(tiny_cfg, windows)["series"]
    last = tiny_cfg.e_layers - 1
    for layer in range(tiny_cfg.e_layers):
        assert not _rows(grads, layer, "sigma", tiny_cfg).any(), "sigma got series-loss gradient"
    assert _rows(grads, last, "q", tiny_cfg).abs().sum() > 0
    assert _rows(grads, last, "k", tiny_cfg).abs().sum() > 0
    assert not _rows(grads, last, "v", tiny_cfg).any()
    assert not grads["projection.weight"].any()
    assert grads["embedding.token_weight"].abs().sum() > 0  # shared upstream weights


def test_minimise_phase_trains_the_prior_side_only(
    tiny_cfg: ModelConfig, windows: torch.Tensor
) -> None:
    grads = _routing(tiny_cfg, windows)["prior"]
    last = tiny_cfg.e_layers - 1
    for layer in range(tiny_cfg.e_layers):
        assert _rows(grads, layer, "sigma", tiny_cfg).abs().sum() > 0
    assert not _rows(grads, last, "q", tiny_cfg).any(), "Q got prior-loss gradient"
    assert not _rows(grads, last, "k", tiny_cfg).any(), "K got prior-loss gradient"
    assert not _rows(grads, last, "v", tiny_cfg).any()
    assert grads["embedding.token_weight"].abs().sum() > 0  # shared upstream weights


def test_phase_losses_route_gradients_as_the_reference(
    tiny_cfg: ModelConfig, windows: torch.Tensor
) -> None:
    routing = _routing(tiny_cfg, windows)
    last = tiny_cfg.e_layers - 1
    for layer in range(tiny_cfg.e_layers):  # sigma moves only through loss2's prior term
        assert not _rows(routing["rec"], layer, "sigma", tiny_cfg).any()
        assert not _rows(routing["loss1"], layer, "sigma", tiny_cfg).any()
        torch.testing.assert_close(
            _rows(routing["loss2"], layer, "sigma", tiny_cfg),
            tiny_cfg.k * _rows(routing["prior"], layer, "sigma", tiny_cfg),
        )
    for part in ("q", "k"):  # the last layer's Q and K see loss2 only through rec
        loss2, rec = (_rows(routing[name], last, part, tiny_cfg) for name in ("loss2", "rec"))
        torch.testing.assert_close(loss2, rec)


def _flat_grads(model: AnomalyTransformer) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("k", [3.0, 0.5])
def test_surrogate_gives_the_gradient_of_the_two_backward_update(
    tiny_cfg: ModelConfig, windows: torch.Tensor, k: float
) -> None:
    x = windows.double()
    model, out = _model_and_output(tiny_cfg, x)
    losses = minimax_losses(out, x, k)
    losses.loss1.backward(retain_graph=True)
    losses.loss2.backward(retain_graph=True)
    two_backward = _flat_grads(model)
    model.zero_grad()
    surrogate_loss(losses).backward()
    single = _flat_grads(model)
    assert two_backward.shape == single.shape
    relative = float((single - two_backward).norm() / two_backward.norm())
    assert relative < 1e-5
