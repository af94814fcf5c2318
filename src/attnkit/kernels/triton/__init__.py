"""Triton kernels for attnkit (the ``triton`` backend): forward, backward and statistics pass.

Importing this package does not import Triton; `refusal` says whether the backend can run
a request (a CUDA device, Triton installed, a supported dtype and head dim). The backend
refuses CPU tensors even under ``TRITON_INTERPRET=1``, so ``auto`` never routes CPU work
through the (slow) interpreter; the tests call `attnkit.kernels.triton_backend` directly. The kernels
live in `forward`, `backward` and `stats`, the autograd tier in `attnkit.kernels.triton_backend`.
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
