"""Exact merging of partial attention results by their log-sum-exp.

If ``out_a, lse_a`` is attention of some queries over one set of keys and
``out_b, lse_b`` over a disjoint set, attention over the union is::

    lse = log(exp(lse_a) + exp(lse_b))
    out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b

This is what lets the tiled kernel, the ring-attention ranks and the statistics pass
compute attention piecewise and still get the exact answer. ``lse = -inf`` marks a
row that saw no allowed key; it contributes nothing and never produces NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor


def merge_partials(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Merge two partial attention results over disjoint key sets.

    Args:
        out_a, out_b: ``(..., L, Dv)`` normalised partial outputs (any float dtype).
        lse_a, lse_b: ``(..., L)`` their log-sum-exps (fp32 or fp64; ``-inf`` = no keys).

    Returns:
        ``out (..., L, Dv)`` in ``lse``'s dtype and ``lse (..., L)``.
    """
    lse = torch.logaddexp(lse_a, lse_b)  # (..., L); -inf only if both are -inf
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    w_a = torch.exp(lse_a - safe).unsqueeze(-1)  # (..., L, 1); exp(-inf) = 0
    w_b = torch.exp(lse_b - safe).unsqueeze(-1)
    out = out_a.to(lse.dtype) * w_a + out_b.to(lse.dtype) * w_b
    return out, lse
