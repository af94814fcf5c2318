"""`attention()`: validate the arguments, normalise them into one `AttentionSpec`, pick a backend.

Every other part of attnkit (modules, inspection, distributed) calls this function or
the kernels beneath it with a spec built here; nothing else parses these arguments.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from attnkit import hooks
from attnkit.backends import BackendChoice, Task, choose, get_backend, scores_bytes
from attnkit.dropout import new_seed
from attnkit.kernels import nonfinite, ops, reference
from attnkit.kernels.packed import check_cu_form, check_cu_seqlens, check_same_count, packed_view
from attnkit.masks import alibi_slopes
from attnkit.options import Alibi, AttentionOptions, Window
from attnkit.spec import AttentionSpec

__all__ = [
    "Alibi",
    "Layout",
    "Window",
    "attend",
    "attention",
    "attention_weights",
    "build_spec",
    "build_varlen_spec",
    "explain_backend",
    "packed_view",
    "to_bhld",
]

# ``layout``: where the heads axis sits in q, k, v and the output.
Layout = Literal["bhld", "blhd"]

# attention_weights refuses to build a weight matrix larger than this (use attention_stats).
WEIGHTS_LIMIT_BYTES = 4 * 2**30


def _shape(x: Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def _check_qkv(q: Tensor, k: Tensor, v: Tensor | None) -> None:
    named = [("q", q), ("k", k)] + ([("v", v)] if v is not None else [])
    for name, x in named:
        if not isinstance(x, Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            layout = "(B, Hq, Lq, D)" if name == "q" else "(B, Hk, Lk, D)" if name == "k" else "(B, Hk, Lk, Dv)"
            raise ValueError(f"attention: {name} must be 4-D {layout}, got shape {_shape(x)}")
        if not x.is_floating_point():
            raise TypeError(f"attention: {name} must be a floating-point tensor, got dtype {x.dtype}")
        if min(x.shape) < 1:
            raise ValueError(f"attention: every dimension of {name} must be >= 1, got shape {_shape(x)}")
    for name, x in named[1:]:
        if x.dtype != q.dtype:
            raise TypeError(f"attention: q, k and v must share a dtype; q is {q.dtype}, {name} is {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"attention: q, k and v must be on one device; q is on {q.device}, {name} on {x.device}")
    B, Hq, _, D = q.shape
    if k.shape[0] != B or (v is not None and v.shape[0] != B):
        shapes = f"q {_shape(q)}, k {_shape(k)}" + (f", v {_shape(v)}" if v is not None else "")
        raise ValueError(f"attention: batch sizes differ: {shapes}")
    if k.shape[-1] != D:
        raise ValueError(f"attention: q and k head dims differ: q {_shape(q)} (D={D}), k {_shape(k)} (D={k.shape[-1]})")
    if v is not None and (v.shape[1] != k.shape[1] or v.shape[2] != k.shape[2]):
        raise ValueError(
            f"attention: k and v must have the same heads and length (B, Hk, Lk, .); got k {_shape(k)}, v {_shape(v)}"
        )
    Hk = k.shape[1]
    if Hq % Hk != 0:
        raise ValueError(
            f"attention: query heads Hq={Hq} must be a multiple of key/value heads Hk={Hk} "
            f"(q {_shape(q)}, k {_shape(k)})"
        )


def _check_mask(mask: Tensor, q: Tensor, target: tuple[int, int, int, int]) -> Tensor:
    """Validate a mask and return it as a 4-D view (no copy, no expansion)."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"attention: mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(
            f"attention: mask must be bool (True = may attend) or floating point (added to scores), got {mask.dtype}"
        )
    if mask.device != q.device:
        raise ValueError(f"attention: mask is on {mask.device} but q is on {q.device}")
    if mask.dim() > 4:
        raise ValueError(f"attention: mask must have at most 4 dims, broadcastable to {target}, got {_shape(mask)}")
    m = mask.reshape((1,) * (4 - mask.dim()) + _shape(mask)) if mask.dim() < 4 else mask
    for size, want, axis in zip(m.shape, target, ("B", "Hq", "Lq", "Lk"), strict=True):
        if size not in (1, want):
            raise ValueError(
                f"attention: mask of shape {_shape(mask)} does not broadcast to (B, Hq, Lq, Lk) = {target}: "
                f"its {axis} axis is {size}, expected 1 or {want}"
            )
    return m


def _check_window(window: Window) -> tuple[int | None, int | None] | None:
    if window is None:
        return None
    pair = (window, window) if isinstance(window, int) and not isinstance(window, bool) else window
    if not isinstance(pair, tuple | list) or len(pair) != 2:
        raise TypeError(f"attention: window must be an int, a (left, right) pair or None, got {window!r}")
    for side in pair:
        if side is not None and (not isinstance(side, int) or isinstance(side, bool) or side < 0):
            raise ValueError(f"attention: window sides must be non-negative ints or None, got {window!r}")
    return (pair[0], pair[1])


def _check_alibi(alibi: Alibi, q_heads: int, device: torch.device, acc: torch.dtype) -> Tensor | None:
    if alibi is None or alibi is False:
        return None
    if alibi is True:
        return alibi_slopes(q_heads, dtype=acc).to(device=device)
    if not isinstance(alibi, Tensor | Sequence) or isinstance(alibi, str | bytes):
        raise TypeError(
            f"attention: alibi must be True, False/None, or float slopes of shape (Hq,) = ({q_heads},), "
            f"got {type(alibi).__name__} {alibi!r}"
        )
    try:
        slopes = torch.as_tensor(alibi)
        if not isinstance(alibi, Tensor) and slopes.is_floating_point():
            slopes = torch.as_tensor(alibi, dtype=torch.float64)  # Python floats, not rounded to fp32 on the way
    except (TypeError, ValueError) as e:
        raise TypeError(f"attention: alibi slopes must be numbers of shape (Hq,) = ({q_heads},), got {alibi!r}") from e
    if slopes.requires_grad:
        raise ValueError("attention: alibi slopes are constants; pass a tensor that does not require grad")
    if slopes.dim() != 1 or slopes.shape[0] != q_heads or not slopes.is_floating_point():
        raise ValueError(
            f"attention: alibi must be True or float slopes of shape (Hq,) = ({q_heads},), "
            f"got {slopes.dtype} of shape {_shape(slopes)}"
        )
    return slopes.to(device=device, dtype=acc)


def _check_number(name: str, value, *, positive: bool) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"attention: {name} must be a float or None, got {value!r}")
    if not math.isfinite(value) or (positive and value <= 0):
        expected = "a finite number > 0" if positive else "a finite number"
        raise ValueError(f"attention: {name} must be {expected} (None turns it off), got {value!r}")
    return float(value)


def _check_packed(name: str, x: Tensor, layout: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"attention_varlen: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"attention_varlen: {name} must be 3-D {layout} (packed), got shape {tuple(x.shape)}")


def build_spec(
    q: Tensor,
    k: Tensor,
    v: Tensor | None,
    *,
    causal: bool = False,
    mask: Tensor | None = None,
    window: Window = None,
    alibi: Alibi = None,
    softcap: float | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> AttentionSpec:
    """Validate `attention`'s arguments and normalise them into an `AttentionSpec`.

    Public so that other entry points (statistics, ring attention) share one validation.
    """
    _check_qkv(q, k, v)
    B, Hq, Lq, D = q.shape
    _, Hk, Lk, _ = k.shape
    if not isinstance(causal, bool):
        raise TypeError(f"attention: causal must be a bool, got {causal!r}")
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    mask4 = None if mask is None else _check_mask(mask, q, (B, Hq, Lq, Lk))
    softcap = _check_number("softcap", softcap, positive=True)
    scale_f = _check_number("scale", scale, positive=False)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, int | float) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention: dropout_p must lie in [0, 1), got {dropout_p!r}")
    return AttentionSpec(
        batch=B,
        q_heads=Hq,
        kv_heads=Hk,
        q_len=Lq,
        kv_len=Lk,
        head_dim=D,
        v_head_dim=v.shape[-1] if v is not None else D,
        scale=scale_f if scale_f is not None else 1.0 / math.sqrt(D),
        causal=causal,
        window=_check_window(window),
        alibi_slopes=_check_alibi(alibi, Hq, q.device, acc),
        softcap=softcap,
        mask=mask4,
        dropout_p=float(dropout_p),
        dropout_seed=new_seed() if dropout_p > 0 else None,
        acc_dtype=acc,
    )


def build_varlen_spec(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    *,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    mask: None = None,
    **options,
) -> tuple[AttentionSpec, int, int]:
    """Validate `attnkit.attention_varlen`'s arguments: the packed spec and the longest lengths.

    The packed spec has ``batch`` = number of sequences and ``q_len``/``kv_len`` = the longest
    ones; ``q (total_q, Hq, D)``, ``k (total_k, Hk, D)``, ``v (total_k, Hk, Dv)``.
    """
    if mask is not None:
        raise ValueError(
            "attention_varlen: mask is not supported (got a mask); express per-sequence structure with "
            "cu_seqlens, causal and window, or pad the batch and call attnkit.attention with a mask"
        )
    _check_packed("q", q, "(total_q, Hq, D)")
    _check_packed("k", k, "(total_k, Hk, D)")
    _check_packed("v", v, "(total_k, Hk, Dv)")
    # Everything else through attention()'s own checks, on (1, H, total, D) views.
    spec = build_spec(packed_view(q), packed_view(k), packed_view(v), **options)
    if torch.compiler.is_compiling():
        # The values of cu_seqlens are data: the traced varlen op checks them when it runs
        # (``attnkit::varlen_forward``, same errors); max_seqlen_* are taken as given.
        check_cu_form("cu_seqlens_q", cu_seqlens_q, q.device)
        check_cu_form("cu_seqlens_k", cu_seqlens_k, q.device)
        max_q = max_seqlen_q if max_seqlen_q is not None else q.shape[0]
        max_k = max_seqlen_k if max_seqlen_k is not None else k.shape[0]
        sequences = cu_seqlens_q.shape[0] - 1
        return dataclasses.replace(spec, batch=sequences, q_len=max_q, kv_len=max_k), max_q, max_k
    cq = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
    ck = check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
    check_same_count(cq, ck)
    longest_q = max(b - a for a, b in itertools.pairwise(cq))
    longest_k = max(b - a for a, b in itertools.pairwise(ck))
    for name, given, actual in (("max_seqlen_q", max_seqlen_q, longest_q), ("max_seqlen_k", max_seqlen_k, longest_k)):
        if given is not None and given < actual:
            raise ValueError(f"attention_varlen: {name}={given} is shorter than the longest sequence ({actual})")
    max_q = max_seqlen_q if max_seqlen_q is not None else longest_q
    max_k = max_seqlen_k if max_seqlen_k is not None else longest_k
    return dataclasses.replace(spec, batch=len(cq) - 1, q_len=max_q, kv_len=max_k), max_q, max_k


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    mask: Tensor | None = None,
    window: Window = None,
    alibi: Alibi = None,
    softcap: float | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    backend: str = "auto",
    caller: object | None = None,
    layout: Layout = "bhld",
) -> Tensor | tuple[Tensor, Tensor]:
    """Exact scaled dot-product attention, with one set of semantics on every backend.

    Args:
        q: queries ``(B, Hq, Lq, D)`` (``(B, Lq, Hq, D)`` with ``layout="blhd"``; likewise ``k``, ``v``).
        k: keys ``(B, Hk, Lk, D)``; ``Hk`` must divide ``Hq`` (grouped/multi-query attention:
            query head ``h`` reads key head ``h // (Hq // Hk)``).
        v: values ``(B, Hk, Lk, Dv)``; ``Dv`` may differ from ``D``.
        causal: query ``i`` sees keys ``j <= i + Lk - Lq`` (bottom-right aligned, as
            FlashAttention >= 2.1 and KV-cache decoding; see `attnkit.masks`).
        mask: bool (True = may attend) or float (added to the scores), broadcastable to
            ``(B, Hq, Lq, Lk)``. A ``(B, 1, 1, Lk)`` padding mask is never expanded.
        window: ``(left, right)`` or an int for both: query ``i`` sees keys
            ``i' - left <= j <= i' + right`` with ``i' = i + Lk - Lq``; None = unbounded side.
        alibi: True for the standard slopes of Press et al., or slopes ``(Hq,)``; adds
            ``-slope[h] * |i' - j|``.
        softcap: ``softcap * tanh(s / softcap)`` on the scaled scores (Gemma 2, Grok).
        scale: score scale; default ``1 / sqrt(D)``. Any finite number, computed exactly on every
            backend (0 gives uniform weights over the allowed keys).
        dropout_p: dropout on the attention weights; reproducible under ``torch.manual_seed``,
            and the backward reuses the forward's pattern.
        return_lse: also return the log-sum-exp.
        backend: ``"auto"`` or a registered name (`attnkit.available_backends()`).
        caller: the module making the call, shown to hooks (`attnkit.hooks`: ``record``,
            ``context_parallel``); it never changes the result.
        layout: ``"bhld"``, heads before length (PyTorch SDPA's), or ``"blhd"``, length before heads
            (FlashAttention's and what a ``(B, L, H * D)`` projection views as): ``q (B, Lq, Hq, D)``,
            ``k (B, Lk, Hk, D)``, ``v (B, Lk, Hk, Dv)`` and ``out (B, Lq, Hq, Dv)``. The tensors are
            transposed views, never copies (every backend reads a head-dim-contiguous view; hooks see
            the ``(B, H, L, D)`` views); ``mask`` and ``lse`` keep their ``(B, Hq, Lq, ...)`` layout.

    Order of operations: scale, softcap, + ALiBi + float mask, bool/causal/window masking,
    softmax, dropout, weighted mix of ``v``. A query with no allowed key gets output 0,
    ``lse = -inf`` and zero gradients. A query row holding a NaN or an infinity, or a row that
    may attend to a key whose ``k`` or ``v`` holds one, comes out NaN (output and ``lse``); a key a
    row may not attend to is never read, so garbage there never reaches the row. Accumulation is
    fp32 (fp64 for fp64 inputs).

    Returns:
        ``out (B, Hq, Lq, Dv)`` (``(B, Lq, Hq, Dv)`` for ``"blhd"``) in ``q.dtype``; with ``return_lse``
        also ``lse (B, Hq, Lq)``, natural log, fp32 (fp64 for fp64 inputs).
    """
    if layout == "blhd":
        q, k, v = to_bhld(q, k, v)  # (B, H, L, D) views
        result = attention(
            q, k, v, causal=causal, mask=mask, window=window, alibi=alibi, softcap=softcap, scale=scale,
            dropout_p=dropout_p, return_lse=return_lse, backend=backend, caller=caller,
        )  # fmt: skip
        return (result[0].transpose(1, 2), result[1]) if return_lse else result.transpose(1, 2)  # (B, Lq, Hq, Dv)
    if layout != "bhld":
        raise ValueError(f"attention: layout must be 'bhld' (B, H, L, D) or 'blhd' (B, L, H, D), got {layout!r}")
    options = AttentionOptions(
        causal=causal, mask=mask, window=window, alibi=alibi, softcap=softcap, scale=scale, dropout_p=dropout_p
    )
    if hooks.active():  # a plain global read: no cost and no graph break when nobody listens
        call = hooks.AttentionCall(q, k, v, options, caller=caller, return_lse=return_lse, backend=backend)
        return hooks.run_hooks(call, _compute)
    return attend(q, k, v, options, return_lse=return_lse, backend=backend)


def to_bhld(*tensors: Tensor) -> tuple[Tensor, ...]:
    """``(B, L, H, D)`` tensors as ``(B, H, L, D)`` views (``layout="blhd"``), checked as 4-D first."""
    for name, x in zip("qkv", tensors, strict=False):
        if isinstance(x, Tensor) and x.dim() != 4:
            raise ValueError(f"attention: with layout='blhd' {name} must be 4-D (B, L, H, D), got shape {_shape(x)}")
    return tuple(x.transpose(1, 2) if isinstance(x, Tensor) else x for x in tensors)  # (B, H, L, D)


def _compute(call: hooks.AttentionCall) -> Tensor | tuple[Tensor, Tensor]:
    """The end of the hook chain: compute the call as given."""
    return attend(call.q, call.k, call.v, call.options, return_lse=call.return_lse, backend=call.backend)


def attend(
    q: Tensor, k: Tensor, v: Tensor, options: AttentionOptions, *, return_lse: bool = False, backend: str = "auto"
) -> Tensor | tuple[Tensor, Tensor]:
    """`attention` with typed options and without the hooks: validate, choose a backend and run it.

    What the last ``proceed`` of the hook chain runs. Library code that computes on behalf of a
    call (the forward of `attnkit.attention_stats`, Ulysses after its all-to-all) uses it, so
    that hooks see each user-level call once.
    """
    spec = build_spec(q, k, v, **options.kwargs())
    if not isinstance(return_lse, bool):
        raise TypeError(f"attention: return_lse must be a bool, got {return_lse!r}")
    choice = choose(q, spec, return_lse, backend)
    if choice.backend is None:
        raise ValueError(_refusal_message(choice))
    out, lse = run_guarded(get_backend(choice.backend).run, q, k, v, spec, return_lse)
    return (out, lse) if return_lse else out


def run_guarded(run, q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec, return_lse: bool):
    """``run(q, k, v, spec, return_lse)`` under the non-finite rule (`attnkit.kernels.nonfinite`).

    Eager calls check first and take the guarded path only for non-finite inputs. A traced call
    cannot branch on the data, so it always takes it: ``k`` and ``v`` through `nonfinite.clean`
    (the identity on finite values, gradients included) and the rows the rule names, found by
    the ``attnkit::nonfinite_rows`` op (none for finite inputs), set to NaN. Same results.
    """
    if torch.compiler.is_compiling():
        rows = ops.nonfinite_rows(q, k, v, spec)  # (B, Hq, Lq) bool
        out, lse = run(q, nonfinite.clean(k), nonfinite.clean(v), spec, return_lse)
        return nonfinite.poison(out, rows), nonfinite.poison(lse, rows)
    return nonfinite.run_guarded(run, q, k, v, spec, return_lse)


def _refusal_message(choice: BackendChoice) -> str:
    if choice.requested != "auto":
        why = choice.reasons[choice.requested]
        return (
            f"attention: backend={choice.requested!r} cannot compute this request: {why}. "
            "Use backend='auto', or 'tiled', which supports every feature."
        )
    reasons = "; ".join(f"{name}: {why}" for name, why in choice.reasons.items())
    return f"attention: no registered backend can compute this request ({reasons}); drop the unsupported option."


def explain_backend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    task: Task = "attention",
    return_lse: bool = False,
    backend: str = "auto",
    cu_seqlens_q: Tensor | None = None,
    cu_seqlens_k: Tensor | None = None,
    **options,
) -> BackendChoice:
    """Which backend would run this request, and why the others were refused. Computes nothing.

    Args:
        task: ``"attention"`` (`attention`'s arguments), ``"statistics"`` (which kernel
            `attnkit.attention_stats` runs its statistics pass on) or ``"varlen"``
            (`attnkit.attention_varlen`'s: packed ``q, k, v`` and ``cu_seqlens_q``/``cu_seqlens_k``).
        return_lse: as in `attention`.
        backend: as in `attention`.
        **options: the options of `attention` (or `attnkit.attention_varlen`).
    """
    if task == "varlen":
        if cu_seqlens_q is None or cu_seqlens_k is None:
            raise ValueError("explain_backend: task='varlen' needs cu_seqlens_q and cu_seqlens_k")
        spec, _, _ = build_varlen_spec(q, k, v, cu_seqlens_q, cu_seqlens_k, **options)
        return choose(packed_view(q), spec, return_lse, backend, task)
    if cu_seqlens_q is not None or cu_seqlens_k is not None:
        raise ValueError(f"explain_backend: cu_seqlens_q/cu_seqlens_k are for task='varlen', got task={task!r}")
    spec = build_spec(q, k, v, **options)
    return choose(q, spec, return_lse and task == "attention", backend, task)


def attention_weights(
    q: Tensor,
    k: Tensor,
    *,
    causal: bool = False,
    mask: Tensor | None = None,
    window: Window = None,
    alibi: Alibi = None,
    softcap: float | None = None,
    scale: float | None = None,
) -> Tensor:
    """The attention probabilities ``(B, Hq, Lq, Lk)`` (before dropout), from the reference kernel.

    Same arguments and semantics as `attention`; rows with no allowed key are all zero.
    Returned in fp32 (fp64 for fp64 inputs). For long inputs use `attnkit.attention_stats`,
    which never materialises this matrix.
    """
    spec = build_spec(q, k, None, causal=causal, mask=mask, window=window, alibi=alibi, softcap=softcap, scale=scale)
    if scores_bytes(spec) > WEIGHTS_LIMIT_BYTES:
        raise ValueError(
            f"attention_weights: the {(*q.shape[:3], k.shape[2])} weight matrix needs "
            f"{scores_bytes(spec) / 2**30:.1f} GiB (limit {WEIGHTS_LIMIT_BYTES / 2**30:.0f} GiB); "
            "use attnkit.attention_stats for pooled maps and statistics at this length"
        )
    p, _ = reference.attention_probs(q, k, spec)
    return p
