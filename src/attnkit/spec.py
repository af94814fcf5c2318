"""`AttentionSpec`: one validated, normalised description of an attention call.

`attnkit.functional` builds it from the user's arguments; every kernel reads it and
parses nothing. It also owns the one definition of how a tile of scores is formed,
so the order of operations is written exactly once:

    s = (q @ k^T) * scale                      # raw scores
    s = softcap * tanh(s / softcap)            # if softcap
    s = s + alibi(h, i, j) + float_mask        # additive biases
    s = -inf where bool_mask / causal / window disallow
    p = softmax(s)   (a row with no allowed key gives p = 0, lse = -inf)
    p = dropout(p)   (counter-based, see dropout.py)
    out = p @ v

Shapes: ``q (B, Hq, Lq, D)``, ``k (B, Hk, Lk, D)``, ``v (B, Hk, Lk, Dv)``; query
head ``h`` reads key/value head ``h // (Hq // Hk)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from attnkit.dropout import keep_mask
from attnkit.masks import aligned_distance, window_allowed


@dataclass(frozen=True, eq=False)
class AttentionSpec:
    """Everything a kernel needs besides ``q``, ``k`` and ``v``. Built by `attnkit.functional`."""

    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    v_head_dim: int
    scale: float
    causal: bool = False
    window: tuple[int | None, int | None] | None = None
    alibi_slopes: Tensor | None = None  # (Hq,) float32 or float64
    softcap: float | None = None
    mask: Tensor | None = None  # 4-D, each dim 1 or full: (B|1, Hq|1, Lq|1, Lk|1)
    dropout_p: float = 0.0
    dropout_seed: int | Tensor | None = None  # a 0-d int64 tensor while torch.compile traces (`new_seed`)
    acc_dtype: torch.dtype = torch.float32
    # Where query 0 sits among the keys; None = ``Lk - Lq`` (bottom-right, the default).
    # Set only by callers that compute a block of a larger problem (ring attention: a
    # query shard against another rank's key shard, ``align = q_start - k_start``).
    align: int | None = None

    # ----------------------------------------------------------------- geometry
    @property
    def offset(self) -> int:
        """Query ``i`` is aligned to key position ``i + offset``: ``Lk - Lq`` unless ``align`` is set."""
        return self.kv_len - self.q_len if self.align is None else self.align

    @property
    def group(self) -> int:
        """Query heads per key/value head (1 for MHA, ``Hq`` for MQA)."""
        return self.q_heads // self.kv_heads

    @property
    def bounds(self) -> tuple[int | None, int | None]:
        """``(left, right)``: query ``i`` sees keys ``i' - left .. i' + right`` (None = unbounded).

        Causal is the window with ``right = 0``; both combine by taking the tighter side.
        """
        left, right = self.window if self.window is not None else (None, None)
        if self.causal:
            right = 0 if right is None else min(right, 0)
        return left, right

    @property
    def has_structure_mask(self) -> bool:
        """True when causal or a window restricts which keys a query sees."""
        left, right = self.bounds
        return left is not None or right is not None

    @property
    def mask_is_bool(self) -> bool:
        return self.mask is not None and self.mask.dtype == torch.bool

    @property
    def has_bias(self) -> bool:
        """True when scores get an additive term (ALiBi or a float mask)."""
        return self.alibi_slopes is not None or (self.mask is not None and not self.mask_is_bool)

    def key_range(self, i0: int, i1: int) -> tuple[int, int]:
        """Keys ``[j_lo, j_hi)`` that some query in ``[i0, i1)`` may see by causal/window.

        Keys outside are masked for every query of the block, so kernels skip them.
        """
        left, right = self.bounds
        lo = 0 if left is None else max(0, i0 + self.offset - left)
        hi = self.kv_len if right is None else min(self.kv_len, i1 - 1 + self.offset + right + 1)
        return lo, max(lo, hi)

    def block_is_open(self, i0: int, i1: int, j0: int, j1: int) -> bool:
        """True when causal/window allow every pair of the tile (the user mask is not considered)."""
        left, right = self.bounds
        if left is not None and j0 < i1 - 1 + self.offset - left:
            return False
        if right is not None and j1 - 1 > i0 + self.offset + right:
            return False
        return True

    def open_columns(self, i0: int, i1: int, j0: int, j1: int) -> tuple[int, int]:
        """``[a, z)`` within keys ``[j0, j1)``: the columns causal/window allow to every query of ``[i0, i1)``.

        Outside them (``[j0, a)``, the window's left edge, and ``[z, j1)``, the causal diagonal)
        some pairs are masked; the user mask is not considered.
        """
        left, right = self.bounds
        a = j0 if left is None else min(j1, max(j0, i1 - 1 + self.offset - left))
        z = j1 if right is None else max(a, min(j1, i0 + self.offset + right + 1))
        return a, z

    def row_key_ranges(self, i0: int, i1: int, j0: int, j1: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(i1 - i0,)`` int64 each: the keys ``[a_i, b_i)`` of ``[j0, j1)`` causal/window let query ``i`` see.

        Counted from ``j0`` (``0 <= a_i <= b_i <= j1 - j0``); the per-row form of `open_columns`,
        for a kernel that skips masked keys instead of masking them. The user mask is not considered.
        """
        left, right = self.bounds
        i = torch.arange(i0, i1, device=device, dtype=torch.int64) + self.offset  # (bq,) aligned positions
        a = (i - left - j0).clamp_(0, j1 - j0) if left is not None else torch.zeros_like(i)
        b = (i + right + 1 - j0).clamp_(0, j1 - j0) if right is not None else torch.full_like(i, j1 - j0)
        return a, torch.maximum(a, b)

    def rows_without_keys(self, i0: int, i1: int, device: torch.device) -> Tensor:
        """``(i1 - i0,)`` bool: rows whose causal/window range holds no key at all."""
        i = torch.arange(i0, i1, device=device) + self.offset
        left, right = self.bounds
        lo = torch.zeros_like(i) if left is None else (i - left).clamp(min=0)
        hi = torch.full_like(i, self.kv_len - 1) if right is None else (i + right).clamp(max=self.kv_len - 1)
        return hi < lo

    def part(self, b: int, kv0: int, kv1: int, *, batches: int = 1) -> AttentionSpec:
        """The spec of batch elements ``[b, b + batches)`` and key/value heads ``[kv0, kv1)`` with their query heads.

        The mask and ALiBi slopes are sliced to match (broadcast axes stay whole); kernels that
        split a request into pieces (per GQA group, or to stay within 32-bit offsets) use it.
        """
        h0, h1 = kv0 * self.group, kv1 * self.group
        mask = self.mask
        if mask is not None:
            mask = mask[b : b + batches] if mask.shape[0] != 1 else mask
            mask = mask[:, h0:h1] if mask.shape[1] != 1 else mask
        slopes = None if self.alibi_slopes is None else self.alibi_slopes[h0:h1]
        return dataclasses.replace(
            self, batch=batches, q_heads=h1 - h0, kv_heads=kv1 - kv0, mask=mask, alibi_slopes=slopes
        )

    # ------------------------------------------------------------------ tiles
    def mask_tile(self, i0: int, i1: int, j0: int, j1: int) -> Tensor | None:
        """The user mask restricted to queries ``[i0, i1)`` and keys ``[j0, j1)``.

        Broadcast (size-1) dimensions stay size 1: a key-padding mask stays ``(B, 1, 1, bk)``.
        """
        m = self.mask
        if m is None:
            return None
        if m.shape[-2] != 1:
            m = m[..., i0:i1, :]
        if m.shape[-1] != 1:
            m = m[..., j0:j1]
        return m

    def structure_tile(self, i0: int, i1: int, j0: int, j1: int, device: torch.device) -> Tensor | None:
        """``(bq, bk)`` bool: which pairs causal/window allow, or None if all of them."""
        if not self.has_structure_mask or self.block_is_open(i0, i1, j0, j1):
            return None
        left, right = self.bounds
        return window_allowed(i0, i1, j0, j1, self.offset, left, right, device)

    def allowed_tile(self, i0: int, i1: int, j0: int, j1: int, device: torch.device) -> Tensor | None:
        """Bool, broadcastable to ``(B, Hq, bq, bk)``: causal/window AND the bool mask; None if all allowed."""
        allowed = self.structure_tile(i0, i1, j0, j1, device)
        m = self.mask_tile(i0, i1, j0, j1) if self.mask_is_bool else None
        if m is not None:
            allowed = m if allowed is None else (allowed & m)
        return allowed

    def add_bias(self, s: Tensor, i0: int, j0: int, *, inplace: bool) -> Tensor:
        """``s + ALiBi + float mask`` for the tile of queries ``i0 ..`` and keys ``j0 ..`` of ``s (..., bq, bk)``.

        The one place the additive terms are written. ``inplace`` adds into ``s`` (the kernels'
        own passes); otherwise autograd sees ordinary operations. The float mask is added in
        the accumulation dtype, so a large finite value never rounds to ``-inf``.
        """
        i1, j1 = i0 + s.shape[-2], j0 + s.shape[-1]
        if self.alibi_slopes is not None:
            dist = aligned_distance(i0, i1, j0, j1, self.offset, self.acc_dtype, s.device)  # (bq, bk)
            neg_slopes = -self.alibi_slopes.to(device=s.device, dtype=self.acc_dtype).view(1, -1, 1, 1)
            # s += -slope[h] * |i' - j|, fused into one pass without an (Hq, bq, bk) temporary.
            s = s.addcmul_(neg_slopes, dist) if inplace else torch.addcmul(s, neg_slopes, dist)
        m = None if self.mask is None or self.mask_is_bool else self.mask_tile(i0, i1, j0, j1)
        if m is not None:
            s = s.add_(m.to(self.acc_dtype)) if inplace else s + m.to(self.acc_dtype)
        return s

    def bias_tile(self, i0: int, i1: int, j0: int, j1: int, device: torch.device) -> Tensor | None:
        """ALiBi + float mask of one tile, broadcastable to ``(B, Hq, bq, bk)`` (size-1 axes stay 1), or None."""
        if not self.has_bias:
            return None
        shape = (1, self.q_heads, i1 - i0, j1 - j0) if self.alibi_slopes is not None else (1, 1, 1, 1)
        m = self.mask_tile(i0, i1, j0, j1)
        if m is not None and not self.mask_is_bool:
            shape = torch.broadcast_shapes(shape, m.shape)
        return self.add_bias(torch.zeros(shape, dtype=self.acc_dtype, device=device), i0, j0, inplace=True)

    def additive_tile(self, i0: int, i1: int, j0: int, j1: int, device: torch.device) -> Tensor | None:
        """The tile's bias with ``-inf`` where disallowed: what a fused kernel takes as its float mask.

        4-D, broadcastable to ``(B, Hq, bq, bk)``, in the accumulation dtype; None when nothing applies.
        """
        bias = self.bias_tile(i0, i1, j0, j1, device)
        allowed = self.allowed_tile(i0, i1, j0, j1, device)
        if allowed is None:
            return bias
        base = bias if bias is not None else torch.zeros((), dtype=self.acc_dtype, device=device)
        out = torch.where(allowed, base, float("-inf"))
        return out.view((1,) * (4 - out.dim()) + tuple(out.shape))

    def raw_scores(self, q: Tensor, k: Tensor, out: Tensor | None = None) -> Tensor:
        """``(B, Hq, bq, bk)`` scaled scores ``(q * scale) k^T`` in the accumulation dtype.

        ``q (B, Hq, bq, D)``, ``k (B, Hk, bk, D)``; a GQA group's query rows are stacked
        (``(B, Hk, G * bq, D)``, the same memory), so one matmul per key head serves the whole
        group and key heads are never copied. ``out``: a contiguous ``(B, Hq, bq, bk)`` buffer
        to write into (untracked calls only), saving a fresh allocation per tile.
        """
        B, Hq, bq, D = q.shape
        bk = k.shape[-2]
        # The scale goes on q (bq x D numbers), not on the (bq x bk) scores: one pass less over the tile.
        q4 = (q.to(self.acc_dtype) * self.scale).reshape(B, self.kv_heads, self.group * bq, D)  # (B, Hk, G*bq, D)
        kt = k.to(self.acc_dtype).transpose(-1, -2)  # (B, Hk, D, bk)
        if out is None:
            s = torch.matmul(q4, kt)  # (B, Hk, G*bq, bk)
        else:
            s = torch.matmul(q4, kt, out=out.view(B, self.kv_heads, self.group * bq, bk))
        return s.view(B, Hq, bq, bk)

    def scores(
        self,
        q: Tensor,
        k: Tensor,
        i0: int,
        j0: int,
        *,
        need_softcap_grad: bool = False,
        out: Tensor | None = None,
        structure: bool = True,
    ) -> tuple[Tensor, Tensor | None]:
        """Scores of one tile with every modifier and mask applied (masked entries are ``-inf``).

        Args:
            q: ``(B, Hq, bq, D)`` queries ``i0 .. i0 + bq``.
            k: ``(B, Hk, bk, D)`` keys ``j0 .. j0 + bk``.
            need_softcap_grad: also return ``d softcap(s) / d s = 1 - tanh^2``.
            out: a contiguous ``(B, Hq, bq, bk)`` buffer for the scores, untracked calls only
                (`raw_scores`); ``s`` is then a view of it.
            structure: False leaves the pairs causal/window disallow unmasked (untracked calls
                without a bool mask only): for a caller that skips them by row ranges.

        Returns:
            ``s (B, Hq, bq, bk)`` in the accumulation dtype, and the softcap derivative
            ``(B, Hq, bq, bk)`` or None.
        """
        i1, j1 = i0 + q.shape[-2], j0 + k.shape[-2]
        # Outside autograd (the kernels' own passes) every step works in place on one buffer.
        m = self.mask
        tracked = torch.is_grad_enabled() and (
            q.requires_grad or k.requires_grad or (m is not None and m.requires_grad)
        )
        if not structure and (tracked or self.mask_is_bool):
            raise ValueError("structure=False: for untracked calls without a bool mask")
        if out is not None and tracked:
            raise ValueError("out: scores into a buffer are for untracked calls; got inputs that require grad")
        s = self.raw_scores(q, k, out)
        dcap = None
        if self.softcap is not None:
            t = torch.tanh(s / self.softcap) if tracked else s.div_(self.softcap).tanh_()
            if need_softcap_grad:
                dcap = 1 - t * t
            s = t * self.softcap if tracked else t.mul_(self.softcap)
        s = self.add_bias(s, i0, j0, inplace=not tracked)
        if not tracked and not self.mask_is_bool:
            if structure:
                self._mask_structure_edges_(s, i0, j0)
            return s, dcap
        allowed = self.allowed_tile(i0, i1, j0, j1, q.device)
        if allowed is not None:
            s = s.masked_fill(~allowed, float("-inf")) if tracked else s.masked_fill_(~allowed, float("-inf"))
        return s, dcap

    def _mask_structure_edges_(self, s: Tensor, i0: int, j0: int) -> None:
        """``-inf`` where causal/window disallow, in place, building the mask only where it varies.

        The keys every query of the tile may see (``[a, z)``) need no mask; only the columns left
        of them (the window's left edge) and right of them (the causal diagonal) get one. Same
        result as masking with `allowed_tile` (no bool mask), far less work on long strips.
        """
        i1, j1 = i0 + s.shape[-2], j0 + s.shape[-1]
        a, z = self.open_columns(i0, i1, j0, j1)
        for c0, c1 in ((j0, a), (z, j1)):
            if c1 > c0:
                allowed = self.structure_tile(i0, i1, c0, c1, s.device)
                if allowed is not None:
                    s[..., c0 - j0 : c1 - j0].masked_fill_(~allowed, float("-inf"))

    def dropout_tile(self, i0: int, i1: int, j0: int, j1: int, device: torch.device) -> Tensor:
        """``(B, Hq, bq, bk)`` bool keep-mask of the tile (see `attnkit.dropout`)."""
        assert self.dropout_seed is not None
        bh = torch.arange(self.batch * self.q_heads, device=device).view(-1, 1, 1)
        rows = torch.arange(i0, i1, device=device).view(1, -1, 1)
        cols = torch.arange(j0, j1, device=device).view(1, 1, -1)
        keep = keep_mask(self.dropout_seed, bh, rows, cols, self.dropout_p)
        return keep.view(self.batch, self.q_heads, i1 - i0, j1 - j0)
