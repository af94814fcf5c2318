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
* ``pooled (B, H, S_q, S_k)`` for query segments ``[qe[r], qe[r+1])`` and key segments
  ``[ke[c], ke[c+1])`` (``pool = (qe, ke)``, strictly increasing edges from 0 to the length;
  `pool_edges` gives ``P`` near-equal segments): the cell holds the SUM of ``p_ij`` over that
  block (so each full row-band sums to the number of its non-empty rows).
* Dropout never applies to statistics: they describe the weights before dropout.

Memory: ``O(B * H * ((Lq + Lk) * (D + K) + P_q * P_k))`` plus one tile of
``B * H * block_q * block_k`` scores. All outputs are in the accumulation dtype
(fp32, fp64 for fp64 inputs) except ``topk_index`` (int64).
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit.masks import aligned_distance
from attnkit.spec import AttentionSpec

BLOCK_Q = 128  # query rows per block
BLOCK_K = 2048  # keys per tile: a tile of scores is B * H * 128 * 2048 floats (8 MiB for 8 heads);
# long key tiles make the per-row top-k cheaper (measured on CPU: pass / SDPA forward 1.58 at
# N = 16K, against 1.76 with 256 x 1024 tiles)

_CLAMP = -1e30  # finite stand-in for -inf log-weights, so 0 * log p = 0 without NaN


def pool_edges(length: int, bins: int, device: torch.device) -> Tensor:
    """``(bins + 1,)`` int64 edges ``floor(r * length / bins)``: bin ``r`` is ``[edges[r], edges[r+1])``."""
    return torch.arange(bins + 1, device=device, dtype=torch.int64) * length // bins


def segment_of(edges: Tensor) -> Tensor:
    """``(L,)`` int64: the segment of each position, for segments ``[edges[r], edges[r+1])`` covering ``[0, L)``."""
    pos = torch.arange(int(edges[-1]), device=edges.device, dtype=torch.int64)
    return torch.bucketize(pos, edges[1:].to(torch.int64), right=True)


def _bin_matrix(edges: Tensor, lo: int, hi: int, dtype: torch.dtype) -> tuple[Tensor, int]:
    """One-hot ``(hi - lo, nb)`` matrix of positions ``[lo, hi)`` onto the pool bins they touch, and the first bin.

    Bin ``r`` is ``[edges[r], edges[r+1])``; summing through this matrix (a matmul) adds
    positions into bins exactly as a loop would.
    """
    pos = torch.arange(lo, hi, device=edges.device, dtype=torch.int64)  # (n,)
    which = torch.bucketize(pos, edges[1:], right=True)  # (n,) bin of each position
    first, last = int(which[0]), int(which[-1])
    onehot = which[:, None] == torch.arange(first, last + 1, device=edges.device)[None, :]  # (n, nb)
    return onehot.to(dtype), first


def _augment(q: Tensor, k: Tensor, spec: AttentionSpec, lse: Tensor) -> tuple[Tensor, Tensor]:
    """``q_aug = [q * scale, -lse]`` ``(B, Hq, Lq, D+1)`` and ``k_aug = [k, 1]`` ``(B, Hk, Lk, D+1)``.

    Then ``q_aug k_aug^T = s - lse``: one matmul gives the log-weights of a tile before biases,
    saving two passes over it. Rows with no key (``lse = -inf``) get 0: all their keys are masked.
    """
    acc = spec.acc_dtype
    neg_lse = torch.where(torch.isneginf(lse), 0.0, -lse.to(acc)).unsqueeze(-1)  # (B, Hq, Lq, 1)
    q_aug = torch.cat([q.to(acc) * spec.scale, neg_lse], dim=-1)  # (B, Hq, Lq, D+1)
    k_aug = torch.cat([k.to(acc), torch.ones_like(k[..., :1], dtype=acc)], dim=-1)  # (B, Hk, Lk, D+1)
    return q_aug, k_aug


def _log_weights(spec: AttentionSpec, q_aug: Tensor, k_aug: Tensor, i0: int, j0: int) -> Tensor:
    """``log p (B, Hq, bq, bk)`` of one tile without softcap, masked entries at ``_CLAMP``.

    The spec's own bias (`AttentionSpec.add_bias`) and allowed set (`AttentionSpec.allowed_tile`),
    with ``- lse`` folded into the matmul (`_augment`); softcap tiles go through `AttentionSpec.scores`.
    """
    B, Hq, bq, Da = q_aug.shape
    bk = k_aug.shape[-2]
    i1, j1 = i0 + bq, j0 + bk
    q5 = q_aug.reshape(B, spec.kv_heads, spec.group, bq, Da)  # (B, Hk, G, bq, D+1)
    t = torch.matmul(q5, k_aug.unsqueeze(2).transpose(-1, -2)).view(B, Hq, bq, bk)  # s - lse
    t = spec.add_bias(t, i0, j0, inplace=True)
    if spec.has_bias:
        t.clamp_(min=_CLAMP)  # a float mask may hold -inf
    allowed = spec.allowed_tile(i0, i1, j0, j1, q_aug.device)
    if allowed is not None:
        t.masked_fill_(~allowed, _CLAMP)
    return t


def update_topk(p: Tensor, j0: int, run_w: Tensor, run_i: Tensor, K: int) -> tuple[Tensor, Tensor]:
    """Merge the tile ``p (B, H, bq, bk)`` (keys from ``j0``) into the running top-``K`` ``(B, H, bq, K)``.

    A row whose tile maximum does not exceed its current ``K``-th best keeps its buffer, so
    ``topk`` (the costliest step) runs only on the rows that can change; on real attention,
    peaked on few keys, that is soon a small fraction.
    """
    B, H, bq, bk = p.shape
    kk = min(K, bk)
    need = p.amax(dim=-1) > run_w[..., -1]  # (B, H, bq); -inf K-th best (unfilled) always needs
    n = int(need.sum())
    if n == 0:
        return run_w, run_i
    if n > need.numel() // 2:  # most rows: one topk over the whole tile
        w_t, i_t = torch.topk(p, kk, dim=-1)  # (B, H, bq, kk)
        w, pick = torch.topk(torch.cat([run_w, w_t], dim=-1), K, dim=-1)
        return w, torch.gather(torch.cat([run_i, i_t + j0], dim=-1), -1, pick)
    rows = need.view(-1).nonzero().squeeze(1)  # (n,) flat row ids
    w_t, i_t = torch.topk(p.reshape(-1, bk).index_select(0, rows), kk, dim=-1)  # (n, kk)
    flat_w, flat_i = run_w.reshape(-1, K).clone(), run_i.reshape(-1, K).clone()  # (B*H*bq, K)
    w, pick = torch.topk(torch.cat([flat_w[rows], w_t], dim=-1), K, dim=-1)  # (n, K)
    flat_w[rows] = w
    flat_i[rows] = torch.gather(torch.cat([flat_i[rows], i_t + j0], dim=-1), -1, pick)
    return flat_w.view(B, H, bq, K), flat_i.view(B, H, bq, K)


def stats_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor | None,
    spec: AttentionSpec,
    lse: Tensor,
    *,
    topk: int,
    pool: tuple[Tensor, Tensor],
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
        pool: ``(query_edges (S_q + 1,), key_edges (S_k + 1,))`` int64 segment edges, validated
            (`attnkit.stats.pool_segments`).

    Returns:
        dict with ``entropy (B, Hq, Lq)``, ``mean_distance (B, Hq, Lq)``, ``received (B, Hq, Lk)``,
        ``topk_index (B, Hq, Lq, K)`` int64, ``topk_weight (B, Hq, Lq, K)`` and
        ``pooled (B, Hq, S_q, S_k)``; definitions in the module docstring.
    """
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    acc, dev = spec.acc_dtype, q.device
    K = min(topk, Lk)
    q_edges, k_edges = (e.to(device=dev, dtype=torch.int64) for e in pool)
    Pq, Pk = q_edges.numel() - 1, k_edges.numel() - 1
    # A row with no allowed key has lse = -inf; +inf makes every p = exp(s - lse) = 0 there.
    lse_safe = torch.where(torch.isneginf(lse), float("inf"), lse.to(acc))  # (B, Hq, Lq)
    fused = spec.softcap is None
    if fused:
        q_aug, k_aug = _augment(q, k, spec, lse)

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
        run_w, run_i = top_w[:, :, i0:i1], top_i[:, :, i0:i1]  # (B, Hq, bq, K) running top-k
        ent, dist_acc = entropy[:, :, i0:i1], distance[:, :, i0:i1]  # (B, Hq, bq) views, updated in place
        rows_onehot, r_first = _bin_matrix(q_edges, i0, i1, acc)  # (bq, nr)
        rows_onehot_t = rows_onehot.t()  # (nr, bq)
        lo, hi = spec.key_range(i0, i1)
        for j0 in range(lo, hi, block_k):
            j1 = min(j0 + block_k, hi)
            if fused:
                t = _log_weights(spec, q_aug[:, :, i0:i1], k_aug[:, :, j0:j1], i0, j0)  # (B, Hq, bq, bk)
            else:
                s, _ = spec.scores(q_blk, k[:, :, j0:j1], i0, j0)  # (B, Hq, bq, bk), -inf where masked
                t = s.sub_(lse_blk).clamp_(min=_CLAMP)  # log p_ij, in place over the scores
            p = torch.exp(t)  # (B, Hq, bq, bk) exact global weights
            # entropy: -sum_j p log p, as a contraction (no temporary of the tile's size)
            ent -= torch.einsum("bhqk,bhqk->bhq", p, t)
            dist = aligned_distance(i0, i1, j0, j1, spec.offset, acc, dev)  # (bq, bk) |i' - j|
            dist_acc += torch.einsum("bhqk,qk->bhq", p, dist)
            # pooled: rows into their bins first (few bins per block), then columns, by two
            # matmuls with one-hot matrices: exact sums, cheaper than a scatter. Every row lies
            # in one bin, so the row bands also give the attention each key receives.
            band = torch.matmul(rows_onehot_t, p)  # (B, Hq, nr, bk)
            received[:, :, j0:j1] += band.sum(dim=-2)
            cols_onehot, c_first = _bin_matrix(k_edges, j0, j1, acc)  # (bk, nc)
            cell = torch.matmul(band, cols_onehot)  # (B, Hq, nr, nc)
            pooled[:, :, r_first : r_first + cell.shape[-2], c_first : c_first + cell.shape[-1]] += cell
            # top-k: merged into the running (bq, K) buffer, only for the rows where this tile
            # holds a weight above the row's current K-th best (the others cannot change).
            if K > 0:
                run_w, run_i = update_topk(p, j0, run_w, run_i, K)
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


# ------------------------------------------------------------------ one pass: output and statistics
STRIP_BYTES = 8 * 2**20  # a strip of scores (query rows x visible keys, one GQA group) stays in L3 (32 MiB here)


TOPK_CHUNK = 64  # keys per chunk when screening a long row for its top-k


def row_topk(p: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest entries of each row of ``p (..., W)`` (values >= 0), largest first, and their indices.

    For long rows, chunk maxima screen the candidates first: the top ``k`` entries lie in the ``k``
    chunks with the largest maxima (a chunk left out has ``k`` chunk maxima at least as large as
    all it holds), so a ``topk`` over ``k`` chunks replaces one over the whole row. Measured on
    this 2-core CPU: about 0.75x the time of ``torch.topk`` at W = 4K and 0.6x at 32K.
    """
    W = p.shape[-1]
    C = TOPK_CHUNK
    if 4 * k * C > W:
        return torch.topk(p, k, dim=-1)
    lead = p.shape[:-1]
    pad = (-W) % C
    x = torch.nn.functional.pad(p, (0, pad), value=-1.0) if pad else p  # padding below every weight
    n = x.shape[-1] // C
    chunk_max = torch.nn.functional.max_pool1d(x.reshape(-1, 1, n * C), C).view(*lead, n)  # (..., n)
    _, chunks = torch.topk(chunk_max, k, dim=-1, sorted=False)  # (..., k) chunk ids
    cand = torch.gather(x.view(*lead, n, C), -2, chunks[..., None].expand(*lead, k, C))  # (..., k, C)
    w, j = torch.topk(cand.reshape(*lead, k * C), k, dim=-1)  # (..., k)
    return w, torch.gather(chunks, -1, j // C) * C + j % C


def strip_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    spec: AttentionSpec,
    *,
    topk: int,
    pool: tuple[Tensor, Tensor],
    block_q: int | None = None,
) -> dict[str, Tensor]:
    """The attention output, its log-sum-exp and every statistic in one pass over the scores.

    A strip of query rows is scored against all the keys it may see (causal/window ranges
    only), normalised exactly (its log-sum-exp is known once the strip is scored), reduced into
    the statistics and mixed with ``v``, then dropped. Strips are sized to ``STRIP_BYTES`` per
    GQA group, so memory is ``O(L)`` plus one strip, and a strip stays in cache while it is
    read several times. Dropout is not applied (the caller uses the two-pass path for it).

    Args:
        q: ``(B, Hq, Lq, D)``; k: ``(B, Hk, Lk, D)``; v: ``(B, Hk, Lk, Dv)``.
        spec, topk, pool: as in `stats_forward`.
        block_q: query rows per strip; default from ``STRIP_BYTES``.

    Returns:
        `stats_forward`'s dict plus ``output (B, Hq, Lq, Dv)`` (accumulation dtype) and
        ``lse (B, Hq, Lq)``.
    """
    B, Hq, Lq, _ = q.shape
    Hk, Lk, Dv, G = spec.kv_heads, k.shape[2], v.shape[-1], spec.group
    acc, dev = spec.acc_dtype, q.device
    K = min(topk, Lk)
    q_edges, k_edges = (e.to(device=dev, dtype=torch.int64) for e in pool)
    Pq, Pk = q_edges.numel() - 1, k_edges.numel() - 1
    query_segment, key_segment = segment_of(q_edges), segment_of(k_edges)  # (Lq,), (Lk,)
    if block_q is None:
        itemsize = torch.empty((), dtype=acc).element_size()
        block_q = max(32, min(512, STRIP_BYTES // max(1, G * Lk * itemsize)))

    output = torch.zeros(B, Hq, Lq, Dv, dtype=acc, device=dev)
    lse = torch.full((B, Hq, Lq), float("-inf"), dtype=acc, device=dev)
    entropy = torch.zeros(B, Hq, Lq, dtype=acc, device=dev)
    distance = torch.zeros(B, Hq, Lq, dtype=acc, device=dev)
    received = torch.zeros(B, Hq, Lk, dtype=acc, device=dev)
    pooled = torch.zeros(B, Hq, Pq, Pk, dtype=acc, device=dev)
    top_w = torch.zeros(B, Hq, Lq, K, dtype=acc, device=dev)
    top_i = torch.zeros(B, Hq, Lq, K, dtype=torch.int64, device=dev)
    groups = [(b, hk, spec.part(b, hk, hk + 1)) for b in range(B) for hk in range(Hk)]

    for i0 in range(0, Lq, block_q):
        i1 = min(i0 + block_q, Lq)
        lo, hi = spec.key_range(i0, i1)
        if hi <= lo:
            continue  # no key visible to any row of the strip: zeros and lse = -inf
        dist = aligned_distance(i0, i1, lo, hi, spec.offset, acc, dev)  # (bq, W) |i' - j|, shared by the groups
        row_segments = query_segment[i0:i1]  # (bq,)
        r_first = int(row_segments[0])
        row_segments = row_segments - r_first
        nr = int(row_segments[-1]) + 1
        segments = key_segment[lo:hi]  # (W,)
        c_first, c_last = int(segments[0]), int(segments[-1]) + 1
        for b, hk, gspec in groups:
            h0, h1 = hk * G, (hk + 1) * G
            q_s = q[b : b + 1, h0:h1, i0:i1]  # (1, G, bq, D)
            s, _ = gspec.scores(q_s, k[b : b + 1, hk : hk + 1, lo:hi], i0, lo)  # (1, G, bq, W), -inf where masked
            s = s[0]  # (G, bq, W)
            m = s.amax(dim=-1, keepdim=True)  # (G, bq, 1)
            m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
            t = s.sub_(m)  # s - m, in place
            p = torch.exp(t)  # (G, bq, W) unnormalised
            total = p.sum(dim=-1, keepdim=True)  # (G, bq, 1)
            empty = total == 0
            log_total = torch.log(torch.where(empty, torch.ones_like(total), total))
            p.div_(torch.where(empty, torch.ones_like(total), total))  # exact weights
            t.sub_(log_total).clamp_(min=_CLAMP)  # log p, finite where masked (p = 0 there)
            lse[b, h0:h1, i0:i1] = torch.where(empty, float("-inf"), m + log_total).squeeze(-1)
            output[b, h0:h1, i0:i1] = torch.matmul(p, v[b, hk, lo:hi].to(acc))  # (G, bq, Dv)
            entropy[b, h0:h1, i0:i1] = -torch.einsum("gqk,gqk->gq", p, t)
            distance[b, h0:h1, i0:i1] = (p * dist).sum(dim=-1)  # (measured faster than a broadcast einsum)
            band = torch.zeros(G, nr, hi - lo, dtype=acc, device=dev)
            band.index_add_(1, row_segments, p)  # (G, nr, W): rows summed into their segments
            received[b, h0:h1, lo:hi] += band.sum(dim=-2)
            cell = torch.zeros(G, band.shape[1], c_last - c_first, dtype=acc, device=dev)
            cell.index_add_(-1, segments - c_first, band)  # (G, nr, nc): keys into their segments
            pooled[b, h0:h1, r_first : r_first + cell.shape[1], c_first:c_last] += cell
            if K > 0:
                kk = min(K, hi - lo)
                w, idx = row_topk(p, kk)  # (G, bq, kk)
                top_w[b, h0:h1, i0:i1, :kk] = w
                top_i[b, h0:h1, i0:i1, :kk] = idx + lo
                if kk < K:  # fewer visible keys than K: weight-0 keys outside the range fill the rest
                    outside = torch.cat([torch.arange(0, lo, device=dev), torch.arange(hi, Lk, device=dev)])
                    top_i[b, h0:h1, i0:i1, kk:] = outside[: K - kk]
    return {
        "output": output,
        "lse": lse,
        "entropy": entropy,
        "mean_distance": distance,
        "received": received,
        "topk_index": top_i,
        "topk_weight": top_w,
        "pooled": pooled,
    }
