"""`context_parallel`: run an attnkit model on a sequence split across processes, unchanged.

A transformer is per-token everywhere except in attention and in positions. So a model
made of attnkit modules runs context-parallel when

* every self-attention module computes through `ring_attention` (or `ulysses_attention`)
  instead of `attnkit.attention`: the attnkit modules call their instance attribute
  ``attention_fn``, which `context_parallel` swaps for a closure with the same keyword
  signature;
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
from typing import Literal

import torch.distributed as dist
from torch import Tensor, nn

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
        modules: the attention modules whose ``attention_fn`` was swapped.
        position_modules: the position modules whose ``forward`` was made global.

    Use as a context manager (restores on exit) or call `restore`.
    """

    def __init__(self, model: nn.Module, group, layout: Layout, method: Method, seq_len: int | None) -> None:
        self.model, self.group, self.layout, self.method, self.seq_len = model, group, layout, method, seq_len
        self.modules: list[nn.Module] = []
        self.position_modules: list[nn.Module] = []
        self._saved: list[tuple[nn.Module, str, object]] = []

    def restore(self) -> None:
        """Put back every ``attention_fn`` and position ``forward`` as they were."""
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


_MISSING = object()


def _attention_fn(
    cp: ContextParallel,
    where: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    mask: Tensor | None = None,
    window=None,
    alibi=None,
    softcap: float | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    backend: str = "auto",
) -> Tensor:
    """`attnkit.attention`'s keyword signature, computed context-parallel (``backend`` is not used)."""
    if mask is not None:
        raise ValueError(
            f"context_parallel ({where}): attention masks (and padding masks) cannot be split across ranks; "
            "pad the sequence at the end and set seq_len on the ContextParallel handle instead"
        )
    if dropout_p > 0:
        raise ValueError(
            f"context_parallel ({where}): attention dropout is not supported context-parallel, got "
            f"dropout_p={dropout_p}; build the layers with dropout=0.0 or call model.eval()"
        )
    if return_lse:
        raise ValueError(f"context_parallel ({where}): return_lse is not supported")
    if q.shape[2] != k.shape[2]:
        raise ValueError(
            f"context_parallel ({where}): queries and keys must be the same sharded sequence (self-attention, "
            f"no KV cache); got q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    fn = ring_attention if cp.method == "ring" else ulysses_attention
    return fn(
        q, k, v, causal=causal, window=window, alibi=alibi, softcap=softcap, scale=scale,
        group=cp.group, layout=cp.layout, seq_len=cp.seq_len,
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
        model: any module tree; attnkit attention modules (those with an ``attention_fn``
            attribute, except `attnkit.nn.CrossAttention`) and position modules are changed.
        group: the process group (None: the default group).
        layout: how the sequence is sharded (``"zigzag"`` balances causal work).
        method: ``"ring"`` (any head count) or ``"ulysses"`` (world size divides the heads).
        seq_len: the true length when the sequence was padded; also settable per batch on
            the returned handle.

    Returns:
        A `ContextParallel` handle; ``handle.restore()`` (or leaving its ``with`` block)
        undoes the change.
    """
    from attnkit.nn import CrossAttention, LearnedPositions, RotaryEmbedding, SinusoidalPositions

    check_layout(layout, "context_parallel")
    if method not in ("ring", "ulysses"):
        raise ValueError(f"context_parallel: method must be 'ring' or 'ulysses', got {method!r}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("context_parallel: torch.distributed is not initialised; call init_process_group first")
    cp = ContextParallel(model, group, layout, method, seq_len)
    for name, module in model.named_modules():
        where = f"{name or 'model'} ({type(module).__name__})"
        if hasattr(module, "attention_fn") and not isinstance(module, CrossAttention):
            cp._set(module, "attention_fn", functools.partial(_attention_fn, cp, where))
            cp.modules.append(module)
        elif isinstance(module, RotaryEmbedding):
            cp._set(module, "forward", functools.partial(_rotary_forward, cp, module.forward))
            cp.position_modules.append(module)
        elif isinstance(module, SinusoidalPositions | LearnedPositions):
            cp._set(module, "forward", functools.partial(_absolute_forward, cp, module.forward))
            cp.position_modules.append(module)
    if not cp.modules:
        raise ValueError(
            "context_parallel: the model has no attnkit attention module (none has an attention_fn attribute)"
        )
    return cp
