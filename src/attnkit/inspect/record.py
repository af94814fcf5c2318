"""`record()`: capture attention statistics (and small maps) from a model while it runs.

::

    with attnkit.inspect.record(model, maps=True, tokens=tokens) as rec:
        model(**inputs)
    rec[0].stats.entropy      # (B, H, Lq) of the first attention call
    rec[0].maps               # (B, H, Lq, Lk) or None when too large
    rec.layer_names()

What can be captured, and how:

* every call of `attnkit.attention` made by a module (``caller=module``): `record`
  installs an `attnkit.hooks` hook, which sees the calling module, ``q, k, v``, the options
  and the output. attnkit's own modules (`attnkit.nn`) pass themselves as the caller.
* Hugging Face ``transformers`` models: the model runs with the ``"attnkit"`` attention
  implementation (`attnkit.integrations.huggingface`), which calls `attnkit.attention`
  with the model's attention module as the caller; a model loaded with another
  implementation is switched for the duration of the ``with`` block and switched back
  after (its outputs do not change).
* ``torch.nn.MultiheadAttention`` inside any model: a forward pre-hook recomputes
  ``q, k, v`` from the module's own input projections (``batch_first``, ``kdim``/``vdim``,
  ``bias_k``/``bias_v``, ``add_zero_attn``, both masks) and computes the statistics through
  attnkit. PyTorch's fused "fast path" (which skips the module's Python forward) is turned
  off while recording.

Statistics are computed with `attnkit.attention_stats` (exact, O(L) memory); full maps
with `attnkit.attention_weights` when ``maps`` is true and one layer's map fits in
``max_map_bytes``. With ``grads=True`` each record also gets ``grad`` ``(B, H, Lq, Lk)``,
the gradient of whatever is back-propagated with respect to the attention weights,
``dL/dp_ij = dO_i . v_j`` (O: the attention output of that head), once ``backward()`` ran,
when its map fits ``max_map_bytes``; and, at any length, ``relevance`` ``(B, Hk, Lk)``, the
gradient-weighted attention each key receives summed over the queries (and over the query
heads that share its key/value head), ``sum_h sum_i p_ij dL/dp_ij = v_j . dL/dv_j``: read from
the gradient of ``v`` alone, so it needs no ``Lq x Lk`` map (O(L) memory, exact).

Long inputs: with ``maps=False`` (or a map above ``max_map_bytes``) a layer keeps its
statistics only; `Recording.has_maps` says whether full maps exist, and everything a
report needs at any length comes from `attnkit.AttentionStats` (``received``, ``topk_*``,
``pooled`` over tiles or over a document's sections) and ``relevance``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from attnkit import hooks
from attnkit.functional import attention_weights
from attnkit.nn import CrossAttention, MultiheadAttention, SelfAttention
from attnkit.nn.multihead import torch_mha_mask
from attnkit.options import AttentionOptions
from attnkit.stats import AttentionStats, attention_stats

__all__ = ["LayerRecord", "Recording", "UnsupportedModelError", "record"]

log = logging.getLogger(__name__)

DEFAULT_MAX_MAP_BYTES = 64 * 2**20


class UnsupportedModelError(TypeError):
    """`record` found no attention it can capture in the model."""


@dataclass
class LayerRecord:
    """One attention call seen during recording.

    Attributes:
        name: the module's qualified name in the model (``"encoder.layer.0.attention.self"``);
            a module called twice gets ``"#2"`` appended on the second call.
        stats: `AttentionStats` with batched ``(B, H, ...)`` tensors, or None if not asked.
        maps: ``(B, H, Lq, Lk)`` weights (fp32), or None (not asked, or above ``max_map_bytes``).
        tokens: the tokens given to `record`, or None.
        kind: ``"attnkit"``, ``"huggingface"`` or ``"torch.nn.MultiheadAttention"``.
        grad: ``(B, H, Lq, Lk)`` ``dL/dp`` after ``backward()`` when ``grads=True`` and the map fits
            ``max_map_bytes``, else None.
        relevance: ``(B, Hk, Lk)`` ``v_j . dL/dv_j`` after ``backward()`` when ``grads=True`` (any length):
            ``sum_{h in group} sum_i p_ij dL/dp_ij``, the gradient-weighted attention key ``j`` receives.
        shape: ``(B, H, Lq, Lk)``.
    """

    name: str
    stats: AttentionStats | None
    maps: Tensor | None
    tokens: list[str] | None
    kind: str
    shape: tuple[int, int, int, int]
    grad: Tensor | None = None
    relevance: Tensor | None = None
    module: nn.Module | None = field(default=None, repr=False)
    _v: Tensor | None = field(default=None, repr=False)  # (B, H, Lk, Dv), kept only for grads


class Recording:
    """The records of one `record` block, in call order; index by position or name."""

    def __init__(self, tokens: list[str] | None = None):
        self.layers: list[LayerRecord] = []
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[LayerRecord]:
        return iter(self.layers)

    def __getitem__(self, key: int | str) -> LayerRecord:
        if isinstance(key, str):
            for layer in self.layers:
                if layer.name == key:
                    return layer
            raise KeyError(f"no recorded layer named {key!r}; recorded: {self.layer_names()}")
        return self.layers[key]

    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def has_maps(self) -> bool:
        """Whether every layer kept its full map (``maps=True`` and each map within ``max_map_bytes``)."""
        return bool(self.layers) and all(layer.maps is not None for layer in self.layers)

    def maps(self) -> Tensor:
        """``(layers, B, H, Lq, Lk)``: every layer's full map (all must have been recorded, same shape)."""
        missing = [layer.name for layer in self.layers if layer.maps is None]
        if missing or not self.layers:
            raise ValueError(
                f"Recording.maps: no full map for {missing or 'any layer'}: record with maps=True, and with a "
                "max_map_bytes the maps fit in; for long inputs use the statistics instead (layer.stats.received, "
                ".topk_*, .pooled, .segment_flow(); layer.relevance with grads=True), which need no Lq x Lk map"
            )
        return torch.stack([layer.maps for layer in self.layers])

    def grads(self) -> Tensor:
        """``(layers, B, H, Lq, Lk)``: every layer's ``dL/dp`` (record with ``grads=True``, then backward)."""
        missing = [layer.name for layer in self.layers if layer.grad is None]
        if missing or not self.layers:
            raise ValueError(
                f"Recording.grads: no gradient for {missing or 'any layer'}; record with grads=True and call "
                "backward() on the model's output inside or after the with block"
            )
        return torch.stack([layer.grad for layer in self.layers])

    def __repr__(self) -> str:
        return f"Recording({len(self.layers)} layers: {self.layer_names()[:4]}{' ...' if len(self) > 4 else ''})"


# ------------------------------------------------------------------------ recorder
class _Recorder:
    def __init__(self, model, *, maps, stats, topk, pool, max_map_bytes, grads, rec: Recording):
        self.names = {id(m): n for n, m in model.named_modules()} if isinstance(model, nn.Module) else {}
        self.any_module = model is None  # no model: the calls of every module
        self.maps, self.stats, self.topk, self.pool = maps, stats, topk, pool
        self.max_map_bytes, self.grads, self.rec = max_map_bytes, grads, rec
        self.calls: dict[str, int] = {}
        self.pending: dict[int, list[LayerRecord]] = {}  # id(torch MHA) -> records waiting for an output

    def name_of(self, module) -> str:
        base = self.names.get(id(module), type(module).__name__)
        n = self.calls.get(base, 0) + 1
        self.calls[base] = n
        return base if n == 1 else f"{base}#{n}"

    def capture(
        self, module, q: Tensor, k: Tensor, v: Tensor, options: AttentionOptions, kind: str, *, output: bool = False
    ) -> tuple[LayerRecord, Tensor | None]:
        """Record one call; with ``output``, also return the attention output from the statistics' own pass."""
        kwargs = options.kwargs(dropout=False)  # statistics and maps of the weights before dropout
        q, k, v = q.detach(), k.detach(), v.detach()
        B, H, Lq, _ = q.shape
        Lk = k.shape[2]
        st = (
            attention_stats(q, k, v, **kwargs, topk=self.topk, pool=self.pool, return_output=output)
            if self.stats
            else None
        )
        out = None
        if st is not None and output:
            out, st = st.output, dataclasses.replace(st, output=None)  # the layer keeps statistics, not the output
        weights = None
        if self.maps or self.grads:
            size = B * H * Lq * Lk * 4
            if size <= self.max_map_bytes:
                with torch.no_grad():
                    weights = attention_weights(q, k, **kwargs).float()  # (B, H, Lq, Lk)
            else:
                log.log(
                    logging.WARNING if self.maps else logging.DEBUG,
                    "record: the %s map of %s (%.0f MiB) exceeds max_map_bytes (%.0f MiB); kept statistics only",
                    (B, H, Lq, Lk), self.names.get(id(module), type(module).__name__), size / 2**20,
                    self.max_map_bytes / 2**20,
                )  # fmt: skip
        layer = LayerRecord(
            name=self.name_of(module), stats=st, maps=weights if self.maps else None, tokens=self.rec.tokens,
            kind=kind, shape=(B, H, Lq, Lk), module=module,
        )  # fmt: skip
        if self.grads and weights is not None:
            G = H // k.shape[1]
            layer._v = v.repeat_interleave(G, dim=1) if G > 1 else v  # (B, H, Lk, Dv)
        self.rec.layers.append(layer)
        return layer, out

    def watch_values(self, layer: LayerRecord, v: Tensor) -> None:
        """Fill ``layer.relevance (B, Hk, Lk) = v . dL/dv`` when backward reaches this call's ``v``."""
        if not (self.grads and v.requires_grad):
            return
        values = v.detach()

        def store(grad: Tensor) -> None:
            r = (grad.float() * values.float()).sum(-1)  # (B, Hk, Lk)
            layer.relevance = r if layer.relevance is None else layer.relevance + r

        v.register_hook(store)

    def hook(self, call: hooks.AttentionCall, proceed: hooks.Proceed) -> Any:
        """The `attnkit.hooks` hook: record the call (inputs and options), compute it, hook its output.

        Bare calls (no caller) pass unrecorded: they include the library's own, such as the
        `attnkit.attention` call inside the `attnkit.attention_stats` that records a layer.
        """
        caller = call.caller
        if caller is None or not (self.any_module or id(caller) in self.names):
            return proceed(call)  # a bare call, or another model's
        is_hf = type(caller).__module__.startswith("transformers.")
        # The statistics pass computes the output too; it stands in for the forward when nothing
        # else needs that forward: no gradient, no dropout, no backend asked for, no inner hook.
        tracked = torch.is_grad_enabled() and any(t.requires_grad for t in (call.q, call.k, call.v))
        one_pass = (
            self.stats and not self.grads and not tracked and call.options.dropout_p == 0
            and call.backend == "auto" and hooks.innermost(self.hook)
        )  # fmt: skip
        kind = "huggingface" if is_hf else "attnkit"
        layer, out = self.capture(caller, call.q, call.k, call.v, call.options, kind, output=one_pass)
        if out is not None:
            out = out.to(call.q.dtype)
            return (out, layer.stats.lse) if call.return_lse else out
        self.watch_values(layer, call.v)
        result = proceed(call)
        if layer._v is not None:
            _store_grad(layer, result[0] if call.return_lse else result)
        return result


def _store_grad(layer: LayerRecord, out_heads: Tensor) -> None:
    """Hook the attention output ``(B, H, Lq, Dv)`` of ``layer``'s call so that backward fills ``layer.grad``."""
    if not out_heads.requires_grad:
        return

    def store(grad: Tensor) -> None:
        g = torch.matmul(grad.float(), layer._v.float().transpose(-1, -2))  # (B, H, Lq, Lk): dO v^T
        layer.grad = g if layer.grad is None else layer.grad + g

    out_heads.register_hook(store)


# ------------------------------------------------------------- torch MultiheadAttention
def _mha_qkv(mha: nn.MultiheadAttention, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor, Tensor, AttentionOptions]:
    """Recompute ``q (B, H, L, D)``, ``k, v (B, H, S, D)`` and attnkit options from an MHA call's inputs."""
    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
             "is_causal")  # fmt: skip
    bound = dict(zip(names, args))
    bound.update(kwargs)
    query, key, value = bound["query"], bound["key"], bound["value"]
    batched = query.dim() == 3
    if not batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)  # (L, 1, E)
    elif mha.batch_first:
        query, key, value = (x.transpose(0, 1) for x in (query, key, value))  # (L, B, E)
    E, H = mha.embed_dim, mha.num_heads
    D = E // H
    if mha._qkv_same_embed_dim:
        w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    b_q = b_k = b_v = None
    if mha.in_proj_bias is not None:
        b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
    q = nn.functional.linear(query, w_q, b_q)  # (L, B, E)
    k = nn.functional.linear(key, w_k, b_k)  # (S, B, E)
    v = nn.functional.linear(value, w_v, b_v)  # (S, B, E)
    L, B, _ = q.shape
    S = k.shape[0]
    attn_mask, kpm = bound.get("attn_mask"), bound.get("key_padding_mask")
    if kpm is not None and not batched:
        kpm = kpm.unsqueeze(0)  # (1, S)
    if mha.bias_k is not None:  # one learned key/value appended to every sequence
        k = torch.cat([k, mha.bias_k.expand(1, B, E)])  # (S+1, B, E)
        v = torch.cat([v, mha.bias_v.expand(1, B, E)])
    if mha.add_zero_attn:  # one all-zero key/value appended after the projections
        k = torch.cat([k, k.new_zeros(1, B, E)])
        v = torch.cat([v, v.new_zeros(1, B, E)])
    q = q.view(L, B, H, D).permute(1, 2, 0, 3)  # (B, H, L, D)
    k = k.view(k.shape[0], B, H, D).permute(1, 2, 0, 3)  # (B, H, S', D)
    v = v.view(v.shape[0], B, H, D).permute(1, 2, 0, 3)  # (B, H, S', D)
    appended = k.shape[2] - S
    mask = torch_mha_mask(kpm, attn_mask, batch=B, heads=H, q_len=L, kv_len=S, dtype=q.dtype, appended=appended)
    causal = bool(bound.get("is_causal", False)) and attn_mask is None
    return q, k, v, AttentionOptions(mask=mask, causal=causal, scale=1.0 / math.sqrt(D))


def _hook_mha(recorder: _Recorder, mha: nn.MultiheadAttention, stack: contextlib.ExitStack) -> None:
    def pre(module, args, kwargs):
        with torch.no_grad():
            q, k, v, options = _mha_qkv(module, args, kwargs)
        layer, _ = recorder.capture(module, q, k, v, options, "torch.nn.MultiheadAttention")
        if layer._v is not None:
            recorder.pending.setdefault(id(module), []).append(layer)

    def post(module, args, kwargs, output):
        if not recorder.grads:
            return
        out = output[0]  # attn_output, after out_proj: (L, B, E), (B, L, E) batch_first, or (L, E)
        if not out.requires_grad:
            return
        # out = concat_h(O_h) W_o^T + b, so dL/dO_concat = dL/dout W_o: route it through an identity
        # node whose gradient we read, reshaped per head.
        E, H = module.embed_dim, module.num_heads
        pending = recorder.pending.get(id(module))
        if not pending:
            return
        layer = pending.pop(0)
        batch_first = module.batch_first and out.dim() == 3

        def store(grad: Tensor) -> None:
            g = grad if out.dim() == 3 else grad.unsqueeze(1)  # (L, B, E) or (B, L, E)
            if out.dim() == 3 and not batch_first:
                g = g.transpose(0, 1)  # (B, L, E)
            d_concat = torch.matmul(g.float(), module.out_proj.weight.float())  # (B, L, E)
            B, L, _ = d_concat.shape
            d_o = d_concat.view(B, L, H, E // H).transpose(1, 2)  # (B, H, L, D)
            gp = torch.matmul(d_o, layer._v.float().transpose(-1, -2))  # (B, H, L, S)
            layer.grad = gp if layer.grad is None else layer.grad + gp

        out.register_hook(store)

    stack.enter_context(_removing(mha.register_forward_pre_hook(pre, with_kwargs=True)))
    stack.enter_context(_removing(mha.register_forward_hook(post, with_kwargs=True)))


@contextlib.contextmanager
def _removing(handle):
    try:
        yield handle
    finally:
        handle.remove()


# ----------------------------------------------------------------------- record()
def _is_hf_model(model) -> bool:
    config = getattr(model, "config", None)
    return config is not None and hasattr(config, "_attn_implementation") and hasattr(model, "named_modules")


@contextlib.contextmanager
def _hf_attnkit(model) -> Iterator[None]:
    """Run a ``transformers`` model on the ``"attnkit"`` implementation for the block's duration."""
    from attnkit.integrations import huggingface as hf

    hf.register()
    before = model.config._attn_implementation
    if before != hf.NAME:
        family = getattr(model.config, "model_type", type(model).__name__)
        try:
            model.set_attn_implementation(hf.NAME)
        except (ValueError, AttributeError, KeyError, TypeError) as e:
            raise UnsupportedModelError(
                f"record: cannot capture the attention of {type(model).__name__} (model family {family!r}): "
                f"it does not support a custom attention implementation in transformers ({e})"
            ) from e
    try:
        yield
    finally:
        if before != hf.NAME:
            model.set_attn_implementation(before)


@contextlib.contextmanager
def record(
    model: nn.Module | None = None,
    *,
    maps: bool = False,
    stats: bool = True,
    topk: int = 8,
    pool: int = 256,
    max_map_bytes: int = DEFAULT_MAX_MAP_BYTES,
    tokens: list[str] | None = None,
    grads: bool = False,
) -> Iterator[Recording]:
    """Record attention while ``model`` runs inside the ``with`` block.

    Args:
        model: the model (attnkit modules, a ``transformers`` model, or any module holding
            ``torch.nn.MultiheadAttention``): the attnkit calls made by its modules are
            recorded. None records the `attnkit.attention` calls of every module in the
            block (``caller`` given); a bare call of `attnkit.attention` is never recorded.
        maps: also keep each layer's full ``(B, H, Lq, Lk)`` map when it fits ``max_map_bytes``.
        stats: keep `AttentionStats` per layer (``topk``, ``pool`` as in `attnkit.attention_stats`).
        tokens: token strings to attach to the records (for pictures and head roles).
        grads: keep what is needed for ``dL/dp``; call ``backward()`` and read ``layer.grad`` (when the
            map fits ``max_map_bytes``) and ``layer.relevance`` (any length; attnkit and Hugging Face
            calls, not ``torch.nn.MultiheadAttention``).

    Yields:
        a `Recording`, filled as the model runs.

    Raises:
        UnsupportedModelError: the model holds no attention that can be captured (the error
            names its class / model family).
    """
    rec = Recording(tokens)
    recorder = _Recorder(
        model, maps=maps, stats=stats, topk=topk, pool=pool, max_map_bytes=max_map_bytes, grads=grads, rec=rec
    )
    with contextlib.ExitStack() as stack:
        sources = 0
        if model is not None:
            if _is_hf_model(model):
                stack.enter_context(_hf_attnkit(model))
                sources += 1
            for module in model.modules():
                if isinstance(module, nn.MultiheadAttention) and not type(module).__module__.startswith("attnkit."):
                    _hook_mha(recorder, module, stack)
                    sources += 1
            sources += sum(isinstance(m, SelfAttention | CrossAttention | MultiheadAttention) for m in model.modules())
            if sources == 0:
                raise UnsupportedModelError(
                    f"record: found no attention to capture in {type(model).__name__}: it holds no attnkit module, "
                    "no torch.nn.MultiheadAttention and is not a transformers model; attention computed directly "
                    "with F.scaled_dot_product_attention cannot be observed (use attnkit.attention there)"
                )
            if sources and any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
                fast = torch.backends.mha.get_fastpath_enabled()
                torch.backends.mha.set_fastpath_enabled(False)  # the fused path skips the module's forward
                stack.callback(torch.backends.mha.set_fastpath_enabled, fast)
        stack.enter_context(hooks.attention_hook(recorder.hook))
        yield rec
