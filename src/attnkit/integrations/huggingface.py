"""Hugging Face ``transformers``: attnkit as an attention implementation named ``"attnkit"``.

After `register()` (`attnkit.inspect.record` calls it for you)::

    model = AutoModel.from_pretrained(path, attn_implementation="attnkit")

runs every attention layer through `attnkit.attention` (the fast path: SDPA's fused
kernel or the tiled one) with the layer's module as ``caller``, so `attnkit.hooks` (and so
`attnkit.inspect.record`) see every call: the module, ``q, k, v``, the options, the output.

Two pieces are registered, as the ``transformers`` docs ask of a custom implementation
(``AttentionInterface`` and ``AttentionMaskInterface``):

* the attention function, with the contract of ``transformers.integrations.sdpa_attention``:
  it receives ``query (B, H, Lq, D)`` and ``key``/``value`` ``(B, Hk, Lk, D)`` with the
  key/value heads NOT repeated (attnkit computes grouped-query attention natively), and
  returns ``out (B, Lq, H, Dv)`` and the weights (only when ``output_attentions`` asks);
* the mask function. Without one, ``transformers`` skips mask creation for an unknown
  implementation and the causal and padding masks are silently dropped. Ours never
  builds an ``Lq x Lk`` mask for the standard patterns: it reads the pattern from the
  model's mask function (causal, bidirectional, sliding window, padding) and returns
  an `AttnkitMask` that says ``causal`` / ``window`` plus a ``(B, 1, 1, Lk)`` padding
  mask, so attnkit applies causal and window itself, tile by tile. Patterns it cannot
  express (packed sequences, image-token overlays, chunked attention, static caches with
  unused slots) fall back to the exact boolean mask of ``transformers``' own ``sdpa_mask``.

Alignment: ``transformers`` places query ``i`` at absolute position ``q_offset + i`` and key
``j`` at ``kv_offset + j``; attnkit aligns bottom-right (``i' = i + Lk - Lq``). The two agree
when ``q_offset - kv_offset == Lk - Lq`` (no cache, or a dynamic cache); otherwise the exact
boolean mask is used.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from attnkit.functional import attention, attention_weights
from attnkit.options import AttentionOptions

__all__ = ["AttnkitMask", "attnkit_attention_forward", "attnkit_mask", "register"]

log = logging.getLogger(__name__)

NAME = "attnkit"


def _transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("attnkit's Hugging Face integration needs transformers: pip install 'attnkit[hf]'") from e
    return transformers


@dataclass(frozen=True)
class AttnkitMask:
    """What the ``"attnkit"`` mask function hands to the attention function.

    Attributes:
        causal: attnkit's causal flag (bottom-right aligned).
        window: attnkit's ``(left, right)`` window or None.
        mask: ``(B, 1, 1, Lk)`` bool padding mask (True = attend), an exact ``(B, 1, Lq, Lk)``
            bool mask for patterns without a compact form, or None.
        shape: ``(B, 1, Lq, Lk)``, the shape of the mask this stands for.
    """

    causal: bool
    window: tuple[int | None, int | None] | None
    mask: Tensor | None
    shape: tuple[int, int, int, int]

    @property
    def ndim(self) -> int:
        return 4

    def to(self, *args, **kwargs) -> AttnkitMask:
        """Device moves apply to the tensor mask; dtype casts are ignored (the mask stays bool)."""
        args = [a for a in args if not isinstance(a, torch.dtype)]
        kwargs.pop("dtype", None)
        if self.mask is None or not (args or kwargs):
            return self
        return AttnkitMask(self.causal, self.window, self.mask.to(*args, **kwargs), self.shape)


# ----------------------------------------------------------------------------- masks
def _closure(fn) -> dict:
    names = fn.__code__.co_freevars
    return {n: c.cell_contents for n, c in zip(names, fn.__closure__ or ())}


def _pattern(fn) -> tuple[bool, int | None, int | None] | None:
    """``(causal, left, right)`` for the mask functions ``transformers`` builds, or None if unknown.

    ``left`` / ``right`` are in attnkit's window convention (keys ``i' - left .. i' + right``).
    """
    mu = _transformers().masking_utils
    if fn is mu.causal_mask_function:
        return True, None, None
    if fn is mu.bidirectional_mask_function:
        return False, None, None
    name = getattr(fn, "__qualname__", "")
    if name == "and_masks.<locals>.and_mask":
        causal, left, right = False, None, None
        for part in _closure(fn).get("mask_functions", ()):
            sub = _pattern(part)
            if sub is None:
                return None
            causal = causal or sub[0]
            left = sub[1] if left is None else (left if sub[1] is None else min(left, sub[1]))
            right = sub[2] if right is None else (right if sub[2] is None else min(right, sub[2]))
        return causal, left, right
    if name == "sliding_window_overlay.<locals>.inner_mask":
        return False, _closure(fn)["sliding_window"] - 1, None  # kv > q - w: w keys including itself
    if name == "sliding_window_bidirectional_overlay.<locals>.inner_mask":
        w = _closure(fn)["sliding_window"]  # |q - kv| <= w
        return False, w, w
    return None


def attnkit_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: Tensor | None = None,
    device: torch.device | str = "cpu",
    **kwargs,
) -> AttnkitMask:
    """The ``"attnkit"`` entry of ``AttentionMaskInterface`` (same signature as ``sdpa_mask``).

    Args:
        attention_mask: the ``(B, past + Lq)`` padding mask of the model's inputs, or None.

    Returns:
        `AttnkitMask`; its ``mask`` is a ``(B, 1, 1, Lk)`` padding mask for the standard
        patterns, or the exact ``(B, 1, Lq, Lk)`` mask of ``sdpa_mask`` for the others.
    """
    mu = _transformers().masking_utils
    mask_function = mu.causal_mask_function if mask_function is None else mask_function
    q_offset, kv_offset = int(q_offset), int(kv_offset)
    shape = (batch_size, 1, q_length, kv_length)
    pattern = _pattern(mask_function)
    aligned = q_offset - kv_offset == kv_length - q_length
    if pattern is not None and (aligned or (not pattern[0] and pattern[1] is None and pattern[2] is None)):
        causal, left, right = pattern
        window = None if left is None and right is None else (left, right)
        padding = None
        if attention_mask is not None:
            pad = mu.prepare_padding_mask(attention_mask.to(device=device, dtype=torch.bool), kv_length, kv_offset)
            pad = pad[:, kv_offset : kv_offset + kv_length]  # (B, Lk)
            # Dropping an all-True mask is only a shortcut; a traced graph cannot read the data, keeps it.
            if torch.compiler.is_compiling() or not bool(pad.all()):
                padding = pad[:, None, None, :]  # (B, 1, 1, Lk)
        return AttnkitMask(causal, window, padding, shape)
    for key in ("allow_is_causal_skip", "allow_is_bidirectional_skip"):
        kwargs.pop(key, None)
    full = mu.sdpa_mask(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
        mask_function=mask_function, attention_mask=attention_mask, allow_is_causal_skip=False,
        allow_is_bidirectional_skip=False, device=device, **kwargs,
    )  # fmt: skip
    return AttnkitMask(False, None, full, shape)


# ------------------------------------------------------------------------- attention
def attnkit_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: AttnkitMask | Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    sliding_window: int | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[Tensor, Tensor | None]:
    """The ``"attnkit"`` entry of ``AttentionInterface``.

    Args:
        module: the model's attention module (its ``is_causal`` is read when no mask says).
        query: ``(B, H, Lq, D)``; key: ``(B, Hk, Lk, D)``; value: ``(B, Hk, Lk, Dv)``, ``Hk | H``.
        attention_mask: an `AttnkitMask`, a 4-D tensor mask built by the model (bool, or
            float added to the scores, taken as complete, as ``sdpa_attention`` does), or None.
        dropout, scaling, softcap, sliding_window, is_causal: as ``transformers`` passes them.

    Returns:
        ``out (B, Lq, H, Dv)`` and the weights ``(B, H, Lq, Lk)`` when ``output_attentions``
        is passed true, else None.
    """
    if isinstance(attention_mask, AttnkitMask):
        causal, window, mask = attention_mask.causal, attention_mask.window, attention_mask.mask
    elif attention_mask is None:
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
        window = None
        if sliding_window is not None:
            window = (sliding_window - 1, 0 if causal else sliding_window - 1)
        mask = None
    elif isinstance(attention_mask, Tensor):
        causal, window, mask = False, None, attention_mask
        if mask.dtype != torch.bool and mask.dtype != query.dtype:
            mask = mask.to(query.dtype)
    else:
        raise TypeError(
            f"attnkit attention: attention_mask must be an AttnkitMask, a tensor or None, got "
            f"{type(attention_mask).__name__}; load the model with attn_implementation='attnkit' after "
            "attnkit.integrations.huggingface.register() so the matching mask function is used"
        )
    if causal and query.shape[2] == 1:
        causal = False  # one query at the end of the keys sees all of them (bottom-right)
    options = AttentionOptions(
        causal=causal, mask=mask, window=window, softcap=softcap, scale=scaling, dropout_p=float(dropout)
    )
    out = attention(query, key, value, **options.kwargs(), caller=module)  # (B, H, Lq, Dv)
    weights = None
    if _weights_requested(kwargs):
        weights = attention_weights(query, key, **options.kwargs(dropout=False)).to(query.dtype)
    return out.transpose(1, 2).contiguous(), weights  # (B, Lq, H, Dv)


def _weights_requested(kwargs: dict) -> bool:
    """Whether the caller asked for attention weights (``output_attentions=True``).

    Some models (GPT-2) pop the flag before calling attention and collect the weights with
    ``transformers``' output recorder instead, whose request we read from its context variable.
    """
    if kwargs.get("output_attentions", False):
        return True
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # pragma: no cover - older transformers pass the flag
        return False
    if torch.compiler.is_compiling() and not getattr(_active_collector, "compiling", False):
        # A ContextVar cannot be traced; transformers' wrapper keeps the collector in a plain
        # global once it was set while compiling (``compiling``), which is read below.
        return False
    try:
        collected = _active_collector.get()
    except LookupError:
        return False
    return isinstance(collected, dict) and ("attentions" in collected or "cross_attentions" in collected)


def register() -> None:
    """Register ``"attnkit"`` in ``AttentionInterface`` and ``AttentionMaskInterface`` (idempotent)."""
    tr = _transformers()
    tr.AttentionInterface.register(NAME, attnkit_attention_forward)
    tr.masking_utils.AttentionMaskInterface.register(NAME, attnkit_mask)
