"""Triton backward kernels: dQ, dK, dV recomputed from the saved log-sum-exp (FlashAttention-2).

No ``Lq x Lk`` buffer exists: each tile's weights are rebuilt exactly as
``p = exp(s - lse)`` from the scores (`common.score_tile`, the forward's own code), and

    dV  = sum_i  dropout(p)^T dO
    dP  = dropout(dO V^T)
    dS  = p * (dP - delta),    delta_i = rowsum(dO_i * O_i) - dlse_i
    dS *= 1 - tanh^2           (softcap)
    dQ  = scale * dS K,        dK = scale * dS^T Q

Two kernels, so no atomics are needed and results are deterministic: `_dkdv_kernel`
owns a tile of keys of one key/value head and walks the visible query tiles of every
query head of its group (GQA sums in registers); `_dq_kernel` owns a tile of queries
and walks the visible key tiles, like the forward. Rows with no allowed key have
``lse = -inf``; ``+inf`` is used instead so that their ``p`` is 0 and their gradients vanish.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnkit.kernels.triton.common import (
    LOG2E,
    NO_SPECIALIZE,
    SEED_STEP,
    bhld_strides,
    dot,
    dot_precision,
    dropout_args,
    flags,
    head_block,
    keep_tile,
    key_range,
    mask_args,
    open_key_tiles,
    open_query_tiles,
    query_range,
    scalar_args,
    score_tile,
)
from attnkit.kernels.triton.forward import length_bucket, seq_bounds
from attnkit.spec import AttentionSpec


@triton.jit
def _dropout_keys(seed, b, bh, h, VARLEN: tl.constexpr):
    """``(seed, head index)`` of the dropout hash, as the forward kernel derives them."""
    if VARLEN:
        seed_u = seed.to(tl.uint32) + b.to(tl.uint32) * SEED_STEP
        head_u = h.to(tl.uint32)
    else:
        seed_u = seed.to(tl.uint32)
        head_u = bh.to(tl.uint32)
    return seed_u, head_u


@triton.jit
def _dkdv_steps(
    dk, dv, start, stop, k, v, q_base, do_base, row_base, LSE, DELTA, mask_rows, sqm, sqd, som, sod, slm,
    smm, smn, offs_m0, offs_n, offs_d, offs_dv, q_len, kv_len, head_dim, v_head_dim, offset, scale,
    softcap, slope, left, right, seed_u, bh_u, threshold_u, drop_scale,
    BLOCK_M: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    STRUCTURE: tl.constexpr,
):  # fmt: skip
    """``dK`` (unscaled) and ``dV`` of one key tile accumulated over query tiles ``[start, stop)`` of one head."""
    for i0 in range(start, stop, BLOCK_M):
        offs_m = i0 + offs_m0
        row_ok = offs_m < q_len
        q = tl.load(
            q_base + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
            mask=row_ok[:, None] & (offs_d[None, :] < head_dim),
            other=0.0,
        )  # (BLOCK_M, BLOCK_D)
        do = tl.load(
            do_base + offs_m[:, None] * som + offs_dv[None, :] * sod,
            mask=row_ok[:, None] & (offs_dv[None, :] < v_head_dim),
            other=0.0,
        )  # (BLOCK_M, BLOCK_DV)
        lse = tl.load(LSE + row_base + offs_m * slm, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + row_base + offs_m * slm, mask=row_ok, other=0.0)
        lse = tl.where(lse == float("-inf"), float("inf"), lse)  # empty rows (and rows past Lq): p = 0
        qk = dot(q, tl.trans(k), DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        s, t = score_tile(
            qk, offs_m, offs_n, q_len, kv_len, offset, scale, softcap, slope, left, right, mask_rows, smm, smn,
            HAS_SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT, MASK_KIND, STRUCTURE,
        )  # fmt: skip
        p = tl.exp2((s - lse[:, None]) * LOG2E)  # the exact weights of the forward
        dp = dot(do, tl.trans(v), DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        p_used = p
        if DROPOUT:
            keep = keep_tile(seed_u, bh_u, offs_m, offs_n, threshold_u)
            p_used = tl.where(keep, p * drop_scale, 0.0)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        dv += dot(tl.trans(p_used.to(do.dtype)), do, DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dk += dot(tl.trans(ds.to(q.dtype)), q, DOT_PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, Slopes, Mask, CuQ, CuK,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod, slb, slh, slm,
    sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
    smb, smh, smm, smn,
    n_heads, n_kv_heads, group, q_len_dense, kv_len_dense, len_bucket, head_dim, v_head_dim,
    scale, softcap, left, right, seed, threshold, drop_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // n_kv_heads
    hk = bhk % n_kv_heads
    q_start, q_len = seq_bounds(CuQ, b, q_len_dense, VARLEN)
    k_start, kv_len = seq_bounds(CuK, b, kv_len_dense, VARLEN)
    j0 = pid_n * BLOCK_N
    if j0 >= kv_len:
        return
    offset = kv_len - q_len
    offs_n = j0 + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok = offs_n < kv_len

    # Step 1: this program's keys and values stay in registers for the whole walk.
    k = tl.load(
        K + b * skb + hk * skh + (k_start + offs_n)[:, None] * skn + offs_d[None, :] * skd,
        mask=col_ok[:, None] & (offs_d[None, :] < head_dim),
        other=0.0,
    )  # (BLOCK_N, BLOCK_D)
    v = tl.load(
        V + b * svb + hk * svh + (k_start + offs_n)[:, None] * svn + offs_dv[None, :] * svd,
        mask=col_ok[:, None] & (offs_dv[None, :] < v_head_dim),
        other=0.0,
    )  # (BLOCK_N, BLOCK_DV)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    j1 = tl.minimum(j0 + BLOCK_N, kv_len)
    lo, hi = query_range(j0, j1, offset, q_len, left, right, BLOCK_M, HAS_LEFT, HAS_RIGHT)
    a, z = open_query_tiles(j0, lo, hi, offset, kv_len, left, right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    if DROPOUT:  # typed before the head loop, which reassigns them per head
        threshold_u = threshold.to(tl.uint32)
        seed_u, bh_u = _dropout_keys(seed, b, b * n_heads + hk * group, hk * group, VARLEN)
    else:
        seed_u, bh_u, threshold_u = 0, 0, 0  # never read

    # Step 2: every query head that reads this key head (GQA), every visible query tile.
    for g in range(0, group):
        h = hk * group + g
        bh = b * n_heads + h
        q_base = Q + b * sqb + h * sqh + q_start * sqm
        do_base = DO + b * sob + h * soh + q_start * som
        row_base = b * slb + h * slh + q_start * slm
        mask_rows = Mask + b * smb + h * smh
        slope = 0.0
        if HAS_ALIBI:
            slope = tl.load(Slopes + h).to(tl.float32)
        if DROPOUT:
            seed_u, bh_u = _dropout_keys(seed, b, bh, h, VARLEN)
        dk, dv = _dkdv_steps(
            dk, dv, lo, a, k, v, q_base, do_base, row_base, LSE, DELTA, mask_rows, sqm, sqd, som, sod, slm,
            smm, smn, offs_m0, offs_n, offs_d, offs_dv, q_len, kv_len, head_dim, v_head_dim, offset, scale,
            softcap, slope, left, right, seed_u, bh_u, threshold_u, drop_scale,
            BLOCK_M, HAS_SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT, MASK_KIND, DROPOUT, DOT_PRECISION, True,
        )  # fmt: skip
        dk, dv = _dkdv_steps(
            dk, dv, a, z, k, v, q_base, do_base, row_base, LSE, DELTA, mask_rows, sqm, sqd, som, sod, slm,
            smm, smn, offs_m0, offs_n, offs_d, offs_dv, q_len, kv_len, head_dim, v_head_dim, offset, scale,
            softcap, slope, left, right, seed_u, bh_u, threshold_u, drop_scale,
            BLOCK_M, HAS_SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT, MASK_KIND, DROPOUT, DOT_PRECISION, False,
        )  # fmt: skip
        dk, dv = _dkdv_steps(
            dk, dv, z, hi, k, v, q_base, do_base, row_base, LSE, DELTA, mask_rows, sqm, sqd, som, sod, slm,
            smm, smn, offs_m0, offs_n, offs_d, offs_dv, q_len, kv_len, head_dim, v_head_dim, offset, scale,
            softcap, slope, left, right, seed_u, bh_u, threshold_u, drop_scale,
            BLOCK_M, HAS_SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT, MASK_KIND, DROPOUT, DOT_PRECISION, True,
        )  # fmt: skip

    # Step 3: one write per key tile (scale applied once).
    dk = dk * scale
    tl.store(
        DK + b * sdkb + hk * sdkh + (k_start + offs_n)[:, None] * sdkn + offs_d[None, :] * sdkd,
        dk.to(DK.dtype.element_ty),
        mask=col_ok[:, None] & (offs_d[None, :] < head_dim),
    )
    tl.store(
        DV + b * sdvb + hk * sdvh + (k_start + offs_n)[:, None] * sdvn + offs_dv[None, :] * sdvd,
        dv.to(DV.dtype.element_ty),
        mask=col_ok[:, None] & (offs_dv[None, :] < v_head_dim),
    )


@triton.jit
def _dq_steps(
    dq, start, stop, q, do, lse, delta, k_base, v_base, mask_rows, skn, skd, svn, svd, smm, smn,
    offs_m, offs_n0, offs_d, offs_dv, q_len, kv_len, head_dim, v_head_dim, offset, scale, softcap, slope,
    left, right, seed_u, bh_u, threshold_u, drop_scale,
    BLOCK_N: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    STRUCTURE: tl.constexpr,
):  # fmt: skip
    """``dQ`` (unscaled) accumulated over key tiles ``[start, stop)`` (``STRUCTURE``: mask causal/window/Lk)."""
    for j0 in range(start, stop, BLOCK_N):
        offs_n = j0 + offs_n0
        col_ok = offs_n < kv_len
        k = tl.load(
            k_base + offs_n[:, None] * skn + offs_d[None, :] * skd,
            mask=col_ok[:, None] & (offs_d[None, :] < head_dim),
            other=0.0,
        )  # (BLOCK_N, BLOCK_D)
        v = tl.load(
            v_base + offs_n[:, None] * svn + offs_dv[None, :] * svd,
            mask=col_ok[:, None] & (offs_dv[None, :] < v_head_dim),
            other=0.0,
        )  # (BLOCK_N, BLOCK_DV)
        qk = dot(q, tl.trans(k), DOT_PRECISION)
        s, t = score_tile(
            qk, offs_m, offs_n, q_len, kv_len, offset, scale, softcap, slope, left, right, mask_rows, smm, smn,
            HAS_SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT, MASK_KIND, STRUCTURE,
        )  # fmt: skip
        p = tl.exp2((s - lse[:, None]) * LOG2E)
        dp = dot(do, tl.trans(v), DOT_PRECISION)
        if DROPOUT:
            keep = keep_tile(seed_u, bh_u, offs_m, offs_n, threshold_u)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += dot(ds.to(k.dtype), k, DOT_PRECISION)
    return dq


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, Slopes, Mask, CuQ, CuK,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod, slb, slh, slm,
    sdqb, sdqh, sdqm, sdqd,
    smb, smh, smm, smn,
    n_heads, group, q_len_dense, kv_len_dense, len_bucket, head_dim, v_head_dim,
    scale, softcap, left, right, seed, threshold, drop_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    hk = h // group
    q_start, q_len = seq_bounds(CuQ, b, q_len_dense, VARLEN)
    k_start, kv_len = seq_bounds(CuK, b, kv_len_dense, VARLEN)
    i0 = pid_m * BLOCK_M
    if i0 >= q_len:
        return
    offset = kv_len - q_len
    offs_m = i0 + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < q_len

    # Step 1: the query block, its output gradient and its row statistics.
    q = tl.load(
        Q + b * sqb + h * sqh + (q_start + offs_m)[:, None] * sqm + offs_d[None, :] * sqd,
        mask=row_ok[:, None] & (offs_d[None, :] < head_dim),
        other=0.0,
    )
    do = tl.load(
        DO + b * sob + h * soh + (q_start + offs_m)[:, None] * som + offs_dv[None, :] * sod,
        mask=row_ok[:, None] & (offs_dv[None, :] < v_head_dim),
        other=0.0,
    )
    row_ptr = b * slb + h * slh + (q_start + offs_m) * slm
    lse = tl.load(LSE + row_ptr, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(DELTA + row_ptr, mask=row_ok, other=0.0)
    k_base = K + b * skb + hk * skh + k_start * skn
    v_base = V + b * svb + hk * svh + k_start * svn
    mask_rows = Mask + b * smb + h * smh
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Slopes + h).to(tl.float32)
    seed_u, bh_u, threshold_u = 0, 0, 0  # read only when DROPOUT
    if DROPOUT:
        seed_u, bh_u = _dropout_keys(seed, b, bh, h, VARLEN)
        threshold_u = threshold.to(tl.uint32)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Step 2: the visible key tiles, split as in the forward (open tiles skip the structure mask).
    i1 = tl.minimum(i0 + BLOCK_M, q_len)
    lo, hi = key_range(i0, i1, offset, kv_len, left, right, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    a, z = open_key_tiles(i0, i1, lo, hi, offset, kv_len, left, right, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    dq = _dq_steps(
        dq, lo, a, q, do, lse, delta, k_base, v_base, mask_rows, skn, skd, svn, svd, smm, smn,
        offs_m, offs_n0, offs_d, offs_dv, q_len, kv_len, head_dim, v_head_dim, offset, scale, softcap, slope,
        left, right, seed_u, bh_u, threshold_u, drop_scale,
        BLOCK_N, HAS_SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT, MASK_KIND, DROPOUT, DOT_PRECISION, True,
    )  # fmt: skip
    dq = _dq_steps(
        dq, a, z, q, do, lse, delta, k_base, v_base, mask_rows, skn, skd, svn, svd, smm, smn,
        offs_m, offs_n0, offs_d, offs_dv, q_len, kv_len, head_dim, v_head_dim, offset, scale, softcap, slope,
        left, right, seed_u, bh_u, threshold_u, drop_scale,
        BLOCK_N, HAS_SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT, MASK_KIND, DROPOUT, DOT_PRECISION, False,
    )  # fmt: skip
    dq = _dq_steps(
        dq, z, hi, q, do, lse, delta, k_base, v_base, mask_rows, skn, skd, svn, svd, smm, smn,
        offs_m, offs_n0, offs_d, offs_dv, q_len, kv_len, head_dim, v_head_dim, offset, scale, softcap, slope,
        left, right, seed_u, bh_u, threshold_u, drop_scale,
        BLOCK_N, HAS_SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT, MASK_KIND, DROPOUT, DOT_PRECISION, True,
    )  # fmt: skip

    dq = dq * scale
    tl.store(
        DQ + b * sdqb + h * sdqh + (q_start + offs_m)[:, None] * sdqm + offs_d[None, :] * sdqd,
        dq.to(DQ.dtype.element_ty),
        mask=row_ok[:, None] & (offs_d[None, :] < head_dim),
    )


# --------------------------------------------------------------------- launches
_BWD_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(64, 128, 8, 2), (32, 128, 4, 2), (64, 64, 4, 2), (128, 64, 8, 2), (32, 64, 4, 2)]
]  # fmt: skip
_DQ_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 4, 2), (64, 32, 4, 2)]
]  # fmt: skip
_KEY = ["len_bucket", "BLOCK_D", "BLOCK_DV", "HAS_SOFTCAP", "HAS_ALIBI", "HAS_LEFT", "HAS_RIGHT",
        "MASK_KIND", "DROPOUT", "VARLEN", "DOT_PRECISION"]  # fmt: skip
_dkdv_tuned = triton.autotune(_BWD_CONFIGS, key=_KEY)(_dkdv_kernel)
_dq_tuned = triton.autotune(_DQ_CONFIGS, key=_KEY)(_dq_kernel)


def launch_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    spec: AttentionSpec,
    *,
    dlse: torch.Tensor | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    blocks: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``dq, dk, dv`` (shapes and dtypes of ``q``, ``k``, ``v``).

    Shapes as in `attnkit.kernels.triton.forward.launch_forward` (dense or packed);
    ``lse`` is the forward's, ``dlse`` an optional gradient of it (same shape).
    ``blocks = (BLOCK_M, BLOCK_N)`` fixes the tiles instead of autotuning.
    """
    varlen = cu_seqlens_q is not None
    # delta_i = rowsum(dO_i * O_i) - dlse_i: O(L * Dv), a torch reduction is as fast as a kernel.
    delta = (dout.float() * out.float()).sum(-1)  # dense (B, Hq, Lq); packed (total_q, Hq)
    if varlen:
        delta = delta.t()  # (Hq, total_q), lse's layout
    if dlse is not None:
        delta = delta - dlse.float()
    delta = delta.contiguous()
    lse = lse.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    lse_strides = (0, lse.stride(0), lse.stride(1)) if varlen else lse.stride()
    cu_q = cu_seqlens_q if varlen else lse
    cu_k = cu_seqlens_k if varlen else lse
    rows = max_seqlen_q if varlen else spec.q_len
    cols = max_seqlen_k if varlen else spec.kv_len
    mask, mstrides, _ = mask_args(spec)
    mask = mask if mask is not None else lse
    slopes = spec.alibi_slopes if spec.alibi_slopes is not None else lse
    seed, threshold, drop_scale = dropout_args(spec)
    scale, softcap, left, right = scalar_args(spec)
    common = (*bhld_strides(q, varlen), *bhld_strides(k, varlen), *bhld_strides(v, varlen),
              *bhld_strides(dout, varlen), *lse_strides)  # fmt: skip
    tail = (scale, softcap, left, right, seed, threshold, drop_scale)
    meta = dict(BLOCK_D=head_block(spec.head_dim), BLOCK_DV=head_block(spec.v_head_dim), VARLEN=varlen,
                DOT_PRECISION=dot_precision(q.dtype), **flags(spec))  # fmt: skip
    dims = (spec.q_len, spec.kv_len, length_bucket(spec), spec.head_dim, spec.v_head_dim)
    dkdv_args = (q, k, v, dout, lse, delta, dk, dv, slopes, mask, cu_q, cu_k, *common,
                 *bhld_strides(dk, varlen), *bhld_strides(dv, varlen), *mstrides,
                 spec.q_heads, spec.kv_heads, spec.group, *dims, *tail)  # fmt: skip
    dq_args = (q, k, v, dout, lse, delta, dq, slopes, mask, cu_q, cu_k, *common, *bhld_strides(dq, varlen),
               *mstrides, spec.q_heads, spec.group, *dims, *tail)  # fmt: skip
    if blocks is None:
        _dkdv_tuned[lambda c: (triton.cdiv(cols, c["BLOCK_N"]), spec.batch * spec.kv_heads)](*dkdv_args, **meta)
        _dq_tuned[lambda c: (triton.cdiv(rows, c["BLOCK_M"]), spec.batch * spec.q_heads)](*dq_args, **meta)
    else:
        bm, bn = blocks
        grid = (triton.cdiv(cols, bn), spec.batch * spec.kv_heads)
        _dkdv_kernel[grid](*dkdv_args, BLOCK_M=bm, BLOCK_N=bn, **meta)
        _dq_kernel[(triton.cdiv(rows, bm), spec.batch * spec.q_heads)](*dq_args, BLOCK_M=bm, BLOCK_N=bn, **meta)
    return dq, dk, dv
