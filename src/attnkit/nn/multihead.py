"""`MultiheadAttention`: a drop-in for `torch.nn.MultiheadAttention` computed by `attnkit.attention`.

Same constructor, same forward, same parameter names (so state dicts load both ways),
same mask conventions (bool True = masked *out*, float = added to the scores), same
return values. Two differences, both deliberate:

* a query that may attend to no key gets output 0 and weights 0, where torch gives NaN;
* with ``need_weights=False`` nothing of size ``Lq x Lk`` is built unless the caller's
  ``attn_mask`` already is one: a ``key_padding_mask (N, S)`` travels to the kernel as a
  ``(N, 1, 1, S)`` mask and is never expanded.

It computes through ``attnkit.attention(..., caller=self)``, so an installed `attnkit.hooks`
hook sees (and may swap) every call, with or without ``need_weights``.

Shape legend: ``N`` batch, ``L`` target (query) length, ``S`` source (key) length,
``E`` embed_dim, ``H`` num_heads, ``D = E / H``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit import hooks
from attnkit.functional import attention, attention_weights, build_spec
from attnkit.masks import to_additive
from attnkit.options import AttentionOptions

__all__ = ["MultiheadAttention", "merge_masks", "torch_mha_mask"]


def _keep_attnkit_in_charge(module: nn.Module, args: tuple) -> None:
    """A forward pre-hook that changes nothing; its presence turns torch's encoder fast path off."""
    return None


def merge_masks(a: Tensor | None, b: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Combine two attnkit masks (bool True = may attend, or float added; None = none) into one.

    bool & bool stays bool (allowed where both allow); otherwise the sum of their additive
    forms in ``dtype``. The shapes broadcast against each other.
    """
    if a is None or b is None:
        return a if b is None else b
    if a.dtype == torch.bool and b.dtype == torch.bool:
        return a & b
    return to_additive(a, dtype) + to_additive(b, dtype)


def _to_allowed(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """torch's convention (bool True = masked out, float added) to attnkit's (bool True = may attend)."""
    return ~mask if mask.dtype == torch.bool else mask.to(dtype)


def torch_mha_mask(
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    *,
    batch: int,
    heads: int,
    q_len: int,
    kv_len: int,
    dtype: torch.dtype,
    appended: int = 0,
    causal: bool = False,
) -> Tensor | None:
    """``torch.nn.MultiheadAttention``'s two masks as one attnkit mask (None when both are None).

    Args:
        key_padding_mask: ``(N, S)``; bool True = ignore that key, float = added to its scores.
        attn_mask: ``(L, S)`` or ``(N * H, L, S)``; bool True = not allowed, float = added.
        batch, heads, q_len, kv_len: ``N``, ``H``, ``L``, ``S`` (keys before any appended one).
        dtype: the float dtype of a mixed (bool and float) or float result.
        appended: keys appended after the ``S`` (``bias_k``, ``add_zero_attn``): every query may
            attend to them.
        causal: ``attn_mask`` is the causal mask and the caller computes it as attnkit's
            ``causal=True`` (torch's ``is_causal`` hint): its shape is checked, its values not read.

    Returns:
        attnkit's convention (bool True = may attend, or float added), broadcastable to
        ``(N, H, L, S + appended)``: the padding mask travels as ``(N, 1, 1, S')`` and is
        never expanded; bool masks stay bool.
    """
    N, H, L, S = batch, heads, q_len, kv_len
    kpm = None
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (N, S):
            raise ValueError(
                f"MultiheadAttention: key_padding_mask must have shape (N, S) = {(N, S)}, "
                f"got {tuple(key_padding_mask.shape)}"
            )
        kpm = _to_allowed(key_padding_mask, dtype).view(N, 1, 1, S)  # (N, 1, 1, S)
    mask = None
    if attn_mask is not None:
        if attn_mask.dim() == 2 and tuple(attn_mask.shape) == (L, S):
            mask = _to_allowed(attn_mask, dtype)  # (L, S)
        elif attn_mask.dim() == 3 and tuple(attn_mask.shape) == (N * H, L, S):
            mask = _to_allowed(attn_mask, dtype).view(N, H, L, S)  # (N, H, L, S)
        else:
            raise ValueError(
                f"MultiheadAttention: attn_mask must have shape (L, S) = {(L, S)} or (N * num_heads, L, S) = "
                f"{(N * H, L, S)}, got {tuple(attn_mask.shape)}"
            )
        if causal:
            mask = None
    if appended:  # one allowed column per appended key
        kpm, mask = (
            None if m is None else F.pad(m, (0, appended), value=True if m.dtype == torch.bool else 0.0)
            for m in (kpm, mask)
        )
    return merge_masks(mask, kpm, dtype)


def _weights(q: Tensor, k: Tensor, options: AttentionOptions) -> Tensor:
    """The attention weights ``(N, H, L, S)`` of ``q (N, H, L, D)``, ``k (N, H, S, D)``, in the accumulation dtype.

    The same values as `attnkit.attention_weights` (the scores come from the one definition,
    `AttentionSpec.scores`), computed in the fewest passes over the ``L x S`` matrix so that
    ``need_weights=True`` costs what torch's own path costs: PyTorch's fused softmax, then
    zeros for the rows with no allowed key (where softmax gives NaN), only when a mask or
    causal alignment can produce such rows. ``options.dropout_p`` is not applied.
    """
    kwargs = options.kwargs(dropout=False)
    spec = build_spec(q, k, None, **kwargs)
    may_be_empty = spec.mask is not None or spec.has_structure_mask
    if may_be_empty and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        # softmax's gradient is NaN on an all -inf row; the reference's is 0 there
        return attention_weights(q, k, **kwargs)
    if may_be_empty or spec.has_bias or spec.softcap is not None or spec.kv_heads != spec.q_heads:
        scores, _ = spec.scores(q, k, 0, 0)  # (N, H, L, S): scaled, biased, masked with -inf
    else:  # plain scores q·kᵀ·scale; scaling q (L x D) rather than the scores saves a pass over L x S
        acc = spec.acc_dtype
        scores = torch.matmul(q.to(acc) * spec.scale, k.to(acc).transpose(-1, -2))  # (N, H, L, S)
    p = torch.softmax(scores, dim=-1)
    if may_be_empty:
        p = p.nan_to_num_(0.0)  # a row of all -inf: weights 0, as attnkit defines it
    return p


class MultiheadAttention(nn.Module):
    """Multi-head attention with `torch.nn.MultiheadAttention`'s interface, through `attnkit.attention`.

    Args:
        embed_dim: ``E``, the width of the queries and of the output.
        num_heads: ``H``; must divide ``embed_dim``.
        dropout: dropout on the attention weights while training.
        bias: biases on the input and output projections.
        add_bias_kv: learn one extra key and value appended to the sequence (``bias_k``, ``bias_v``).
        add_zero_attn: append a key and value of zeros (after the heads are split).
        kdim: width of ``key`` (default ``embed_dim``).
        vdim: width of ``value`` (default ``embed_dim``).
        batch_first: inputs and outputs are ``(N, L, E)`` rather than ``(L, N, E)``.

    Parameters have torch's names: ``in_proj_weight (3E, E)`` and ``in_proj_bias (3E,)``, or
    ``q_proj_weight (E, E)``, ``k_proj_weight (E, kdim)``, ``v_proj_weight (E, vdim)`` when
    ``kdim``/``vdim`` differ from ``E``; ``out_proj`` a ``Linear(E, E)``; ``bias_k, bias_v (1, 1, E)``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(
                f"MultiheadAttention: embed_dim and num_heads must be > 0, got embed_dim={embed_dim}, "
                f"num_heads={num_heads}"
            )
        if embed_dim % num_heads != 0:
            raise ValueError(
                f"MultiheadAttention: embed_dim must be divisible by num_heads, got embed_dim={embed_dim}, "
                f"num_heads={num_heads}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"MultiheadAttention: dropout must lie in [0, 1), got {dropout!r}")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        self.add_zero_attn = add_zero_attn
        # torch's TransformerEncoderLayer, in eval mode without grad, computes attention with its
        # own fused kernel from this module's weights, bypassing forward (and reaching for methods
        # only torch's module has), unless some module of the layer carries a hook. This no-op
        # pre-hook keeps attnkit's attention (its semantics, its hooks) in charge there.
        self.register_forward_pre_hook(_keep_attnkit_in_charge)
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **factory))
            self.k_proj_weight = nn.Parameter(torch.empty(embed_dim, self.kdim, **factory))
            self.v_proj_weight = nn.Parameter(torch.empty(embed_dim, self.vdim, **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
            self.bias_v = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
        else:
            self.bias_k = self.bias_v = None
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """torch's initialisation: Xavier-uniform projections, zero biases, Xavier-normal bias_k/v."""
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            nn.init.xavier_uniform_(self.q_proj_weight)
            nn.init.xavier_uniform_(self.k_proj_weight)
            nn.init.xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)

    # ------------------------------------------------------------------ pieces
    def _project(
        self, query: Tensor, key: Tensor, value: Tensor, *, self_attention: bool, shared_kv: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``query (N, L, E)``, ``key (N, S, kdim)``, ``value (N, S, vdim)`` -> ``q (N, L, E)``, ``k, v (N, S, E)``.

        ``self_attention``: query, key and value are one tensor (one matmul); ``shared_kv``: key is value.
        """
        E = self.embed_dim
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else b.split(E)
        if self._qkv_same_embed_dim:
            w = self.in_proj_weight
            if self_attention:  # one matmul
                return F.linear(query, w, b).chunk(3, dim=-1)  # 3 x (N, L, E)
            wq, wkv = w.split([E, 2 * E])
            q = F.linear(query, wq, bq)
            if shared_kv:
                k, v = F.linear(key, wkv, None if b is None else b[E:]).chunk(2, dim=-1)  # 2 x (N, S, E)
                return q, k, v
            wk, wv = wkv.split(E)
            return q, F.linear(key, wk, bk), F.linear(value, wv, bv)
        return (
            F.linear(query, self.q_proj_weight, bq),
            F.linear(key, self.k_proj_weight, bk),
            F.linear(value, self.v_proj_weight, bv),
        )

    def _check_inputs(self, query: Tensor, key: Tensor, value: Tensor) -> bool:
        """Validate the input shapes; returns whether the inputs are batched."""
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(
                "MultiheadAttention: query, key and value must all be 3-D (batched) or all 2-D (unbatched), got "
                f"query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}"
            )
        for name, x, width in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if x.shape[-1] != width:
                raise ValueError(f"MultiheadAttention: {name} must have last dim {width}, got shape {tuple(x.shape)}")
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(
                f"MultiheadAttention: key and value must share length and batch, got key {tuple(key.shape)}, "
                f"value {tuple(value.shape)}"
            )
        batch_axis = 0 if self.batch_first else 1
        if query.dim() == 3 and query.shape[batch_axis] != key.shape[batch_axis]:
            raise ValueError(
                f"MultiheadAttention: query and key batch sizes differ (batch_first={self.batch_first}): "
                f"query {tuple(query.shape)}, key {tuple(key.shape)}"
            )
        return query.dim() == 3

    # ----------------------------------------------------------------- forward
    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Attend from ``query`` to ``key``/``value``.

        Args:
            query: ``(L, N, E)``, or ``(N, L, E)`` with ``batch_first``, or ``(L, E)`` unbatched.
            key: ``(S, N, kdim)`` / ``(N, S, kdim)`` / ``(S, kdim)``.
            value: ``(S, N, vdim)`` / ``(N, S, vdim)`` / ``(S, vdim)``.
            key_padding_mask: ``(N, S)`` (or ``(S,)`` unbatched); bool True = IGNORE that key (torch's
                convention, the opposite of `attnkit.key_padding_mask`, whose True = may attend),
                float = added to its scores.
            need_weights: also return the attention weights (these are ``L x S`` by nature).
            attn_mask: ``(L, S)`` or ``(N * H, L, S)``; bool True = not allowed, float = added.
            average_attn_weights: average the returned weights over heads.
            is_causal: a hint, as in torch, that ``attn_mask`` is the causal mask; it is then
                computed as attnkit's ``causal=True`` without reading ``attn_mask``.

        Returns:
            ``attn_output`` shaped like ``query`` (last dim ``E``) and ``attn_weights``:
            ``(N, L, S)`` averaged or ``(N, H, L, S)`` per head (no ``N`` unbatched; ``S``
            counts the appended bias/zero keys), or None without ``need_weights``. The weights
            are those before dropout.
        """
        if query.is_nested or key.is_nested or value.is_nested:
            raise TypeError(
                "MultiheadAttention: nested tensors are not supported (got a NestedTensor); inside "
                "torch.nn.TransformerEncoder build it with enable_nested_tensor=False"
            )
        batched = self._check_inputs(query, key, value)
        self_attention, shared_kv = query is key and key is value, key is value  # before any view
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "MultiheadAttention: is_causal is a hint that attn_mask is the causal mask; pass attn_mask too "
                "(as torch.nn.MultiheadAttention requires)"
            )
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)  # (L, 1, E) ...
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)  # (1, S)
            # an unbatched (H, L, S) attn_mask is already (N * H, L, S) with N = 1
        if not batched or not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)  # (N, L, E) ...
        N, L, _ = query.shape
        S = key.shape[1]
        H, D = self.num_heads, self.head_dim
        appended = int(self.bias_k is not None) + int(self.add_zero_attn)  # keys added after the S
        causal = bool(is_causal) and L == S and not appended
        mask = torch_mha_mask(
            key_padding_mask, attn_mask, batch=N, heads=H, q_len=L, kv_len=S, dtype=query.dtype, appended=appended,
            causal=causal,
        )  # fmt: skip

        q, k, v = self._project(query, key, value, self_attention=self_attention, shared_kv=shared_kv)
        # q (N, L, E), k and v (N, S, E)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(N, 1, -1)], dim=1)  # (N, S + 1, E)
            v = torch.cat([v, self.bias_v.expand(N, 1, -1)], dim=1)  # (N, S + 1, E)
        q = q.view(N, L, H, D).transpose(1, 2)  # (N, H, L, D)
        k = k.view(N, -1, H, D).transpose(1, 2)  # (N, H, S', D)
        v = v.view(N, -1, H, D).transpose(1, 2)  # (N, H, S', D)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(N, H, 1, D)], dim=2)  # (N, H, S' + 1, D)
            v = torch.cat([v, v.new_zeros(N, H, 1, D)], dim=2)  # (N, H, S' + 1, D)
        options = AttentionOptions(causal=causal, mask=mask, dropout_p=self.dropout if self.training else 0.0)
        weights = None
        if need_weights:
            p = _weights(q, k, options)  # (N, H, L, S'), before dropout
            weights = p.to(query.dtype)
            if options.dropout_p > 0 or hooks.active():
                # an installed hook (a recorder, ring attention) sees the call and may swap the
                # output; dropout, which the weights returned here do not include, needs it too
                out = attention(q, k, v, **options.kwargs(), caller=self)  # (N, H, L, D)
            else:  # the output is the weights applied to the values: one matmul more, as in torch
                out = torch.matmul(p, v.to(p.dtype)).to(query.dtype)  # (N, H, L, D)
            if average_attn_weights:
                weights = weights.mean(dim=1)  # (N, L, S')
        else:
            out = attention(q, k, v, **options.kwargs(), caller=self)  # (N, H, L, D)
        out = out.transpose(1, 2).reshape(N, L, H * D)  # (N, L, E)
        out = self.out_proj(out)
        if not batched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        if not self.batch_first:
            out = out.transpose(0, 1)  # (L, N, E)
        return out, weights
