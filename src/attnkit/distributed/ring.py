"""Ring attention: exact attention over a sequence split across the ranks of a process group.

Each of the ``P`` ranks holds a shard of the queries, keys and values (see
`attnkit.distributed.sharding` for the two layouts). The key/value shards travel around
the ring ``0 -> 1 -> ... -> P-1 -> 0``; at step ``s`` rank ``r`` holds the shard of rank
``(r - s) mod P`` and computes its queries against it while the next shard is already in
flight (``isend``/``irecv`` posted with ``batch_isend_irecv`` *before* the compute, waited
*after* it), so the transfer hides behind the block compute once blocks are long enough
(``docs/distributed.md`` gives the model). Each block yields a normalised partial output
and its log-sum-exp; partials merge exactly in fp32 (`attnkit.kernels.merge`). This is
the blockwise scheme of Liu, Zaharia and Abbeel, "Ring Attention with Blockwise
Transformers for Near-Infinite Context" (2023).

Backward (FlashAttention style): every rank keeps its queries, the *global* output and
log-sum-exp, and recomputes each block's probabilities exactly from them
(`attnkit.kernels.tiled.backward`). The key/value shards go around the ring again; with
each travels an fp32 accumulator of its ``dK``/``dV``, one hop behind, which ends at the
shard's owner after ``P`` hops. ``dQ`` stays local.

Causal masking, windows and ALiBi are evaluated at *global* positions: a block is a query
segment starting at global position ``a`` against a key segment starting at ``b``, and
its spec has ``align = a - b`` (`AttentionSpec.align`). Blocks that causal/window mask
entirely are skipped without compute (the transfer still happens: every rank's shard
must reach every other rank).

Failures: every wait is bounded by the process group's timeout (``timeout=`` of
``init_process_group``); a peer that died or hangs raises `PeerError` naming the step,
the peers and the timeout instead of hanging. On NCCL the waits are asynchronous on the
GPU; there the NCCL watchdog enforces the same timeout (it aborts the process).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from attnkit.distributed.sharding import Layout, Segment, check_layout, segments
from attnkit.functional import Alibi, Window, build_spec
from attnkit.kernels import tiled
from attnkit.kernels.merge import merge_partials
from attnkit.spec import AttentionSpec

__all__ = ["PeerError", "Ring", "overlap_block_length", "pack", "ring_attention"]

_TAG_KV, _TAG_DKV = 11, 12  # gloo matches messages by (peer, tag): K/V and dK/dV never mix


class PeerError(RuntimeError):
    """A peer of the group did not deliver in time (it died, hung, or holds a different shape)."""


# --------------------------------------------------------------------- the ring
class Ring:
    """The ring's communication: who is next and previous, and one bounded exchange step."""

    def __init__(self, group) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "ring_attention: torch.distributed is not initialised; call "
                "torch.distributed.init_process_group (torchrun does it) or use attnkit.attention in one process"
            )
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world = dist.get_world_size(self.group)
        self.next = dist.get_global_rank(self.group, (self.rank + 1) % self.world)
        self.prev = dist.get_global_rank(self.group, (self.rank - 1) % self.world)
        self.timeout = group_timeout(self.group)

    def exchange(self, send: Tensor, tag: int) -> tuple[Tensor, list]:
        """Post "send ``send`` to next, receive the same shape from previous"; returns (buffer, works)."""
        recv = torch.empty_like(send)
        ops = [
            dist.P2POp(dist.isend, send, self.next, self.group, tag),
            dist.P2POp(dist.irecv, recv, self.prev, self.group, tag),
        ]
        return recv, dist.batch_isend_irecv(ops)

    def wait(self, works: list, what: str, step: int) -> None:
        try:
            for w in works:
                w.wait()
        except Exception as e:  # gloo raises RuntimeError; wrap it with what we were doing
            raise PeerError(
                f"ring_attention: rank {self.rank} of {self.world} waited for {what} at step {step} "
                f"(receiving from global rank {self.prev}, sending to {self.next}) and failed: a peer died, hangs, "
                f"or passed a differently shaped shard (every rank must pass the same shapes). "
                f"Process-group timeout: {self.timeout}. Cause: {e}"
            ) from e


def group_timeout(group) -> str:
    """The process group's timeout, for error messages (``timeout=`` of ``init_process_group``)."""
    group = group if group is not None else dist.group.WORLD
    for device in ("cpu", "cuda"):
        try:  # private API; if it moves, the message still stands without the number
            t = group._get_backend(torch.device(device)).options._timeout
            return f"{t.total_seconds():g} s"
        except Exception:
            continue
    return "the timeout given to init_process_group"


def pack(*xs: Tensor, dtype: torch.dtype) -> Tensor:
    """One flat contiguous buffer of several tensors (one message instead of several)."""
    return torch.cat([x.reshape(-1).to(dtype) for x in xs])


def _unpack(buf: Tensor, shapes: Sequence[torch.Size]) -> list[Tensor]:
    out, n = [], 0
    for shape in shapes:
        size = shape.numel()
        out.append(buf[n : n + size].view(shape))
        n += size
    return out


# ------------------------------------------------------------------- the blocks
@dataclasses.dataclass(frozen=True)
class _Block:
    """One query segment against one key segment: slices into the local tensors and the spec."""

    q: slice
    k: slice
    spec: AttentionSpec


def _blocks(base: AttentionSpec, q_segs: list[Segment], k_segs: list[Segment], seq_len: int) -> list[_Block]:
    """The (query segment, key segment) pairs with at least one allowed (query, key) pair.

    Keys at global positions ``>= seq_len`` are padding and are cut off here.
    """
    blocks = []
    for qs in q_segs:
        for ks in k_segs:
            nk = min(ks.length, seq_len - ks.start)  # real keys in this segment
            if nk <= 0:
                continue
            spec = dataclasses.replace(base, q_len=qs.length, kv_len=nk, align=qs.start - ks.start)
            lo, hi = spec.key_range(0, qs.length)
            if hi <= lo:
                continue  # causal/window mask the whole block
            blocks.append(_Block(slice(qs.local, qs.local + qs.length), slice(ks.local, ks.local + nk), spec))
    return blocks


def _forward_step(q, k_blk, v_blk, blocks, out, lse) -> None:
    """Merge this key/value shard's contribution into ``out (B, Hq, L, Dv)`` / ``lse (B, Hq, L)`` in place (fp32)."""
    for b in blocks:
        o, l = tiled.forward(q[:, :, b.q], k_blk[:, :, b.k], v_blk[:, :, b.k], b.spec, out_dtype=out.dtype)
        out[:, :, b.q], lse[:, :, b.q] = merge_partials(out[:, :, b.q], lse[:, :, b.q], o, l)


def _backward_step(dout, q, k_blk, v_blk, out, lse, blocks, dq, dk, dv) -> None:
    """Accumulate this shard's blocks into ``dq`` (local queries) and ``dk``, ``dv`` (the shard), fp32."""
    for b in blocks:
        gq, gk, gv, _ = tiled.backward(
            dout[:, :, b.q], q[:, :, b.q], k_blk[:, :, b.k], v_blk[:, :, b.k], out[:, :, b.q], lse[:, :, b.q],
            b.spec, grad_dtype=dq.dtype,
        )  # fmt: skip
        dq[:, :, b.q] += gq
        dk[:, :, b.k] += gk
        dv[:, :, b.k] += gv


class _RingAttention(torch.autograd.Function):
    """Forward saves the local ``q, k, v``, the global ``out`` and ``lse``; backward rotates K/V and dK/dV."""

    @staticmethod
    def forward(ctx, q, k, v, base: AttentionSpec, ring: Ring, layout: Layout, seq_len: int):
        P, r = ring.world, ring.rank
        acc = base.acc_dtype
        q_segs = segments(r, P, layout, q.shape[2])
        out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=acc, device=q.device)  # (B, Hq, L, Dv)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=acc, device=q.device)  # (B, Hq, L)
        cur = pack(k, v, dtype=k.dtype)
        for step in range(P):
            src = (r - step) % P  # whose key/value shard we hold
            if step < P - 1:
                nxt, works = ring.exchange(cur, _TAG_KV)  # in flight while we compute
            k_blk, v_blk = _unpack(cur, (k.shape, v.shape))
            _forward_step(
                q, k_blk, v_blk, _blocks(base, q_segs, segments(src, P, layout, k.shape[2]), seq_len), out, lse
            )
            if step < P - 1:
                ring.wait(works, "the next key/value shard", step)
                cur = nxt
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.base, ctx.ring, ctx.layout, ctx.seq_len = base, ring, layout, seq_len
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        base, ring, layout, seq_len = ctx.base, ctx.ring, ctx.layout, ctx.seq_len
        P, r = ring.world, ring.rank
        acc = base.acc_dtype
        dout = dout.contiguous()
        q_segs = segments(r, P, layout, q.shape[2])
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        cur = pack(k, v, dtype=k.dtype)
        dkv_works, dkv_in = None, None
        for step in range(P):
            src = (r - step) % P
            if step < P - 1:
                nxt, kv_works = ring.exchange(cur, _TAG_KV)
            k_blk, v_blk = _unpack(cur, (k.shape, v.shape))
            dk = torch.zeros(k.shape, dtype=acc, device=k.device)
            dv = torch.zeros(v.shape, dtype=acc, device=v.device)
            blocks = _blocks(base, q_segs, segments(src, P, layout, k.shape[2]), seq_len)
            _backward_step(dout, q, k_blk, v_blk, out, lse, blocks, dq, dk, dv)
            dkv = pack(dk, dv, dtype=acc)
            if dkv_works is not None:  # the accumulator of this shard, from the ranks before us
                ring.wait(dkv_works, "the dK/dV accumulator", step)
                dkv += dkv_in
            if P > 1:  # pass it on; after P hops it reaches the shard's owner
                dkv_in, dkv_works = ring.exchange(dkv, _TAG_DKV)
            else:
                dkv_in = dkv
            if step < P - 1:
                ring.wait(kv_works, "the next key/value shard", step)
                cur = nxt
        if dkv_works is not None:
            ring.wait(dkv_works, "this rank's finished dK/dV", P)
        dk, dv = _unpack(dkv_in, (k.shape, v.shape))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


# ------------------------------------------------------------------- public API
def ring_attention(
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
    """Exact attention over a sequence sharded across the ranks of ``group``, by ring exchange.

    Every rank calls it with its own shard (`attnkit.distributed.shard_sequence` cuts one);
    the result equals `attnkit.attention` on the full sequence, restricted to the rank's
    positions, and so do the gradients of ``q``, ``k`` and ``v``.

    Args:
        q: this rank's queries ``(B, Hq, L / P, D)``.
        k: this rank's keys ``(B, Hk, L / P, D)``, ``Hk`` divides ``Hq`` (GQA/MQA).
        v: this rank's values ``(B, Hk, L / P, Dv)``.
        causal, window, alibi, softcap, scale: as in `attnkit.attention`, at *global* positions
            (self-attention: the full query and key sequences are the same length).
        group: the process group (None: the default group). Every rank passes the same shapes.
        layout: ``"contiguous"`` or ``"zigzag"`` (balanced causal work); must match the sharding.
        seq_len: the true global length when the sequence was padded to split evenly
            (`attnkit.distributed.padded_length`); keys at positions ``>= seq_len`` are never
            attended, outputs at those query positions are meaningless. None: ``P * L / P``.

    Returns:
        ``out (B, Hq, L / P, Dv)`` in ``q.dtype`` (accumulated and merged in fp32).

    Raises:
        PeerError: a peer died, hung past the process group's timeout, or passed other shapes.
    """
    check_layout(layout, "ring_attention")
    base = build_spec(q, k, v, causal=causal, window=window, alibi=alibi, softcap=softcap, scale=scale)
    if q.shape[2] != k.shape[2]:
        raise ValueError(
            f"ring_attention: q and k shards must have the same length (self-attention over one sequence); "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    if layout == "zigzag" and q.shape[2] % 2 != 0:
        raise ValueError(
            f"ring_attention: a zigzag shard holds two equal chunks, so its length must be even; got {q.shape[2]} "
            "(shard with attnkit.distributed.shard_sequence, which pads)"
        )
    ring = Ring(group)
    total = ring.world * q.shape[2]
    if seq_len is None:
        seq_len = total
    elif isinstance(seq_len, bool) or not isinstance(seq_len, int) or not 0 < seq_len <= total:
        raise ValueError(f"ring_attention: seq_len must be an int in [1, {total}] (P * shard length), got {seq_len!r}")
    return _RingAttention.apply(q, k, v, base, ring, layout, seq_len)


# ------------------------------------------------------------ the overlap model
def overlap_block_length(
    bandwidth_bytes_per_s: float,
    flops_per_s: float,
    *,
    heads: int = 1,
    kv_heads: int | None = None,
    itemsize: int = 2,
    causal: bool = False,
    backward: bool = False,
    latency_s: float = 0.0,
    batch_heads_dim: int | None = None,
) -> float:
    """The shard length ``n = L / P`` from which one K/V hop hides behind one block of compute.

    A ring step computes ``n`` queries against ``n`` keys while the next K/V shard travels:

    * compute: ``4 * B * H * n^2 * D * c / F`` seconds forward (``c = 1/2`` for balanced causal
      work: zigzag), ``2.5x`` that backward (the FLOP convention of ``ARCHITECTURE.md``);
    * transfer: ``2 * B * Hk * n * D * e / BW`` forward (K and V, ``e`` bytes each), and
      ``2 * B * Hk * n * D * (e + 4) / BW`` backward (K/V again plus the fp32 dK/dV accumulator).

    Setting them equal, ``B`` and ``D`` cancel: forward ``n* = (Hk / H) * e * F / (2 c BW)``,
    backward ``n* = (Hk / H) * (e + 4) * F / (5 c BW)``. With a per-hop latency ``latency_s``
    the transfer gains ``alpha`` and ``B * H * D`` no longer cancels: pass
    ``batch_heads_dim = B * H * D`` to include it (the quadratic is then solved for ``n``).

    Args:
        bandwidth_bytes_per_s: one direction of the link between ring neighbours.
        flops_per_s: the attention throughput one device achieves (not its peak).
        heads, kv_heads: query and key/value heads (only the ratio matters without latency).
        itemsize: bytes per element of K and V (2 for bf16).

    Returns:
        ``n*``: blocks of at least this many tokens per rank hide the transfer.
    """
    kv_heads = heads if kv_heads is None else kv_heads
    c = 0.5 if causal else 1.0
    ratio = kv_heads / heads
    if backward:
        compute_per_n2 = 2.5 * 4 * c / flops_per_s  # seconds per (n^2 * B * H * D)
        bytes_per_n = 2 * ratio * (itemsize + 4)  # per (n * B * H * D)
    else:
        compute_per_n2 = 4 * c / flops_per_s
        bytes_per_n = 2 * ratio * itemsize
    linear = bytes_per_n / bandwidth_bytes_per_s  # seconds per (n * B * H * D)
    if latency_s == 0.0 or batch_heads_dim is None:
        return linear / compute_per_n2
    # a n^2 = b n + alpha, with a = compute_per_n2 * BHD, b = linear * BHD
    a, b = compute_per_n2 * batch_heads_dim, linear * batch_heads_dim
    return (b + (b * b + 4 * a * latency_s) ** 0.5) / (2 * a)
