"""`AttentionOptions`: the keyword options of `attnkit.attention` as one typed value.

Modules keep their options in one (`attnkit.nn`), hooks receive one (`attnkit.hooks`), and
`AttentionOptions.kwargs` turns it back into the keywords of `attnkit.attention`. It holds
what the user asked for, unvalidated; `attnkit.functional.build_spec` validates and
normalises it into an `attnkit.AttentionSpec` (the kernels' view).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

__all__ = ["Alibi", "AttentionOptions", "Window"]

# ``window``: an int for both sides, or ``(left, right)`` with None for an unbounded side.
Window = int | tuple[int | None, int | None] | None
# ``alibi``: True for the standard slopes, or slopes ``(Hq,)``.
Alibi = bool | Tensor | Sequence[float] | None


@dataclass(frozen=True, eq=False)
class AttentionOptions:
    """Everything `attnkit.attention` takes besides ``q, k, v``, ``return_lse`` and ``backend``.

    Semantics are `attnkit.attention`'s: ``causal`` and ``window`` bottom-right aligned,
    ``mask`` bool (True = may attend) or float (added), broadcastable to ``(B, Hq, Lq, Lk)``.
    """

    causal: bool = False
    mask: Tensor | None = None
    window: Window = None
    alibi: Alibi = None
    softcap: float | None = None
    scale: float | None = None
    dropout_p: float = 0.0

    def kwargs(self, *, dropout: bool = True) -> dict[str, Any]:
        """The options as keyword arguments of `attnkit.attention`.

        ``dropout=False`` leaves out ``dropout_p``: the keywords of `attnkit.attention_weights`
        (the weights before dropout), which takes every other option.
        """
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if dropout or f.name != "dropout_p"}

    def replace(self, **changes: Any) -> AttentionOptions:
        """A copy with some options changed."""
        return dataclasses.replace(self, **changes)
