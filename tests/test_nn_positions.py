"""Positions: sinusoidal, learned, rotary (both layouts, offsets), checked against independent formulas."""

from __future__ import annotations

import math

import pytest
import torch

from attnkit.nn import LearnedPositions, RotaryEmbedding, SinusoidalPositions, sinusoidal_table


def test_sinusoidal_table_is_vaswani_formula():
    table = sinusoidal_table(50, 16, dtype=torch.float64)
    for p in (0, 1, 7, 49):
        for i in range(8):
            angle = p / 10000 ** (2 * i / 16)
            assert table[p, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-12)
            assert table[p, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-12)
    torch.testing.assert_close(sinusoidal_table(5, 16, offset=10, dtype=torch.float64), table[10:15])


def test_sinusoidal_module_adds_the_table_with_offset():
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    out = SinusoidalPositions(8)(x, offset=3)
    torch.testing.assert_close(out - x, sinusoidal_table(7, 8, dtype=torch.float64)[3:].expand(2, 4, 8))
    with pytest.raises(ValueError, match="even"):
        SinusoidalPositions(7)


def test_learned_positions_offset_and_limit():
    pos = LearnedPositions(10, 4)
    x = torch.zeros(1, 3, 4)
    torch.testing.assert_close(pos(x, offset=5)[0], pos.weight[5:8])
    with pytest.raises(ValueError, match="max_len=10"):
        pos(x, offset=8)


def _dot_products(rope, q, k, offset):
    rq, rk = rope(q, k, offset=offset)
    return rq @ rk.transpose(-1, -2)  # (B, H, L, L)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_rope_depends_on_relative_position_only(layout):
    rope = RotaryEmbedding(16, layout=layout)
    q = torch.randn(1, 2, 1, 16, dtype=torch.float64)
    k = torch.randn(1, 2, 1, 16, dtype=torch.float64)
    # the same vectors at positions (m, n) and (m + s, n + s) give the same q·k
    scores = {}
    for m, n in [(3, 1), (10, 8), (103, 101), (5, 9), (40, 44)]:
        rq, _ = rope(q, q, offset=m)
        _, rk = rope(k, k, offset=n)
        scores[(m, n)] = (rq * rk).sum(-1)
    torch.testing.assert_close(scores[(3, 1)], scores[(10, 8)], atol=1e-10, rtol=0)
    torch.testing.assert_close(scores[(3, 1)], scores[(103, 101)], atol=1e-10, rtol=0)
    torch.testing.assert_close(scores[(5, 9)], scores[(40, 44)], atol=1e-10, rtol=0)
    assert not torch.allclose(scores[(3, 1)], scores[(5, 9)])  # but it does depend on m - n
    # at position 0 nothing rotates; rotation keeps norms
    r0, _ = rope(q, q, offset=0)
    torch.testing.assert_close(r0, q)
    x = torch.randn(2, 3, 7, 16, dtype=torch.float64)
    rx, _ = rope(x, x, offset=4)
    torch.testing.assert_close(rx.norm(dim=-1), x.norm(dim=-1))


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_rope_offset_equals_slice_of_longer_sequence(layout):
    rope = RotaryEmbedding(8, base=500.0, layout=layout)
    q = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    k = torch.randn(2, 1, 9, 8, dtype=torch.float64)
    fq, fk = rope(q, k)
    pq, pk = rope(q[:, :, 6:], k[:, :, 6:], offset=6)
    torch.testing.assert_close(pq, fq[:, :, 6:])
    torch.testing.assert_close(pk, fk[:, :, 6:])


def test_rope_half_layout_matches_llama_rotate_half():
    """Independent check: rotate_half with frequencies repeated over both halves (GPT-NeoX / Llama form)."""
    D, L, base = 16, 6, 10000.0
    rope = RotaryEmbedding(D, base=base, layout="half")
    x = torch.randn(1, 2, L, D, dtype=torch.float64)
    inv = 1.0 / base ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    freqs = torch.outer(torch.arange(L, dtype=torch.float64), inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    rotate_half = torch.cat([-x[..., D // 2 :], x[..., : D // 2]], dim=-1)
    expected = x * emb.cos() + rotate_half * emb.sin()
    got, _ = rope(x, x)
    torch.testing.assert_close(got, expected)


def test_rope_interleaved_layout_matches_complex_multiplication():
    """Independent check: pairs (2i, 2i+1) as complex numbers times exp(i·p·θ_i) (RoFormer, original Llama)."""
    D, L = 8, 5
    rope = RotaryEmbedding(D, layout="interleaved")
    x = torch.randn(2, 1, L, D, dtype=torch.float64)
    inv = 1.0 / 10000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    angles = torch.outer(torch.arange(L, dtype=torch.float64), inv)
    z = torch.view_as_complex(x.reshape(2, 1, L, D // 2, 2).contiguous()) * torch.polar(torch.ones_like(angles), angles)
    expected = torch.view_as_real(z).reshape(2, 1, L, D)
    got, _ = rope(x, x)
    torch.testing.assert_close(got, expected)


def test_rope_low_precision_and_errors():
    rope = RotaryEmbedding(8)
    x = torch.randn(1, 1, 4, 8)
    lo, _ = rope(x.bfloat16(), x.bfloat16())
    hi, _ = rope(x, x)
    assert lo.dtype == torch.bfloat16
    torch.testing.assert_close(lo.float(), hi, atol=2e-2, rtol=0)
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(7)
    with pytest.raises(ValueError, match="layout"):
        RotaryEmbedding(8, layout="zigzag")
    with pytest.raises(ValueError, match="head dim 8"):
        rope(torch.randn(1, 1, 4, 6), torch.randn(1, 1, 4, 6))
    with pytest.raises(ValueError, match="offset"):
        rope(x, x, offset=-1)
