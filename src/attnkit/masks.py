"""Masks and score biases as small composable pieces.

Every piece is a function of index tensors, in the spirit of attention-gym's
``mask_mod`` / ``score_mod``: a *mask* maps ``(i, j)`` to a bool (True = may
attend) and a *bias* maps ``(h, i, j)`` to a float added to the scores. Because
they are functions of indices, a kernel can evaluate them on one tile of the
score matrix at a time and never build the full ``Lq x Lk`` matrix.

Alignment. When ``Lq != Lk`` the queries are aligned to the *end* of the keys
(bottom-right), as FlashAttention >= 2.1 and KV-cache decoding need: query ``i``
sits at key position ``i + Lk - Lq``::

    Lq = 2, Lk = 5, causal          Lq = 5, Lk = 2, causal
        k0 k1 k2 k3 k4                  k0 k1
    q0   1  1  1  1  0              q0   0  0     (sees nothing: output 0)
    q1   1  1  1  1  1              q1   0  0
                                    q2   0  0
                                    q3   1  0
                                    q4   1  1

``offset = Lk - Lq`` is passed to every piece that depends on alignment.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

MaskMod = Callable[[Tensor, Tensor], Tensor]
BiasMod = Callable[[Tensor, Tensor, Tensor], Tensor]

__all__ = [
    "alibi_bias",
    "alibi_slopes",
    "and_masks",
    "causal_mask",
    "key_padding_mask",
    "or_masks",
    "window_mask",
]


def causal_mask(offset: int = 0) -> MaskMod:
    """Query ``i`` may attend to key ``j`` iff ``j <= i + offset``."""

    def mask(i: Tensor, j: Tensor) -> Tensor:
        return j <= i + offset

    return mask


def window_mask(left: int | None, right: int | None, offset: int = 0) -> MaskMod:
    """Query ``i`` may attend to key ``j`` iff ``i' - left <= j <= i' + right``.

    ``i' = i + offset`` is the aligned position; ``None`` leaves a side unbounded.
    ``window_mask(None, 0)`` is the causal mask.
    """

    def mask(i: Tensor, j: Tensor) -> Tensor:
        pos = i + offset
        allowed = torch.ones(torch.broadcast_shapes(i.shape, j.shape), dtype=torch.bool, device=i.device)
        if left is not None:
            allowed &= j >= pos - left
        if right is not None:
            allowed &= j <= pos + right
        return allowed

    return mask


def and_masks(*masks: MaskMod) -> MaskMod:
    """A mask that allows ``(i, j)`` only where every given mask does."""

    def mask(i: Tensor, j: Tensor) -> Tensor:
        out = masks[0](i, j)
        for m in masks[1:]:
            out = out & m(i, j)
        return out

    return mask


def or_masks(*masks: MaskMod) -> MaskMod:
    """A mask that allows ``(i, j)`` wherever any given mask does."""

    def mask(i: Tensor, j: Tensor) -> Tensor:
        out = masks[0](i, j)
        for m in masks[1:]:
            out = out | m(i, j)
        return out

    return mask


def alibi_slopes(num_heads: int) -> Tensor:
    """The standard ALiBi slopes ``(num_heads,)`` of Press et al. (2022).

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
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: Tensor, offset: int = 0) -> BiasMod:
    """The ALiBi bias ``-slope[h] * |i + offset - j|`` (symmetric, so it also serves encoders).

    ``h`` indexes the query heads; ``slopes`` has shape ``(Hq,)``.
    """

    def bias(h: Tensor, i: Tensor, j: Tensor) -> Tensor:
        dist = (i + offset - j).abs().to(slopes.dtype)
        return -slopes[h] * dist

    return bias


def key_padding_mask(lengths: Tensor, max_len: int) -> Tensor:
    """A ``(B, 1, 1, max_len)`` bool mask, True for the first ``lengths[b]`` keys.

    The singleton query axis is kept so that kernels never expand it to ``Lq x Lk``.
    """
    lengths = torch.as_tensor(lengths)
    if lengths.dim() != 1:
        raise ValueError(f"key_padding_mask: lengths must be 1-D (B,), got shape {tuple(lengths.shape)}")
    if (lengths < 0).any() or (lengths > max_len).any():
        raise ValueError(f"key_padding_mask: lengths must lie in [0, {max_len}], got {lengths.tolist()}")
    keep = torch.arange(max_len, device=lengths.device) < lengths[:, None]  # (B, Lk)
    return keep[:, None, None, :]
