"""Regression cases for inputs that once gave a wrong answer without an error (issue 12, items 1-5, 9)."""

from __future__ import annotations

import pytest
import torch

import attnkit
from tests.conftest import make_qkv

BACKENDS = ("auto", "sdpa", "tiled", "reference")
f32 = torch.float32


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


# --------------------------------------------- the non-finite rule over rows longer than one block of keys
def _bad_key_cases():
    """``name -> (q, k, v, options)``: non-finite entries in one block, in a later block only, in blocks apart."""
    nan, inf = torch.nan, torch.inf
    q, k, v = make_qkv(2, 4, 2, 5, 8, 4)
    k[0, 1, 3, 0] = nan  # no mask at all: every row of heads 2, 3 of batch 0 reads it
    yield "one-block-no-mask", (q, k, v, {})
    q, k, v = make_qkv(1, 2, 1, 1100, 1100, 4)
    k[0, 0, 700, 2] = inf  # only in the second block; a window of 3 shows it to rows 700..703 only
    yield "later-block-window", (q, k, v, {"window": (3, 0)})
    q, k, v = make_qkv(1, 4, 2, 6, 1300, 4)
    k[0, 0, 5, 1] = nan  # first block, heads 0 and 1 (every row under causal)
    v[0, 1, 1299, 0] = -inf  # third block (the second has none), heads 2 and 3, the last key: row 5 only
    q[0, 2, 0, 3] = nan  # a bad query in a row that sees no bad key
    yield "blocks-apart-causal", (q, k, v, {"causal": True})
    q, k, v = make_qkv(2, 2, 2, 3, 600, 4)
    pad = attnkit.key_padding_mask(torch.tensor([600, 520]), 600)
    k[:, 1, 560, 0] = nan  # a real key in batch 0, a padded slot (never read) in batch 1
    yield "padding-hides-one", (q, k, v, {"mask": pad})


BAD_KEY_CASES = dict(_bad_key_cases())


@pytest.mark.parametrize("case", BAD_KEY_CASES)
def test_rows_that_read_a_bad_key_are_nan_and_only_those(case):
    """The rule against its definition: NaN where the query is bad or the row has a weight on a bad key.

    The rows are longer than `nonfinite.BLOCK_K`: bad keys in several blocks, in a later block only,
    in blocks with a clean one between, some hidden by a window, causal masking or padding.
    """
    from attnkit.functional import build_spec
    from attnkit.kernels import nonfinite, reference

    q, k, v, options = BAD_KEY_CASES[case]
    spec = build_spec(q, k, v, **options)
    clean_k, clean_v = nonfinite.clean(k), nonfinite.clean(v)
    weights, _ = reference.attention_probs(q, clean_k, spec)  # (B, Hq, Lq, Lk)
    kv_bad = ~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1)).repeat_interleave(spec.group, dim=1)
    want = ~torch.isfinite(q).all(-1) | ((weights > 0) & kv_bad[:, :, None, :]).any(-1)  # (B, Hq, Lq)
    assert want.any() and not want.all()
    assert torch.equal(nonfinite.poisoned_rows(spec, nonfinite.find(q, k, v)), want)
    out, lse = attnkit.attention(q, k, v, return_lse=True, **options)
    assert torch.equal(out.isnan().all(-1), want) and torch.equal(out.isnan().any(-1), want)
    assert torch.equal(lse.isnan(), want)
    ref, ref_lse = reference.forward(q, clean_k, clean_v, spec)  # the other rows never read a bad entry
    torch.testing.assert_close(out[~want], ref[~want], rtol=0, atol=1e-12)
    torch.testing.assert_close(lse[~want], ref_lse[~want], rtol=0, atol=1e-12)


def test_finding_poisoned_rows_visits_each_block_of_keys_once(monkeypatch):
    """One allowed tile per block of `BLOCK_K` keys holding a bad key, from the first bad key on, on q's device."""
    from attnkit.functional import build_spec
    from attnkit.kernels import nonfinite
    from attnkit.spec import AttentionSpec

    q, k, v, options = BAD_KEY_CASES["blocks-apart-causal"]
    spec = build_spec(q, k, v, **options)
    tiles = []
    real = AttentionSpec.allowed_tile
    monkeypatch.setattr(AttentionSpec, "allowed_tile", lambda self, *a: tiles.append(a) or real(self, *a))
    nonfinite.poisoned_rows(spec, nonfinite.find(q, k, v))
    assert nonfinite.BLOCK_K == 512
    # keys 5 and 1299 (the block [517, 1029) holds none), each tile made on the inputs' device (not torch's default)
    assert tiles == [(0, 6, 5, 517, q.device), (0, 6, 1029, 1300, q.device)]


# ------------------------------------------------------------ PyTorch's fused CPU kernel, called directly
@pytest.mark.parametrize(
    ("q_dtype", "mask_dtype"),
    [(f32, torch.float64), (f32, torch.float16), (torch.float16, torch.float64), (torch.bfloat16, f32)],
)
def test_flash_cpu_forward_takes_a_mask_of_any_float_dtype(q_dtype, mask_dtype):
    """The kernel itself refuses a mask whose dtype is not q's; `flash_cpu.forward` casts it (and no further)."""
    from attnkit.kernels import flash_cpu

    q, k, v = make_qkv(1, 2, 2, 8, 8, 4, dtype=q_dtype)
    mask = torch.randn(1, 1, 8, 8).to(mask_dtype)
    mask[..., 2, :5] = -torch.inf
    mask[..., 4, :] = -torch.inf  # a row with no allowed key: output 0, lse -inf
    out, lse = flash_cpu.forward(q, k, v, mask=mask, is_causal=False, scale=0.5)
    want, want_lse = _reference(q, k, v, mask=mask, scale=0.5, return_lse=True)
    atol = 1e-5 if q_dtype == torch.float32 else 2e-2
    assert out.dtype == q_dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), want, rtol=0, atol=atol)
    torch.testing.assert_close(lse.double(), want_lse, rtol=0, atol=atol)


@pytest.mark.parametrize(("dtype", "lse_dtype"), [(torch.float32, torch.float64), (torch.float64, torch.float32)])
def test_flash_cpu_backward_takes_the_lse_in_any_float_dtype(dtype, lse_dtype):
    """The kernel's backward refuses an lse that is not in its accumulation dtype; `flash_cpu.backward` casts it."""
    from attnkit.kernels import flash_cpu

    q, k, v = make_qkv(1, 2, 2, 8, 8, 4, dtype=dtype)
    out, lse = flash_cpu.forward(q, k, v, mask=None, is_causal=True, scale=0.5)
    dout = torch.randn(out.shape, dtype=dtype)
    got = flash_cpu.backward(dout, q, k, v, out, lse.to(lse_dtype), mask=None, is_causal=True, scale=0.5)
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    ref = attnkit.attention(qd, kd, vd, causal=True, scale=0.5, backend="reference")
    want = torch.autograd.grad((ref * dout.double()).sum(), (qd, kd, vd))
    atol = 1e-5 if dtype == torch.float32 else 1e-6  # an fp32 lse for fp64 inputs: rounded at 1e-7
    for g, w in zip(got, want, strict=True):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), w, rtol=0, atol=atol)


@pytest.mark.parametrize("alibi", ["standard", "list"])
def test_fp64_alibi_slopes_are_not_rounded_to_fp32(alibi):
    """fp64 attention uses fp64 slopes: the standard ones for 12 heads, and Python floats passed as a list."""
    torch.manual_seed(0)
    H, L = 12, 64
    q, k, v = (torch.randn(1, H, L, 8, dtype=torch.float64) for _ in range(3))
    if alibi == "standard":
        # Press et al.: 8 slopes 2^-1 .. 2^-8, then every other one of 16 heads' (2^-0.5, 2^-1.5, ...)
        arg, exact = True, [2.0 ** -(h + 1) for h in range(8)] + [2.0 ** (-(2 * h + 1) / 2) for h in range(4)]
    else:
        arg = exact = [1 / (h + 3) for h in range(H)]
    slopes = torch.tensor(exact, dtype=torch.float64)
    i = torch.arange(L, dtype=torch.float64)
    bias = -slopes.view(H, 1, 1) * (i[:, None] - i[None, :]).abs()  # (H, L, L)
    want = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5 + bias, dim=-1) @ v
    got = attnkit.attention(q, k, v, alibi=arg, backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)  # fp32 slopes: off by ~1e-8
