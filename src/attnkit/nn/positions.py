"""Position information: sinusoidal, learned absolute, rotary (RoPE) and ALiBi.

* `SinusoidalPositions` and `LearnedPositions` add a vector to each token embedding
  ``(B, L, dim)``.
* `RotaryEmbedding` rotates queries and keys ``(B, H, L, D)`` so that ``q_i · k_j``
  depends on ``i - j`` only (Su et al., 2021, "RoFormer", arXiv:2104.09864).
* ALiBi is a score bias, computed inside `attnkit.attention` (``alibi=True``); the
  modules select it with ``positions="alibi"`` (Press et al., 2022, arXiv:2108.12409).

Every piece takes an ``offset``: the position of the first token, for cached decoding.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["LearnedPositions", "RotaryEmbedding", "SinusoidalPositions", "rotate", "sinusoidal_table"]


def _check_offset(offset: int) -> int:
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be a non-negative int, got {offset!r}")
    return offset


def sinusoidal_table(
    length: int, dim: int, *, base: float = 10000.0, offset: int = 0, device=None, dtype=torch.float32
) -> Tensor:
    """The sinusoidal encodings of Vaswani et al. (2017, section 3.5), ``(length, dim)``.

    ``PE[p, 2i] = sin(p / base^(2i / dim))`` and ``PE[p, 2i + 1] = cos(p / base^(2i / dim))``
    for positions ``p = offset .. offset + length - 1``. ``dim`` must be even.
    """
    if dim % 2 != 0:
        raise ValueError(f"sinusoidal_table: dim must be even, got {dim}")
    pos = torch.arange(offset, offset + length, device=device, dtype=torch.float64)[:, None]  # (L, 1)
    inv_freq = base ** (-torch.arange(0, dim, 2, device=device, dtype=torch.float64) / dim)  # (dim / 2,)
    angle = pos * inv_freq  # (L, dim / 2)
    table = torch.stack([angle.sin(), angle.cos()], dim=-1).view(length, dim)  # (L, dim): sin, cos interleaved
    return table.to(dtype)


class SinusoidalPositions(nn.Module):
    """Adds the fixed sinusoidal encodings to ``x (B, L, dim)`` (no parameters)."""

    def __init__(self, dim: int, *, base: float = 10000.0) -> None:
        super().__init__()
        if dim % 2 != 0:
            raise ValueError(f"SinusoidalPositions: dim must be even, got {dim}")
        self.dim, self.base = dim, base

    def forward(self, x: Tensor, *, offset: int = 0) -> Tensor:
        """``x (B, L, dim)`` -> ``x + PE[offset : offset + L]`` of the same shape."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"SinusoidalPositions: x must have last dim {self.dim}, got shape {tuple(x.shape)}")
        table = sinusoidal_table(
            x.shape[-2], self.dim, base=self.base, offset=_check_offset(offset), device=x.device, dtype=x.dtype
        )
        return x + table


class LearnedPositions(nn.Module):
    """A learned absolute position embedding (``max_len`` vectors), added to ``x (B, L, dim)``."""

    def __init__(self, max_len: int, dim: int, *, device=None, dtype=None) -> None:
        super().__init__()
        self.max_len = max_len
        self.weight = nn.Parameter(torch.empty(max_len, dim, device=device, dtype=dtype))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: Tensor, *, offset: int = 0) -> Tensor:
        """``x (B, L, dim)`` -> ``x + weight[offset : offset + L]``."""
        L = x.shape[-2]
        if _check_offset(offset) + L > self.max_len:
            raise ValueError(f"LearnedPositions: positions {offset}..{offset + L - 1} exceed max_len={self.max_len}")
        return x + self.weight[offset : offset + L]


def rotate(x: Tensor, cos: Tensor, sin: Tensor, layout: Literal["half", "interleaved"]) -> Tensor:
    """Rotate the pairs of ``x (..., L, D)`` by the angles whose ``cos, sin`` are ``(L, D / 2)``.

    ``half``: pair ``(x[i], x[i + D/2])`` (GPT-NeoX, Llama); ``interleaved``: pair
    ``(x[2i], x[2i + 1])`` (the RoFormer paper, GPT-J).
    """
    D = x.shape[-1]
    if layout == "half":
        x1, x2 = x[..., : D // 2], x[..., D // 2 :]  # (..., L, D/2) each
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)  # (..., L, D)
    x1, x2 = x[..., 0::2], x[..., 1::2]  # (..., L, D/2) each
    return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)  # (..., L, D)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE) for queries and keys ``(B, H, L, D)``.

    Dimension pair ``i`` of position ``p`` is rotated by ``p * base^(-2i / D)``
    (Su et al., 2021). ``layout="half"`` pairs dimension ``i`` with ``i + D/2``, as
    Llama-style checkpoints store them; ``"interleaved"`` pairs ``2i`` with ``2i + 1``.
    The angles are computed in fp64 and applied in the input's dtype (fp32 for
    half-precision inputs, then cast back).
    """

    def __init__(self, head_dim: int, *, base: float = 10000.0, layout: Literal["half", "interleaved"] = "half"):
        super().__init__()
        if head_dim % 2 != 0:
            raise ValueError(f"RotaryEmbedding: head_dim must be even, got {head_dim}")
        if layout not in ("half", "interleaved"):
            raise ValueError(f"RotaryEmbedding: layout must be 'half' or 'interleaved', got {layout!r}")
        if not base > 0:
            raise ValueError(f"RotaryEmbedding: base must be > 0, got {base!r}")
        self.head_dim, self.base, self.layout = head_dim, float(base), layout

    def angles(self, length: int, *, offset: int = 0, device=None, dtype=torch.float32) -> tuple[Tensor, Tensor]:
        """``cos, sin`` of shape ``(length, D / 2)`` for positions ``offset .. offset + length - 1``."""
        pos = torch.arange(offset, offset + length, device=device, dtype=torch.float64)  # (L,)
        inv_freq = self.base ** (
            -torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float64) / self.head_dim
        )  # (D/2,)
        angle = pos[:, None] * inv_freq[None, :]  # (L, D/2)
        return angle.cos().to(dtype), angle.sin().to(dtype)

    def forward(self, q: Tensor, k: Tensor, *, offset: int = 0) -> tuple[Tensor, Tensor]:
        """Rotate ``q (B, Hq, L, D)`` and ``k (B, Hk, L, D)``, whose first token sits at ``offset``."""
        _check_offset(offset)
        for name, x in (("q", q), ("k", k)):
            if x.shape[-1] != self.head_dim:
                raise ValueError(
                    f"RotaryEmbedding: {name} must have head dim {self.head_dim}, got shape {tuple(x.shape)}"
                )
        work = q.dtype if q.dtype in (torch.float32, torch.float64) else torch.float32
        cos, sin = self.angles(q.shape[-2], offset=offset, device=q.device, dtype=work)
        if k.shape[-2] != q.shape[-2]:
            raise ValueError(f"RotaryEmbedding: q and k must have the same length, got {q.shape[-2]}, {k.shape[-2]}")
        rq = rotate(q.to(work), cos, sin, self.layout).to(q.dtype)
        rk = rotate(k.to(work), cos, sin, self.layout).to(k.dtype)
        return rq, rk

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base}, layout={self.layout!r}"
