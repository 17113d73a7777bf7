"""The fused Triton attention against the plain path at the real shape: values, gradients, time.

For q, k, v and sigma taken from a real attention layer (B=256, H=8, L=100, E=64), in fp32 and
bf16:

* values (attention output, discrepancy rows) and the gradients dq, dk, dv, dsigma of a
  surrogate-like objective (output term - k series_loss + k prior_loss), each as relative L2
  distance to the plain fp32 path. fp32 must agree to 1e-4; in bf16 the fused path must be
  about as close to fp32 as the plain bf16 path (within 1.5x its distance, or 1e-3);
* ms per forward + backward of the attention alone (no projections), plain eager, plain
  compiled (Inductor), fused eager, fused compiled, with the peak memory of each;
* on CUDA, fused bf16 time per kernel configuration (query-row block, warps).

On the GPU machine, from the repository root::

    PYTHONUNBUFFERED=1 python3 -m bench.check_fused --out "$OUT"

``--quick`` runs tiny shapes; without CUDA it sets ``TRITON_INTERPRET=1`` (Triton's interpreter on
CPU), so ``python3 -m bench.check_fused --quick`` runs anywhere Triton is installed. The
interpreter computes bf16 dots wrongly (triton-lang/triton#11584), so on CPU fp16 stands in for
bf16 (the same casts in the kernels). Exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from model.config import ModelConfig
from model.losses import association_discrepancy, row_discrepancy
from model.network import AnomalyAttention, squash_sigma
from model.steps import compile_options

K = 3.0
FP32_TOLERANCE = 1e-4
LOW_SLACK, LOW_FLOOR = 1.5, 1e-3
GRADS = ("dq", "dk", "dv", "dsigma")


@dataclass(frozen=True)
class Shape:
    batch: int
    heads: int
    length: int
    head_dim: int
    repeats: int


FULL = Shape(batch=256, heads=8, length=100, head_dim=64, repeats=20)
QUICK = Shape(batch=2, heads=2, length=20, head_dim=16, repeats=2)
SWEEP = [(block_m, warps) for block_m in (16, 32, 64, 128) for warps in (2, 4, 8)]

Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
Objective = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test")
    parser.add_argument("--out", type=Path, help="folder for check_fused.md")
    return parser.parse_args()


def layer_inputs(shape: Shape, device: torch.device) -> tuple[AnomalyAttention, Inputs]:
    """A fresh attention layer and its q, k, v (strided views of the projection) and sigma."""
    torch.manual_seed(0)
    d_model = shape.heads * shape.head_dim
    cfg = ModelConfig(n_channels=1, win_size=shape.length, d_model=d_model, n_heads=shape.heads)
    attention = AnomalyAttention(cfg).to(device)
    h = torch.randn(shape.batch, shape.length, d_model, device=device)
    with torch.no_grad():
        q, k, v, raw_sigma = attention._heads(h)
    return attention, (q, k, v, squash_sigma(raw_sigma))


def plain_objective(attention: AnomalyAttention) -> Objective:
    def objective(q, k, v, sigma, weights):  # type: ignore[no-untyped-def]
        heads, series, prior = attention.associations(q, k, v, sigma)
        rows = association_discrepancy([series], [prior])  # (B, L)
        series_loss = association_discrepancy([series], [prior.detach()]).mean()
        prior_loss = association_discrepancy([series.detach()], [prior]).mean()
        loss = (heads.float() * weights).mean() - K * series_loss + K * prior_loss
        return loss, heads, rows

    return objective


def fused_objective(block_m: int | None = None, num_warps: int | None = None) -> Objective:
    from model.fused_attention import DEFAULT_BLOCK_M, DEFAULT_NUM_WARPS, anomaly_attention

    config = {"block_m": block_m or DEFAULT_BLOCK_M, "num_warps": num_warps or DEFAULT_NUM_WARPS}

    def objective(q, k, v, sigma, weights):  # type: ignore[no-untyped-def]
        heads, series_side, prior_side = anomaly_attention(q, k, v, sigma, **config)
        rows = row_discrepancy([series_side])  # (B, L)
        series_loss, prior_loss = rows.mean(), row_discrepancy([prior_side]).mean()
        loss = (heads.float() * weights).mean() - K * series_loss + K * prior_loss
        return loss, heads, rows

    return objective


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
    return {**values, **dict(zip(GRADS, grads, strict=True))}


def relative_l2(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.double(), reference.double()
    return float((value - reference).norm() / reference.norm().clamp_min(1e-300))


def low_precision(device: torch.device) -> torch.dtype:
    """bf16 on CUDA; fp16 in Triton's CPU interpreter, whose bf16 dots are wrong."""
    return torch.bfloat16 if device.type == "cuda" else torch.float16


def accuracy(
    attention: AnomalyAttention, inputs: Inputs, weights: torch.Tensor
) -> tuple[list[str], bool]:
    """Relative L2 of every quantity to plain fp32: a markdown table and whether all passed."""
    dtypes = [torch.float32, low_precision(weights.device)]
    reference = evaluate(plain_objective(attention), leaves(inputs, torch.float32), weights)
    lines = [
        "| precision | quantity | plain vs plain fp32 | fused vs plain fp32 | ok |",
        "| --- | --- | --- | --- | --- |",
    ]
    passed = True
    for dtype in dtypes:
        plain = evaluate(plain_objective(attention), leaves(inputs, dtype), weights)
        fused = evaluate(fused_objective(), leaves(inputs, dtype), weights)
        for name, expected in reference.items():
            plain_error = relative_l2(plain[name], expected)
            fused_error = relative_l2(fused[name], expected)
            if dtype == torch.float32:
                ok = fused_error <= FP32_TOLERANCE
            else:
                ok = fused_error <= max(LOW_SLACK * plain_error, LOW_FLOOR)
            ok = ok and bool(torch.isfinite(fused[name]).all())
            passed &= ok
            lines.append(
                f"| {str(dtype).removeprefix('torch.')} | {name} | {plain_error:.2e} "
                f"| {fused_error:.2e} | {'yes' if ok else 'NO'} |"
            )
    return lines, passed


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


def timings(
    attention: AnomalyAttention, inputs: Inputs, weights: torch.Tensor, shape: Shape
) -> list[str]:
    options = compile_options(cuda_graphs=False)
    variants = {
        "plain eager": plain_objective(attention),
        "plain compiled": torch.compile(plain_objective(attention), options=options),
        "fused eager": fused_objective(),
        "fused compiled": torch.compile(fused_objective(), options=options),
    }
    lines = ["| precision | variant | ms fwd+bwd | peak GiB |", "| --- | --- | --- | --- |"]
    for dtype in (low_precision(weights.device), torch.float32):
        for name, objective in variants.items():
            torch._dynamo.reset()
            ms, peak = time_fwd_bwd(objective, leaves(inputs, dtype), weights, shape.repeats)
            peak_text = "–" if peak is None else f"{peak:.2f}"
            lines.append(
                f"| {str(dtype).removeprefix('torch.')} | {name} | {ms:.3f} | {peak_text} |"
            )
            print(lines[-1], flush=True)
    return lines


def sweep(inputs: Inputs, weights: torch.Tensor, shape: Shape) -> list[str]:
    """Fused bf16 forward + backward per kernel configuration (CUDA only)."""
    from triton.runtime.errors import OutOfResources

    lines = ["| block_m | warps | ms fwd+bwd |", "| --- | --- | --- |"]
    for block_m, warps in SWEEP:
        objective = fused_objective(block_m, warps)
        try:
            ms, _ = time_fwd_bwd(objective, leaves(inputs, torch.bfloat16), weights, shape.repeats)
            result = f"{ms:.3f}"
        except OutOfResources as error:
            result = f"out of resources ({error})"
        lines.append(f"| {block_m} | {warps} | {result} |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before model.fused_attention is imported
    shape = QUICK if args.quick else FULL
    attention, inputs = layer_inputs(shape, device)
    weights = torch.randn(inputs[0].shape, device=device)
    header = (
        f"B={shape.batch}, H={shape.heads}, L={shape.length}, E={shape.head_dim}, device "
        f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch "
        f"{torch.__version__}"
    )
    print(header, flush=True)
    accuracy_lines, passed = accuracy(attention, inputs, weights)
    print("\n".join(accuracy_lines), flush=True)
    sections = [
        header,
        "\n".join(accuracy_lines),
        "\n".join(timings(attention, inputs, weights, shape)),
    ]
    if device.type == "cuda":
        sections.append("\n".join(sweep(inputs, weights, shape)))
    sections.append(f"all checks passed: {passed}")
    report = "\n\n".join(sections)
    print("\n" + report)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "check_fused.md").write_text(report + "\n")
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
