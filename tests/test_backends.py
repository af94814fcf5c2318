"""Every backend against the float64 reference: outputs, log-sum-exp and gradients.

The tiled kernel is run with small blocks so that every request spans many tiles, with
both of its tile engines (plain PyTorch and PyTorch's fused CPU flash kernel).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnkit
from attnkit.functional import build_spec
from attnkit.kernels import tiled
from tests.conftest import grads, make_qkv

f64 = torch.float64


def run(q, k, v, backend, options, mask=None, engine=None, blocks=(16, 32)):
    """(out, lse) through the public function, or through the tiled kernel with small blocks."""
    opts = dict(options)
    if mask is not None:
        opts["mask"] = mask
    if backend.startswith("tiled"):
        spec = build_spec(q, k, v, **opts)
        return tiled.attention(q, k, v, spec, block_q=blocks[0], block_k=blocks[1], engine=engine)
    out = attnkit.attention(q, k, v, backend=backend, **opts)
    return out, None


def assert_matches_reference(q, k, v, options, backend, *, mask=None, engine=None, atol=1e-10):
    inputs = [q, k, v] + ([mask] if mask is not None and mask.requires_grad else [])
    torch.manual_seed(7)
    ref, ref_lse = attnkit.attention(q, k, v, backend="reference", return_lse=True, mask=mask, **options)
    ref_grads = grads(ref, inputs)
    torch.manual_seed(7)
    out, lse = run(q, k, v, backend, options, mask=mask, engine=engine)
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, atol=atol, rtol=0)
    if lse is not None:
        assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
        finite = torch.isfinite(ref_lse)
        torch.testing.assert_close(lse[finite], ref_lse[finite], atol=atol, rtol=0)
    for name, got, want in zip(["dq", "dk", "dv", "dmask"], grads(out, inputs), ref_grads):
        assert got is not None and not got.isnan().any(), name
        torch.testing.assert_close(got, want, atol=atol, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


FEATURES = {
    "plain": {},
    "causal": {"causal": True},
    "window": {"window": (5, 3)},
    "causal_window": {"causal": True, "window": (7, None)},
    "alibi": {"alibi": True},
    "softcap": {"softcap": 3.0},
    "scale": {"scale": 0.3},
    "everything": {"causal": True, "window": (9, 0), "alibi": True, "softcap": 4.0},
}
SHAPES = {
    "Lq<Lk": dict(Lq=37, Lk=53),
    "Lq>Lk": dict(Lq=53, Lk=37),
    "L=1": dict(Lq=1, Lk=29),
    "odd_D": dict(Lq=20, Lk=20, D=13, Dv=7),
    "mqa": dict(Hq=4, Hk=1, Lq=19, Lk=40),
}
TILED = [("tiled", "torch"), ("tiled", "fused"), ("tiled", None)]


@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("backend", "engine"), TILED)
def test_tiled_matches_reference(feature, shape, backend, engine):
    q, k, v = make_qkv(**SHAPES[shape], grad=True)
    options = FEATURES[feature]
    if engine == "fused" and (options.get("softcap") or q.shape[-1] != v.shape[-1]):
        pytest.skip("the fused engine takes no softcap and needs Dv == D (the torch engine covers these)")
    assert_matches_reference(q, k, v, options, backend, engine=engine)


@pytest.mark.parametrize("feature", ["plain", "causal", "scale"])
@pytest.mark.parametrize("shape", SHAPES)
def test_auto_and_sdpa_match_reference(feature, shape):
    q, k, v = make_qkv(**SHAPES[shape], grad=True)
    options = FEATURES[feature]
    assert_matches_reference(q, k, v, options, "auto")
    spec = build_spec(q, k, v, **options)
    if attnkit.backends.sdpa.refusal(q, spec, False) is None:
        assert_matches_reference(q, k, v, options, "sdpa")


@pytest.mark.parametrize("backend", ["tiled", "auto", "sdpa"])
@pytest.mark.parametrize("kind", ["key_padding", "bool_full", "float_full", "float_grad", "bool_with_empty_rows"])
def test_masks(backend, kind):
    q, k, v = make_qkv(Lq=24, Lk=40, grad=True)
    B, Hq, Lq, Lk = 2, 4, 24, 40
    if kind == "key_padding":
        mask = attnkit.key_padding_mask(torch.tensor([40, 17]), Lk)  # (B, 1, 1, Lk)
    elif kind in ("bool_full", "bool_with_empty_rows"):
        mask = torch.rand(B, Hq, Lq, Lk) > 0.4
        if kind == "bool_with_empty_rows":
            mask[0, 1, 3] = False
            mask[1, :, 20:] = False
    else:
        mask = torch.randn(B, 1, Lq, Lk, dtype=f64).requires_grad_(kind == "float_grad")
    if backend == "sdpa" and kind == "float_grad":
        spec = build_spec(q, k, v, mask=mask)
        assert "gradient" in attnkit.backends.sdpa.refusal(q, spec, False)
        return
    assert_matches_reference(q, k, v, {}, backend, mask=mask)


def test_tiled_float_mask_gradient_broadcast_shapes():
    q, k, v = make_qkv(Lq=20, Lk=33, grad=True)
    for shape in [(33,), (1, 1, 20, 33), (2, 1, 1, 33), (4, 1, 33)]:
        mask = torch.randn(*shape, dtype=f64, requires_grad=True)
        assert_matches_reference(q, k, v, {"causal": True}, "tiled", mask=mask)


def test_gradient_of_lse_flows_in_tiled():
    q, k, v = make_qkv(Lq=21, Lk=30, grad=True)
    spec = build_spec(q, k, v, causal=True, alibi=True)
    out, lse = tiled.attention(q, k, v, spec, block_q=8, block_k=8)
    ref, ref_lse = attnkit.attention(q, k, v, causal=True, alibi=True, backend="reference", return_lse=True)
    g = torch.autograd.grad((out.sum() + lse.sum()), (q, k, v))
    r = torch.autograd.grad((ref.sum() + ref_lse.sum()), (q, k, v))
    for a, b in zip(g, r):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_gradcheck_tiled_fp64():
    q, k, v = make_qkv(B=1, Hq=2, Hk=1, Lq=6, Lk=9, D=4, Dv=3, grad=True)
    mask = torch.randn(1, 1, 6, 9, dtype=f64, requires_grad=True)
    for options in ({"causal": True, "alibi": True, "softcap": 2.0}, {"window": (2, 1)}):

        def fn(q, k, v, mask, options=options):
            spec = build_spec(q, k, v, mask=mask, **options)
            out, lse = tiled.attention(q, k, v, spec, block_q=2, block_k=4)
            return out, lse

        assert torch.autograd.gradcheck(fn, (q, k, v, mask), atol=1e-8)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(1, 2),
    Hk=st.integers(1, 2),
    group=st.integers(1, 3),
    Lq=st.integers(1, 40),
    Lk=st.integers(1, 40),
    D=st.integers(1, 20),
    causal=st.booleans(),
    window=st.one_of(st.none(), st.tuples(st.one_of(st.none(), st.integers(0, 12)), st.integers(0, 12))),
    alibi=st.booleans(),
    softcap=st.one_of(st.none(), st.floats(0.5, 20.0)),
    mask_kind=st.sampled_from(["none", "padding", "bool", "float"]),
    blocks=st.tuples(st.integers(1, 17), st.integers(1, 17)),
)
def test_property_tiled_equals_reference(B, Hk, group, Lq, Lk, D, causal, window, alibi, softcap, mask_kind, blocks):
    q, k, v = make_qkv(B=B, Hq=Hk * group, Hk=Hk, Lq=Lq, Lk=Lk, D=D, grad=True)
    mask = None
    if mask_kind == "padding":
        mask = attnkit.key_padding_mask(torch.randint(0, Lk + 1, (B,)), Lk)
    elif mask_kind == "bool":
        mask = torch.rand(B, 1, Lq, Lk) > 0.3
    elif mask_kind == "float":
        mask = torch.randn(1, Hk * group, Lq, Lk, dtype=f64)
    options = dict(causal=causal, window=window, alibi=alibi, softcap=softcap, mask=mask)
    ref, ref_lse = attnkit.attention(q, k, v, backend="reference", return_lse=True, **options)
    r = grads(ref, (q, k, v))
    for engine in ("torch", None):
        spec = build_spec(q, k, v, **options)
        out, lse = tiled.attention(q, k, v, spec, block_q=blocks[0], block_k=blocks[1], engine=engine)
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
        assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
        for a, b in zip(grads(out, (q, k, v)), r):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


# ---------------------------------------------------------------- low precision
def plain_torch_attention(q, k, v, causal):
    """Attention written plainly in the inputs' dtype: FlashAttention's yardstick for low precision."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(s.shape[-1] - s.shape[-2]), float("-inf"))
    return torch.softmax(s, dim=-1) @ v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["tiled", "sdpa", "auto"])
@pytest.mark.parametrize("causal", [False, True])
def test_low_precision_within_twice_plain_torch_error(dtype, backend, causal):
    """FlashAttention's rule: error vs fp64 at most 2x that of plain attention in the same dtype."""
    q64, k64, v64 = make_qkv(B=1, Hq=4, Hk=4, Lq=300, Lk=300, D=64, grad=True)
    ref = attnkit.attention(q64, k64, v64, causal=causal, backend="reference")
    ref_g = grads(ref, (q64, k64, v64))
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q64, k64, v64))
    baseline = plain_torch_attention(q, k, v, causal)
    base_err = (baseline.to(f64) - ref).abs().max().item()
    base_g = grads(baseline, (q, k, v))
    out = attnkit.attention(q, k, v, causal=causal, backend=backend)
    assert out.dtype == dtype
    err = (out.to(f64) - ref).abs().max().item()
    assert err <= 2 * base_err + 1e-6, (err, base_err)
    for got, base, want in zip(grads(out, (q, k, v)), base_g, ref_g):
        g_err = (got.to(f64) - want).abs().max().item()
        b_err = (base.to(f64) - want).abs().max().item()
        assert g_err <= 2 * b_err + 1e-6, (g_err, b_err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_features_tiled(dtype):
    """ALiBi + window + softcap in low precision: fp32 accumulation keeps the error at the dtype's rounding."""
    q64, k64, v64 = make_qkv(B=1, Hq=4, Hk=2, Lq=200, Lk=260, D=32)
    options = dict(causal=True, window=(64, 0), alibi=True, softcap=10.0)
    ref = attnkit.attention(q64, k64, v64, backend="reference", **options)
    out = attnkit.attention(*(t.to(dtype) for t in (q64, k64, v64)), backend="tiled", **options)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype]
    torch.testing.assert_close(out.to(f64), ref, atol=tol, rtol=0)


# ----------------------------------------------------------------- tile skipping
def test_causal_and_window_skip_masked_tiles():
    spec = build_spec(*make_qkv(B=1, Hq=1, Hk=1, Lq=1024, Lk=1024, D=4), window=(100, 0))
    visited = sum(len(tiled.key_segments(spec, i, min(i + 64, 1024), 64, False)) for i in range(0, 1024, 64))
    assert visited <= 16 * 3  # each query block sees at most 3 key tiles of 64
    causal = build_spec(*make_qkv(B=1, Hq=1, Hk=1, Lq=1024, Lk=1024, D=4), causal=True)
    tiles = sum(len(tiled.key_segments(causal, i, i + 64, 64, False)) for i in range(0, 1024, 64))
    assert tiles == 16 * 17 // 2  # the lower triangle of 16 x 16 tiles


def test_fused_causal_blocks_are_one_open_call_plus_the_diagonal():
    causal = build_spec(*make_qkv(B=1, Hq=1, Hk=1, Lq=512, Lk=1024, D=4), causal=True)
    # Offset 512: block [64, 128) sees keys [0, 576) open, then the diagonal square [576, 640).
    assert tiled.key_segments(causal, 64, 128, 64, True) == [(0, 576, False), (576, 640, True)]
    with_alibi = build_spec(*make_qkv(B=1, Hq=1, Hk=1, Lq=512, Lk=1024, D=4), causal=True, alibi=True)
    assert all(not c for *_, c in tiled.key_segments(with_alibi, 64, 128, 64, True))


@pytest.mark.parametrize("align", [-40, -3, 0, 17, 60, 200])
def test_tiled_with_explicit_alignment_matches_reference(align):
    """Ring attention computes blocks whose queries sit at an arbitrary offset among the keys."""
    import dataclasses

    from attnkit.kernels import reference

    q, k, v = make_qkv(Lq=48, Lk=64)
    spec = dataclasses.replace(build_spec(q, k, v, causal=True), align=align)
    ref, ref_lse = reference.forward(q, k, v, spec)
    for engine in ("torch", "fused"):
        out, lse = tiled.forward(q, k, v, spec, block_q=16, block_k=32, engine=engine)
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
        assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))


# ------------------------------------------------------------------- sdpa: what it refuses, and why
def sdpa_refusal(shape=None, *, return_lse=False, grad=False, align=None, device="cpu", **options):
    """``sdpa.refusal`` of a request on ``make_qkv(**shape)`` inputs (``align`` replaced in the spec)."""
    import dataclasses

    q, k, v = (x.to(device) for x in make_qkv(**(shape or dict(Lq=4, Lk=8)), grad=grad))
    spec = build_spec(q, k, v, **options)
    if align is not None:
        spec = dataclasses.replace(spec, align=align)
    return attnkit.backends.sdpa.refusal(q, spec, return_lse)


SQUARE = dict(Lq=8, Lk=8)
TOP_LEFT = "SDPA aligns causal top-left; attnkit aligns bottom-right and Lq != Lk"
NOT_BOTH = "SDPA takes is_causal or a mask, not both"
DV = "its fused kernels need Dv == D (its fallback would materialise Lq x Lk)"


@pytest.mark.parametrize(
    ("request_", "why"),
    [
        (dict(alibi=True), "ALiBi would need an Lq x Lk float mask"),
        (dict(softcap=2.0), "SDPA has no softcap"),
        (dict(window=(3, 0)), "a window would need an Lq x Lk mask"),
        (dict(dropout_p=0.1), "SDPA's dropout pattern differs from attnkit's counter-based one"),
        (dict(align=5), "custom query/key alignment (spec.align) is computed by the tiled kernel"),
        (dict(align=4), None),  # Lk - Lq: attnkit's own alignment, stated explicitly
        (dict(causal=True, shape=dict(Lq=2, Lk=5)), TOP_LEFT),
        (dict(causal=True, shape=dict(Lq=1, Lk=5)), None),  # one query: causal masks nothing
        (dict(causal=True, shape=SQUARE), None),
        (dict(causal=True, mask=torch.ones(2, 2, dtype=torch.bool), shape=dict(Lq=2, Lk=2)), NOT_BOTH),
        (dict(causal=True, mask=torch.ones(1, 5, dtype=torch.bool), shape=dict(Lq=1, Lk=5)), None),
        (dict(mask=torch.zeros(4, 8, dtype=f64, requires_grad=True)), "the float mask needs a gradient"),
        (dict(mask=torch.zeros(4, 8, dtype=f64)), None),
        (dict(mask=torch.ones(4, 8, dtype=torch.bool)), None),
        (dict(scale=0.0), "its kernels mask before they scale, so a scale <= 0 turns masked scores into NaN"),
        (dict(scale=-0.5), "its kernels mask before they scale, so a scale <= 0 turns masked scores into NaN"),
        (dict(scale=1e-3), None),
        (dict(shape=dict(Lq=4, Lk=8, D=8, Dv=4)), DV),
        (dict(return_lse=True, device="meta"), "the log-sum-exp is only reachable through its CPU kernel"),
        (dict(return_lse=True, grad=True), "its log-sum-exp output carries no gradient"),
        (dict(return_lse=True), None),
        (dict(grad=True), None),
    ],
)
def test_sdpa_refuses_exactly_what_it_cannot_compute_and_says_why(request_, why):
    """The reasons are what `explain_backend` and the error of ``backend="sdpa"`` show: checked word for word."""
    assert sdpa_refusal(**request_) == why


def test_sdpa_lse_with_gradients_off_is_its_cpu_kernel():
    with torch.no_grad():
        assert sdpa_refusal(return_lse=True, grad=True) is None


def test_sdpa_kernel_returns_no_lse_unless_asked():
    q, k, v = make_qkv(Lq=6, Lk=6)
    spec = build_spec(q, k, v, causal=True)
    out, lse = attnkit.backends.sdpa.attention(q, k, v, spec)
    assert lse is None
    torch.testing.assert_close(out, attnkit.attention(q, k, v, causal=True, backend="reference"), rtol=0, atol=1e-12)


@pytest.mark.parametrize("mask", [None, "bool"])
def test_sdpa_without_enable_gqa_copies_the_key_value_heads(monkeypatch, mask):
    """PyTorch before 2.5 has no ``enable_gqa``: the kernel copies each key/value head to its query heads."""
    from attnkit.kernels import sdpa

    monkeypatch.setattr(sdpa, "_HAS_GQA", False)
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append((k.shape[1], v.shape[1], "enable_gqa" in kwargs))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    q, k, v = make_qkv(B=2, Hq=6, Hk=2, Lq=9, Lk=9, grad=True)
    m = None if mask is None else torch.rand(2, 1, 9, 9) > 0.3
    assert_matches_reference(q, k, v, {"causal": mask is None}, "sdpa", mask=m)
    assert seen == [(6, 6, False)]
