"""`attnkit.attention_varlen` on CPU: the per-sequence path against `attention()` run sequence by sequence."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

import attnkit
from attnkit import dropout
from attnkit.functional import build_spec, build_varlen_spec
from attnkit.kernels import ops, packed, reference
from attnkit.varlen import VARLEN_SEED_STEP


def _dense(*xs):
    """Packed ``(L, H, D)`` tensors of one sequence as ``(1, H, L, D)`` views."""
    return [x.transpose(0, 1).unsqueeze(0) for x in xs]


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
    lens_q, lens_k = [5, 0, 13, 9, 1], [7, 3, 13, 4, 1]  # the last sequence has one key
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


def test_sequences_without_keys_give_zeros_and_the_next_ones_still_run():
    """A sequence with no key gives 0 and lse -inf; the sequences after it are computed as usual."""
    q, k, v, cu_q, cu_k = _packed([3, 4, 2, 5], [0, 5, 0, 6])
    out, lse = attnkit.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True)
    assert out.shape == (14, 4, 12) and lse.shape == (4, 14) and lse.dtype == torch.float64
    for rows in (slice(0, 3), slice(7, 9)):
        assert bool((out[rows] == 0).all()) and bool(torch.isneginf(lse[:, rows]).all())
    for rows, keys in ((slice(3, 7), slice(0, 5)), (slice(9, 14), slice(5, 11))):
        want, want_lse = attnkit.attention(*_dense(q[rows], k[keys], v[keys]), return_lse=True, backend="reference")
        torch.testing.assert_close(out[rows], want[0].transpose(0, 1))
        torch.testing.assert_close(lse[:, rows], want_lse[0])


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


_CU_FORM = "must be a 1-D int32/int64 tensor (S + 1,), got "
_CU_VALUES = "must start at 0, never decrease and end at the packed length 7, got "


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(cu_seqlens_q=torch.tensor([0, 3, 2])), "cu_seqlens_q " + _CU_VALUES + "[0, 3, 2]"),
        (dict(cu_seqlens_q=torch.tensor([0, 3, 9])), "cu_seqlens_q " + _CU_VALUES + "[0, 3, 9]"),
        (dict(cu_seqlens_q=torch.tensor([1, 3, 7])), "cu_seqlens_q " + _CU_VALUES + "[1, 3, 7]"),
        # Up to 12 values are shown in full, longer lists as their first 6 and last 3.
        (dict(cu_seqlens_q=torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 7, 7, 7, 6])),
         "cu_seqlens_q " + _CU_VALUES + "[0, 1, 2, 3, 4, 5, 6, 7, 7, 7, 7, 6]"),
        (dict(cu_seqlens_q=torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 7, 7, 7, 7, 6])),
         "cu_seqlens_q " + _CU_VALUES + "[0, 1, 2, 3, 4, 5, '...', 7, 7, 6]"),
        (dict(cu_seqlens_k=torch.tensor([0, 5])),
         "cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got 2 and 1"),
        (dict(cu_seqlens_q=torch.tensor([0.0, 3.0, 7.0])), "cu_seqlens_q " + _CU_FORM + "torch.float32 of shape (3,)"),
        (dict(cu_seqlens_k=torch.tensor([[0, 2, 5]])), "cu_seqlens_k " + _CU_FORM + "torch.int64 of shape (1, 3)"),
        (dict(cu_seqlens_k=[0, 2, 5]), "cu_seqlens_k " + _CU_FORM + "list"),
        (dict(cu_seqlens_q=torch.tensor([0, 3, 7], device="meta")), "cu_seqlens_q is on meta but q is on cpu"),
        (dict(max_seqlen_q=2), "max_seqlen_q=2 is shorter than the longest sequence (4)"),
        (dict(mask=torch.ones(7, 5, dtype=torch.bool)), "mask is not supported (got a mask)"),
        (dict(q=torch.randn(1, 7, 4, 16)), "q must be 3-D (total_q, Hq, D) (packed), got shape (1, 7, 4, 16)"),
    ],
    ids=["decreasing", "past_the_end", "not_from_0", "12_values_in_full", "13_values_cut", "counts", "float_dtype",
         "2d", "list", "device", "max_seqlen", "mask", "4d_q"],
)  # fmt: skip
def test_errors_name_the_argument(change, message):
    """Each message names the argument, what it must be and what arrived (the values, counts, dtype or type)."""
    q, k, v, cu_q, cu_k = _packed([3, 4], [2, 3])
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    args.update(change)
    with pytest.raises(ValueError, match=f"^attention_varlen: {re.escape(message)}"):
        attnkit.attention_varlen(**args)


def test_triton_backend_refuses_cpu_with_a_reason():
    q, k, v, cu_q, cu_k = _packed([3, 4], [2, 3], dtype=torch.float32)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        attnkit.attention_varlen(q, k, v, cu_q, cu_k, backend="triton")


def test_each_sequence_draws_dropout_with_its_documented_seed():
    """Sequence ``b`` drops with seed ``seed + b * VARLEN_SEED_STEP`` (mod 2**32), ``seed`` drawn as in `attention`."""
    lens = [5, 6, 4]
    q, k, v, cu_q, cu_k = _packed(lens, lens)
    torch.manual_seed(11)
    seed = dropout.new_seed()
    torch.manual_seed(11)
    out = attnkit.attention_varlen(q, k, v, cu_q, cu_k, dropout_p=0.5)
    for b in range(len(lens)):
        rows = slice(cu_q[b], cu_q[b + 1])
        qb, kb, vb = _dense(q[rows], k[rows], v[rows])
        spec = dataclasses.replace(
            build_spec(qb, kb, vb, dropout_p=0.5), dropout_seed=(seed + b * VARLEN_SEED_STEP) % 2**32
        )
        want, _ = reference.attention(qb, kb, vb, spec)
        torch.testing.assert_close(out[rows], want[0].transpose(0, 1))


@pytest.mark.parametrize("return_lse", [False, True])
def test_sdpa_runs_a_packed_batch_sequence_by_sequence(return_lse):
    """``sdpa`` has no varlen kernel: each sequence runs through its dense kernel, asked for the lse only if wanted."""
    q, k, v, cu_q, cu_k = (x.detach() for x in _packed([4, 1, 6], [4, 1, 6], Dv=16))
    got = attnkit.attention_varlen(q, k, v, cu_q, cu_k, causal=True, backend="sdpa", return_lse=return_lse)
    want = attnkit.attention_varlen(q, k, v, cu_q, cu_k, causal=True, backend="reference", return_lse=return_lse)
    torch.testing.assert_close(got, want)


def test_a_sequence_the_backend_refuses_is_named():
    """The packed request suits SDPA (longest 5 queries, 5 keys) but sequence 1 (3 queries, causal over 4 keys) not."""
    q, k, v, cu_q, cu_k = _packed([5, 3], [5, 4], Dv=16)
    with pytest.raises(
        ValueError,
        match=r"^attention_varlen: the backend cannot run sequence 1: SDPA aligns causal top-left; attnkit aligns",
    ):
        attnkit.attention_varlen(q, k, v, cu_q, cu_k, causal=True, backend="sdpa")


@pytest.mark.parametrize("return_lse", [False, True])
def test_the_dense_kernel_is_asked_about_each_sequence_as_it_runs(return_lse):
    """`packed.per_sequence` asks ``refusal`` and ``run`` about each sequence's views and spec, and ``return_lse``.

    A backend that cannot give the log-sum-exp (it says so through ``refusal``) must never be asked for it.
    """
    q, k, v, cu_q, cu_k = _packed([2, 0, 3], [4, 2, 1])
    spec = build_varlen_spec(q, k, v, cu_q, cu_k)[0]
    asked = []

    def refusal(qb, spec_b, lse):
        asked.append(("refusal", tuple(qb.shape), spec_b.batch, spec_b.q_len, spec_b.kv_len, lse))
        return None

    def run(qb, kb, vb, spec_b, lse):
        asked.append(("run", tuple(qb.shape), tuple(kb.shape), tuple(vb.shape), spec_b.q_len, spec_b.kv_len, lse))
        out_b, lse_b = reference.attention(qb, kb, vb, spec_b)
        return out_b, lse_b if lse else None

    out, lse = packed.per_sequence(run, refusal, q, k, v, cu_q, cu_k, spec, return_lse)
    assert asked == [
        ("refusal", (1, 4, 2, 16), 1, 2, 4, return_lse),
        ("run", (1, 4, 2, 16), (1, 2, 4, 16), (1, 2, 4, 12), 2, 4, return_lse),
        ("refusal", (1, 4, 3, 16), 1, 3, 1, return_lse),
        ("run", (1, 4, 3, 16), (1, 2, 1, 16), (1, 2, 1, 12), 3, 1, return_lse),
    ]
    assert out.shape == (5, 4, 12) and (lse.shape == (4, 5) if return_lse else lse is None)


def _varlen_op(q, k, v, cu_q, cu_k, spec):
    """``attnkit::varlen_forward``, the one op a compiled `attention_varlen` runs, called eagerly with its autograd."""
    args = ops.spec_arguments(spec, q.device)
    del args["mask"], args["align"]
    return torch.ops.attnkit.varlen_forward(q, k, v, cu_q, cu_k, **args)


def test_packed_op_without_any_query_or_any_key():
    """No sequence with queries: empty ``out`` and ``lse``; none with keys: 0 and -inf. Dtypes as the op's fake says."""
    spec = build_spec(*_dense(*_packed([3], [3])[:3]))  # the op takes only its scalars
    f64 = torch.float64
    q, k, v = torch.randn(0, 4, 16, dtype=f64), torch.randn(5, 2, 16, dtype=f64), torch.randn(5, 2, 12, dtype=f64)
    out, lse = _varlen_op(q, k, v, torch.tensor([0, 0, 0]), torch.tensor([0, 2, 5]), spec)
    assert (out.shape, out.dtype, lse.shape, lse.dtype) == ((0, 4, 12), torch.float64, (4, 0), torch.float64)
    q, k, v = torch.randn(5, 4, 16, dtype=f64), torch.randn(0, 2, 16, dtype=f64), torch.randn(0, 2, 12, dtype=f64)
    out, lse = _varlen_op(q, k, v, torch.tensor([0, 2, 5]), torch.tensor([0, 0, 0]), spec)
    assert (out.shape, out.dtype, lse.shape, lse.dtype) == ((5, 4, 12), torch.float64, (4, 5), torch.float64)
    assert bool((out == 0).all()) and bool(torch.isneginf(lse).all())


@pytest.mark.parametrize(
    ("lens_q", "lens_k"), [([0, 0], [2, 3]), ([2, 3], [0, 0])], ids=["no_query_anywhere", "no_key_anywhere"]
)
def test_per_sequence_makes_its_outputs_on_q_device_when_no_sequence_runs(lens_q, lens_k):
    """``out`` and ``lse`` follow ``q``'s device and dtype, not torch's defaults (meta stands in for a GPU here)."""
    spec = build_spec(*_dense(*_packed([3], [3])[:3]))  # Hq 4, Dv 12, fp64 accumulation

    def never(*args):
        raise AssertionError("no sequence has both queries and keys: nothing may run")

    cu_q, cu_k = (torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()]) for lens in (lens_q, lens_k))
    meta = dict(dtype=torch.float64, device="meta")
    q, k, v = (
        torch.empty(sum(lens_q), 4, 16, **meta),
        torch.empty(sum(lens_k), 2, 16, **meta),
        torch.empty(sum(lens_k), 2, 12, **meta),
    )
    out, lse = packed.per_sequence(never, never, q, k, v, cu_q, cu_k, spec, True)
    assert (out.shape, out.dtype, out.device) == ((sum(lens_q), 4, 12), torch.float64, q.device)
    assert (lse.shape, lse.dtype, lse.device) == ((4, sum(lens_q)), torch.float64, q.device)


@pytest.mark.parametrize("with_lse", [False, True], ids=["out", "out_and_lse"])
@pytest.mark.parametrize(
    "opts", [dict(causal=True, alibi=True), dict(window=(2, 1), dropout_p=0.3)], ids=["causal_alibi", "window_dropout"]
)
def test_packed_op_gradients_match_the_reference_sequence_by_sequence(opts, with_lse):
    """The backward of ``attnkit::varlen_forward`` (`packed.per_sequence_backward`) against fp64 autograd per sequence.

    Sequences without queries, without keys, of one query and one key, and more queries than keys.
    """
    lens_q, lens_k = [0, 3, 1, 4, 5], [4, 0, 1, 6, 2]
    q, k, v, cu_q, cu_k = _packed(lens_q, lens_k)
    spec = build_varlen_spec(q, k, v, cu_q, cu_k, **opts)[0]
    out, lse = _varlen_op(q, k, v, cu_q, cu_k, spec)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse) if with_lse else torch.zeros_like(lse)

    def loss(out, lse, rows):  # lse -inf (no key) carries no gradient
        return (out * dout[rows]).sum() + (lse.nan_to_num(neginf=0.0) * dlse[:, rows]).sum()

    got = torch.autograd.grad(loss(out, lse, slice(None)), (q, k, v))
    want = q.new_zeros(())
    for b in range(len(lens_q)):
        rows, keys = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        if lens_q[b] == 0 or lens_k[b] == 0:
            continue
        qb, kb, vb = _dense(q[rows], k[keys], v[keys])
        seed = None if spec.dropout_seed is None else (spec.dropout_seed + b * VARLEN_SEED_STEP) % 2**32
        spec_b = dataclasses.replace(build_spec(qb, kb, vb, **opts), dropout_seed=seed)
        out_b, lse_b = reference.attention(qb, kb, vb, spec_b)  # (1, Hq, Lq, Dv), (1, Hq, Lq)
        torch.testing.assert_close(out[rows], out_b[0].transpose(0, 1))
        want = want + loss(out_b[0].transpose(0, 1), lse_b[0], rows)
    # keys of a sequence without queries, and queries of one without keys, get 0
    for g, w in zip(got, torch.autograd.grad(want, (q, k, v)), strict=True):
        torch.testing.assert_close(g, w)
