"""The statistics pass: exact per-query and per-key attention statistics, one tile at a time.

Given the log-sum-exp of every query row (from the normal forward pass), the exact
weight of any pair is ``p_ij = exp(s_ij - lse_i)``, so a second blockwise pass over
the scores can reduce the weights into statistics without ever holding an
``Lq x Lk`` matrix, the way FlashAttention's backward recomputes them (Dao et al.,
2022). Scores come from `AttentionSpec.scores`, so causal, window, ALiBi, softcap,
bool/float masks, GQA and ``Lq != Lk`` all mean exactly what they mean in
`attnkit.attention`.

Definitions (``i' = i + Lk - Lq`` is the aligned query position, see `attnkit.masks`):

* ``entropy[b, h, i] = -sum_j p_ij log p_ij`` in nats; 0 for a row with no allowed key.
* ``mean_distance[b, h, i] = sum_j p_ij |i' - j|``; 0 for a row with no allowed key.
* ``received[b, h, j] = sum_i p_ij``: the attention key ``j`` receives from all queries.
* ``topk_index, topk_weight (B, H, Lq, K)`` with ``K = min(topk, Lk)``: the ``K`` largest
  weights of each row, largest first, and their key indices. Rows with fewer than ``K``
  allowed keys (or none) are padded with weight 0; the index of a weight-0 entry is an
  unspecified valid key index (ties).
* ``pooled (B, H, P_q, P_k)`` with ``P_q = min(pool, Lq)``, ``P_k = min(pool, Lk)``:
  row ``r`` covers queries ``[floor(r Lq / P_q), floor((r + 1) Lq / P_q))``, column ``c``
  keys ``[floor(c Lk / P_k), floor((c + 1) Lk / P_k))``, and the cell holds the SUM of
  ``p_ij`` over that tile (so each full row-band sums to the number of its non-empty rows).
* Dropout never applies to statistics: they describe the weights before dropout.

Memory: ``O(B * H * ((Lq + Lk) * (D + K) + P_q * P_k))`` plus one tile of
``B * H * block_q * block_k`` scores. All outputs are in the accumulation dtype
(fp32, fp64 for fp64 inputs) except ``topk_index`` (int64).
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit.spec import AttentionSpec

BLOCK_Q = 256  # query rows per block
BLOCK_K = 1024  # keys per tile: a tile of scores is B * H * 256 * 1024 floats

_CLAMP = -1e30  # finite stand-in for -inf log-weights, so 0 * log p = 0 without NaN


def pool_edges(length: int, bins: int, device: torch.device) -> Tensor:
    """``(bins + 1,)`` int64 edges ``floor(r * length / bins)``: bin ``r`` is ``[edges[r], edges[r+1])``."""
    return torch.arange(bins + 1, device=device, dtype=torch.int64) * length // bins


def _bin_matrix(length: int, bins: int, lo: int, hi: int, dtype: torch.dtype, device) -> tuple[Tensor, int]:
    """One-hot ``(hi - lo, nb)`` matrix of positions ``[lo, hi)`` onto the pool bins they touch, and the first bin.

    With edges ``e_r = floor(r * length / bins)``, position ``x`` lies in bin
    ``r = floor(((x + 1) * bins - 1) / length)`` (the largest ``r`` with ``e_r <= x``).
    Summing through this matrix (a matmul) adds positions into bins exactly as a loop would.
    """
    pos = torch.arange(lo, hi, device=device, dtype=torch.int64)  # (n,)
    which = ((pos + 1) * bins - 1) // length  # (n,) bin of each position
    first, last = (lo + 1) * bins - 1, hi * bins - 1
    first, last = first // length, last // length
    onehot = which[:, None] == torch.arange(first, last + 1, device=device)[None, :]  # (n, nb)
    return onehot.to(dtype), first


def stats_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor | None,
    spec: AttentionSpec,
    lse: Tensor,
    *,
    topk: int,
    pool: int,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
) -> dict[str, Tensor]:
    """Exact attention statistics from the saved log-sum-exp, blockwise.

    Args:
        q: ``(B, Hq, Lq, D)``; k: ``(B, Hk, Lk, D)``; v: unused (the Triton kernel shares this
            signature), may be None.
        spec: the validated spec of the call (`attnkit.build_spec`); dropout is ignored.
        lse: ``(B, Hq, Lq)`` natural-log log-sum-exp of each row, ``-inf`` for a row with no key.
        topk: number of largest weights kept per query (``min(topk, Lk)``), >= 0.
        pool: side of the pooled map (``P_q = min(pool, Lq)``, ``P_k = min(pool, Lk)``), >= 1.

    Returns:
        dict with ``entropy (B, Hq, Lq)``, ``mean_distance (B, Hq, Lq)``, ``received (B, Hq, Lk)``,
        ``topk_index (B, Hq, Lq, K)`` int64, ``topk_weight (B, Hq, Lq, K)`` and
        ``pooled (B, Hq, P_q, P_k)``; definitions in the module docstring.
    """
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    acc, dev = spec.acc_dtype, q.device
    K = min(topk, Lk)
    Pq, Pk = min(pool, Lq), min(pool, Lk)
    # A row with no allowed key has lse = -inf; +inf makes every p = exp(s - lse) = 0 there.
    lse_safe = torch.where(torch.isneginf(lse), float("inf"), lse.to(acc))  # (B, Hq, Lq)

    entropy = torch.zeros(B, Hq, Lq, dtype=acc, device=dev)
    distance = torch.zeros(B, Hq, Lq, dtype=acc, device=dev)
    received = torch.zeros(B, Hq, Lk, dtype=acc, device=dev)
    pooled = torch.zeros(B, Hq, Pq, Pk, dtype=acc, device=dev)
    top_w = torch.full((B, Hq, Lq, K), float("-inf"), dtype=acc, device=dev)
    top_i = torch.zeros(B, Hq, Lq, K, dtype=torch.int64, device=dev)

    for i0 in range(0, Lq, block_q):
        i1 = min(i0 + block_q, Lq)
        q_blk = q[:, :, i0:i1]  # (B, Hq, bq, D)
        lse_blk = lse_safe[:, :, i0:i1, None]  # (B, Hq, bq, 1)
        pos_q = torch.arange(i0, i1, device=dev, dtype=acc) + spec.offset  # (bq,) aligned positions i'
        run_w, run_i = top_w[:, :, i0:i1], top_i[:, :, i0:i1]  # (B, Hq, bq, K) running top-k
        ent, dist_acc = entropy[:, :, i0:i1], distance[:, :, i0:i1]  # (B, Hq, bq) views, updated in place
        rows_onehot, r_first = _bin_matrix(Lq, Pq, i0, i1, acc, dev)  # (bq, nr)
        rows_onehot_t = rows_onehot.t()  # (nr, bq)
        lo, hi = spec.key_range(i0, i1)
        for j0 in range(lo, hi, block_k):
            j1 = min(j0 + block_k, hi)
            s, _ = spec.scores(q_blk, k[:, :, j0:j1], i0, j0)  # (B, Hq, bq, bk), -inf where masked
            t = s.sub_(lse_blk).clamp_(min=_CLAMP)  # log p_ij, in place over the scores
            p = torch.exp(t)  # (B, Hq, bq, bk) exact global weights
            # entropy: -sum_j p log p, as a contraction (no temporary of the tile's size)
            ent -= torch.einsum("bhqk,bhqk->bhq", p, t)
            pos_k = torch.arange(j0, j1, device=dev, dtype=acc)  # (bk,)
            dist = (pos_q[:, None] - pos_k[None, :]).abs_()  # (bq, bk) |i' - j|
            dist_acc += torch.einsum("bhqk,qk->bhq", p, dist)
            received[:, :, j0:j1] += p.sum(dim=-2)
            # pooled: rows into their bins first (few bins per block), then columns, by two
            # matmuls with one-hot matrices: exact sums, cheaper than a scatter.
            cols_onehot, c_first = _bin_matrix(Lk, Pk, j0, j1, acc, dev)  # (bk, nc)
            cell = torch.matmul(torch.matmul(rows_onehot_t, p), cols_onehot)  # (B, Hq, nr, nc)
            pooled[:, :, r_first : r_first + cell.shape[-2], c_first : c_first + cell.shape[-1]] += cell
            # top-k: the tile's best K per row merged into the running (bq, K) buffer
            if K > 0:
                kk = min(K, j1 - j0)
                w_t, i_t = torch.topk(p, kk, dim=-1)  # (B, Hq, bq, kk)
                w_all = torch.cat([run_w, w_t], dim=-1)  # (B, Hq, bq, K + kk)
                i_all = torch.cat([run_i, i_t + j0], dim=-1)
                run_w, pick = torch.topk(w_all, K, dim=-1)  # (B, Hq, bq, K)
                run_i = torch.gather(i_all, -1, pick)
        if K > 0:
            top_w[:, :, i0:i1] = run_w
            top_i[:, :, i0:i1] = run_i

    top_w = top_w.clamp_(min=0)  # slots never filled (fewer visited keys than K) hold weight 0
    return {
        "entropy": entropy,
        "mean_distance": distance,
        "received": received,
        "topk_index": top_i,
        "topk_weight": top_w,
        "pooled": pooled,
    }
