"""`SelfAttention` and `CrossAttention`: the modern attention layer, through `attnkit.attention`.

Shape legend: ``B`` batch, ``L`` query length, ``Lc`` context length, ``H`` query heads,
``Hk`` key/value heads (``Hk`` divides ``H``: GQA, or MQA for ``Hk = 1``), ``D`` head dim.

Every module here keeps its options in an `attnkit.AttentionOptions` and computes through
``attnkit.attention(q, k, v, **options.kwargs(), caller=self)``, so an installed
`attnkit.hooks` hook sees each call (``q, k, v`` after RoPE and qk-norm, the options, the
module and the output) and may swap the computation (ring attention does); with no hook
installed the call costs nothing more.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from attnkit.functional import attention, attention_weights
from attnkit.nn.cache import KVCache
from attnkit.nn.multihead import merge_masks
from attnkit.nn.positions import RotaryEmbedding
from attnkit.options import AttentionOptions, Window

__all__ = ["CrossAttention", "SelfAttention", "padding_to_mask"]


def padding_to_mask(padding_mask: Tensor | None, mask: Tensor | None, batch: int, kv_len: int) -> Tensor | None:
    """Combine a ``(B, Lk)`` padding mask (True = a real token) with an optional attnkit mask.

    The padding mask becomes ``(B, 1, 1, Lk)`` and is never expanded; ``mask`` is any
    mask `attnkit.attention` accepts (bool True = may attend, or float added).
    """
    pad = None
    if padding_mask is not None:
        if padding_mask.dtype != torch.bool or tuple(padding_mask.shape) != (batch, kv_len):
            raise ValueError(
                f"padding_mask must be bool (B, Lk) = {(batch, kv_len)} with True for real tokens, got "
                f"{padding_mask.dtype} {tuple(padding_mask.shape)}"
            )
        pad = padding_mask.view(batch, 1, 1, kv_len)  # (B, 1, 1, Lk)
    if mask is None or pad is None:
        return pad if mask is None else mask
    return merge_masks(mask, pad, mask.dtype)  # bool & bool, or the float mask with -inf where padded


class _Attention(nn.Module):
    """Projections, head split and merge, qk-norm: what self- and cross-attention share."""

    def __init__(
        self,
        dim: int,
        heads: int,
        kv_dim: int,
        *,
        kv_heads: int | None,
        head_dim: int | None,
        qk_norm: bool,
        dropout: float,
        bias: bool,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        kv_heads = heads if kv_heads is None else kv_heads
        if heads < 1 or kv_heads < 1:
            raise ValueError(f"{name}: heads and kv_heads must be >= 1, got heads={heads}, kv_heads={kv_heads}")
        if heads % kv_heads != 0:
            raise ValueError(f"{name}: kv_heads must divide heads, got heads={heads}, kv_heads={kv_heads}")
        if head_dim is None:
            if dim % heads != 0:
                raise ValueError(
                    f"{name}: dim must be divisible by heads (or pass head_dim), got dim={dim}, heads={heads}"
                )
            head_dim = dim // heads
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{name}: dropout must lie in [0, 1), got {dropout!r}")
        self.dim, self.heads, self.kv_heads, self.head_dim = dim, heads, kv_heads, head_dim
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(kv_dim, kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(kv_dim, kv_heads * head_dim, bias=bias)
        self.out_proj = nn.Linear(heads * head_dim, dim, bias=bias)
        # Normalising q and k per head bounds the logits (Dehghani et al., 2023, arXiv:2302.05442).
        self.q_norm = nn.RMSNorm(head_dim) if qk_norm else None
        self.k_norm = nn.RMSNorm(head_dim) if qk_norm else None
        # what this layer passes to `attnkit.attention` besides the per-call mask and dropout
        self.options = AttentionOptions()

    def _split(self, x: Tensor, heads: int) -> Tensor:
        B, L, _ = x.shape
        return x.view(B, L, heads, self.head_dim).transpose(1, 2)  # (B, heads, L, D)

    def _project_kv(self, source: Tensor) -> tuple[Tensor, Tensor]:
        k = self._split(self.k_proj(source), self.kv_heads)  # (B, Hk, Lk, D)
        v = self._split(self.v_proj(source), self.kv_heads)  # (B, Hk, Lk, D)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return k, v

    def _project_q(self, x: Tensor) -> Tensor:
        q = self._split(self.q_proj(x), self.heads)  # (B, H, L, D)
        return self.q_norm(q) if self.q_norm is not None else q

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, return_weights: bool):
        """Attention and the output projection; ``(B, L, dim)``, plus ``(B, H, L, Lk)`` weights if asked.

        ``q (B, H, L, D)``, ``k, v (B, Hk, Lk, D)``; ``mask`` is this call's attnkit mask or None.
        """
        options = self.options.replace(mask=mask, dropout_p=self.dropout if self.training else 0.0)
        out = attention(q, k, v, **options.kwargs(), caller=self)  # (B, H, L, D)
        B, H, L, D = out.shape
        out = self.out_proj(out.transpose(1, 2).reshape(B, L, H * D))  # (B, L, dim)
        if not return_weights:
            return out
        return out, attention_weights(q, k, **options.kwargs(dropout=False)).to(q.dtype)  # (B, H, L, Lk)

    def _check_x(self, name: str, x: Tensor, width: int, what: str) -> None:
        if x.dim() != 3 or x.shape[-1] != width:
            raise ValueError(f"{type(self).__name__}: {name} must be (B, L, {what}={width}), got {tuple(x.shape)}")


class SelfAttention(_Attention):
    """Multi-head self-attention with GQA/MQA, causal and sliding-window masks, RoPE or ALiBi.

    Args:
        dim: model width; input and output are ``(B, L, dim)``.
        heads: query heads ``H``.
        kv_heads: key/value heads ``Hk`` (divides ``H``); None = ``H`` (multi-head), 1 = multi-query.
        head_dim: ``D``; None = ``dim / heads``.
        causal: each token sees itself and the tokens before it.
        window: sliding window, an int (tokens seen on each side, as in `attnkit.attention`;
            with ``causal`` only the left side matters) or ``(left, right)``.
        positions: ``"rope"`` (a `RotaryEmbedding` with base 10000, half layout), a
            `RotaryEmbedding` of your own, ``"alibi"`` (the standard slopes), or None.
        qk_norm: RMSNorm on each head of ``q`` and ``k``.
        dropout: dropout on the attention weights while training.
        bias: biases on the projections.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        kv_heads: int | None = None,
        head_dim: int | None = None,
        causal: bool = False,
        window: Window = None,
        positions: Literal["rope", "alibi"] | RotaryEmbedding | None = None,
        qk_norm: bool = False,
        dropout: float = 0.0,
        bias: bool = False,
    ) -> None:
        super().__init__(
            dim, heads, dim, kv_heads=kv_heads, head_dim=head_dim, qk_norm=qk_norm, dropout=dropout, bias=bias
        )
        self.rope: RotaryEmbedding | None = None
        alibi = False
        if positions == "rope":
            self.rope = RotaryEmbedding(self.head_dim)
        elif isinstance(positions, RotaryEmbedding):
            if positions.head_dim != self.head_dim:
                raise ValueError(
                    f"SelfAttention: the RotaryEmbedding has head_dim={positions.head_dim}, the layer {self.head_dim}"
                )
            self.rope = positions
        elif positions == "alibi":
            alibi = True
        elif positions is not None:
            raise ValueError(
                f"SelfAttention: positions must be 'rope', 'alibi', a RotaryEmbedding or None, got {positions!r}"
            )
        self.options = AttentionOptions(causal=causal, window=window, alibi=True if alibi else None)

    @property
    def causal(self) -> bool:
        """Each token sees itself and the tokens before it (``self.options.causal``)."""
        return self.options.causal

    @property
    def window(self) -> Window:
        """The sliding window (``self.options.window``), None = unbounded."""
        return self.options.window

    @property
    def alibi(self) -> bool:
        """ALiBi biases with the standard slopes (``self.options.alibi``)."""
        return self.options.alibi is not None

    @property
    def window_left(self) -> int | None:
        """How far back a query sees (what a `KVCache` must keep), None = unbounded."""
        if self.window is None:
            return None
        return self.window if isinstance(self.window, int) else self.window[0]

    def forward(
        self,
        x: Tensor,
        *,
        padding_mask: Tensor | None = None,
        mask: Tensor | None = None,
        cache: KVCache | None = None,
        return_weights: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Self-attention over ``x (B, L, dim)``.

        Args:
            padding_mask: ``(B, L)`` bool, True for the real tokens of ``x``; with a cache it is
                remembered, so later steps need pass only their own tokens' mask.
            mask: any extra `attnkit.attention` mask, broadcastable to ``(B, H, L, Lk)``.
            cache: a `KVCache`: ``x`` holds the next tokens, at positions ``cache.position ..``;
                their keys and values are appended and the queries attend to all held keys.
            return_weights: also return the weights ``(B, H, L, Lk)`` (computed by
                `attnkit.attention_weights`; materialises them).

        Returns:
            ``(B, L, dim)``, and the weights with ``return_weights``.
        """
        self._check_x("x", x, self.dim, "dim")
        q = self._project_q(x)  # (B, H, L, D)
        k, v = self._project_kv(x)  # (B, Hk, L, D)
        offset = 0 if cache is None else cache.position
        if self.rope is not None:
            q, k = self.rope(q, k, offset=offset)
        if cache is not None:
            k, v = cache.update(k, v, padding=padding_mask)  # (B, Hk, Lk, D): every key held
            padding_mask = cache.padding  # (B, Lk) or None
        mask = padding_to_mask(padding_mask, mask, x.shape[0], k.shape[2])
        return self._attend(q, k, v, mask, return_weights)


class CrossAttention(_Attention):
    """Multi-head attention from ``x (B, L, dim)`` to a ``context (B, Lc, context_dim)``.

    Args:
        dim: query (and output) width.
        heads: as in `SelfAttention`, and so are ``kv_heads``, ``head_dim``, ``qk_norm``, ``dropout``
            and ``bias``.
        context_dim: the context's width; None = ``dim``.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        context_dim: int | None = None,
        kv_heads: int | None = None,
        head_dim: int | None = None,
        qk_norm: bool = False,
        dropout: float = 0.0,
        bias: bool = False,
    ) -> None:
        self_context = dim if context_dim is None else context_dim
        super().__init__(
            dim, heads, self_context, kv_heads=kv_heads, head_dim=head_dim, qk_norm=qk_norm, dropout=dropout, bias=bias
        )
        self.context_dim = self_context

    def forward(
        self,
        x: Tensor,
        context: Tensor | None,
        *,
        context_mask: Tensor | None = None,
        cache: KVCache | None = None,
        return_weights: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Attend from ``x (B, L, dim)`` to ``context (B, Lc, context_dim)``.

        Args:
            context_mask: ``(B, Lc)`` bool, True for real context tokens.
            cache: a `KVCache` for decoding: the context's keys and values are projected on
                the first call and reused afterwards (``context`` may then be None).
            return_weights: also return the weights ``(B, H, L, Lc)``.
        """
        self._check_x("x", x, self.dim, "dim")
        if cache is not None and cache.length > 0:
            k, v = cache.keys, cache.values  # (B, Hk, Lc, D)
        else:
            if context is None:
                raise ValueError("CrossAttention: context is required (None only with a filled cache)")
            self._check_x("context", context, self.context_dim, "context_dim")
            if context.shape[0] != x.shape[0]:
                raise ValueError(
                    "CrossAttention: x and context batch sizes differ: "
                    f"x {tuple(x.shape)}, context {tuple(context.shape)}"
                )
            k, v = self._project_kv(context)  # (B, Hk, Lc, D)
            if cache is not None:
                k, v = cache.update(k, v)
        q = self._project_q(x)  # (B, H, L, D)
        mask = padding_to_mask(context_mask, None, x.shape[0], k.shape[2])
        return self._attend(q, k, v, mask, return_weights)
