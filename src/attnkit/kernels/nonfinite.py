"""Non-finite inputs: one rule on every backend, applied around the kernels.

The rule (`attnkit.attention` documents it next to the fully-masked-row rule):

* a row whose query holds a NaN or an infinity, or that may attend to a key whose ``k`` or
  ``v`` holds one, comes out NaN (output and log-sum-exp), never a plausible 0;
* a key a row may not attend to is never read: whatever it holds (padded KV-cache slots hold
  uninitialised memory) never reaches that row.

Fused kernels break both halves in their own ways (a NaN query row comes out 0 with
``lse = 0``; ``NaN + (-inf)`` at a masked key poisons every row), and even a plain
``p @ v`` reads masked keys (``0 * NaN = NaN``). So the rule is enforced once, here: the
kernels run on ``k`` and ``v`` with non-finite entries replaced by 0, and the rows the
rule names are set to NaN afterwards. Checking costs one summation of ``q, k, v``
(``O(L * D)``, against the kernels' ``O(L^2 * D)``) and nothing more when all is finite.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit.spec import AttentionSpec

__all__ = ["BadInputs", "clean", "find", "poison", "poisoned_rows", "run_guarded"]

BLOCK_K = 512  # keys per block when finding the rows that read a non-finite key

BadInputs = tuple[Tensor, Tensor]  # (q_bad (B, Hq, Lq), kv_bad (B, Hk, Lk)) bool


def find(q: Tensor, k: Tensor, v: Tensor) -> BadInputs | None:
    """Where ``q`` rows and ``k``/``v`` keys hold a non-finite value; None when everything is finite.

    ``q (B, Hq, Lq, D)``, ``k (B, Hk, Lk, D)``, ``v (B, Hk, Lk, Dv)``. None while ``torch.compile``
    traces (a data-dependent branch): traced calls apply the rule without branching
    (`attnkit.functional.run_guarded`, the ``attnkit::nonfinite_rows`` op).
    """
    if torch.compiler.is_compiling():
        return None
    # Fast screen: a NaN or an infinity anywhere makes the sum non-finite. (A sum of huge finite
    # values can overflow too; that only sends the call down the exact, slower path below.)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    sums = torch.stack([x.sum(dtype=acc) for x in (q, k, v)])
    if bool(torch.isfinite(sums).all()):
        return None
    q_bad = ~torch.isfinite(q).all(dim=-1)  # (B, Hq, Lq)
    kv_bad = ~(torch.isfinite(k).all(dim=-1) & torch.isfinite(v).all(dim=-1))  # (B, Hk, Lk)
    if not bool(q_bad.any() | kv_bad.any()):
        return None
    return q_bad, kv_bad


def clean(x: Tensor) -> Tensor:
    """``x`` with NaN and infinities replaced by 0 (gradients flow to the finite entries)."""
    return torch.where(torch.isfinite(x), x, torch.zeros((), dtype=x.dtype, device=x.device))


def poisoned_rows(spec: AttentionSpec, bad: BadInputs) -> Tensor:
    """``(B, Hq, Lq)`` bool: the rows the rule makes NaN (bad query, or may attend a bad key)."""
    q_bad, kv_bad = bad
    rows = q_bad.clone()
    bad_keys = kv_bad.any(dim=1).any(dim=0).nonzero().squeeze(1)  # (n,) keys bad for some (b, h)
    if bad_keys.numel() == 0:
        return rows
    first, last = int(bad_keys.min()), int(bad_keys.max()) + 1
    for j0 in range(first, last, BLOCK_K):
        j1 = min(j0 + BLOCK_K, last)
        bad_block = kv_bad[:, :, None, j0:j1]  # (B, Hk, 1, bk)
        if not bool(bad_block.any()):
            continue
        bad_block = bad_block.repeat_interleave(spec.group, dim=1)  # (B, Hq, 1, bk)
        allowed = spec.allowed_tile(0, spec.q_len, j0, j1, rows.device)  # broadcastable to (B, Hq, Lq, bk)
        hit = bad_block if allowed is None else bad_block & allowed
        rows |= hit.any(dim=-1).expand_as(rows)
    return rows


def poison(x: Tensor | None, rows: Tensor) -> Tensor | None:
    """``x`` (``(B, Hq, Lq, ...)``) with the given rows set to NaN."""
    if x is None:
        return None
    r = rows.view(*rows.shape, *([1] * (x.dim() - rows.dim())))
    return torch.where(r, torch.full((), float("nan"), dtype=x.dtype, device=x.device), x)


def run_guarded(run, q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec, return_lse: bool):
    """``run(q, k, v, spec, return_lse) -> (out, lse)`` under the rule: clean inputs in, named rows NaN out."""
    bad = find(q, k, v)
    if bad is None:
        return run(q, k, v, spec, return_lse)
    out, lse = run(q, clean(k), clean(v), spec, return_lse)
    rows = poisoned_rows(spec, bad)
    return poison(out, rows), poison(lse, rows)
