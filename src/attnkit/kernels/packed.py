"""Packed variable-length batches run sequence by sequence through a dense kernel.

The fallback of `attnkit.attention_varlen` for backends without a packed kernel of their
own (``tiled`` uses it as its varlen kernel; ``sdpa`` and ``reference`` when named): each
sequence runs on views of the packed tensors, so nothing is padded or copied.
"""

from __future__ import annotations

import dataclasses
import itertools

import torch
from torch import Tensor

from attnkit.dropout import varlen_seed
from attnkit.spec import AttentionSpec

__all__ = [
    "check_cu_form",
    "check_cu_seqlens",
    "check_same_count",
    "packed_view",
    "per_sequence",
    "per_sequence_backward",
]


def packed_view(x: Tensor) -> Tensor:
    """``(total, H, D) -> (1, H, total, D)``: a packed tensor as one dense batch element (a view)."""
    return x.transpose(0, 1).unsqueeze(0)


def check_cu_form(name: str, cu: Tensor, device: torch.device) -> None:
    """Validate what cumulative lengths are without reading them: 1-D int32/int64 on ``device``."""
    if not isinstance(cu, Tensor) or cu.dim() != 1 or cu.dtype not in (torch.int32, torch.int64):
        got = f"{cu.dtype} of shape {tuple(cu.shape)}" if isinstance(cu, Tensor) else type(cu).__name__
        raise ValueError(f"attention_varlen: {name} must be a 1-D int32/int64 tensor (S + 1,), got {got}")
    if cu.device != device:
        raise ValueError(f"attention_varlen: {name} is on {cu.device} but q is on {device}")


def check_cu_seqlens(name: str, cu: Tensor, total: int, device: torch.device) -> list[int]:
    """Validate cumulative lengths ``(S + 1,)`` of a packed tensor of ``total`` tokens; returns them as ints."""
    check_cu_form(name, cu, device)
    values = cu.tolist()
    if len(values) < 2 or values[0] != 0 or values[-1] != total or any(a > b for a, b in itertools.pairwise(values)):
        raise ValueError(
            f"attention_varlen: {name} must start at 0, never decrease and end at the packed length {total}, "
            f"got {values if len(values) <= 12 else [*values[:6], '...', *values[-3:]]}"
        )
    return values


def check_same_count(cq: list[int], ck: list[int]) -> None:
    """Query and key cumulative lengths must describe the same number of sequences."""
    if len(cq) != len(ck):
        raise ValueError(
            f"attention_varlen: cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, "
            f"got {len(cq) - 1} and {len(ck) - 1}"
        )


def _sequence_spec(spec: AttentionSpec, b: int, Lq: int, Lk: int) -> AttentionSpec:
    """The spec of packed sequence ``b``: its own lengths and dropout seed (`attnkit.dropout.varlen_seed`)."""
    seed = None if spec.dropout_seed is None else varlen_seed(spec.dropout_seed, b)
    return dataclasses.replace(spec, batch=1, q_len=Lq, kv_len=Lk, dropout_seed=seed)


def per_sequence(
    run,
    refusal,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    spec: AttentionSpec,
    return_lse: bool,
) -> tuple[Tensor, Tensor | None]:
    """Run each packed sequence through ``run(q, k, v, spec, return_lse)``.

    Args:
        run, refusal: a dense backend's kernel and refusal (`attnkit.backends.Backend`).
        q: ``(total_q, Hq, D)``; k: ``(total_k, Hk, D)``; v: ``(total_k, Hk, Dv)``.
        cu_seqlens_q, cu_seqlens_k: ``(S + 1,)`` validated cumulative lengths.
        spec: the packed spec (``batch = S``); each sequence gets its own lengths and dropout seed.

    Returns:
        ``out (total_q, Hq, Dv)`` and ``lse (Hq, total_q)`` (None unless ``return_lse``).
    """
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for b in range(len(cq) - 1):
        Lq, Lk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        if Lq == 0:
            continue
        spec_b = _sequence_spec(spec, b, Lq, Lk)
        if Lk == 0:  # no key at all: output 0 and lse -inf, as for a fully masked row
            outs.append(q.new_zeros(Lq, spec.q_heads, spec.v_head_dim))
            lses.append(torch.full((spec.q_heads, Lq), float("-inf"), dtype=spec.acc_dtype, device=q.device))
            continue
        qb = packed_view(q[cq[b] : cq[b + 1]])  # (1, Hq, Lq, D)
        kb = packed_view(k[ck[b] : ck[b + 1]])  # (1, Hk, Lk, D)
        vb = packed_view(v[ck[b] : ck[b + 1]])  # (1, Hk, Lk, Dv)
        why = refusal(qb, spec_b, return_lse)
        if why is not None:
            raise ValueError(f"attention_varlen: the backend cannot run sequence {b}: {why}")
        out_b, lse_b = run(qb, kb, vb, spec_b, return_lse)  # asked for what the refusal approved
        outs.append(out_b[0].transpose(0, 1))  # (Lq, Hq, Dv)
        lses.append(lse_b[0] if lse_b is not None else None)  # (Hq, Lq)
    if not outs:
        empty_lse = torch.empty(spec.q_heads, 0, dtype=spec.acc_dtype, device=q.device)
        return q.new_empty(0, spec.q_heads, spec.v_head_dim), empty_lse
    out = torch.cat(outs, dim=0)  # (total_q, Hq, Dv)
    lse = torch.cat(lses, dim=1) if return_lse else None  # (Hq, total_q)
    return out, lse


def per_sequence_backward(
    backward,
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    spec: AttentionSpec,
    dlse: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of `per_sequence`, each sequence through a dense ``backward`` (`attnkit.kernels.tiled.backward`'s).

    Args:
        backward: ``backward(dout, q, k, v, out, lse, spec, dlse=...) -> (dq, dk, dv, _)`` of one dense call.
        dout, out: ``(total_q, Hq, Dv)``; q, k, v as in `per_sequence`; lse, dlse: ``(Hq, total_q)``.

    Returns:
        ``dq (total_q, Hq, D)``, ``dk (total_k, Hk, D)``, ``dv (total_k, Hk, Dv)`` (keys of no sequence get 0).
    """
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    dq, dk, dv = q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)  # contiguous
    for b in range(len(cq) - 1):
        Lq, Lk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        if Lq == 0 or Lk == 0:
            continue
        rows, keys = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        gq, gk, gv, _ = backward(
            packed_view(dout[rows]), packed_view(q[rows]), packed_view(k[keys]), packed_view(v[keys]),
            packed_view(out[rows]), lse[:, rows].unsqueeze(0), _sequence_spec(spec, b, Lq, Lk),
            dlse=None if dlse is None else dlse[:, rows].unsqueeze(0),
        )  # fmt: skip  # lse, dlse (1, Hq, Lq)
        dq[rows], dk[keys], dv[keys] = gq[0].transpose(0, 1), gk[0].transpose(0, 1), gv[0].transpose(0, 1)
    return dq, dk, dv
