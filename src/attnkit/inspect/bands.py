"""Distance bands: how much of each row's attention lands near the query and how much far away.

For query ``i`` (aligned to key position ``i' = i + Lk - Lq``) and weights ``p_ij`` (before
dropout, exactly as `attnkit.attention` defines them):

* ``near_i = sum_{j : |i' - j| <= near} p_ij``: the share within ``near`` tokens (local reading);
* ``far_i  = sum_{j : |i' - j| >  far}  p_ij``: the share beyond ``far`` tokens (long-range reading).

`band_shares` computes both exactly without the ``Lq x Lk`` map: it walks the queries in
strips, asks the `attnkit.spec.AttentionSpec` for the scores of one strip against the keys
that strip may see (the same scale, softcap, biases and masks as every kernel), takes the
reference softmax (`attnkit.kernels.reference.softmax_with_empty_rows`) and sums the weights
in each band. Memory: one strip, ``B * H * strip * Lk`` values, capped by ``max_strip_bytes``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit.functional import build_spec
from attnkit.kernels.reference import softmax_with_empty_rows
from attnkit.masks import aligned_distance
from attnkit.options import AttentionOptions

__all__ = ["band_shares", "first_key_weight"]

DEFAULT_MAX_STRIP_BYTES = 32 * 2**20


def _strip_rows(batch: int, heads: int, kv_len: int, itemsize: int, max_strip_bytes: int) -> int:
    """How many queries one strip may hold so that its ``(B, H, rows, Lk)`` weights fit ``max_strip_bytes``."""
    per_row = max(1, batch * heads * kv_len * itemsize * 2)  # scores and weights of one row
    return max(1, max_strip_bytes // per_row)


@torch.no_grad()
def band_shares(
    q: Tensor,
    k: Tensor,
    options: AttentionOptions | None = None,
    *,
    near: int = 8,
    far: int = 256,
    max_strip_bytes: int = DEFAULT_MAX_STRIP_BYTES,
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact per-row shares of attention within ``near`` tokens and beyond ``far`` tokens.

    Args:
        q: ``(B, Hq, Lq, D)`` queries; k: ``(B, Hk, Lk, D)`` keys (``Hk`` divides ``Hq``).
        options: the call's `attnkit.options.AttentionOptions` (causal, mask, window, ALiBi,
            softcap, scale); dropout is ignored (the shares describe the weights before dropout).
        near: the near band is ``|i' - j| <= near`` (>= 0).
        far: the far band is ``|i' - j| > far`` (>= near).
        max_strip_bytes: the most memory one strip of scores and weights may take.

    Returns:
        ``near (B, Hq, Lq)``, ``far (B, Hq, Lq)`` in the accumulation dtype (fp32, fp64 for fp64
        inputs), and ``valid (B, Hq, Lq)`` bool: rows with at least one allowed key (the others
        have no weights, and both shares are 0 there).
    """
    for name, value, least in (("near", near, 0), ("far", far, near)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"band_shares: {name} must be an int >= {least}, got {value!r}")
    if not isinstance(max_strip_bytes, int) or max_strip_bytes < 1:
        raise ValueError(f"band_shares: max_strip_bytes must be an int >= 1, got {max_strip_bytes!r}")
    kwargs = (options or AttentionOptions()).kwargs(dropout=False)
    q, k = q.detach(), k.detach()
    spec = build_spec(q, k, None, **kwargs)  # no values: the weights alone are read
    B, H, Lq, Lk = spec.batch, spec.q_heads, spec.q_len, spec.kv_len
    dtype = spec.acc_dtype
    near_share = torch.zeros(B, H, Lq, dtype=dtype, device=q.device)
    far_share = torch.zeros_like(near_share)
    valid = torch.zeros(B, H, Lq, dtype=torch.bool, device=q.device)
    rows = _strip_rows(B, H, Lk, torch.finfo(dtype).bits // 8, max_strip_bytes)
    for i0 in range(0, Lq, rows):
        i1 = min(Lq, i0 + rows)
        j0, j1 = spec.key_range(i0, i1)  # keys outside are masked for every query of the strip
        if j1 <= j0:
            continue  # no query of the strip sees any key
        s, _ = spec.scores(q[:, :, i0:i1], k[:, :, j0:j1], i0, j0)  # (B, H, bq, bk), -inf where masked
        p, lse = softmax_with_empty_rows(s)  # (B, H, bq, bk), (B, H, bq)
        dist = aligned_distance(i0, i1, j0, j1, spec.offset, dtype, q.device)  # (bq, bk): |i' - j|
        near_share[:, :, i0:i1] = (p * (dist <= near)).sum(-1)
        far_share[:, :, i0:i1] = (p * (dist > far)).sum(-1)
        valid[:, :, i0:i1] = torch.isfinite(lse)
    return near_share, far_share, valid


@torch.no_grad()
def first_key_weight(q: Tensor, k: Tensor, lse: Tensor, options: AttentionOptions | None = None) -> Tensor:
    """``(B, Hq, Lq)``: each row's weight on key 0, ``p_i0 = exp(s_i0 - lse_i)`` (0 where the row is empty).

    Args:
        q: ``(B, Hq, Lq, D)``; k: ``(B, Hk, Lk, D)``; options: as in `band_shares`.
        lse: ``(B, Hq, Lq)`` the rows' log-sum-exp (`attnkit.attention_stats` gives it).

    Memory: one column of scores, ``B * Hq * Lq``.
    """
    spec = build_spec(q.detach(), k.detach(), None, **(options or AttentionOptions()).kwargs(dropout=False))
    s, _ = spec.scores(q.detach(), k.detach()[:, :, :1], 0, 0)  # (B, Hq, Lq, 1): key 0, masks applied
    lse = lse.to(s.dtype)
    return torch.where(torch.isfinite(lse), torch.exp(s[..., 0] - lse), torch.zeros_like(lse))
