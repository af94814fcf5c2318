"""attnkit: exact, fast and memory-lean self-attention, the modules built on it, and tools to see what it does."""

from attnkit import inspect  # noqa: F401  (attnkit.inspect.record, ...)
from attnkit.backends import Backend, BackendChoice, available_backends, register_backend
from attnkit.functional import attention, attention_weights, explain_backend
from attnkit.masks import alibi_slopes, key_padding_mask
from attnkit.spec import AttentionSpec
from attnkit.stats import AttentionStats, attention_stats
from attnkit.varlen import attention_varlen

__version__ = "0.1.0"

__all__ = [
    "AttentionSpec",
    "AttentionStats",
    "Backend",
    "BackendChoice",
    "alibi_slopes",
    "attention",
    "attention_stats",
    "attention_varlen",
    "attention_weights",
    "available_backends",
    "explain_backend",
    "key_padding_mask",
    "register_backend",
]
