"""Compile the fused attention kernels with Triton's GPU frontend, on a machine without a GPU.

Triton's interpreter, which the CPU tests run the kernels with, executes Python that the GPU
compiler rejects (starred assignment, for one). This script records each kernel launch of one
forward and backward, per input dtype and candidate config, and lowers it to Triton IR for an
sm_90 target. It uses Triton's compiler internals; run as a script, without ``TRITON_INTERPRET``.
Prints one line per compiled kernel.
"""

from __future__ import annotations

from typing import Any

import torch
from triton._C.libtriton import ir
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend
from triton.runtime.jit import JITFunction

import model.fused_attention as fused

TARGET = GPUTarget("cuda", 90, 32)
KERNELS = ("_attention_fwd", "_attention_bwd_dq", "_attention_bwd_dkdv")
POINTEE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
Launch = tuple[JITFunction, tuple[Any, ...], dict[str, Any]]


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, kernel: JITFunction, launches: list[Launch]) -> None:
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid: tuple[int, ...]) -> Any:
        return lambda *args, **kwargs: self.launches.append((self.kernel, args, kwargs))


def _type_of(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + POINTEE[value.dtype]
    if isinstance(value, bool):
        return "i1"
    return "i32" if isinstance(value, int) else "fp32"


def lower(kernel: JITFunction, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Lower one recorded launch to Triton IR (raises Triton's CompilationError)."""
    values = dict(zip(kernel.arg_names, args, strict=False)) | kwargs
    signature, constants = {}, {}
    for index, param in enumerate(kernel.params):
        value = values[param.name]
        signature[param.name] = "constexpr" if param.is_constexpr else _type_of(value)
        if param.is_constexpr:
            constants[(index,)] = value
    backend = make_backend(TARGET)
    options = backend.parse_options({"num_warps": kwargs["num_warps"]})
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    source = ASTSource(kernel, signature, constants)
    codegen = backend.get_codegen_implementation(options)
    source.make_ir(TARGET, options, codegen, backend.get_module_map(), context)


def record(dtype: torch.dtype, config: fused.KernelConfig) -> list[Launch]:
    """The launches of one forward and one backward at a window of 100 (padded blocks)."""
    launches: list[Launch] = []
    for name in KERNELS:
        setattr(fused, name, _Recorder(getattr(fused, name), launches))
    q = torch.ones(1, 2, 100, 16, dtype=dtype)
    sigma = torch.ones(1, 2, 100)
    ops = torch.ops.anomaly_transformer
    try:
        heads, series_side, prior_side, slope, series, tiles = ops.fused_attention(
            q, q, q, sigma, list(config), True
        )
        ops.fused_attention_backward(
            q, q, q, sigma, slope, series, tiles, heads, series_side, prior_side, list(config)
        )
    finally:
        for name in KERNELS:
            setattr(fused, name, getattr(fused, name).kernel)
    return launches


def main() -> None:
    for dtype in (torch.float32, torch.bfloat16):
        for config in fused.CANDIDATE_CONFIGS:
            for kernel, args, kwargs in record(dtype, config):
                lower(kernel, args, kwargs)
                print(f"lowered {kernel.fn.__name__} {dtype} {tuple(config)}", flush=True)


if __name__ == "__main__":
    main()
