"""The network: shapes, associations, sigma, numerical safety, input validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model.config import ModelConfig
from model.device import resolve_device
from model.losses import minimax_losses, surrogate_loss
from model.network import AnomalyTransformer, AutocastLayerNorm, sinusoidal_positions

SIGMA_MIN = 3.0**1e-5 - 1.0
SIGMA_MAX = 3.0 ** (1.0 + 1e-5) - 1.0


def _model(cfg: ModelConfig, seed: int = 0) -> AnomalyTransformer:
    torch.manual_seed(seed)
    return AnomalyTransformer(cfg)


def test_layer_norms_return_the_autocast_dtype_with_float32_statistics() -> None:
    """Under bf16 autocast the residual stream stays bf16; the statistics are float32."""
    norm = AutocastLayerNorm(8)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1.0, 1.0)
    x = (1000.0 + 10.0 * torch.randn(4, 8)).to(torch.bfloat16)  # a mean bf16 cannot centre on
    expected = F.layer_norm(x.float(), (8,), norm.weight, norm.bias, norm.eps)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        normalised = norm(x)
    assert normalised.dtype == torch.bfloat16
    assert torch.equal(normalised, expected.to(torch.bfloat16))
    assert torch.equal(norm(x.float()), expected)  # float32 outside autocast


def test_the_embedding_starts_the_residual_stream_in_the_autocast_dtype(
    tiny_cfg: ModelConfig, windows: torch.Tensor
) -> None:
    embedding = _model(tiny_cfg).embedding
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert embedding(windows).dtype == torch.bfloat16
    assert embedding(windows).dtype == torch.float32


def test_output_shapes(tiny_cfg: ModelConfig, windows: torch.Tensor) -> None:
    out = _model(tiny_cfg)(windows)
    batch, length, channels, heads = 4, tiny_cfg.win_size, tiny_cfg.n_channels, tiny_cfg.n_heads
    assert out.recon.shape == (batch, length, channels)
    assert len(out.series) == len(out.prior) == len(out.sigma) == tiny_cfg.e_layers
    for series, prior, sigma in zip(out.series, out.prior, out.sigma, strict=True):
        assert series.shape == prior.shape == (batch, heads, length, length)
        assert sigma.shape == (batch, heads, length)


def test_default_model_has_the_reference_parameters_minus_its_unused_layer_norms() -> None:
    model = AnomalyTransformer(ModelConfig(n_channels=38))
    reference, unused_norms = 4_828_222, 3 * 2 * 512
    assert sum(p.numel() for p in model.parameters()) == reference - unused_norms


def test_associations_are_row_distributions_and_prior_peaks_on_the_diagonal(
    tiny_cfg: ModelConfig, windows: torch.Tensor
) -> None:
    out = _model(tiny_cfg)(windows)
    for series, prior in zip(out.series, out.prior, strict=True):
        torch.testing.assert_close(series.sum(-1), torch.ones(series.shape[:-1]))
        torch.testing.assert_close(prior.sum(-1), torch.ones(prior.shape[:-1]))
        diagonal = prior.diagonal(dim1=-2, dim2=-1)  # (B, H, L)
        assert torch.equal(diagonal, prior.amax(dim=-1))


def test_prior_is_the_normalised_gaussian_of_the_reference(tiny_cfg: ModelConfig) -> None:
    out = _model(tiny_cfg)(torch.randn(2, tiny_cfg.win_size, tiny_cfg.n_channels))
    sigma = out.sigma[0].double()[..., None]  # (B, H, L, 1)
    index = torch.arange(tiny_cfg.win_size, dtype=torch.float64)
    distance = (index[:, None] - index[None, :]).abs()  # (L, L)
    gaussian = torch.exp(-(distance**2) / (2 * sigma**2)) / (math.sqrt(2 * math.pi) * sigma)
    expected = gaussian / gaussian.sum(-1, keepdim=True)
    torch.testing.assert_close(out.prior[0].double(), expected, rtol=1e-5, atol=1e-6)


def test_prior_is_not_symmetric_because_edge_rows_are_renormalised(tiny_cfg: ModelConfig) -> None:
    model = _model(tiny_cfg)
    with torch.no_grad():
        model.layers[0].attention.in_proj.bias[-tiny_cfg.n_heads :] = 5.0  # sigma near 2
        model.layers[0].attention.in_proj.weight[-tiny_cfg.n_heads :] = 0.0  # same for all rows
    prior = model(torch.randn(1, tiny_cfg.win_size, tiny_cfg.n_channels)).prior[0][0, 0]
    assert not torch.allclose(prior, prior.T)


@pytest.mark.parametrize("bias", [-1e4, -30.0, 0.0, 30.0, 1e4])
def test_sigma_bounds_and_finite_outputs_and_gradients_at_extreme_sigma(
    tiny_cfg: ModelConfig, windows: torch.Tensor, bias: float
) -> None:
    model = _model(tiny_cfg)
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.in_proj.bias[-tiny_cfg.n_heads :] = bias
    out = model(windows)
    for sigma in out.sigma:
        assert SIGMA_MIN * (1 - 1e-6) <= float(sigma.detach().min())
        assert float(sigma.detach().max()) <= SIGMA_MAX * (1 + 1e-6)
    surrogate_loss(minimax_losses(out, windows, tiny_cfg.k)).backward()
    tensors = [out.recon, *out.series, *out.prior]
    assert all(torch.isfinite(t).all() for t in tensors)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_extreme_sigma_reaches_both_ends_of_its_range(
    tiny_cfg: ModelConfig, windows: torch.Tensor
) -> None:
    model = _model(tiny_cfg)
    attention = model.layers[0].attention
    with torch.no_grad():
        attention.in_proj.bias[-tiny_cfg.n_heads :] = -1e4
        low = model(windows).sigma[0]
        attention.in_proj.bias[-tiny_cfg.n_heads :] = 1e4
        high = model(windows).sigma[0]
    torch.testing.assert_close(low, torch.full_like(low, SIGMA_MIN), rtol=1e-5, atol=0)
    torch.testing.assert_close(high, torch.full_like(high, SIGMA_MAX), rtol=1e-5, atol=0)


def test_bf16_autocast_on_cpu_keeps_associations_in_float32_and_finite(
    tiny_cfg: ModelConfig, windows: torch.Tensor
) -> None:
    model = _model(tiny_cfg)
    with torch.no_grad():
        model.layers[0].attention.in_proj.bias[-tiny_cfg.n_heads :] = -1e4  # sigma at its floor
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(windows)
    losses = minimax_losses(out, windows, tiny_cfg.k)
    surrogate_loss(losses).backward()
    assert all(t.dtype == torch.float32 for t in [*out.series, *out.prior, *out.sigma])
    assert all(torch.isfinite(t).all() for t in [out.recon, *out.series, *out.prior, *losses])
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_reconstruct_matches_forward(tiny_cfg: ModelConfig, windows: torch.Tensor) -> None:
    model = _model(tiny_cfg).eval()
    recon = model(windows).recon  # (B, L, C)
    torch.testing.assert_close(model.reconstruct(windows), recon)
    torch.testing.assert_close(model.reconstruct(windows, last_only=True), recon[:, -1:])


def test_token_embedding_is_the_circular_convolution_of_the_reference(
    tiny_cfg: ModelConfig, windows: torch.Tensor
) -> None:
    embedding = _model(tiny_cfg).embedding
    circular = F.pad(windows.transpose(1, 2), (1, 1), mode="circular")  # (B, C, L + 2)
    expected = F.conv1d(circular, embedding.token_weight).transpose(1, 2)  # (B, L, d)
    torch.testing.assert_close(embedding(windows), expected + embedding.positions)


def test_positions_are_sinusoids() -> None:
    positions = sinusoidal_positions(7, 6)
    angle = 5 * 10000 ** (-2 / 6)
    assert positions[5, 2] == pytest.approx(math.sin(angle), abs=1e-6)
    assert positions[5, 3] == pytest.approx(math.cos(angle), abs=1e-6)
    assert torch.equal(positions[0, 1::2], torch.ones(3))


@pytest.mark.parametrize(
    ("shape", "message"),
    [((2, 16, 4), "n_channels=3"), ((2, 15, 3), "win_size=16"), ((16, 3), "expected (batch")],
)
def test_invalid_input_shape_is_rejected(
    tiny_cfg: ModelConfig, shape: tuple[int, ...], message: str
) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        _model(tiny_cfg)(torch.zeros(shape))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_input_is_rejected_with_its_position(
    tiny_cfg: ModelConfig, windows: torch.Tensor, bad: float
) -> None:
    windows[1, 5, 2] = bad
    with pytest.raises(ValueError, match=rf"first is {bad} at window 1, position 5, channel 2"):
        _model(tiny_cfg)(windows)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"n_channels": 0}, "n_channels=0"),
        ({"d_model": 10, "n_heads": 4}, "d_model=10"),
        ({"win_size": 1}, "win_size=1"),
        ({"dropout": 1.0}, "dropout=1.0"),
        ({"temperature": 0.0}, "temperature=0.0"),
    ],
)
def test_invalid_config_names_the_field(overrides: dict[str, float], field: str) -> None:
    with pytest.raises(ValueError, match=f"invalid {field}"):
        ModelConfig(**{"n_channels": 3, **overrides})


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="invalid device='gpu0'"):
        resolve_device("gpu0")
    with pytest.raises(ValueError, match="invalid device='cuda:99': this machine has"):
        resolve_device("cuda:99")
