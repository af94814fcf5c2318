"""`context_parallel`: run an attnkit model on a sequence split across processes, unchanged.

A transformer is per-token everywhere except in attention and in positions. So a model
made of attnkit modules runs context-parallel when

* every self-attention module computes through `ring_attention` (or `ulysses_attention`)
  instead of `attnkit.attention`: the attnkit modules call `attnkit.attention` with
  themselves as ``caller``, and `context_parallel` installs an `attnkit.hooks` hook that
  swaps the computation of the calls made by the model's attention modules (any other
  call proceeds unchanged);
* every position module (`RotaryEmbedding`, `SinusoidalPositions`, `LearnedPositions`)
  uses the rank's *global* positions, which under the zigzag layout are two ranges: their
  ``forward`` is applied per range with that range's offset (exact, since positions act
  token by token).

Each rank feeds its own shard of the tokens (`shard_sequence(tokens, dim=1)`), gets its
shard of the outputs, and computes its part of the loss. The parameters' gradients are
then partial sums: all-reduce them over the group (``DistributedDataParallel`` over the
context-parallel group does it) before the optimiser step.

What cannot be split and is refused with an error naming the module: attention masks and
padding masks (pad the sequence and set ``seq_len`` instead), attention dropout, cross
attention and KV caches (the queries and keys must be the same sharded sequence).
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import torch.distributed as dist
from torch import Tensor, nn

from attnkit import hooks
from attnkit.distributed.ring import ring_attention
from attnkit.distributed.sharding import Layout, check_layout, segments
from attnkit.distributed.ulysses import ulysses_attention

__all__ = ["ContextParallel", "context_parallel"]

Method = Literal["ring", "ulysses"]


class ContextParallel:
    """What `context_parallel` changed, and the knob that varies per batch.

    Attributes:
        seq_len: the true global length when the sequence was padded to split evenly
            (None: no padding). Read at every call, so set it per batch.
        modules: the attention modules whose calls are computed context-parallel.
        position_modules: the position modules whose ``forward`` was made global.

    Use as a context manager (restores on exit) or call `restore`.
    """

    def __init__(self, model: nn.Module, group, layout: Layout, method: Method, seq_len: int | None) -> None:
        self.model, self.group, self.layout, self.method, self.seq_len = model, group, layout, method, seq_len
        self.modules: list[nn.Module] = []
        self.position_modules: list[nn.Module] = []
        self._saved: list[tuple[nn.Module, str, object]] = []
        self._where: dict[int, str] = {}  # id(attention module) -> its name, for errors
        self._remove_hook = None

    def restore(self) -> None:
        """Remove the attention hook and put back every position ``forward`` as it was."""
        if self._remove_hook is not None:
            self._remove_hook()
            self._remove_hook = None
        self._where.clear()
        for module, name, old in reversed(self._saved):
            if old is _MISSING:
                delattr(module, name)
            else:
                setattr(module, name, old)
        self._saved.clear()
        self.modules.clear()
        self.position_modules.clear()

    def __enter__(self) -> ContextParallel:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def _set(self, module: nn.Module, name: str, value) -> None:
        self._saved.append((module, name, module.__dict__.get(name, _MISSING)))
        setattr(module, name, value)

    def _rank_world(self) -> tuple[int, int]:
        return dist.get_rank(self.group), dist.get_world_size(self.group)

    def _hook(self, call: hooks.AttentionCall, proceed: hooks.Proceed) -> Any:
        """The `attnkit.hooks` hook: compute the model's attention calls context-parallel."""
        where = None if call.caller is None else self._where.get(id(call.caller))
        if where is None:
            return proceed(call)  # not one of this model's attention modules
        return _parallel_attention(self, where, call)


_MISSING = object()


def _parallel_attention(cp: ContextParallel, where: str, call: hooks.AttentionCall) -> Tensor:
    """One attention call computed context-parallel (``call.backend`` is not used)."""
    q, k, v, options = call.q, call.k, call.v, call.options
    if options.mask is not None:
        raise ValueError(
            f"context_parallel ({where}): attention masks (and padding masks) cannot be split across ranks; "
            "pad the sequence at the end and set seq_len on the ContextParallel handle instead"
        )
    if options.dropout_p > 0:
        raise ValueError(
            f"context_parallel ({where}): attention dropout is not supported context-parallel, got "
            f"dropout_p={options.dropout_p}; build the layers with dropout=0.0 or call model.eval()"
        )
    if call.return_lse:
        raise ValueError(f"context_parallel ({where}): return_lse is not supported")
    if q.shape[2] != k.shape[2]:
        raise ValueError(
            f"context_parallel ({where}): queries and keys must be the same sharded sequence (self-attention, "
            f"no KV cache); got q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    fn = ring_attention if cp.method == "ring" else ulysses_attention
    return fn(
        q, k, v, causal=options.causal, window=options.window, alibi=options.alibi, softcap=options.softcap,
        scale=options.scale, group=cp.group, layout=cp.layout, seq_len=cp.seq_len,
    )  # fmt: skip


def _global_positions(cp: ContextParallel, length: int) -> list[tuple[slice, int]]:
    """``(local rows, global offset)`` of each real (non-padding) range of this rank's shard."""
    rank, world = cp._rank_world()
    total = length * world
    seq_len = total if cp.seq_len is None else cp.seq_len
    out = []
    for seg in segments(rank, world, cp.layout, length):
        n = min(seg.length, seq_len - seg.start)
        if n > 0:
            out.append((slice(seg.local, seg.local + n), seg.start))
    return out


def _rotary_forward(cp: ContextParallel, original, q: Tensor, k: Tensor, *, offset: int = 0):
    """`RotaryEmbedding.forward` at the global positions of the shard (padding rows untouched)."""
    if offset != 0:
        raise ValueError("context_parallel: a RotaryEmbedding offset (KV cache) is not supported context-parallel")
    rq, rk = q.clone(), k.clone()
    for rows, start in _global_positions(cp, q.shape[-2]):
        rq[..., rows, :], rk[..., rows, :] = original(q[..., rows, :], k[..., rows, :], offset=start)
    return rq, rk


def _absolute_forward(cp: ContextParallel, original, x: Tensor, *, offset: int = 0) -> Tensor:
    """`SinusoidalPositions` / `LearnedPositions` ``forward`` at the shard's global positions."""
    if offset != 0:
        raise ValueError("context_parallel: a position offset (KV cache) is not supported context-parallel")
    out = x.clone()
    for rows, start in _global_positions(cp, x.shape[-2]):
        out[..., rows, :] = original(x[..., rows, :], offset=start)
    return out


def context_parallel(
    model: nn.Module,
    *,
    group: dist.ProcessGroup | None = None,
    layout: Layout = "contiguous",
    method: Method = "ring",
    seq_len: int | None = None,
) -> ContextParallel:
    """Make every attnkit attention and position module of ``model`` context-parallel over ``group``.

    Every rank then calls ``model`` on its shard of the sequence (the sequence axis of the
    inputs cut with `shard_sequence`, e.g. ``tokens (B, L) -> (B, L / P)`` with ``dim=1``)
    and gets its shard of the outputs; results and gradients equal the single-process
    model's (parameter gradients after an all-reduce over ``group``).

    Args:
        model: any module tree; the calls of its attnkit self-attention modules
            (`attnkit.nn.SelfAttention`, `attnkit.nn.MultiheadAttention`; not
            `attnkit.nn.CrossAttention`) are computed context-parallel, its position modules
            use global positions.
        group: the process group (None: the default group).
        layout: how the sequence is sharded (``"zigzag"`` balances causal work).
        method: ``"ring"`` (any head count) or ``"ulysses"`` (world size divides the heads).
        seq_len: the true length when the sequence was padded; also settable per batch on
            the returned handle.

    Returns:
        A `ContextParallel` handle; ``handle.restore()`` (or leaving its ``with`` block)
        undoes the change (removes the hook, restores the position modules).
    """
    from attnkit.nn import LearnedPositions, MultiheadAttention, RotaryEmbedding, SelfAttention, SinusoidalPositions

    check_layout(layout, "context_parallel")
    if method not in ("ring", "ulysses"):
        raise ValueError(f"context_parallel: method must be 'ring' or 'ulysses', got {method!r}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("context_parallel: torch.distributed is not initialised; call init_process_group first")
    cp = ContextParallel(model, group, layout, method, seq_len)
    for name, module in model.named_modules():
        where = f"{name or 'model'} ({type(module).__name__})"
        if isinstance(module, SelfAttention | MultiheadAttention):
            cp._where[id(module)] = where
            cp.modules.append(module)
        elif isinstance(module, RotaryEmbedding):
            cp._set(module, "forward", functools.partial(_rotary_forward, cp, module.forward))
            cp.position_modules.append(module)
        elif isinstance(module, SinusoidalPositions | LearnedPositions):
            cp._set(module, "forward", functools.partial(_absolute_forward, cp, module.forward))
            cp.position_modules.append(module)
    if not cp.modules:
        cp.restore()
        raise ValueError(
            "context_parallel: the model has no attnkit self-attention module (SelfAttention or MultiheadAttention)"
        )
    cp._remove_hook = hooks.install(cp._hook)
    return cp
