"""Attention modules built on `attnkit.attention`: a torch-compatible MultiheadAttention,
self- and cross-attention, positions, a KV cache and Transformer stacks."""

from attnkit.nn.attention import CrossAttention, SelfAttention
from attnkit.nn.cache import KVCache
from attnkit.nn.multihead import MultiheadAttention
from attnkit.nn.patch import PatchEmbedding
from attnkit.nn.positions import LearnedPositions, RotaryEmbedding, SinusoidalPositions, sinusoidal_table
from attnkit.nn.transformer import (
    FeedForward,
    LanguageModel,
    Transformer,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)

__all__ = [
    "CrossAttention",
    "FeedForward",
    "KVCache",
    "LanguageModel",
    "LearnedPositions",
    "MultiheadAttention",
    "PatchEmbedding",
    "RotaryEmbedding",
    "SelfAttention",
    "SinusoidalPositions",
    "Transformer",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "sinusoidal_table",
]
