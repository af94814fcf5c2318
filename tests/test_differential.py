"""Differential family: random configurations x tensor layouts x dtypes x mask dtypes x NaN placements.

Every backend (and the statistics pass, and the packed varlen path) must give the float64
reference's answer, or a clear refusal, whatever the storage of its inputs: contiguous, head dim
strided, ``(B, L, H, D)`` storage viewed as ``(B, H, L, D)``, a slice of a wider buffer, a batch
expanded from one element. A seeded generator draws the configurations, so a failure names a seed
that reproduces it.
"""

from __future__ import annotations

import functools
import random

import pytest
import torch

import attnkit
from attnkit.backends import Backend, register_backend, unregister_backend
from attnkit.functional import build_spec
from attnkit.kernels import tiled

f64 = torch.float64
LAYOUTS = ("contiguous", "head_dim_strided", "blhd", "wide_slice", "expanded_batch")
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# Output tolerance against the fp64 reference, per input dtype (low precision: the output's rounding
# plus the low-precision matmuls of the fused kernels).
ATOL = {torch.float64: 1e-9, torch.float32: 3e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}
BACKENDS = ("auto", "sdpa", "tiled", "tiled-tiny-fused", "tiled-tiny-torch", "reference")


@pytest.fixture(scope="module", autouse=True)
def tiny_tiles():
    """The tiled kernel with tiles small enough that these shapes span many of them, as backends."""
    for engine in ("fused", "torch"):
        run = functools.partial(tiled.attention, block_q=8, block_k=16, engine=engine)
        refusal = tiled.refusal
        if engine == "fused":
            refusal = lambda q, spec, lse: None if tiled.fused_supported(q, spec) else "fused engine cannot"
        register_backend(Backend(f"tiled-tiny-{engine}", run, refusal, priority=99, auto=False), replace=True)
    yield
    for engine in ("fused", "torch"):
        unregister_backend(f"tiled-tiny-{engine}")


def stored(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The values of ``x (B, H, L, D)`` in another storage, as the same logical tensor."""
    B, H, L, D = x.shape
    if layout == "contiguous":
        return x.contiguous()
    if layout == "head_dim_strided":
        return x.mT.contiguous().mT  # stride(-1) == L
    if layout == "blhd":
        return x.transpose(1, 2).contiguous().transpose(1, 2)  # (B, L, H, D) storage
    if layout == "wide_slice":
        wide = torch.zeros(B, H, L, 2 * D + 3, dtype=x.dtype)
        wide[..., 3 : 3 + 2 * D : 2] = x  # every other element of a wider row: stride(-1) == 2
        return wide[..., 3 : 3 + 2 * D : 2]
    if layout == "expanded_batch":
        return x[:1].expand(B, H, L, D)  # batch stride 0 (the values are batch element 0's)
    raise ValueError(layout)


def draw(seed: int) -> dict:
    """One random configuration: shapes, features and a mask (float masks of any float dtype)."""
    rng = random.Random(seed)
    Hk = rng.choice([1, 2])
    cfg = dict(
        B=rng.choice([1, 2]), Hq=Hk * rng.choice([1, 2]), Hk=Hk, Lq=rng.randint(1, 40), Lk=rng.randint(1, 40),
        D=rng.choice([4, 8, 16]), options={},
    )  # fmt: skip
    opts = cfg["options"]
    if rng.random() < 0.4:
        opts["causal"] = True
    if rng.random() < 0.3:
        opts["window"] = (rng.choice([None, 0, 3, 9]), rng.choice([None, 0, 2, 7]))
    if rng.random() < 0.3:
        opts["alibi"] = True
    if rng.random() < 0.2:
        opts["softcap"] = rng.choice([5.0, 20.0])
    if rng.random() < 0.2:
        opts["scale"] = rng.choice([0.05, 0.4, 1.3])
    cfg["mask"] = rng.choice([None, None, "bool_pad", "bool_full", "float"])
    cfg["mask_dtype"] = rng.choice([torch.float16, torch.bfloat16, torch.float32, torch.float64])
    return cfg


def make(cfg: dict, seed: int):
    """fp64 ``q, k, v`` and the mask of a configuration."""
    g = torch.Generator().manual_seed(seed)
    B, Hq, Hk, Lq, Lk, D = (cfg[n] for n in ("B", "Hq", "Hk", "Lq", "Lk", "D"))
    q = torch.randn(B, Hq, Lq, D, generator=g, dtype=f64)
    k = torch.randn(B, Hk, Lk, D, generator=g, dtype=f64)
    v = torch.randn(B, Hk, Lk, D, generator=g, dtype=f64)
    mask = None
    if cfg["mask"] == "bool_pad":
        mask = torch.rand(B, 1, 1, Lk, generator=g) < 0.7
    elif cfg["mask"] == "bool_full":
        mask = torch.rand(B, Hq, Lq, Lk, generator=g) < 0.7
    elif cfg["mask"] == "float":
        mask = (torch.randn(B, 1, Lq, Lk, generator=g, dtype=f64) * 2).masked_fill(
            torch.rand(B, 1, Lq, Lk, generator=g) < 0.15, -torch.inf
        )
        mask = mask.to(cfg["mask_dtype"])
    return q, k, v, mask


def reference(q, k, v, mask, options, **extra):
    """The float64 reference on the same values."""
    m = mask.double() if mask is not None and mask.is_floating_point() else mask
    return attnkit.attention(q.double(), k.double(), v.double(), mask=m, backend="reference", **options, **extra)


def refused(q, k, v, mask, options, backend) -> bool:
    if backend in ("auto", "reference", "tiled", "tiled-tiny-torch"):
        return False
    return attnkit.explain_backend(q, k, v, mask=mask, backend=backend, **options).backend is None


@pytest.mark.parametrize("seed", range(40))
def test_every_backend_layout_and_dtype_matches_the_fp64_reference(seed):
    cfg = draw(seed)
    q64, k64, v64, mask = make(cfg, seed)
    rng = random.Random(1000 + seed)
    for dtype in DTYPES:
        layout = rng.choice(LAYOUTS)
        q, k, v = (stored(t.to(dtype), layout) for t in (q64, k64, v64))
        want, want_lse = reference(q, k, v, mask, cfg["options"], return_lse=True)
        for backend in BACKENDS:
            if refused(q, k, v, mask, cfg["options"], backend):
                continue
            out, lse = attnkit.attention(q, k, v, mask=mask, backend=backend, return_lse=True, **cfg["options"])
            ctx = f"seed={seed} {cfg} dtype={dtype} layout={layout} backend={backend}"
            assert out.dtype == dtype and out.shape == want.shape, ctx
            torch.testing.assert_close(out.double(), want, rtol=0, atol=ATOL[dtype], msg=lambda m, c=ctx: f"{c}\n{m}")
            finite = torch.isfinite(want_lse)
            assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse)), ctx  # empty rows agree
            torch.testing.assert_close(lse.double()[finite], want_lse[finite], rtol=1e-5, atol=1e-4, msg=ctx)


@pytest.mark.parametrize("seed", range(12))
def test_gradients_in_every_layout_match_the_reference(seed):
    cfg = draw(100 + seed)
    q64, k64, v64, mask = make(cfg, seed)
    layout = LAYOUTS[seed % len(LAYOUTS)]
    if layout == "expanded_batch":
        layout = "head_dim_strided"  # an expanded tensor is not a leaf that can hold a gradient
    if mask is not None and mask.is_floating_point():
        mask = mask.double()

    def grads(backend, dtype):
        q, k, v = (stored(t.to(dtype), layout).detach().requires_grad_() for t in (q64, k64, v64))
        out = attnkit.attention(q, k, v, mask=mask, backend=backend, **cfg["options"])
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=f64).to(dtype)
        return torch.autograd.grad((out * dout).sum(), (q, k, v))

    want = grads("reference", f64)
    for backend in ("auto", "tiled", "tiled-tiny-fused", "tiled-tiny-torch"):
        if refused(q64, k64, v64, mask, cfg["options"], backend):
            continue
        for dtype, atol in ((f64, 1e-9), (torch.float32, 1e-4)):
            for name, g, w in zip("qkv", grads(backend, dtype), want, strict=True):
                ctx = f"seed={seed} {cfg} layout={layout} backend={backend} d{name} {dtype}"
                torch.testing.assert_close(g.double(), w, rtol=0, atol=atol, msg=lambda m, c=ctx: f"{c}\n{m}")


def allowed_pairs(q, k, mask, options) -> torch.Tensor:
    """``(B, Hq, Lq, Lk)`` bool: which pairs causal/window/the mask allow (computed from the spec)."""
    spec = build_spec(q, k, None, mask=mask, **options)
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    allowed = spec.allowed_tile(0, Lq, 0, Lk, q.device)
    allowed = torch.ones(B, Hq, Lq, Lk, dtype=torch.bool) if allowed is None else allowed.expand(B, Hq, Lq, Lk)
    if mask is not None and mask.is_floating_point():
        allowed = allowed & torch.isfinite(mask).expand(B, Hq, Lq, Lk)
    return allowed


@pytest.mark.parametrize("seed", range(24))
@pytest.mark.parametrize("poison", ["nan_q_row", "nan_k_allowed", "inf_v_allowed", "garbage_masked_keys"])
def test_non_finite_inputs_follow_one_rule_on_every_backend(seed, poison):
    """A row that reads a NaN/inf comes out NaN (never 0); garbage a row may not read never reaches it."""
    cfg = draw(200 + seed)
    cfg["options"].pop("window", None)
    q, k, v, _ = make(cfg, seed)
    B, Hq, Hk, Lq, Lk = (cfg[n] for n in ("B", "Hq", "Hk", "Lq", "Lk"))
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, 1, 1, Lk, generator=g) < 0.6  # padding: some keys are never read
    mask[..., -1] = True
    clean_q, clean_k, clean_v = q.clone(), k.clone(), v.clone()
    b, hk, j = 0, int(torch.randint(Hk, (1,), generator=g)), int(torch.randint(Lk, (1,), generator=g))
    if poison == "nan_q_row":
        q[0, int(torch.randint(Hq, (1,), generator=g)), int(torch.randint(Lq, (1,), generator=g)), 0] = torch.nan
    elif poison in ("nan_k_allowed", "inf_v_allowed"):
        mask[b, 0, 0, j] = True
        (k if poison == "nan_k_allowed" else v)[b, hk, j, -1] = torch.nan if poison == "nan_k_allowed" else torch.inf
    else:
        masked = ~mask[..., 0, 0, :]  # (B, Lk) keys no row may read
        k[masked.view(B, 1, Lk, 1).expand_as(k)] = torch.nan
        v[masked.view(B, 1, Lk, 1).expand_as(v)] = torch.inf
    clean_k[~torch.isfinite(clean_k)] = 0
    bad_q = ~torch.isfinite(q).all(-1)  # (B, Hq, Lq)
    bad_kv = ~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1))  # (B, Hk, Lk)
    bad_kv = bad_kv.repeat_interleave(Hq // Hk, dim=1)[:, :, None, :]  # (B, Hq, 1, Lk)
    nan_rows = bad_q | (allowed_pairs(q, k, mask, cfg["options"]) & bad_kv).any(-1)
    want = reference(clean_q, clean_k.where(torch.isfinite(k), 0), clean_v.where(torch.isfinite(v), 0), mask,
                     cfg["options"])  # fmt: skip
    for dtype in (f64, torch.float32):
        for backend in BACKENDS:
            qd, kd, vd = (t.to(dtype) for t in (q, k, v))
            if refused(qd, kd, vd, mask, cfg["options"], backend):
                continue
            out, lse = attnkit.attention(qd, kd, vd, mask=mask, backend=backend, return_lse=True, **cfg["options"])
            ctx = f"seed={seed} poison={poison} {cfg} {dtype} backend={backend}"
            assert torch.equal(out.isnan().any(-1), nan_rows), ctx
            assert torch.equal(lse.isnan(), nan_rows), ctx
            torch.testing.assert_close(out.double()[~nan_rows], want[~nan_rows], rtol=0, atol=ATOL[dtype], msg=ctx)
    if poison == "garbage_masked_keys":  # the statistics pass reads no garbage either
        st = attnkit.attention_stats(q, k, v, mask=mask, topk=2, pool=4, **cfg["options"])
        ref = attnkit.attention_stats(clean_q, clean_k.where(torch.isfinite(k), 0), v, mask=mask, topk=2, pool=4,
                                      **cfg["options"])  # fmt: skip
        for name in ("entropy", "received", "pooled", "mean_distance"):
            torch.testing.assert_close(getattr(st, name), getattr(ref, name), rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("seed", range(10))
def test_statistics_pass_in_every_layout_and_dtype(seed):
    cfg = draw(300 + seed)
    q64, k64, v64, mask = make(cfg, seed)
    m64 = mask.double() if mask is not None and mask.is_floating_point() else mask
    for dtype, layout in zip(DTYPES, random.Random(seed).sample(LAYOUTS, len(DTYPES)), strict=True):
        q, k, v = (stored(t.to(dtype), layout) for t in (q64, k64, v64))
        want = attnkit.attention_weights(q.double(), k.double(), mask=m64, **cfg["options"])  # (B, Hq, Lq, Lk)
        st = attnkit.attention_stats(q, k, v, mask=mask, topk=3, pool=5, **cfg["options"])
        ctx = f"seed={seed} {cfg} {dtype} {layout}"
        torch.testing.assert_close(st.received.double(), want.sum(-2), rtol=1e-4, atol=1e-4, msg=ctx)
        torch.testing.assert_close(st.entropy.double(), -torch.special.xlogy(want, want).sum(-1), rtol=1e-4,
                                   atol=1e-4, msg=ctx)  # fmt: skip


@pytest.mark.parametrize("seed", range(10))
def test_varlen_in_every_layout_matches_per_sequence_reference(seed):
    rng = random.Random(400 + seed)
    lens_q = [rng.randint(0, 20) for _ in range(3)]
    lens_k = [rng.randint(1, 20) for _ in range(3)]
    H, D = 2, 8
    opts = {key: val for key, val in draw(400 + seed)["options"].items() if key != "scale"}
    g = torch.Generator().manual_seed(seed)
    layout = rng.choice(["contiguous", "head_dim_strided", "wide_slice"])

    def packed(total):
        x = torch.randn(total, H, D, generator=g, dtype=f64)
        if layout == "head_dim_strided":
            return x.permute(2, 0, 1).contiguous().permute(1, 2, 0)
        if layout == "wide_slice":
            wide = torch.zeros(total, H, 2 * D, dtype=f64)
            wide[..., ::2] = x
            return wide[..., ::2]
        return x

    q, k, v = packed(sum(lens_q)), packed(sum(lens_k)), packed(sum(lens_k))
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()])
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()])
    for dtype in (f64, torch.float32):
        out = attnkit.attention_varlen(q.to(dtype), k.to(dtype), v.to(dtype), cu_q, cu_k, **opts)
        for b in range(3):
            qs, ks, vs = (x[c[b] : c[b + 1]].transpose(0, 1)[None] for x, c in ((q, cu_q), (k, cu_k), (v, cu_k)))
            if qs.shape[2] == 0:
                continue
            want = attnkit.attention(qs, ks, vs, backend="reference", **opts)[0].transpose(0, 1)
            got = out[cu_q[b] : cu_q[b + 1]].double()
            torch.testing.assert_close(got, want, rtol=0, atol=ATOL[dtype], msg=f"seed={seed} {opts} sequence {b}")


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_large_logits_stay_exact(seed, dtype):
    """Scores of magnitude 1e2-1e3: every backend subtracts the row maximum (a missing one gives inf/NaN)."""
    cfg = draw(500 + seed)
    cfg["options"].pop("scale", None)
    cfg["options"].pop("softcap", None)  # a softcap would bound the scores
    q64, k64, v64, mask = make(cfg, seed)
    q64 = q64 * (30.0 + 10 * seed)  # |s| = |q.k| / sqrt(D) up to ~1e3
    q, k, v = (t.to(dtype) for t in (q64, k64, v64))
    want, want_lse = reference(q, k, v, mask, cfg["options"], return_lse=True)
    assert want_lse[torch.isfinite(want_lse)].abs().max() > 50  # the scores really are large
    for backend in BACKENDS:
        if refused(q, k, v, mask, cfg["options"], backend):
            continue
        out = attnkit.attention(q, k, v, mask=mask, backend=backend, **cfg["options"])
        ctx = f"seed={seed} {cfg} {dtype} backend={backend}"
        assert torch.isfinite(out).all(), ctx
        torch.testing.assert_close(out.double(), want, rtol=0, atol=ATOL[dtype] * 4, msg=ctx)
    st = attnkit.attention_stats(q, k, v, mask=mask, topk=2, pool=4, **cfg["options"])
    p = attnkit.attention_weights(q.double(), k.double(), mask=mask if mask is None or not mask.is_floating_point()
                                  else mask.double(), **cfg["options"])  # fmt: skip
    torch.testing.assert_close(st.received.double(), p.sum(-2), rtol=1e-3, atol=1e-3, msg=f"seed={seed} stats")


# ------------------------------------------------------------------ large logits beyond the dense backends
# Scores of magnitude 1e2-1e3 overflow exp() in fp32 (beyond ~88) unless the row maximum is subtracted
# first. Every path that exponentiates scores is held to the fp64 reference at such magnitudes: the dense
# backends above, and here the statistics pass, the packed varlen path and gradients (ring attention:
# the "ring-*-large-logits" cases of tests/test_distributed.py).
LARGE = (150.0, 400.0, 900.0)  # the largest |score| of the drawn inputs


def large_logit_inputs(seed: int, target: float, *, B=2, Hq=4, Hk=2, Lq=19, Lk=23, D=8):
    """fp64 ``q, k, v`` whose largest ``|q.k| / sqrt(D)`` is exactly ``target``."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=g, dtype=f64)
    k = torch.randn(B, Hk, Lk, D, generator=g, dtype=f64)
    v = torch.randn(B, Hk, Lk, D, generator=g, dtype=f64)
    s = q @ k.repeat_interleave(Hq // Hk, dim=1).mT / D**0.5  # (B, Hq, Lq, Lk)
    return q * (target / s.abs().max()), k, v


@pytest.mark.parametrize("target", LARGE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("options", [{}, {"causal": True}, {"window": (4, None), "alibi": True}])
def test_large_logits_statistics_pass_matches_fp64(target, dtype, options):
    q64, k64, v64 = large_logit_inputs(int(target), target)
    q, k, v = (t.to(dtype) for t in (q64, k64, v64))
    p = attnkit.attention_weights(q.double(), k.double(), **options)  # (B, Hq, Lq, Lk), same rounded inputs
    want_out, want_lse = reference(q, k, v, None, options, return_lse=True)
    st = attnkit.attention_stats(q, k, v, topk=3, pool=4, return_output=True, **options)
    ctx = f"|s|max={target} {dtype} {options}"
    assert want_lse.abs().max() > 0.5 * target, ctx  # the scores really are that large
    for name in ("lse", "entropy", "received", "mean_distance", "pooled", "topk_weight", "output"):
        assert torch.isfinite(getattr(st, name)).all(), f"{ctx}: {name} is not finite"
    torch.testing.assert_close(st.lse.double(), want_lse, rtol=1e-6, atol=1e-3, msg=ctx)
    torch.testing.assert_close(st.received.double(), p.sum(-2), rtol=0, atol=2e-3, msg=ctx)
    torch.testing.assert_close(st.entropy.double(), -torch.special.xlogy(p, p).sum(-1), rtol=0, atol=2e-3, msg=ctx)
    torch.testing.assert_close(st.topk_weight.double(), p.topk(3, dim=-1).values, rtol=0, atol=2e-3, msg=ctx)
    torch.testing.assert_close(st.output.double(), want_out, rtol=0, atol=ATOL[dtype] * 4, msg=ctx)


@pytest.mark.parametrize("target", LARGE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["auto", "tiled", "sdpa", "reference", "tiled-tiny-torch"])
def test_large_logits_varlen_matches_fp64(target, dtype, backend):
    lens_k = [7, 3, 13]
    lens_q = lens_k if backend == "sdpa" else [5, 1, 13]  # SDPA refuses bottom-right causal with Lq != Lk
    g = torch.Generator().manual_seed(int(target))
    q, k, v = (torch.randn(sum(n), 2, 8, generator=g, dtype=f64) for n in (lens_q, lens_k, lens_k))
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()])
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()])
    biggest = max(
        (q[cu_q[b] : cu_q[b + 1]].transpose(0, 1) @ k[cu_k[b] : cu_k[b + 1]].permute(1, 2, 0)).abs().max()
        for b in range(3)
    )
    q = q * (target * 8**0.5 / biggest)  # largest |score| = target
    out = attnkit.attention_varlen(q.to(dtype), k.to(dtype), v.to(dtype), cu_q, cu_k, causal=True, backend=backend)
    assert torch.isfinite(out).all(), f"{backend} {dtype} |s|max={target}"
    for b in range(3):
        qs, ks, vs = (x[c[b] : c[b + 1]].to(dtype).double().transpose(0, 1)[None] for x, c in
                      ((q, cu_q), (k, cu_k), (v, cu_k)))  # fmt: skip
        want = attnkit.attention(qs, ks, vs, backend="reference", causal=True)[0].transpose(0, 1)
        got = out[cu_q[b] : cu_q[b + 1]].double()
        torch.testing.assert_close(got, want, rtol=0, atol=ATOL[dtype] * 4, msg=f"{backend} {dtype} sequence {b}")


@pytest.mark.parametrize("target", LARGE)
@pytest.mark.parametrize("backend", ["auto", "tiled", "tiled-tiny-torch", "tiled-tiny-fused", "sdpa"])
def test_large_logits_gradients_match_fp64(target, backend):
    """fp32 gradients at |s| up to 1e3, against fp64; the backward recomputes p = exp(s - lse)."""
    q64, k64, v64 = large_logit_inputs(7, target, Lq=23)  # Lq == Lk: SDPA aligns causal as attnkit then
    dout = torch.randn(q64.shape[:-1] + v64.shape[-1:], generator=torch.Generator().manual_seed(1), dtype=f64)

    def grads(dtype, name):
        q, k, v = (t.to(dtype).requires_grad_() for t in (q64, k64, v64))
        out = attnkit.attention(q, k, v, causal=True, backend=name)
        return out, torch.autograd.grad((out * dout.to(dtype)).sum(), (q, k, v))

    want, want_g = grads(f64, "reference")
    got, got_g = grads(torch.float32, backend)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-4, msg=backend)
    for name, g, w in zip("qkv", got_g, want_g, strict=True):
        assert torch.isfinite(g).all(), f"{backend} d{name} not finite at |s|max={target}"
        # dk, dq scale with |q|, |k|: relative to the largest entry
        torch.testing.assert_close(g.double(), w, rtol=0, atol=1e-4 * max(1.0, float(w.abs().max())),
                                   msg=f"{backend} d{name}")  # fmt: skip
