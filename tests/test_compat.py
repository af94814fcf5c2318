"""attnkit.compat against attnkit.attention: FlashAttention's signatures, layouts and conventions."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit.compat import flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func, flash_attn_varlen_func

f64 = torch.float64


def blhd(B, L, H, D):
    return torch.randn(B, L, H, D, dtype=f64)


CASES = {
    "plain": ({}, {}),
    "causal": ({"causal": True}, {"causal": True}),
    "window": ({"window_size": (3, 1)}, {"window": (3, 1)}),
    "left_only": ({"window_size": (4, -1)}, {"window": (4, None)}),
    "causal_window": ({"causal": True, "window_size": (5, 5)}, {"causal": True, "window": (5, 5)}),
    "softcap_scale": ({"softcap": 5.0, "softmax_scale": 0.3}, {"softcap": 5.0, "scale": 0.3}),
    "alibi": ({"alibi_slopes": torch.tensor([0.5, 0.25, 0.125, 0.0625])}, {"alibi": [0.5, 0.25, 0.125, 0.0625]}),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("lengths", [(9, 9), (5, 12), (12, 5)], ids=str)
def test_flash_attn_func_is_attention_in_blhd_layout(case, lengths):
    fa_kwargs, ours = CASES[case]
    Lq, Lk = lengths
    q, k, v = blhd(2, Lq, 4, 8), blhd(2, Lk, 2, 8), blhd(2, Lk, 2, 8)  # GQA: 2 key/value heads
    out, lse, probs = flash_attn_func(q, k, v, return_attn_probs=True, **fa_kwargs)
    want, want_lse = attnkit.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), return_lse=True, **ours)
    assert out.shape == (2, Lq, 4, 8) and lse.shape == (2, 4, Lq) and probs.shape == (2, 4, Lq, Lk)
    torch.testing.assert_close(out, want.transpose(1, 2), rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=1e-12)
    torch.testing.assert_close(probs @ v.transpose(1, 2).repeat_interleave(2, 1), want, rtol=0, atol=1e-12)
    torch.testing.assert_close(flash_attn_func(q, k, v, **fa_kwargs), out)


def test_packed_variants_and_gradients():
    qkv = torch.randn(2, 7, 3, 4, 8, dtype=f64, requires_grad=True)
    out = flash_attn_qkvpacked_func(qkv, causal=True)
    q, k, v = (qkv[:, :, i] for i in range(3))
    torch.testing.assert_close(out, flash_attn_func(q, k, v, causal=True))
    torch.testing.assert_close(flash_attn_kvpacked_func(q, qkv[:, :, 1:], causal=True), out)
    (g,) = torch.autograd.grad(out.sum(), qkv)
    qd = qkv.detach().clone().requires_grad_()
    want = attnkit.attention(*(qd[:, :, i].transpose(1, 2) for i in range(3)), causal=True).transpose(1, 2)
    (w,) = torch.autograd.grad(want.sum(), qd)
    torch.testing.assert_close(g, w, rtol=0, atol=1e-12)


def test_varlen_matches_attention_varlen_and_returns_flash_attns_lse_layout():
    q, k, v = torch.randn(10, 4, 8, dtype=f64), torch.randn(13, 2, 8, dtype=f64), torch.randn(13, 2, 8, dtype=f64)
    cu_q, cu_k = torch.tensor([0, 4, 10], dtype=torch.int32), torch.tensor([0, 6, 13], dtype=torch.int32)
    out, lse, none = flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, 6, 7, causal=True, window_size=(2, 0), return_attn_probs=True
    )
    want, want_lse = attnkit.attention_varlen(q, k, v, cu_q, cu_k, causal=True, window=(2, 0), return_lse=True)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
    assert lse.shape == (4, 10) and none is None
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=1e-12)


def test_dropout_is_attnkits_counter_based_dropout():
    q, k, v = blhd(1, 6, 2, 4), blhd(1, 6, 2, 4), blhd(1, 6, 2, 4)
    torch.manual_seed(3)
    got = flash_attn_func(q, k, v, dropout_p=0.3)
    torch.manual_seed(3)
    want = attnkit.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=0.3).transpose(1, 2)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"window_size": (-2, 0)}, ValueError, "window_size sides must be ints >= -1"),
        ({"window_size": 3}, TypeError, r"window_size must be a \(left, right\) pair"),
        ({"softcap": -1.0}, ValueError, "softcap must be a number >= 0"),
        ({"alibi_slopes": torch.rand(2, 4)}, ValueError, "differ between batch elements"),
        ({"dropout_p": 0.1, "return_attn_probs": True}, ValueError, "return_attn_probs with dropout_p > 0"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, exc, match):
    q = blhd(2, 5, 4, 8)
    with pytest.raises(exc, match=match):
        flash_attn_func(q, q, q, **kwargs)


def test_layout_errors_name_the_expected_layout():
    with pytest.raises(ValueError, match=r"q must be \(batch, seqlen, nheads, headdim\)"):
        flash_attn_func(torch.randn(5, 4, 8), torch.randn(1, 5, 4, 8), torch.randn(1, 5, 4, 8))
    with pytest.raises(ValueError, match="block_table"):
        cu = torch.tensor([0, 5], dtype=torch.int32)
        flash_attn_varlen_func(
            torch.randn(5, 2, 4), torch.randn(5, 2, 4), torch.randn(5, 2, 4), cu, cu, 5, 5, block_table=cu
        )
    same = torch.rand(1, 4).expand(3, 4)
    q = blhd(3, 5, 4, 8)
    torch.testing.assert_close(
        flash_attn_func(q, q, q, alibi_slopes=same), flash_attn_func(q, q, q, alibi_slopes=same[0])
    )
