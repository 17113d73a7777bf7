"""The fused Triton attention against the plain path at the real shape: values, gradients, time.

For q, k, v and sigma taken from a real attention layer (B=256, H=8, L=100, E=64), in bf16 and
then fp32, one table row per variant and precision:

* variants: the plain path eager and compiled (Inductor); the fused kernels
  (``model.fused_attention``) compiled with the dtype's default (``DEFAULT_CONFIGS``), and eager
  with each of ``CANDIDATE_CONFIGS`` (label: fwd rows x keys/warps, dq rows x keys/warps,
  dk/dv keys x rows/warps);
* time of forward + backward of the attention alone (no projections) of a surrogate-like
  objective (output term - k series_loss + k prior_loss): median wall ms and, on CUDA, GPU ms
  per call (all kernels, from the profiler), the ms of each fused kernel, and the peak memory;
* accuracy: relative L2 distance of the output, the discrepancy rows and dq, dk, dv, dsigma to
  the plain fp32 path. A fused variant passes when fp32 is within 1e-4 and bf16 within 1.5x the
  plain bf16 distance (or 1e-3).

On CUDA it ends with the fastest candidate per kernel (bf16), combined into one ``KernelConfig``
for ``model.fused_attention.DEFAULT_CONFIGS``. On the GPU machine, from the repository root::

    PYTHONUNBUFFERED=1 python3 -m bench.check_fused --out "$OUT"

``--out`` gets ``check_fused.md``, rewritten after every row (a run cut short keeps what it
measured). ``--quick`` runs tiny shapes; without CUDA it sets ``TRITON_INTERPRET=1`` (Triton's
interpreter on CPU), so ``python3 -m bench.check_fused --quick`` runs anywhere Triton is
installed. The interpreter computes bf16 dots wrongly (triton-lang/triton#11584), so on CPU fp16
stands in for bf16 (the same casts in the kernels). Exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.profile_step import kernel_profile
from model.config import ModelConfig
from model.losses import association_discrepancy, row_discrepancy
from model.network import AnomalyAttention, squash_sigma
from model.steps import compile_options

K = 3.0
FP32_TOLERANCE = 1e-4
LOW_SLACK, LOW_FLOOR = 1.5, 1e-3
QUANTITIES = ("output", "rows", "dq", "dk", "dv", "dsigma")
HEADER = (
    "| variant | precision | ms fwd+bwd | GPU ms | fused kernels ms | peak GiB | "
    + " | ".join(QUANTITIES)
    + " | ok |"
)


@dataclass(frozen=True)
class Shape:
    batch: int
    heads: int
    length: int
    head_dim: int
    repeats: int


FULL = Shape(batch=256, heads=8, length=100, head_dim=64, repeats=20)
QUICK = Shape(batch=2, heads=2, length=20, head_dim=16, repeats=2)

Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
Objective = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Variant:
    name: str
    objective: Objective
    compiled: bool = False
    fused: bool = True
    config: Any = None  # the KernelConfig of a candidate


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test")
    parser.add_argument("--out", type=Path, help="folder for check_fused.md")
    return parser.parse_args()


def layer_inputs(shape: Shape, device: torch.device) -> tuple[AnomalyAttention, Inputs]:
    """A fresh attention layer, its q, k, v (contiguous, as the fused path gets them), sigma."""
    torch.manual_seed(0)
    d_model = shape.heads * shape.head_dim
    cfg = ModelConfig(n_channels=1, win_size=shape.length, d_model=d_model, n_heads=shape.heads)
    attention = AnomalyAttention(cfg).to(device)
    h = torch.randn(shape.batch, shape.length, d_model, device=device)
    with torch.no_grad():
        q, k, v = attention._queries_keys_values(h)  # the inputs discrepancy_rows gives them
        sigma = squash_sigma(attention._raw_sigma(h))
    return attention, (q, k, v, sigma)


def plain_objective(attention: AnomalyAttention) -> Objective:
    def objective(q, k, v, sigma, weights):  # type: ignore[no-untyped-def]
        heads, series, prior = attention.associations(q, k, v, sigma)
        rows = association_discrepancy([series], [prior])  # (B, L)
        series_loss = association_discrepancy([series], [prior.detach()]).mean()
        prior_loss = association_discrepancy([series.detach()], [prior]).mean()
        loss = (heads.float() * weights).mean() - K * series_loss + K * prior_loss
        return loss, heads, rows

    return objective


def fused_objective(attend: Callable[..., tuple[torch.Tensor, ...]]) -> Objective:
    """The objective through ``attend(q, k, v, sigma) -> (heads, series_side, prior_side)``."""

    def objective(q, k, v, sigma, weights):  # type: ignore[no-untyped-def]
        heads, series_side, prior_side = attend(q, k, v, sigma)
        rows = row_discrepancy([series_side])  # (B, L)
        series_loss, prior_loss = rows.mean(), row_discrepancy([prior_side]).mean()
        loss = (heads.float() * weights).mean() - K * series_loss + K * prior_loss
        return loss, heads, rows

    return objective


def label(config: Any) -> str:
    f_rows, f_keys, f_warps, q_rows, q_keys, q_warps, keys, kv_rows, kv_warps = config
    return (
        f"f{f_rows}x{f_keys}/{f_warps} q{q_rows}x{q_keys}/{q_warps} kv{keys}x{kv_rows}/{kv_warps}"
    )


def variants(attention: AnomalyAttention) -> list[Variant]:
    """Plain and fused (imported here: after TRITON_INTERPRET)."""
    from model.fused_attention import CANDIDATE_CONFIGS, anomaly_attention

    current = [
        Variant(label(c), fused_objective(functools.partial(anomaly_attention, config=c)), config=c)
        for c in CANDIDATE_CONFIGS
    ]
    return [
        Variant("plain eager", plain_objective(attention), fused=False),
        Variant("plain compiled", plain_objective(attention), compiled=True, fused=False),
        Variant("default compiled", fused_objective(anomaly_attention), True),
        *current,
    ]


def leaves(inputs: Inputs, dtype: torch.dtype) -> Inputs:
    """q, k, v in ``dtype`` (sigma stays float32), detached leaves that require gradients."""
    q, k, v, sigma = (t.detach() for t in inputs)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    return tuple(t.requires_grad_() for t in (q, k, v, sigma))  # type: ignore[return-value]


def evaluate(
    objective: Objective, inputs: Inputs, weights: torch.Tensor
) -> dict[str, torch.Tensor]:
    loss, heads, rows = objective(*inputs, weights)
    grads = torch.autograd.grad(loss, inputs)
    values = {"output": heads.detach(), "rows": rows.detach()}
    return {**values, **dict(zip(QUANTITIES[2:], grads, strict=True))}


def relative_l2(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.double(), reference.double()
    return float((value - reference).norm() / reference.norm().clamp_min(1e-300))


def low_precision(device: torch.device) -> torch.dtype:
    """bf16 on CUDA; fp16 in Triton's CPU interpreter, whose bf16 dots are wrong."""
    return torch.bfloat16 if device.type == "cuda" else torch.float16


def time_fwd_bwd(
    objective: Objective, inputs: Inputs, weights: torch.Tensor, repeats: int
) -> tuple[float, float | None]:
    """Median ms of forward + backward over ``repeats`` calls (after 3 warm-up calls), peak GiB."""
    device = weights.device
    for _ in range(3):
        torch.autograd.grad(objective(*inputs, weights)[0], inputs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        torch.autograd.grad(objective(*inputs, weights)[0], inputs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(1e3 * (time.perf_counter() - started))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return sorted(times)[len(times) // 2], peak


def gpu_times(
    objective: Objective, inputs: Inputs, weights: torch.Tensor, repeats: int
) -> tuple[float, dict[str, float]]:
    """GPU ms per forward + backward (all kernels) and per fused kernel, from the profiler."""
    summary = kernel_profile(
        lambda: torch.autograd.grad(objective(*inputs, weights)[0], inputs), repeats, top=100
    )
    kernels = {
        k["name"].strip("_"): k["ms_per_step"]
        for k in summary["top_kernels"]
        if "attention" in k["name"]
    }
    return summary["gpu_ms_per_step"], kernels


@dataclass
class Row:
    variant: Variant
    dtype: torch.dtype
    errors: dict[str, float]
    ok: bool | None  # None: plain
    ms: float
    peak: float | None
    gpu_ms: float | None
    kernels: dict[str, float]

    def markdown(self) -> str:
        kernels = ", ".join(f"{name} {ms:.3f}" for name, ms in self.kernels.items()) or "–"
        cells = [
            self.variant.name,
            str(self.dtype).removeprefix("torch."),
            f"{self.ms:.3f}",
            "–" if self.gpu_ms is None else f"{self.gpu_ms:.3f}",
            kernels,
            "–" if self.peak is None else f"{self.peak:.2f}",
            *(f"{self.errors[name]:.2e}" for name in QUANTITIES),
            {None: "–", True: "yes", False: "NO"}[self.ok],
        ]
        return "| " + " | ".join(cells) + " |"


def measure(
    variant: Variant,
    inputs: Inputs,
    weights: torch.Tensor,
    dtype: torch.dtype,
    reference: dict[str, torch.Tensor],
    plain_errors: dict[str, float],
    repeats: int,
) -> Row:
    """One variant in one precision; ``plain_errors`` (plain eager's) set the low-precision
    tolerance of a fused variant."""
    torch._dynamo.reset()
    objective = variant.objective
    if variant.compiled:
        objective = torch.compile(objective, options=compile_options(cuda_graphs=False))
    leaf = leaves(inputs, dtype)
    result = evaluate(objective, leaf, weights)
    errors = {name: relative_l2(result[name], expected) for name, expected in reference.items()}
    ok = None
    if variant.fused:
        low = {n: max(LOW_SLACK * plain_errors.get(n, 0.0), LOW_FLOOR) for n in QUANTITIES}
        limits = low if dtype != torch.float32 else dict.fromkeys(QUANTITIES, FP32_TOLERANCE)
        finite = all(bool(torch.isfinite(t).all()) for t in result.values())
        ok = finite and all(errors[name] <= limits[name] for name in QUANTITIES)
    ms, peak = time_fwd_bwd(objective, leaf, weights, repeats)
    gpu_ms, kernels = None, {}
    if weights.device.type == "cuda":
        gpu_ms, kernels = gpu_times(objective, leaf, weights, max(2, repeats // 4))
    return Row(variant, dtype, errors, ok, ms, peak, gpu_ms, kernels)


def kernel_ms(row: Row, kernel: str) -> float:
    times = [ms for name, ms in row.kernels.items() if kernel in name]
    return sum(times) if times else float("inf")


def best_per_kernel(rows: list[Row]) -> str:
    """The fastest bf16 candidate per fused kernel, combined into one configuration."""
    from model.fused_attention import KernelConfig

    candidates = [r for r in rows if r.variant.config is not None and r.dtype == torch.bfloat16]
    candidates = [r for r in candidates if r.ok and r.kernels]
    if not candidates:
        return "no bf16 candidate with kernel times"
    parts = {  # each kernel's fields of KernelConfig
        "attention_fwd": slice(0, 3),
        "attention_bwd_dq": slice(3, 6),
        "attention_bwd_dkdv": slice(6, 9),
    }
    lines, fields = ["| kernel | fastest candidate | ms |", "| --- | --- | --- |"], []
    for kernel, part in parts.items():
        best = min(candidates, key=functools.partial(kernel_ms, kernel=kernel))
        lines.append(f"| {kernel} | {best.variant.name} | {kernel_ms(best, kernel):.3f} |")
        fields.extend(best.variant.config[part])
    lines.append(f"\ncombined: `{KernelConfig(*fields)!r}`")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    shape = QUICK if args.quick else FULL
    attention, inputs = layer_inputs(shape, device)
    weights = torch.randn(inputs[0].shape, device=device)
    header = (
        f"B={shape.batch}, H={shape.heads}, L={shape.length}, E={shape.head_dim}, device "
        f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch "
        f"{torch.__version__}; errors: relative L2 to plain fp32"
    )
    lines = [header, "", HEADER, "| --- " * (HEADER.count("|") - 1) + "|"]
    reference = evaluate(plain_objective(attention), leaves(inputs, torch.float32), weights)
    rows: list[Row] = []
    failed = False

    def report(line: str) -> None:
        lines.append(line)
        print(line, flush=True)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "check_fused.md").write_text("\n".join(lines) + "\n")

    print("\n".join(lines), flush=True)
    for dtype in (low_precision(device), torch.float32):
        plain_errors: dict[str, float] = {}
        for variant in variants(attention):
            try:
                row = measure(
                    variant, inputs, weights, dtype, reference, plain_errors, shape.repeats
                )
            except (OutOfResources, CompilationError, RuntimeError) as error:
                # Out of resources: not a candidate on this GPU; anything else fails the run.
                failed |= not isinstance(error, OutOfResources)
                precision = str(dtype).removeprefix("torch.")
                message = f"{type(error).__name__}: {str(error).splitlines()[0]}"
                report(f"| {variant.name} | {precision} | {message} |")
                continue
            plain_errors = plain_errors or row.errors  # plain eager comes first
            rows.append(row)
            report(row.markdown())
    if device.type == "cuda":
        report("\n" + best_per_kernel(rows))
    passed = not failed and all(row.ok is not False for row in rows)
    report(f"\nall checks passed: {passed}")
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
