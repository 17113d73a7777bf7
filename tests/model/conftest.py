"""Small configurations and seeded series shared by the model tests (CPU only)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from model.config import ModelConfig


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return ModelConfig(n_channels=3, win_size=16, d_model=16, n_heads=2, e_layers=2, d_ff=16)


@pytest.fixture
def windows(tiny_cfg: ModelConfig) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(4, tiny_cfg.win_size, tiny_cfg.n_channels, generator=generator)


def _periodic_series(length: int, n_channels: int, seed: int, noise: float = 0.05) -> np.ndarray:
    """Phase-shifted sines with a little noise, roughly standardised, float32 `(length, C)`."""
    rng = np.random.default_rng(seed)
    t = np.arange(length)[:, None]
    phases = np.linspace(0.0, np.pi, n_channels)[None, :]
    clean = np.sin(2 * np.pi * t / 24 + phases) * np.sqrt(2)
    return (clean + noise * rng.standard_normal((length, n_channels))).astype(np.float32)


@pytest.fixture
def periodic_series() -> Callable[..., np.ndarray]:
    """Factory ``periodic_series(length, n_channels, seed, noise=0.05)``."""
    return _periodic_series
