"""A hook point through which attention layers show their inputs to the inspection tools.

attnkit's modules call `notify` with the ``q, k, v`` they are about to attend with and
the keyword options they pass to `attnkit.attention`. Nothing is computed unless an
observer is installed (`attnkit.inspect.record` installs one), so the normal path pays
one context-variable lookup.

An observer is a callable ``observer(module, q, k, v, options)`` where ``q (B, Hq, Lq, D)``,
``k (B, Hk, Lk, D)``, ``v (B, Hk, Lk, Dv)`` and ``options`` is the dict of keyword
arguments of `attnkit.attention` (``causal``, ``mask``, ``window``, ``alibi``,
``softcap``, ``scale``) for that call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

from torch import Tensor

Observer = Callable[[Any, Tensor, Tensor, Tensor, dict], None]

_observers: ContextVar[tuple[Observer, ...]] = ContextVar("attnkit_observers", default=())


def active() -> bool:
    """True when some observer wants to see attention calls."""
    return bool(_observers.get())


def notify(module: Any, q: Tensor, k: Tensor, v: Tensor, options: dict) -> None:
    """Show one attention call to every installed observer."""
    for observer in _observers.get():
        observer(module, q, k, v, options)


@contextlib.contextmanager
def observe(observer: Observer) -> Iterator[None]:
    """Install ``observer`` for the duration of the ``with`` block (nests; thread/task-local)."""
    token = _observers.set((*_observers.get(), observer))
    try:
        yield
    finally:
        _observers.reset(token)
