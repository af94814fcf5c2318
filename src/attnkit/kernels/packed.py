"""Packed variable-length batches run sequence by sequence through a dense kernel.

The fallback of `attnkit.attention_varlen` for backends without a packed kernel of their
own (``tiled`` uses it as its varlen kernel; ``sdpa`` and ``reference`` when named): each
sequence runs on views of the packed tensors, so nothing is padded or copied.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from attnkit.dropout import varlen_seed
from attnkit.spec import AttentionSpec

__all__ = ["per_sequence"]


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
        seed = None if spec.dropout_seed is None else varlen_seed(spec.dropout_seed, b)
        spec_b = dataclasses.replace(spec, batch=1, q_len=Lq, kv_len=Lk, dropout_seed=seed)
        if Lk == 0:  # no key at all: output 0 and lse -inf, as for a fully masked row
            outs.append(q.new_zeros(Lq, spec.q_heads, spec.v_head_dim))
            lses.append(torch.full((spec.q_heads, Lq), float("-inf"), dtype=spec.acc_dtype, device=q.device))
            continue
        qb = q[cq[b] : cq[b + 1]].transpose(0, 1).unsqueeze(0)  # (1, Hq, Lq, D)
        kb = k[ck[b] : ck[b + 1]].transpose(0, 1).unsqueeze(0)  # (1, Hk, Lk, D)
        vb = v[ck[b] : ck[b + 1]].transpose(0, 1).unsqueeze(0)  # (1, Hk, Lk, Dv)
        why = refusal(qb, spec_b, return_lse)
        if why is not None:
            raise ValueError(f"attention_varlen: the backend cannot run sequence {b}: {why}")
        out_b, lse_b = run(qb, kb, vb, spec_b, True)
        outs.append(out_b[0].transpose(0, 1))  # (Lq, Hq, Dv)
        lses.append(lse_b[0] if lse_b is not None else None)  # (Hq, Lq)
    if not outs:
        empty_lse = torch.empty(spec.q_heads, 0, dtype=spec.acc_dtype, device=q.device)
        return q.new_empty(0, spec.q_heads, spec.v_head_dim), empty_lse
    out = torch.cat(outs, dim=0)  # (total_q, Hq, Dv)
    lse = torch.cat(lses, dim=1) if return_lse else None  # (Hq, total_q)
    return out, lse
