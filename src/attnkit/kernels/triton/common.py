"""Pieces shared by the Triton kernels: the score tile, the dropout hash, launch helpers.

The order of operations is the one `attnkit.spec` defines (scale, softcap, + ALiBi +
float mask, bool/causal/window masking); `score_tile` is its one Triton spelling, used
by the forward, both backward kernels and the statistics pass, so they cannot drift.
Every feature is a ``tl.constexpr`` flag, so a plain call compiles to the plain kernel.

Indices inside a tile: ``offs_m (BLOCK_M,)`` query rows and ``offs_n (BLOCK_N,)`` key
columns, both local to the sequence; query ``i`` is aligned to key ``i + offset`` with
``offset = Lk - Lq`` (bottom-right alignment).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from attnkit.dropout import COL_SALT, HEAD_SALT, MIX_MULTIPLIER, ROW_SALT, VARLEN_SEED_STEP
from attnkit.kernels.triton.precision import tf32_allowed
from attnkit.spec import AttentionSpec

# Whether this import decorated the kernels for Triton's CPU interpreter (TRITON_INTERPRET=1 is
# read when @triton.jit runs, i.e. now; tests set it before importing these modules).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): the kernels use exp2; scores are multiplied by it once
LN2 = tl.constexpr(0.6931471805599453)  # ln(2): turns a base-2 log-sum-exp back into natural log
# Varlen sequence b hashes dropout with seed + b * VARLEN_SEED_STEP (mod 2**32) and head h
# (`attnkit.dropout.varlen_seed`), so a packed batch draws a pattern that does not depend on where
# a sequence sits. An odd constant below 2**31, so Triton keeps the product in uint32.
SEED_STEP = tl.constexpr(VARLEN_SEED_STEP)

# Triton specialises integer arguments equal to 1 into constants; the dropout seed and
# threshold are hashed as uint32 values, so they must stay run-time integers.
NO_SPECIALIZE = ["seed", "threshold"]

MIX = tl.constexpr(MIX_MULTIPLIER)
ROW = tl.constexpr(ROW_SALT)
COL = tl.constexpr(COL_SALT)
HEAD = tl.constexpr(HEAD_SALT)


@triton.jit
def mix32(x):
    """`attnkit.dropout.mix32` on ``uint32``: the products wrap mod 2**32, as its ``& 0xFFFFFFFF`` does."""
    x = x ^ (x >> 16)
    x = x * MIX
    x = x ^ (x >> 16)
    x = x * MIX
    return x ^ (x >> 16)


@triton.jit
def keep_tile(seed, bh, offs_m, offs_n, threshold, TRANSPOSED: tl.constexpr = False):
    """``(BLOCK_M, BLOCK_N)`` keep-mask, bit for bit `attnkit.dropout.keep_mask` (``TRANSPOSED``: its transpose).

    ``seed``, ``bh`` and ``threshold`` are ``uint32`` scalars; ``offs_m``/``offs_n`` local indices.
    """
    head_key = mix32(bh * HEAD + seed)
    row_key = mix32(head_key ^ mix32(offs_m.to(tl.uint32) * ROW))  # (BLOCK_M,)
    col_key = mix32(offs_n.to(tl.uint32) * COL + seed)  # (BLOCK_N,)
    if TRANSPOSED:
        u = mix32(col_key[:, None] ^ row_key[None, :])  # (BLOCK_N, BLOCK_M): xor commutes, same bits
    else:
        u = mix32(row_key[:, None] ^ col_key[None, :])  # (BLOCK_M, BLOCK_N) uniform on [0, 2**32)
    return u >= threshold


@triton.jit
def load_tile(ptrs, edge_mask, dim_mask, STRUCTURE: tl.constexpr, EVEN_D: tl.constexpr):
    """One tile of ``q``, ``k``, ``v`` or ``dO``; padded entries read as 0.

    On an edge tile (``STRUCTURE``) bounded by ``edge_mask & dim_mask`` (the sequence end and the
    padded head dims); on a bulk tile, which lies inside the sequence, by ``dim_mask`` only, and
    not at all when the head dims fill their block (``EVEN_D``). Unused masks cost nothing on a GPU.
    """
    if STRUCTURE:
        return tl.load(ptrs, mask=edge_mask & dim_mask, other=0.0)
    if EVEN_D:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=dim_mask, other=0.0)


@triton.jit
def dot(a, b, PRECISION: tl.constexpr):
    """``tl.dot`` in fp32 accumulation; ``PRECISION`` from `dot_precision`.

    ``"upcast"`` (only under the interpreter, for bf16) multiplies in fp32: Triton 3.9's
    interpreter stores bf16 as uint16 and its ``dot`` multiplies those bit patterns as
    integers. Products of bf16 values are exact in fp32, so the result is what a GPU's
    bf16 tensor cores (fp32 accumulation) compute.
    """
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def dot_acc(a, b, acc, PRECISION: tl.constexpr):
    """``acc + a @ b`` as one ``tl.dot`` (the MMA accumulates in place); precision as in `dot`."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def tanh(x, FAST: tl.constexpr):
    """``tanh``: ``FAST`` is the GPU's ``tanh.approx.f32`` (one special-function op, max relative
    error about 2**-11, used only for 16-bit inputs on CUDA); otherwise from ``exp``, exact to
    fp32 rounding, portable across Triton releases and the interpreter, exact at +-inf.
    """
    if FAST:
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def score_tile(
    qk, qi, kj, q_len, kv_len, offset, qk_scale, cap_in, cap_out, slope2, left, right,
    mask_rows,  # pointer to the mask row of this (b, h): Mask + b*smb + h*smh (unused without a mask)
    smm, smn,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    MASK_KIND: tl.constexpr,  # 0 none, 1 bool (stored as uint8), 2 float (added)
    STRUCTURE: tl.constexpr = True,  # False: the tile is known open (causal/window, Lk bound)
    MASK_ROW: tl.constexpr = False,  # the mask is one key row for every query (query stride 0)
    FAST_TANH: tl.constexpr = False,
):  # fmt: skip
    """Scores of one tile in base 2 (``s log2 e``) with every modifier applied; masked entries are ``-inf``.

    The tile is ``qi x kj``: ``qi`` the local query indices and ``kj`` the key indices, shaped
    ``(BLOCK_M, 1)`` and ``(1, BLOCK_N)`` for a ``q k^T`` tile, or ``(1, BLOCK_M)`` and
    ``(BLOCK_N, 1)`` for the backward's transposed ``k q^T`` tile. The constants come folded
    (`folded_constants`): ``qk_scale = scale log2 e``, ``cap_in = scale / softcap``,
    ``cap_out = softcap log2 e``, ``slope2 = slope log2 e``, so each step is one multiply or FMA.

    Args:
        qk: fp32 ``q k^T`` (unscaled), the shape of ``qi`` broadcast against ``kj``.

    Returns:
        ``s2`` fp32 in base-2 units, and ``t = tanh(scale qk / softcap)`` (the softcap derivative
        is ``1 - t^2``; ``t`` is ``s2`` itself without softcap).
    """
    if HAS_SOFTCAP:
        t = tanh(qk * cap_in, FAST_TANH)
        s = t * cap_out
    else:
        s = qk * qk_scale
        t = s
    pos_q = qi + offset  # aligned query positions
    if HAS_ALIBI:
        s = s - slope2 * tl.abs(pos_q - kj).to(tl.float32)
    if MASK_KIND != 0:
        if MASK_ROW:  # one key row, read as a vector and broadcast over the queries
            if STRUCTURE:
                m = tl.load(mask_rows + kj * smn, mask=kj < kv_len, other=0)
            else:
                m = tl.load(mask_rows + kj * smn)
        else:
            in_bounds = qi < q_len
            if STRUCTURE:
                in_bounds = in_bounds & (kj < kv_len)
            m = tl.load(mask_rows + qi * smm + kj * smn, mask=in_bounds, other=0)
        if MASK_KIND == 2:
            s = tl.fma(m.to(tl.float32), LOG2E, s)
    if STRUCTURE:
        allowed = kj < kv_len  # padding keys of the last tile
        if HAS_LEFT:
            allowed = allowed & (kj >= pos_q - left)
        if HAS_RIGHT:
            allowed = allowed & (kj <= pos_q + right)
        if MASK_KIND == 1:
            allowed = allowed & (m != 0)
        s = tl.where(allowed, s, float("-inf"))
    elif MASK_KIND == 1:
        s = tl.where(m != 0, s, float("-inf"))
    return s, t


@triton.jit
def folded_constants(scale, softcap, slope):
    """``(qk_scale, cap_in, cap_out, slope2)`` of `score_tile`, computed once per program."""
    return scale * LOG2E, scale / softcap, softcap * LOG2E, slope * LOG2E


@triton.jit
def key_range(i0, i1, offset, kv_len, left, right, BLOCK_N: tl.constexpr,
              HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):  # fmt: skip
    """Keys ``[lo, hi)`` some query of ``[i0, i1)`` may see; ``lo`` rounded down to a tile edge.

    Tiles outside are masked for the whole block and never visited (causal skips ~half).
    """
    lo = 0
    hi = kv_len
    if HAS_LEFT:
        lo = tl.maximum(i0 + offset - left, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
    if HAS_RIGHT:
        hi = tl.minimum(i1 - 1 + offset + right + 1, kv_len)
    return lo, hi


@triton.jit
def open_key_tiles(i0, i1, lo, hi, offset, kv_len, left, right, BLOCK_N: tl.constexpr,
                   HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):  # fmt: skip
    """Split the visited keys ``[lo, hi)`` of query rows ``[i0, i1)`` at tile edges into three runs.

    ``[lo, a)`` and ``[b, hi)`` hold the tiles that causal/window or the end of the keys cut
    for some row (masked elementwise); every tile of ``[a, b)`` is open to every row, so the
    kernels skip the structure mask there (FlashAttention's split of the causal loop into
    diagonal and off-diagonal blocks, generalised to windows).
    """
    end = tl.maximum(hi, lo)  # hi < lo when no key is visible: then every run is empty
    a = lo
    if HAS_LEFT:  # open once j0 >= (i1 - 1) + offset - left, the last row's left edge
        a = lo + tl.cdiv(tl.maximum(i1 - 1 + offset - left - lo, 0), BLOCK_N) * BLOCK_N
        a = tl.minimum(a, end)
    limit = kv_len
    if HAS_RIGHT:  # open while j1 - 1 <= i0 + offset + right, the first row's right edge
        limit = tl.minimum(i0 + offset + right + 1, kv_len)
    b = lo + (tl.maximum(limit - lo, 0) // BLOCK_N) * BLOCK_N
    b = tl.minimum(tl.maximum(b, a), end)
    return a, b


@triton.jit
def open_query_tiles(j0, lo, hi, offset, q_len, kv_len, left, right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):  # fmt: skip
    """`open_key_tiles` for the backward's walk over query tiles ``[lo, hi)`` of keys ``[j0, j0 + BLOCK_N)``.

    ``[a, b)`` holds the query tiles that see every key of the block and lie wholly inside
    ``[0, Lq)`` (so their loads need no row mask); a key block that runs past ``Lk`` is masked throughout.
    """
    end = tl.maximum(hi, lo)  # hi < lo when no query sees the block: then every run is empty
    a = lo
    if HAS_RIGHT:  # open once i0 >= (j1 - 1) - offset - right, the last key's first row
        a = lo + tl.cdiv(tl.maximum(j0 + BLOCK_N - 1 - offset - right - lo, 0), BLOCK_M) * BLOCK_M
        a = tl.minimum(a, end)
    b = lo + (tl.maximum(q_len - lo, 0) // BLOCK_M) * BLOCK_M  # whole tiles inside [0, Lq): loads unmasked
    if HAS_LEFT:  # open while i0 + BLOCK_M - 1 <= j0 - offset + left, the first key's last row
        b = tl.minimum(b, lo + (tl.maximum(j0 - offset + left + 1 - lo, 0) // BLOCK_M) * BLOCK_M)
    b = tl.minimum(tl.maximum(b, a), end)
    if j0 + BLOCK_N > kv_len:
        a = end
        b = end
    return a, b


@triton.jit
def query_range(j0, j1, offset, q_len, left, right, BLOCK_M: tl.constexpr,
                HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):  # fmt: skip
    """Queries ``[lo, hi)`` that may see some key of ``[j0, j1)``; ``lo`` rounded down to a tile edge.

    Query ``i`` sees key ``j`` iff ``i + offset - left <= j <= i + offset + right``.
    """
    lo = 0
    hi = q_len
    if HAS_RIGHT:
        lo = tl.maximum(j0 - offset - right, 0)
        lo = (lo // BLOCK_M) * BLOCK_M
    if HAS_LEFT:
        hi = tl.minimum(j1 - 1 - offset + left + 1, q_len)
    return lo, hi


# --------------------------------------------------------------------- host side
def head_block(d: int) -> int:
    """Padded head-dim block: a power of two >= 16 (``tl.dot`` needs 16)."""
    return max(16, triton.next_power_of_2(d))


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision: fp32 inputs take TF32 only where torch's matmul precision allows it
    (`tf32_allowed`), IEEE fp32 otherwise; 16-bit inputs run natively.

    Under the interpreter bf16 products are taken in fp32 (see `dot`).
    """
    if dtype == torch.bfloat16 and INTERPRETED:
        return "upcast"
    if dtype == torch.float32:
        return "tf32" if tf32_allowed() else "ieee"
    return "tf32"  # ignored by tl.dot for fp16/bf16 operands


def mask_args(spec: AttentionSpec) -> tuple[torch.Tensor | None, tuple[int, int, int, int], int]:
    """The mask as the kernels read it: a tensor, its strides (0 on broadcast axes) and its kind.

    Bool masks are viewed as ``uint8`` (no copy); broadcast axes get stride 0, so a
    ``(B, 1, 1, Lk)`` padding mask is read in place, one key row per tile.
    """
    m = spec.mask
    if m is None:
        return None, (0, 0, 0, 0), 0
    kind = 1 if m.dtype == torch.bool else 2
    if kind == 1:
        m = m.view(torch.uint8)
    strides = tuple(0 if m.shape[d] == 1 else m.stride(d) for d in range(4))
    return m, strides, kind


def dropout_args(spec: AttentionSpec) -> tuple[int, int, float]:
    """``(seed, threshold, 1 / (1 - p))`` for the kernels; threshold as `keep_mask` computes it."""
    if spec.dropout_p == 0:
        return 0, 0, 1.0
    return int(spec.dropout_seed) & 0xFFFFFFFF, int(spec.dropout_p * 2**32), 1.0 / (1.0 - spec.dropout_p)


def flags(spec: AttentionSpec, dtype: torch.dtype) -> dict:
    """The feature ``constexpr`` flags every kernel takes, from the spec and the inputs' dtype.

    ``MASK_ROW``: the mask has query stride 0 (a ``(B|1, H|1, 1, Lk)`` padding mask), read as one
    key vector per tile. ``FAST_TANH``: softcap's ``tanh`` as ``tanh.approx.f32``, for 16-bit
    inputs on a GPU only (its ~2**-11 relative error is below their rounding); fp32 inputs and
    the interpreter keep the exact ``tanh``.
    """
    left, right = spec.bounds
    mask, strides, kind = mask_args(spec)
    return {
        "HAS_SOFTCAP": spec.softcap is not None,
        "HAS_ALIBI": spec.alibi_slopes is not None,
        "HAS_LEFT": left is not None,
        "HAS_RIGHT": right is not None,
        "MASK_KIND": kind,
        "MASK_ROW": mask is not None and strides[2] == 0,
        "DROPOUT": spec.dropout_p > 0,
        "FAST_TANH": spec.softcap is not None and dtype in (torch.float16, torch.bfloat16) and not INTERPRETED,
    }


def even_dims(spec: AttentionSpec) -> bool:
    """``EVEN_D``: both head dims fill their power-of-two block, so no load needs a head-dim mask."""
    return spec.head_dim == head_block(spec.head_dim) and spec.v_head_dim == head_block(spec.v_head_dim)


def scalar_args(spec: AttentionSpec) -> tuple[float, float, int, int]:
    """``(scale, softcap, left, right)`` with 0 where a feature is off (its flag then ignores it)."""
    left, right = spec.bounds
    return spec.scale, spec.softcap or 1.0, left or 0, right or 0


def bhld_strides(x: torch.Tensor, varlen: bool) -> tuple[int, int, int, int]:
    """Strides as (batch, head, row, dim): dense ``(B, H, L, D)``; packed ``(total, H, D)`` has batch stride 0."""
    if varlen:
        return 0, x.stride(1), x.stride(0), x.stride(2)
    return x.stride(0), x.stride(1), x.stride(2), x.stride(3)


# ------------------------------------------------------------------ autotune space
# Triton's fused-attention tutorial tunes BLOCK_M {64, 128} x BLOCK_N {32, 64, 128} x stages 2-7 x
# warps {4, 8}. That space is pruned twice here. Offline, by the compiler report
# (tests/triton_compile_check.py, docs/triton.md): tiles that spill or sit at the 255-register
# ceiling at D = 64 or D = 128 (bf16, sm_90a) are not listed, and each tile keeps the stage
# counts worth timing; every listed config is compiled by that report and must have 0 spills.
# At launch, by shared memory (`shared_memory_pruner`), so a config that cannot fit (D = 256,
# smaller GPUs) is never compiled.
SHARED_LIMIT = 232448  # bytes of shared memory per block on sm_90 (the default when no GPU says)


def autotune_configs(table: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    """``triton.Config`` of each ``(BLOCK_M, BLOCK_N, warps, stages)``."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in table]


def shared_memory_pruner(once: str, streamed: str, *, once_pair: bool):
    """An ``early_config_prune`` that drops configs whose tiles cannot fit in shared memory.

    ``once`` names the block loaded once per program (``BLOCK_M`` for the forward and dQ,
    ``BLOCK_N`` for dK/dV; ``once_pair``: it holds two operands, q and dO or k and v, not q
    alone), ``streamed`` the block the loop streams through ``num_stages`` buffers of two
    operands (k and v, or q and dO). An estimate of what the compiler allocates; the offline
    report's figures match it for the listed tiles.
    """

    def prune(configs, named_args, **kwargs):
        q = named_args["Q"]
        pair = (kwargs["BLOCK_D"] + kwargs["BLOCK_DV"]) * q.element_size()  # bytes of one row of two operands
        first = pair if once_pair else kwargs["BLOCK_D"] * q.element_size()
        limit = SHARED_LIMIT
        if q.device.type == "cuda":
            limit = torch.cuda.get_device_properties(q.device).shared_memory_per_block_optin
        need = lambda c, stages: c.kwargs[once] * first + stages * c.kwargs[streamed] * pair
        kept = [c for c in configs if need(c, c.num_stages) <= limit]
        if kept:
            return kept
        # Nothing fits (fp32 at D = 256): the smallest listed tile with as many stages as fit (at least 1).
        small = configs[-1]
        stages = max([s for s in range(1, small.num_stages + 1) if need(small, s) <= limit], default=1)
        return [triton.Config(dict(small.kwargs), num_warps=small.num_warps, num_stages=stages)]

    return prune
