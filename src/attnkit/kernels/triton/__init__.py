"""Triton kernels for attnkit (the ``triton`` backend): forward, backward and statistics pass.

Importing this package does not import Triton; `refusal` says whether the backend can run
a request (a CUDA device, Triton installed, a supported dtype and head dim). The backend
refuses CPU tensors even under ``TRITON_INTERPRET=1``, so ``auto`` never routes CPU work
through the (slow) interpreter; the tests call `attnkit.kernels.triton.autograd` directly. The kernels
live in `forward`, `backward` and `stats`, the autograd tier in `autograd`; the entry points below
(the same as every kernel module's) import them on first use.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

from attnkit.spec import AttentionSpec

MAX_HEAD_DIM = 256  # one tile row of q, k and v must fit in shared memory next to the scores
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_installed() -> bool:
    """True when the ``triton`` package can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def device_refusal(q: Tensor) -> str | None:
    """Why the tensors' device cannot run the kernels, or None."""
    if q.device.type != "cuda":
        return f"needs a CUDA device (q is on {q.device})"
    if not triton_installed():
        return "triton not installed (pip install attnkit[triton])"
    return None


def refusal(q: Tensor, spec: AttentionSpec, return_lse: bool) -> str | None:
    """Why the Triton backend cannot compute this request, or None if it can."""
    if spec.align is not None and spec.align != spec.kv_len - spec.q_len:
        # The kernels align each (packed) sequence bottom-right themselves; blocks of a larger
        # problem (ring attention) go to the tiled kernel, which reads spec.offset.
        return "custom query/key alignment (spec.align) is computed by the tiled kernel"
    why = device_refusal(q)
    if why is not None:
        return why
    if q.dtype not in SUPPORTED_DTYPES:
        return f"supports fp16, bf16 and fp32, got {q.dtype} (use 'tiled' for fp64)"
    if max(spec.head_dim, spec.v_head_dim) > MAX_HEAD_DIM:
        return f"head dims up to {MAX_HEAD_DIM}, got D={spec.head_dim}, Dv={spec.v_head_dim}"
    largest = max(q.numel(), spec.batch * spec.kv_heads * spec.kv_len * max(spec.head_dim, spec.v_head_dim))
    if largest >= 2**31:
        return f"tensors must have under 2**31 elements (the kernels use 32-bit offsets), got {largest}"
    if spec.mask is not None and spec.mask.dtype != torch.bool and spec.mask.requires_grad:
        return "the float mask needs a gradient (the kernels treat masks as constants; use 'tiled')"
    return None


def stats_refusal(q: Tensor, spec: AttentionSpec, return_lse: bool = False) -> str | None:
    """Why the Triton statistics kernel cannot run this request, or None."""
    why = device_refusal(q)
    if why is not None:
        return why
    if q.dtype not in SUPPORTED_DTYPES:
        return f"supports fp16, bf16 and fp32, got {q.dtype}"
    if spec.head_dim > MAX_HEAD_DIM:
        return f"head dims up to {MAX_HEAD_DIM}, got D={spec.head_dim}"
    return None


# The entry points import Triton (through `attnkit.kernels.triton.autograd` / ``stats``) on first use.
def attention(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec, return_lse: bool = False):
    """Dense attention with autograd: ``(out, lse)``; see `attnkit.kernels.triton.autograd.attention`."""
    from attnkit.kernels.triton import autograd

    return autograd.attention(q, k, v, spec)


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, spec, return_lse=False):
    """Packed attention in one launch; see `attnkit.kernels.triton.autograd.attention_varlen`."""
    from attnkit.kernels.triton import autograd

    return autograd.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, spec)


def statistics(q: Tensor, k: Tensor, v: Tensor | None, spec: AttentionSpec, lse: Tensor, *, topk: int, pool: int):
    """The statistics pass in one launch; see `attnkit.kernels.triton.stats.stats_forward`."""
    from attnkit.kernels.triton import stats

    return stats.stats_forward(q, k, v, spec, lse, topk=topk, pool=pool)
