"""See what attention does: record it from models, label heads, explain beyond raw weights.

* `record`: capture per-layer `attnkit.AttentionStats` (and small full maps) from attnkit
  modules, Hugging Face ``transformers`` models and ``torch.nn.MultiheadAttention``.
"""

from attnkit.inspect.record import LayerRecord, Recording, UnsupportedModelError, record

__all__ = ["LayerRecord", "Recording", "UnsupportedModelError", "record"]
