"""FlashAttention's function signatures on attnkit: switching is one import line.

    # from flash_attn import flash_attn_func, flash_attn_varlen_func
    from attnkit.compat import flash_attn_func, flash_attn_varlen_func

Same arguments, defaults, layouts and return conventions as ``flash_attn`` 2.x
(``flash_attn_interface.py``, Dao et al.), computed by `attnkit.attention` /
`attnkit.attention_varlen` on every device attnkit runs on (CPU included):

* tensors are ``(B, L, H, D)`` (packed: ``(total, H, D)``), passed as `attnkit.attention`'s
  ``layout="blhd"`` (transposed views, no copy);
* ``window_size=(left, right)`` with ``-1`` for an unbounded side; ``causal=True`` is bottom-right
  aligned (query ``i`` sees keys up to ``i + seqlen_k - seqlen_q``), as in flash_attn >= 2.1;
* ``softcap=0.0`` means off; ``softmax_scale=None`` means ``1 / sqrt(D)``;
* ``alibi_slopes`` ``(H,)`` (or ``(B, H)`` with equal rows): a bias ``-slope * |i + seqlen_k - seqlen_q - j|``;
* ``return_attn_probs=True`` returns ``(out, softmax_lse, S_dmask)``: ``softmax_lse (B, H, Lq)`` (packed:
  ``(H, total_q)``) in natural log, and ``S_dmask`` the attention probabilities ``(B, H, Lq, Lk)`` (dense only,
  before dropout; flash_attn marks them "for testing only"). With dropout attnkit cannot sign-encode its
  dropout pattern in them as flash_attn does, so that combination is refused.
* ``deterministic`` is accepted and has no effect: attnkit's backward is deterministic.

Where flash_attn would give NaN for a query with no allowed key, attnkit gives 0 (its fully-masked-row rule).
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit.functional import attention, attention_weights, to_bhld
from attnkit.varlen import attention_varlen

__all__ = ["flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func", "flash_attn_varlen_func"]


def _window(window_size) -> tuple[int | None, int | None] | None:
    """flash_attn's ``(left, right)`` with -1 = unbounded, as attnkit's window (None = unbounded side)."""
    if not isinstance(window_size, tuple | list) or len(window_size) != 2:
        raise TypeError(f"flash_attn_func: window_size must be a (left, right) pair, got {window_size!r}")
    left, right = window_size
    for side in (left, right):
        if isinstance(side, bool) or not isinstance(side, int) or side < -1:
            raise ValueError(
                f"flash_attn_func: window_size sides must be ints >= -1 (-1 = unbounded), got {window_size!r}"
            )
    if left == -1 and right == -1:
        return None
    return (None if left == -1 else left, None if right == -1 else right)


def _alibi(alibi_slopes: Tensor | None) -> Tensor | None:
    """``(H,)`` slopes; ``(B, H)`` is accepted when every batch row is the same (attnkit's slopes are per head)."""
    if alibi_slopes is None:
        return None
    if not isinstance(alibi_slopes, Tensor):
        raise TypeError(
            f"flash_attn_func: alibi_slopes must be a tensor (H,) or (B, H), got {type(alibi_slopes).__name__}"
        )
    if alibi_slopes.dim() == 2:
        message = (
            "flash_attn_func: alibi_slopes of shape (B, H) with slopes that differ between batch elements are not "
            "supported (attnkit's ALiBi slopes are per head); pass (H,) slopes"
        )
        same = (alibi_slopes == alibi_slopes[:1]).all()
        if torch.compiler.is_compiling():  # a traced graph checks the values when it runs
            torch._assert_async(same, message)
        elif not bool(same):
            raise ValueError(message)
        alibi_slopes = alibi_slopes[0]
    return alibi_slopes.detach()


def _options(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes) -> dict:
    if isinstance(softcap, bool) or not isinstance(softcap, int | float) or softcap < 0:
        raise ValueError(f"flash_attn_func: softcap must be a number >= 0 (0 = off), got {softcap!r}")
    return dict(
        causal=causal,
        window=_window(window_size),
        softcap=float(softcap) if softcap > 0 else None,
        alibi=_alibi(alibi_slopes),
        scale=softmax_scale,
        dropout_p=dropout_p,
    )


def _check_layout(name: str, x: Tensor, dims: int, layout: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != dims:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"flash_attn_func: {name} must be {layout}, got {got}")


def flash_attn_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """flash_attn's ``flash_attn_func``: ``q (B, Lq, H, D)``, ``k, v (B, Lk, Hk, D)`` -> ``out (B, Lq, H, D)``.

    With ``return_attn_probs``: ``(out, softmax_lse (B, H, Lq), S_dmask (B, H, Lq, Lk))``. See the module docstring.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_layout(name, x, 4, "(batch, seqlen, nheads, headdim)")
    options = _options(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes)
    if return_attn_probs and dropout_p > 0:
        raise ValueError(
            "flash_attn_func: return_attn_probs with dropout_p > 0 is not supported (attnkit does not encode its "
            "dropout pattern in the probabilities); use dropout_p=0.0 to inspect them"
        )
    if not return_attn_probs:
        return attention(q, k, v, **options, layout="blhd")  # (B, Lq, H, Dv)
    out, lse = attention(q, k, v, **options, return_lse=True, layout="blhd")
    options.pop("dropout_p")
    probs = attention_weights(*to_bhld(q, k), **options)  # (B, H, Lq, Lk)
    return out, lse, probs


def flash_attn_kvpacked_func(
    q: Tensor,
    kv: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """flash_attn's ``flash_attn_kvpacked_func``: ``q (B, Lq, H, D)``, ``kv (B, Lk, 2, Hk, D)``."""
    _check_layout("kv", kv, 5, "(batch, seqlen, 2, nheads_k, headdim)")
    if kv.shape[2] != 2:
        raise ValueError(f"flash_attn_kvpacked_func: kv's third axis must be 2 (k, v), got {tuple(kv.shape)}")
    return flash_attn_func(
        q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
        deterministic, return_attn_probs,
    )  # fmt: skip


def flash_attn_qkvpacked_func(
    qkv: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """flash_attn's ``flash_attn_qkvpacked_func``: ``qkv (B, L, 3, H, D)``."""
    _check_layout("qkv", qkv, 5, "(batch, seqlen, 3, nheads, headdim)")
    if qkv.shape[2] != 3:
        raise ValueError(f"flash_attn_qkvpacked_func: qkv's third axis must be 3 (q, k, v), got {tuple(qkv.shape)}")
    return flash_attn_func(
        qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal, window_size, softcap,
        alibi_slopes, deterministic, return_attn_probs,
    )  # fmt: skip


def flash_attn_varlen_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: Tensor | None = None,
):
    """flash_attn's ``flash_attn_varlen_func``: packed ``q (total_q, H, D)``, ``k, v (total_k, Hk, D)``.

    Returns ``out (total_q, H, D)``; with ``return_attn_probs`` ``(out, softmax_lse (H, total_q), None)``
    (no probabilities for packed batches). A paged KV cache (``block_table``) is not supported.
    """
    if block_table is not None:
        raise ValueError("flash_attn_varlen_func: block_table (a paged KV cache) is not supported by attnkit")
    options = _options(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes)
    result = attention_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
        return_lse=return_attn_probs, **options,
    )  # fmt: skip
    if not return_attn_probs:
        return result
    out, lse = result
    return out, lse, None
