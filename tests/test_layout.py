"""``layout="blhd"``: (B, L, H, D) tensors give the (B, H, L, D) path's results, transposed, on every backend."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit import hooks
from tests.conftest import grads, make_qkv


def _blhd(*tensors):
    """Copies laid out as ``(B, L, H, D)`` in memory (what a ``(B, L, H * D)`` projection views as)."""
    return [x.detach().transpose(1, 2).contiguous().requires_grad_(x.requires_grad) for x in tensors]


@pytest.mark.parametrize(
    ("backend", "options"),
    [
        ("reference", {"causal": True, "alibi": True, "softcap": 5.0}),
        ("tiled", {"window": (4, 2), "dropout_p": 0.3}),
        ("tiled", {"mask": "float", "causal": True}),
        ("sdpa", {"mask": "bool"}),
        ("auto", {}),
    ],
)
def test_blhd_equals_bhld(backend, options):
    q, k, v = make_qkv(Lq=13, Lk=19, D=8, grad=True)  # GQA, Lq != Lk, fp64
    if options.get("mask") == "bool":
        options = {**options, "mask": torch.rand(2, 1, 13, 19) > 0.3}
    elif options.get("mask") == "float":
        options = {**options, "mask": torch.randn(2, 4, 13, 19, dtype=torch.float64)}
    want_lse = backend != "sdpa"  # SDPA's lse carries no gradient, so it refuses it here

    def call(q, k, v, layout):
        torch.manual_seed(3)  # the same dropout pattern for both layouts
        result = attnkit.attention(q, k, v, backend=backend, return_lse=want_lse, layout=layout, **options)
        return result if want_lse else (result, None)

    out, lse = call(q, k, v, "bhld")
    expected = grads(out, (q, k, v))
    qb, kb, vb = _blhd(q, k, v)
    out_b, lse_b = call(qb, kb, vb, "blhd")
    if want_lse:
        torch.testing.assert_close(lse_b, lse)  # lse keeps (B, Hq, Lq)
    assert out_b.shape == (2, 13, 4, 8)
    torch.testing.assert_close(out_b, out.transpose(1, 2))
    got = grads(out_b.transpose(1, 2), (qb, kb, vb))
    for g_b, g in zip(got, expected, strict=True):
        torch.testing.assert_close(g_b.transpose(1, 2), g)


def test_blhd_reaches_the_kernels_as_views():
    """Hooks (and so the kernels) see (B, H, L, D) views of the caller's storage: no copy is made."""
    q, k, v = _blhd(*make_qkv(Lq=5, Lk=7, D=8, dtype=torch.float32))
    seen = []

    def watch(call, proceed):
        seen.append((call.q, call.k, call.v))
        return proceed(call)

    with hooks.attention_hook(watch):
        out = attnkit.attention(q, k, v, layout="blhd")
    for view, base in zip(seen[0], (q, k, v), strict=True):
        assert view.shape == base.transpose(1, 2).shape and view.data_ptr() == base.data_ptr()
    assert out.shape == (2, 5, 4, 8)
    assert out.stride(-1) == 1


def test_attention_stats_blhd():
    q, k, v = make_qkv(Lq=11, Lk=11, D=8)
    st = attnkit.attention_stats(q, k, v, causal=True, topk=2, pool=4, return_output=True)
    st_b = attnkit.attention_stats(*_blhd(q, k, v), causal=True, topk=2, pool=4, return_output=True, layout="blhd")
    torch.testing.assert_close(st_b.entropy, st.entropy)
    torch.testing.assert_close(st_b.pooled, st.pooled)
    torch.testing.assert_close(st_b.output, st.output.transpose(1, 2))


@pytest.mark.parametrize("fn", [attnkit.attention, attnkit.attention_stats])
def test_layout_is_validated(fn):
    q, k, v = make_qkv(Lq=3, Lk=3, D=4)
    with pytest.raises(ValueError, match=r"layout must be 'bhld' \(B, H, L, D\) or 'blhd' \(B, L, H, D\), got 'bshd'"):
        fn(q, k, v, layout="bshd")
    with pytest.raises(ValueError, match=r"with layout='blhd' k must be 4-D \(B, L, H, D\), got shape \(2, 3, 4\)"):
        attnkit.attention(q, k[0], v, layout="blhd")
