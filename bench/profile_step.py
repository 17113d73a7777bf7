"""Where the GPU time of a step goes: matmul kernels against everything else, top kernels."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

MATMUL_MARKERS = ("gemm", "nvjet", "xmma", "cutlass", "wgmma", "sdpa", "flash", "triton_tem")
# Inductor's fused pointwise/reduction kernels name the ops they fuse (e.g. "..._bmm_...").
FUSED_ELEMENTWISE = ("triton_poi", "triton_red", "triton_per")


def is_matmul(kernel_name: str) -> bool:
    """cuBLAS/CUTLASS/cuDNN matrix kernels and Inductor's matmul templates."""
    name = kernel_name.lower()
    if name.startswith(FUSED_ELEMENTWISE):
        return False
    return any(marker in name for marker in MATMUL_MARKERS)


def kernel_profile(run_step: Callable[[], Any], steps: int, top: int = 15) -> dict[str, Any]:
    """Profile ``steps`` calls of ``run_step`` on CUDA; times are per step, in milliseconds."""
    torch.cuda.synchronize()
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            run_step()
        torch.cuda.synchronize()
    wall_ms = 1e3 * (time.perf_counter() - started) / steps
    kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    per_step = sorted(
        ((e.key, e.self_device_time_total / 1e3 / steps, e.count / steps) for e in kernels),
        key=lambda item: -item[1],
    )
    matmul_ms = sum(ms for name, ms, _ in per_step if is_matmul(name))
    gpu_ms = sum(ms for _, ms, _ in per_step)
    return {
        "wall_ms_per_step": wall_ms,
        "gpu_ms_per_step": gpu_ms,
        "matmul_ms_per_step": matmul_ms,
        "other_ms_per_step": gpu_ms - matmul_ms,
        "kernels_per_step": sum(calls for _, _, calls in per_step),
        "top_kernels": [
            {"name": name[:110], "ms_per_step": ms, "calls_per_step": calls}
            for name, ms, calls in per_step[:top]
        ],
    }


def profile_markdown(title: str, summary: dict[str, Any]) -> str:
    """A short markdown section of a ``kernel_profile`` result."""
    lines = [
        f"### Profile: {title}",
        "",
        f"- wall {summary['wall_ms_per_step']:.2f} ms/step (under the profiler), GPU kernels "
        f"{summary['gpu_ms_per_step']:.2f} ms/step, {summary['kernels_per_step']:.0f} kernels/step",
        f"- matmul and attention kernels {summary['matmul_ms_per_step']:.2f} ms, other "
        f"{summary['other_ms_per_step']:.2f} ms",
        "",
        "| kernel | ms/step | calls/step |",
        "| --- | --- | --- |",
    ]
    for kernel in summary["top_kernels"]:
        name = kernel["name"].replace("|", "/")
        lines.append(f"| `{name}` | {kernel['ms_per_step']:.3f} | {kernel['calls_per_step']:.0f} |")
    return "\n".join(lines)
