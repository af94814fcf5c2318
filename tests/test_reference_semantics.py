"""The reference kernel against independent, hand-written formulas.

Every other backend is tested against the reference, so the reference itself is tested
here against the definitions written out directly (loops and explicit masks), and
against PyTorch's SDPA where the semantics coincide.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import attnkit

f64 = torch.float64


def naive(q, k, v, *, allowed=None, bias=None, softcap=None, scale=None):
    """softmax(q k^T * scale [softcap] + bias, masked) v with heads already matched; empty rows -> 0."""
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return p @ v, p


def rand(*shape):
    return torch.randn(*shape, dtype=f64)


def test_plain_matches_textbook_formula():
    q, k, v = rand(2, 3, 5, 8), rand(2, 3, 7, 8), rand(2, 3, 7, 4)
    out = attnkit.attention(q, k, v, backend="reference")
    expected, _ = naive(q, k, v)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)


def test_causal_equal_lengths_matches_torch_sdpa():
    q, k, v = rand(1, 2, 9, 8), rand(1, 2, 9, 8), rand(1, 2, 9, 8)
    out = attnkit.attention(q, k, v, causal=True, backend="reference")
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-12, rtol=0)


@pytest.mark.parametrize(("Lq", "Lk"), [(3, 7), (7, 3), (1, 6)])
def test_causal_is_bottom_right_aligned(Lq, Lk):
    q, k, v = rand(1, 1, Lq, 4), rand(1, 1, Lk, 4), rand(1, 1, Lk, 4)
    allowed = torch.tensor([[j <= i + Lk - Lq for j in range(Lk)] for i in range(Lq)])
    out = attnkit.attention(q, k, v, causal=True, backend="reference")
    torch.testing.assert_close(out, naive(q, k, v, allowed=allowed)[0], atol=1e-12, rtol=0)
    if Lq > Lk:  # the first Lq - Lk queries see no key at all: output exactly 0
        assert out[..., : Lq - Lk, :].abs().max() == 0


@pytest.mark.parametrize(("window", "causal"), [((2, 1), False), ((3, 3), True), ((None, 2), False), (0, False)])
def test_window_definition(window, causal):
    Lq, Lk = 6, 9
    left, right = (window, window) if isinstance(window, int) else window
    q, k, v = rand(1, 2, Lq, 4), rand(1, 2, Lk, 4), rand(1, 2, Lk, 4)
    allowed = torch.zeros(Lq, Lk, dtype=torch.bool)
    for i in range(Lq):
        pos = i + Lk - Lq
        for j in range(Lk):
            ok = (left is None or j >= pos - left) and (right is None or j <= pos + right)
            allowed[i, j] = ok and (not causal or j <= pos)
    out = attnkit.attention(q, k, v, window=window, causal=causal, backend="reference")
    torch.testing.assert_close(out, naive(q, k, v, allowed=allowed)[0], atol=1e-12, rtol=0)


def test_alibi_standard_slopes_and_bias():
    # Press et al. (2022): for 8 heads the slopes are 1/2, 1/4, ..., 1/256.
    torch.testing.assert_close(attnkit.alibi_slopes(8), torch.tensor([2.0**-i for i in range(1, 9)]))
    # 6 heads: the 4 slopes of n=4, then every other slope of n=8 (2^-0.5, 2^-1.5).
    expected6 = [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]
    torch.testing.assert_close(attnkit.alibi_slopes(6), torch.tensor(expected6))
    Lq, Lk, H = 4, 6, 8
    q, k, v = rand(1, H, Lq, 4), rand(1, H, Lk, 4), rand(1, H, Lk, 4)
    slopes = attnkit.alibi_slopes(H).to(f64)
    dist = torch.tensor([[abs(i + Lk - Lq - j) for j in range(Lk)] for i in range(Lq)], dtype=f64)
    bias = -slopes[:, None, None] * dist
    out = attnkit.attention(q, k, v, alibi=True, backend="reference")
    torch.testing.assert_close(out, naive(q, k, v, bias=bias)[0], atol=1e-12, rtol=0)


def test_order_softcap_then_biases_then_masks():
    q, k, v = rand(1, 2, 5, 4) * 3, rand(1, 2, 5, 4) * 3, rand(1, 2, 5, 4)
    fmask = rand(1, 1, 5, 5)
    slopes = torch.tensor([0.5, 0.25], dtype=f64)
    dist = (torch.arange(5)[:, None] - torch.arange(5)[None, :]).abs().to(f64)
    bias = -slopes[:, None, None] * dist + fmask
    allowed = torch.ones(5, 5, dtype=torch.bool).tril()
    out = attnkit.attention(q, k, v, softcap=2.0, alibi=slopes, mask=fmask, causal=True, scale=0.7, backend="reference")
    expected, _ = naive(q, k, v, allowed=allowed, bias=bias, softcap=2.0, scale=0.7)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("softcap", [0.25, 1.0])
def test_softcap_at_or_below_one_is_a_cap_like_any_other(softcap):
    # Only softcap <= 0 is refused: a cap under 1 squeezes every score into (-cap, cap).
    q, k, v = rand(1, 2, 5, 4) * 3, rand(1, 2, 6, 4) * 3, rand(1, 2, 6, 4)
    out = attnkit.attention(q, k, v, softcap=softcap, backend="reference")
    torch.testing.assert_close(out, naive(q, k, v, softcap=softcap)[0], atol=1e-12, rtol=0)


def test_grouped_query_attention_reads_head_h_div_group():
    q, k, v = rand(2, 6, 5, 4), rand(2, 2, 7, 4), rand(2, 2, 7, 3)
    out = attnkit.attention(q, k, v, backend="reference")
    expected, _ = naive(q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1))
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)


def test_bool_and_float_masks():
    q, k, v = rand(2, 2, 4, 4), rand(2, 2, 6, 4), rand(2, 2, 6, 4)
    bmask = torch.rand(2, 1, 4, 6) > 0.3
    bmask[..., 0] = True  # every row keeps a key
    torch.testing.assert_close(
        attnkit.attention(q, k, v, mask=bmask, backend="reference"), naive(q, k, v, allowed=bmask)[0]
    )
    fmask = rand(4, 6)
    torch.testing.assert_close(
        attnkit.attention(q, k, v, mask=fmask, backend="reference"), naive(q, k, v, bias=fmask)[0]
    )


def test_attention_weights_are_probabilities():
    q, k = rand(1, 2, 5, 4), rand(1, 2, 8, 4)
    p = attnkit.attention_weights(q, k, causal=True, window=(2, None))
    assert p.shape == (1, 2, 5, 8) and p.dtype == f64
    torch.testing.assert_close(p.sum(-1), torch.ones(1, 2, 5, dtype=f64))
    assert p[0, 0, 0, :1].sum() == 0  # window (2, .) on query 0 at position 3 leaves keys 1..3


def test_fully_masked_rows_zero_output_lse_and_gradients():
    q, k, v = (rand(1, 2, 4, 4).requires_grad_() for _ in range(3))
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    mask[..., 1, :] = False
    out, lse = attnkit.attention(q, k, v, mask=mask, return_lse=True, backend="reference")
    assert out[:, :, 1].abs().max() == 0 and torch.isneginf(lse[:, :, 1]).all()
    (out.sum() + lse[:, :, [0, 2, 3]].sum()).backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert q.grad[:, :, 1].abs().max() == 0


def test_lse_is_natural_log_sum_exp():
    q, k, v = rand(1, 1, 3, 4), rand(1, 1, 5, 4), rand(1, 1, 5, 4)
    _, lse = attnkit.attention(q, k, v, return_lse=True, backend="reference")
    expected = torch.logsumexp(q @ k.transpose(-1, -2) / 2.0, dim=-1)
    torch.testing.assert_close(lse, expected)
