"""`attnkit.attention_varlen` on CPU: the per-sequence path against `attention()` run sequence by sequence."""

from __future__ import annotations

import pytest
import torch

import attnkit


def _packed(lens_q, lens_k, Hq=4, Hk=2, D=16, Dv=12, dtype=torch.float64):
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(lens_q), Hq, D, dtype=dtype, requires_grad=True)
    k = torch.randn(sum(lens_k), Hk, D, dtype=dtype, requires_grad=True)
    v = torch.randn(sum(lens_k), Hk, Dv, dtype=dtype, requires_grad=True)
    return q, k, v, cu_q, cu_k


@pytest.mark.parametrize(
    "opts",
    [{}, dict(causal=True), dict(window=(3, 1), alibi=True), dict(softcap=2.0, scale=0.5)],
    ids=["plain", "causal", "window_alibi", "softcap"],
)
def test_matches_attention_per_sequence(opts):
    lens_q, lens_k = [5, 0, 13, 9, 1], [7, 3, 13, 4, 6]
    q, k, v, cu_q, cu_k = _packed(lens_q, lens_k)
    out, lse = attnkit.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, **opts)
    assert out.shape == (sum(lens_q), 4, 12) and lse.shape == (4, sum(lens_q))
    dout = torch.randn_like(out)
    gq, gk, gv = torch.autograd.grad((out * dout).sum(), (q, k, v))
    for b in range(len(lens_q)):
        sq, sk = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        if lens_q[b] == 0:
            continue
        qb, kb, vb = (x[s].transpose(0, 1).unsqueeze(0) for x, s in ((q, sq), (k, sk), (v, sk)))  # (1, H, L, D)
        want, want_lse = attnkit.attention(qb, kb, vb, return_lse=True, backend="reference", **opts)
        torch.testing.assert_close(out[sq], want[0].transpose(0, 1))
        torch.testing.assert_close(lse[:, sq], want_lse[0])
        wq, wk, wv = torch.autograd.grad((want[0].transpose(0, 1) * dout[sq]).sum(), (q, k, v))
        torch.testing.assert_close(gq[sq], wq[sq])
        torch.testing.assert_close(gk[sk], wk[sk])
        torch.testing.assert_close(gv[sk], wv[sk])


def test_sequence_without_keys_gives_zeros_and_empty_lse():
    q, k, v, cu_q, cu_k = _packed([3, 4], [0, 5])
    out, lse = attnkit.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True)
    assert bool((out[:3] == 0).all()) and bool(torch.isneginf(lse[:, :3]).all())
    assert bool(torch.isfinite(lse[:, 3:]).all())


def test_backends_agree_and_dropout_is_reproducible():
    q, k, v, cu_q, cu_k = _packed([6, 11], [6, 11])
    ref = attnkit.attention_varlen(q, k, v, cu_q, cu_k, causal=True, backend="reference")
    tiled = attnkit.attention_varlen(q, k, v, cu_q, cu_k, causal=True, backend="tiled")
    torch.testing.assert_close(tiled, ref)
    torch.manual_seed(3)
    a = attnkit.attention_varlen(q, k, v, cu_q, cu_k, dropout_p=0.5)
    torch.manual_seed(3)
    b = attnkit.attention_varlen(q, k, v, cu_q, cu_k, dropout_p=0.5, backend="reference")
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, attnkit.attention_varlen(q, k, v, cu_q, cu_k))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(cu_seqlens_q=torch.tensor([0, 3, 2])), "never decrease"),
        (dict(cu_seqlens_q=torch.tensor([0, 3, 9])), "end at the packed length"),
        (dict(cu_seqlens_k=torch.tensor([0, 5])), "same number of sequences"),
        (dict(cu_seqlens_q=torch.tensor([0.0, 3.0, 7.0])), "int32/int64"),
        (dict(max_seqlen_q=2), "shorter than the longest"),
        (dict(mask=torch.ones(7, 5, dtype=torch.bool)), "mask is not supported"),
        (dict(q=torch.randn(1, 7, 4, 16)), "3-D"),
    ],
)
def test_errors_name_the_argument(change, match):
    q, k, v, cu_q, cu_k = _packed([3, 4], [2, 3])
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        attnkit.attention_varlen(**args)


def test_triton_backend_refuses_cpu_with_a_reason():
    q, k, v, cu_q, cu_k = _packed([3, 4], [2, 3], dtype=torch.float32)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        attnkit.attention_varlen(q, k, v, cu_q, cu_k, backend="triton")
