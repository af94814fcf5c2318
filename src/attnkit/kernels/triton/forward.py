"""Triton forward kernel: tiled online softmax (FlashAttention-2, Dao 2023, Algorithm 1).

One program owns ``BLOCK_M`` queries of one (batch, query head) and walks the key
tiles that causal/window leave visible, keeping for each row the running maximum
``m_i``, the running sum ``l_i`` and the unnormalised output ``acc`` in fp32:

    s     = score_tile(q k^T)                     (scale, softcap, biases, masks)
    m_new = max(m_i, rowmax(s))
    alpha = exp(m_i - m_new)                       (rescales what came before)
    p     = exp(s - m_new)
    l_i   = alpha l_i + rowsum(p)
    acc   = alpha acc + dropout(p) v
    out   = acc / l_i,   lse = m_i + log(l_i)

Scores are kept in base 2 (``exp2``) with the constants folded once per program, as
Triton's fused-attention tutorial does: a plain tile open to every row costs one FMA per
score, ``qk * (scale log2 e) - m``, with the row maximum taken on the raw ``q k^T``; its
loads carry no masks. Rows with no allowed key end with ``l_i = 0``: they
write zeros and ``lse = -inf``. The same kernel serves packed variable-length
batches (``VARLEN``): sequence ``b`` occupies rows ``cu_seqlens[b] .. cu_seqlens[b+1]``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnkit.kernels.triton.common import (
    LN2,
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
    scalar_args,
    score_tile,
    shared_memory_pruner,
)
from attnkit.spec import AttentionSpec


@triton.jit
def seq_bounds(Cu, b, dense_len, VARLEN: tl.constexpr):
    """``(start, length)`` of sequence ``b``: from ``cu_seqlens`` when packed, else ``(0, L)``."""
    if VARLEN:
        start = tl.load(Cu + b)
        length = tl.load(Cu + b + 1) - start
    else:
        start = 0
        length = dense_len
    return start, length


@triton.jit
def _fwd_steps(
    acc, l_i, m_i, start, stop,
    q, k_base, v_base, mask_rows, skn, skd, svn, svd, smm, smn, offs_m, offs_n0, offs_d, offs_dv,
    q_len, kv_len, head_dim, v_head_dim, offset, qk_scale, cap_in, cap_out, slope2, left, right,
    seed_u, bh_u, threshold_u, drop_scale,
    BLOCK_N: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, MASK_KIND: tl.constexpr, MASK_ROW: tl.constexpr, DROPOUT: tl.constexpr,
    FAST_TANH: tl.constexpr, RAW_MAX: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    STRUCTURE: tl.constexpr,
):  # fmt: skip
    """The online-softmax update over key tiles ``[start, stop)``.

    ``STRUCTURE``: the tiles are cut by causal/window or the end of the keys (masked
    elementwise, loads bounded by ``Lk``); otherwise every tile lies inside ``[0, Lk)`` and
    is open to every row, so its loads carry no key mask (and no head-dim mask when ``EVEN_D``).
    """
    for j0 in range(start, stop, BLOCK_N):
        offs_n = j0 + offs_n0
        k_ptrs = k_base + offs_n[None, :] * skn + offs_d[:, None] * skd  # (BLOCK_D, BLOCK_N)
        v_ptrs = v_base + offs_n[:, None] * svn + offs_dv[None, :] * svd  # (BLOCK_N, BLOCK_DV)
        col_ok = offs_n < kv_len
        k = load_tile(k_ptrs, col_ok[None, :], offs_d[:, None] < head_dim, STRUCTURE, EVEN_D)
        qk = dot(q, k, DOT_PRECISION)  # (BLOCK_M, BLOCK_N) raw q k^T
        if RAW_MAX and not STRUCTURE:
            # Step 4, plain open tile: every score is finite, scale > 0, so the row maximum is taken
            # on the raw q k^T and each score costs one FMA, qk * (scale log2 e) - m (the tutorial's form).
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.exp2(tl.fma(qk, qk_scale, -m_new[:, None]))
            alpha = tl.exp2(m_i - m_new)
        else:
            s, _ = score_tile(
                qk, offs_m[:, None], offs_n[None, :], q_len, kv_len, offset, qk_scale, cap_in, cap_out, slope2,
                left, right, mask_rows, smm, smn,
                HAS_SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT, MASK_KIND, STRUCTURE, MASK_ROW, FAST_TANH,
            )  # fmt: skip
            # Step 4: online softmax update in base 2.
            m_new = tl.maximum(m_i, tl.max(s, 1))
            if STRUCTURE or MASK_KIND != 0:  # a row still empty keeps m = -inf and uses 0 as its shift
                m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            else:  # open tile, no mask: every score is finite
                m_new_safe = m_new
            alpha = tl.exp2(m_i - m_new_safe)
            p = tl.exp2(s - m_new_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            keep = keep_tile(seed_u, bh_u, offs_m, offs_n, threshold_u)
            p = tl.where(keep, p * drop_scale, 0.0)
        v = load_tile(v_ptrs, col_ok[:, None], offs_dv[None, :] < v_head_dim, STRUCTURE, EVEN_D)
        acc = dot_acc(p.to(v.dtype), v, acc * alpha[:, None], DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _fwd_kernel(
    Q, K, V, O, LSE, Slopes, Mask, CuQ, CuK,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod, slb, slh, slm,
    smb, smh, smm, smn,
    n_heads, group, q_len_dense, kv_len_dense, len_bucket, head_dim, v_head_dim,
    scale, softcap, left, right, seed, threshold, drop_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_ROW: tl.constexpr, DROPOUT: tl.constexpr, FAST_TANH: tl.constexpr,
    RAW_MAX: tl.constexpr, EVEN_D: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    if HAS_RIGHT:  # causal: the last query blocks see the most keys; launch them first (less tail)
        pid_m = tl.num_programs(0) - 1 - pid_m
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    hk = h // group  # GQA: the key/value head this query head reads
    q_start, q_len = seq_bounds(CuQ, b, q_len_dense, VARLEN)
    k_start, kv_len = seq_bounds(CuK, b, kv_len_dense, VARLEN)
    i0 = pid_m * BLOCK_M
    if i0 >= q_len:  # a short sequence of a packed batch: nothing to do
        return
    offset = kv_len - q_len  # bottom-right alignment
    offs_m = i0 + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < q_len

    # Step 1: load the query block once (padded head dims read as zeros).
    q_ptrs = Q + b * sqb + h * sqh + (q_start + offs_m)[:, None] * sqm + offs_d[None, :] * sqd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)
    k_base = K + b * skb + hk * skh + k_start * skn
    v_base = V + b * svb + hk * svh + k_start * svn
    mask_rows = Mask + b * smb + h * smh
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Slopes + h).to(tl.float32)
    qk_scale, cap_in, cap_out, slope2 = folded_constants(scale, softcap, slope)
    seed_u, bh_u, threshold_u = 0, 0, 0  # read only when DROPOUT
    if DROPOUT:
        if VARLEN:  # per-sequence seed, head index h (see common.VARLEN_SEED_STEP)
            seed_u = seed.to(tl.uint32) + b.to(tl.uint32) * SEED_STEP
            bh_u = h.to(tl.uint32)
        else:
            seed_u = seed.to(tl.uint32)
            bh_u = bh.to(tl.uint32)
        threshold_u = threshold.to(tl.uint32)

    # Step 2: running statistics in base 2.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    # Step 3: visit only key tiles that causal/window leave open for some row of the block;
    # tiles open to every row skip the elementwise structure mask and the load masks.
    i1 = tl.minimum(i0 + BLOCK_M, q_len)
    lo, hi = key_range(i0, i1, offset, kv_len, left, right, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    a, z = open_key_tiles(i0, i1, lo, hi, offset, kv_len, left, right, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    acc, l_i, m_i = _fwd_steps(
        acc, l_i, m_i, lo, a,
        q, k_base, v_base, mask_rows, skn, skd, svn, svd, smm, smn, offs_m, offs_n0, offs_d, offs_dv,
        q_len, kv_len, head_dim, v_head_dim, offset, qk_scale, cap_in, cap_out, slope2, left, right,
        seed_u, bh_u, threshold_u, drop_scale,
        BLOCK_N, HAS_SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT, MASK_KIND, MASK_ROW, DROPOUT, FAST_TANH, RAW_MAX,
        EVEN_D, DOT_PRECISION, True,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_steps(
        acc, l_i, m_i, a, z,
        q, k_base, v_base, mask_rows, skn, skd, svn, svd, smm, smn, offs_m, offs_n0, offs_d, offs_dv,
        q_len, kv_len, head_dim, v_head_dim, offset, qk_scale, cap_in, cap_out, slope2, left, right,
        seed_u, bh_u, threshold_u, drop_scale,
        BLOCK_N, HAS_SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT, MASK_KIND, MASK_ROW, DROPOUT, FAST_TANH, RAW_MAX,
        EVEN_D, DOT_PRECISION, False,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_steps(
        acc, l_i, m_i, z, hi,
        q, k_base, v_base, mask_rows, skn, skd, svn, svd, smm, smn, offs_m, offs_n0, offs_d, offs_dv,
        q_len, kv_len, head_dim, v_head_dim, offset, qk_scale, cap_in, cap_out, slope2, left, right,
        seed_u, bh_u, threshold_u, drop_scale,
        BLOCK_N, HAS_SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT, MASK_KIND, MASK_ROW, DROPOUT, FAST_TANH, RAW_MAX,
        EVEN_D, DOT_PRECISION, True,
    )  # fmt: skip

    # Step 5: normalise; empty rows give zeros and lse = -inf.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)
    o_ptrs = O + b * sob + h * soh + (q_start + offs_m)[:, None] * som + offs_dv[None, :] * sod
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < v_head_dim))
    tl.store(LSE + b * slb + h * slh + (q_start + offs_m) * slm, lse, mask=row_ok)


# --------------------------------------------------------------------- launches
# Autotuned on a GPU (block sizes, warps, pipeline stages); explicit blocks (tests under
# the interpreter, where autotuning would run every config) bypass it.
# (BLOCK_M, BLOCK_N, warps, stages), from the tutorial's space pruned by the offline compiler report
# (common.autotune_configs); the smallest tile last (the fallback when shared memory prunes the rest).
FWD_TILES = [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (128, 32, 8, 4), (64, 128, 8, 3), (64, 64, 8, 4),
             (64, 32, 4, 5)]  # fmt: skip
_fwd_tuned = triton.autotune(
    autotune_configs(FWD_TILES),
    key=["len_bucket", "BLOCK_D", "BLOCK_DV", "HAS_SOFTCAP", "HAS_ALIBI", "HAS_LEFT", "HAS_RIGHT",
         "MASK_KIND", "MASK_ROW", "DROPOUT", "VARLEN", "DOT_PRECISION"],
    prune_configs_by={"early_config_prune": shared_memory_pruner("BLOCK_M", "BLOCK_N", once_pair=False)},
)(_fwd_kernel)  # fmt: skip


def length_bucket(spec: AttentionSpec) -> int:
    """The autotune key for lengths: the next power of two of the longest one.

    Tuning once per bucket, not per length, keeps packed batches (whose longest sequence
    changes every step) from re-tuning on every call. Not read by the kernels.
    """
    return triton.next_power_of_2(max(spec.q_len, spec.kv_len, 1))


def forward_call(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, **packed
) -> tuple[tuple, dict, int, torch.Tensor, torch.Tensor]:
    """The forward kernel's arguments for a request, without launching it.

    Arguments as `launch_forward`'s (``packed``: its ``cu_seqlens_q``, ``cu_seqlens_k``, ``max_seqlen_q``).
    Returns ``(args, meta, rows, out, lse)``: the positional arguments, the ``constexpr`` flags
    (tiles excluded), the number of query rows the grid covers and the allocated outputs. Also
    what the offline compiler report binds (on ``meta`` tensors) to get a real launch's specialisation.
    """
    cu_seqlens_q, cu_seqlens_k = packed.get("cu_seqlens_q"), packed.get("cu_seqlens_k")
    varlen = cu_seqlens_q is not None
    Hq, D, Dv = spec.q_heads, spec.head_dim, spec.v_head_dim
    if varlen:
        total_q = q.shape[0]
        out = q.new_empty(total_q, Hq, Dv)  # (total_q, Hq, Dv)
        lse = torch.empty(Hq, total_q, dtype=torch.float32, device=q.device)  # (Hq, total_q)
        lse_strides = (0, lse.stride(0), lse.stride(1))
        rows = packed["max_seqlen_q"]
        cu_q, cu_k = cu_seqlens_q, cu_seqlens_k
    else:
        out = q.new_empty(spec.batch, Hq, spec.q_len, Dv)  # (B, Hq, Lq, Dv)
        lse = torch.empty(spec.batch, Hq, spec.q_len, dtype=torch.float32, device=q.device)  # (B, Hq, Lq)
        lse_strides = lse.stride()
        rows = spec.q_len
        cu_q = cu_k = lse  # never read when not VARLEN
    mask, mstrides, _ = mask_args(spec)
    slopes = spec.alibi_slopes if spec.alibi_slopes is not None else lse
    seed, threshold, drop_scale = dropout_args(spec)
    scale, softcap, left, right = scalar_args(spec)
    args = (
        q, k, v, out, lse, slopes, mask if mask is not None else lse, cu_q, cu_k,
        *bhld_strides(q, varlen), *bhld_strides(k, varlen), *bhld_strides(v, varlen),
        *bhld_strides(out, varlen), *lse_strides, *mstrides,
        Hq, spec.group, spec.q_len, spec.kv_len, length_bucket(spec), D, Dv,
        scale, softcap, left, right, seed, threshold, drop_scale,
    )  # fmt: skip
    meta = dict(BLOCK_D=head_block(D), BLOCK_DV=head_block(Dv), VARLEN=varlen, DOT_PRECISION=dot_precision(q.dtype),
                EVEN_D=even_dims(spec), **flags(spec, q.dtype))  # fmt: skip
    # The plain path's row maximum on the raw q k^T needs a positive scale (max(c x) = c max(x)).
    plain = not (meta["HAS_SOFTCAP"] or meta["HAS_ALIBI"] or meta["MASK_KIND"])
    meta["RAW_MAX"] = plain and spec.scale > 0
    return args, meta, rows, out, lse


def launch_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: AttentionSpec,
    *,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    blocks: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the forward kernel.

    Dense: ``q (B, Hq, Lq, D)``, ``k (B, Hk, Lk, D)``, ``v (B, Hk, Lk, Dv)``; returns
    ``out (B, Hq, Lq, Dv)`` in ``q.dtype`` and ``lse (B, Hq, Lq)`` fp32.
    Packed (``cu_seqlens_*`` given, ``spec.batch`` = number of sequences): ``q (total_q, Hq, D)``,
    ``k (total_k, Hk, D)``, ``v (total_k, Hk, Dv)``; returns ``out (total_q, Hq, Dv)`` and
    ``lse (Hq, total_q)`` (FlashAttention's varlen layout).
    ``blocks = (BLOCK_M, BLOCK_N)`` fixes the tiles instead of autotuning.
    """
    args, meta, rows, out, lse = forward_call(
        q, k, v, spec, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q
    )
    Hq = spec.q_heads
    if blocks is None:
        grid = lambda cfg: (triton.cdiv(rows, cfg["BLOCK_M"]), spec.batch * Hq)
        _fwd_tuned[grid](*args, **meta)
    else:
        grid = (triton.cdiv(rows, blocks[0]), spec.batch * Hq)
        _fwd_kernel[grid](*args, BLOCK_M=blocks[0], BLOCK_N=blocks[1], **meta)
    return out, lse
