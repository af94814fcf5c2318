"""Triton statistics pass: what `attnkit.attention_stats` reports, without the ``Lq x Lk`` weights.

A second pass after the forward (which supplies ``lse``): each program owns ``BLOCK_M``
queries of one (batch, head), rebuilds each visible tile's exact weights
``p = exp(s - lse)`` (before dropout) with the forward's `common.score_tile`, and folds
them into per-row and per-key statistics in registers:

* ``entropy_i = -sum_j p_ij log p_ij = -sum_j p_ij (s_ij - lse_i)`` (nats; 0 for an empty row);
* ``mean_distance_i = sum_j p_ij |i + Lk - Lq - j|``;
* ``received_j = sum_i p_ij`` (one atomic add of a tile's column sums per tile);
* ``topk``: the ``k`` largest weights of each row, merged tile by tile (rounds of argmax,
  each replacing the smallest kept entry when beaten; only as many rounds as the tile has
  candidates above some row's smallest kept weight, at most ``k``, so once the lists are
  full most tiles need none); a row whose visited
  tiles hold fewer than ``k`` keys completes its list with zero weights of skipped keys;
* ``pooled``: the sum of ``p`` over ``P_q x P_k`` blocks of queries and keys. Columns are
  pooled in the kernel by a matmul with a 0/1 bin matrix (``p @ C``, ``C (BLOCK_N, P_k)``,
  on tensor cores at about fp32 accuracy, see `pool_precision`), leaving ``(Lq, P_k)`` per
  head; the rows are then summed into their ``P_q`` bins.

Bins: row ``r`` of ``P`` bins covers ``[floor(r L / P), floor((r + 1) L / P))``, so index
``i`` falls in bin ``ceil((i + 1) P / L) - 1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnkit.kernels.stats import segment_of
from attnkit.kernels.triton.common import (
    INTERPRETED,
    LN2,
    LOG2E,
    dot,
    dot_precision,
    flags,
    folded_constants,
    head_block,
    key_range,
    mask_args,
    scalar_args,
    score_tile,
)
from attnkit.kernels.triton.forward import launch_forward
from attnkit.spec import AttentionSpec


@triton.jit
def _stats_kernel(
    Q, K, LSE, Slopes, Mask, KSeg,
    ENT, DIST, RECV, TOPW, TOPI, ROWPOOL,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd,
    smb, smh, smm, smn,
    n_heads, group, q_len, kv_len, head_dim, pool_k,
    scale, softcap, left, right,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    TOPK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, DOT_PRECISION: tl.constexpr,
    POOL_PRECISION: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_ROW: tl.constexpr, DROPOUT: tl.constexpr, FAST_TANH: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    hk = h // group
    i0 = pid_m * BLOCK_M
    offset = kv_len - q_len
    offs_m = i0 + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_p = tl.arange(0, BLOCK_P)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = offs_m < q_len
    q = tl.load(
        Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
        mask=row_ok[:, None] & (offs_d[None, :] < head_dim),
        other=0.0,
    )
    lse = tl.load(LSE + bh * q_len + offs_m, mask=row_ok, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)  # base 2; empty rows: every p is 0
    k_base = K + b * skb + hk * skh
    mask_rows = Mask + b * smb + h * smh
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Slopes + h).to(tl.float32)
    qk_scale, cap_in, cap_out, slope2 = folded_constants(scale, softcap, slope)

    plogp = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum_j p (s - lse) = -entropy
    dist = tl.zeros([BLOCK_M], dtype=tl.float32)
    pooled = tl.zeros([BLOCK_M, BLOCK_P], dtype=tl.float32)  # columns already binned
    # Running top-k: real slots start below any weight (-1); padding slots at +inf are never the minimum.
    top_w = tl.where(offs_k[None, :] < TOPK, -1.0, float("inf")) + tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    top_i = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.int32)

    i1 = tl.minimum(i0 + BLOCK_M, q_len)
    lo, hi = key_range(i0, i1, offset, kv_len, left, right, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    for j0 in range(lo, hi, BLOCK_N):
        offs_n = j0 + offs_n0
        col_ok = offs_n < kv_len
        k = tl.load(
            k_base + offs_n[None, :] * skn + offs_d[:, None] * skd,
            mask=col_ok[None, :] & (offs_d[:, None] < head_dim),
            other=0.0,
        )
        qk = dot(q, k, DOT_PRECISION)
        s2, _ = score_tile(
            qk, offs_m[:, None], offs_n[None, :], q_len, kv_len, offset, qk_scale, cap_in, cap_out, slope2,
            left, right, mask_rows, smm, smn, HAS_SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT, MASK_KIND,
            True, MASK_ROW, FAST_TANH,
        )  # fmt: skip
        p = tl.exp2(s2 - lse2[:, None])  # (BLOCK_M, BLOCK_N) exact weights; 0 where masked
        p = tl.where(row_ok[:, None], p, 0.0)
        plogp += tl.sum(p * tl.where(p > 0.0, s2 - lse2[:, None], 0.0), 1)  # base 2; to nats at the end
        dist += tl.sum(p * tl.abs((offs_m + offset)[:, None] - offs_n[None, :]).to(tl.float32), 1)
        tl.atomic_add(RECV + bh * kv_len + offs_n, tl.sum(p, 0), mask=col_ok)
        col_bin = tl.load(KSeg + offs_n, mask=col_ok, other=-1)  # (BLOCK_N,) key segment of each column
        onehot = (col_bin[:, None] == offs_p[None, :]).to(tl.float32)  # (BLOCK_N, BLOCK_P)
        pooled += tl.dot(p, onehot, input_precision=POOL_PRECISION)
        if TOPK > 0:
            cand = tl.where(col_ok[None, :], p, -2.0)  # padding columns never enter
            # Only a candidate above a row's smallest kept weight can enter its list, and they enter
            # largest first (the smallest kept weight only grows): as many rounds as the row with the
            # most such candidates needs, at most TOPK; none on most tiles once the lists are full.
            entering = tl.sum((cand > tl.min(top_w, 1)[:, None]).to(tl.int32), 1)  # (BLOCK_M,)
            rounds = tl.minimum(tl.max(entering, 0), TOPK)
            for _ in range(0, rounds):
                best = tl.max(cand, 1)
                best_j = tl.argmax(cand, 1)
                worst = tl.min(top_w, 1)
                worst_slot = tl.argmin(top_w, 1)
                replace = (offs_k[None, :] == worst_slot[:, None]) & (best > worst)[:, None]
                top_w = tl.where(replace, best[:, None], top_w)
                top_i = tl.where(replace, (j0 + best_j)[:, None], top_i)
                cand = tl.where(offs_n0[None, :] == best_j[:, None], -2.0, cand)

    if TOPK > 0:
        # Rows that saw fewer than TOPK keys in the visited tiles: the rest of their top-k are
        # zero weights of skipped keys, [0, lo) then [end, Lk) (always enough of them: TOPK <= Lk).
        end = tl.where(hi > lo, lo + tl.cdiv(hi - lo, BLOCK_N) * BLOCK_N, lo)
        unfilled = (top_w < 0.0) & (offs_k[None, :] < TOPK)
        rank = tl.cumsum(unfilled.to(tl.int32), 1) - 1  # position among the unfilled slots
        skipped = tl.where(rank < lo, rank, end + rank - lo)
        top_i = tl.where(unfilled, skipped, top_i)
        top_w = tl.where(unfilled, 0.0, top_w)

    tl.store(ENT + bh * q_len + offs_m, -plogp * LN2, mask=row_ok)
    tl.store(DIST + bh * q_len + offs_m, dist, mask=row_ok)
    tl.store(
        ROWPOOL + (bh * q_len + offs_m)[:, None] * pool_k + offs_p[None, :],
        pooled,
        mask=row_ok[:, None] & (offs_p[None, :] < pool_k),
    )
    if TOPK > 0:
        top_ptr = (bh * q_len + offs_m)[:, None] * TOPK + offs_k[None, :]
        top_ok = row_ok[:, None] & (offs_k[None, :] < TOPK)
        tl.store(TOPW + top_ptr, top_w, mask=top_ok)
        tl.store(TOPI + top_ptr, top_i, mask=top_ok)


def pool_precision(device: torch.device) -> str:
    """Precision of the fp32 pooling matmul ``p @ C``.

    ``tf32x3`` (three TF32 products, about fp32 accuracy, on tensor cores) on NVIDIA GPUs from
    Ampere on; exact ``ieee`` elsewhere and under the interpreter.
    """
    if INTERPRETED or device.type != "cuda" or torch.version.cuda is None:
        return "ieee"
    return "tf32x3" if torch.cuda.get_device_capability(device)[0] >= 8 else "ieee"


# The pooled accumulator is (BLOCK_M, BLOCK_P) registers per program: more key segments than this
# would spill (pool the keys in several passes, or on the torch kernel).
MAX_POOL_SEGMENTS = 256


def stats_call(
    q: torch.Tensor,
    k: torch.Tensor,
    spec: AttentionSpec,
    lse: torch.Tensor | None = None,
    key_segments: torch.Tensor | None = None,
    outputs: tuple[torch.Tensor, ...] | None = None,
    *,
    topk: int,
    pool_k: int,
) -> tuple[tuple, dict]:
    """`_stats_kernel`'s positional arguments and ``constexpr`` flags (tiles excluded), without launching.

    ``lse (B, Hq, Lq)``, ``key_segments (Lk,)`` int32 and the six outputs of `stats_forward`
    default to empty tensors (the offline compiler report binds them on ``meta`` tensors).
    """
    B, Hq, Lq, Lk = spec.batch, spec.q_heads, spec.q_len, spec.kv_len
    empty = lambda *shape, dtype=torch.float32: torch.empty(*shape, dtype=dtype, device=q.device)
    lse = lse if lse is not None else empty(B, Hq, Lq)
    key_segments = key_segments if key_segments is not None else empty(Lk, dtype=torch.int32)
    if outputs is None:
        outputs = (empty(B, Hq, Lq), empty(B, Hq, Lq), empty(B, Hq, Lk), empty(B, Hq, Lq, topk),
                   empty(B, Hq, Lq, topk, dtype=torch.int32), empty(B, Hq, Lq, pool_k))  # fmt: skip
    mask, mstrides, _ = mask_args(spec)
    scale, softcap, left, right = scalar_args(spec)
    meta = flags(spec, q.dtype)
    meta["DROPOUT"] = False  # statistics describe the weights before dropout
    args = (
        q, k, lse, spec.alibi_slopes if spec.alibi_slopes is not None else lse, mask if mask is not None else lse,
        key_segments, *outputs,
        *q.stride(), *k.stride(), *mstrides,
        Hq, spec.group, Lq, Lk, spec.head_dim, pool_k,
        scale, softcap, left, right,
    )  # fmt: skip
    meta.update(
        BLOCK_D=head_block(spec.head_dim),
        TOPK=topk,
        BLOCK_K=max(2, triton.next_power_of_2(max(topk, 1))),
        BLOCK_P=head_block(pool_k),
        DOT_PRECISION=dot_precision(q.dtype),
        POOL_PRECISION=pool_precision(q.device),
    )
    return args, meta


def stats_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: AttentionSpec,
    lse: torch.Tensor | None,
    *,
    topk: int,
    pool: tuple[torch.Tensor, torch.Tensor],
    blocks: tuple[int, int] | None = None,
) -> dict[str, torch.Tensor]:
    """The statistics of the attention weights (before dropout), one extra pass over the keys.

    Args:
        q: ``(B, Hq, Lq, D)``; k: ``(B, Hk, Lk, D)``; v: ``(B, Hk, Lk, Dv)`` (only for the forward
            when ``lse`` is None).
        lse: ``(B, Hq, Lq)`` from the forward, or None to run the forward kernel first.
        topk: weights kept per row (``min(topk, Lk)``; 0 for none).
        pool: ``(query_edges (P_q + 1,), key_edges (P_k + 1,))`` segment edges (`attnkit.stats.pool_segments`);
            at most `MAX_POOL_SEGMENTS` key segments.
        blocks: ``(BLOCK_M, BLOCK_N)``; default (64, 64).

    Returns:
        fp32 ``entropy (B, Hq, Lq)``, ``mean_distance (B, Hq, Lq)``, ``received (B, Hq, Lk)``,
        ``topk_index (B, Hq, Lq, topk)`` int64 and ``topk_weight (B, Hq, Lq, topk)`` (descending),
        ``pooled (B, Hq, P_q, P_k)`` (sums of weights).
    """
    B, Hq, Lq, Lk = spec.batch, spec.q_heads, spec.q_len, spec.kv_len
    if lse is None:
        _, lse = launch_forward(q, k, v, spec, blocks=blocks)
    lse = lse.to(torch.float32).contiguous()  # (B, Hq, Lq)
    kk = min(int(topk), Lk)
    q_seg, k_seg = (segment_of(e.to(q.device)) for e in pool)  # (Lq,), (Lk,) int64
    pq, pk = pool[0].numel() - 1, pool[1].numel() - 1
    if pk > MAX_POOL_SEGMENTS:
        raise ValueError(
            f"attention_stats: the Triton statistics kernel pools at most {MAX_POOL_SEGMENTS} key segments, got {pk}"
        )
    dev = q.device
    entropy = torch.empty(B, Hq, Lq, dtype=torch.float32, device=dev)
    distance = torch.empty(B, Hq, Lq, dtype=torch.float32, device=dev)
    received = torch.zeros(B, Hq, Lk, dtype=torch.float32, device=dev)
    top_w = torch.empty(B, Hq, Lq, kk, dtype=torch.float32, device=dev)
    top_i = torch.empty(B, Hq, Lq, kk, dtype=torch.int32, device=dev)
    row_pooled = torch.empty(B, Hq, Lq, pk, dtype=torch.float32, device=dev)  # keys binned, queries not yet
    bm, bn = blocks if blocks is not None else (64, 64)
    args, meta = stats_call(
        q,
        k,
        spec,
        lse,
        k_seg.to(torch.int32),
        (entropy, distance, received, top_w, top_i, row_pooled),
        topk=kk,
        pool_k=pk,
    )
    _stats_kernel[(triton.cdiv(Lq, bm), B * Hq)](*args, BLOCK_M=bm, BLOCK_N=bn, **meta)
    pooled = torch.zeros(B, Hq, pq, pk, dtype=torch.float32, device=dev)
    pooled.index_add_(2, q_seg, row_pooled)  # (B, Hq, P_q, P_k): rows summed into their segments
    top_w, order = torch.sort(top_w, dim=-1, descending=True, stable=True)
    top_i = torch.gather(top_i.long(), -1, order)
    return {
        "entropy": entropy,
        "mean_distance": distance,
        "received": received,
        "topk_index": top_i,
        "topk_weight": top_w,
        "pooled": pooled,
    }
