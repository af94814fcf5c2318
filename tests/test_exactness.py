"""Regression cases for inputs that once gave a wrong answer without an error (issue 12, items 1-5, 9)."""

from __future__ import annotations

import pytest
import torch

import attnkit
from tests.conftest import make_qkv

BACKENDS = ("auto", "sdpa", "tiled", "reference")


def _reference(q, k, v, **options):
    mask = options.pop("mask", None)
    if mask is not None and mask.is_floating_point():
        mask = mask.double()
    return attnkit.attention(q.double(), k.double(), v.double(), mask=mask, backend="reference", **options)


@pytest.mark.parametrize("options", [dict(window=(8, 0)), dict(alibi=True), dict(causal=True), {}])
def test_head_dim_strided_inputs_forward_and_backward(options):
    """Item 1: PyTorch's fused CPU kernel assumes stride 1 in the head dim; attnkit establishes it."""
    q, k, v = (x.mT.contiguous().mT.requires_grad_() for x in make_qkv(1, 2, 2, 64, 64, 16, dtype=torch.float32))
    assert q.stride(-1) != 1
    out = attnkit.attention(q, k, v, **options)
    want = _reference(q, k, v, **options)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-5)
    got = torch.autograd.grad(out.sum(), (q, k, v))
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = torch.autograd.grad(attnkit.attention(qd, kd, vd, backend="reference", **options).sum(), (qd, kd, vd))
    for g, r in zip(got, ref, strict=True):
        assert g.abs().max() < 1e3  # never reads outside the tensor
        torch.testing.assert_close(g.double(), r, rtol=0, atol=1e-4)


@pytest.mark.parametrize("q_dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask_dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_float_mask_of_any_float_dtype(q_dtype, mask_dtype, backend):
    """Item 2: a float mask whose dtype differs from q's is added in the accumulation dtype, on every backend."""
    q, k, v = make_qkv(1, 2, 2, 8, 8, 4, dtype=q_dtype)
    mask = torch.randn(1, 1, 8, 8).to(mask_dtype)
    out = attnkit.attention(q, k, v, mask=mask, backend=backend)
    atol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(q_dtype, 2e-2)
    torch.testing.assert_close(out.double(), _reference(q, k, v, mask=mask), rtol=0, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_large_finite_mask_values_stay_finite_in_low_precision(dtype, backend):
    """Item 3: -1e5 on a whole row is a softmax over equal biases, not "no allowed key" (fp16 rounds it to -inf)."""
    q, k, v = make_qkv(1, 2, 2, 8, 8, 16, dtype=dtype)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 3, :] = -1e5
    out, lse = attnkit.attention(q, k, v, mask=mask, backend=backend, return_lse=True)
    want, want_lse = _reference(q, k, v, mask=mask, return_lse=True)
    assert out[0, 0, 3].abs().sum() > 0
    torch.testing.assert_close(out.double(), want, rtol=0, atol=3e-2)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-2)


@pytest.mark.parametrize("scale", [0.0, -0.5])
@pytest.mark.parametrize("options", [dict(causal=True), dict(window=(2, 1)), {}])
@pytest.mark.parametrize("backend", ("auto", "tiled", "reference"))
def test_non_positive_scale_is_computed_exactly(scale, options, backend):
    """Item 4: scale <= 0 is exact on every backend (the fused kernels that mask before scaling step aside)."""
    q, k, v = make_qkv(1, 2, 2, 8, 8, 4, dtype=torch.float32)
    out = attnkit.attention(q, k, v, scale=scale, backend=backend, **options)
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), _reference(q, k, v, scale=scale, **options), rtol=0, atol=1e-5)
    if scale == 0.0 and not options:  # uniform weights: every output is the mean of the values
        torch.testing.assert_close(out, v.mean(2, keepdim=True).expand_as(out), rtol=0, atol=1e-6)


def test_sdpa_refuses_non_positive_scale_with_a_reason():
    q, k, v = make_qkv(1, 2, 2, 8, 8, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match="scale <= 0"):
        attnkit.attention(q, k, v, scale=-1.0, causal=True, backend="sdpa")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_a_query_row_makes_that_row_nan_not_zero(backend):
    """Item 5: a diverged row must show as NaN (output and lse), never as a plausible 0."""
    q, k, v = make_qkv(1, 1, 1, 6, 6, 4, dtype=torch.float32)
    q[0, 0, 2, 1] = torch.nan
    out, lse = attnkit.attention(q, k, v, backend=backend, return_lse=True)
    assert out[0, 0, 2].isnan().all() and lse[0, 0, 2].isnan()
    assert not out[0, 0, [0, 1, 3, 4, 5]].isnan().any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_garbage_in_padded_keys_never_reaches_a_row(backend):
    """Item 5: keys a row may not attend to are never read (a padded KV cache holds uninitialised memory)."""
    q, k, v = make_qkv(1, 1, 1, 6, 6, 4, dtype=torch.float32)
    pad = attnkit.key_padding_mask(torch.tensor([4]), 6)
    want = attnkit.attention(q, k, v, mask=pad, backend=backend)
    k[0, 0, 5, 0], v[0, 0, 4, 1] = torch.nan, torch.inf
    out = attnkit.attention(q, k, v, mask=pad, backend=backend)
    torch.testing.assert_close(out, want)


def test_garbage_in_future_keys_never_reaches_earlier_rows_under_causal():
    q, k, v = make_qkv(1, 2, 2, 6, 6, 4, dtype=torch.float64)
    v[0, 1, 4, 0] = torch.nan
    out = attnkit.attention(q, k, v, causal=True)
    assert out[0, 1, 4:].isnan().all(-1).all() and not out[0, 1, :4].isnan().any()
    assert not out[0, 0].isnan().any()  # another head never reads it


def test_alibi_that_is_not_slopes_is_a_clear_type_error():
    """Item 9."""
    q, k, v = make_qkv(1, 2, 2, 4, 4, 4)
    with pytest.raises(TypeError, match=r"alibi must be True.*got str 'yes'"):
        attnkit.attention(q, k, v, alibi="yes")
    with pytest.raises(TypeError, match="alibi slopes must be numbers"):
        attnkit.attention(q, k, v, alibi=[0.5, "x"])


def test_key_padding_mask_refuses_fractional_lengths():
    """Item 9."""
    with pytest.raises(ValueError, match="whole numbers of keys"):
        attnkit.key_padding_mask(torch.tensor([2.5, 3.0]), 8)
    assert torch.equal(attnkit.key_padding_mask(torch.tensor([2.0, 3.0]), 4), attnkit.key_padding_mask([2, 3], 4))
    with pytest.raises(ValueError, match="max_len must be an int"):
        attnkit.key_padding_mask([2, 3], -1)
