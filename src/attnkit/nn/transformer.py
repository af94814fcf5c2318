"""Transformer stacks built from `SelfAttention`, `CrossAttention` and a feed-forward block.

Shape legend: ``B`` batch, ``L`` target length, ``Ls`` source (context) length, ``dim`` model
width, ``V`` vocabulary.

* `TransformerEncoderLayer` / `TransformerDecoderLayer`: pre-norm (``norm="pre"``, as GPT-2 and
  most modern models: ``x + f(norm(x))``) or post-norm (``norm="post"``, Vaswani et al. 2017 and
  BERT: ``norm(x + f(x))``).
* `TransformerEncoder`, `TransformerDecoder`, the encoder-decoder `Transformer`, and
  `LanguageModel`, a decoder-only model with token-by-token decoding through `KVCache`.

Attention options (``kv_heads``, ``head_dim``, ``causal``, ``window``, ``positions``, ``qk_norm``)
are passed through to `SelfAttention` unchanged.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit.nn.attention import CrossAttention, SelfAttention
from attnkit.nn.cache import KVCache
from attnkit.nn.positions import LearnedPositions, SinusoidalPositions

__all__ = [
    "FeedForward",
    "LanguageModel",
    "Transformer",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
]

Activation = Literal["gelu", "gelu_tanh", "relu", "silu", "swiglu"]
Norm = Literal["pre", "post"]


class FeedForward(nn.Module):
    """``dim -> hidden -> dim`` with an activation; ``"swiglu"`` is the gated form of Shazeer (2020).

    ``x (B, L, dim)`` -> ``(B, L, dim)``.
    """

    def __init__(self, dim: int, hidden: int, *, activation: Activation = "gelu", bias: bool = True) -> None:
        super().__init__()
        if activation not in ("gelu", "gelu_tanh", "relu", "silu", "swiglu"):
            raise ValueError(
                f"FeedForward: activation must be gelu, gelu_tanh, relu, silu or swiglu, got {activation!r}"
            )
        self.activation = activation
        self.up = nn.Linear(dim, hidden, bias=bias)
        self.gate = nn.Linear(dim, hidden, bias=bias) if activation == "swiglu" else None
        self.down = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.up(x)  # (B, L, hidden)
        if self.activation == "swiglu":
            h = F.silu(self.gate(x)) * h
        elif self.activation == "gelu":
            h = F.gelu(h)
        elif self.activation == "gelu_tanh":
            h = F.gelu(h, approximate="tanh")
        elif self.activation == "relu":
            h = F.relu(h)
        else:
            h = F.silu(h)
        return self.down(h)


def _check_norm(norm: str) -> None:
    if norm not in ("pre", "post"):
        raise ValueError(f"norm must be 'pre' or 'post', got {norm!r}")


def _cache_window(attn: SelfAttention, max_len: int) -> int | None:
    """The window a layer's `KVCache` must keep; None when it spans the whole cache anyway."""
    left = attn.window_left
    return left if left is not None and left < max_len else None


class TransformerEncoderLayer(nn.Module):
    """Self-attention and feed-forward, each in a residual block.

    Args:
        dim: model width.
        heads: query heads.
        ff_dim: feed-forward width (default ``4 * dim``).
        norm: ``"pre"`` or ``"post"`` layer norm.
        activation: feed-forward activation.
        dropout: on the attention weights and on each residual branch, while training.
        norm_eps: LayerNorm epsilon.
        bias: biases on every projection.
        **attention: `SelfAttention` options (kv_heads, head_dim, causal, window, positions, qk_norm).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        ff_dim: int | None = None,
        norm: Norm = "pre",
        activation: Activation = "gelu",
        dropout: float = 0.0,
        norm_eps: float = 1e-5,
        bias: bool = True,
        **attention: Any,
    ) -> None:
        super().__init__()
        _check_norm(norm)
        self.norm_first = norm == "pre"
        self.attn = SelfAttention(dim, heads, dropout=dropout, bias=bias, **attention)
        self.ff = FeedForward(dim, ff_dim or 4 * dim, activation=activation, bias=bias)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        *,
        padding_mask: Tensor | None = None,
        mask: Tensor | None = None,
        cache: KVCache | None = None,
        return_weights: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``x (B, L, dim)`` -> ``(B, L, dim)``; with ``return_weights`` also ``(B, H, L, Lk)``.

        ``padding_mask``, ``mask`` and ``cache`` as in `SelfAttention.forward`.
        """
        weights = None

        def attend(h: Tensor) -> Tensor:
            nonlocal weights
            out = self.attn(h, padding_mask=padding_mask, mask=mask, cache=cache, return_weights=return_weights)
            if return_weights:
                out, weights = out
            return self.drop(out)

        if self.norm_first:
            x = x + attend(self.norm1(x))
            x = x + self.drop(self.ff(self.norm2(x)))
        else:
            x = self.norm1(x + attend(x))
            x = self.norm2(x + self.drop(self.ff(x)))
        return (x, weights) if return_weights else x


class TransformerDecoderLayer(nn.Module):
    """Causal self-attention, cross-attention to a context, and feed-forward.

    Args as `TransformerEncoderLayer`, plus ``context_dim`` (the context's width, default ``dim``).
    The self-attention is causal unless ``causal=False`` is passed.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        context_dim: int | None = None,
        ff_dim: int | None = None,
        norm: Norm = "pre",
        activation: Activation = "gelu",
        dropout: float = 0.0,
        norm_eps: float = 1e-5,
        bias: bool = True,
        **attention: Any,
    ) -> None:
        super().__init__()
        _check_norm(norm)
        self.norm_first = norm == "pre"
        attention.setdefault("causal", True)
        self.self_attn = SelfAttention(dim, heads, dropout=dropout, bias=bias, **attention)
        cross = {k: attention[k] for k in ("kv_heads", "head_dim", "qk_norm") if k in attention}
        self.cross_attn = CrossAttention(dim, heads, context_dim=context_dim, dropout=dropout, bias=bias, **cross)
        self.ff = FeedForward(dim, ff_dim or 4 * dim, activation=activation, bias=bias)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.norm3 = nn.LayerNorm(dim, eps=norm_eps)
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None,
        *,
        padding_mask: Tensor | None = None,
        context_mask: Tensor | None = None,
        cache: KVCache | None = None,
        context_cache: KVCache | None = None,
    ) -> Tensor:
        """``x (B, L, dim)``, ``context (B, Ls, context_dim)`` -> ``(B, L, dim)``.

        ``cache`` holds the self-attention keys; ``context_cache`` the projected context
        (filled on the first step, after which ``context`` may be None).
        """

        def self_block(h: Tensor) -> Tensor:
            return self.drop(self.self_attn(h, padding_mask=padding_mask, cache=cache))

        def cross_block(h: Tensor) -> Tensor:
            return self.drop(self.cross_attn(h, context, context_mask=context_mask, cache=context_cache))

        if self.norm_first:
            x = x + self_block(self.norm1(x))
            x = x + cross_block(self.norm2(x))
            x = x + self.drop(self.ff(self.norm3(x)))
        else:
            x = self.norm1(x + self_block(x))
            x = self.norm2(x + cross_block(x))
            x = self.norm3(x + self.drop(self.ff(x)))
        return x


class TransformerEncoder(nn.Module):
    """``depth`` encoder layers; pre-norm stacks end with a final LayerNorm.

    Layer arguments (``ff_dim``, ``norm``, ``activation``, ``dropout``, attention options...) as in
    `TransformerEncoderLayer`.
    """

    def __init__(self, dim: int, heads: int, depth: int, **layer: Any) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"TransformerEncoder: depth must be >= 1, got {depth}")
        self.layers = nn.ModuleList(TransformerEncoderLayer(dim, heads, **layer) for _ in range(depth))
        pre = layer.get("norm", "pre") == "pre"
        self.norm = nn.LayerNorm(dim, eps=layer.get("norm_eps", 1e-5)) if pre else None

    def forward(
        self, x: Tensor, *, padding_mask: Tensor | None = None, return_weights: bool = False
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """``x (B, L, dim)`` -> ``(B, L, dim)``; with ``return_weights`` also one ``(B, H, L, L)`` per layer."""
        all_weights = []
        for layer in self.layers:
            x = layer(x, padding_mask=padding_mask, return_weights=return_weights)
            if return_weights:
                x, w = x
                all_weights.append(w)
        if self.norm is not None:
            x = self.norm(x)
        return (x, all_weights) if return_weights else x


class TransformerDecoder(nn.Module):
    """``depth`` decoder layers; pre-norm stacks end with a final LayerNorm."""

    def __init__(self, dim: int, heads: int, depth: int, **layer: Any) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"TransformerDecoder: depth must be >= 1, got {depth}")
        self.layers = nn.ModuleList(TransformerDecoderLayer(dim, heads, **layer) for _ in range(depth))
        pre = layer.get("norm", "pre") == "pre"
        self.norm = nn.LayerNorm(dim, eps=layer.get("norm_eps", 1e-5)) if pre else None

    def new_cache(self, max_len: int, *, context_len: int) -> list[tuple[KVCache, KVCache]]:
        """One ``(self-attention, cross-attention)`` cache pair per layer.

        ``max_len`` target tokens; ``context_len`` the context's length (its keys are cached once).
        """
        return [
            (KVCache(max_len, window=_cache_window(layer.self_attn, max_len)), KVCache(context_len))
            for layer in self.layers
        ]

    def forward(
        self,
        x: Tensor,
        context: Tensor | None,
        *,
        padding_mask: Tensor | None = None,
        context_mask: Tensor | None = None,
        cache: list[tuple[KVCache, KVCache]] | None = None,
    ) -> Tensor:
        """``x (B, L, dim)``, ``context (B, Ls, context_dim)`` -> ``(B, L, dim)``."""
        if cache is not None and len(cache) != len(self.layers):
            raise ValueError(f"TransformerDecoder: cache must hold {len(self.layers)} layer caches, got {len(cache)}")
        for i, layer in enumerate(self.layers):
            self_cache, context_cache = cache[i] if cache is not None else (None, None)
            x = layer(
                x, context, padding_mask=padding_mask, context_mask=context_mask,
                cache=self_cache, context_cache=context_cache,
            )  # fmt: skip
        return self.norm(x) if self.norm is not None else x


class Transformer(nn.Module):
    """Encoder-decoder Transformer (Vaswani et al., 2017) over embeddings, as `torch.nn.Transformer`.

    ``src (B, Ls, dim)``, ``tgt (B, L, dim)`` -> ``(B, L, dim)``; the decoder's self-attention
    is causal. Layer arguments are shared by both stacks.
    """

    def __init__(self, dim: int, heads: int, *, encoder_depth: int = 6, decoder_depth: int = 6, **layer: Any):
        super().__init__()
        self.encoder = TransformerEncoder(dim, heads, encoder_depth, **layer)
        self.decoder = TransformerDecoder(dim, heads, decoder_depth, **layer)

    def forward(
        self,
        src: Tensor,
        tgt: Tensor,
        *,
        src_padding_mask: Tensor | None = None,
        tgt_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Padding masks are ``(B, Ls)`` / ``(B, L)`` bool, True for real tokens."""
        memory = self.encoder(src, padding_mask=src_padding_mask)  # (B, Ls, dim)
        return self.decoder(tgt, memory, padding_mask=tgt_padding_mask, context_mask=src_padding_mask)


class LanguageModel(nn.Module):
    """A decoder-only language model: token embedding, causal pre-norm layers, tied output head.

    Args:
        vocab_size: tokens in the vocabulary.
        dim: model width.
        heads: query heads.
        depth: layers.
        positions: ``"rope"`` and ``"alibi"`` inside attention; ``"learned"`` or ``"sinusoidal"``
            added to the embeddings (``"learned"`` needs ``max_len``).
        max_len: longest sequence for learned positions.
        tie_embeddings: share the output head with the token embedding.
        **layer: `TransformerEncoderLayer` arguments (ff_dim, activation, dropout, kv_heads,
            window, qk_norm, ...); the self-attention is always causal.
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        heads: int,
        depth: int,
        *,
        positions: Literal["rope", "alibi", "learned", "sinusoidal"] | None = "rope",
        max_len: int | None = None,
        tie_embeddings: bool = True,
        **layer: Any,
    ) -> None:
        super().__init__()
        if "causal" in layer or "norm" in layer:
            raise ValueError("LanguageModel: the layers are always causal and pre-norm; do not pass causal or norm")
        self.embed = nn.Embedding(vocab_size, dim)
        nn.init.normal_(self.embed.weight, std=0.02)  # GPT-2's initialisation (Radford et al., 2019)
        self.absolute: nn.Module | None = None
        attention_positions = None
        if positions in ("rope", "alibi"):
            attention_positions = positions
        elif positions == "learned":
            if max_len is None:
                raise ValueError("LanguageModel: positions='learned' needs max_len")
            self.absolute = LearnedPositions(max_len, dim)
        elif positions == "sinusoidal":
            self.absolute = SinusoidalPositions(dim)
        elif positions is not None:
            raise ValueError(
                f"LanguageModel: positions must be 'rope', 'alibi', 'learned', 'sinusoidal' or None, got {positions!r}"
            )
        self.layers = nn.ModuleList(
            TransformerEncoderLayer(dim, heads, causal=True, positions=attention_positions, **layer)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=layer.get("norm_eps", 1e-5))
        self.head = nn.Linear(dim, vocab_size, bias=False)
        if tie_embeddings:
            self.head.weight = self.embed.weight

    def new_cache(self, max_len: int) -> list[KVCache]:
        """One `KVCache` per layer; windowed layers keep only what their window needs."""
        return [KVCache(max_len, window=_cache_window(layer.attn, max_len)) for layer in self.layers]

    def forward(
        self, tokens: Tensor, *, padding_mask: Tensor | None = None, cache: list[KVCache] | None = None
    ) -> Tensor:
        """``tokens (B, L)`` -> logits ``(B, L, V)``.

        With ``cache`` (from `new_cache`), ``tokens`` are the next tokens of the sequences the
        cache holds; decoding token by token gives the logits of one full causal pass.
        ``padding_mask (B, L)``: True for the real tokens of ``tokens`` (left-pad batched prompts;
        the cache remembers it). With RoPE or ALiBi, which see only relative positions, a
        left-padded sequence gets the logits it would get alone.
        """
        if tokens.dim() != 2:
            raise ValueError(f"LanguageModel: tokens must be (B, L), got shape {tuple(tokens.shape)}")
        if cache is not None and len(cache) != len(self.layers):
            raise ValueError(f"LanguageModel: cache must hold {len(self.layers)} KVCaches, got {len(cache)}")
        x = self.embed(tokens)  # (B, L, dim)
        if self.absolute is not None:
            x = self.absolute(x, offset=0 if cache is None else cache[0].position)
        for i, layer in enumerate(self.layers):
            x = layer(x, padding_mask=padding_mask, cache=None if cache is None else cache[i])
        return self.head(self.norm(x))  # (B, L, V)

    @torch.no_grad()
    def generate(
        self,
        prompt: Tensor,
        max_new_tokens: int,
        *,
        padding_mask: Tensor | None = None,
        temperature: float | None = None,
    ) -> Tensor:
        """Continue ``prompt (B, Lp)`` by ``max_new_tokens`` tokens using a KV cache.

        ``padding_mask (B, Lp)`` marks the real prompt tokens of left-padded prompts.
        ``temperature=None`` is greedy decoding; otherwise sample from ``softmax(logits / T)``.
        Returns ``(B, Lp + max_new_tokens)``.
        """
        cache = self.new_cache(prompt.shape[1] + max_new_tokens)
        logits = self(prompt, padding_mask=padding_mask, cache=cache)[:, -1]  # (B, V)
        out = [prompt]
        for step in range(max_new_tokens):
            if temperature is None:
                nxt = logits.argmax(-1, keepdim=True)  # (B, 1)
            else:
                nxt = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1)  # (B, 1)
            out.append(nxt)
            if step + 1 < max_new_tokens:
                logits = self(nxt, cache=cache)[:, -1]
        return torch.cat(out, dim=1)
