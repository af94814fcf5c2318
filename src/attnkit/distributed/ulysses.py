"""Ulysses attention: trade the sequence split for a head split with two all-to-alls.

Jacobs et al., "DeepSpeed Ulysses: System Optimizations for Enabling Training of Extreme
Long Sequence Transformer Models" (2023). Each rank holds ``(B, H, L / P, D)``; one
all-to-all turns that into ``(B, H / P, L, D)``: all positions, ``1 / P`` of the heads.
Attention is then an ordinary single-process call (`attnkit.attention`, any backend, any
feature), and a second all-to-all brings the output back to the sequence split.

Against the ring: per rank it sends ``O(L / P * H * D)`` per exchange regardless of ``P``
(the ring sends ``(P - 1)`` shards), with two all-to-alls per tensor and no overlap with
compute; it needs ``P`` to divide the query heads (key/value heads that do not divide are
replicated to the query heads first, which costs memory and bytes), and holds the full
``L`` for ``H / P`` heads. Pick by topology: all-to-all is cheap inside one NVLink node,
the ring's neighbour-to-neighbour traffic suits slower links between nodes.

gloo implements ``all_to_all_single`` (``ProcessGroupGloo::alltoall_base``), so the same
code runs on CPU and on NCCL.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from attnkit.distributed.ring import agreed_arguments, peer_failed
from attnkit.distributed.sharding import Layout, merge_shards, segments
from attnkit.functional import attend
from attnkit.options import Alibi, AttentionOptions, Window
from attnkit.spec import AttentionSpec

__all__ = ["ulysses_attention"]


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` over the first dimension; its gradient is the same exchange."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return _all_to_all(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _all_to_all(grad, ctx.group), None


def _all_to_all(x: Tensor, group) -> Tensor:
    """Row ``p`` of ``x (P, ...)`` goes to rank ``p``; row ``p`` of the result came from rank ``p``."""
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # contiguous, whatever x's strides were
    try:
        dist.all_to_all_single(out, x, group=group)
    except RuntimeError as e:  # gloo: a closed connection or the timeout; say what we were doing
        raise peer_failed("ulysses_attention", group, f"in the all-to-all of a {tuple(x.shape)} tensor", e) from e
    return out


def _seq_to_heads(x: Tensor, group, world: int, layout: Layout) -> Tensor:
    """``(B, H, L / P, D)`` sequence shard -> ``(B, H / P, L_pad, D)``: every position, this rank's heads."""
    B, H, Ls, D = x.shape
    x = x.reshape(B, world, H // world, Ls, D).transpose(0, 1)  # (P, B, H/P, Ls, D): row p goes to rank p
    x = _AllToAll.apply(x.contiguous(), group)  # (P, B, H/P, Ls, D): row p came from rank p
    return merge_shards(list(x.unbind(0)), layout=layout)  # (B, H/P, P * Ls, D) in sequence order


def _heads_to_seq(x: Tensor, group, world: int, rank: int, layout: Layout) -> Tensor:
    """Inverse of `_seq_to_heads`: ``(B, H / P, L_pad, D)`` -> ``(B, H, L_pad / P, D)``."""
    B, Hp, L, D = x.shape
    Ls = L // world
    parts = []
    for p in range(world):  # rank p's positions, in its local order
        segs = segments(p, world, layout, Ls)
        parts.append(torch.cat([x[:, :, s.start : s.start + s.length] for s in segs], dim=2))  # (B, H/P, Ls, D)
    x = _AllToAll.apply(torch.stack(parts).contiguous(), group)  # (P, B, H/P, Ls, D): row p = heads of rank p
    return x.transpose(0, 1).reshape(B, Hp * world, Ls, D)  # (B, H, Ls, D)


def _check_heads(spec: AttentionSpec, world: int) -> None:
    if spec.q_heads % world != 0:
        raise ValueError(
            f"ulysses_attention: the query heads Hq={spec.q_heads} must be divisible by the world size P={world}; "
            "use ring_attention, which has no such constraint"
        )


def ulysses_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    window: Window = None,
    alibi: Alibi = None,
    softcap: float | None = None,
    scale: float | None = None,
    group: dist.ProcessGroup | None = None,
    layout: Layout = "contiguous",
    seq_len: int | None = None,
) -> Tensor:
    """Exact attention over a sequence sharded across ``group``, by all-to-all between sequence and heads.

    Same signature, semantics and sharding as `attnkit.distributed.ring_attention`; the
    choice between them is about the interconnect (see the module docstring).

    Args:
        q: ``(B, Hq, L / P, D)`` with ``P`` dividing ``Hq``.
        k: ``(B, Hk, L / P, D)``; if ``P`` does not divide ``Hk``, keys and values are
            replicated to ``Hq`` heads before the exchange.
        v: ``(B, Hk, L / P, Dv)``.
        causal: as in `ring_attention`, and so are ``window``, ``alibi``, ``softcap``, ``scale``,
            ``group``, ``layout`` and ``seq_len``.

    Returns:
        ``out (B, Hq, L / P, Dv)`` in ``q.dtype``.

    Raises:
        PeerError, TypeError, ValueError: as in `ring_attention` (the same `agreed_arguments`).
    """
    options = dict(causal=causal, window=window, alibi=alibi, softcap=softcap, scale=scale)
    spec, seq_len = agreed_arguments(
        "ulysses_attention", q, k, v, group=group, layout=layout, seq_len=seq_len, options=options, check=_check_heads
    )
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    Hq, Ls = spec.q_heads, q.shape[2]
    total = world * Ls
    if spec.kv_heads % world != 0:
        k = k.repeat_interleave(spec.group, dim=1)  # (B, Hq, Ls, D): query head h reads key head h // G
        v = v.repeat_interleave(spec.group, dim=1)  # (B, Hq, Ls, Dv)
    slopes = None
    if spec.alibi_slopes is not None:  # this rank's query heads only
        h = Hq // world
        slopes = spec.alibi_slopes[rank * h : (rank + 1) * h]
    qh = _seq_to_heads(q, group, world, layout)[:, :, :seq_len]  # (B, Hq/P, seq_len, D)
    kh = _seq_to_heads(k, group, world, layout)[:, :, :seq_len]  # (B, Hk/P, seq_len, D)
    vh = _seq_to_heads(v, group, world, layout)[:, :, :seq_len]  # (B, Hk/P, seq_len, Dv)
    # On behalf of the caller's call (which hooks already saw): the un-hooked entry.
    options = AttentionOptions(causal=causal, window=window, alibi=slopes, softcap=softcap, scale=spec.scale)
    out = attend(qh, kh, vh, options)
    if seq_len < total:  # padded query positions: zeros, dropped by unsharding
        out = torch.nn.functional.pad(out, (0, 0, 0, total - seq_len))  # (B, Hq/P, L_pad, Dv)
    return _heads_to_seq(out, group, world, rank, layout)
