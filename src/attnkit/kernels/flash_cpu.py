"""PyTorch's fused CPU flash-attention kernel, called the way every attnkit kernel needs it.

``aten._scaled_dot_product_flash_attention_for_cpu`` (and its backward) is the fastest
exact attention on a CPU and, unlike ``F.scaled_dot_product_attention``, returns the
log-sum-exp. Two kernels use it: ``sdpa`` (for ``return_lse``) and ``tiled`` (its
``fused`` tile engine). What they need from it, written once here:

* key/value heads copied up to the query heads (it has no grouped-query support);
* the head dim contiguous (it reads rows with stride 1 and returns garbage otherwise);
* the float mask in the accumulation dtype (fp32, fp64 for fp64 inputs), never rounded to
  the query dtype: in fp16, -1e5 would become -inf and turn a row into "no allowed key";
* a row with no allowed key reported as attnkit defines it (output 0, ``lse = -inf``),
  where the kernel reports ``lse = 0``.
"""

from __future__ import annotations

import torch
from torch import Tensor

_forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

__all__ = ["acc_dtype", "backward", "expand_heads", "forward", "head_dim_contiguous"]


def acc_dtype(q: Tensor) -> torch.dtype:
    """The kernel's accumulation dtype, in which it also takes a float mask: fp64 for fp64, else fp32."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def expand_heads(x: Tensor, group: int) -> Tensor:
    """``(B, Hk, L, D) -> (B, Hk * group, L, D)``: head ``h`` copies key head ``h // group``."""
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def head_dim_contiguous(x: Tensor) -> Tensor:
    """``x`` itself when its last dim has stride 1, else a copy that has (the kernel assumes it)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _empty_rows(mask: Tensor | None, shape: tuple[int, int, int]) -> Tensor | None:
    """``(B, Hq, bq)`` bool rows of an additive mask that allow no key (None if none can be)."""
    if mask is None:
        return None
    empty = torch.isneginf(mask).all(dim=-1)  # (B|1, Hq|1, bq|1)
    if torch.compiler.is_compiling():  # no data-dependent branch in a traced graph: always apply it
        return empty.expand(shape)
    return empty.expand(shape) if bool(empty.any()) else None


def forward(
    q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None, is_causal: bool, scale: float
) -> tuple[Tensor, Tensor]:
    """One call of the fused kernel: ``out (B, H, Lq, D)`` in ``q.dtype`` and ``lse (B, H, Lq)`` fp32/fp64.

    ``q (B, H, Lq, D)``, ``k, v (B, H, Lk, D)`` (heads already expanded); ``mask`` additive,
    broadcastable to ``(B, H, Lq, Lk)`` (``-inf`` where disallowed), any float dtype. The scale must
    be positive: the kernel applies ``is_causal`` before scaling (``-inf * 0`` would be NaN).
    """
    q, k, v = head_dim_contiguous(q), head_dim_contiguous(k), head_dim_contiguous(v)
    if mask is not None:
        mask = mask.to(acc_dtype(q))
    out, lse = _forward(q, k, v, is_causal=is_causal, attn_mask=mask, scale=scale)[:2]
    empty = _empty_rows(mask, tuple(lse.shape))
    if empty is not None:  # the kernel reports lse = 0 for a row with no allowed key
        lse = lse.masked_fill(empty, float("-inf"))
        out = out.masked_fill(empty.unsqueeze(-1), 0)
    return out, lse


def backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    *,
    mask: Tensor | None,
    is_causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``dq, dk, dv`` of one fused call, from its ``out`` and ``lse``.

    ``lse (B, H, Lq)`` in any float dtype: the kernel takes it only in the accumulation dtype, cast here.
    A row with no allowed key must carry ``lse = +inf`` (so every ``exp(s - lse)`` is 0).
    """
    lse = lse.to(acc_dtype(q))
    dq, dk, dv = _backward(
        head_dim_contiguous(dout),
        head_dim_contiguous(q),
        head_dim_contiguous(k),
        head_dim_contiguous(v),
        head_dim_contiguous(out),
        lse,
        0.0,
        is_causal,
        attn_mask=None if mask is None else mask.to(acc_dtype(q)),
        scale=scale,
    )
    return dq, dk, dv
