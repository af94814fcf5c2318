"""Attention modules built on `attnkit.attention`: a torch-compatible MultiheadAttention,
self- and cross-attention, positions, a KV cache and Transformer stacks."""

from attnkit.nn.attention import CrossAttention, SelfAttention
from attnkit.nn.cache import KVCache
from attnkit.nn.multihead import MultiheadAttention
from attnkit.nn.positions import LearnedPositions, RotaryEmbedding, SinusoidalPositions, sinusoidal_table

__all__ = [
    "CrossAttention",
    "KVCache",
    "LearnedPositions",
    "MultiheadAttention",
    "RotaryEmbedding",
    "SelfAttention",
    "SinusoidalPositions",
    "sinusoidal_table",
]
