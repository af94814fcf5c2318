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

from attnkit.kernels.triton.offsets import OFFSET_LIMIT, addressable, furthest_element
from attnkit.kernels.triton.precision import tf32_allowed
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


def offsets_refusal(q: Tensor, spec: AttentionSpec) -> str | None:
    """Why 32-bit offsets cannot address this request's tensors (inputs, mask, outputs, gradients), or None.

    Inputs reach the kernels through `addressable` (a contiguous copy where their strides reach too
    far), outputs and gradients are allocated contiguous: their dense sizes bound every offset. The
    mask is read in place, broadcast axes at stride 0.
    """
    B, Hq, Hk, Lq, Lk = spec.batch, spec.q_heads, spec.kv_heads, spec.q_len, spec.kv_len
    D, Dv = spec.head_dim, spec.v_head_dim
    sizes = {"q": B * Hq * Lq * D, "k": B * Hk * Lk * D, "v": B * Hk * Lk * Dv, "out": B * Hq * Lq * Dv}
    if spec.mask is not None:
        m = spec.mask
        strides = tuple(0 if m.shape[d] == 1 else m.stride(d) for d in range(4))
        sizes["mask"] = furthest_element(tuple(m.shape), strides) + 1
    name, largest = max(sizes.items(), key=lambda item: item[1])
    if largest > OFFSET_LIMIT:
        return (
            f"the kernels use 32-bit offsets and {name} spans {largest} elements (limit {OFFSET_LIMIT}); "
            "'tiled' computes it"
        )
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
    why = offsets_refusal(q, spec)
    if why is not None:
        return why
    if spec.mask is not None and spec.mask.dtype != torch.bool and spec.mask.requires_grad:
        return "the float mask needs a gradient (the kernels treat masks as constants; use 'tiled')"
    return None


def auto_deferral(q: Tensor, spec: AttentionSpec, return_lse: bool) -> str | None:
    """Why ``auto`` should pass this request on to SDPA although the kernels can run it, or None.

    fp32 inputs without TF32 (`tf32_allowed` false, torch's default) make every ``tl.dot`` an
    IEEE fp32 product on CUDA cores (issue 17's offline compile of the forward at 64 x 64,
    D = 64: 8,336 FFMA per tile), predicted an order of magnitude slower than SDPA, whose fp32
    path (the memory-efficient kernel; CUTLASS's fast-fp32 mode, three TF32 products) keeps
    about fp32 accuracy on tensor cores. So where SDPA computes the request exactly, ``auto``
    takes it there; where it cannot (softcap, ALiBi, a window, dropout, ...) the kernels keep
    it, and ``backend="triton"`` always runs it.
    """
    if q.dtype != torch.float32 or q.device.type != "cuda" or tf32_allowed():
        return None
    from attnkit.kernels import sdpa

    if sdpa.refusal(q, spec, return_lse) is not None:
        return None
    return (
        "fp32 without TF32 (torch.get_float32_matmul_precision() is 'highest') runs IEEE fp32 dots on CUDA "
        "cores; sdpa computes this request exactly and faster (allow TF32 to use the kernels)"
    )


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


def statistics(
    q: Tensor,
    k: Tensor,
    v: Tensor | None,
    spec: AttentionSpec,
    lse: Tensor | None,
    *,
    topk: int,
    pool: tuple[Tensor, Tensor],
):
    """The statistics pass; see `attnkit.kernels.triton.stats.stats_forward`.

    Its buffers (``(B, Hq, Lq, P_k)`` row-pooled sums, the top-k) are addressed with 32-bit
    offsets, so a request whose buffers would pass ``2**31`` elements runs one batch element and
    one block of whole GQA groups of heads at a time, on views.
    """
    from attnkit.kernels.triton import stats

    if lse is None:  # the forward first (with autograd), then the statistics pass from its lse
        out, lse = attention(q, k, v, spec)
        return {"output": out, "lse": lse, **statistics(q, k, v, spec, lse.detach(), topk=topk, pool=pool)}
    per_head = spec.q_len * max(pool[1].numel() - 1, min(topk, spec.kv_len), 1)
    heads = (OFFSET_LIMIT - 1) // per_head // spec.group * spec.group  # whole GQA groups per launch
    if heads == 0:
        raise ValueError(
            f"attention_stats: one head's statistics buffers ({per_head} elements) pass the Triton kernel's "
            f"32-bit offsets; lower pool/topk, or run on CPU"
        )
    if spec.batch * spec.q_heads * per_head < OFFSET_LIMIT:
        return stats.stats_forward(addressable(q), addressable(k), v, spec, lse, topk=topk, pool=pool)
    parts = []
    for b in range(spec.batch):
        row = []
        for h0 in range(0, spec.q_heads, heads):
            h1 = min(h0 + heads, spec.q_heads)
            kh0, kh1 = h0 // spec.group, h1 // spec.group
            part = spec.part(b, kh0, kh1)
            row.append(
                stats.stats_forward(
                    addressable(q[b : b + 1, h0:h1]), addressable(k[b : b + 1, kh0:kh1]), None, part,
                    lse[b : b + 1, h0:h1], topk=topk, pool=pool,
                )
            )  # fmt: skip
        parts.append({name: torch.cat([r[name] for r in row], dim=1) for name in row[0]})
    return {name: torch.cat([p[name] for p in parts], dim=0) for name in parts[0]}
