"""record(stats=True) takes each layer's output from the statistics pass instead of running a second forward."""

from __future__ import annotations

import importlib

import pytest
import torch

from attnkit import hooks
from attnkit.inspect import record
from attnkit.nn import LanguageModel

record_module = importlib.import_module("attnkit.inspect.record")


@pytest.fixture
def model():
    torch.manual_seed(0)
    return LanguageModel(50, 32, 4, 2).eval()


def spy_stats(monkeypatch) -> list[bool]:
    """Record the ``return_output`` of every attention_stats call that record makes."""
    seen: list[bool] = []
    real = record_module.attention_stats

    def spy(*args, return_output=False, **kwargs):
        seen.append(return_output)
        return real(*args, return_output=return_output, **kwargs)

    monkeypatch.setattr(record_module, "attention_stats", spy)
    return seen


def test_the_statistics_pass_stands_in_for_the_forward(model, monkeypatch):
    tokens = torch.randint(0, 50, (3, 40))
    with torch.no_grad():
        want = model(tokens)
    seen = spy_stats(monkeypatch)
    forwards: list[int] = []

    def count(call, proceed):  # outermost: sees every call, and whether record proceeds is not its business
        forwards.append(1)
        return proceed(call)

    with torch.no_grad(), hooks.attention_hook(count), record(model, stats=True) as rec:
        got = model(tokens)
    assert seen == [True, True] and len(rec) == 2 and len(forwards) == 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert all(layer.stats.output is None for layer in rec)  # the output is returned, not kept


def test_an_inner_hook_still_sees_the_calls(model, monkeypatch):
    """With a hook installed inside record, record is not innermost: it proceeds, so that hook runs."""
    tokens = torch.randint(0, 50, (2, 20))
    seen = spy_stats(monkeypatch)
    inner: list[tuple] = []

    def watch(call, proceed):
        inner.append(tuple(call.q.shape))
        return proceed(call)

    with torch.no_grad(), record(model, stats=True), hooks.attention_hook(watch):
        model(tokens)
    assert seen == [False, False] and len(inner) == 2


@pytest.mark.parametrize("case", ["grad", "grads"])
def test_the_forward_runs_when_it_is_needed(model, monkeypatch, case):
    """Training: the output needs the attention gradient, so the real forward runs beside the statistics."""
    tokens = torch.randint(0, 50, (2, 20))
    seen = spy_stats(monkeypatch)
    with record(model, stats=True, grads=case == "grads"):
        model(tokens).sum().backward()
    assert seen == [False, False]


def test_hooks_innermost():
    def a(call, proceed):
        return proceed(call)

    def b(call, proceed):
        return proceed(call)

    assert not hooks.innermost(a)
    with hooks.attention_hook(a):
        assert hooks.innermost(a)
        with hooks.attention_hook(b):
            assert hooks.innermost(b) and not hooks.innermost(a)
        assert hooks.innermost(a)
