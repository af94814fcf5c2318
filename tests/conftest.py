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
