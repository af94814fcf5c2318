"""Every backend agrees with the float64 reference on a mixed request (the full matrix is in test_backends.py)."""

import pytest
import torch

import attnkit


@pytest.mark.parametrize("backend", ["tiled", "auto"])
def test_backend_matches_reference_fp64(backend):
    q = torch.randn(2, 4, 33, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 47, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 47, 16, dtype=torch.float64, requires_grad=True)
    ref = attnkit.attention(q, k, v, causal=True, backend="reference")
    out = attnkit.attention(q, k, v, causal=True, backend=backend)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
