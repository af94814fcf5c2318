"""Masks and score biases, defined on indices: the pieces `AttentionSpec` builds its tiles from.

Every definition here is a function of query and key *positions*, so a kernel can
evaluate it on one tile of the score matrix at a time and never build the full
``Lq x Lk`` matrix. `attnkit.spec.AttentionSpec` is their one user inside the library;
the public pieces (`key_padding_mask`, `alibi_slopes`, `to_additive`) are what users
build masks with.

Alignment. When ``Lq != Lk`` the queries are aligned to the *end* of the keys
(bottom-right), as FlashAttention >= 2.1 and KV-cache decoding need: query ``i``
sits at key position ``i' = i + Lk - Lq``::

    Lq = 2, Lk = 5, causal          Lq = 5, Lk = 2, causal
        k0 k1 k2 k3 k4                  k0 k1
    q0   1  1  1  1  0              q0   0  0     (sees nothing: output 0)
    q1   1  1  1  1  1              q1   0  0
                                    q2   0  0
                                    q3   1  0
                                    q4   1  1

``offset = Lk - Lq`` (or a block's own alignment in ring attention) is passed to every
piece that depends on alignment.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["alibi_slopes", "aligned_distance", "key_padding_mask", "to_additive", "window_allowed"]


def window_allowed(
    i0: int, i1: int, j0: int, j1: int, offset: int, left: int | None, right: int | None, device: torch.device
) -> Tensor:
    """``(i1 - i0, j1 - j0)`` bool: query ``i`` may see key ``j`` iff ``i' - left <= j <= i' + right``.

    ``i' = i + offset`` is the aligned position; ``None`` leaves a side unbounded. Causal is
    ``(left, right) = (None, 0)``.
    """
    i = torch.arange(i0, i1, device=device)[:, None] + offset  # (bq, 1) aligned positions
    j = torch.arange(j0, j1, device=device)[None, :]  # (1, bk)
    allowed = torch.ones(i1 - i0, j1 - j0, dtype=torch.bool, device=device)
    if left is not None:
        allowed &= j >= i - left
    if right is not None:
        allowed &= j <= i + right
    return allowed


def aligned_distance(
    i0: int, i1: int, j0: int, j1: int, offset: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """``(i1 - i0, j1 - j0)`` distances ``|i' - j|`` in ``dtype``: ALiBi's bias is ``-slope[h]`` times this."""
    i = torch.arange(i0, i1, device=device, dtype=dtype)[:, None] + offset  # (bq, 1)
    j = torch.arange(j0, j1, device=device, dtype=dtype)[None, :]  # (1, bk)
    return (i - j).abs_()


def alibi_slopes(num_heads: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The standard ALiBi slopes ``(num_heads,)`` of Press et al. (2022), in ``dtype``.

    The values are computed in Python floats and rounded once to ``dtype``: attention in fp64
    asks for fp64 slopes rather than fp32 ones cast up.

    For ``n`` a power of two the slopes are the geometric sequence starting at
    ``2 ** (-8 / n)`` with that ratio. Otherwise the paper takes the slopes of
    the closest power of two below ``n`` and fills the rest with every other
    slope of the next power of two (as its reference implementation does).
    """
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"alibi_slopes: num_heads must be a positive int, got {num_heads!r}")

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (k + 1) for k in range(n)]

    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = power_of_two(closest)
    if closest < num_heads:
        slopes += power_of_two(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=dtype)


def key_padding_mask(lengths: Tensor, max_len: int) -> Tensor:
    """A ``(B, 1, 1, max_len)`` bool mask, True for the first ``lengths[b]`` keys (True = may attend).

    This is attnkit's convention (as SDPA's). ``torch.nn.MultiheadAttention``'s ``key_padding_mask``
    (and so `attnkit.nn.MultiheadAttention`'s, a drop-in) means the opposite, True = ignore: pass it
    ``~mask.view(B, max_len)`` there.

    The singleton query axis is kept so that kernels never expand it to ``Lq x Lk``.
    """
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 0:
        raise ValueError(f"key_padding_mask: max_len must be an int >= 0, got {max_len!r}")
    lengths = torch.as_tensor(lengths)
    if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        if not lengths.is_floating_point() or not bool((lengths == lengths.round()).all()):
            raise ValueError(f"key_padding_mask: lengths must be whole numbers of keys, got {lengths.tolist()}")
        lengths = lengths.long()
    if lengths.dim() != 1:
        raise ValueError(f"key_padding_mask: lengths must be 1-D (B,), got shape {tuple(lengths.shape)}")
    if (lengths < 0).any() or (lengths > max_len).any():
        raise ValueError(f"key_padding_mask: lengths must lie in [0, {max_len}], got {lengths.tolist()}")
    keep = torch.arange(max_len, device=lengths.device) < lengths[:, None]  # (B, Lk)
    return keep[:, None, None, :]


def to_additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A mask as a float mask to add to the scores: bool True (may attend) -> 0, False -> ``-inf``.

    A float mask is cast to ``dtype``. The shape is kept, broadcast axes included.
    """
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    return mask.to(dtype)
