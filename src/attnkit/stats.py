"""`attention_stats()`: exact attention statistics at any length, without the ``Lq x Lk`` map.

The fast kernels (PyTorch SDPA, FlashAttention) cannot return attention weights, and
materialising them costs ``B * H * Lq * Lk`` floats (34 GB for 8 heads at 32K tokens).
`attention_stats` runs the normal fast forward with ``return_lse=True`` and then a
second blockwise pass (`attnkit.kernels.stats`) that recomputes each tile of weights
exactly from the saved log-sum-exp and reduces it on the spot: entropy, mean
distance, attention received per key, the top-k keys of every query, and a pooled
``P x P`` picture of the whole map.

Example::

    st = attnkit.attention_stats(q, k, v, causal=True, topk=4, pool=128, return_output=True)
    st.entropy.shape     # (B, H, Lq), nats
    st.pooled.shape      # (B, H, 128, 128), sums of the exact weights over tiles
    out = st.output      # same as attnkit.attention(q, k, v, causal=True)
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from attnkit.backends import choose, get_backend
from attnkit.functional import Layout, attend, build_spec, to_bhld
from attnkit.kernels import nonfinite
from attnkit.kernels import stats as stats_kernel
from attnkit.options import Alibi, AttentionOptions, Window

__all__ = ["AttentionStats", "Pool", "attention_stats", "pool_segments"]

# ``pool``: near-equal tiles (int), segment edges for queries and keys alike, or a pair of them.
Pool = int | Tensor | tuple[Tensor, Tensor]
"""`attention_stats`'s ``pool``: near-equal tiles (int), segment edges ``[0, e_1, ..., L]``, or a pair of them."""


@dataclass
class AttentionStats:
    """Exact statistics of one attention call, per batch element and query head.

    Shapes (``K = min(topk, Lk)``; ``S_q``, ``S_k`` query and key segments of the pooled map:
    ``min(pool, L)`` near-equal tiles for an int ``pool``, else the segments given):

    * ``lse (B, H, Lq)``: natural-log log-sum-exp of each row's scores (``-inf``: no allowed key).
    * ``entropy (B, H, Lq)``: ``-sum_j p_ij log p_ij`` in nats (0 for an empty row).
    * ``mean_distance (B, H, Lq)``: ``sum_j p_ij |i' - j|`` with ``i' = i + Lk - Lq``.
    * ``received (B, H, Lk)``: ``sum_i p_ij``, the attention each key receives.
    * ``topk_index (B, H, Lq, K)`` int64 and ``topk_weight (B, H, Lq, K)``: the largest weights
      of each row, largest first (weight 0 pads rows with fewer than ``K`` allowed keys).
    * ``pooled (B, H, S_q, S_k)``: the exact map summed over each (query segment, key segment)
      block; row ``r`` covers queries ``[query_edges[r], query_edges[r+1])``, columns likewise.
      For an int ``pool`` the edges are ``floor(r L / P)``.
    * ``output (B, H, Lq, Dv)`` or None: the attention output, when asked for.
    * ``query_edges (S_q + 1,)``, ``key_edges (S_k + 1,)`` int64: the segments of ``pooled``.

    Statistics describe the weights before dropout, in fp32 (fp64 for fp64 inputs).
    """

    lse: Tensor
    entropy: Tensor
    mean_distance: Tensor
    received: Tensor
    topk_index: Tensor
    topk_weight: Tensor
    pooled: Tensor
    output: Tensor | None = None
    query_edges: Tensor | None = None  # None: the near-equal tiles of an int pool
    key_edges: Tensor | None = None

    # Per-segment fields, not indexed by batch and head (`select` keeps them whole).
    _EDGES = ("query_edges", "key_edges")

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(B, H, Lq, Lk)`` of the attention these statistics describe."""
        B, H, Lq = self.entropy.shape
        return B, H, Lq, self.received.shape[-1]

    def pool_edges(self) -> tuple[Tensor, Tensor]:
        """``(S_q + 1,)`` query and ``(S_k + 1,)`` key edges of the pooled segments."""
        _, _, Lq, Lk = self.shape
        Pq, Pk = self.pooled.shape[-2:]
        dev = self.pooled.device
        eq = self.query_edges if self.query_edges is not None else stats_kernel.pool_edges(Lq, Pq, dev)
        ek = self.key_edges if self.key_edges is not None else stats_kernel.pool_edges(Lk, Pk, dev)
        return eq, ek

    def segment_flow(self) -> Tensor:
        """``(B, H, S_q, S_k)``: the mean attention a token of query segment ``a`` pays to key segment ``b``.

        ``pooled`` divided by the number of queries in each query segment; a row sums to 1 when
        every query of its segment has an allowed key.
        """
        eq, _ = self.pool_edges()
        return self.pooled / eq.diff().to(self.pooled.dtype)[:, None]  # (B, H, S_q, S_k)

    def pooled_density(self) -> Tensor:
        """``(B, H, S_q, S_k)``: ``pooled`` divided by each block's number of pairs (mean weight)."""
        eq, ek = self.pool_edges()
        area = (eq.diff()[:, None] * ek.diff()[None, :]).to(self.pooled.dtype)  # (P_q, P_k)
        return self.pooled / area

    def select(self, batch: int | slice = slice(None), heads: int | slice | Tensor = slice(None)) -> AttentionStats:
        """The statistics of some batch elements and heads (dims are kept)."""
        b = slice(batch, batch + 1) if isinstance(batch, int) else batch
        h = slice(heads, heads + 1) if isinstance(heads, int) else heads
        out = {}
        for f in fields(self):
            x = getattr(self, f.name)
            out[f.name] = x if x is None or f.name in self._EDGES else x[b][:, h]
        return AttentionStats(**out)

    def to(self, *args, **kwargs) -> AttentionStats:
        """Move every tensor (``topk_index`` keeps int64 when a dtype is given)."""
        out = {}
        for f in fields(self):
            x = getattr(self, f.name)
            if x is None:
                out[f.name] = None
            elif f.name == "topk_index" or f.name in self._EDGES:
                out[f.name] = x.to(
                    *[a for a in args if not isinstance(a, torch.dtype)],
                    **{key: val for key, val in kwargs.items() if key != "dtype"},
                )
            else:
                out[f.name] = x.to(*args, **kwargs)
        return AttentionStats(**out)


def attention_stats(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    mask: Tensor | None = None,
    window: Window = None,
    alibi: Alibi = None,
    softcap: float | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
    topk: int = 8,
    pool: Pool = 256,
    return_output: bool = False,
    layout: Layout = "bhld",
) -> AttentionStats:
    """Exact attention statistics (and optionally the output) without the ``Lq x Lk`` weights.

    Args:
        q: ``(B, Hq, Lq, D)`` as in `attnkit.attention`.
        k: ``(B, Hk, Lk, D)``.
        v: ``(B, Hk, Lk, Dv)``.
        causal: as in `attnkit.attention`, and so are ``mask``, ``window``, ``alibi``, ``softcap``,
            ``scale``, ``dropout_p`` and ``backend``; dropout only affects ``output``, never the statistics.
        topk: how many of the largest weights to keep per query (``min(topk, Lk)``), >= 0.
        pool: how to pool the map: an int ``P >= 1`` for ``min(P, L)`` near-equal tiles; a 1-D int64
            tensor of segment edges ``[0, e_1, ..., e_S = L]`` (strictly increasing; for queries and
            keys alike, so ``Lq == Lk``), e.g. the token boundaries of a document's sections; or a
            pair ``(query_edges, key_edges)``. ``pooled`` then holds the exact sums of the weights
            over each (query segment, key segment) block, and `AttentionStats.segment_flow` the
            mean attention a token of one segment pays to another.
        return_output: also keep the attention output in ``.output`` (with autograd, as
            `attnkit.attention` returns it; the statistics themselves carry no gradient). Without
            dropout and with ``backend="auto"`` the output comes from the same pass as the
            statistics, at no extra cost (except under ``torch.compile``, which runs the forward
            and then the statistics pass, as with dropout).
        layout: ``"bhld"`` or ``"blhd"`` (``q (B, Lq, Hq, D)``...), as in `attnkit.attention`; ``output``
            comes in the same layout, the statistics are always ``(B, H, ...)``.

    Returns:
        `AttentionStats`; shapes in its docstring.

    Memory: ``O(B * H * ((Lq + Lk) * (D + topk) + P^2))`` plus one tile of scores.
    """
    if layout not in ("bhld", "blhd"):
        raise ValueError(f"attention_stats: layout must be 'bhld' (B, H, L, D) or 'blhd' (B, L, H, D), got {layout!r}")
    if layout == "blhd":
        q, k, v = to_bhld(q, k, v)  # (B, H, L, D) views
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 0:
        raise ValueError(f"attention_stats: topk must be an int >= 0, got {topk!r}")
    if not isinstance(return_output, bool):
        raise TypeError(f"attention_stats: return_output must be a bool, got {return_output!r}")
    options = dict(causal=causal, mask=mask, window=window, alibi=alibi, softcap=softcap, scale=scale)
    spec = build_spec(q, k, v, **options)  # validates once; the stats pass never applies dropout
    q_edges, k_edges = pool_segments(pool, spec.q_len, spec.kv_len, q.device)
    choice = choose(q, spec, False, "auto", "statistics")  # the statistics kernel for q's device
    if choice.backend is None:
        reasons = "; ".join(f"{name}: {why}" for name, why in choice.reasons.items())
        raise ValueError(f"attention_stats: no backend can run the statistics pass ({reasons})")
    run_stats = get_backend(choice.backend).run_stats
    # Traced by torch.compile: always the two passes (the guarded forward, then the statistics op).
    compiling = torch.compiler.is_compiling()
    if dropout_p == 0 and backend == "auto" and not compiling and nonfinite.find(q, k, v) is None:
        # One pass: the statistics kernel computes the output and its log-sum-exp as it goes.
        with torch.enable_grad() if return_output else torch.no_grad():
            result = run_stats(q, k, v, spec, None, topk=topk, pool=(q_edges, k_edges))
        out, lse = result.pop("output"), result.pop("lse")
    else:
        # A forward on the backend asked for (with dropout, or guarding non-finite inputs), then the
        # statistics pass from its log-sum-exp, that of the weights before dropout on every backend.
        with torch.enable_grad() if return_output else torch.no_grad():
            out, lse = attend(
                q, k, v, AttentionOptions(**options, dropout_p=dropout_p), return_lse=True, backend=backend
            )
        q_s, k_s = q.detach(), k.detach()
        if compiling or nonfinite.find(q_s, k_s, v.detach()) is not None:  # rows that read them have lse = NaN
            q_s, k_s = nonfinite.clean(q_s), nonfinite.clean(k_s)
        with torch.no_grad():
            result = run_stats(q_s, k_s, v.detach(), spec, lse.detach(), topk=topk, pool=(q_edges, k_edges))
    return AttentionStats(
        lse=lse.detach().to(spec.acc_dtype),
        output=None if not return_output else out.transpose(1, 2) if layout == "blhd" else out,
        query_edges=q_edges,
        key_edges=k_edges,
        **result,
    )


def _check_edges(name: str, edges, length: int, device: torch.device) -> Tensor:
    """Validate segment edges ``[0, e_1, ..., e_S = length]``; returns them as int64 on ``device``."""
    if not isinstance(edges, Tensor) or edges.dim() != 1 or edges.is_floating_point() or edges.dtype == torch.bool:
        got = f"{edges.dtype} of shape {tuple(edges.shape)}" if isinstance(edges, Tensor) else type(edges).__name__
        raise ValueError(f"attention_stats: {name} must be a 1-D integer tensor of segment edges, got {got}")
    e = edges.to(device=device, dtype=torch.int64)
    if torch.compiler.is_compiling() and e.numel() >= 2:  # traced: the values are checked when the graph runs
        rises = (e[0] == 0) & (e[-1] == length) & (e.diff() > 0).all()
        torch._assert_async(rises, f"attention_stats: {name} must rise strictly from 0 to the length {length}")
        return e
    if e.numel() < 2 or int(e[0]) != 0 or int(e[-1]) != length or not bool((e.diff() > 0).all()):
        shown = e.tolist() if e.numel() <= 12 else [*e[:6].tolist(), "...", *e[-3:].tolist()]
        raise ValueError(
            f"attention_stats: {name} must rise strictly from 0 to the length {length} "
            f"([0, e_1, ..., {length}], one segment at least), got {shown}"
        )
    return e


def pool_segments(pool: Pool, q_len: int, kv_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(query_edges, key_edges)`` for `attention_stats`'s ``pool`` argument (see there)."""
    if isinstance(pool, int) and not isinstance(pool, bool):
        if pool < 1:
            raise ValueError(f"attention_stats: pool must be an int >= 1 or segment edges, got {pool!r}")
        return (
            stats_kernel.pool_edges(q_len, min(pool, q_len), device),
            stats_kernel.pool_edges(kv_len, min(pool, kv_len), device),
        )
    if isinstance(pool, Tensor):
        if q_len != kv_len:
            raise ValueError(
                f"attention_stats: one tensor of segment edges serves queries and keys alike, but Lq={q_len} != "
                f"Lk={kv_len}; pass pool=(query_edges, key_edges)"
            )
        edges = _check_edges("pool", pool, q_len, device)
        return edges, edges
    if isinstance(pool, tuple | list) and len(pool) == 2:
        return _check_edges("pool[0] (query edges)", pool[0], q_len, device), _check_edges(
            "pool[1] (key edges)", pool[1], kv_len, device
        )
    raise TypeError(
        f"attention_stats: pool must be an int >= 1, a 1-D tensor of segment edges or a pair "
        f"(query_edges, key_edges), got {type(pool).__name__}"
    )
