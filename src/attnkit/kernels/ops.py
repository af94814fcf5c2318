"""The kernels as ``torch.library`` custom ops, so ``torch.compile`` traces a call without a graph break.

The tiled kernel, the statistics pass, the per-sequence varlen loop and the non-finite
guard make data-dependent decisions in Python (``bool(mask.any())`` before a tile, the
keys a NaN reaches, ``cu_seqlens.tolist()``), which dynamo cannot trace. Each is
registered here as one opaque op in the ``attnkit`` namespace, with a fake implementation
(the output shapes, for tracing) and, where it has a gradient, its backward as a second
op (`torch.library.register_autograd`), so compiled graphs hold the same kernels and
the same backward as eager calls:

=============================  ===============================================================
``attnkit::tiled_forward``     `attnkit.kernels.tiled.forward` -> ``out, lse``
``attnkit::tiled_backward``    `attnkit.kernels.tiled.backward` -> ``dq, dk, dv, dmask``
``attnkit::varlen_forward``    packed sequences, each through ``tiled_forward`` (guarded)
``attnkit::varlen_backward``   each sequence through ``tiled_backward``
``attnkit::statistics``        `attnkit.kernels.tiled.statistics` from a saved ``lse``
``attnkit::nonfinite_rows``    the rows `attnkit.kernels.nonfinite` makes NaN, ``(B, Hq, Lq)``
=============================  ===============================================================

An `AttentionSpec` cannot be an op argument, so it travels as its tensors (mask, ALiBi
slopes, dropout seed as a 0-d int64 tensor) and scalars (`spec_arguments`), and the op
rebuilds it from them and the shapes of ``q, k, v`` (`_spec`). The public entry points
(`tiled_attention`, `tiled_varlen`, `tiled_statistics`, `nonfinite_rows`) take the
spec; eager calls of the first three keep the kernels' own ``torch.autograd.Function``
(no dispatcher in between), calls traced by ``torch.compile`` go through the ops.
"""

import functools
from typing import Any

import torch
from torch import Tensor

from attnkit.kernels import nonfinite, packed, tiled
from attnkit.spec import AttentionSpec

__all__ = ["nonfinite_rows", "spec_arguments", "tiled_attention", "tiled_statistics", "tiled_varlen"]


# ------------------------------------------------------------------------ the spec as arguments
def seed_tensor(seed: "int | Tensor | None", device: torch.device) -> Tensor | None:
    """The dropout seed as a 0-d int64 tensor (traced graphs draw it as one; see `attnkit.dropout.new_seed`)."""
    if seed is None or isinstance(seed, Tensor):
        return seed
    return torch.tensor(seed, dtype=torch.int64, device=device)


def spec_arguments(spec: AttentionSpec, device: torch.device) -> dict[str, Any]:
    """The spec's tensors and scalars, as keyword arguments of the ops below (shapes come from q, k, v)."""
    left, right = spec.window if spec.window is not None else (None, None)
    return dict(
        mask=spec.mask,
        alibi_slopes=spec.alibi_slopes,
        dropout_seed=seed_tensor(spec.dropout_seed, device),
        scale=spec.scale,
        causal=spec.causal,
        window_left=left,
        window_right=right,
        softcap=spec.softcap,
        dropout_p=spec.dropout_p,
        align=spec.align,
    )


def _spec(
    q: Tensor,
    k: Tensor,
    v: Tensor | None,
    mask: Tensor | None,
    alibi_slopes: Tensor | None,
    dropout_seed: Tensor | None,
    scale: float,
    causal: bool,
    window_left: int | None,
    window_right: int | None,
    softcap: float | None,
    dropout_p: float,
    align: int | None,
) -> AttentionSpec:
    """The spec of ``q (B, Hq, Lq, D)``, ``k (B, Hk, Lk, D)``, ``v (B, Hk, Lk, Dv)`` and the op's arguments."""
    B, Hq, Lq, D = q.shape
    _, Hk, Lk, _ = k.shape
    window = None if window_left is None and window_right is None else (window_left, window_right)
    return AttentionSpec(
        batch=B, q_heads=Hq, kv_heads=Hk, q_len=Lq, kv_len=Lk, head_dim=D,
        v_head_dim=v.shape[-1] if v is not None else D, scale=scale, causal=causal, window=window,
        alibi_slopes=alibi_slopes, softcap=softcap, mask=mask, dropout_p=dropout_p,
        dropout_seed=None if dropout_seed is None else int(dropout_seed), align=align,
        acc_dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
    )  # fmt: skip


def _acc(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------- tiled attention
@torch.library.custom_op("attnkit::tiled_forward", mutates_args=())
def _tiled_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    alibi_slopes: Tensor | None,
    dropout_seed: Tensor | None,
    scale: float,
    causal: bool,
    window_left: int | None,
    window_right: int | None,
    softcap: float | None,
    dropout_p: float,
    align: int | None,
    block_q: int,
    block_k: int,
    engine: str | None,
) -> tuple[Tensor, Tensor]:
    """``out (B, Hq, Lq, Dv)`` in ``q.dtype`` and ``lse (B, Hq, Lq)`` fp32 (fp64 for fp64 inputs)."""
    spec = _spec(q, k, v, mask, alibi_slopes, dropout_seed, scale, causal, window_left, window_right, softcap,
                 dropout_p, align)  # fmt: skip
    return tiled.forward(q, k, v, spec, block_q=block_q, block_k=block_k, engine=engine)


@_tiled_forward.register_fake
def _(q, k, v, mask, alibi_slopes, dropout_seed, *args) -> tuple[Tensor, Tensor]:
    B, Hq, Lq, _ = q.shape
    return q.new_empty(B, Hq, Lq, v.shape[-1]), q.new_empty(B, Hq, Lq, dtype=_acc(q))


@torch.library.custom_op("attnkit::tiled_backward", mutates_args=())
def _tiled_backward(
    dout: Tensor,
    dlse: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    mask: Tensor | None,
    alibi_slopes: Tensor | None,
    dropout_seed: Tensor | None,
    scale: float,
    causal: bool,
    window_left: int | None,
    window_right: int | None,
    softcap: float | None,
    dropout_p: float,
    align: int | None,
    block_q: int,
    block_k: int,
    engine: str | None,
    mask_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``dq, dk, dv`` and ``dmask`` (the float mask's shape; empty ``(0,)`` unless ``mask_grad``)."""
    spec = _spec(q, k, v, mask, alibi_slopes, dropout_seed, scale, causal, window_left, window_right, softcap,
                 dropout_p, align)  # fmt: skip
    dlse = dlse if dlse is not None and bool(dlse.any()) else None  # the fused engine needs no dlse term
    dq, dk, dv, dmask = tiled.backward(
        dout, q, k, v, out, lse, spec, dlse=dlse, mask_grad=mask_grad, block_q=block_q, block_k=block_k,
        engine=engine,
    )  # fmt: skip
    return dq, dk, dv, dmask.to(mask.dtype) if dmask is not None else q.new_empty(0)


@_tiled_backward.register_fake
def _(dout, dlse, q, k, v, out, lse, mask, *args) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    mask_grad = args[-1]  # the kernel returns contiguous gradients, whatever the inputs' strides
    dmask = mask.new_empty(mask.shape) if mask_grad else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dmask


def _tiled_setup(ctx, inputs, output) -> None:
    q, k, v, mask, alibi, seed = inputs[:6]
    out, lse = output
    ctx.save_for_backward(q, k, v, mask, alibi, seed, out, lse)
    ctx.scalars = inputs[6:]
    ctx.mask_grad = mask is not None and mask.dtype != torch.bool and mask.requires_grad


def _tiled_grad(ctx, dout, dlse):
    q, k, v, mask, alibi, seed, out, lse = ctx.saved_tensors
    mask_grad = ctx.mask_grad and ctx.needs_input_grad[3]
    dq, dk, dv, dmask = _tiled_backward(dout, dlse, q, k, v, out, lse, mask, alibi, seed, *ctx.scalars, mask_grad)
    return dq, dk, dv, dmask if mask_grad else None, *([None] * len(ctx.scalars)), None, None  # + alibi, seed


_tiled_forward.register_autograd(_tiled_grad, setup_context=_tiled_setup)


def tiled_attention(
    q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec, return_lse: bool = False
) -> tuple[Tensor, Tensor]:
    """The ``tiled`` backend's entry point: `attnkit.kernels.tiled.attention`, one op under ``torch.compile``."""
    if not torch.compiler.is_compiling():
        return tiled.attention(q, k, v, spec, return_lse)
    return _tiled_forward(
        q, k, v, **spec_arguments(spec, q.device), block_q=tiled.BLOCK_Q, block_k=tiled.BLOCK_K, engine=None
    )


# ------------------------------------------------------------------------------------- varlen
def _sequences(cu_q: Tensor, cu_k: Tensor, total_q: int, total_k: int, device) -> tuple[list[int], list[int]]:
    cq = packed.check_cu_seqlens("cu_seqlens_q", cu_q, total_q, device)
    ck = packed.check_cu_seqlens("cu_seqlens_k", cu_k, total_k, device)
    packed.check_same_count(cq, ck)
    return cq, ck


def _dense_forward(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec, return_lse: bool) -> tuple[Tensor, Tensor]:
    return tiled.forward(q, k, v, spec)


@torch.library.custom_op("attnkit::varlen_forward", mutates_args=())
def _varlen_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    alibi_slopes: Tensor | None,
    dropout_seed: Tensor | None,
    scale: float,
    causal: bool,
    window_left: int | None,
    window_right: int | None,
    softcap: float | None,
    dropout_p: float,
) -> tuple[Tensor, Tensor]:
    """Packed ``q (total_q, Hq, D)``, ``k (total_k, Hk, D)``, ``v (total_k, Hk, Dv)`` -> ``out``, ``lse (Hq, total_q)``.

    Validates ``cu_seqlens`` (their values are only known here) and applies the non-finite rule per sequence.
    """
    _sequences(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], q.device)
    spec = _spec(packed.packed_view(q), packed.packed_view(k), packed.packed_view(v), None, alibi_slopes, dropout_seed,
                 scale, causal, window_left, window_right, softcap, dropout_p, None)  # fmt: skip
    guarded = functools.partial(nonfinite.run_guarded, _dense_forward)
    return packed.per_sequence(guarded, tiled.refusal, q, k, v, cu_seqlens_q, cu_seqlens_k, spec, True)


@_varlen_forward.register_fake
def _(q, k, v, *args) -> tuple[Tensor, Tensor]:
    return q.new_empty(q.shape[0], q.shape[1], v.shape[-1]), q.new_empty(q.shape[1], q.shape[0], dtype=_acc(q))


@torch.library.custom_op("attnkit::varlen_backward", mutates_args=())
def _varlen_backward(
    dout: Tensor,
    dlse: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    alibi_slopes: Tensor | None,
    dropout_seed: Tensor | None,
    scale: float,
    causal: bool,
    window_left: int | None,
    window_right: int | None,
    softcap: float | None,
    dropout_p: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """``dq, dk, dv`` of `_varlen_forward`, sequence by sequence (`attnkit.kernels.packed.per_sequence_backward`).

    Rows the non-finite rule made NaN pass no gradient (as the ``torch.where`` that poisons them in eager calls).
    """
    spec = _spec(packed.packed_view(q), packed.packed_view(k), packed.packed_view(v), None, alibi_slopes, dropout_seed,
                 scale, causal, window_left, window_right, softcap, dropout_p, None)  # fmt: skip
    dlse = dlse if dlse is not None and bool(dlse.any()) else None  # the fused engine needs no dlse term
    poisoned = torch.isnan(lse)  # (Hq, total_q)
    if bool(poisoned.any()):
        rows = poisoned.transpose(0, 1)[..., None]  # (total_q, Hq, 1)
        dout, out = dout.masked_fill(rows, 0), out.masked_fill(rows, 0)
        lse = lse.masked_fill(poisoned, float("-inf"))
        dlse = None if dlse is None else dlse.masked_fill(poisoned, 0)
        k, v = nonfinite.clean(k), nonfinite.clean(v)
    return packed.per_sequence_backward(
        tiled.backward, dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, spec, dlse=dlse
    )


@_varlen_backward.register_fake
def _(dout, dlse, q, k, v, *args) -> tuple[Tensor, Tensor, Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _varlen_setup(ctx, inputs, output) -> None:
    q, k, v, cu_q, cu_k, alibi, seed = inputs[:7]
    ctx.save_for_backward(q, k, v, *output, cu_q, cu_k, alibi, seed)
    ctx.scalars = inputs[7:]


def _varlen_grad(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k, alibi, seed = ctx.saved_tensors
    dq, dk, dv = _varlen_backward(dout, dlse, q, k, v, out, lse, cu_q, cu_k, alibi, seed, *ctx.scalars)
    return dq, dk, dv, None, None, None, None, *([None] * len(ctx.scalars))  # cu_seqlens, alibi, seed, scalars


_varlen_forward.register_autograd(_varlen_grad, setup_context=_varlen_setup)


def tiled_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    spec: AttentionSpec,
    return_lse: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """The ``tiled`` backend's varlen entry point: `attnkit.kernels.tiled.attention_varlen`, one op when compiled.

    Traced, it also applies the non-finite rule (eager calls guard in `attnkit.attention_varlen`).
    """
    if not torch.compiler.is_compiling():
        return tiled.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, spec, return_lse)
    args = spec_arguments(spec, q.device)
    del args["mask"], args["align"]  # varlen takes neither (`attnkit.functional.build_varlen_spec`)
    return _varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, **args)


# --------------------------------------------------------------------------------- statistics
@torch.library.custom_op("attnkit::statistics", mutates_args=())
def _statistics(
    q: Tensor,
    k: Tensor,
    lse: Tensor,
    query_edges: Tensor,
    key_edges: Tensor,
    topk: int,
    mask: Tensor | None,
    alibi_slopes: Tensor | None,
    dropout_seed: Tensor | None,
    scale: float,
    causal: bool,
    window_left: int | None,
    window_right: int | None,
    softcap: float | None,
    dropout_p: float,
    align: int | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """`tiled.STAT_NAMES` in order, from the forward's ``lse (B, Hq, Lq)`` (no gradient)."""
    spec = _spec(q, k, None, mask, alibi_slopes, dropout_seed, scale, causal, window_left, window_right, softcap,
                 dropout_p, align)  # fmt: skip
    result = tiled.statistics(q, k, None, spec, lse, topk=topk, pool=(query_edges, key_edges))
    return tuple(result[name] for name in tiled.STAT_NAMES)


@_statistics.register_fake
def _(q, k, lse, query_edges, key_edges, topk, *args) -> tuple[Tensor, ...]:
    B, Hq, Lq, _ = q.shape
    Lk, K, acc = k.shape[2], min(topk, k.shape[2]), _acc(q)
    row = q.new_empty(B, Hq, Lq, dtype=acc)
    return (
        row, torch.empty_like(row), q.new_empty(B, Hq, Lk, dtype=acc), q.new_empty(B, Hq, Lq, K, dtype=torch.int64),
        q.new_empty(B, Hq, Lq, K, dtype=acc),
        q.new_empty(B, Hq, query_edges.shape[0] - 1, key_edges.shape[0] - 1, dtype=acc),
    )  # fmt: skip


def tiled_statistics(
    q: Tensor, k: Tensor, v: Tensor | None, spec: AttentionSpec, lse: Tensor | None, *, topk: int, pool
) -> dict[str, Tensor]:
    """The ``tiled`` backend's statistics entry point: `attnkit.kernels.tiled.statistics`, one op when compiled.

    Traced, it needs the forward's ``lse`` (`attnkit.attention_stats` then always takes the two-pass path).
    """
    if not torch.compiler.is_compiling():
        return tiled.statistics(q, k, v, spec, lse, topk=topk, pool=pool)
    if lse is None:
        raise ValueError("tiled_statistics: under torch.compile the statistics pass needs the forward's lse")
    query_edges, key_edges = pool
    values = _statistics(q, k, lse, query_edges, key_edges, topk, **spec_arguments(spec, q.device))
    return dict(zip(tiled.STAT_NAMES, values, strict=True))


# ------------------------------------------------------------------------------ non-finite rows
@torch.library.custom_op("attnkit::nonfinite_rows", mutates_args=())
def _nonfinite_rows(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    alibi_slopes: Tensor | None,
    dropout_seed: Tensor | None,
    scale: float,
    causal: bool,
    window_left: int | None,
    window_right: int | None,
    softcap: float | None,
    dropout_p: float,
    align: int | None,
) -> Tensor:
    """``(B, Hq, Lq)`` bool: the rows `attnkit.kernels.nonfinite` makes NaN (all False when every input is finite)."""
    bad = nonfinite.find(q, k, v)
    if bad is None:
        return torch.zeros(q.shape[:3], dtype=torch.bool, device=q.device)
    spec = _spec(q, k, v, mask, alibi_slopes, dropout_seed, scale, causal, window_left, window_right, softcap,
                 dropout_p, align)  # fmt: skip
    return nonfinite.poisoned_rows(spec, bad)


@_nonfinite_rows.register_fake
def _(q, *args) -> Tensor:
    return q.new_empty(q.shape[:3], dtype=torch.bool)


def nonfinite_rows(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec) -> Tensor:
    """``(B, Hq, Lq)`` bool rows that the non-finite rule makes NaN, as one op (traceable; reads no gradient)."""
    return _nonfinite_rows(q.detach(), k.detach(), v.detach(), **spec_arguments(spec, q.device))
