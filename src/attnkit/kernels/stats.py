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

import concurrent.futures
import contextlib
import dataclasses
import functools
import threading
from collections.abc import Iterator

import torch
from torch import Tensor

from attnkit.kernels import native
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
STRIP_BYTES = 16 * 2**20  # scores per strip (query rows x visible keys, one GQA group): 128 rows at 32K keys, a
# quarter of L3 here; measured on CPU at 32K: 1.4x the SDPA forward, against 1.55x with 8 MiB (64 rows)
BUNDLE_BYTES = 4 * 2**20  # short sequences: batch elements bundled into one strip up to this (measured on MiniLM,
# 32 x 256 tokens: 4 MiB strips score 1.35x faster than 16 MiB ones, whose matmul output leaves the cache)


TOPK_CHUNK = 64  # keys per chunk when screening a long row for its top-k (measured best of 32/64/128 at 4K-16K)


def row_topk(p: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest entries of each row of ``p (..., W)`` (values >= 0), largest first, and their indices.

    Long rows are screened twice before the one small ``topk``, each screen resting on the same
    fact: if a row is cut into groups, its top ``k`` entries lie in the ``k`` groups with the
    largest maxima (a group left out has ``k`` group maxima at least as large as all it holds).

    1. Chunks of ``TOPK_CHUNK`` consecutive keys: keep the ``k`` chunks with the largest maxima
       (the last, partial chunk is always kept).
    2. Lanes: entry ``c`` of each kept chunk forms lane ``c``; keep the ``k`` lanes with the
       largest maxima, ``k * k`` candidates.

    Both maxima are contiguous vectorised reductions; measured on this 2-core CPU, one thread,
    the whole costs about a third of ``torch.topk`` at W = 4K and a fifth at 16K.
    """
    W = p.shape[-1]
    C = TOPK_CHUNK
    n = W // C  # whole chunks; the rest (the tail, < C keys) is always a candidate
    if n < 4 * k:
        return torch.topk(p, k, dim=-1)
    lead = p.shape[:-1]
    rows = p.reshape(-1, W)  # (R, W)
    R = rows.shape[0]
    bulk = rows[:, : n * C].unflatten(-1, (n, C))  # (R, n, C) view
    _, chunks = torch.topk(bulk.amax(dim=-1), k, dim=-1, sorted=False)  # (R, k) chunk ids
    if bulk.is_contiguous():  # copy whole chunks: rows of a (R * n, C) view
        flat = (chunks + torch.arange(R, device=p.device)[:, None] * n).view(-1)  # (R * k,)
        cand = bulk.reshape(R * n, C).index_select(0, flat).view(R, k, C)
    else:
        cand = torch.gather(bulk, 1, chunks[..., None].expand(R, k, C))  # (R, k, C)
    if 2 * k <= C:  # second screen: lanes across the kept chunks
        _, lanes = torch.topk(cand.amax(dim=-2), k, dim=-1, sorted=False)  # (R, k) lane ids
        cand = torch.gather(cand, -1, lanes[:, None, :].expand(R, k, k))  # (R, k chunks, k lanes)
    else:
        lanes = torch.arange(C, device=p.device).expand(R, C)  # (R, C): every lane kept
    L = lanes.shape[-1]
    cand = cand.reshape(R, k * L)
    if n * C < W:
        cand = torch.cat([cand, rows[:, n * C :]], dim=-1)  # (R, k * L + tail)
    w, j = torch.topk(cand, k, dim=-1)  # (R, k), j indexes the candidates
    in_bulk = j < k * L
    jb = torch.where(in_bulk, j, 0)
    key = torch.gather(chunks, -1, jb // L) * C + torch.gather(lanes, -1, jb % L)
    idx = torch.where(in_bulk, key, j - k * L + n * C)
    return w.view(*lead, k), idx.view(*lead, k)


def _strip_weights(s: Tensor, K: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Exact weights of a scored strip ``s (G, bq, W)`` (``-inf`` where masked), with its lse and top-``K``.

    One fused ``softmax`` gives the weights; the log-sum-exp then needs no second reduction, since
    the largest weight sits at the largest score: ``lse = s_max - log p_max`` (``p_max`` is at least
    ``1 / W``, so its log is well conditioned). A row with no allowed key comes out of ``softmax``
    as NaN; it is set to weight 0 and ``lse = -inf``.

    Returns:
        ``p (G, bq, W)``, ``lse (G, bq)``, ``top_w (G, bq, max(K, 1))`` and ``top_i`` (strip-local).
    """
    p = torch.softmax(s, dim=-1)  # (G, bq, W)
    top_w, top_i = row_topk(p, K) if K > 0 else p.max(dim=-1, keepdim=True)  # (G, bq, K)
    s_max = torch.gather(s, -1, top_i[..., :1])  # (G, bq, 1)
    lse = (s_max - torch.log(top_w[..., :1])).squeeze(-1)  # (G, bq)
    empty = torch.isnan(top_w[..., 0])  # (G, bq): rows with no allowed key
    if bool(empty.any()):
        p[empty] = 0.0
        top_w[empty] = 0.0
        lse = lse.masked_fill(empty, float("-inf"))
    return p, lse, top_w, top_i


_THREADS_LOCK = threading.Lock()


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """PyTorch's intra-op thread count set to ``n`` for the block (process-wide; calls are serialised)."""
    with _THREADS_LOCK:
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            yield
        finally:
            torch.set_num_threads(before)


@functools.lru_cache(maxsize=4)
def _unit_pool(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="attnkit-stats")


def _units(B: int, Hk: int, group_bytes: int) -> list[tuple[int, int, int, int]]:
    """``(b0, b1, kv0, kv1)`` pieces of the batch and key/value heads scored together in one strip.

    One GQA group (``group_bytes`` of scores per strip) at a time when groups are large; small
    ones (short sequences: a BERT layer over many sentences) are bundled, whole batch elements
    with all their heads, up to ``BUNDLE_BYTES``, so a strip is a few large operations rather
    than many tiny ones.
    """
    if Hk * group_bytes > BUNDLE_BYTES:
        return [(b, b + 1, hk, hk + 1) for b in range(B) for hk in range(Hk)]
    per = max(1, BUNDLE_BYTES // (Hk * group_bytes))  # batch elements per piece
    return [(b, min(B, b + per), 0, Hk) for b in range(0, B, per)]


class _DistanceSplit:
    """``sum_j p_ij |i' - j|`` over a strip (queries ``[i0, i1)``, keys ``[lo, hi)``) without a ``(bq, W)`` table.

    With ``c0 = i0'`` and ``c1 = i1' - 1`` (aligned positions of the strip's first and last row),
    every key left of ``c0`` is at ``|i' - j| = (i' - c0) + (c0 - j)`` and every key right of ``c1``
    at ``(c1 - i') + (j - c1)``, sums of non-negative terms (no cancellation). So two row sums of
    the weights and one matrix-vector product with the distance to the nearer edge cover them;
    only the keys within ``[c0, c1]`` (at most ``bq``) take the table ``|i' - j|``.
    (A matmul with a skinny ``(W, 3)`` right side measured 6x slower than ``mv`` here.)
    """

    def __init__(self, i0: int, i1: int, lo: int, hi: int, offset: int, dtype: torch.dtype, device: torch.device):
        c0, c1 = i0 + offset, i1 - 1 + offset
        j = torch.arange(lo, hi, device=device, dtype=torch.int64)  # (W,)
        self.edge = torch.where(j < c0, c0 - j, torch.where(j > c1, j - c1, 0)).to(dtype)  # (W,)
        i = torch.arange(i0, i1, device=device, dtype=dtype) + offset  # (bq,) aligned rows
        self.to_left, self.to_right = i - c0, c1 - i  # (bq,) each >= 0
        self.m0, self.m1 = min(max(c0, lo), hi) - lo, max(min(c1 + 1, hi), lo) - lo  # middle keys, strip-local
        self.middle = aligned_distance(i0, i1, lo + self.m0, lo + self.m1, offset, dtype, device)  # (bq, <= bq)

    def mean_distance(self, p: Tensor) -> Tensor:
        """``(G, bq)`` mean distance of the strip's weights ``p (G, bq, W)`` (contiguous)."""
        G, bq, W = p.shape
        out = torch.mv(p.view(G * bq, W), self.edge).view(G, bq)
        if self.m0 > 0:
            out += p[..., : self.m0].sum(dim=-1) * self.to_left
        if self.m1 < W:
            out += p[..., self.m1 :].sum(dim=-1) * self.to_right
        if self.m1 > self.m0:
            out += (p[..., self.m0 : self.m1] * self.middle).sum(dim=-1)
        return out


@dataclasses.dataclass(frozen=True)
class _StripPlan:
    """What every unit's strip of query rows ``[i0, i1)`` shares: its keys ``[lo, hi)`` and segments."""

    i0: int
    i1: int
    lo: int
    hi: int
    row_segment: Tensor  # (bq,) int64: each row's query segment, minus r_first
    r_first: int  # first query segment of the strip
    nr: int  # query segments the rows fall in
    c_first: int  # first key segment of [lo, hi)
    c_last: int  # one past the last
    key_edges: Tensor | None  # (nc + 1,) strip-local key segment edges (native helper)
    key_range: tuple[Tensor, Tensor] | None  # (bq,) each: the strip-local keys [lo, hi) a row sees (native helper)
    key_segment: Tensor  # (W,) each key's segment, minus c_first
    distance: _DistanceSplit | None  # mean distance without a table (PyTorch path)


def _plan_strips(
    spec: AttentionSpec, Lq: int, block_q: int, q_edges: Tensor, k_edges: Tensor, *, native: bool, dtype: torch.dtype
) -> list[_StripPlan]:
    """The strips of ``block_q`` query rows that see at least one key, planned once for every unit."""
    dev = q_edges.device
    query_segment, key_segment = segment_of(q_edges), segment_of(k_edges)  # (Lq,), (Lk,)
    plans = []
    for i0 in range(0, Lq, block_q):
        i1 = min(i0 + block_q, Lq)
        lo, hi = spec.key_range(i0, i1)
        if hi <= lo:
            continue  # no key visible to any row of the strip: zeros and lse = -inf
        rows = query_segment[i0:i1]  # (bq,)
        r_first = int(rows[0])
        segments = key_segment[lo:hi]  # (W,)
        c_first, c_last = int(segments[0]), int(segments[-1]) + 1
        plans.append(
            _StripPlan(
                i0, i1, lo, hi, rows - r_first, r_first, int(rows[-1]) - r_first + 1, c_first, c_last,
                key_edges=(k_edges[c_first : c_last + 1] - lo).clamp_(0, hi - lo) if native else None,
                key_range=spec.row_key_ranges(i0, i1, lo, hi, dev) if native else None,
                key_segment=segments - c_first,
                distance=None if native else _DistanceSplit(i0, i1, lo, hi, spec.offset, dtype, dev),
            )
        )  # fmt: skip
    return plans


def _strip_sums(p: Tensor, row_segment: Tensor, nr: int, key_segment: Tensor, nc: int) -> tuple[Tensor, Tensor]:
    """Column sums ``(R, W)`` and pooled cells ``(R, nr, nc)`` of a strip's weights ``p (R, bq, W)``.

    ``row_segment (bq,)`` and ``key_segment (W,)``: the strip-local segment of each row and key.
    Rows go into their segments first (few per strip), then keys, by ``index_add_``: exact sums.
    Every row lies in one segment, so the row bands also give the column sums.
    """
    R, bq, W = p.shape
    if nr == bq:  # a segment per row (pool >= Lq): the rows are their own bands
        band = p
    else:
        band = torch.zeros(R, nr, W, dtype=p.dtype, device=p.device)
        band.index_add_(1, row_segment, p)  # (R, nr, W)
    if nc == W:  # a segment per key: the band is the cell
        cells = band
    else:
        cells = torch.zeros(R, nr, nc, dtype=p.dtype, device=p.device)
        cells.index_add_(-1, key_segment, band)  # (R, nr, nc)
    return band.sum(dim=-2), cells


def strip_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    spec: AttentionSpec,
    *,
    topk: int,
    pool: tuple[Tensor, Tensor],
    block_q: int | None = None,
    native_rows: bool = True,
) -> dict[str, Tensor]:
    """The attention output, its log-sum-exp and every statistic in one pass over the scores.

    A strip of query rows is scored against all the keys it may see (causal/window ranges
    only) into a buffer reused for every strip of a unit, normalised exactly, reduced into the
    statistics and mixed with ``v``, then dropped. Strips are sized to ``STRIP_BYTES`` per
    GQA group (small groups bundled up to ``BUNDLE_BYTES``), so memory is ``O(L)`` plus one strip
    per worker thread (units of batch elements and heads run on PyTorch's thread count, each on
    one thread), and a strip stays in cache while it is read several times. Dropout is not
    applied (the caller uses the two-pass path for it).

    fp32 on CPU: the native helper (`attnkit.kernels.native.strip_rows`) takes a whole strip in
    one call, with causal/window as per-row key ranges (never masked in memory). Otherwise,
    PyTorch operations: one ``softmax`` (`_strip_weights`); entropy is ``lse - sum_j p_ij s_ij``
    (``log p = s - lse``), one contraction over the strip, the ``-inf`` of masked scores (where
    ``p = 0``) first set to 0, only in the columns that hold them when causal/window are the
    only masks.

    Args:
        q: ``(B, Hq, Lq, D)``; k: ``(B, Hk, Lk, D)``; v: ``(B, Hk, Lk, Dv)``.
        spec, topk, pool: as in `stats_forward`.
        block_q: query rows per strip; default from ``STRIP_BYTES``.
        native_rows: normalise and reduce the rows with the native helper (`attnkit.kernels.native`,
            fp32 on CPU, when it is built); False keeps every step in PyTorch operations.

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
    if block_q is None:
        itemsize = torch.empty((), dtype=acc).element_size()
        block_q = max(32, min(256, STRIP_BYTES // max(1, G * Lk * itemsize)))

    output = torch.zeros(B, Hq, Lq, Dv, dtype=acc, device=dev)
    lse = torch.full((B, Hq, Lq), float("-inf"), dtype=acc, device=dev)
    entropy = torch.zeros(B, Hq, Lq, dtype=acc, device=dev)
    distance = torch.zeros(B, Hq, Lq, dtype=acc, device=dev)
    received = torch.zeros(B, Hq, Lk, dtype=acc, device=dev)
    pooled = torch.zeros(B, Hq, Pq, Pk, dtype=acc, device=dev)
    top_w = torch.zeros(B, Hq, Lq, K, dtype=acc, device=dev)
    top_i = torch.zeros(B, Hq, Lq, K, dtype=torch.int64, device=dev)
    units = _units(B, Hk, G * min(block_q, Lq) * Lk * torch.empty((), dtype=acc).element_size())
    units = [(b0, b1, kv0, kv1, spec.part(b0, kv0, kv1, batches=b1 - b0)) for b0, b1, kv0, kv1 in units]
    v_acc = v.to(acc)  # (B, Hk, Lk, Dv), no copy when already in the accumulation dtype
    fused_rows = native_rows and acc == torch.float32 and dev.type == "cpu" and K <= native.MAX_TOPK
    fused_rows = fused_rows and native.available()

    plans = _plan_strips(spec, Lq, block_q, q_edges, k_edges, native=fused_rows, dtype=acc)

    def run_unit(b0: int, b1: int, kv0: int, kv1: int, uspec: AttentionSpec) -> None:
        """Every strip of one unit: its (batch, head) slices of the outputs are its own."""
        # one buffer for every strip of the unit: a fresh strip-sized allocation per strip costs
        # page faults worth a fifth of the scores' matmul (measured on CPU at 4K)
        buffer = torch.empty((b1 - b0) * (kv1 - kv0) * G * min(block_q, Lq) * Lk, dtype=acc, device=dev)
        for plan in plans:
            i0, i1, lo, hi = plan.i0, plan.i1, plan.lo, plan.hi
            r_first, nr, c_first, c_last = plan.r_first, plan.nr, plan.c_first, plan.c_last
            nb, h0, h1 = b1 - b0, kv0 * G, kv1 * G
            q_s = q[b0:b1, h0:h1, i0:i1]  # (nb, nh, bq, D)
            scores_out = buffer[: nb * (h1 - h0) * (i1 - i0) * (hi - lo)].view(nb, h1 - h0, i1 - i0, hi - lo)
            # -inf where masked; causal/window are left to the native helper's row ranges
            s, _ = uspec.scores(
                q_s, k[b0:b1, kv0:kv1, lo:hi], i0, lo, out=scores_out, structure=not fused_rows or spec.mask_is_bool
            )
            s = s.view(-1, i1 - i0, hi - lo)  # (R, bq, W), R = nb * nh strips of rows
            kk = min(K, hi - lo)
            rows = (nb, h1 - h0, i1 - i0)  # the unit's (batch, head, row) axes
            # a query segment per row (pool >= Lq): the row bands are the strip, summed from p below
            own_bands = nr == i1 - i0
            if fused_rows:  # the native helper: e in place of s, every statistic in one call
                lse_s, row_scale, ent_s, dist_s, w, idx, colsum, cells = native.strip_rows(
                    s, i0 + spec.offset - lo, kk, plan.row_segment, nr, plan.key_edges, plan.key_range,
                    sums=not own_bands,
                )  # fmt: skip
                p = s  # e = p / scale: the output is (e @ v) * scale (p itself without the sums)
            else:
                p, lse_s, w, idx = _strip_weights(s, kk)
                # entropy = lse - sum_j p s: the -inf of masked scores (p = 0 there) become 0 first
                if spec.mask is not None:
                    s.clamp_(min=_CLAMP)
                else:  # where only causal/window mask, the -inf lie outside the open columns [a, z)
                    a, z = spec.open_columns(i0, i1, lo, hi)
                    for c0, c1 in ((lo, a), (z, hi)):
                        if c1 > c0:
                            s[..., c0 - lo : c1 - lo].clamp_(min=_CLAMP)
                plogits = torch.einsum("gqk,gqk->gq", p, s)  # (R, bq)
                ent_s = torch.where(torch.isneginf(lse_s), 0.0, lse_s - plogits).clamp_(min=0)
                dist_s = plan.distance.mean_distance(p)
                colsum, cells = _strip_sums(p, plan.row_segment, nr, plan.key_segment, c_last - c_first)
            lse[b0:b1, h0:h1, i0:i1] = lse_s.view(rows)
            entropy[b0:b1, h0:h1, i0:i1] = ent_s.view(rows)
            distance[b0:b1, h0:h1, i0:i1] = dist_s.view(rows)
            p5 = p.view(nb, kv1 - kv0, G, i1 - i0, hi - lo)  # (nb, nkv, G, bq, W)
            out = torch.matmul(p5, v_acc[b0:b1, kv0:kv1, None, lo:hi]).view(*rows, Dv)  # (nb, nh, bq, Dv)
            if fused_rows and not own_bands:
                out.mul_(row_scale.view(*rows, 1))
            elif fused_rows:
                colsum, cells = _strip_sums(p, plan.row_segment, nr, plan.key_segment, c_last - c_first)
            output[b0:b1, h0:h1, i0:i1] = out
            received[b0:b1, h0:h1, lo:hi] += colsum.view(nb, h1 - h0, hi - lo)
            pooled[b0:b1, h0:h1, r_first : r_first + nr, c_first:c_last] += cells.view(nb, h1 - h0, nr, -1)
            if K > 0:
                top_w[b0:b1, h0:h1, i0:i1, :kk] = w.view(*rows, kk)
                top_i[b0:b1, h0:h1, i0:i1, :kk] = idx.view(*rows, kk) + lo
                if kk < K:  # fewer visible keys than K: weight-0 keys outside the range fill the rest
                    outside = torch.cat([torch.arange(0, lo, device=dev), torch.arange(hi, Lk, device=dev)])
                    top_i[b0:b1, h0:h1, i0:i1, kk:] = outside[: K - kk]

    workers = min(torch.get_num_threads(), len(units))
    if workers > 1:  # units write disjoint slices: one per thread, each op on one thread (better than
        with _torch_threads(1):  # the ops' own threads, which leave the skinny p @ v matmul on one)
            list(_unit_pool(workers).map(lambda unit: run_unit(*unit), units))
    else:
        for unit in units:
            run_unit(*unit)

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
