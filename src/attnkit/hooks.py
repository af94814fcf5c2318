"""One hook for watching or swapping attention: it sees the inputs, the options and the output.

Every attention call of attnkit (`attnkit.attention`, hence every module in `attnkit.nn`
and the Hugging Face integration) passes through `run_hooks` when a hook is installed.
A hook is a callable ``hook(call, proceed)`` that returns what the call returns:

    seen = []

    def watch(call: AttentionCall, proceed):
        result = proceed(call)                   # compute (or skip this to swap the computation)
        seen.append((call.caller, call.q.shape))  # inputs, options, output are all at hand
        return result

    with attnkit.hooks.attention_hook(watch):
        model(x)

``proceed(call)`` runs the next hook and finally the computation itself; a hook may pass
a changed call (`AttentionCall.replace`) or return something else entirely (ring
attention does, `attnkit.distributed.context_parallel`). ``call.caller`` is the module
that made the call (None for a direct call of `attnkit.attention`).

Cost when nobody listens: one read of a module-level tuple, which `torch.compile`
guards on without a graph break (a ContextVar read would break the graph). Hooks are
process-wide, like PyTorch's global module hooks, and run in the order installed (the
first installed is outermost).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from attnkit.options import AttentionOptions

__all__ = ["AttentionCall", "Hook", "active", "attention_hook", "innermost", "run_hooks"]


@dataclass(frozen=True, eq=False)
class AttentionCall:
    """One attention call as hooks see it.

    ``q (B, Hq, Lq, D)``, ``k (B, Hk, Lk, D)``, ``v (B, Hk, Lk, Dv)``; the result is
    ``out (B, Hq, Lq, Dv)``, or ``(out, lse)`` when ``return_lse``.
    """

    q: Tensor
    k: Tensor
    v: Tensor
    options: AttentionOptions
    caller: Any = None  # the module making the call, or None
    return_lse: bool = False
    backend: str = "auto"

    def replace(self, **changes: Any) -> AttentionCall:
        """A copy with some fields changed (``q``, ``options``, ``backend``...)."""
        return dataclasses.replace(self, **changes)


Proceed = Callable[[AttentionCall], Any]
Hook = Callable[[AttentionCall, Proceed], Any]
"""A hook: ``hook(call, proceed)`` returns the call's result, usually ``proceed(call)``."""

# A tuple, replaced (never mutated) on install/removal, so a reader never sees it change mid-call.
_HOOKS: tuple[Hook, ...] = ()


def active() -> bool:
    """True when some hook is installed."""
    return bool(_HOOKS)


def innermost(hook: Hook) -> bool:
    """True when ``hook`` is the last installed: the ``proceed`` it receives is the computation itself.

    A hook that computes the result another way (``record`` takes the output from its one-pass
    statistics) may skip ``proceed`` only then, so no other hook is bypassed.
    """
    return bool(_HOOKS) and _HOOKS[-1] == hook  # == : a bound method is a new object at each access


def run_hooks(call: AttentionCall, compute: Proceed) -> Any:
    """Pass ``call`` through every installed hook, outermost first, ending in ``compute(call)``."""
    hooks = _HOOKS

    def proceed_from(index: int) -> Proceed:
        if index == len(hooks):
            return compute
        return lambda c: hooks[index](c, proceed_from(index + 1))

    return proceed_from(0)(call)


def install(hook: Hook) -> Callable[[], None]:
    """Install ``hook`` until the returned function is called (prefer `attention_hook`)."""
    global _HOOKS
    if not callable(hook):
        raise TypeError(f"attention_hook: hook must be callable hook(call, proceed), got {type(hook).__name__}")
    _HOOKS = (*_HOOKS, hook)

    def remove() -> None:
        global _HOOKS
        for index in range(len(_HOOKS) - 1, -1, -1):  # the latest installation of this hook
            if _HOOKS[index] is hook:
                _HOOKS = _HOOKS[:index] + _HOOKS[index + 1 :]
                return

    return remove


@contextlib.contextmanager
def attention_hook(hook: Hook) -> Iterator[None]:
    """Install ``hook`` for the duration of the ``with`` block (nests; process-wide)."""
    remove = install(hook)
    try:
        yield
    finally:
        remove()
