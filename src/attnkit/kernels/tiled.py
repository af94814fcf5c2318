"""The tiled kernel: exact attention that never holds an ``Lq x Lk`` tensor.

Queries are processed in blocks of ``block_q`` rows; for each block only the keys
that causal/window leave visible are visited (`AttentionSpec.key_range`), in tiles
of ``block_k`` keys. Each tile yields a normalised partial output and its
log-sum-exp, merged exactly (`attnkit.kernels.merge`). The backward pass recomputes
each tile's probabilities from the saved log-sum-exp, as FlashAttention does, so it
too holds one tile of scores at a time.

Two tile engines compute the same thing:

* ``torch``: the scores of the tile in plain PyTorch (`AttentionSpec.scores`), for
  every feature (softcap, dropout, differentiable float masks) and every device;
* ``fused``: on CPU, PyTorch's fused flash kernel
  (``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward) run on the
  tile with the tile's bias as its mask. It returns the tile's log-sum-exp, so its
  partial results merge exactly; tiles that causal/window leave fully open are
  merged into one call with no mask at all.

Memory: ``O(B * Hq * (Lq + Lk) * D + B * Hq * block_q * block_k)``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import Tensor

from attnkit.kernels import flash_cpu, packed, stats
from attnkit.kernels.merge import merge_partials
from attnkit.spec import AttentionSpec

BLOCK_Q = 256  # rows of queries per block: bounds a bias tile to Hq * 256 * BLOCK_K floats
BLOCK_K = 512  # keys per tile in the torch engine and for biased tiles in the fused engine

Engine = Literal["torch", "fused"] | None  # None: fused where supported, else torch


def fused_supported(q: Tensor, spec: AttentionSpec) -> bool:
    """Whether the fused CPU tile engine computes this request exactly (it masks before it scales)."""
    return (
        q.device.type == "cpu"
        and spec.softcap is None
        and spec.dropout_p == 0.0
        and spec.head_dim == spec.v_head_dim
        and spec.scale > 0
    )


# --------------------------------------------------------------------------- plan
def _pure_causal(spec: AttentionSpec) -> bool:
    """Causal with nothing else per tile: the diagonal tile is the flash kernel's own ``is_causal``."""
    return spec.bounds == (None, 0) and spec.alibi_slopes is None and spec.mask is None


def key_segments(spec: AttentionSpec, i0: int, i1: int, block_k: int, merge_open: bool) -> list[tuple[int, int, bool]]:
    """Key ranges ``(j0, j1, is_causal)`` visited by query block ``[i0, i1)``.

    Tiles of ``block_k`` keys; with ``merge_open`` consecutive tiles that causal/window
    leave fully open become one range (the fused engine then runs them in one call), and
    under plain causal masking the block is one open range plus the diagonal square, where
    the fused kernel's top-left ``is_causal`` equals attnkit's alignment and no mask is built.
    """
    d0, d1 = i0 + spec.offset, i1 + spec.offset  # the block's aligned diagonal
    if merge_open and _pure_causal(spec) and d0 >= 0 and d1 <= spec.kv_len:
        return ([(0, d0, False)] if d0 > 0 else []) + [(d0, d1, True)]
    lo, hi = spec.key_range(i0, i1)
    tiles = [(j, min(j + block_k, hi), False) for j in range(lo, hi, block_k)]
    if not merge_open:
        return tiles
    merged: list[tuple[int, int, bool]] = []
    for j0, j1, _ in tiles:
        if merged and spec.block_is_open(i0, i1, j0, j1) and spec.block_is_open(i0, i1, *merged[-1][:2]):
            merged[-1] = (merged[-1][0], j1, False)
        else:
            merged.append((j0, j1, False))
    return merged


# ----------------------------------------------------------------------- forward
def _tile_forward_torch(
    spec: AttentionSpec, q: Tensor, k: Tensor, v: Tensor, i0: int, j0: int, is_causal: bool = False
) -> tuple[Tensor, Tensor]:
    """One tile in plain PyTorch: normalised ``out (B, Hq, bq, Dv)`` and ``lse (B, Hq, bq)``."""
    s, _ = spec.scores(q, k, i0, j0)  # (B, Hq, bq, bk)
    m = s.amax(dim=-1, keepdim=True)  # (B, Hq, bq, 1)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    p = s.sub_(m).exp_()  # unnormalised probabilities, in place over the scores
    total = p.sum(dim=-1, keepdim=True)  # (B, Hq, bq, 1)
    lse = torch.where(total == 0, float("-inf"), m + torch.log(total)).squeeze(-1)
    if spec.dropout_p > 0:
        keep = spec.dropout_tile(i0, i0 + q.shape[-2], j0, j0 + k.shape[-2], q.device)
        p = p.mul_(keep).div_(1 - spec.dropout_p)
    B, Hq, bq, bk = p.shape
    p5 = p.view(B, spec.kv_heads, spec.group, bq, bk)  # (B, Hk, G, bq, bk)
    out = torch.matmul(p5, v.to(spec.acc_dtype).unsqueeze(2)).reshape(B, Hq, bq, -1)  # (B, Hq, bq, Dv)
    out = out / torch.where(total == 0, torch.ones_like(total), total)
    return out, lse


def _tile_forward_fused(
    spec: AttentionSpec, q: Tensor, k: Tensor, v: Tensor, i0: int, j0: int, is_causal: bool = False
) -> tuple[Tensor, Tensor]:
    """One tile through the fused CPU flash kernel; ``k``, ``v`` already have ``Hq`` heads.

    ``is_causal`` marks the diagonal square of `key_segments`, masked by the kernel itself.
    """
    i1, j1 = i0 + q.shape[-2], j0 + k.shape[-2]
    mask = None if is_causal else spec.additive_tile(i0, i1, j0, j1, q.device)
    out, lse = flash_cpu.forward(q, k, v, mask=mask, is_causal=is_causal, scale=spec.scale)
    return out, lse.to(spec.acc_dtype)


# Rows per query block under plain causal masking on the fused engine: no tile is built, so
# larger blocks only mean fewer calls (measured on 2 cores at N = 16K: 256 rows 1.73 s,
# 2048 rows 1.51 s, PyTorch's own causal kernel 1.54 s).
CAUSAL_BLOCK_Q = 2048


def _query_block(spec: AttentionSpec, fused: bool, merge_open: bool, block_q: int) -> int:
    """Rows per query block. With nothing to build per tile, the fused kernel takes all rows at once."""
    if fused and merge_open and not spec.has_structure_mask:
        return max(block_q, spec.q_len)
    if fused and merge_open and _pure_causal(spec) and block_q == BLOCK_Q:
        return CAUSAL_BLOCK_Q
    return block_q


def _choose_engine(q: Tensor, spec: AttentionSpec, engine: Engine) -> bool:
    """True for the fused engine. Asking for ``fused`` where it cannot be exact is an error."""
    if engine is None:
        return fused_supported(q, spec)
    if engine == "fused" and not fused_supported(q, spec):
        raise ValueError("tiled: engine='fused' needs a CPU tensor, no softcap, no dropout, Dv == D and scale > 0")
    if engine not in ("fused", "torch"):
        raise ValueError(f"tiled: engine must be 'torch', 'fused' or None, got {engine!r}")
    return engine == "fused"


def forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    spec: AttentionSpec,
    *,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
    engine: Engine = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Tiled attention forward.

    Args:
        q: ``(B, Hq, Lq, D)``; k: ``(B, Hk, Lk, D)``; v: ``(B, Hk, Lk, Dv)``.
        engine: the tile engine (module docstring); None picks fused where it is exact.
        out_dtype: dtype of ``out``; default ``q.dtype`` (ring attention asks for the
            accumulation dtype, so that partial outputs merge without rounding).

    Returns:
        ``out (B, Hq, Lq, Dv)`` in ``out_dtype`` and ``lse (B, Hq, Lq)`` in the accumulation dtype.
    """
    B, Hq, Lq, _ = q.shape
    fused = _choose_engine(q, spec, engine)
    if fused:
        k, v = flash_cpu.expand_heads(k, spec.group), flash_cpu.expand_heads(v, spec.group)  # O(Lk) copies, once
        tile = _tile_forward_fused
        # One call may cover many open tiles unless a per-query bias must be built for it.
        merge_open = spec.alibi_slopes is None and (spec.mask is None or spec.mask.shape[-2] == 1)
    else:
        tile, merge_open = _tile_forward_torch, False
    block_q = _query_block(spec, fused, merge_open, block_q)
    out = q.new_zeros(B, Hq, Lq, spec.v_head_dim, dtype=out_dtype or q.dtype)
    lse = torch.full((B, Hq, Lq), float("-inf"), dtype=spec.acc_dtype, device=q.device)
    for i0 in range(0, Lq, block_q):
        i1 = min(i0 + block_q, Lq)
        q_blk = q[:, :, i0:i1]  # (B, Hq, bq, D)
        acc, acc_lse = None, None
        for j0, j1, is_causal in key_segments(spec, i0, i1, block_k, merge_open):
            o_t, lse_t = tile(spec, q_blk, k[:, :, j0:j1], v[:, :, j0:j1], i0, j0, is_causal)
            if acc is None:
                acc, acc_lse = o_t.to(spec.acc_dtype), lse_t
            else:
                acc, acc_lse = merge_partials(acc, acc_lse, o_t, lse_t)
        if acc is not None:
            out[:, :, i0:i1] = acc.to(out.dtype)
            lse[:, :, i0:i1] = acc_lse
    return out, lse


# ---------------------------------------------------------------------- backward
def _reduce_to(x: Tensor, shape: torch.Size) -> Tensor:
    """Sum ``x`` over the axes where ``shape`` has size 1 (the gradient of a broadcast)."""
    dims = [d for d, n in enumerate(shape) if n == 1 and x.shape[d] != 1]
    return x.sum(dim=dims, keepdim=True) if dims else x


def backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    spec: AttentionSpec,
    *,
    dlse: Tensor | None = None,
    mask_grad: bool = False,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
    engine: Engine = None,
    grad_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Gradients of tiled attention, recomputing each tile from the saved ``lse``.

    ``out`` and ``lse`` must be those of the *whole* key range (this is also what lets
    ring attention run the backward one key shard at a time).

    Args:
        dout: ``(B, Hq, Lq, Dv)``; q, k, v as in `forward`; out: ``(B, Hq, Lq, Dv)``;
        lse: ``(B, Hq, Lq)``; dlse: optional gradient of ``lse``, ``(B, Hq, Lq)``.
        mask_grad: also return the gradient of the float mask ``spec.mask``.
        engine: as in `forward`; the fused engine cannot take ``dlse`` or ``mask_grad``,
            so those use the torch engine.
        grad_dtype: dtype of ``dq, dk, dv``; default the inputs' dtypes (ring attention asks
            for the accumulation dtype, so that per-shard gradients add up without rounding).

    Returns:
        ``dq, dk, dv`` in ``grad_dtype`` (default the inputs' dtypes) and ``dmask`` (shape of ``spec.mask``) or None.
    """
    B, _, Lq, _ = q.shape
    acc = spec.acc_dtype
    # A row with no allowed key has lse = -inf; +inf makes exp(s - lse) = 0 there.
    lse_bwd = torch.where(torch.isneginf(lse), float("inf"), lse.to(acc))  # (B, Hq, Lq)
    delta = (dout.to(acc) * out.to(acc)).sum(-1)  # (B, Hq, Lq): rowsum(dO * O)
    if dlse is not None:
        delta = delta - dlse.to(acc)  # d lse / d s = p, folded into the same term
    fused = _choose_engine(q, spec, engine) and dlse is None and not mask_grad
    if fused:
        k_e, v_e = flash_cpu.expand_heads(k, spec.group), flash_cpu.expand_heads(v, spec.group)
        dk_e = torch.zeros(k_e.shape, dtype=acc, device=q.device)  # (B, Hq, Lk, D): per query head
        dv_e = torch.zeros(v_e.shape, dtype=acc, device=q.device)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    dmask = torch.zeros(spec.mask.shape, dtype=acc, device=q.device) if mask_grad else None
    merge_open = fused and spec.alibi_slopes is None and (spec.mask is None or spec.mask.shape[-2] == 1)
    block_q = _query_block(spec, fused, merge_open, block_q)
    for i0 in range(0, Lq, block_q):
        i1 = min(i0 + block_q, Lq)
        for j0, j1, is_causal in key_segments(spec, i0, i1, block_k, merge_open):
            if fused:
                mask = None if is_causal else spec.additive_tile(i0, i1, j0, j1, q.device)
                gq, gk, gv = flash_cpu.backward(
                    dout[:, :, i0:i1], q[:, :, i0:i1], k_e[:, :, j0:j1], v_e[:, :, j0:j1],
                    out[:, :, i0:i1], lse_bwd[:, :, i0:i1], mask=mask, is_causal=is_causal, scale=spec.scale,
                )  # fmt: skip
                dq[:, :, i0:i1] += gq
                dk_e[:, :, j0:j1] += gk
                dv_e[:, :, j0:j1] += gv
                continue
            _tile_backward_torch(spec, dout, q, k, v, lse_bwd, delta, i0, i1, j0, j1, dq, dk, dv, dmask)
    if fused:
        G = spec.group
        dk = dk_e.view(B, spec.kv_heads, G, *k.shape[2:]).sum(2)  # (B, Hk, Lk, D)
        dv = dv_e.view(B, spec.kv_heads, G, *v.shape[2:]).sum(2)  # (B, Hk, Lk, Dv)
    return dq.to(grad_dtype or q.dtype), dk.to(grad_dtype or k.dtype), dv.to(grad_dtype or v.dtype), dmask


def _tile_backward_torch(
    spec: AttentionSpec,
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lse_bwd: Tensor,
    delta: Tensor,
    i0: int,
    i1: int,
    j0: int,
    j1: int,
    dq: Tensor,
    dk: Tensor,
    dv: Tensor,
    dmask: Tensor | None,
) -> None:
    """Accumulate one tile's contribution to ``dq``, ``dk``, ``dv`` (and ``dmask``) in place."""
    acc = spec.acc_dtype
    B, Hk, G = spec.batch, spec.kv_heads, spec.group
    bq, bk = i1 - i0, j1 - j0
    q_t, k_t, v_t = q[:, :, i0:i1].to(acc), k[:, :, j0:j1].to(acc), v[:, :, j0:j1].to(acc)
    do_t = dout[:, :, i0:i1].to(acc)  # (B, Hq, bq, Dv)
    s, dcap = spec.scores(q_t, k_t, i0, j0, need_softcap_grad=spec.softcap is not None)
    p = s.sub_(lse_bwd[:, :, i0:i1, None]).exp_()  # (B, Hq, bq, bk): the exact global weights
    do5 = do_t.view(B, Hk, G, bq, -1)  # (B, Hk, G, bq, Dv)
    dp = torch.matmul(do5, v_t.unsqueeze(2).transpose(-1, -2)).view(B, Hk * G, bq, bk)  # dO v^T
    if spec.dropout_p > 0:
        keep = spec.dropout_tile(i0, i1, j0, j1, q.device)
        p_used = p * keep / (1 - spec.dropout_p)
        dp = dp * keep / (1 - spec.dropout_p)
    else:
        p_used = p
    # dV_j = sum_i p_ij dO_i, summed over the query heads that share the key head.
    dv[:, :, j0:j1] += torch.matmul(p_used.view(B, Hk, G, bq, bk).transpose(-1, -2), do5).sum(2)
    ds = dp.sub_(delta[:, :, i0:i1, None]).mul_(p)  # (B, Hq, bq, bk): softmax backward, in dp's buffer
    if dmask is not None:
        m_t = spec.mask_tile(i0, i1, j0, j1)
        sl_q = slice(None) if dmask.shape[-2] == 1 else slice(i0, i1)
        sl_k = slice(None) if dmask.shape[-1] == 1 else slice(j0, j1)
        dmask[..., sl_q, sl_k] += _reduce_to(ds, m_t.shape)
    if dcap is not None:
        ds.mul_(dcap)
    ds5 = ds.view(B, Hk, G, bq, bk)  # (B, Hk, G, bq, bk)
    # The score scale is applied to the (bq, D) and (bk, D) products, not to the (bq, bk) tile.
    dq[:, :, i0:i1] += torch.matmul(ds5, k_t.unsqueeze(2)).view(B, Hk * G, bq, -1).mul_(spec.scale)
    dk[:, :, j0:j1] += torch.matmul(ds5.transpose(-1, -2), q_t.view(B, Hk, G, bq, -1)).sum(2).mul_(spec.scale)


# ---------------------------------------------------------------------- autograd
class TiledAttention(torch.autograd.Function):
    """Autograd wrapper: saves ``out`` and ``lse``, never the scores."""

    @staticmethod
    def forward(ctx, q, k, v, mask, spec: AttentionSpec, block_q: int, block_k: int, engine: Engine):
        spec = dataclasses.replace(spec, mask=mask)
        out, lse = forward(q, k, v, spec, block_q=block_q, block_k=block_k, engine=engine)
        ctx.save_for_backward(q, k, v, mask, out, lse)
        ctx.spec, ctx.blocks, ctx.engine = spec, (block_q, block_k), engine
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        grads = _backward_from_saved(ctx, dout, dlse, block_q=ctx.blocks[0], block_k=ctx.blocks[1], engine=ctx.engine)
        return (*grads, None, None, None, None)


def _backward_from_saved(ctx, dout: Tensor | None, dlse: Tensor | None, **blocks) -> tuple:
    """``dq, dk, dv, dmask`` from what the autograd functions save: ``q, k, v, mask, out, lse`` and the spec."""
    q, k, v, mask, out, lse = ctx.saved_tensors
    spec = dataclasses.replace(ctx.spec, mask=mask)
    mask_grad = mask is not None and mask.dtype != torch.bool and ctx.needs_input_grad[3]
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, dmask = backward(
        dout, q, k, v, out, lse, spec,
        dlse=dlse if dlse is not None and bool(dlse.any()) else None, mask_grad=mask_grad, **blocks,
    )  # fmt: skip
    return dq, dk, dv, None if dmask is None else dmask.to(mask.dtype)


def refusal(q: Tensor, spec: AttentionSpec, return_lse: bool) -> str | None:
    """The tiled kernel computes every request."""
    return None


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    spec: AttentionSpec,
    return_lse: bool = False,
    *,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
    engine: Engine = None,
) -> tuple[Tensor, Tensor]:
    """Tiled attention with autograd: ``(out, lse)`` (``lse`` always). Shapes and arguments as in `forward`."""
    return TiledAttention.apply(q, k, v, spec.mask, spec, block_q, block_k, engine)


def attention_varlen(
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
    """Packed sequences, each through `attention` on views (`attnkit.kernels.packed`).

    ``q (total_q, Hq, D)``, ``k (total_k, Hk, D)``, ``v (total_k, Hk, Dv)`` -> ``out (total_q, Hq, Dv)``,
    ``lse (Hq, total_q)``.
    """
    return packed.per_sequence(attention, refusal, q, k, v, cu_seqlens_q, cu_seqlens_k, spec, return_lse)


def statistics(
    q: Tensor, k: Tensor, v: Tensor | None, spec: AttentionSpec, lse: Tensor | None, *, topk: int, pool
) -> dict[str, Tensor]:
    """The statistics pass in PyTorch, on any device.

    With the forward's ``lse``: a second blockwise pass over the scores (`attnkit.kernels.stats`).
    With ``lse=None``: one pass that also returns ``output`` (with autograd: the backward is
    `backward`'s, from the saved output and log-sum-exp) and ``lse`` (`stats.strip_forward`).
    """
    if lse is not None:
        return stats.stats_forward(q, k, v, spec, lse, topk=topk, pool=pool)
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        out, lse, *rest = StripAttention.apply(q, k, v, spec.mask, spec, topk, pool)
        return {"output": out, "lse": lse, **dict(zip(STAT_NAMES, rest, strict=True))}
    result = stats.strip_forward(q, k, v, spec, topk=topk, pool=pool)
    result["output"] = result["output"].to(q.dtype)
    return result


STAT_NAMES = ("entropy", "mean_distance", "received", "topk_index", "topk_weight", "pooled")


class StripAttention(torch.autograd.Function):
    """Output and statistics in one pass (`stats.strip_forward`); the output's gradient as `TiledAttention`'s."""

    @staticmethod
    def forward(ctx, q, k, v, mask, spec: AttentionSpec, topk: int, pool):
        spec = dataclasses.replace(spec, mask=mask)
        result = stats.strip_forward(q, k, v, spec, topk=topk, pool=pool)
        out, lse = result["output"].to(q.dtype), result["lse"]
        rest = [result[name] for name in STAT_NAMES]
        ctx.mark_non_differentiable(*rest)
        ctx.save_for_backward(q, k, v, mask, out, lse)
        ctx.spec = spec
        return (out, lse, *rest)

    @staticmethod
    def backward(ctx, dout, dlse, *_):
        return (*_backward_from_saved(ctx, dout, dlse), None, None, None)
