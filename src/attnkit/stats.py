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
from attnkit.functional import attend, build_spec
from attnkit.kernels import nonfinite
from attnkit.kernels import stats as stats_kernel
from attnkit.options import Alibi, AttentionOptions, Window

__all__ = ["AttentionStats", "attention_stats"]


@dataclass
class AttentionStats:
    """Exact statistics of one attention call, per batch element and query head.

    Shapes (``K = min(topk, Lk)``, ``P_q = min(pool, Lq)``, ``P_k = min(pool, Lk)``):

    * ``lse (B, H, Lq)``: natural-log log-sum-exp of each row's scores (``-inf``: no allowed key).
    * ``entropy (B, H, Lq)``: ``-sum_j p_ij log p_ij`` in nats (0 for an empty row).
    * ``mean_distance (B, H, Lq)``: ``sum_j p_ij |i' - j|`` with ``i' = i + Lk - Lq``.
    * ``received (B, H, Lk)``: ``sum_i p_ij``, the attention each key receives.
    * ``topk_index (B, H, Lq, K)`` int64 and ``topk_weight (B, H, Lq, K)``: the largest weights
      of each row, largest first (weight 0 pads rows with fewer than ``K`` allowed keys).
    * ``pooled (B, H, P_q, P_k)``: the exact map summed into tiles; row ``r`` covers queries
      ``[floor(r Lq / P_q), floor((r+1) Lq / P_q))``, columns likewise (see `pool_edges`).
    * ``output (B, H, Lq, Dv)`` or None: the attention output, when asked for.

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

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(B, H, Lq, Lk)`` of the attention these statistics describe."""
        B, H, Lq = self.entropy.shape
        return B, H, Lq, self.received.shape[-1]

    def pool_edges(self) -> tuple[Tensor, Tensor]:
        """``(P_q + 1,)`` query and ``(P_k + 1,)`` key edges of the pooled tiles."""
        _, _, Lq, Lk = self.shape
        Pq, Pk = self.pooled.shape[-2:]
        dev = self.pooled.device
        return stats_kernel.pool_edges(Lq, Pq, dev), stats_kernel.pool_edges(Lk, Pk, dev)

    def pooled_density(self) -> Tensor:
        """``(B, H, P_q, P_k)``: ``pooled`` divided by each tile's number of pairs (mean weight)."""
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
            out[f.name] = None if x is None else x[b][:, h]
        return AttentionStats(**out)

    def to(self, *args, **kwargs) -> AttentionStats:
        """Move every tensor (``topk_index`` keeps int64 when a dtype is given)."""
        out = {}
        for f in fields(self):
            x = getattr(self, f.name)
            if x is None:
                out[f.name] = None
            elif f.name == "topk_index":
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
    pool: int = 256,
    return_output: bool = False,
) -> AttentionStats:
    """Exact attention statistics (and optionally the output) without the ``Lq x Lk`` weights.

    Args:
        q, k, v: ``(B, Hq, Lq, D)``, ``(B, Hk, Lk, D)``, ``(B, Hk, Lk, Dv)`` as in `attnkit.attention`.
        causal, mask, window, alibi, softcap, scale, dropout_p, backend: exactly as in
            `attnkit.attention`; dropout only affects ``output``, never the statistics.
        topk: how many of the largest weights to keep per query (``min(topk, Lk)``), >= 0.
        pool: side of the pooled map, >= 1 (``P_q = min(pool, Lq)``, ``P_k = min(pool, Lk)``).
        return_output: also keep the attention output in ``.output`` (with autograd, as
            `attnkit.attention` returns it; the statistics themselves carry no gradient).

    Returns:
        `AttentionStats`; shapes in its docstring.

    Memory: ``O(B * H * ((Lq + Lk) * (D + topk) + P^2))`` plus one tile of scores.
    """
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 0:
        raise ValueError(f"attention_stats: topk must be an int >= 0, got {topk!r}")
    if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1:
        raise ValueError(f"attention_stats: pool must be an int >= 1, got {pool!r}")
    if not isinstance(return_output, bool):
        raise TypeError(f"attention_stats: return_output must be a bool, got {return_output!r}")
    options = dict(causal=causal, mask=mask, window=window, alibi=alibi, softcap=softcap, scale=scale)
    spec = build_spec(q, k, v, **options)  # validates once; the stats pass never applies dropout
    # One fast forward gives the output and the log-sum-exp; its lse is that of the weights
    # before dropout on every backend, which is what the statistics describe.
    with torch.enable_grad() if return_output else torch.no_grad():
        out, lse = attend(q, k, v, AttentionOptions(**options, dropout_p=dropout_p), return_lse=True, backend=backend)
    choice = choose(q, spec, False, "auto", "statistics")  # the statistics kernel for q's device
    if choice.backend is None:
        reasons = "; ".join(f"{name}: {why}" for name, why in choice.reasons.items())
        raise ValueError(f"attention_stats: no backend can run the statistics pass ({reasons})")
    run_stats = get_backend(choice.backend).run_stats
    q_s, k_s = q.detach(), k.detach()
    if nonfinite.find(q_s, k_s, v.detach()) is not None:  # rows that read them already carry lse = NaN
        q_s, k_s = nonfinite.clean(q_s), nonfinite.clean(k_s)
    with torch.no_grad():
        result = run_stats(q_s, k_s, v.detach(), spec, lse.detach(), topk=topk, pool=pool)
    return AttentionStats(
        lse=lse.detach().to(spec.acc_dtype),
        output=out if return_output else None,
        **result,
    )
