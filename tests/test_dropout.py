"""Dropout: reproducible under torch.manual_seed, the same pattern on every backend, and a
backward that reuses the forward's pattern."""

from __future__ import annotations

import torch

import attnkit
from attnkit import dropout
from attnkit.functional import build_spec
from attnkit.kernels import tiled
from tests.conftest import make_qkv

f64 = torch.float64


def test_reproducible_under_manual_seed():
    q, k, v = make_qkv(Lq=40, Lk=50, D=8)
    torch.manual_seed(3)
    a = attnkit.attention(q, k, v, dropout_p=0.4)
    torch.manual_seed(3)
    b = attnkit.attention(q, k, v, dropout_p=0.4)
    c = attnkit.attention(q, k, v, dropout_p=0.4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_no_dropout_leaves_the_global_generator_alone():
    # An eval-mode call (dropout_p=0) must not draw a seed: it would shift every later draw.
    q, k, v = make_qkv(Lq=4, Lk=5, D=8)
    torch.manual_seed(11)
    attnkit.attention(q, k, v, dropout_p=0.0)
    after_call = torch.rand(4)
    torch.manual_seed(11)
    assert torch.equal(after_call, torch.rand(4))


def test_same_pattern_in_tiled_and_reference_any_tiling():
    q, k, v = make_qkv(Lq=40, Lk=50, D=8, grad=True)
    torch.manual_seed(5)
    ref = attnkit.attention(q, k, v, dropout_p=0.3, causal=True, backend="reference")
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad((ref * g).sum(), (q, k, v))
    for blocks in [(7, 9), (64, 64), (1, 50)]:
        torch.manual_seed(5)
        spec = build_spec(q, k, v, dropout_p=0.3, causal=True)
        out, _ = tiled.attention(q, k, v, spec, block_q=blocks[0], block_k=blocks[1])
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
        # The backward regenerates the pattern from the seed: it must equal autograd
        # through the reference's explicit dropout mask.
        for got, want in zip(torch.autograd.grad((out * g).sum(), (q, k, v)), ref_grads):
            torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_reference_draws_its_keep_mask_on_the_inputs_device():
    """On meta tensors (standing in for a GPU): a keep mask made on torch's default device would not mix."""
    from attnkit.kernels import reference

    q, k, v = (torch.empty(1, 2, 8, 4, device="meta") for _ in range(3))
    out, lse = reference.forward(q, k, v, build_spec(q, k, v, dropout_p=0.3))
    assert (out.device.type, out.shape, lse.device.type, lse.shape) == ("meta", (1, 2, 8, 4), "meta", (1, 2, 8))


def test_auto_with_dropout_never_uses_sdpa():
    q, k, v = make_qkv(Lq=40, Lk=50, D=8)
    choice = attnkit.explain_backend(q, k, v, dropout_p=0.1)
    assert choice.backend == "tiled"
    assert "dropout" in choice.reasons["sdpa"]


def test_keep_rate_and_unbiased_expectation():
    p = 0.25
    keep = dropout.keep_mask(
        12345,
        torch.arange(4).view(-1, 1, 1),
        torch.arange(256).view(1, -1, 1),
        torch.arange(256).view(1, 1, -1),
        p,
    )
    rate = keep.double().mean().item()
    assert abs(rate - (1 - p)) < 0.005  # 262144 draws: 5 sigma is about 0.004
    # Rows and columns are not copies of each other.
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, :, 0], keep[0, :, 1])
    assert not torch.equal(keep[0], keep[1])
    # E[dropout(attention)] = attention: average many seeds.
    q, k, v = make_qkv(Lq=4, Lk=6, D=8)
    exact = attnkit.attention(q, k, v)
    mean = torch.stack([attnkit.attention(q, k, v, dropout_p=p) for _ in range(400)]).mean(0)
    assert (mean - exact).abs().max() < 0.15


def test_dropout_mixer_is_a_bijection_on_a_sample():
    x = torch.arange(0, 2**20, dtype=torch.int64) * 4093
    x = x & 0xFFFFFFFF
    assert torch.unique(dropout.mix32(x)).numel() == x.numel()


def test_dropout_seed_is_drawn_on_the_cpu_under_any_default_device():
    """CPU tensors under ``torch.device("meta")`` draw the same pattern (a seed drawn on meta has no value)."""
    q, k, v = make_qkv(B=1, Hq=2, Hk=2, Lq=16, Lk=16, D=8)
    torch.manual_seed(3)
    expected = attnkit.attention(q, k, v, dropout_p=0.5)
    stats_expected = attnkit.attention_stats(q, k, v, dropout_p=0.5, return_output=True).output
    torch.manual_seed(3)
    with torch.device("meta"):
        out = attnkit.attention(q, k, v, dropout_p=0.5)
        stats_out = attnkit.attention_stats(q, k, v, dropout_p=0.5, return_output=True).output
    assert out.device.type == "cpu"
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(stats_out, stats_expected, rtol=0, atol=0)
