"""Shared test helpers: inputs, the float64 reference, tolerances."""

from __future__ import annotations

import os

import pytest
import torch

# Two cores: keep intra-op threads at the machine's size and tests deterministic.
torch.set_num_threads(min(2, os.cpu_count() or 1))
# Nothing in the suite may reach a model hub: every model is bundled or built from a config.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Without a GPU, Triton kernels can only run under Triton's interpreter, which must be chosen
# before Triton is first imported (by whichever test module gets there first).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def make_qkv(B=2, Hq=4, Hk=2, Lq=37, Lk=53, D=16, Dv=None, *, dtype=torch.float64, grad=False, seed=None):
    """Random ``q (B, Hq, Lq, D)``, ``k (B, Hk, Lk, D)``, ``v (B, Hk, Lk, Dv)`` (``Dv`` defaults to ``D``).

    With ``seed``: drawn from a generator of their own, in fp64 and then cast to ``dtype`` (the same
    values at every precision, whatever the global seed).
    """
    Dv = D if Dv is None else Dv
    shapes = ((B, Hq, Lq, D), (B, Hk, Lk, D), (B, Hk, Lk, Dv))
    if seed is None:
        tensors = [torch.randn(s, dtype=dtype) for s in shapes]
    else:
        g = torch.Generator().manual_seed(seed)
        tensors = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    return [t.requires_grad_(grad) for t in tensors]


def grads(out, inputs, seed=1):
    """Gradients of ``(out * g).sum()`` for a fixed random ``g``, with respect to ``inputs``."""
    g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad((out * g).sum(), inputs, allow_unused=True)
