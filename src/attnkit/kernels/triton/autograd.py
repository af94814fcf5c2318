"""The ``triton`` backend's autograd tier: what is saved, and how the backward recomputes.

Three tiers, as FlashAttention's interface has them: the kernels
(`attnkit.kernels.triton.forward` / ``backward``: pure launches), the autograd
functions here (`TritonAttention`, `TritonVarlenAttention`: save ``q, k, v, out, lse``
and never the weights), and the public functions (`attnkit.attention` with
``backend="triton"``, `attnkit.attention_varlen`). Importing this module imports Triton.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from attnkit.kernels.triton.backward import launch_backward
from attnkit.kernels.triton.forward import launch_forward
from attnkit.kernels.triton.offsets import addressable
from attnkit.spec import AttentionSpec


class TritonAttention(torch.autograd.Function):
    """Dense ``(B, H, L, D)`` attention through the Triton kernels."""

    @staticmethod
    def forward(ctx, q, k, v, mask, spec: AttentionSpec, blocks):
        q, k, v = addressable(q), addressable(k), addressable(v)
        spec = dataclasses.replace(spec, mask=mask)
        ctx.set_materialize_grads(False)  # an unused lse gets no zero gradient (and no check on it)
        out, lse = launch_forward(q, k, v, spec, blocks=blocks)
        ctx.save_for_backward(q, k, v, mask, out, lse)
        ctx.spec, ctx.blocks = spec, blocks
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, mask, out, lse = ctx.saved_tensors
        spec = dataclasses.replace(ctx.spec, mask=mask)
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = launch_backward(addressable(dout), q, k, v, out, lse, spec, dlse=dlse, blocks=ctx.blocks)
        return dq, dk, dv, None, None, None


class TritonVarlenAttention(torch.autograd.Function):
    """Packed ``(total, H, D)`` attention over sequences delimited by ``cu_seqlens``."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, spec: AttentionSpec, blocks):
        q, k, v = addressable(q), addressable(k), addressable(v)
        out, lse = launch_forward(
            q, k, v, spec, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, blocks=blocks
        )
        ctx.save_for_backward(q, k, v, cu_q, cu_k, out, lse)
        ctx.spec, ctx.blocks, ctx.max = spec, blocks, (max_q, max_k)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, cu_q, cu_k, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = launch_backward(
            addressable(dout), q, k, v, out, lse, ctx.spec, dlse=dlse, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
            max_seqlen_q=ctx.max[0], max_seqlen_k=ctx.max[1], blocks=ctx.blocks,
        )  # fmt: skip
        return dq, dk, dv, None, None, None, None, None, None


def attention(
    q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec, *, blocks: tuple[int, int] | None = None
) -> tuple[Tensor, Tensor]:
    """Triton attention with autograd.

    Args:
        q: ``(B, Hq, Lq, D)``; k: ``(B, Hk, Lk, D)``; v: ``(B, Hk, Lk, Dv)``; fp16, bf16 or fp32.
        spec: from `attnkit.functional.build_spec`.
        blocks: ``(BLOCK_M, BLOCK_N)`` to fix the tiles (tests); None autotunes.

    Returns:
        ``out (B, Hq, Lq, Dv)`` in ``q.dtype`` and ``lse (B, Hq, Lq)`` fp32 (``-inf`` for empty rows).
    """
    return TritonAttention.apply(q, k, v, spec.mask, spec, blocks)


def attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    spec: AttentionSpec,
    *,
    blocks: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Packed Triton attention with autograd.

    Args:
        q: ``(total_q, Hq, D)``; k: ``(total_k, Hk, D)``; v: ``(total_k, Hk, Dv)``.
        cu_seqlens_q / cu_seqlens_k: ``(S + 1,)`` int32 cumulative lengths; ``spec.batch == S``.

    Returns:
        ``out (total_q, Hq, Dv)`` and ``lse (Hq, total_q)`` fp32.
    """
    return TritonVarlenAttention.apply(
        q, k, v, cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32), max_seqlen_q, max_seqlen_k, spec, blocks
    )
