"""See what attention does: record it from models, label heads, explain beyond raw weights.

* `record`: capture per-layer `attnkit.AttentionStats` (and small full maps) from attnkit
  modules, Hugging Face ``transformers`` models and ``torch.nn.MultiheadAttention``.
* `head_roles`: score every head (entropy, distance, locality, previous-token, sink,
  duplicate-token, induction, rare-token) and label it (`ROLE_DESCRIPTIONS`, `THRESHOLDS`);
  `section_roles`: whether each head stays within its section or reaches across sections.
* `explain` / `rollout` / `gradient_weighted`: token saliency beyond raw weights, and
  `faithfulness`: how much removing each explanation's top tokens moves the output, versus random.
* `sections`: split a document into clauses, messages, articles, domains or paragraphs
  (`Section` spans); `token_boundaries` maps them onto token edges for ``pool=``.
* `Monitor`: every N training steps, per head: entropy, mean distance, near/far band shares
  (`band_shares`), sink share and role, with attention time and peak memory; CSV + TensorBoard.
"""

from attnkit.inspect.bands import band_shares
from attnkit.inspect.explain import Faithfulness, explain, faithfulness, gradient_weighted, raw_attention, rollout
from attnkit.inspect.monitor import Monitor
from attnkit.inspect.record import LayerRecord, Recording, UnsupportedModelError, record
from attnkit.inspect.roles import (
    ROLE_DESCRIPTIONS,
    SECTION_ROLE_DESCRIPTIONS,
    THRESHOLDS,
    HeadRoles,
    head_roles,
    rare_by_counts,
    rare_by_rank,
    section_roles,
)
from attnkit.inspect.sections import Section, detect_kind, parse_sections_arg, sections, token_boundaries

__all__ = [
    "ROLE_DESCRIPTIONS",
    "SECTION_ROLE_DESCRIPTIONS",
    "THRESHOLDS",
    "Faithfulness",
    "HeadRoles",
    "LayerRecord",
    "Monitor",
    "Recording",
    "Section",
    "UnsupportedModelError",
    "band_shares",
    "detect_kind",
    "explain",
    "faithfulness",
    "gradient_weighted",
    "head_roles",
    "parse_sections_arg",
    "rare_by_counts",
    "rare_by_rank",
    "raw_attention",
    "record",
    "rollout",
    "section_roles",
    "sections",
    "token_boundaries",
]
