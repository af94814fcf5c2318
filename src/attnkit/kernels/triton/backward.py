"""Triton backward kernels: dQ, dK, dV recomputed from the saved log-sum-exp (FlashAttention-2).

No ``Lq x Lk`` buffer exists: each tile's weights are rebuilt exactly as
``p = exp(s - lse)`` from the scores (`common.score_tile`, the forward's own code), and

    dV  = sum_i  dropout(p)^T dO
    dP  = dropout(dO V^T)
    dS  = p * (dP - delta),    delta_i = rowsum(dO_i * O_i) - dlse_i
    dS *= 1 - tanh^2           (softcap)
    dQ  = scale * dS K,        dK = scale * dS^T Q

Three launches, no atomics, so results are deterministic: `_prep_kernel` writes ``delta``
and the base-2 ``lse`` per row; `_dkdv_kernel` owns a tile of keys of one key/value head,
loaded once, and walks the visible query tiles of every query head of its group (GQA sums
in registers), in the transposed form of Triton's tutorial and FlexAttention (the tile is
``k q^T``); `_dq_kernel` owns a tile of queries and walks the visible key tiles, like the
forward. Rows with no allowed key have ``lse = -inf``; ``+inf`` is used instead so that
their ``p`` is 0 and their gradients vanish.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnkit.kernels.triton.common import (
    LOG2E,
    NO_SPECIALIZE,
    SEED_STEP,
    autotune_configs,
    bhld_strides,
    dot,
    dot_acc,
    dot_precision,
    dropout_args,
    even_dims,
    flags,
    folded_constants,
    head_block,
    keep_tile,
    key_range,
    load_tile,
    mask_args,
    open_key_tiles,
    open_query_tiles,
    query_range,
    scalar_args,
    score_tile,
    shared_memory_pruner,
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
def _prep_kernel(
    O, DO, LSE, DLSE, DELTA, LSE2, CuQ,
    sob, soh, som, sod, sdob, sdoh, sdom, sdod, slb, slh, slm,
    n_heads, q_len_dense, v_head_dim,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_DLSE: tl.constexpr, VARLEN: tl.constexpr,
):  # fmt: skip
    """Per query row: ``delta = rowsum(dO * O) - dlse`` and ``lse2 = lse log2 e`` (``+inf`` for an empty row).

    One read of ``O`` and ``dO`` in their own dtype (no fp32 copies); both backward kernels read
    ``delta`` and ``lse2`` (base-2 units, so ``p = exp2(s2 - lse2)``; ``+inf`` makes ``p = 0``).
    """
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    q_start, q_len = seq_bounds(CuQ, b, q_len_dense, VARLEN)
    i0 = pid_m * BLOCK_M
    if i0 >= q_len:
        return
    offs_m = i0 + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < q_len
    ok = row_ok[:, None] & (offs_dv[None, :] < v_head_dim)
    rows = q_start + offs_m
    o = tl.load(O + b * sob + h * soh + rows[:, None] * som + offs_dv[None, :] * sod, mask=ok, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + rows[:, None] * sdom + offs_dv[None, :] * sdod, mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # (BLOCK_M,)
    row_ptr = b * slb + h * slh + rows * slm
    if HAS_DLSE:
        delta = delta - tl.load(DLSE + row_ptr, mask=row_ok, other=0.0)
    lse = tl.load(LSE + row_ptr, mask=row_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    tl.store(DELTA + row_ptr, delta, mask=row_ok)
    tl.store(LSE2 + row_ptr, lse2, mask=row_ok)


@triton.jit
def _dkdv_steps(
    dk, dv, start, stop, k, v, q_base, do_base, row_base, LSE2, DELTA, mask_rows, sqm, sqd, som, sod, slm,
    smm, smn, offs_m0, offs_n, offs_d, offs_dv, q_len, kv_len, head_dim, v_head_dim, offset,
    qk_scale, cap_in, cap_out, slope2, left, right, seed_u, bh_u, threshold_u, drop_scale,
    BLOCK_M: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, MASK_KIND: tl.constexpr, MASK_ROW: tl.constexpr, DROPOUT: tl.constexpr,
    FAST_TANH: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr, STRUCTURE: tl.constexpr,
):  # fmt: skip
    """``dK`` (unscaled) and ``dV`` of one key tile over query tiles ``[start, stop)`` of one head.

    The transposed form of Triton's tutorial and FlexAttention: the tile is ``k q^T``
    ``(BLOCK_N, BLOCK_M)``, so ``dV += p^T dO`` and ``dK += dS^T Q`` take their left operand
    straight from registers and ``k``, ``v`` stay where they were loaded. Without ``STRUCTURE``
    the query tiles lie inside ``[0, Lq)`` and see every key: no load or score mask.
    """
    for i0 in range(start, stop, BLOCK_M):
        offs_m = i0 + offs_m0
        qT_ptrs = q_base + offs_m[None, :] * sqm + offs_d[:, None] * sqd  # (BLOCK_D, BLOCK_M)
        do_ptrs = do_base + offs_m[:, None] * som + offs_dv[None, :] * sod  # (BLOCK_M, BLOCK_DV)
        row_ptrs = row_base + offs_m * slm
        row_ok = offs_m < q_len
        qT = load_tile(qT_ptrs, row_ok[None, :], offs_d[:, None] < head_dim, STRUCTURE, EVEN_D)
        if STRUCTURE:
            lse2 = tl.load(LSE2 + row_ptrs, mask=row_ok, other=float("inf"))  # rows past Lq: p = 0
            delta = tl.load(DELTA + row_ptrs, mask=row_ok, other=0.0)
        else:
            lse2 = tl.load(LSE2 + row_ptrs)
            delta = tl.load(DELTA + row_ptrs)
        qkT = dot(k, qT, DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        if not (HAS_SOFTCAP or HAS_ALIBI or MASK_KIND != 0 or STRUCTURE):
            tT = qkT  # unused: no softcap
            pT = tl.exp2(tl.fma(qkT, qk_scale, -lse2[None, :]))  # one FMA per score
        else:
            sT, tT = score_tile(
                qkT, offs_m[None, :], offs_n[:, None], q_len, kv_len, offset, qk_scale, cap_in, cap_out, slope2,
                left, right, mask_rows, smm, smn,
                HAS_SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT, MASK_KIND, STRUCTURE, MASK_ROW, FAST_TANH,
            )  # fmt: skip
            pT = tl.exp2(sT - lse2[None, :])  # the exact weights of the forward, transposed
        do = load_tile(do_ptrs, row_ok[:, None], offs_dv[None, :] < v_head_dim, STRUCTURE, EVEN_D)
        dpT = dot(v, tl.trans(do), DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        pT_used = pT
        if DROPOUT:
            keep = keep_tile(seed_u, bh_u, offs_m, offs_n, threshold_u, True)
            pT_used = tl.where(keep, pT * drop_scale, 0.0)
            dpT = tl.where(keep, dpT * drop_scale, 0.0)
        dv = dot_acc(pT_used.to(do.dtype), do, dv, DOT_PRECISION)
        dsT = pT * (dpT - delta[None, :])
        if HAS_SOFTCAP:
            dsT = dsT * (1.0 - tT * tT)
        dk = dot_acc(dsT.to(qT.dtype), tl.trans(qT), dk, DOT_PRECISION)  # dS in 16 bits before the MMA
    return dk, dv


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _dkdv_kernel(
    Q, K, V, DO, LSE2, DELTA, DK, DV, Slopes, Mask, CuQ, CuK,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod, slb, slh, slm,
    sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
    smb, smh, smm, smn,
    n_heads, n_kv_heads, group, q_len_dense, kv_len_dense, len_bucket, head_dim, v_head_dim,
    scale, softcap, left, right, seed, threshold, drop_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_ROW: tl.constexpr, DROPOUT: tl.constexpr, FAST_TANH: tl.constexpr,
    EVEN_D: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
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

    # Step 1: this program's keys and values are loaded once and stay in registers for the whole walk.
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
    a, z = open_query_tiles(j0, lo, hi, offset, q_len, kv_len, left, right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
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
        qk_scale, cap_in, cap_out, slope2 = folded_constants(scale, softcap, slope)
        if DROPOUT:
            seed_u, bh_u = _dropout_keys(seed, b, bh, h, VARLEN)
        dk, dv = _dkdv_steps(
            dk, dv, lo, a, k, v, q_base, do_base, row_base, LSE2, DELTA, mask_rows, sqm, sqd, som, sod, slm,
            smm, smn, offs_m0, offs_n, offs_d, offs_dv, q_len, kv_len, head_dim, v_head_dim, offset,
            qk_scale, cap_in, cap_out, slope2, left, right, seed_u, bh_u, threshold_u, drop_scale,
            BLOCK_M, HAS_SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT, MASK_KIND, MASK_ROW, DROPOUT, FAST_TANH,
            EVEN_D, DOT_PRECISION, True,
        )  # fmt: skip
        dk, dv = _dkdv_steps(
            dk, dv, a, z, k, v, q_base, do_base, row_base, LSE2, DELTA, mask_rows, sqm, sqd, som, sod, slm,
            smm, smn, offs_m0, offs_n, offs_d, offs_dv, q_len, kv_len, head_dim, v_head_dim, offset,
            qk_scale, cap_in, cap_out, slope2, left, right, seed_u, bh_u, threshold_u, drop_scale,
            BLOCK_M, HAS_SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT, MASK_KIND, MASK_ROW, DROPOUT, FAST_TANH,
            EVEN_D, DOT_PRECISION, False,
        )  # fmt: skip
        dk, dv = _dkdv_steps(
            dk, dv, z, hi, k, v, q_base, do_base, row_base, LSE2, DELTA, mask_rows, sqm, sqd, som, sod, slm,
            smm, smn, offs_m0, offs_n, offs_d, offs_dv, q_len, kv_len, head_dim, v_head_dim, offset,
            qk_scale, cap_in, cap_out, slope2, left, right, seed_u, bh_u, threshold_u, drop_scale,
            BLOCK_M, HAS_SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT, MASK_KIND, MASK_ROW, DROPOUT, FAST_TANH,
            EVEN_D, DOT_PRECISION, True,
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
    dq, start, stop, q, do, lse2, delta, k_base, v_base, mask_rows, skn, skd, svn, svd, smm, smn,
    offs_m, offs_n0, offs_d, offs_dv, q_len, kv_len, head_dim, v_head_dim, offset,
    qk_scale, cap_in, cap_out, slope2, left, right, seed_u, bh_u, threshold_u, drop_scale,
    BLOCK_N: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, MASK_KIND: tl.constexpr, MASK_ROW: tl.constexpr, DROPOUT: tl.constexpr,
    FAST_TANH: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr, STRUCTURE: tl.constexpr,
):  # fmt: skip
    """``dQ`` (unscaled) over key tiles ``[start, stop)`` (``STRUCTURE``: masked as in the forward)."""
    for j0 in range(start, stop, BLOCK_N):
        offs_n = j0 + offs_n0
        kT_ptrs = k_base + offs_n[None, :] * skn + offs_d[:, None] * skd  # (BLOCK_D, BLOCK_N)
        vT_ptrs = v_base + offs_n[None, :] * svn + offs_dv[:, None] * svd  # (BLOCK_DV, BLOCK_N)
        col_ok = offs_n < kv_len
        kT = load_tile(kT_ptrs, col_ok[None, :], offs_d[:, None] < head_dim, STRUCTURE, EVEN_D)
        vT = load_tile(vT_ptrs, col_ok[None, :], offs_dv[:, None] < v_head_dim, STRUCTURE, EVEN_D)
        qk = dot(q, kT, DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        if not (HAS_SOFTCAP or HAS_ALIBI or MASK_KIND != 0 or STRUCTURE):
            t = qk  # unused: no softcap
            p = tl.exp2(tl.fma(qk, qk_scale, -lse2[:, None]))
        else:
            s, t = score_tile(
                qk, offs_m[:, None], offs_n[None, :], q_len, kv_len, offset, qk_scale, cap_in, cap_out, slope2,
                left, right, mask_rows, smm, smn,
                HAS_SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT, MASK_KIND, STRUCTURE, MASK_ROW, FAST_TANH,
            )  # fmt: skip
            p = tl.exp2(s - lse2[:, None])
        dp = dot(do, vT, DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        if DROPOUT:
            keep = keep_tile(seed_u, bh_u, offs_m, offs_n, threshold_u)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = dot_acc(ds.to(kT.dtype), tl.trans(kT), dq, DOT_PRECISION)
    return dq


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _dq_kernel(
    Q, K, V, DO, LSE2, DELTA, DQ, Slopes, Mask, CuQ, CuK,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod, slb, slh, slm,
    sdqb, sdqh, sdqm, sdqd,
    smb, smh, smm, smn,
    n_heads, group, q_len_dense, kv_len_dense, len_bucket, head_dim, v_head_dim,
    scale, softcap, left, right, seed, threshold, drop_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_ROW: tl.constexpr, DROPOUT: tl.constexpr, FAST_TANH: tl.constexpr,
    EVEN_D: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    if HAS_RIGHT:  # causal: the last query blocks see the most keys; launch them first (less tail)
        pid_m = tl.num_programs(0) - 1 - pid_m
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
    lse2 = tl.load(LSE2 + row_ptr, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + row_ptr, mask=row_ok, other=0.0)
    k_base = K + b * skb + hk * skh + k_start * skn
    v_base = V + b * svb + hk * svh + k_start * svn
    mask_rows = Mask + b * smb + h * smh
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Slopes + h).to(tl.float32)
    qk_scale, cap_in, cap_out, slope2 = folded_constants(scale, softcap, slope)
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
        dq, lo, a, q, do, lse2, delta, k_base, v_base, mask_rows, skn, skd, svn, svd, smm, smn,
        offs_m, offs_n0, offs_d, offs_dv, q_len, kv_len, head_dim, v_head_dim, offset,
        qk_scale, cap_in, cap_out, slope2, left, right, seed_u, bh_u, threshold_u, drop_scale,
        BLOCK_N, HAS_SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT, MASK_KIND, MASK_ROW, DROPOUT, FAST_TANH,
        EVEN_D, DOT_PRECISION, True,
    )  # fmt: skip
    dq = _dq_steps(
        dq, a, z, q, do, lse2, delta, k_base, v_base, mask_rows, skn, skd, svn, svd, smm, smn,
        offs_m, offs_n0, offs_d, offs_dv, q_len, kv_len, head_dim, v_head_dim, offset,
        qk_scale, cap_in, cap_out, slope2, left, right, seed_u, bh_u, threshold_u, drop_scale,
        BLOCK_N, HAS_SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT, MASK_KIND, MASK_ROW, DROPOUT, FAST_TANH,
        EVEN_D, DOT_PRECISION, False,
    )  # fmt: skip
    dq = _dq_steps(
        dq, z, hi, q, do, lse2, delta, k_base, v_base, mask_rows, skn, skd, svn, svd, smm, smn,
        offs_m, offs_n0, offs_d, offs_dv, q_len, kv_len, head_dim, v_head_dim, offset,
        qk_scale, cap_in, cap_out, slope2, left, right, seed_u, bh_u, threshold_u, drop_scale,
        BLOCK_N, HAS_SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT, MASK_KIND, MASK_ROW, DROPOUT, FAST_TANH,
        EVEN_D, DOT_PRECISION, True,
    )  # fmt: skip

    dq = dq * scale
    tl.store(
        DQ + b * sdqb + h * sdqh + (q_start + offs_m)[:, None] * sdqm + offs_d[None, :] * sdqd,
        dq.to(DQ.dtype.element_ty),
        mask=row_ok[:, None] & (offs_d[None, :] < head_dim),
    )


# --------------------------------------------------------------------- launches
# (BLOCK_M, BLOCK_N, warps, stages), pruned by the offline compiler report (common.autotune_configs):
# dK/dV holds BLOCK_N keys and values and streams BLOCK_M queries; dQ is shaped like the forward.
DKDV_TILES = [(32, 128, 8, 2), (32, 128, 8, 3), (64, 64, 8, 2), (64, 64, 8, 3), (32, 64, 8, 3)]
DQ_TILES = [(128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4)]
_KEY = ["len_bucket", "BLOCK_D", "BLOCK_DV", "HAS_SOFTCAP", "HAS_ALIBI", "HAS_LEFT", "HAS_RIGHT",
        "MASK_KIND", "MASK_ROW", "DROPOUT", "VARLEN", "DOT_PRECISION"]  # fmt: skip
PREP_ROWS = 64  # query rows per program of `_prep_kernel` (a streaming reduction: no tuning needed)
_dkdv_tuned = triton.autotune(
    autotune_configs(DKDV_TILES), key=_KEY,
    prune_configs_by={"early_config_prune": shared_memory_pruner("BLOCK_N", "BLOCK_M", once_pair=True)},
)(_dkdv_kernel)  # fmt: skip
_dq_tuned = triton.autotune(
    autotune_configs(DQ_TILES), key=_KEY,
    prune_configs_by={"early_config_prune": shared_memory_pruner("BLOCK_M", "BLOCK_N", once_pair=True)},
)(_dq_kernel)  # fmt: skip


def backward_calls(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    spec: AttentionSpec, *, dlse: torch.Tensor | None = None, **packed,
) -> tuple[tuple[tuple, dict], tuple, tuple, dict, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:  # fmt: skip
    """The backward kernels' arguments, without launching them.

    Arguments as `launch_backward`'s (``packed``: its ``cu_seqlens_q``, ``cu_seqlens_k``).
    Returns ``((prep_args, prep_meta), dkdv_args, dq_args, meta, (dq, dk, dv))``: the arguments
    and flags of `_prep_kernel` (``delta`` and base-2 ``lse``), the positional arguments of
    `_dkdv_kernel` and `_dq_kernel`, their ``constexpr`` flags (tiles excluded) and the
    allocated gradients.
    """
    cu_seqlens_q, cu_seqlens_k = packed.get("cu_seqlens_q"), packed.get("cu_seqlens_k")
    varlen = cu_seqlens_q is not None
    lse = lse.contiguous()
    lse_strides = (0, lse.stride(0), lse.stride(1)) if varlen else lse.stride()
    cu_q = cu_seqlens_q if varlen else lse
    cu_k = cu_seqlens_k if varlen else lse
    delta, lse2 = torch.empty_like(lse), torch.empty_like(lse)  # lse's layout: (B, Hq, Lq) or (Hq, total_q)
    prep_args = (out, dout, lse, dlse.float().contiguous() if dlse is not None else lse, delta, lse2, cu_q,
                 *bhld_strides(out, varlen), *bhld_strides(dout, varlen), *lse_strides,
                 spec.q_heads, spec.q_len, spec.v_head_dim)  # fmt: skip
    prep_meta = dict(BLOCK_DV=head_block(spec.v_head_dim), HAS_DLSE=dlse is not None, VARLEN=varlen)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    mask, mstrides, _ = mask_args(spec)
    mask = mask if mask is not None else lse
    slopes = spec.alibi_slopes if spec.alibi_slopes is not None else lse
    seed, threshold, drop_scale = dropout_args(spec)
    scale, softcap, left, right = scalar_args(spec)
    common = (*bhld_strides(q, varlen), *bhld_strides(k, varlen), *bhld_strides(v, varlen),
              *bhld_strides(dout, varlen), *lse_strides)  # fmt: skip
    tail = (scale, softcap, left, right, seed, threshold, drop_scale)
    meta = dict(BLOCK_D=head_block(spec.head_dim), BLOCK_DV=head_block(spec.v_head_dim), VARLEN=varlen,
                DOT_PRECISION=dot_precision(q.dtype), EVEN_D=even_dims(spec), **flags(spec, q.dtype))  # fmt: skip
    dims = (spec.q_len, spec.kv_len, length_bucket(spec), spec.head_dim, spec.v_head_dim)
    dkdv_args = (q, k, v, dout, lse2, delta, dk, dv, slopes, mask, cu_q, cu_k, *common,
                 *bhld_strides(dk, varlen), *bhld_strides(dv, varlen), *mstrides,
                 spec.q_heads, spec.kv_heads, spec.group, *dims, *tail)  # fmt: skip
    dq_args = (q, k, v, dout, lse2, delta, dq, slopes, mask, cu_q, cu_k, *common, *bhld_strides(dq, varlen),
               *mstrides, spec.q_heads, spec.group, *dims, *tail)  # fmt: skip
    return (prep_args, prep_meta), dkdv_args, dq_args, meta, (dq, dk, dv)


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
    (prep_args, prep_meta), dkdv_args, dq_args, meta, (dq, dk, dv) = backward_calls(
        dout, q, k, v, out, lse, spec, dlse=dlse, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k
    )
    rows = max_seqlen_q if varlen else spec.q_len
    _prep_kernel[(triton.cdiv(rows, PREP_ROWS), spec.batch * spec.q_heads)](*prep_args, BLOCK_M=PREP_ROWS, **prep_meta)
    cols = max_seqlen_k if varlen else spec.kv_len
    if blocks is None:
        _dkdv_tuned[lambda c: (triton.cdiv(cols, c["BLOCK_N"]), spec.batch * spec.kv_heads)](*dkdv_args, **meta)
        _dq_tuned[lambda c: (triton.cdiv(rows, c["BLOCK_M"]), spec.batch * spec.q_heads)](*dq_args, **meta)
    else:
        bm, bn = blocks
        grid = (triton.cdiv(cols, bn), spec.batch * spec.kv_heads)
        _dkdv_kernel[grid](*dkdv_args, BLOCK_M=bm, BLOCK_N=bn, **meta)
        _dq_kernel[(triton.cdiv(rows, bm), spec.batch * spec.q_heads)](*dq_args, BLOCK_M=bm, BLOCK_N=bn, **meta)
    return dq, dk, dv
