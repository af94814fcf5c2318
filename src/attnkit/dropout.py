"""Counter-based dropout: the keep/drop decision is a pure function of its coordinates.

``keep(seed, b*H + h, i, j)`` hashes the coordinates of one attention weight with a
32-bit integer mixer, so any backend evaluating any tile in any order draws the same
pattern, and the backward pass reproduces the forward's pattern from the seed alone
(the idea behind FlashAttention's Philox ``(seed, offset)``, with a simpler mixer).
Only 32-bit arithmetic is used, so a Triton kernel computes the same bits with
``uint32`` operations: products are kept below ``2**63`` so int64 never overflows.
"""

from __future__ import annotations

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF
# The multiplier of the "hash32" integer mixer (an odd constant below 2**31, so the
# product with a 32-bit value fits in int64).
MIX_MULTIPLIER = 0x045D9F3B
# Odd 31-bit constants that decorrelate the row, column and head counters.
ROW_SALT = 0x27D4EB2F
COL_SALT = 0x165667B1
HEAD_SALT = 0x61C88647


def mix32(x: Tensor) -> Tensor:
    """A bijective 32-bit integer hash of an int64 tensor holding values in ``[0, 2**32)``."""
    x = x ^ (x >> 16)
    x = (x * MIX_MULTIPLIER) & _M32
    x = x ^ (x >> 16)
    x = (x * MIX_MULTIPLIER) & _M32
    return x ^ (x >> 16)


def keep_mask(seed: int | Tensor, heads: Tensor, rows: Tensor, cols: Tensor, dropout_p: float) -> Tensor:
    """Which attention weights survive dropout.

    Args:
        seed: a 32-bit seed drawn once per call from torch's generator (an int, or a 0-d int64 tensor).
        heads: ``(BH, 1, 1)`` int64 flattened ``b * Hq + h`` indices.
        rows: ``(1, bq, 1)`` int64 query indices.
        cols: ``(1, 1, bk)`` int64 key indices.
        dropout_p: probability of dropping a weight.

    Returns:
        ``(BH, bq, bk)`` bool, True where the weight is kept (probability ``1 - p``).
    """
    head_key = mix32((heads * HEAD_SALT + seed) & _M32)  # (BH, 1, 1)
    row_key = mix32((head_key ^ mix32((rows * ROW_SALT) & _M32)) & _M32)  # (BH, bq, 1)
    col_key = mix32((cols * COL_SALT + seed) & _M32)  # (1, 1, bk)
    u = mix32(row_key ^ col_key)  # (BH, bq, bk), uniform on [0, 2**32)
    threshold = int(dropout_p * 2**32)
    return u >= threshold


def new_seed() -> int | Tensor:
    """Draw a 32-bit seed from torch's default generator (reproducible under ``torch.manual_seed``).

    While ``torch.compile`` traces, the seed stays a 0-d int64 tensor drawn inside the graph (an
    ``int`` would be a data-dependent read); every function here computes on it alike. Inductor
    draws it with its own generator unless ``torch._inductor.config.fallback_random`` is set,
    so a compiled call drops other weights than an eager one, with the same probability.
    """
    if torch.compiler.is_compiling():
        return torch.randint(0, 2**32, (1,), dtype=torch.int64)[0]
    # On the CPU whatever the default device: under `torch.device("meta")` a seed drawn there has no value.
    return int(torch.randint(0, 2**32, (1,), dtype=torch.int64, device="cpu").item())


# Packed (varlen) sequence ``b`` draws its pattern with seed ``seed + b * VARLEN_SEED_STEP``
# (mod 2**32) and head index ``h``, on every backend (the Triton kernels compute the same).
# An odd constant below 2**31, so Triton keeps the product in uint32.
VARLEN_SEED_STEP = 0x7F4A7C15
"""Sequence ``b`` of a packed batch draws its dropout with seed ``seed + b * VARLEN_SEED_STEP`` (mod 2**32)."""


def varlen_seed(seed: int | Tensor, sequence: int) -> int | Tensor:
    """The dropout seed of packed sequence ``sequence`` of a varlen call seeded with ``seed``."""
    return (seed + sequence * VARLEN_SEED_STEP) & _M32
