"""The reference kernel: attention as it is defined, one step per line.

It materialises the ``(B, Hq, Lq, Lk)`` score matrix, so it is for small inputs, for
learning, and for testing: every other backend is checked against it in float64.
Gradients come from PyTorch's autograd through these plain operations.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit.spec import AttentionSpec


def softmax_with_empty_rows(scores: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax over the last axis that gives 0 (not NaN) for a row of all ``-inf``.

    Args:
        scores: ``(..., Lk)`` with ``-inf`` at masked positions.

    Returns:
        ``p (..., Lk)`` and ``lse (...)``, the natural-log log-sum-exp (``-inf`` for an
        empty row). The row maximum is detached before subtracting it: it cancels in
        the softmax, and keeping it out of the graph keeps empty rows free of NaN
        gradients.
    """
    row_max = scores.amax(dim=-1, keepdim=True).detach()  # (..., 1)
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    unnormalised = torch.exp(scores - row_max)  # exp(-inf) = 0 at masked positions
    total = unnormalised.sum(dim=-1, keepdim=True)  # (..., 1)
    empty = total == 0
    safe_total = torch.where(empty, torch.ones_like(total), total)
    p = unnormalised / safe_total
    lse = torch.where(empty, torch.full_like(total, float("-inf")), row_max + torch.log(safe_total))
    return p, lse.squeeze(-1)


def attention_probs(q: Tensor, k: Tensor, spec: AttentionSpec) -> tuple[Tensor, Tensor]:
    """Attention weights before dropout, ``(B, Hq, Lq, Lk)``, and ``lse (B, Hq, Lq)``.

    Computed in ``spec.acc_dtype`` (fp32, or fp64 for fp64 inputs).
    """
    scores, _ = spec.scores(q, k, 0, 0)  # (B, Hq, Lq, Lk): scale, softcap, biases, masks
    return softmax_with_empty_rows(scores)


def forward(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec) -> tuple[Tensor, Tensor]:
    """Reference attention.

    Args:
        q: ``(B, Hq, Lq, D)``; k: ``(B, Hk, Lk, D)``; v: ``(B, Hk, Lk, Dv)``.

    Returns:
        ``out (B, Hq, Lq, Dv)`` in ``q.dtype`` and ``lse (B, Hq, Lq)`` in the accumulation dtype.
    """
    p, lse = attention_probs(q, k, spec)
    if spec.dropout_p > 0:
        keep = spec.dropout_tile(0, spec.q_len, 0, spec.kv_len, q.device)
        p = p * keep / (1 - spec.dropout_p)
    B, Hq, Lq, Lk = p.shape
    p5 = p.view(B, spec.kv_heads, spec.group, Lq, Lk)  # (B, Hk, G, Lq, Lk)
    v5 = v.to(spec.acc_dtype).unsqueeze(2)  # (B, Hk, 1, Lk, Dv)
    out = torch.matmul(p5, v5).reshape(B, Hq, Lq, -1)  # (B, Hq, Lq, Dv)
    return out.to(q.dtype), lse


def refusal(q: Tensor, spec: AttentionSpec, return_lse: bool) -> str | None:
    """The reference computes every request (auto skips it above its memory limit)."""
    return None


def attention(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec, return_lse: bool = False) -> tuple[Tensor, Tensor]:
    """The backend entry point: `forward`, with autograd through its plain operations."""
    return forward(q, k, v, spec)
