"""Fused anomaly attention: series softmax, Gaussian prior and symmetric-KL rows on chip (Triton).

Nothing of size ``L x L`` (``L <= 128``) is computed outside a kernel. Three kernels,
flash-attention-2 style, each program a block of query rows (or keys) walking blocks of keys (or
query rows):

* forward, two passes over the keys: first the softmax's and the prior's row normalisers, then
  the attention output and the per-row discrepancy ``sum_j (s_j - p_j) (log(s_j + eps) -
  log(p_j + eps))`` (the symmetric KL of ``model.losses``). When a backward will follow it also
  keeps the tiles of the series and of its weighted slope ``s_j d(discrepancy)/ds_j`` (fp16 for
  bf16 or fp16 inputs) and the prior's row derivative, so that backward recomputes no
  exponential or logarithm;
* backward dq, two passes over the keys: the softmax's row term from the kept tiles, then dq,
  dsigma and the tiles of the score gradient in the input dtype (what the dk/dv products take);
* backward dk/dv: dk and dv without atomics, as products of the series and score-gradient tiles
  with q and the output gradient.

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
LOG2_E = tl.constexpr(1.0 / math.log(2.0))
MAX_WINDOW = 128
MAX_HEAD_DIM = 256
BLOCK_SIZES = (16, 32, 64, 128)
WARP_COUNTS = (1, 2, 4, 8, 16)


class KernelConfig(NamedTuple):
    """Block sizes (query rows per program, keys per step, or the reverse) and warps of the three
    kernels."""

    fwd_rows: int
    fwd_keys: int
    fwd_warps: int
    dq_rows: int
    dq_keys: int
    dq_warps: int
    kv_keys: int  # keys per dk/dv program
    kv_rows: int  # query rows per step of a dk/dv program
    kv_warps: int


# What bench.check_fused sweeps on the GPU. The defaults per input dtype: the fastest kernels of
# its H200 run of 2026-12-04 at B=256, H=8, L=100, E=64 (docs/check_fused.md), confirmed in the
# whole bf16 training step (docs/performance.md).
CANDIDATE_CONFIGS = (
    KernelConfig(64, 16, 4, 64, 32, 4, 64, 16, 4),
    KernelConfig(16, 16, 1, 16, 16, 1, 64, 16, 4),
    KernelConfig(16, 32, 1, 16, 32, 1, 64, 32, 4),
    KernelConfig(16, 32, 2, 16, 64, 2, 64, 32, 4),
    KernelConfig(32, 32, 2, 32, 32, 2, 32, 32, 4),
    KernelConfig(32, 16, 2, 32, 16, 2, 64, 32, 4),
    KernelConfig(64, 32, 4, 64, 32, 4, 64, 32, 8),
    KernelConfig(16, 64, 2, 16, 128, 2, 32, 32, 4),
    KernelConfig(32, 64, 4, 32, 64, 4, 32, 64, 4),
    KernelConfig(128, 32, 8, 128, 32, 8, 16, 32, 2),
)
DEFAULT_CONFIGS = {
    torch.float32: CANDIDATE_CONFIGS[1],
    torch.bfloat16: CANDIDATE_CONFIGS[0],
    torch.float16: CANDIDATE_CONFIGS[0],
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
def _key_block(
    q, K, b, h, skb, skh, skl, ske, prior_rows, key_start, dims, dim_ok, scale,
    L: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """For the ``BLOCK_N`` keys from ``key_start``: the keys and their mask, ``scale q k^T`` of
    the row block (-inf at padded keys) and the half square distances ``-(i - j)^2 / 2`` of the
    ``prior_rows`` to them."""
    cols = key_start + tl.arange(0, BLOCK_N)
    col_ok = cols < L
    k = _load(K, b, h, skb, skh, skl, ske, cols, col_ok, dims, dim_ok)
    scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    scores = tl.where(col_ok[None, :], scores, float("-inf"))
    distance = (prior_rows - cols[None, :]).to(tl.float32)
    return cols, col_ok, scores, -0.5 * distance * distance


@triton.jit
def _attention_fwd(
    Q, K, V, SIGMA, OUT, SERIES_SIDE, PRIOR_SIDE, PRIOR_SLOPE, SERIES, SLOPES,
    sqb, sqh, sql, sqe, skb, skh, skl, ske, svb, svh, svl, sve,
    ssb, ssh, ssl, sob, soh, sol, soe,
    H, scale, eps, KEEP: tl.constexpr, WIDTH: tl.constexpr, L: tl.constexpr, E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    """Two passes over blocks of ``BLOCK_N`` keys: the row normalisers, then everything else.

    With ``KEEP`` also what backward needs, so that it recomputes no transcendental: the tiles
    of the series and of its weighted slope ``s * d(discrepancy)/ds`` (prior fixed) to SERIES
    and SLOPES, `(B, H, L, WIDTH)`, and the row's derivative of the discrepancy with respect to
    ``1 / sigma^2`` (series fixed), negated, to PRIOR_SLOPE."""
    bh, start = _program(L, BLOCK_M)
    b, h = bh // H, bh % H
    rows, dims = start + tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_E)
    row_ok, dim_ok = rows < L, dims < E
    q = _load(Q, b, h, sqb, sqh, sql, sqe, rows, row_ok, dims, dim_ok)
    sigma = tl.load(SIGMA + b * ssb + h * ssh + rows * ssl, row_ok, 1.0)
    # Exponents in log2 units (exp2, one multiply fewer per element): log2(e) folded into the
    # scale and 1 / sigma^2; the half square distances stay in natural units.
    scale_log2 = scale * LOG2_E
    inverse_variance = (1.0 / (sigma * sigma) * LOG2_E)[:, None]
    # Padded rows take the last row's distances: no all-zero Gaussian row (a NaN prior).
    prior_rows = tl.minimum(rows, L - 1)[:, None]
    top = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    total = tl.zeros((BLOCK_M,), tl.float32)
    norm = tl.zeros((BLOCK_M,), tl.float32)
    spread = tl.zeros((BLOCK_M,), tl.float32)
    for key_start in range(0, L, BLOCK_N):
        cols, col_ok, scores, half_square = _key_block(
            q, K, b, h, skb, skh, skl, ske, prior_rows, key_start, dims, dim_ok, scale_log2,
            L, BLOCK_N,
        )  # fmt: skip
        new_top = tl.maximum(top, tl.max(scores, axis=1))
        exp_scores = tl.exp2(scores - new_top[:, None])
        total = total * tl.exp2(top - new_top) + tl.sum(exp_scores, axis=1)
        top = new_top
        gaussian = tl.where(col_ok[None, :], tl.exp2(half_square * inverse_variance), 0.0)
        norm += tl.sum(gaussian, axis=1)
        spread += tl.sum(gaussian * half_square, axis=1)
    log2_sum_exp, log2_norm = (top + tl.log2(total))[:, None], tl.log2(norm)[:, None]
    mean_half_square = (spread / norm)[:, None]
    heads = tl.zeros((BLOCK_M, BLOCK_E), tl.float32)
    discrepancy = tl.zeros((BLOCK_M,), tl.float32)
    prior_slope = tl.zeros((BLOCK_M,), tl.float32)
    for key_start in range(0, L, BLOCK_N):
        cols, col_ok, scores, half_square = _key_block(
            q, K, b, h, skb, skh, skl, ske, prior_rows, key_start, dims, dim_ok, scale_log2,
            L, BLOCK_N,
        )  # fmt: skip
        series = tl.where(col_ok[None, :], tl.exp2(scores - log2_sum_exp), 0.0)
        v = _load(V, b, h, svb, svh, svl, sve, cols, col_ok, dims, dim_ok)
        heads += tl.dot(series.to(v.dtype), v, input_precision="ieee")
        prior = tl.exp2(half_square * inverse_variance - log2_norm)
        prior = tl.where(col_ok[None, :], prior, 0.0)
        inverse_prior, difference = 1.0 / (prior + eps), series - prior
        log_ratio = _log((series + eps) * inverse_prior)
        discrepancy += tl.sum(difference * log_ratio, axis=1)
        if KEEP:
            slope = series * (log_ratio + difference / (series + eps))
            prior_term = prior * (log_ratio + difference * inverse_prior)
            prior_slope += tl.sum(prior_term * (half_square - mean_half_square), axis=1)
            tile_at = (bh * L + rows[:, None]) * WIDTH + cols[None, :]
            tile_ok = row_ok[:, None] & col_ok[None, :]
            tl.store(SERIES + tile_at, series.to(SERIES.dtype.element_ty), tile_ok)
            tl.store(SLOPES + tile_at, slope.to(SLOPES.dtype.element_ty), tile_ok)
    _store(OUT, heads, b, h, sob, soh, sol, soe, rows, row_ok, dims, dim_ok)
    row_at = bh * L + rows
    tl.store(SERIES_SIDE + row_at, discrepancy, row_ok)
    tl.store(PRIOR_SIDE + row_at, discrepancy, row_ok)
    if KEEP:
        tl.store(PRIOR_SLOPE + row_at, prior_slope, row_ok)


@triton.jit
def _tile_products(
    V, SERIES, SLOPES, d_out, g_series, b, h, bh, svb, svh, svl, sve,
    rows, row_ok, dims, dim_ok, key_start, WIDTH: tl.constexpr, L: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """For a block of keys: the kept series tile, and ``s * d(loss)/ds`` from the kept weighted
    slope and ``d_out v^T`` (float32), with the tile addresses and mask."""
    cols = key_start + tl.arange(0, BLOCK_N)
    col_ok = cols < L
    v = _load(V, b, h, svb, svh, svl, sve, cols, col_ok, dims, dim_ok)
    tile_at = (bh * L + rows[:, None]) * WIDTH + cols[None, :]
    tile_ok = row_ok[:, None] & col_ok[None, :]
    series = tl.load(SERIES + tile_at, tile_ok, 0.0).to(tl.float32)
    slope = tl.load(SLOPES + tile_at, tile_ok, 0.0).to(tl.float32)
    d_product = tl.dot(d_out, tl.trans(v), input_precision="ieee")
    return series, g_series[:, None] * slope + series * d_product, cols, col_ok, tile_at, tile_ok


@triton.jit
def _attention_bwd_dq(
    K, V, SIGMA, D_OUT, G_SERIES, G_PRIOR, PRIOR_SLOPE, SERIES, SLOPES, DQ, D_SIGMA, D_SCORES,
    skb, skh, skl, ske, svb, svh, svl, sve,
    ssb, ssh, ssl, sdb, sdh, sdl, sde, sgb, sgh, sgl, sge,
    H, scale, WIDTH: tl.constexpr, L: tl.constexpr, E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    """dq and dsigma from the forward's tiles and row sum, two passes over blocks of keys; also
    writes the tiles of d(loss)/d(scores) (unscaled) to D_SCORES in the dtype of ``k``.

    The softmax's row term ``sum_j s_j d(loss)/ds_j / sum_j s_j`` is summed from the same kept
    (rounded) tiles that the score gradient is formed from, so each row of the score gradient
    sums to zero whatever the tiles' rounding: on a sharp row the large terms then cancel as
    they do in float32."""
    bh, start = _program(L, BLOCK_M)
    b, h = bh // H, bh % H
    rows, dims = start + tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_E)
    row_ok, dim_ok = rows < L, dims < E
    d_out = _load(D_OUT, b, h, sdb, sdh, sdl, sde, rows, row_ok, dims, dim_ok)
    row_at = bh * L + rows
    g_series = tl.load(G_SERIES + row_at, row_ok, 0.0)
    weighted_sum = tl.zeros((BLOCK_M,), tl.float32)
    series_sum = tl.zeros((BLOCK_M,), tl.float32)
    for key_start in range(0, L, BLOCK_N):
        series, weighted, _cols, _col_ok, _tile_at, _tile_ok = _tile_products(
            V, SERIES, SLOPES, d_out, g_series, b, h, bh, svb, svh, svl, sve,
            rows, row_ok, dims, dim_ok, key_start, WIDTH, L, BLOCK_N,
        )  # fmt: skip
        weighted_sum += tl.sum(weighted, axis=1)
        series_sum += tl.sum(series, axis=1)
    # Padded rows have an all-zero series: any positive divisor.
    delta = (weighted_sum / tl.where(row_ok, series_sum, 1.0))[:, None]
    dq = tl.zeros((BLOCK_M, BLOCK_E), tl.float32)
    for key_start in range(0, L, BLOCK_N):
        series, weighted, cols, col_ok, tile_at, tile_ok = _tile_products(
            V, SERIES, SLOPES, d_out, g_series, b, h, bh, svb, svh, svl, sve,
            rows, row_ok, dims, dim_ok, key_start, WIDTH, L, BLOCK_N,
        )  # fmt: skip
        k = _load(K, b, h, skb, skh, skl, ske, cols, col_ok, dims, dim_ok)
        d_scores = (weighted - series * delta).to(k.dtype)
        tl.store(D_SCORES + tile_at, d_scores, tile_ok)
        dq += tl.dot(d_scores, k, input_precision="ieee")
    _store(DQ, dq * scale, b, h, sgb, sgh, sgl, sge, rows, row_ok, dims, dim_ok)
    # Prior side: d(discrepancy)/d(1 / sigma^2) = -PRIOR_SLOPE, and d(1 / sigma^2)/dsigma.
    g_prior = tl.load(G_PRIOR + row_at, row_ok, 0.0)
    prior_slope = tl.load(PRIOR_SLOPE + row_at, row_ok, 0.0)
    sigma = tl.load(SIGMA + b * ssb + h * ssh + rows * ssl, row_ok, 1.0)
    tl.store(D_SIGMA + row_at, 2.0 * g_prior * prior_slope / (sigma * sigma * sigma), row_ok)


@triton.jit
def _attention_bwd_dkdv(
    Q, D_OUT, SERIES, D_SCORES, DK, DV,
    sqb, sqh, sql, sqe, sdb, sdh, sdl, sde, sgb, sgh, sgl, sge,
    H, scale, WIDTH: tl.constexpr, L: tl.constexpr, E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    """dk = scale d_scores^T q and dv = series^T d_out for a block of keys, from the tiles of
    the forward and ``_attention_bwd_dq`` (rows of ``WIDTH`` keys)."""
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


def _rows_like(sigma: torch.Tensor) -> torch.Tensor:
    """An empty float32 `(B, H, L)` row buffer."""
    return torch.empty(sigma.shape, dtype=torch.float32, device=sigma.device)


def _tiles(q: torch.Tensor, keep: bool) -> torch.Tensor:
    """A `(B, H, L, width)` tile buffer for the series or its slope: float32 for float32 inputs,
    else fp16 (values in [0, 1] and about [-1, 1]); empty without ``keep``."""
    batch, n_heads, length, _ = q.shape
    shape = (batch, n_heads, length, _tile_width(length)) if keep else (0,)
    dtype = torch.float32 if q.dtype == torch.float32 else torch.float16
    return q.new_empty(shape, dtype=dtype)


def _tile_width(length: int) -> int:
    """The row pitch of the tile buffers: ``length`` rounded up to 16 (aligned rows)."""
    return 16 * triton.cdiv(length, 16)


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
    blocks = (*config[:2], *config[3:5], *config[6:8])
    warps = (config.fwd_warps, config.dq_warps, config.kv_warps)
    if not set(blocks) <= set(BLOCK_SIZES) or not set(warps) <= set(WARP_COUNTS):
        raise ValueError(
            f"invalid {config}: expected blocks in {BLOCK_SIZES}, warps in {WARP_COUNTS}"
        )


@torch.library.custom_op("anomaly_transformer::fused_attention", mutates_args=())
def _forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sigma: torch.Tensor,
    config: list[int],
    keep: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Also returns, for backward, the prior's row derivative `(B, H, L)` and the tiles of the
    series and of its weighted slope (``_attention_fwd``); without ``keep`` the tiles are empty
    and the row derivative undefined."""
    cfg = KernelConfig(*config)
    heads = _heads_like(v)
    series_side, prior_side, prior_slope = (_rows_like(sigma) for _ in range(3))
    series, slope_tiles = _tiles(q, keep), _tiles(q, keep)
    args = (
        q, k, v, sigma, heads, series_side, prior_side, prior_slope, series, slope_tiles,
        *q.stride(), *k.stride(), *v.stride(), *sigma.stride(), *heads.stride(),
        q.shape[1], q.shape[3] ** -0.5, KL_EPS, keep, _tile_width(q.shape[2]),
    )  # fmt: skip
    _launch(_attention_fwd, q, args, rows=cfg.fwd_rows, keys=cfg.fwd_keys, warps=cfg.fwd_warps)
    return heads, series_side, prior_side, prior_slope, series, slope_tiles


@_forward.register_fake
def _(q, k, v, sigma, config, keep):  # type: ignore[no-untyped-def]
    tiles = (_tiles(q, keep) for _ in range(2))
    return _heads_like(v), *(_rows_like(sigma) for _ in range(3)), *tiles


@torch.library.custom_op("anomaly_transformer::fused_attention_backward", mutates_args=())
def _backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sigma: torch.Tensor,
    prior_slope: torch.Tensor,
    series: torch.Tensor,
    slope_tiles: torch.Tensor,
    d_heads: torch.Tensor,
    d_series_side: torch.Tensor,
    d_prior_side: torch.Tensor,
    config: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    cfg = KernelConfig(*config)
    dq, dk, dv, d_sigma = _heads_like(q), _heads_like(k), _heads_like(v), _rows_like(sigma)
    d_scores = torch.empty_like(series, dtype=q.dtype)
    d_series_side, d_prior_side = d_series_side.contiguous(), d_prior_side.contiguous()
    scalars = (q.shape[1], q.shape[3] ** -0.5, _tile_width(q.shape[2]))
    dq_args = (
        k, v, sigma, d_heads, d_series_side, d_prior_side, prior_slope, series, slope_tiles,
        dq, d_sigma, d_scores, *k.stride(), *v.stride(), *sigma.stride(),
        *d_heads.stride(), *dq.stride(), *scalars,
    )  # fmt: skip
    _launch(_attention_bwd_dq, q, dq_args, rows=cfg.dq_rows, keys=cfg.dq_keys, warps=cfg.dq_warps)
    dkdv_args = (
        q, d_heads, series, d_scores, dk, dv,
        *q.stride(), *d_heads.stride(), *dq.stride(), *scalars,
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
    q, k, v, sigma, ctx.config, _ = inputs
    kept = output[3:]
    ctx.mark_non_differentiable(*kept)
    ctx.save_for_backward(q, k, v, sigma, *kept)


def _autograd_backward(ctx, d_heads, d_series_side, d_prior_side, *_):  # type: ignore[no-untyped-def]
    # The gradients come materialised (zeros, not None).
    grads = _backward(*ctx.saved_tensors, d_heads, d_series_side, d_prior_side, ctx.config)
    return *grads, None, None


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
    keep = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, sigma))
    heads, series_side, prior_side, *_ = _forward(q, k, v, sigma, list(config), keep)
    return heads, series_side, prior_side
