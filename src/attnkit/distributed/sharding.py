"""How a sequence is split across the ranks of a process group, and how it is put back.

Two layouts, both cutting the (padded) sequence into equal chunks:

* ``contiguous``: ``P`` chunks, rank ``r`` holds chunk ``r``. Simple, but under a causal
  mask rank ``P - 1`` does ``P`` blocks of work while rank 0 does one.
* ``zigzag``: ``2P`` chunks, rank ``r`` holds chunks ``r`` and ``2P - 1 - r`` (an early
  and a late one), so every rank does the same causal work. This is the layout of
  zhuzilin/ring-flash-attention (``zigzag_ring_flash_attn``) and of Megatron-LM's
  context parallelism (load balancing by ``2 * cp_size`` chunks)::

      P = 2, 4 chunks of length C       rank 0: [c0 | c3]    rank 1: [c1 | c2]

A length that does not divide is padded at the end with zeros (`shard_sequence` pads,
`unshard_sequence` / `merge_shards` trim). The attention functions take ``seq_len``, the
true length, and never let a query see a padded key; the outputs at padded query
positions are meaningless and are dropped by the unsharding.

Every function here is pure indexing except `shard_sequence` / `unshard_sequence`, which
only ask the process group for the rank and world size (and, for unsharding, gather).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

Layout = Literal["contiguous", "zigzag"]
"""How a sequence is split over ``P`` ranks: ``"contiguous"`` chunks, or ``"zigzag"`` (chunks ``r`` and ``2P-1-r``)."""
LAYOUTS: tuple[str, ...] = ("contiguous", "zigzag")
"""The names `Layout` allows."""

__all__ = [
    "LAYOUTS",
    "Layout",
    "Segment",
    "merge_shards",
    "padded_length",
    "segments",
    "shard",
    "shard_sequence",
    "unshard_sequence",
]


class Segment(NamedTuple):
    """A run of positions a rank holds: local ``[local, local + length)`` = global ``[start, start + length)``."""

    local: int
    start: int
    length: int


def check_layout(layout: str, who: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"{who}: layout must be one of {LAYOUTS}, got {layout!r}")


def num_chunks(world: int, layout: Layout) -> int:
    """How many equal chunks the sequence is cut into: ``P`` (contiguous) or ``2P`` (zigzag)."""
    check_layout(layout, "num_chunks")
    return world if layout == "contiguous" else 2 * world


def padded_length(seq_len: int, world: int, layout: Layout) -> int:
    """The smallest length ``>= seq_len`` that ``layout`` splits evenly over ``world`` ranks."""
    n = num_chunks(world, layout)
    return -(-seq_len // n) * n


def chunk_ids(rank: int, world: int, layout: Layout) -> tuple[int, ...]:
    """The chunks rank ``rank`` holds, in local order."""
    check_layout(layout, "chunk_ids")
    if not 0 <= rank < world:
        raise ValueError(f"chunk_ids: rank must lie in [0, {world}), got {rank}")
    return (rank,) if layout == "contiguous" else (rank, 2 * world - 1 - rank)


def segments(rank: int, world: int, layout: Layout, shard_len: int) -> list[Segment]:
    """The global positions of a rank's shard of ``shard_len`` positions.

    Example: ``segments(0, 2, "zigzag", 6)`` is ``[Segment(0, 0, 3), Segment(3, 9, 3)]``.
    """
    ids = chunk_ids(rank, world, layout)
    if shard_len % len(ids) != 0:
        raise ValueError(
            f"segments: a {layout} shard holds {len(ids)} chunks, so its length must be a multiple of "
            f"{len(ids)}; got {shard_len}"
        )
    c = shard_len // len(ids)
    return [Segment(n * c, cid * c, c) for n, cid in enumerate(ids)]


def shard(x: Tensor, rank: int, world: int, *, layout: Layout = "contiguous", dim: int = 2) -> Tensor:
    """Rank ``rank``'s shard of a full sequence ``x`` along ``dim`` (padded with zeros if needed).

    Args:
        x: any tensor, the sequence along ``dim`` (``(B, H, L, D)``: ``dim=2``).

    Returns:
        ``x`` restricted to the rank's positions, length ``padded_length(L, world, layout) / world``
        along ``dim`` (a copy).
    """
    L = x.shape[dim]
    total = padded_length(L, world, layout)
    if total != L:
        pad_shape = list(x.shape)
        pad_shape[dim] = total - L
        x = torch.cat([x, x.new_zeros(pad_shape)], dim=dim)  # (..., total, ...)
    shard_len = total // world
    parts = [x.narrow(dim, seg.start, seg.length) for seg in segments(rank, world, layout, shard_len)]
    return torch.cat(parts, dim=dim) if len(parts) > 1 else parts[0].clone()


def merge_shards(shards: list[Tensor], *, layout: Layout = "contiguous", seq_len: int | None = None, dim: int = 2):
    """Inverse of `shard`: put every rank's shard back into sequence order and trim the padding.

    Args:
        shards: one tensor per rank, in rank order, each with the shard length along ``dim``.
        seq_len: the true length (None: keep every position, padding included).

    Returns:
        The full sequence, length ``seq_len`` along ``dim``. Differentiable.
    """
    world = len(shards)
    shard_len = shards[0].shape[dim]
    pieces: dict[int, Tensor] = {}
    for rank, x in enumerate(shards):
        if x.shape[dim] != shard_len:
            raise ValueError(f"merge_shards: every shard must have length {shard_len} along dim {dim}, got {x.shape}")
        for seg in segments(rank, world, layout, shard_len):
            pieces[seg.start] = x.narrow(dim, seg.local, seg.length)
    full = torch.cat([pieces[s] for s in sorted(pieces)], dim=dim)
    if seq_len is not None:
        if seq_len > full.shape[dim]:
            raise ValueError(f"merge_shards: seq_len={seq_len} exceeds the {full.shape[dim]} positions held")
        full = full.narrow(dim, 0, seq_len)
    return full


def _rank_world(group) -> tuple[int, int]:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "attnkit.distributed: torch.distributed is not initialised; call "
            "torch.distributed.init_process_group (torchrun does it for you) first"
        )
    return dist.get_rank(group), dist.get_world_size(group)


def shard_sequence(x: Tensor, *, group=None, layout: Layout = "contiguous", dim: int = 2) -> Tensor:
    """This process's shard of the full sequence ``x`` (every rank passes the same ``x``).

    ``x (B, H, L, D)`` gives ``(B, H, L_pad / P, D)`` with ``L_pad = padded_length(L, P, layout)``;
    pass ``seq_len=L`` to the attention functions when ``L_pad != L``.
    """
    rank, world = _rank_world(group)
    return shard(x, rank, world, layout=layout, dim=dim)


def unshard_sequence(x: Tensor, *, group=None, layout: Layout = "contiguous", seq_len: int | None = None, dim: int = 2):
    """Gather every rank's shard and return the full sequence on every rank (no gradient).

    ``x (B, H, L_pad / P, D)`` gives ``(B, H, seq_len or L_pad, D)``. Uses ``all_gather``; it is
    meant for outputs and evaluation, so it does not carry gradients.
    """
    import torch.distributed as dist

    _, world = _rank_world(group)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous(), group=group)
    return merge_shards(parts, layout=layout, seq_len=seq_len, dim=dim)
