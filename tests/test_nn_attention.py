"""SelfAttention and CrossAttention against an independent float64 softmax attention written here."""

from __future__ import annotations

import math

import pytest
import torch

import attnkit
from attnkit import AttentionOptions, attention_hook, hooks
from attnkit.nn import CrossAttention, KVCache, RotaryEmbedding, SelfAttention


def _softmax_attention(q, k, v, allowed, bias=None):
    """Plain attention: q (B, H, Lq, D), k/v (B, H, Lk, D), allowed broadcastable bool; empty rows -> 0."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        s = s + bias
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return p @ v, p


def _heads(x, n, d):
    B, L, _ = x.shape
    return x.view(B, L, n, d).transpose(1, 2)


def _reference_self(m: SelfAttention, x, padding=None):
    B, L, _ = x.shape
    H, Hk, D = m.heads, m.kv_heads, m.head_dim
    q = _heads(m.q_proj(x), H, D)
    k = _heads(m.k_proj(x), Hk, D)
    v = _heads(m.v_proj(x), Hk, D)
    if m.q_norm is not None:  # RMSNorm written out: x / sqrt(mean(x^2) + eps) * weight
        eps = torch.finfo(x.dtype).eps
        q = q * torch.rsqrt(q.square().mean(-1, keepdim=True) + eps) * m.q_norm.weight
        k = k * torch.rsqrt(k.square().mean(-1, keepdim=True) + eps) * m.k_norm.weight
    if m.rope is not None:
        q, k = m.rope(q, k)
    k, v = k.repeat_interleave(H // Hk, 1), v.repeat_interleave(H // Hk, 1)
    i = torch.arange(L)[:, None]
    j = torch.arange(L)[None, :]
    allowed = torch.ones(L, L, dtype=torch.bool)
    if m.causal:
        allowed &= j <= i
    if m.window is not None:
        left, right = (m.window, m.window) if isinstance(m.window, int) else m.window
        allowed &= j >= i - left
        allowed &= j <= i + right
    allowed = allowed[None, None]
    if padding is not None:
        allowed = allowed & padding[:, None, None, :]
    bias = None
    if m.alibi:
        bias = -attnkit.alibi_slopes(H).double().view(H, 1, 1) * (i - j).abs()
    out, p = _softmax_attention(q, k, v, allowed, bias)
    return m.out_proj(out.transpose(1, 2).reshape(B, L, H * D)), p


CONFIGS = [
    {},
    {"causal": True},
    {"kv_heads": 2, "causal": True, "positions": "rope"},
    {"kv_heads": 1, "window": 2},
    {"kv_heads": 2, "window": (3, 1), "positions": "alibi", "bias": True},
    {"causal": True, "window": 2, "qk_norm": True, "positions": RotaryEmbedding(6, layout="interleaved")},
    {"head_dim": 6, "causal": True, "positions": "alibi"},
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "plain")
def test_self_attention_matches_reference(config):
    m = SelfAttention(24, 4, **config).double()
    if config.get("qk_norm"):
        with torch.no_grad():
            m.q_norm.weight.uniform_(0.5, 1.5)
            m.k_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 7, 24, dtype=torch.float64)
    padding = torch.tensor([[True] * 7, [True] * 4 + [False] * 3, [True] * 6 + [False]])
    for pad in (None, padding):
        expected, p = _reference_self(m, x, pad)
        torch.testing.assert_close(m(x, padding_mask=pad), expected, atol=1e-10, rtol=0)
        out, weights = m(x, padding_mask=pad, return_weights=True)
        torch.testing.assert_close(out, expected, atol=1e-10, rtol=0)
        torch.testing.assert_close(weights, p, atol=1e-10, rtol=0)


def test_self_attention_gradients_match_reference():
    m = SelfAttention(16, 4, kv_heads=2, causal=True, positions="rope").double()
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    (g_ours,) = torch.autograd.grad(m(x).square().sum(), x)
    (g_ref,) = torch.autograd.grad(_reference_self(m, x)[0].square().sum(), x)
    torch.testing.assert_close(g_ours, g_ref, atol=1e-10, rtol=0)


def test_cross_attention_matches_reference_with_its_own_width_and_mask():
    m = CrossAttention(16, 4, context_dim=10, kv_heads=2, bias=True).double()
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    ctx = torch.randn(2, 6, 10, dtype=torch.float64)
    cmask = torch.tensor([[True] * 6, [True, True, False, False, False, False]])
    q = _heads(m.q_proj(x), 4, 4)
    k = _heads(m.k_proj(ctx), 2, 4).repeat_interleave(2, 1)
    v = _heads(m.v_proj(ctx), 2, 4).repeat_interleave(2, 1)
    out, p = _softmax_attention(q, k, v, cmask[:, None, None, :])
    expected = m.out_proj(out.transpose(1, 2).reshape(2, 3, 16))
    got, weights = m(x, ctx, context_mask=cmask, return_weights=True)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(weights, p, atol=1e-10, rtol=0)
    # a cache holds the projected context: later calls need no context
    cache = KVCache(6)
    first = m(x, ctx, context_mask=cmask, cache=cache)
    again = m(x[:, :1], None, context_mask=cmask, cache=cache)
    torch.testing.assert_close(first, expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(again, expected[:, :1], atol=1e-10, rtol=0)


def test_hook_sees_q_k_after_rope_and_the_exact_options():
    m = SelfAttention(16, 4, kv_heads=2, causal=True, window=3, positions="rope").double()
    x = torch.randn(1, 5, 16, dtype=torch.float64)
    seen = []

    def watch(call, proceed):
        out = proceed(call)
        seen.append((call, out))
        return out

    with attention_hook(watch):
        out = m(x)
    ((call, heads_out),) = seen
    q, k, v, options = call.q, call.k, call.v, call.options
    assert call.caller is m and q.shape == (1, 4, 5, 4) and k.shape == v.shape == (1, 2, 5, 4)
    assert options.kwargs() == AttentionOptions(causal=True, window=3).kwargs()
    torch.testing.assert_close(heads_out, attnkit.attention(q, k, v, **options.kwargs()))
    torch.testing.assert_close(m.out_proj(heads_out.transpose(1, 2).reshape(1, 5, 16)), out)
    q0, k0 = m.rope(_heads(m.q_proj(x), 4, 4), _heads(m.k_proj(x), 2, 4))
    torch.testing.assert_close(q, q0)  # rotated
    torch.testing.assert_close(k, k0)


def test_no_hook_means_the_hook_chain_is_never_entered(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("run_hooks called without a hook")

    monkeypatch.setattr(hooks, "run_hooks", fail)
    m = SelfAttention(8, 2)
    m(torch.randn(1, 3, 8))
    CrossAttention(8, 2)(torch.randn(1, 3, 8), torch.randn(1, 2, 8))


def test_a_hook_can_swap_one_module_only():
    a, b = SelfAttention(8, 2), SelfAttention(8, 2)
    calls = []

    def spy(call, proceed):
        if call.caller is not a:
            return proceed(call)
        calls.append(sorted(call.options.kwargs()))
        return torch.zeros_like(call.q)  # (B, H, L, D): the swapped computation

    x = torch.randn(1, 3, 8)
    with attention_hook(spy):
        out_a, out_b = a(x), b(x)
    assert calls == [["alibi", "causal", "dropout_p", "mask", "scale", "softcap", "window"]]
    torch.testing.assert_close(out_a, a.out_proj(torch.zeros(1, 3, 8)))  # attention swapped for zeros
    torch.testing.assert_close(out_b, b(x))  # unchanged


def test_options_hold_the_layer_settings_and_the_call_adds_mask_and_dropout():
    m = SelfAttention(8, 2, causal=True, window=(2, 0), positions="alibi", dropout=0.5)
    assert isinstance(m.options, AttentionOptions) and m.causal and m.window == (2, 0) and m.alibi
    assert m.options.alibi is True and m.options.mask is None and m.options.dropout_p == 0.0
    assert CrossAttention(8, 2).options.kwargs() == AttentionOptions().kwargs()
    seen = []

    def watch(call, proceed):
        seen.append(call.options)
        return proceed(call)

    pad = torch.tensor([[True, True, False]])
    with attention_hook(watch):
        m(torch.randn(1, 3, 8), padding_mask=pad)  # training: dropout applies
        m.eval()
        m(torch.randn(1, 3, 8), padding_mask=pad)
    assert [o.dropout_p for o in seen] == [0.5, 0.0]
    assert all(o.causal and o.window == (2, 0) and o.alibi is True for o in seen)
    assert torch.equal(seen[0].mask, pad.view(1, 1, 1, 3))


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match=r"dim must be divisible by heads.*dim=10, heads=4"):
        SelfAttention(10, 4)
    with pytest.raises(ValueError, match=r"kv_heads must divide heads.*heads=4, kv_heads=3"):
        SelfAttention(16, 4, kv_heads=3)
    with pytest.raises(ValueError, match="positions"):
        SelfAttention(16, 4, positions="learned")
    with pytest.raises(ValueError, match="head_dim=8"):
        SelfAttention(16, 4, positions=RotaryEmbedding(8))
    m = CrossAttention(16, 4, context_dim=12)
    with pytest.raises(ValueError, match=r"context must be \(B, L, context_dim=12\), got \(2, 5, 16\)"):
        m(torch.randn(2, 3, 16), torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="batch sizes differ"):
        m(torch.randn(2, 3, 16), torch.randn(1, 5, 12))
    with pytest.raises(ValueError, match=r"x must be \(B, L, dim=16\)"):
        SelfAttention(16, 4)(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="padding_mask"):
        SelfAttention(16, 4)(torch.randn(2, 3, 16), padding_mask=torch.ones(2, 4, dtype=torch.bool))
