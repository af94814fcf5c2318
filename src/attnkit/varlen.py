"""`attention_varlen()`: attention over a packed batch of variable-length sequences.

The layout of FlashAttention's ``flash_attn_varlen_func`` (Dao et al., flash-attn 2):
sequences are concatenated along the token axis and delimited by cumulative lengths,
so a batch of uneven sequences carries no padding and costs no work on padding::

    q (total_q, Hq, D)    cu_seqlens_q = [0, 3, 8]   ->  sequence 0 = q[0:3], sequence 1 = q[3:8]
    k (total_k, Hk, D)    cu_seqlens_k = [0, 4, 6]   ->  sequence 0 = k[0:4], sequence 1 = k[4:6]

Each sequence is attended independently with `attnkit.attention`'s semantics (causal
and windows bottom-right aligned within the sequence). On CUDA the packed Triton
kernel handles every sequence in one launch; elsewhere (or with another backend named)
the sequences run one by one through a dense backend, ``tiled`` by default, on views
of the packed tensors (no padding, no copies of ``q``, ``k``, ``v``).

Dropout: sequence ``b`` draws its pattern with seed ``seed + b * VARLEN_SEED_STEP`` (mod
2**32) and head index ``h``, on every backend, so the CPU and GPU paths agree bit for bit.
"""

from __future__ import annotations

import dataclasses
import itertools

import torch
from torch import Tensor

from attnkit import backends
from attnkit.functional import Alibi, Window, build_spec
from attnkit.kernels import triton as triton_kernels

__all__ = ["VARLEN_SEED_STEP", "attention_varlen"]

# Must equal attnkit.kernels.triton.common.VARLEN_SEED_STEP (checked by the tests; kept
# here so that this module does not import Triton).
VARLEN_SEED_STEP = 0x7F4A7C15


def _check_packed(name: str, x: Tensor, layout: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"attention_varlen: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"attention_varlen: {name} must be 3-D {layout} (packed), got shape {tuple(x.shape)}")


def _check_cu(name: str, cu: Tensor, total: int, device: torch.device) -> list[int]:
    """Validate cumulative lengths; returns them as Python ints."""
    if not isinstance(cu, Tensor) or cu.dim() != 1 or cu.dtype not in (torch.int32, torch.int64):
        got = f"{cu.dtype} of shape {tuple(cu.shape)}" if isinstance(cu, Tensor) else type(cu).__name__
        raise ValueError(f"attention_varlen: {name} must be a 1-D int32/int64 tensor (S + 1,), got {got}")
    if cu.device != device:
        raise ValueError(f"attention_varlen: {name} is on {cu.device} but q is on {device}")
    values = cu.tolist()
    if len(values) < 2 or values[0] != 0 or values[-1] != total or any(a > b for a, b in itertools.pairwise(values)):
        raise ValueError(
            f"attention_varlen: {name} must start at 0, never decrease and end at the packed length {total}, "
            f"got {values if len(values) <= 12 else [*values[:6], '...', *values[-3:]]}"
        )
    return values


def attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    *,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    causal: bool = False,
    mask: None = None,
    window: Window = None,
    alibi: Alibi = None,
    softcap: float | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Exact attention over packed variable-length sequences (FlashAttention's varlen layout).

    Args:
        q: ``(total_q, Hq, D)``, the queries of all sequences, concatenated.
        k: ``(total_k, Hk, D)``; v: ``(total_k, Hk, Dv)``.
        cu_seqlens_q: ``(S + 1,)`` int32/int64, ``[0, Lq_0, Lq_0 + Lq_1, ..., total_q]``.
        cu_seqlens_k: ``(S + 1,)`` likewise for keys; sequence ``b`` attends only within itself.
        max_seqlen_q / max_seqlen_k: the longest sequence (computed when None).
        causal, window, alibi, softcap, scale, dropout_p: as in `attnkit.attention`, per sequence
            (alignment is bottom-right within each sequence). Masks are not supported: per-sequence
            structure is what ``cu_seqlens`` expresses (``mask`` must be None; pad and use
            `attnkit.attention` for arbitrary masks).
        return_lse: also return the log-sum-exp ``(Hq, total_q)`` (FlashAttention's layout).
        backend: ``"auto"`` (Triton's packed kernel on CUDA, else ``tiled`` per sequence), ``"triton"``,
            or any registered dense backend, run sequence by sequence.

    Returns:
        ``out (total_q, Hq, Dv)`` in ``q.dtype``; with ``return_lse`` also ``lse (Hq, total_q)``.
    """
    if mask is not None:
        raise ValueError(
            "attention_varlen: mask is not supported (got a mask); express per-sequence structure with "
            "cu_seqlens, causal and window, or pad the batch and call attnkit.attention with a mask"
        )
    _check_packed("q", q, "(total_q, Hq, D)")
    _check_packed("k", k, "(total_k, Hk, D)")
    _check_packed("v", v, "(total_k, Hk, Dv)")
    # Validate everything else through attention()'s own checks, on (1, H, total, D) views.
    q4 = q.transpose(0, 1).unsqueeze(0)  # (1, Hq, total_q, D)
    k4 = k.transpose(0, 1).unsqueeze(0)  # (1, Hk, total_k, D)
    v4 = v.transpose(0, 1).unsqueeze(0)  # (1, Hk, total_k, Dv)
    spec = build_spec(
        q4, k4, v4, causal=causal, window=window, alibi=alibi, softcap=softcap, scale=scale, dropout_p=dropout_p
    )
    cq = _check_cu("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
    ck = _check_cu("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
    if len(cq) != len(ck):
        raise ValueError(
            f"attention_varlen: cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, "
            f"got {len(cq) - 1} and {len(ck) - 1}"
        )
    lens_q = [b - a for a, b in itertools.pairwise(cq)]
    lens_k = [b - a for a, b in itertools.pairwise(ck)]
    for name, given, actual in (
        ("max_seqlen_q", max_seqlen_q, max(lens_q)),
        ("max_seqlen_k", max_seqlen_k, max(lens_k)),
    ):
        if given is not None and given < actual:
            raise ValueError(f"attention_varlen: {name}={given} is shorter than the longest sequence ({actual})")
    max_q = max_seqlen_q if max_seqlen_q is not None else max(lens_q)
    max_k = max_seqlen_k if max_seqlen_k is not None else max(lens_k)
    packed = dataclasses.replace(spec, batch=len(lens_q), q_len=max_q, kv_len=max_k)
    if backend == "auto":
        backend = "triton" if triton_kernels.refusal(q4, packed, return_lse) is None else "tiled"
    if backend == "triton":
        why = triton_kernels.refusal(q4, packed, return_lse)
        if why is not None:
            raise ValueError(f"attention_varlen: backend 'triton' cannot run this request: {why}")
        from attnkit.kernels import triton_backend

        out, lse = triton_backend.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, packed)
    else:
        out, lse = _per_sequence(q, k, v, cq, ck, spec, backend, return_lse)
    return (out, lse) if return_lse else out


def _per_sequence(
    q: Tensor, k: Tensor, v: Tensor, cq: list[int], ck: list[int], spec, backend: str, return_lse: bool
) -> tuple[Tensor, Tensor]:
    """Run each sequence through a dense backend on views; ``out (total_q, Hq, Dv)``, ``lse (Hq, total_q)``."""
    impl = backends.get_backend(backend)
    outs, lses = [], []
    for b in range(len(cq) - 1):
        Lq, Lk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        if Lq == 0:
            continue
        seed = None if spec.dropout_seed is None else (spec.dropout_seed + b * VARLEN_SEED_STEP) & 0xFFFFFFFF
        spec_b = dataclasses.replace(spec, batch=1, q_len=Lq, kv_len=Lk, dropout_seed=seed)
        qb = q[cq[b] : cq[b + 1]].transpose(0, 1).unsqueeze(0)  # (1, Hq, Lq, D)
        if Lk == 0:  # no key at all: output 0 and lse -inf, as for a fully masked row
            outs.append(q.new_zeros(Lq, spec.q_heads, spec.v_head_dim))
            lses.append(torch.full((spec.q_heads, Lq), float("-inf"), dtype=spec.acc_dtype, device=q.device))
            continue
        kb = k[ck[b] : ck[b + 1]].transpose(0, 1).unsqueeze(0)  # (1, Hk, Lk, D)
        vb = v[ck[b] : ck[b + 1]].transpose(0, 1).unsqueeze(0)  # (1, Hk, Lk, Dv)
        why = impl.refusal(qb, spec_b, return_lse)
        if why is not None:
            raise ValueError(f"attention_varlen: backend {backend!r} cannot run sequence {b}: {why}")
        out_b, lse_b = impl.run(qb, kb, vb, spec_b, True)
        outs.append(out_b[0].transpose(0, 1))  # (Lq, Hq, Dv)
        lses.append(lse_b[0] if lse_b is not None else None)  # (Hq, Lq)
    if not outs:
        empty_lse = torch.empty(spec.q_heads, 0, dtype=spec.acc_dtype, device=q.device)
        return q.new_empty(0, spec.q_heads, spec.v_head_dim), empty_lse
    out = torch.cat(outs, dim=0)  # (total_q, Hq, Dv)
    lse = torch.cat(lses, dim=1) if return_lse else None  # (Hq, total_q)
    return out, lse
