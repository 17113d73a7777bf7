"""Fused anomaly attention: series softmax, Gaussian prior and symmetric-KL rows on chip (Triton).

Every program keeps a whole block of the ``L x L`` association matrix on chip (``L <= 128``,
padded to a power of two); nothing of size ``L x L`` is stored. Three kernels, flash-attention-2
style:

* forward, one program per block of query rows against every key: the attention output, the
  per-row discrepancy ``sum_j (s_j - p_j) (log(s_j + eps) - log(p_j + eps))`` (the symmetric KL
  of ``model.losses``) and two row statistics for backward, the softmax's log-sum-exp and the
  log of the prior's normaliser;
* backward dq, one program per block of query rows against every key: dq and dsigma, and the
  tiles of the series and of its score gradient in the input dtype (what the dk/dv products
  take), written to two transient `(B, H, L, L padded)` buffers;
* backward dk/dv, one program per block of keys walking every query row: dk and dv, without
  atomics, as products of those tiles with q and the output gradient (no transcendental
  recomputed twice).

Softmax, prior and KL are float32; ``q``, ``k`` and ``v`` may be bf16. The discrepancy comes out
twice with the same value, so that the minimax algebra of ``model.losses`` works on rows:
``series_side`` sends its gradient to ``q`` and ``k`` only (the prior is held fixed),
``prior_side`` to ``sigma`` only (the series is held fixed).

The kernels are ``torch.library`` custom operators with fake (meta) implementations and a
registered backward, so ``torch.compile`` (with CUDA graphs) traces through them. This module
imports Triton; ``model.network`` imports it only on the fused path. With ``TRITON_INTERPRET=1``
set before this import the kernels run on CPU tensors in Triton's interpreter (tests only).
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from model.losses import KL_EPS

# PTX inline assembly where the kernels are compiled for a GPU; Triton's interpreter has none.
APPROXIMATE_LOG = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")
LN_2 = tl.constexpr(math.log(2.0))
MAX_WINDOW = 128
MAX_HEAD_DIM = 256
BLOCK_SIZES = (16, 32, 64, 128)
WARP_COUNTS = (1, 2, 4, 8, 16)


class KernelConfig(NamedTuple):
    """Block sizes (query rows or keys per program or step) and warps of the three kernels."""

    fwd_rows: int
    fwd_warps: int
    dq_rows: int
    dq_warps: int
    kv_keys: int  # keys per dk/dv program
    kv_rows: int  # query rows per step of a dk/dv program
    kv_warps: int


# What bench.check_fused sweeps on the GPU. The defaults per input dtype combine the fastest
# kernels of its H200 run of 2026-12-03 (second run) at B=256, H=8, L=100, E=64
# (docs/check_fused.md).
CANDIDATE_CONFIGS = (
    KernelConfig(16, 2, 64, 8, 64, 16, 4),
    KernelConfig(16, 2, 16, 2, 64, 32, 4),
    KernelConfig(32, 4, 32, 8, 32, 32, 4),
    KernelConfig(16, 2, 16, 2, 32, 32, 4),
    KernelConfig(32, 4, 32, 4, 32, 32, 4),
    KernelConfig(16, 2, 16, 2, 16, 32, 2),
    KernelConfig(64, 4, 32, 8, 64, 16, 4),
    KernelConfig(64, 8, 64, 8, 64, 64, 8),
    KernelConfig(32, 8, 32, 8, 32, 64, 4),
    KernelConfig(128, 8, 16, 4, 128, 32, 8),
)
DEFAULT_CONFIGS = {
    torch.float32: CANDIDATE_CONFIGS[0],
    torch.bfloat16: CANDIDATE_CONFIGS[1],
    torch.float16: CANDIDATE_CONFIGS[1],
}


@triton.jit
def _program(L: tl.constexpr, BLOCK: tl.constexpr):
    """This program's (batch x head) index and the first row (or key) of its block."""
    n_blocks: tl.constexpr = (L + BLOCK - 1) // BLOCK
    pid = tl.program_id(0)
    return pid // n_blocks, (pid % n_blocks) * BLOCK


@triton.jit
def _at(PTR, b, h, sb, sh, sl, se, index, index_ok, dims, dim_ok):
    """Addresses and mask of rows ``index`` of one (batch, head)'s `(L, E)` matrix."""
    at = PTR + b * sb + h * sh + index[:, None] * sl + dims[None, :] * se
    return at, index_ok[:, None] & dim_ok[None, :]


@triton.jit
def _load(PTR, b, h, sb, sh, sl, se, index, index_ok, dims, dim_ok):
    at, mask = _at(PTR, b, h, sb, sh, sl, se, index, index_ok, dims, dim_ok)
    return tl.load(at, mask, 0.0)


@triton.jit
def _store(PTR, value, b, h, sb, sh, sl, se, index, index_ok, dims, dim_ok):
    at, mask = _at(PTR, b, h, sb, sh, sl, se, index, index_ok, dims, dim_ok)
    tl.store(at, value.to(PTR.dtype.element_ty), mask)


@triton.jit
def _half_square_distance(rows, cols):
    distance = (rows - cols).to(tl.float32)
    return -0.5 * distance * distance


@triton.jit
def _log(x):
    """Natural logarithm of a float32 tile: PTX ``lg2.approx`` on a GPU (the H200 training step
    3.5% faster than with ``tl.log``, docs/performance.md), ``tl.log`` in Triton's interpreter."""
    if APPROXIMATE_LOG:
        log2 = tl.inline_asm_elementwise(
            "lg2.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1
        )
        return LN_2 * log2
    else:
        return tl.log(x)


@triton.jit
def _log_ratio(series, prior, eps):
    """``log(s + eps) - log(p + eps)`` of a tile, with one logarithm."""
    return _log((series + eps) / (prior + eps))


@triton.jit
def _attention_fwd(
    Q, K, V, SIGMA, OUT, SERIES_SIDE, PRIOR_SIDE, LOG_SUM_EXP, LOG_NORM,
    sqb, sqh, sql, sqe, skb, skh, skl, ske, svb, svh, svl, sve,
    ssb, ssh, ssl, sob, soh, sol, soe,
    H, scale, eps, L: tl.constexpr, E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    bh, start = _program(L, BLOCK_M)
    b, h = bh // H, bh % H
    rows, cols, dims = start + tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_E)
    row_ok, col_ok, dim_ok = rows < L, cols < L, dims < E
    q = _load(Q, b, h, sqb, sqh, sql, sqe, rows, row_ok, dims, dim_ok)
    k = _load(K, b, h, skb, skh, skl, ske, cols, col_ok, dims, dim_ok)
    v = _load(V, b, h, svb, svh, svl, sve, cols, col_ok, dims, dim_ok)
    sigma = tl.load(SIGMA + b * ssb + h * ssh + rows * ssl, row_ok, 1.0)
    scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    scores = tl.where(col_ok[None, :], scores, float("-inf"))
    top = tl.max(scores, axis=1)
    exp_scores = tl.exp(scores - top[:, None])
    total = tl.sum(exp_scores, axis=1)
    series = exp_scores * (1.0 / total)[:, None]
    # Padded rows take the last row's distances: no all-zero Gaussian row (a NaN prior).
    half_square = _half_square_distance(tl.minimum(rows, L - 1)[:, None], cols[None, :])
    gaussian = tl.exp(half_square * (1.0 / (sigma * sigma))[:, None])
    gaussian = tl.where(col_ok[None, :], gaussian, 0.0)
    norm = tl.sum(gaussian, axis=1)
    prior = gaussian * (1.0 / norm)[:, None]
    heads = tl.dot(series.to(v.dtype), v, input_precision="ieee")
    _store(OUT, heads, b, h, sob, soh, sol, soe, rows, row_ok, dims, dim_ok)
    discrepancy = tl.sum((series - prior) * _log_ratio(series, prior, eps), axis=1)
    row_at = bh * L + rows
    tl.store(SERIES_SIDE + row_at, discrepancy, row_ok)
    tl.store(PRIOR_SIDE + row_at, discrepancy, row_ok)
    tl.store(LOG_SUM_EXP + row_at, top + tl.log(total), row_ok)
    tl.store(LOG_NORM + row_at, tl.log(norm), row_ok)


@triton.jit
def _attention_bwd_dq(
    Q, K, V, SIGMA, D_OUT, G_SERIES, G_PRIOR, LOG_SUM_EXP, LOG_NORM, DQ, D_SIGMA, SERIES, D_SCORES,
    sqb, sqh, sql, sqe, skb, skh, skl, ske, svb, svh, svl, sve,
    ssb, ssh, ssl, sdb, sdh, sdl, sde, sgb, sgh, sgl, sge,
    H, scale, eps, L: tl.constexpr, E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    """Also writes the tiles of the series and of d(loss)/d(scores) (unscaled) to SERIES and
    D_SCORES, `(B, H, L, BLOCK_N)` in the dtype of ``k``, padded keys included (zeros)."""
    bh, start = _program(L, BLOCK_M)
    b, h = bh // H, bh % H
    rows, cols, dims = start + tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_E)
    row_ok, col_ok, dim_ok = rows < L, cols < L, dims < E
    q = _load(Q, b, h, sqb, sqh, sql, sqe, rows, row_ok, dims, dim_ok)
    k = _load(K, b, h, skb, skh, skl, ske, cols, col_ok, dims, dim_ok)
    v = _load(V, b, h, svb, svh, svl, sve, cols, col_ok, dims, dim_ok)
    d_out = _load(D_OUT, b, h, sdb, sdh, sdl, sde, rows, row_ok, dims, dim_ok)
    sigma = tl.load(SIGMA + b * ssb + h * ssh + rows * ssl, row_ok, 1.0)
    row_at = bh * L + rows
    g_series = tl.load(G_SERIES + row_at, row_ok, 0.0)
    g_prior = tl.load(G_PRIOR + row_at, row_ok, 0.0)
    log_sum_exp = tl.load(LOG_SUM_EXP + row_at, row_ok, 0.0)
    log_norm = tl.load(LOG_NORM + row_at, row_ok, 0.0)
    scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    series = tl.where(col_ok[None, :], tl.exp(scores - log_sum_exp[:, None]), 0.0)
    half_square = _half_square_distance(rows[:, None], cols[None, :])
    inverse_variance = 1.0 / (sigma * sigma)
    prior = tl.exp(half_square * inverse_variance[:, None] - log_norm[:, None])
    prior = tl.where(col_ok[None, :], prior, 0.0)
    d_product = tl.dot(d_out, tl.trans(v), input_precision="ieee")
    inverse_series, inverse_prior = 1.0 / (series + eps), 1.0 / (prior + eps)
    log_ratio, difference = _log((series + eps) * inverse_prior), series - prior
    # The series side's KL term (prior fixed) plus the attention output's term.
    d_series = g_series[:, None] * (log_ratio + difference * inverse_series) + d_product
    delta = tl.sum(series * d_series, axis=1)
    d_scores = (series * (d_series - delta[:, None])).to(k.dtype)
    dq = tl.dot(d_scores, k, input_precision="ieee") * scale
    _store(DQ, dq, b, h, sgb, sgh, sgl, sge, rows, row_ok, dims, dim_ok)
    tile_at = (bh * L + rows[:, None]) * BLOCK_N + cols[None, :]
    tl.store(SERIES + tile_at, series.to(k.dtype), row_ok[:, None])
    tl.store(D_SCORES + tile_at, d_scores, row_ok[:, None])
    # Prior side: d/dp (series fixed), through the row normalisation, to 1 / sigma^2.
    d_prior = -g_prior[:, None] * (log_ratio + difference * inverse_prior)
    centred = d_prior - tl.sum(prior * d_prior, axis=1)[:, None]
    d_inverse_variance = tl.sum(prior * half_square * centred, axis=1)
    tl.store(D_SIGMA + row_at, -2.0 * d_inverse_variance / (sigma * sigma * sigma), row_ok)


@triton.jit
def _attention_bwd_dkdv(
    Q, D_OUT, SERIES, D_SCORES, DK, DV,
    sqb, sqh, sql, sqe, sdb, sdh, sdl, sde, sgb, sgh, sgl, sge,
    H, scale, WIDTH: tl.constexpr, L: tl.constexpr, E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    """dk = scale d_scores^T q and dv = series^T d_out for a block of keys, from the tiles of
    ``_attention_bwd_dq`` (rows of ``WIDTH`` keys)."""
    bh, key_start = _program(L, BLOCK_N)
    b, h = bh // H, bh % H
    cols, dims = key_start + tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_E)
    col_ok, dim_ok = cols < L, dims < E
    dk = tl.zeros((BLOCK_N, BLOCK_E), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_E), dtype=tl.float32)
    for start in range(0, L, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < L
        q = _load(Q, b, h, sqb, sqh, sql, sqe, rows, row_ok, dims, dim_ok)
        d_out = _load(D_OUT, b, h, sdb, sdh, sdl, sde, rows, row_ok, dims, dim_ok)
        tile_at = (bh * L + rows[:, None]) * WIDTH + cols[None, :]
        tile_ok = row_ok[:, None] & col_ok[None, :]
        series = tl.load(SERIES + tile_at, tile_ok, 0.0)  # (BLOCK_M, BLOCK_N)
        d_scores = tl.load(D_SCORES + tile_at, tile_ok, 0.0)
        dv += tl.dot(tl.trans(series.to(d_out.dtype)), d_out, input_precision="ieee")
        dk += tl.dot(tl.trans(d_scores), q, input_precision="ieee")
    # dq, dk and dv are allocated alike (the strides of DQ).
    _store(DK, dk * scale, b, h, sgb, sgh, sgl, sge, cols, col_ok, dims, dim_ok)
    _store(DV, dv, b, h, sgb, sgh, sgl, sge, cols, col_ok, dims, dim_ok)


def _heads_like(t: torch.Tensor) -> torch.Tensor:
    """An empty `(B, H, L, E)` like ``t`` laid out as `(B, L, H, E)`: merging heads is a view."""
    batch, n_heads, length, head_dim = t.shape
    return t.new_empty((batch, length, n_heads, head_dim)).transpose(1, 2)


def _rows_like(sigma: torch.Tensor, *lead: int) -> torch.Tensor:
    return torch.empty((*lead, *sigma.shape), dtype=torch.float32, device=sigma.device)


def _padded(length: int) -> int:
    """The tile width of ``length`` keys or dims: a power of two, at least 16 (``tl.dot``)."""
    return max(16, triton.next_power_of_2(length))


def _launch(
    kernel: triton.JITFunction,
    q: torch.Tensor,
    args: tuple[object, ...],
    *,
    rows: int,
    keys: int,
    warps: int,
    by_keys: bool = False,
) -> None:
    """``kernel`` on tiles of ``rows`` query rows by ``keys`` keys (both at most L, padded), one
    program per block of rows (``by_keys``: of keys) of every (batch, head). ``args`` end with
    the kernel's scalars before ``L``; ``L``, ``E`` and the block sizes are appended."""
    batch, n_heads, length, head_dim = q.shape
    block_m, block_n = min(rows, _padded(length)), min(keys, _padded(length))
    grid = (batch * n_heads * triton.cdiv(length, block_n if by_keys else block_m),)
    kernel[grid](
        *args, length, head_dim,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_E=_padded(head_dim), num_warps=warps,
    )  # fmt: skip


def _check(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, config: KernelConfig
) -> None:
    shape = tuple(q.shape)
    if q.dim() != 4 or tuple(k.shape) != shape or tuple(v.shape) != shape:
        raise ValueError(
            f"invalid q, k, v shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}: "
            "expected three equal (batch, heads, L, E)"
        )
    if tuple(sigma.shape) != shape[:3] or sigma.dtype != torch.float32:
        raise ValueError(
            f"invalid sigma {tuple(sigma.shape)} {sigma.dtype}: expected {shape[:3]} float32"
        )
    if shape[2] > MAX_WINDOW or shape[3] > MAX_HEAD_DIM:
        raise ValueError(
            f"invalid L={shape[2]}, E={shape[3]}: expected L <= {MAX_WINDOW}, E <= {MAX_HEAD_DIM}"
        )
    dtypes = {q.dtype, k.dtype, v.dtype}
    if len(dtypes) != 1 or q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(
            f"invalid q, k, v dtypes {q.dtype}, {k.dtype}, {v.dtype}: expected one of float32, "
            "bf16 or fp16"
        )
    blocks = (config.fwd_rows, config.dq_rows, config.kv_keys, config.kv_rows)
    warps = (config.fwd_warps, config.dq_warps, config.kv_warps)
    if not set(blocks) <= set(BLOCK_SIZES) or not set(warps) <= set(WARP_COUNTS):
        raise ValueError(
            f"invalid {config}: expected blocks in {BLOCK_SIZES}, warps in {WARP_COUNTS}"
        )


@torch.library.custom_op("anomaly_transformer::fused_attention", mutates_args=())
def _forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, config: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Also returns the row statistics for backward, `(2, B, H, L)`: log-sum-exp, log norm."""
    cfg = KernelConfig(*config)
    heads = _heads_like(v)
    series_side, prior_side, stats = _rows_like(sigma), _rows_like(sigma), _rows_like(sigma, 2)
    args = (
        q, k, v, sigma, heads, series_side, prior_side, stats[0], stats[1],
        *q.stride(), *k.stride(), *v.stride(), *sigma.stride(), *heads.stride(),
        q.shape[1], q.shape[3] ** -0.5, KL_EPS,
    )  # fmt: skip
    _launch(_attention_fwd, q, args, rows=cfg.fwd_rows, keys=MAX_WINDOW, warps=cfg.fwd_warps)
    return heads, series_side, prior_side, stats


@_forward.register_fake
def _(q, k, v, sigma, config):  # type: ignore[no-untyped-def]
    return _heads_like(v), _rows_like(sigma), _rows_like(sigma), _rows_like(sigma, 2)


@torch.library.custom_op("anomaly_transformer::fused_attention_backward", mutates_args=())
def _backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sigma: torch.Tensor,
    stats: torch.Tensor,
    d_heads: torch.Tensor,
    d_series_side: torch.Tensor,
    d_prior_side: torch.Tensor,
    config: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    cfg = KernelConfig(*config)
    dq, dk, dv, d_sigma = _heads_like(q), _heads_like(k), _heads_like(v), _rows_like(sigma)
    batch, n_heads, length, head_dim = q.shape
    width = _padded(length)
    series, d_scores = (q.new_empty((batch, n_heads, length, width)) for _ in range(2))
    d_series_side, d_prior_side = d_series_side.contiguous(), d_prior_side.contiguous()
    scalars = (n_heads, head_dim**-0.5)
    dq_args = (
        q, k, v, sigma, d_heads, d_series_side, d_prior_side, *stats, dq, d_sigma,
        series, d_scores, *q.stride(), *k.stride(), *v.stride(), *sigma.stride(),
        *d_heads.stride(), *dq.stride(), *scalars, KL_EPS,
    )  # fmt: skip
    _launch(_attention_bwd_dq, q, dq_args, rows=cfg.dq_rows, keys=MAX_WINDOW, warps=cfg.dq_warps)
    dkdv_args = (
        q, d_heads, series, d_scores, dk, dv,
        *q.stride(), *d_heads.stride(), *dq.stride(), *scalars, width,
    )  # fmt: skip
    _launch(
        _attention_bwd_dkdv, q, dkdv_args,
        rows=cfg.kv_rows, keys=cfg.kv_keys, warps=cfg.kv_warps, by_keys=True,
    )  # fmt: skip
    return dq, dk, dv, d_sigma


@_backward.register_fake
def _(q, k, v, sigma, *_):  # type: ignore[no-untyped-def]
    return _heads_like(q), _heads_like(k), _heads_like(v), _rows_like(sigma)


def _setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    q, k, v, sigma, ctx.config = inputs
    stats = output[3]
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(q, k, v, sigma, stats)


def _autograd_backward(ctx, d_heads, d_series_side, d_prior_side, _):  # type: ignore[no-untyped-def]
    # The gradients come materialised (zeros, not None).
    grads = _backward(*ctx.saved_tensors, d_heads, d_series_side, d_prior_side, ctx.config)
    return *grads, None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def anomaly_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sigma: torch.Tensor,
    *,
    config: KernelConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention output and the per-row symmetric KL between series and prior, fused.

    Args:
        q, k, v: `(batch, heads, L, E)`, float32, bf16 or fp16, any strides; ``L <= 128``.
        sigma: `(batch, heads, L)` float32, already squashed (``model.network.squash_sigma``).
        config: block sizes and warps of the kernels (``CANDIDATE_CONFIGS``); by default the
            one for ``q``'s dtype in ``DEFAULT_CONFIGS``.

    Returns:
        ``heads`` `(batch, heads, L, E)` in ``v``'s dtype (laid out as `(batch, L, heads, E)`),
        and ``series_side``, ``prior_side``: `(batch, heads, L)` float32, equal values; the first
        carries gradient to ``q`` and ``k`` only, the second to ``sigma`` only.

    Raises:
        ValueError: shapes, dtypes, sizes or a configuration the kernels do not handle.
    """
    config = config or DEFAULT_CONFIGS.get(q.dtype, CANDIDATE_CONFIGS[0])
    _check(q, k, v, sigma, config)
    heads, series_side, prior_side, _ = _forward(q, k, v, sigma, list(config))
    return heads, series_side, prior_side
