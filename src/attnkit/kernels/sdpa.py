"""PyTorch's own kernel (``scaled_dot_product_attention``), where a request maps onto it exactly.

What maps: no ALiBi, softcap or window (each would need an ``Lq x Lk`` float mask),
no dropout (SDPA draws its own pattern, so results would differ from every other
backend), causal only where PyTorch's top-left alignment equals attnkit's
bottom-right one (``Lq == Lk``, or ``Lq == 1`` where causal masks nothing), and a
user mask passed through as the caller built it, never expanded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit.kernels import flash_cpu
from attnkit.masks import to_additive
from attnkit.spec import AttentionSpec

# enable_gqa arrived in PyTorch 2.5; older releases get the key/value heads copied.
_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


def refusal(q: Tensor, spec: AttentionSpec, return_lse: bool) -> str | None:
    """Why SDPA cannot compute this request exactly and lean, or None if it can."""
    if spec.alibi_slopes is not None:
        return "ALiBi would need an Lq x Lk float mask"
    if spec.softcap is not None:
        return "SDPA has no softcap"
    if spec.window is not None:
        return "a window would need an Lq x Lk mask"
    if spec.dropout_p > 0:
        return "SDPA's dropout pattern differs from attnkit's counter-based one"
    if spec.align is not None and spec.align != spec.kv_len - spec.q_len:
        return "custom query/key alignment (spec.align) is computed by the tiled kernel"
    if spec.causal and spec.q_len not in (1, spec.kv_len):
        return "SDPA aligns causal top-left; attnkit aligns bottom-right and Lq != Lk"
    if spec.causal and spec.mask is not None and spec.q_len != 1:
        return "SDPA takes is_causal or a mask, not both"
    if spec.mask is not None and spec.mask.dtype != torch.bool and spec.mask.requires_grad:
        return "the float mask needs a gradient"
    if spec.scale <= 0:
        return "its kernels mask before they scale, so a scale <= 0 turns masked scores into NaN"
    if spec.head_dim != spec.v_head_dim:
        return "its fused kernels need Dv == D (its fallback would materialise Lq x Lk)"
    if return_lse:
        if q.device.type != "cpu":
            return "the log-sum-exp is only reachable through its CPU kernel"
        if torch.is_grad_enabled() and q.requires_grad:
            return "its log-sum-exp output carries no gradient"
    return None


def attention(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec, return_lse: bool = False):
    """SDPA forward (autograd by PyTorch). Shapes: ``q (B, Hq, Lq, D)``, ``k, v (B, Hk, Lk, D)``.

    Returns ``(out, lse)``; ``lse`` is None unless ``return_lse``.
    """
    # A branch, not `causal and q_len != 1`: under dynamic shapes that would be a SymBool, which SDPA refuses.
    is_causal = False if spec.q_len == 1 else spec.causal
    mask = spec.mask
    if mask is not None and mask.dtype != torch.bool and mask.dtype not in (q.dtype, spec.acc_dtype):
        # SDPA takes a float mask in q's dtype or fp32; attnkit adds it in the accumulation dtype.
        mask = mask.to(spec.acc_dtype)
    if return_lse:
        k, v = flash_cpu.expand_heads(k, spec.group), flash_cpu.expand_heads(v, spec.group)
        mask = None if mask is None else to_additive(mask, spec.acc_dtype)
        out, lse = flash_cpu.forward(q, k, v, mask=mask, is_causal=is_causal, scale=spec.scale)
        return out, lse.to(spec.acc_dtype)
    kwargs = {}
    if spec.group > 1:
        if _HAS_GQA:
            kwargs["enable_gqa"] = True
        else:
            k, v = flash_cpu.expand_heads(k, spec.group), flash_cpu.expand_heads(v, spec.group)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=spec.scale, **kwargs)
    return out, None
