"""One training step and the validation loss, in eager mode or compiled, fp32 or bf16 autocast."""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import torch

from model.config import ModelConfig, Precision, TrainConfig
from model.device import accelerated
from model.losses import (
    MinimaxLosses,
    fused_minimax_losses,
    minimax_losses,
    reconstruction_loss,
    surrogate_loss,
)
from model.network import AnomalyTransformer
from model.windows import WindowSet

FUSED_MIN_WINDOW = 64  # where attention="auto" picks the fused kernels (fused_attention_pays)
FUSED_MIN_HEAD_DIM = 32


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager[None]:
    """bf16 autocast for ``precision="bf16"``; the network keeps prior, KL and softmax in fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def compile_options(cuda_graphs: bool, *, training: bool = False) -> dict[str, bool]:
    """Inductor options for our compiled functions.

    ``online_softmax`` is off: on torch 2.11 + H200 its one-pass softmax turned the prior of
    finite inputs into NaN (bench run of 2026-11-28); the two-pass lowering is correct.
    ``triton.cudagraphs`` is what ``mode="reduce-overhead"`` sets. A ``training`` step also
    launches its kernels with programmatic dependent launch (``triton.enable_pdl``; Hopper and
    newer, ignored elsewhere) and without ``triton.mix_order_reduction``, which ends each
    LayerNorm backward's weight and bias gradients with eager ``sum`` calls: on an H200 the step is
    2.9% and 2.1% faster with each, 4.9% with both (docs/performance.md, 2026-12-04).
    """
    options = {"online_softmax": False, "triton.cudagraphs": cuda_graphs}
    if training:
        options |= {"triton.enable_pdl": True, "triton.mix_order_reduction": False}
    return options


def compile_training(fn: Callable[..., Any], backend: str, cuda_graphs: bool) -> Callable[..., Any]:
    """``torch.compile`` of a training objective: with ``compile_options(cuda_graphs,
    training=True)`` for Inductor, no options for other backends (``"eager"``, ``"aot_eager"``:
    the compiled path checked cheaply)."""
    options = compile_options(cuda_graphs, training=True) if backend == "inductor" else None
    return torch.compile(fn, backend=backend, options=options)


def fused_attention_blocker(model_cfg: ModelConfig, device: torch.device) -> str | None:
    """Why the fused Triton kernels cannot train ``model_cfg`` on ``device``; None if they can.

    They need Triton and a CUDA device (on CPU only Triton's interpreter runs them:
    ``TRITON_INTERPRET=1`` set before Triton is imported, for tests), ``win_size <= 128``, a head
    dimension ``<= 256`` and no dropout.
    """
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda" and not interpreted:
        return (
            f"attention='fused' on device {device}: expected a CUDA device "
            "(the Triton kernels run on GPUs; use attention='plain')"
        )
    if importlib.util.find_spec("triton") is None:
        return (
            "attention='fused': Triton is not installed (it ships with CUDA builds of torch; "
            "use attention='plain')"
        )
    from model.fused_attention import MAX_HEAD_DIM, MAX_WINDOW

    head_dim = model_cfg.d_model // model_cfg.n_heads
    if model_cfg.win_size > MAX_WINDOW or head_dim > MAX_HEAD_DIM:
        return (
            f"attention='fused' with win_size={model_cfg.win_size}, head dimension {head_dim}: "
            f"expected win_size <= {MAX_WINDOW} and d_model / n_heads <= {MAX_HEAD_DIM}"
        )
    if model_cfg.dropout:
        return f"attention='fused' with dropout={model_cfg.dropout}: expected dropout=0"
    return None


def fused_attention_pays(model_cfg: ModelConfig, precision: Precision) -> bool:
    """Whether the fused kernels train ``model_cfg`` at ``precision`` faster than compiled plain
    attention.

    Measured on an H200 (docs/performance.md, 2026-12-03): bf16 at window 100 with head
    dimension 64, 55,551 against 44,141 windows/s; not for short windows (window 25, head
    dimension 64: 111,352 against 136,387) nor narrow heads (window 100, head dimension 16:
    75,745 against 77,902); never in float32, where one layer's forward and backward take
    18.6 ms fused against 1.96 ms plain (docs/check_fused.md).
    """
    head_dim = model_cfg.d_model // model_cfg.n_heads
    wide_enough = model_cfg.win_size >= FUSED_MIN_WINDOW and head_dim >= FUSED_MIN_HEAD_DIM
    return precision == "bf16" and wide_enough


def resolve_attention(
    train_cfg: TrainConfig, model_cfg: ModelConfig, device: torch.device
) -> TrainConfig:
    """``train_cfg`` with ``attention="auto"`` resolved: ``"fused"`` where the kernels can run on
    a GPU with bf16 support and are the faster path for the model and precision
    (``fused_attention_pays``), else ``"plain"``.

    Raises:
        ValueError: ``attention="fused"`` where it cannot run (``fused_attention_blocker``).
    """
    if train_cfg.attention == "plain":
        return train_cfg  # nothing to check, and no Triton import on this path
    blocker = fused_attention_blocker(model_cfg, device)
    if train_cfg.attention == "auto":
        pays = fused_attention_pays(model_cfg, train_cfg.precision)
        fused = accelerated(device) and blocker is None and pays
        return replace(train_cfg, attention="fused" if fused else "plain")
    if train_cfg.attention == "fused" and blocker is not None:
        raise ValueError(f"invalid {blocker}")
    return train_cfg


def make_optimizer(model: torch.nn.Module, train_cfg: TrainConfig) -> torch.optim.Adam:
    """Adam with PyTorch's default betas and eps, no weight decay; fused kernels on CUDA."""
    on_cuda = next(model.parameters()).device.type == "cuda"
    return torch.optim.Adam(model.parameters(), lr=train_cfg.lr, fused=on_cuda)


class TrainStep:
    """Forward, minimax backward and one Adam step on a batch of windows ``(B, L, C)``.

    With ``train_cfg.compile`` the forward pass and the losses are compiled (on CUDA with CUDA
    graphs, as ``mode="reduce-overhead"``); a ``backend`` other than ``"inductor"`` is for checking
    the compiled path cheaply (e.g. ``"eager"``). With ``train_cfg.attention="fused"`` (or
    ``"auto"`` on a GPU) the attention, prior and discrepancy rows run in the Triton kernels of
    ``model.fused_attention``.

    Raises:
        ValueError: ``attention="fused"`` where it cannot run (``resolve_attention``).
    """

    def __init__(
        self,
        model: AnomalyTransformer,
        optimizer: torch.optim.Optimizer,
        model_cfg: ModelConfig,
        train_cfg: TrainConfig,
        backend: str = "inductor",
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.k = model_cfg.k
        self.device = next(model.parameters()).device
        self.train_cfg = train_cfg = resolve_attention(train_cfg, model_cfg, self.device)
        on_cuda = self.device.type == "cuda"
        self.cuda_graphs = train_cfg.compile and backend == "inductor" and on_cuda
        self.losses = self._eager_losses
        if train_cfg.compile:
            self.losses = compile_training(self._eager_losses, backend, self.cuda_graphs)

    def _eager_losses(self, x: torch.Tensor) -> MinimaxLosses:
        if self.train_cfg.attention == "fused":
            with autocast(self.device, self.train_cfg.precision):
                rows = self.model.discrepancy_rows(x, check_finite=False)
            return fused_minimax_losses(rows, x, self.k)
        with autocast(self.device, self.train_cfg.precision):
            out = self.model(x, check_finite=False)
        return minimax_losses(out, x, self.k)

    def backward(self, x: torch.Tensor) -> torch.Tensor:
        """Forward and minimax backward (gradients accumulate); the detached batch stats."""
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        losses = self.losses(x)
        if self.train_cfg.minimax == "surrogate":
            surrogate_loss(losses).backward()
        else:
            losses.loss1.backward(retain_graph=True)
            losses.loss2.backward()
        return torch.stack([losses.loss1, losses.rec, losses.discrepancy]).detach()  # (3,)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Train on ``x``; returns the detached ``(loss1, rec, discrepancy)`` of the batch."""
        self.optimizer.zero_grad(set_to_none=True)
        stats = self.backward(x)
        if self.train_cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.train_cfg.grad_clip)
        self.optimizer.step()
        return stats


def epoch_batches(n_windows: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Shuffled window ids `(n_batches, size)`; the last batch is topped up from the epoch's start.

    Equal batches keep one shape for the compiled step (no recompilation, one CUDA graph).
    """
    order = torch.randperm(n_windows, generator=generator)  # (n,)
    size = min(batch_size, n_windows)
    n_batches = -(-n_windows // size)
    topped_up = torch.cat([order, order[: n_batches * size - n_windows]])  # (n_batches * size,)
    return topped_up.view(n_batches, size)


def validation_rec(
    model: AnomalyTransformer, windows: WindowSet, batch_size: int, precision: Precision
) -> float:
    """Mean reconstruction MSE over every window of ``windows`` (inference mode, eval mode)."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=windows.device, dtype=torch.float64)
    with torch.inference_mode():
        for window_ids in torch.arange(len(windows)).split(batch_size):
            x = windows.batch(window_ids)  # (b, L, C)
            with autocast(windows.device, precision):
                recon = model.reconstruct(x, check_finite=False)  # (b, L, C)
            total += reconstruction_loss(recon, x).double() * len(window_ids)
    model.train(was_training)
    return float(total) / len(windows)


@contextlib.contextmanager
def deterministic_mode(enabled: bool) -> Iterator[None]:
    """Deterministic kernels (and no cuDNN autotuning) inside the block; restored afterwards."""
    if not enabled:
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    )
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.backends.cudnn.benchmark = previous[1]
        torch.backends.cudnn.deterministic = previous[2]
