"""attnkit: exact, fast and memory-lean self-attention, the modules built on it, and tools to see what it does."""

from attnkit.backends import Backend, BackendChoice, available_backends, register_backend
from attnkit.functional import attention, attention_weights, explain_backend
from attnkit.hooks import AttentionCall, attention_hook
from attnkit.masks import alibi_slopes, key_padding_mask
from attnkit.options import AttentionOptions
from attnkit.spec import AttentionSpec
from attnkit.stats import AttentionStats, attention_stats
from attnkit.varlen import attention_varlen

__version__ = "0.1.0"

from attnkit import hooks, inspect, nn  # after the names they use

__all__ = [
    "AttentionCall",
    "AttentionOptions",
    "AttentionSpec",
    "AttentionStats",
    "Backend",
    "BackendChoice",
    "alibi_slopes",
    "attention",
    "attention_hook",
    "attention_stats",
    "attention_varlen",
    "attention_weights",
    "available_backends",
    "explain_backend",
    "hooks",
    "inspect",
    "key_padding_mask",
    "nn",
    "register_backend",
]
