"""The fused attention kernels before the flash-attention-2 backward (commit c225062), for
``bench.check_fused``'s comparison only: one program per (batch, head) with every key on chip walks
the query rows in blocks, in forward and in backward (which accumulates dk and dv over the rows).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from model.losses import KL_EPS

MAX_WINDOW = 128
MAX_HEAD_DIM = 256
# Fastest of the measured configurations on an H200 at B=256, H=8, L=100, E=64, bf16 (forward +
# backward 1.61 ms): docs/performance.md.
DEFAULT_BLOCK_M = 32
DEFAULT_NUM_WARPS = 8


@triton.jit
def _associations(q, k, sigma, rows, cols, col_ok, scale, L: tl.constexpr):
    """Series softmax and row-normalised Gaussian prior of one row block, `(BLOCK_M, BLOCK_N)`.

    Padded rows (``rows >= L``) take the last row's distances, so that no Gaussian row is all
    zero (a NaN prior); their results are never stored.
    """
    scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    scores = tl.where(col_ok[None, :], scores, float("-inf"))
    exp_scores = tl.exp(scores - tl.max(scores, axis=1)[:, None])
    series = exp_scores / tl.sum(exp_scores, axis=1)[:, None]
    distance = (tl.minimum(rows, L - 1)[:, None] - cols[None, :]).to(tl.float32)
    inverse_variance = 1.0 / (sigma * sigma)
    gaussian = tl.exp(-0.5 * distance * distance * inverse_variance[:, None])
    gaussian = tl.where(col_ok[None, :], gaussian, 0.0)
    prior = gaussian / tl.sum(gaussian, axis=1)[:, None]
    return series, prior, distance


@triton.jit
def _keys_and_values(
    K, V, b, h, skb, skh, skl, ske, svb, svh, svl, sve,
    L: tl.constexpr, E: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    """One (batch, head)'s keys and values `(BLOCK_N, BLOCK_E)`, zero-padded, with the column and
    head-dimension indices and their masks."""
    cols = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_E)
    col_ok, dim_ok = cols < L, dims < E
    key_mask = col_ok[:, None] & dim_ok[None, :]
    k = tl.load(K + b * skb + h * skh + cols[:, None] * skl + dims[None, :] * ske, key_mask, 0.0)
    v = tl.load(V + b * svb + h * svh + cols[:, None] * svl + dims[None, :] * sve, key_mask, 0.0)
    return cols, dims, col_ok, dim_ok, k, v


@triton.jit
def _query_rows(
    Q, SIGMA, b, h, start, dims, dim_ok, sqb, sqh, sql, sqe, ssb, ssh, ssl,
    L: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """The row block from ``start``: row indices, masks, queries `(BLOCK_M, BLOCK_E)`, sigma."""
    rows = start + tl.arange(0, BLOCK_M)
    row_ok = rows < L
    row_mask = row_ok[:, None] & dim_ok[None, :]
    q_at = Q + b * sqb + h * sqh + rows[:, None] * sql + dims[None, :] * sqe
    q = tl.load(q_at, row_mask, 0.0)
    sigma = tl.load(SIGMA + b * ssb + h * ssh + rows * ssl, row_ok, 1.0)
    return rows, row_ok, row_mask, q, sigma


@triton.jit
def _anomaly_attention_fwd(
    Q, K, V, SIGMA, OUT, SERIES_SIDE, PRIOR_SIDE,
    sqb, sqh, sql, sqe, skb, skh, skl, ske, svb, svh, svl, sve,
    ssb, ssh, ssl, sob, soh, sol, soe,
    H, scale, eps, L: tl.constexpr, E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b, h = pid // H, pid % H
    cols, dims, col_ok, dim_ok, k, v = _keys_and_values(
        K, V, b, h, skb, skh, skl, ske, svb, svh, svl, sve, L, E, BLOCK_N, BLOCK_E
    )
    for start in range(0, L, BLOCK_M):
        rows, row_ok, row_mask, q, sigma = _query_rows(
            Q, SIGMA, b, h, start, dims, dim_ok, sqb, sqh, sql, sqe, ssb, ssh, ssl, L, BLOCK_M
        )
        series, prior, _ = _associations(q, k, sigma, rows, cols, col_ok, scale, L)
        heads = tl.dot(series.to(v.dtype), v, input_precision="ieee")
        out_at = OUT + b * sob + h * soh + rows[:, None] * sol + dims[None, :] * soe
        tl.store(out_at, heads.to(OUT.dtype.element_ty), row_mask)
        log_ratio = tl.log(series + eps) - tl.log(prior + eps)
        discrepancy = tl.sum((series - prior) * log_ratio, axis=1)
        row_at = (b * H + h) * L + rows
        tl.store(SERIES_SIDE + row_at, discrepancy, row_ok)
        tl.store(PRIOR_SIDE + row_at, discrepancy, row_ok)


@triton.jit
def _anomaly_attention_bwd(
    Q, K, V, SIGMA, D_OUT, D_SERIES_SIDE, D_PRIOR_SIDE, DQ, DK, DV, D_SIGMA,
    sqb, sqh, sql, sqe, skb, skh, skl, ske, svb, svh, svl, sve,
    ssb, ssh, ssl, sdb, sdh, sdl, sde, sgb, sgh, sgl, sge,
    H, scale, eps, L: tl.constexpr, E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b, h = pid // H, pid % H
    cols, dims, col_ok, dim_ok, k, v = _keys_and_values(
        K, V, b, h, skb, skh, skl, ske, svb, svh, svl, sve, L, E, BLOCK_N, BLOCK_E
    )
    dk = tl.zeros((BLOCK_N, BLOCK_E), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_E), dtype=tl.float32)
    for start in range(0, L, BLOCK_M):
        rows, row_ok, row_mask, q, sigma = _query_rows(
            Q, SIGMA, b, h, start, dims, dim_ok, sqb, sqh, sql, sqe, ssb, ssh, ssl, L, BLOCK_M
        )
        d_out_at = D_OUT + b * sdb + h * sdh + rows[:, None] * sdl + dims[None, :] * sde
        d_out = tl.load(d_out_at, row_mask, 0.0)
        row_at = (b * H + h) * L + rows
        g_series = tl.load(D_SERIES_SIDE + row_at, row_ok, 0.0)
        g_prior = tl.load(D_PRIOR_SIDE + row_at, row_ok, 0.0)
        series, prior, distance = _associations(q, k, sigma, rows, cols, col_ok, scale, L)
        log_ratio = tl.log(series + eps) - tl.log(prior + eps)
        difference = series - prior
        # Series side: d/ds of the discrepancy (prior fixed), plus the attention output's term.
        d_series = g_series[:, None] * (log_ratio + difference / (series + eps))
        d_series += tl.dot(d_out, tl.trans(v), input_precision="ieee")
        d_scores = series * (d_series - tl.sum(series * d_series, axis=1)[:, None])
        d_scores = d_scores.to(k.dtype)
        dq = tl.dot(d_scores, k, input_precision="ieee") * scale
        dq_at = DQ + b * sgb + h * sgh + rows[:, None] * sgl + dims[None, :] * sge
        tl.store(dq_at, dq.to(DQ.dtype.element_ty), row_mask)
        dk += tl.dot(tl.trans(d_scores), q, input_precision="ieee")
        dv += tl.dot(tl.trans(series.to(d_out.dtype)), d_out, input_precision="ieee")
        # Prior side: d/dp (series fixed), through the row normalisation, to 1 / sigma^2.
        d_prior = -g_prior[:, None] * (log_ratio + difference / (prior + eps))
        centred = d_prior - tl.sum(prior * d_prior, axis=1)[:, None]
        d_inverse_variance = tl.sum(prior * (-0.5 * distance * distance) * centred, axis=1)
        d_sigma = -2.0 * d_inverse_variance / (sigma * sigma * sigma)
        tl.store(D_SIGMA + row_at, d_sigma, row_ok)
    # dq, dk and dv are allocated alike (the strides of DQ).
    key_at = b * sgb + h * sgh + cols[:, None] * sgl + dims[None, :] * sge
    key_mask = col_ok[:, None] & dim_ok[None, :]
    tl.store(DK + key_at, (dk * scale).to(DK.dtype.element_ty), key_mask)
    tl.store(DV + key_at, dv.to(DV.dtype.element_ty), key_mask)


def _heads_like(t: torch.Tensor) -> torch.Tensor:
    """An empty `(B, H, L, E)` like ``t`` laid out as `(B, L, H, E)`: merging heads is a view."""
    batch, n_heads, length, head_dim = t.shape
    return t.new_empty((batch, length, n_heads, head_dim)).transpose(1, 2)


def _rows_like(sigma: torch.Tensor) -> torch.Tensor:
    return torch.empty(sigma.shape, dtype=torch.float32, device=sigma.device)


def _blocks(length: int, head_dim: int, block_m: int) -> dict[str, int]:
    block_n = max(16, triton.next_power_of_2(length))
    return {
        "BLOCK_M": min(block_m, block_n),
        "BLOCK_N": block_n,
        "BLOCK_E": max(16, triton.next_power_of_2(head_dim)),
    }


def _check(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, block_m: int
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
    if block_m not in (16, 32, 64, 128):
        raise ValueError(f"invalid block_m={block_m}: expected 16, 32, 64 or 128")


@torch.library.custom_op("anomaly_transformer_bench::fused_attention_v1", mutates_args=())
def _forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sigma: torch.Tensor,
    block_m: int,
    num_warps: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, n_heads, length, head_dim = q.shape
    heads = _heads_like(v)
    series_side, prior_side = _rows_like(sigma), _rows_like(sigma)
    _anomaly_attention_fwd[(batch * n_heads,)](
        q, k, v, sigma, heads, series_side, prior_side,
        *q.stride(), *k.stride(), *v.stride(), *sigma.stride(), *heads.stride(),
        n_heads, head_dim**-0.5, KL_EPS, length, head_dim,
        **_blocks(length, head_dim, block_m), num_warps=num_warps,
    )  # fmt: skip
    return heads, series_side, prior_side


@_forward.register_fake
def _(q, k, v, sigma, *_):  # type: ignore[no-untyped-def]
    return _heads_like(v), _rows_like(sigma), _rows_like(sigma)


@torch.library.custom_op("anomaly_transformer_bench::fused_attention_v1_backward", mutates_args=())
def _backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sigma: torch.Tensor,
    d_heads: torch.Tensor,
    d_series_side: torch.Tensor,
    d_prior_side: torch.Tensor,
    block_m: int,
    num_warps: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, n_heads, length, head_dim = q.shape
    dq, dk, dv = _heads_like(q), _heads_like(k), _heads_like(v)
    d_sigma = _rows_like(sigma)
    d_series_side, d_prior_side = d_series_side.contiguous(), d_prior_side.contiguous()
    _anomaly_attention_bwd[(batch * n_heads,)](
        q, k, v, sigma, d_heads, d_series_side, d_prior_side, dq, dk, dv, d_sigma,
        *q.stride(), *k.stride(), *v.stride(), *sigma.stride(), *d_heads.stride(),
        *dq.stride(),
        n_heads, head_dim**-0.5, KL_EPS, length, head_dim,
        **_blocks(length, head_dim, block_m), num_warps=num_warps,
    )  # fmt: skip
    return dq, dk, dv, d_sigma


@_backward.register_fake
def _(q, k, v, sigma, *_):  # type: ignore[no-untyped-def]
    return _heads_like(q), _heads_like(k), _heads_like(v), _rows_like(sigma)


def _setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    q, k, v, sigma, ctx.block_m, ctx.num_warps = inputs
    ctx.save_for_backward(q, k, v, sigma)


def _autograd_backward(ctx, d_heads, d_series_side, d_prior_side):  # type: ignore[no-untyped-def]
    q, k, v, sigma = ctx.saved_tensors  # the gradients come materialised (zeros, not None)
    grads = _backward(
        q, k, v, sigma, d_heads, d_series_side, d_prior_side, ctx.block_m, ctx.num_warps
    )
    return *grads, None, None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def anomaly_attention_v1(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sigma: torch.Tensor,
    *,
    block_m: int = DEFAULT_BLOCK_M,
    num_warps: int = DEFAULT_NUM_WARPS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention output and the per-row symmetric KL between series and prior, fused.

    Args:
        q, k, v: `(batch, heads, L, E)`, float32, bf16 or fp16, any strides; ``L <= 128``.
        sigma: `(batch, heads, L)` float32, already squashed (``model.network.squash_sigma``).
        block_m: query rows per inner step (16 to 128); num_warps: warps per program.

    Returns:
        ``heads`` `(batch, heads, L, E)` in ``v``'s dtype (laid out as `(batch, L, heads, E)`),
        and ``series_side``, ``prior_side``: `(batch, heads, L)` float32, equal values; the first
        carries gradient to ``q`` and ``k`` only, the second to ``sigma`` only.

    Raises:
        ValueError: shapes, dtypes or sizes the kernels do not handle.
    """
    _check(q, k, v, sigma, block_m)
    return _forward(q, k, v, sigma, block_m, num_warps)
