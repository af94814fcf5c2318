"""`KVCache`: the keys and values of the tokens already seen, for token-by-token decoding.

One cache per attention layer. Each step appends the new tokens' keys and values
(after RoPE, so positions are baked in) and attends over everything held. Queries
are aligned to the end of the keys (``attnkit.attention``'s bottom-right causal and
window alignment), so a step of ``Lq`` new tokens against ``Lk`` held keys needs no
position bookkeeping beyond `position`, the RoPE offset of the next token.

With a sliding window of ``left`` keys, the cache keeps only the keys that some
future query can still see: when its buffer is full it drops the oldest ones,
keeping at least the last ``left`` before the new chunk. Dropping keys from the
front shifts every position equally, so causal, window and ALiBi, which depend on
``i - j`` only, are unchanged.

Shapes: keys ``(B, Hk, L, D)``, values ``(B, Hk, L, Dv)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["KVCache"]


class KVCache:
    """A preallocated key/value store for one attention layer.

    Args:
        max_len: most keys held at once (the buffer length). Without a window, the total
            number of tokens fed may not exceed it.
        window: the left extent of the layer's sliding window (keys a query sees behind it);
            the cache then holds at most ``max_len`` of the most recent keys and decodes
            without a length limit, as long as ``window + new tokens <= max_len``.

    Meant for inference: the buffers are written in place.
    """

    def __init__(self, max_len: int, *, window: int | None = None) -> None:
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"KVCache: max_len must be a positive int, got {max_len!r}")
        if window is not None and (not isinstance(window, int) or window < 0 or window >= max_len):
            raise ValueError(f"KVCache: window must be None or an int in [0, max_len={max_len}), got {window!r}")
        self.max_len = max_len
        self.window = window
        self.length = 0  # keys held
        self.position = 0  # tokens fed so far: the position of the next token
        self._k: Tensor | None = None
        self._v: Tensor | None = None
        self._pad: Tensor | None = None  # (B, max_len) bool, True = real token; None until padding is given

    def reset(self) -> None:
        """Forget every token (the buffers are kept for reuse)."""
        self.length = self.position = 0

    @property
    def keys(self) -> Tensor:
        """``(B, Hk, length, D)``, a view of the buffer."""
        if self._k is None:
            raise ValueError("KVCache: empty; call update() first")
        return self._k[:, :, : self.length]

    @property
    def padding(self) -> Tensor | None:
        """``(B, length)`` bool, True for real tokens, or None if no padding was ever given."""
        return None if self._pad is None else self._pad[:, : self.length]

    @property
    def values(self) -> Tensor:
        """``(B, Hk, length, Dv)``, a view of the buffer."""
        if self._v is None:
            raise ValueError("KVCache: empty; call update() first")
        return self._v[:, :, : self.length]

    def update(self, k: Tensor, v: Tensor, *, padding: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Append ``k (B, Hk, Ln, D)`` and ``v (B, Hk, Ln, Dv)``; return all held keys and values.

        ``padding (B, Ln)`` bool marks which new tokens are real (e.g. left-padded prompts);
        `padding` then covers every held key (tokens given without it count as real).

        Returns views ``(B, Hk, length, D)`` and ``(B, Hk, length, Dv)`` of the buffers.
        """
        if k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3]:
            raise ValueError(
                f"KVCache.update: k and v must be (B, Hk, L, D) with equal (B, Hk, L), got k {tuple(k.shape)}, "
                f"v {tuple(v.shape)}"
            )
        B, Hk, Ln, D = k.shape
        if (
            self._k is None
            or self._k.shape[:2] != (B, Hk)
            or self._k.shape[-1] != D
            or self._v.shape[-1] != v.shape[-1]
        ):
            if self.length:
                raise ValueError(
                    f"KVCache.update: holds keys of shape {tuple(self._k.shape[:2])} x D={self._k.shape[-1]}, "
                    f"got k {tuple(k.shape)}; call reset() to start a new sequence"
                )
            self._k = k.new_empty(B, Hk, self.max_len, D)
            self._v = v.new_empty(B, Hk, self.max_len, v.shape[-1])
            self._pad = None
        if padding is not None:
            if padding.dtype != torch.bool or tuple(padding.shape) != (B, Ln):
                raise ValueError(
                    f"KVCache.update: padding must be bool (B, Ln) = {(B, Ln)}, True for real tokens, got "
                    f"{padding.dtype} {tuple(padding.shape)}"
                )
            if self._pad is None:
                self._pad = torch.ones(B, self.max_len, dtype=torch.bool, device=k.device)
        if self.length + Ln > self.max_len:
            if self.window is None:
                raise ValueError(
                    f"KVCache.update: fed past its length: holds {self.length} of max_len={self.max_len} keys, "
                    f"got {Ln} more; make the cache longer"
                )
            keep = self.max_len - Ln  # room left for old keys beside the new chunk
            if keep < min(self.window, self.length):
                raise ValueError(
                    f"KVCache.update: a chunk of {Ln} tokens with window={self.window} needs "
                    f"{self.window + Ln} slots, max_len is {self.max_len}; feed shorter chunks"
                )
            start = self.length - keep
            self._k[:, :, :keep] = self._k[:, :, start : self.length].clone()
            self._v[:, :, :keep] = self._v[:, :, start : self.length].clone()
            if self._pad is not None:
                self._pad[:, :keep] = self._pad[:, start : self.length].clone()
            self.length = keep
        self._k[:, :, self.length : self.length + Ln] = k
        self._v[:, :, self.length : self.length + Ln] = v
        if self._pad is not None:
            self._pad[:, self.length : self.length + Ln] = True if padding is None else padding
        self.length += Ln
        self.position += Ln
        return self.keys, self.values

    def __repr__(self) -> str:
        return f"KVCache(max_len={self.max_len}, window={self.window}, length={self.length}, position={self.position})"
