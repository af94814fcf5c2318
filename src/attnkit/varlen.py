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

import functools

import torch
from torch import Tensor

from attnkit import backends
from attnkit.dropout import VARLEN_SEED_STEP
from attnkit.functional import build_varlen_spec, packed_view, run_guarded
from attnkit.kernels import nonfinite, packed
from attnkit.options import Alibi, Window

__all__ = ["VARLEN_SEED_STEP", "attention_varlen"]


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
        max_seqlen_q: the longest query sequence (computed when None).
        max_seqlen_k: the longest key sequence (computed when None).
        causal: as in `attnkit.attention`, per sequence, and so are ``window``, ``alibi``, ``softcap``,
            ``scale`` and ``dropout_p`` (alignment is bottom-right within each sequence).
        mask: not supported, must be None: per-sequence structure is what ``cu_seqlens`` expresses
            (pad and use `attnkit.attention` for arbitrary masks).
        return_lse: also return the log-sum-exp ``(Hq, total_q)`` (FlashAttention's layout).
        backend: ``"auto"`` (Triton's packed kernel on CUDA, else ``tiled`` per sequence), ``"triton"``,
            or any registered dense backend, run sequence by sequence (under ``torch.compile``, where
            the sequence loop cannot be traced, a dense backend's packed batch runs as the tiled op).

    Returns:
        ``out (total_q, Hq, Dv)`` in ``q.dtype``; with ``return_lse`` also ``lse (Hq, total_q)``.
    """
    spec, max_q, max_k = build_varlen_spec(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, mask=mask,
        causal=causal, window=window, alibi=alibi, softcap=softcap, scale=scale, dropout_p=dropout_p,
    )  # fmt: skip
    if not isinstance(return_lse, bool):
        raise TypeError(f"attention_varlen: return_lse must be a bool, got {return_lse!r}")
    choice = backends.choose(packed_view(q), spec, return_lse, backend, "varlen")
    if choice.backend is None:
        reasons = "; ".join(f"{name}: {why}" for name, why in choice.reasons.items())
        raise ValueError(f"attention_varlen: no backend can run this request ({reasons})")
    impl = backends.get_backend(choice.backend)
    if torch.compiler.is_compiling() and impl.run_varlen is None:
        # A dense backend runs sequence by sequence over the values of cu_seqlens, which a traced
        # graph cannot read: there the packed batch is one op, computed by the tiled kernel.
        impl = backends.get_backend("tiled")
    if impl.run_varlen is not None and nonfinite.find(q, k, v) is None:
        out, lse = impl.run_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, spec, return_lse)
    else:  # a dense backend named by the caller, or non-finite inputs: sequence by sequence, guarded
        guarded = functools.partial(run_guarded, impl.run)
        out, lse = packed.per_sequence(guarded, impl.refusal, q, k, v, cu_seqlens_q, cu_seqlens_k, spec, return_lse)
    return (out, lse) if return_lse else out
