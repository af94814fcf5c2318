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

Peers: before any data moves, the ranks exchange a fixed-size descriptor of their shards
and options in one small ``all_gather`` (`agreed_arguments`, shared with Ulysses); if
they disagree, every rank raises `PeerError` naming the fields, the ranks and the values,
instead of receiving into a buffer of the wrong size. After that, every wait is bounded by
the process group's timeout (``timeout=`` of ``init_process_group``); a peer that died,
hangs or gave up raises `PeerError` naming the step, the peers and the timeout, with the
collective's error as ``__cause__``. On NCCL the waits are asynchronous on the GPU; there
the NCCL watchdog enforces the same timeout (it aborts the process).
"""

from __future__ import annotations

import dataclasses
import math
import struct
import zlib
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from attnkit.distributed.sharding import LAYOUTS, Layout, Segment, check_layout, segments
from attnkit.functional import Alibi, Window, build_spec
from attnkit.kernels import tiled
from attnkit.kernels.merge import merge_partials
from attnkit.spec import AttentionSpec

__all__ = [
    "DESCRIPTOR_WORDS",
    "PeerError",
    "Ring",
    "agreed_arguments",
    "overlap_block_length",
    "pack",
    "ring_attention",
]

_TAG_KV, _TAG_DKV = 11, 12  # gloo matches messages by (peer, tag): K/V and dK/dV never mix


# ------------------------------------------------------------------ the peers
class PeerError(RuntimeError):
    """The ranks of the group cannot compute together; raised instead of a hang or a wrong result.

    Either they disagree (shard shapes, dtypes or options differ: found by `agreed_arguments`
    before any data moves, and raised on every rank), or a peer did not deliver (it died,
    hangs past the process group's timeout, or gave up after an error of its own): then the
    collective's own error is the ``__cause__``.
    """


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


def peer_failed(who: str, group, doing: str, cause: BaseException) -> PeerError:
    """The `PeerError` for a collective that raised; chain it: ``raise peer_failed(...) from cause``."""
    group = group if group is not None else dist.group.WORLD
    return PeerError(
        f"{who}: rank {dist.get_rank(group)} of {dist.get_world_size(group)} failed {doing}: a peer likely "
        f"failed or mismatched (it died, hangs, gave up after an error of its own, or passed other shapes). "
        f"Process-group timeout: {group_timeout(group)}. Cause: {cause}"
    )


# What each rank tells its peers before any data moves: a fixed list of fields, each a few
# int64 words (floats as their IEEE-754 bits, None as a "present" word), so that one
# all_gather of a (32,) int64 tensor, 256 bytes per rank, compares everything that must agree.
_PROTOCOL = 1  # change it with the fields: ranks running other attnkit versions then disagree here first
_FUNCTIONS = ("ring_attention", "ulysses_attention")
_VERDICTS = ("accepted", "TypeError", "ValueError")  # what the rank's own argument check raised
_DTYPES = tuple(sorted({d for d in vars(torch).values() if isinstance(d, torch.dtype)}, key=str))
_FIELDS: tuple[tuple[str, int], ...] = (  # (name in messages, int64 words), in descriptor order
    ("protocol", 1),
    ("function", 1),
    ("arguments", 1),
    ("q shape", 4),
    ("k shape", 4),
    ("v shape", 4),
    ("q dtype", 1),
    ("k dtype", 1),
    ("v dtype", 1),
    ("gradients", 1),  # grad mode and requires_grad: one rank without a backward would hang the others'
    ("causal", 1),
    ("window", 4),  # (left present, left, right present, right)
    ("alibi", 3),  # (present, bits of the slopes' sum, crc32 of the float64 slopes)
    ("softcap", 2),  # (present, bits)
    ("scale", 1),  # bits of the resolved scale (None -> 1 / sqrt(D))
    ("layout", 1),
    ("seq_len", 1),  # resolved (None -> P * shard length)
)
DESCRIPTOR_WORDS = sum(width for _, width in _FIELDS)
_ARGUMENTS = 2  # the word of the "arguments" field


def _bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _float(word: int) -> float:
    return struct.unpack("<d", struct.pack("<q", word))[0]


def _optional(x: int | None) -> tuple[int, int]:
    return (0, 0) if x is None else (1, x)


def _slopes(slopes: Tensor | None) -> tuple[int, int, int]:
    if slopes is None:
        return (0, 0, 0)
    values = slopes.detach().double().cpu().tolist()  # (Hq,): a few numbers
    return (1, _bits(math.fsum(values)), zlib.crc32(struct.pack(f"<{len(values)}d", *values)))


def _describe(
    who: str, q, k, v, spec: AttentionSpec | None, layout: str, seq_len: int | None, error: Exception | None
) -> list[int]:
    """This rank's descriptor, `_FIELDS` in order. After a failed local check only the tensors are described."""
    fields: dict[str, tuple[int, ...]] = {
        "protocol": (_PROTOCOL,),
        "function": (_FUNCTIONS.index(who),),
        "arguments": (0 if error is None else 1 if isinstance(error, TypeError) else 2,),
    }
    for name, x in (("q", q), ("k", k), ("v", v)):
        tensor = isinstance(x, Tensor)
        fields[f"{name} shape"] = tuple(x.shape) if tensor and x.dim() == 4 else (-1,) * 4
        fields[f"{name} dtype"] = (_DTYPES.index(x.dtype) if tensor and x.dtype in _DTYPES else -1,)
    if error is None:
        left, right = spec.window if spec.window is not None else (None, None)
        fields |= {
            "gradients": (int(torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))),),
            "causal": (int(spec.causal),),
            "window": (*_optional(left), *_optional(right)),
            "alibi": _slopes(spec.alibi_slopes),
            "softcap": (0, 0) if spec.softcap is None else (1, _bits(spec.softcap)),
            "scale": (_bits(spec.scale),),
            "layout": (LAYOUTS.index(layout),),
            "seq_len": (seq_len,),
        }
    words: list[int] = []
    for name, width in _FIELDS:
        words += fields.get(name, (0,) * width)
    return words


def _show(name: str, value: tuple[int, ...]) -> str:
    """One field of a descriptor, as the argument it came from."""
    try:
        if name.endswith("shape"):
            return "not a 4-D tensor" if value[0] < 0 else str(value)
        if name.endswith("dtype"):
            return "not a tensor" if value[0] < 0 else str(_DTYPES[value[0]])
        if name == "function":
            return _FUNCTIONS[value[0]]
        if name == "gradients":
            return "needs gradients" if value[0] else "no gradients"
        if name == "causal":
            return str(bool(value[0]))
        if name == "window":
            if not value[0] and not value[2]:
                return "None"
            return f"({value[1] if value[0] else None}, {value[3] if value[2] else None})"
        if name == "alibi":
            return "None" if not value[0] else f"slopes summing to {_float(value[1]):.6g} (crc32 {value[2]:08x})"
        if name == "softcap":
            return "None" if not value[0] else repr(_float(value[1]))
        if name == "scale":
            return repr(_float(value[0]))
        if name == "layout":
            return repr(LAYOUTS[value[0]])
    except (IndexError, struct.error):
        pass
    return str(value[0]) if len(value) == 1 else str(value)


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


def _who_has(name: str, values: list[tuple[int, ...]]) -> str:
    """``"ranks 0, 2: (1, 2, 4, 8); rank 1: (1, 2, 6, 8)"``: the ranks holding each value."""
    holders: dict[tuple[int, ...], list[int]] = {}
    for rank, value in enumerate(values):
        holders.setdefault(value, []).append(rank)
    return "; ".join(f"{_ranks(ranks)}: {_show(name, value)}" for value, ranks in holders.items())


def _disagreements(table: list[list[int]]) -> list[str]:
    """One line per field on which the descriptors (one row per rank) differ."""
    lines, start = [], 0
    for name, width in _FIELDS:
        values = [tuple(row[start : start + width]) for row in table]
        start += width
        if len(set(values)) > 1:
            lines.append(f"{name}: {_who_has(name, values)}")
            if name == "protocol":  # another attnkit version: the other fields are not comparable
                break
    return lines


def _descriptor_device(group, q) -> torch.device:
    """Where the descriptor travels: the CPU, unless the group only speaks NCCL (then this rank's GPU)."""
    backend = str(dist.get_backend(group))
    if "nccl" not in backend or "gloo" in backend:
        return torch.device("cpu")
    return q.device if isinstance(q, Tensor) and q.is_cuda else torch.device("cuda", torch.cuda.current_device())


def _exchange(who: str, group, words: list[int], device: torch.device) -> list[list[int]]:
    """Every rank's descriptor, in group rank order: one all_gather of ``(DESCRIPTOR_WORDS,)`` int64."""
    mine = torch.tensor(words, dtype=torch.int64, device=device)  # (N,)
    rows = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    try:
        dist.all_gather(rows, mine, group=group)
    except RuntimeError as e:  # gloo: a closed connection or the timeout
        raise peer_failed(who, group, "exchanging argument descriptors (before any data moved)", e) from e
    return torch.stack(rows).tolist()  # (P, N); on a GPU this waits for the stream, once per call


def agreed_arguments(
    who: str, q: Tensor, k: Tensor, v: Tensor, *, group, layout: str, seq_len: int | None, options: dict,
    check: Callable[[AttentionSpec, int], None] | None = None,
) -> tuple[AttentionSpec, int]:  # fmt: skip
    """Check this rank's arguments, then agree on them with every peer: the one place ranks compare notes.

    The local check is `attnkit.functional.build_spec` (``options``: causal, window, alibi,
    softcap, scale), the shard lengths, the layout and ``seq_len``, then ``check(spec, P)``.
    Then one ``all_gather`` of a fixed-size int64 descriptor (``DESCRIPTOR_WORDS`` words:
    the function, the verdict of the local check, q/k/v shapes and dtypes, whether
    gradients are needed, causal, window, ALiBi slopes, softcap, the resolved scale, layout
    and seq_len). A rank whose own check failed still takes part, so its peers learn it at
    once instead of waiting for data that never comes. A group of one exchanges nothing.

    Returns:
        ``(spec, seq_len)``: the validated spec and the resolved true length.

    Raises:
        TypeError, ValueError: this rank's own arguments are wrong (its peers raise `PeerError`).
        PeerError: on every rank, when the ranks disagree (naming each field, the ranks and
            their values) or when a peer rejected its arguments; or when the exchange itself
            failed (a peer died, hangs, or gave up earlier), with the collective's error as
            ``__cause__``.
        RuntimeError: torch.distributed is not initialised.
    """
    spec, error = None, None
    try:
        check_layout(layout, who)
        spec = build_spec(q, k, v, **options)
        if q.shape[2] != k.shape[2]:
            raise ValueError(
                f"{who}: q and k shards must have the same length (self-attention over one sequence); "
                f"got q {tuple(q.shape)}, k {tuple(k.shape)}"
            )
        if layout == "zigzag" and q.shape[2] % 2 != 0:
            raise ValueError(
                f"{who}: a zigzag shard holds two equal chunks, so its length must be even; got {q.shape[2]} "
                "(shard with attnkit.distributed.shard_sequence, which pads)"
            )
    except (TypeError, ValueError) as e:
        spec, error = None, e
    if not dist.is_available() or not dist.is_initialized():
        if error is not None:
            raise error
        raise RuntimeError(
            f"{who}: torch.distributed is not initialised; call torch.distributed.init_process_group "
            "(torchrun does it) or use attnkit.attention in one process"
        )
    group = group if group is not None else dist.group.WORLD
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if error is None:
        try:
            total = world * q.shape[2]
            if seq_len is None:
                seq_len = total
            elif isinstance(seq_len, bool) or not isinstance(seq_len, int) or not 0 < seq_len <= total:
                raise ValueError(f"{who}: seq_len must be an int in [1, {total}] (P * shard length), got {seq_len!r}")
            if check is not None:
                check(spec, world)
        except (TypeError, ValueError) as e:
            spec, error = None, e
    words = _describe(who, q, k, v, spec, layout, seq_len, error)
    try:
        table = _exchange(who, group, words, _descriptor_device(group, q)) if world > 1 else [words]
    except PeerError as failed:
        if error is not None:  # this rank's own mistake is the news, whatever its peers did
            raise error from failed
        raise
    if error is not None:
        raise error
    lines = _disagreements(table)
    rejected = [r for r, row in enumerate(table) if row[_ARGUMENTS] != 0]
    if rejected and not (lines and lines[0].startswith("protocol:")):
        verdicts = sorted({_VERDICTS[table[r][_ARGUMENTS]] for r in rejected})
        raise PeerError(
            f"{who}: rank {rank} of {world}: {_ranks(rejected)} rejected {'its' if len(rejected) == 1 else 'their'} "
            f"own arguments ({', '.join(verdicts)}, raised there), so no rank computes"
        )
    lines = _disagreements(table)
    if lines:
        raise PeerError(
            f"{who}: rank {rank} of {world}: the ranks of the group disagree, so no rank computes (every rank must "
            "pass q, k and v shards of the same shapes and dtypes, and the same options):\n  " + "\n  ".join(lines)
        )
    return spec, seq_len


# --------------------------------------------------------------------- the ring
class Ring:
    """The ring's communication: who is next and previous, and one bounded exchange step."""

    def __init__(self, group) -> None:
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world = dist.get_world_size(self.group)
        self.next = dist.get_global_rank(self.group, (self.rank + 1) % self.world)
        self.prev = dist.get_global_rank(self.group, (self.rank - 1) % self.world)

    def exchange(self, send: Tensor, tag: int) -> tuple[Tensor, list]:
        """Post "send ``send`` to next, receive the same shape from previous"; returns (buffer, works)."""
        recv = torch.empty_like(send)
        ops = [
            dist.P2POp(dist.isend, send, self.next, self.group, tag),
            dist.P2POp(dist.irecv, recv, self.prev, self.group, tag),
        ]
        try:
            return recv, dist.batch_isend_irecv(ops)
        except RuntimeError as e:  # gloo refuses to post on a connection a peer closed
            raise peer_failed("ring_attention", self.group, f"posting a ring exchange ({self._peers})", e) from e

    def wait(self, works: list, what: str, step: int) -> None:
        try:
            for w in works:
                w.wait()
        except RuntimeError as e:  # gloo: a closed connection or the timeout; say what we were doing
            doing = f"waiting for {what} at step {step} ({self._peers})"
            raise peer_failed("ring_attention", self.group, doing, e) from e

    @property
    def _peers(self) -> str:
        return f"receiving from global rank {self.prev}, sending to {self.next}"


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
        causal: as in `attnkit.attention`, and so are ``window``, ``alibi``, ``softcap`` and ``scale``,
            at *global* positions (self-attention: the full query and key sequences are the same length).
        group: the process group (None: the default group). Every rank passes the same shapes.
        layout: ``"contiguous"`` or ``"zigzag"`` (balanced causal work); must match the sharding.
        seq_len: the true global length when the sequence was padded to split evenly
            (`attnkit.distributed.padded_length`); keys at positions ``>= seq_len`` are never
            attended, outputs at those query positions are meaningless. None: ``P * L / P``.

    Returns:
        ``out (B, Hq, L / P, Dv)`` in ``q.dtype`` (accumulated and merged in fp32).

    Raises:
        PeerError: on every rank, before any data moves, when the ranks pass different shard
            shapes, dtypes or options (the message names each field, the ranks and their
            values) or when a peer rejected its own arguments; later, when a peer died, hung
            past the process group's timeout or gave up after an error (the collective's
            error is the ``__cause__``). See `agreed_arguments`.
        TypeError, ValueError: this rank's own arguments are wrong (its peers raise PeerError).
    """
    options = dict(causal=causal, window=window, alibi=alibi, softcap=softcap, scale=scale)
    base, seq_len = agreed_arguments(
        "ring_attention", q, k, v, group=group, layout=layout, seq_len=seq_len, options=options
    )
    ring = Ring(group)
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
        heads: query heads (only the ratio ``kv_heads / heads`` matters without latency).
        kv_heads: key/value heads.
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
