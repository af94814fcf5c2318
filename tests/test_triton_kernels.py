"""The Triton kernels under Triton's CPU interpreter, against the float64 reference.

``TRITON_INTERPRET=1`` must be set when ``@triton.jit`` decorates the kernels and while
they run, so this module sets it before importing Triton, restores it at the end of the
module, and sets it again while its own tests run (a module-scoped fixture). Shapes are
tiny and blocks are 16, so every kernel walks several tiles, partial last tiles, padded
head dims and skipped blocks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import attnkit
from attnkit.dropout import keep_mask
from attnkit.functional import build_spec
from attnkit.kernels import reference
from tests.conftest import make_qkv

# The interpreter must be chosen before Triton itself is imported (its standard library is
# @triton.jit code too) and stay chosen while kernels run.
_previous = os.environ.get("TRITON_INTERPRET")
_triton_was_imported = "triton" in sys.modules
os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="triton not installed (pip install attnkit[triton])")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from attnkit.kernels.stats import pool_edges, segment_of  # noqa: E402
from attnkit.kernels.triton import autograd as triton_autograd  # noqa: E402
from attnkit.kernels.triton import common  # noqa: E402
from attnkit.kernels.triton.stats import stats_forward  # noqa: E402
from attnkit.stats import pool_segments  # noqa: E402

# When another test module imported Triton first (compiled mode), this process cannot
# interpret kernels: run this module again in a fresh process instead (see the last test).
IN_PROCESS = type(tl.zeros).__name__ == "InterpretedFunction" and common.INTERPRETED


@triton.jit
def _loop_probe(Out, n):
    total = 0
    for _ in range(0, n, 16):  # a loop bound that is a kernel argument, as every attnkit kernel has
        total += 1
    tl.store(Out, total)


def _interpreter_problem() -> str | None:
    """Why this Triton's interpreter cannot run the kernels here (None if it can).

    Triton 3.6's interpreter turns a scalar kernel argument used as a loop bound into a
    Python int with ``int()`` on a size-1 array, which NumPy >= 2.4 rejects; Triton 3.9's works.
    """
    if not IN_PROCESS:
        return "Triton was imported before TRITON_INTERPRET=1 could be set; covered by the subprocess run"
    out = torch.zeros(1, dtype=torch.int32)
    try:
        _loop_probe[(1,)](out, 40)
    except Exception as exc:
        return f"Triton {triton.__version__}'s interpreter cannot run a loop with an argument bound here: {exc!r}"
    return None if int(out) == 3 else f"Triton {triton.__version__}'s interpreter miscounts a loop ({int(out)} != 3)"


INTERPRETER_PROBLEM = _interpreter_problem() if IN_PROCESS else None
needs_interpreter = pytest.mark.skipif(
    not IN_PROCESS or INTERPRETER_PROBLEM is not None,
    reason=INTERPRETER_PROBLEM
    or "Triton was imported before TRITON_INTERPRET=1 could be set; covered by the subprocess run",
)

BLOCKS = (16, 16)


@pytest.fixture(autouse=True, scope="module")
def _interpreter():
    """Interpreted kernels read TRITON_INTERPRET when they run, too: keep it set until this module ends."""
    os.environ["TRITON_INTERPRET"] = "1"
    yield
    if _previous is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _previous


# --------------------------------------------------------------------- helpers
def _to64(spec):
    """The same spec evaluated in float64 (same dropout seed)."""
    mask = spec.mask
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.double()
    slopes = None if spec.alibi_slopes is None else spec.alibi_slopes.double()
    return dataclasses.replace(spec, acc_dtype=torch.float64, mask=mask, alibi_slopes=slopes)


def _grads(fn, q, k, v, dout, dlse):
    """Output, lse and the gradients of ``<out, dout> + <lse, dlse>`` (empty rows' lse left out)."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out, lse = fn(q, k, v)
    finite = torch.isfinite(lse)
    loss = (out.double() * dout.double()).sum() + (lse.double().where(finite, 0) * dlse.double()).sum()
    loss.backward()
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def _check_fp32(q, k, v, **opts):
    spec = build_spec(q, k, v, **opts)
    B, Hq, Lq, _ = q.shape
    dout = torch.randn(B, Hq, Lq, v.shape[-1])
    dlse = torch.randn(B, Hq, Lq)
    got = _grads(lambda a, b, c: triton_autograd.attention(a, b, c, spec, blocks=BLOCKS), q, k, v, dout, dlse)
    spec64 = _to64(spec)
    want = _grads(lambda a, b, c: reference.forward(a, b, c, spec64), q.double(), k.double(), v.double(), dout, dlse)
    names = ("out", "lse", "dq", "dk", "dv")
    for name, g, w in zip(names, got, want):
        if name == "lse":
            assert torch.equal(torch.isneginf(g), torch.isneginf(w)), "empty rows differ"
            g, w = g.where(torch.isfinite(g), 0), w.where(torch.isfinite(w), 0)
        assert g.dtype == (torch.float32 if name == "lse" else q.dtype)
        err = (g.double() - w).abs().max().item()
        assert err <= 2e-5 * max(1.0, w.abs().max().item()), f"{name}: max error {err:.2e}"
    return got


# ----------------------------------------------------------------------- cases
def _bool_mask_with_empty_rows(B, Lq, Lk):
    m = torch.rand(B, 1, Lq, Lk) > 0.4
    m[:, :, 3] = False  # a fully masked row: zeros out, lse -inf, zero gradients
    return m


def _float_mask(Hq, Lk):
    m = torch.randn(1, Hq, 1, Lk)
    m[..., :5] = float("-inf")
    return m


CASES = {
    "plain": (dict(B=2, Hq=2, Hk=2, Lq=40, Lk=40, D=32, Dv=32), {}),
    "causal_short_q_gqa": (dict(B=1, Hq=4, Hk=2, Lq=24, Lk=40, D=16, Dv=16), dict(causal=True)),
    "causal_long_q_empty_rows": (dict(B=1, Hq=2, Hk=1, Lq=40, Lk=24, D=16, Dv=16), dict(causal=True)),
    "window": (dict(B=1, Hq=2, Hk=2, Lq=48, Lk=48, D=16, Dv=16), dict(window=(5, 3))),
    "causal_left_window": (dict(B=1, Hq=2, Hk=1, Lq=33, Lk=47, D=16, Dv=16), dict(causal=True, window=(6, None))),
    # Wide enough that some key tiles are open to every row of a block (no structure mask there).
    "wide_window_open_tiles": (dict(B=1, Hq=2, Hk=1, Lq=96, Lk=96, D=16, Dv=16), dict(window=(40, 10))),
    # Lq > Lk with a window: whole query blocks see no key (an empty key range must stay empty).
    "causal_window_long_q": (
        dict(B=1, Hq=2, Hk=1, Lq=59, Lk=21, D=16, Dv=16),
        dict(causal=True, window=(9, 5), alibi=True),
    ),
    "alibi_softcap": (dict(B=1, Hq=4, Hk=2, Lq=40, Lk=40, D=16, Dv=16), dict(alibi=True, softcap=2.0)),
    "bool_mask": (dict(B=2, Hq=2, Hk=1, Lq=30, Lk=37, D=16, Dv=16), dict(mask="bool")),
    "float_mask": (dict(B=1, Hq=2, Hk=2, Lq=30, Lk=37, D=16, Dv=16), dict(mask="float")),
    "key_padding": (dict(B=2, Hq=2, Hk=2, Lq=20, Lk=35, D=16, Dv=16), dict(mask="padding")),
    "mqa_padded_dims": (dict(B=1, Hq=3, Hk=1, Lq=20, Lk=29, D=24, Dv=20), dict(scale=0.3)),
    # A negative scale: the plain path cannot take the row maximum on the raw q k^T (RAW_MAX off).
    "negative_scale": (dict(B=1, Hq=2, Hk=1, Lq=20, Lk=37, D=16, Dv=16), dict(scale=-0.25)),
    "dropout_causal": (dict(B=2, Hq=2, Hk=1, Lq=32, Lk=40, D=16, Dv=16), dict(causal=True, dropout_p=0.3)),
    "everything": (
        dict(B=2, Hq=4, Hk=2, Lq=36, Lk=44, D=16, Dv=24),
        dict(causal=True, window=(9, 2), alibi=True, softcap=3.0, mask="bool", dropout_p=0.2),
    ),
}


@needs_interpreter
@pytest.mark.parametrize("case", list(CASES))
def test_forward_backward_match_reference(case):
    shape, opts = CASES[case]
    opts = dict(opts)
    q, k, v = make_qkv(**shape, dtype=torch.float32)
    B, Hq, Lq, Lk = shape["B"], shape["Hq"], shape["Lq"], shape["Lk"]
    if opts.get("mask") == "bool":
        opts["mask"] = _bool_mask_with_empty_rows(B, Lq, Lk)
    elif opts.get("mask") == "float":
        opts["mask"] = _float_mask(Hq, Lk)
    elif opts.get("mask") == "padding":
        opts["mask"] = attnkit.key_padding_mask(torch.tensor([Lk, Lk - 9]), Lk)
    out, lse, dq, _, _ = _check_fp32(q, k, v, **opts)
    if case in ("bool_mask", "causal_long_q_empty_rows"):
        empty = torch.isneginf(lse)
        assert bool(empty.any()), "the case must contain fully masked rows"
        assert bool((out[empty] == 0).all()) and bool((dq[empty] == 0).all())


@needs_interpreter
@pytest.mark.timeout(90)  # the hard stop; a failure is reported unshrunk, so it ends after at most 15 examples
@settings(
    max_examples=15,
    deadline=timedelta(seconds=20),  # ~2 s an example under the interpreter on 2 busy cores
    phases=(Phase.explicit, Phase.reuse, Phase.generate),  # no shrinking: it could run for minutes
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    lq=st.integers(1, 70),
    lk=st.integers(1, 70),
    causal=st.booleans(),
    left=st.one_of(st.none(), st.integers(0, 40)),
    right=st.one_of(st.none(), st.integers(0, 40)),
    alibi=st.booleans(),
    blocks=st.sampled_from([(16, 16), (16, 32), (32, 16)]),
)
def test_random_shapes_windows_and_tiles(lq, lk, causal, left, right, alibi, blocks):
    """Lengths, windows and tile shapes at random: every split of the key/query walk is exact."""
    q, k, v = make_qkv(1, 2, 1, lq, lk, 16, 16, dtype=torch.float32)
    window = None if left is None and right is None else (left, right)
    spec = build_spec(q, k, v, causal=causal, window=window, alibi=alibi or None)
    dout = torch.randn(1, 2, lq, 16)
    got = _grads(lambda a, b, c: triton_autograd.attention(a, b, c, spec, blocks=blocks), q, k, v, dout, dout[..., 0])
    spec64 = _to64(spec)
    want = _grads(
        lambda a, b, c: reference.forward(a, b, c, spec64), q.double(), k.double(), v.double(), dout, dout[..., 0]
    )
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        g, w = g.double().where(torch.isfinite(w), 0), w.where(torch.isfinite(w), 0)
        assert (g - w).abs().max().item() <= 2e-5 * max(1.0, w.abs().max().item()), name


@needs_interpreter
@pytest.mark.parametrize("D", [32, 256])
def test_head_dims(D):
    q, k, v = make_qkv(1, 2, 1, 20, 24, D, D, dtype=torch.float32)
    _check_fp32(q, k, v, causal=True)


@needs_interpreter
@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the second block does read the NaNs
def test_causal_skips_fully_masked_blocks():
    """Keys beyond every query of a block are never read: poisoning them changes nothing."""
    q, k, v = make_qkv(1, 2, 2, 32, 32, 16, 16, dtype=torch.float32)
    spec = build_spec(q, k, v, causal=True)
    out, _ = triton_autograd.attention(q, k, v, spec, blocks=BLOCKS)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 16:], v2[:, :, 16:] = float("nan"), float("nan")  # only the second query block may see these
    out2, _ = triton_autograd.attention(q, k2, v2, spec, blocks=BLOCKS)
    assert torch.equal(out[:, :, :16], out2[:, :, :16])


# -------------------------------------------------------------- low precision
@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("opts", [{}, dict(causal=True, alibi=True, softcap=4.0)], ids=["plain", "features"])
def test_low_precision_flash_attention_rule(dtype, opts):
    """FlashAttention's rule: error against fp64 at most twice plain PyTorch's in the same dtype."""
    q, k, v = make_qkv(1, 2, 1, 40, 40, 32, 32, dtype=dtype)
    spec = build_spec(q, k, v, **opts)
    dout, dlse = torch.randn(1, 2, 40, 32), torch.zeros(1, 2, 40)
    got = _grads(lambda a, b, c: triton_autograd.attention(a, b, c, spec, blocks=BLOCKS), q, k, v, dout, dlse)
    # Plain PyTorch in the same dtype: the reference kernel with every step in `dtype`.
    spec_lp = dataclasses.replace(spec, acc_dtype=dtype)
    plain = _grads(lambda a, b, c: reference.forward(a, b, c, spec_lp), q, k, v, dout.to(dtype), dlse)
    spec64 = _to64(spec)
    exact = _grads(lambda a, b, c: reference.forward(a, b, c, spec64), q.double(), k.double(), v.double(), dout, dlse)
    for name, g, p, e in zip(("out", "lse", "dq", "dk", "dv"), got, plain, exact):
        if name == "lse":
            continue  # plain low-precision attention has no lse of its own to compare
        assert g.dtype == dtype
        err = (g.double() - e).abs().max().item()
        err_plain = (p.double() - e).abs().max().item()
        assert err <= 2 * err_plain + 1e-6, f"{name}: {err:.2e} > 2 x plain {err_plain:.2e}"


# ------------------------------------------------------------------- dropout
@triton.jit
def _keep_kernel(Out, seed, bh, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_m = tl.arange(0, BLOCK_M) + 5
    offs_n = tl.arange(0, BLOCK_N) + 7
    keep = common.keep_tile(seed.to(tl.uint32), bh.to(tl.uint32), offs_m, offs_n, threshold.to(tl.uint32))
    tl.store(Out + tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :], keep.to(tl.int8))


@needs_interpreter
@pytest.mark.parametrize("seed", [0, 12345, 2**31 + 17, 2**32 - 1])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_hash_is_bit_identical(seed, p):
    """The kernels' keep-mask equals `attnkit.dropout.keep_mask` bit for bit."""
    bh = 3
    out = torch.empty(16, 32, dtype=torch.int8)
    _keep_kernel[(1,)](out, seed, bh, int(p * 2**32), BLOCK_M=16, BLOCK_N=32)
    want = keep_mask(
        seed, torch.tensor(bh).view(1, 1, 1), torch.arange(5, 21).view(1, -1, 1), torch.arange(7, 39).view(1, 1, -1), p
    )[0]
    assert torch.equal(out.bool(), want)
    assert abs(want.float().mean().item() - (1 - p)) < 0.12


# -------------------------------------------------------------------- varlen
def _packed(lens_q, lens_k, Hq, Hk, D, Dv):
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(lens_q), Hq, D)
    k = torch.randn(sum(lens_k), Hk, D)
    v = torch.randn(sum(lens_k), Hk, Dv)
    return q, k, v, cu_q, cu_k


def _varlen_triton(q, k, v, cu_q, cu_k, **opts):
    lens_q, lens_k = cu_q.diff().tolist(), cu_k.diff().tolist()
    spec = build_spec(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], **opts)
    spec = dataclasses.replace(spec, batch=len(lens_q), q_len=max(lens_q), kv_len=max(lens_k))
    return triton_autograd.attention_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), spec, blocks=BLOCKS)


@needs_interpreter
def test_varlen_matches_attention_per_sequence():
    lens_q, lens_k = [5, 0, 23, 9], [7, 3, 23, 18]
    q, k, v, cu_q, cu_k = _packed(lens_q, lens_k, 4, 2, 16, 16)
    opts = dict(causal=True, alibi=True, softcap=5.0)
    dout, dlse = torch.randn(q.shape[0], 4, 16), torch.randn(4, q.shape[0])
    out, lse, dq, dk, dv = _grads(lambda a, b, c: _varlen_triton(a, b, c, cu_q, cu_k, **opts), q, k, v, dout, dlse)
    assert out.shape == (sum(lens_q), 4, 16) and lse.shape == (4, sum(lens_q))
    for b in range(len(lens_q)):
        if lens_q[b] == 0:
            continue  # nothing to compare (the packed output has no rows for it)
        sq, sk = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        qb, kb, vb = (x.transpose(0, 1)[None].double() for x in (q[sq], k[sk], v[sk]))  # (1, H, L, D)
        dob, dlb = dout[sq].transpose(0, 1)[None], dlse[:, sq][None]

        def dense(a, b_, c):
            return attnkit.attention(a, b_, c, return_lse=True, backend="reference", **opts)

        want = _grads(dense, qb, kb, vb, dob, dlb)
        got = (out[sq], lse[:, sq], dq[sq], dk[sk], dv[sk])
        for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
            w = w[0] if name == "lse" else w[0].transpose(0, 1)  # back to the packed layout
            err = (g.double() - w).abs().max().item() if g.numel() else 0.0
            assert err <= 2e-5 * max(1.0, w.abs().max().item() if w.numel() else 1.0), f"seq {b} {name}: {err:.2e}"


@needs_interpreter
def test_varlen_dropout_matches_the_cpu_path():
    """The packed kernel and `attention_varlen`'s per-sequence tiled path draw the same pattern."""
    lens_q, lens_k = [9, 17, 4], [12, 17, 30]
    q, k, v, cu_q, cu_k = _packed(lens_q, lens_k, 2, 2, 16, 16)
    opts = dict(window=(4, 6), dropout_p=0.4)
    torch.manual_seed(7)
    got_out, got_lse = _varlen_triton(q, k, v, cu_q, cu_k, **opts)
    torch.manual_seed(7)
    want_out, want_lse = attnkit.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, backend="tiled", **opts)
    torch.testing.assert_close(got_out, want_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got_lse, want_lse, atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------ statistics
def _stats_from_weights(w, Lq, Lk, topk, pool):
    """The statistics from the materialised fp64 weights ``w (B, H, Lq, Lk)``."""
    i = torch.arange(Lq)[:, None] + Lk - Lq
    j = torch.arange(Lk)[None, :]
    pq, pk = min(pool, Lq), min(pool, Lk)
    rows = torch.zeros(*w.shape[:2], pq, Lk, dtype=w.dtype).index_add_(2, segment_of(pool_edges(Lq, pq, w.device)), w)
    pooled = torch.zeros(*w.shape[:2], pq, pk, dtype=w.dtype).index_add_(
        3, segment_of(pool_edges(Lk, pk, w.device)), rows
    )
    return {
        "entropy": -(w * torch.where(w > 0, w.log(), 0)).sum(-1),
        "mean_distance": (w * (i - j).abs()).sum(-1),
        "received": w.sum(2),
        "topk_weight": w.topk(min(topk, Lk), dim=-1).values,
        "pooled": pooled,
    }


STATS_CASES = {
    "plain_rect": (dict(B=1, Hq=2, Hk=2, Lq=37, Lk=45, D=16, Dv=16), {}, 5, 8),
    "causal_gqa": (dict(B=2, Hq=4, Hk=2, Lq=33, Lk=33, D=16, Dv=16), dict(causal=True), 3, 64),
    "features_empty_rows": (
        dict(B=1, Hq=2, Hk=1, Lq=30, Lk=20, D=16, Dv=16),
        dict(window=(4, 2), alibi=True, softcap=2.0, mask="bool"),
        40,
        6,
    ),
}


@needs_interpreter
@pytest.mark.parametrize("case", list(STATS_CASES))
def test_stats_kernel_matches_reference_weights(case):
    shape, opts, topk, pool = STATS_CASES[case]
    opts = dict(opts)
    q, k, v = make_qkv(**shape, dtype=torch.float32)
    q = q * 2  # sharper weights: top-k and entropy are then far from ties
    Lq, Lk = shape["Lq"], shape["Lk"]
    if opts.get("mask") == "bool":
        opts["mask"] = _bool_mask_with_empty_rows(shape["B"], Lq, Lk)
    spec = build_spec(q, k, v, **opts)
    got = stats_forward(q, k, v, spec, None, topk=topk, pool=pool_segments(pool, Lq, Lk, q.device), blocks=BLOCKS)
    assert set(got) == {"entropy", "mean_distance", "received", "topk_index", "topk_weight", "pooled"}
    w = attnkit.attention_weights(q.double(), k.double(), **opts)  # (B, Hq, Lq, Lk)
    want = _stats_from_weights(w, Lq, Lk, topk, pool)
    for name, ref in want.items():
        assert got[name].shape == ref.shape, name
        err = (got[name].double() - ref).abs().max().item()
        assert err <= 1e-4 * max(1.0, ref.abs().max().item()), f"{name}: {err:.2e}"
    # The indices point at weights equal to the reported ones (ties may order differently).
    assert got["topk_index"].dtype == torch.int64
    at = torch.gather(w, -1, got["topk_index"])
    torch.testing.assert_close(at, got["topk_weight"].double(), atol=1e-5, rtol=0)


@needs_interpreter
def test_stats_kernel_matches_the_torch_statistics_kernel():
    """Same signature and results as the torch kernel of `attnkit.attention_stats`, when it is present."""
    from attnkit.kernels import stats as torch_stats

    q, k, v = make_qkv(1, 2, 1, 33, 40, 16, 16, dtype=torch.float32)
    spec = build_spec(q, k, v, causal=True, alibi=True)
    _, lse = triton_autograd.attention(q, k, v, spec, blocks=BLOCKS)
    edges = pool_segments(8, 33, 40, q.device)
    got = stats_forward(q, k, v, spec, lse, topk=4, pool=edges, blocks=BLOCKS)
    want = torch_stats.stats_forward(q, k, v, spec, lse, topk=4, pool=edges)
    for name in ("entropy", "mean_distance", "received", "topk_weight", "pooled"):
        torch.testing.assert_close(got[name], want[name].float(), atol=1e-4, rtol=1e-4, msg=name)


@needs_interpreter
def test_stats_kernel_pools_over_uneven_segments():
    """Section pooling: the Triton kernel's segment sums equal the torch kernel's."""
    torch_stats = pytest.importorskip("attnkit.kernels.stats")
    q, k, v = make_qkv(1, 2, 1, 30, 30, 16, 16, dtype=torch.float32)
    spec = build_spec(q, k, v, causal=True)
    _, lse = triton_autograd.attention(q, k, v, spec, blocks=BLOCKS)
    edges = (torch.tensor([0, 2, 13, 14, 30]), torch.tensor([0, 7, 8, 29, 30]))
    got = stats_forward(q, k, v, spec, lse, topk=2, pool=edges, blocks=BLOCKS)
    want = torch_stats.stats_forward(q, k, v, spec, lse, topk=2, pool=edges)
    assert got["pooled"].shape == (1, 2, 4, 4)
    torch.testing.assert_close(got["pooled"], want["pooled"].float(), atol=1e-5, rtol=1e-5)


@needs_interpreter
def test_stats_buffers_past_32_bit_offsets_run_in_chunks(monkeypatch):
    """Statistics whose buffers would pass the kernels' 32-bit reach run per batch element and GQA group."""
    import attnkit.kernels.triton as triton_kernels

    q, k, v = make_qkv(2, 4, 2, 20, 24, 16, 16, dtype=torch.float32)
    mask = torch.rand(2, 4, 20, 24) < 0.8
    spec = build_spec(q, k, v, mask=mask, alibi=True)
    _, lse = triton_autograd.attention(q, k, v, spec, blocks=BLOCKS)
    whole = triton_kernels.statistics(q, k, v, spec, lse, topk=3, pool=pool_segments(6, 20, 24, q.device))
    monkeypatch.setattr(triton_kernels, "OFFSET_LIMIT", 2 * 20 * 6 + 1)  # two heads' row-pooled buffers
    chunked = triton_kernels.statistics(q, k, v, spec, lse, topk=3, pool=pool_segments(6, 20, 24, q.device))
    for name in whole:
        torch.testing.assert_close(chunked[name], whole[name], msg=name)
    monkeypatch.setattr(triton_kernels, "OFFSET_LIMIT", 50)  # not even one GQA group fits
    with pytest.raises(ValueError, match="32-bit offsets"):
        triton_kernels.statistics(q, k, v, spec, lse, topk=3, pool=pool_segments(6, 20, 24, q.device))


def test_tensors_past_32_bit_offsets_are_refused_or_copied():
    """The kernels' int32 offsets: a mask spanning 2**32 elements goes to 'tiled'; far strides are copied."""
    from attnkit.kernels.triton import offsets, offsets_refusal

    q = torch.empty(4, 16, 8192, 64, device="meta", dtype=torch.float16)
    spec = build_spec(q, q, q, mask=torch.empty(4, 16, 8192, 8192, device="meta", dtype=torch.bool))
    assert "mask spans 4294967296 elements" in offsets_refusal(q, spec)
    padding = build_spec(q, q, q, mask=torch.empty(4, 1, 1, 8192, device="meta", dtype=torch.bool))
    assert offsets_refusal(q, padding) is None
    big = torch.empty(17, 16, 8192, 1024, device="meta", dtype=torch.float16)  # over 2**31 elements
    assert "q spans" in offsets_refusal(big, build_spec(big, big, big))
    x = torch.randn(2, 3, 5, 4)
    assert offsets.addressable(x) is x
    strided = x.mT.contiguous().mT
    assert offsets.addressable(strided).stride(-1) == 1 and torch.equal(offsets.addressable(strided), x)


# -------------------------------------------------------------------- registry
def test_backend_is_registered_and_refuses_cpu_with_a_reason():
    assert "triton" in attnkit.available_backends()
    q = torch.randn(1, 2, 8, 16)
    choice = attnkit.explain_backend(q, q, q)
    assert "needs a CUDA device" in choice.reasons["triton"]
    with pytest.raises(ValueError, match="needs a CUDA device"):
        attnkit.attention(q, q, q, backend="triton")


@pytest.fixture
def _matmul_precision():
    """Restore torch's fp32 matmul precision after a test changes it."""
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


def _fake_cuda_q(dtype):
    """What the refusals read of ``q`` (dtype, device, requires_grad), claiming a CUDA device this machine lacks."""
    return SimpleNamespace(dtype=dtype, device=torch.device("cuda"), requires_grad=False)


def test_fp32_on_cuda_goes_to_sdpa_unless_tf32_is_allowed(monkeypatch, _matmul_precision):
    """fp32 without TF32: auto passes SDPA-computable requests on to SDPA; by name, or with TF32, Triton runs."""
    from attnkit import backends
    from attnkit.kernels import triton as triton_backend

    q = torch.randn(1, 2, 8, 16)
    spec = build_spec(q, q, q)
    for name in ("triton", "sdpa"):  # accept the fake CUDA tensor: only the dtype/precision rule is under test
        monkeypatch.setitem(
            backends._REGISTRY, name, dataclasses.replace(backends.get_backend(name), refusal=lambda *a: None)
        )
    torch.set_float32_matmul_precision("highest")
    fp32 = _fake_cuda_q(torch.float32)
    choice = backends.choose(fp32, spec, False, "auto")
    assert choice.backend == "sdpa" and "fp32 without TF32" in choice.reasons["triton"]
    assert backends.choose(fp32, spec, False, "triton").backend == "triton"  # by name it still runs (IEEE)
    assert backends.choose(_fake_cuda_q(torch.bfloat16), spec, False, "auto").backend == "triton"
    assert common.dot_precision(torch.float32) == "ieee"
    softcapped = build_spec(q, q, q, softcap=5.0)  # SDPA cannot compute it: the kernels keep it
    assert triton_backend.auto_deferral(fp32, softcapped, False) is None
    assert backends.choose(fp32, softcapped, False, "auto").backend == "triton"
    torch.set_float32_matmul_precision("high")  # TF32 allowed: the kernels run fp32 with TF32 dots
    assert triton_backend.auto_deferral(fp32, spec, False) is None
    assert backends.choose(fp32, spec, False, "auto").backend == "triton"
    assert common.dot_precision(torch.float32) == "tf32"
    assert triton_backend.auto_deferral(q, spec, False) is None  # CPU tensors: refused elsewhere, never deferred


def test_flags_fast_tanh_and_vector_masks():
    """``FAST_TANH`` only for 16-bit softcap on a GPU (never under the interpreter); ``MASK_ROW`` for stride-0 rows."""
    q = torch.randn(2, 2, 8, 16)
    padding = attnkit.key_padding_mask(torch.tensor([8, 5]), 8)  # (B, 1, 1, Lk)
    spec = build_spec(q, q, q, softcap=3.0, mask=padding)
    flags = common.flags(spec, torch.bfloat16)
    assert flags["MASK_ROW"] and flags["MASK_KIND"] == 1
    assert flags["FAST_TANH"] is (not common.INTERPRETED)
    assert not common.flags(spec, torch.float32)["FAST_TANH"]
    full = build_spec(q, q, q, mask=torch.rand(2, 1, 8, 8) > 0.5)
    assert not common.flags(full, torch.bfloat16)["MASK_ROW"]


def test_autotune_configs_are_pruned_by_shared_memory():
    """Configs whose tiles cannot fit in an H100's shared memory are never compiled; every listed one fits at D=128."""
    from attnkit.kernels.triton import backward, forward

    bf16, fp32 = (torch.empty(1, dtype=dt, device="meta") for dt in (torch.bfloat16, torch.float32))
    tuned = {
        "forward": (forward._fwd_tuned, common.shared_memory_pruner("BLOCK_M", "BLOCK_N", once_pair=False)),
        "dkdv": (backward._dkdv_tuned, common.shared_memory_pruner("BLOCK_N", "BLOCK_M", once_pair=True)),
        "dq": (backward._dq_tuned, common.shared_memory_pruner("BLOCK_M", "BLOCK_N", once_pair=True)),
    }
    for name, (kernel, prune) in tuned.items():
        configs = kernel.configs
        assert prune(configs, {"Q": bf16}, BLOCK_D=128, BLOCK_DV=128) == configs, name
        wide = prune(configs, {"Q": fp32}, BLOCK_D=256, BLOCK_DV=256)
        assert 1 <= len(wide) < len(configs), name
        if name == "forward":  # fp32 at D = 256: no listed stage count fits, the smallest tile with fewer does
            assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages) for c in wide] == [(64, 32, 2)]
        for c in wide:  # what is kept fits (fewer stages of the smallest tile when nothing listed does)
            once, streamed = ("BLOCK_M", "BLOCK_N") if name != "dkdv" else ("BLOCK_N", "BLOCK_M")
            first = 256 * 4 * (2 if name != "forward" else 1)
            assert c.kwargs[once] * first + c.num_stages * c.kwargs[streamed] * 512 * 4 <= common.SHARED_LIMIT


def test_importing_attnkit_does_not_import_triton():
    code = "import sys, attnkit; assert 'triton' not in sys.modules, 'attnkit imported triton'"
    subprocess.run(
        [sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    )


def test_module_in_a_fresh_process_when_triton_was_imported_first():
    """Without the interpreter in this process, run this module where it can be set first."""
    if IN_PROCESS or os.environ.get("ATTNKIT_TRITON_SUBPROCESS"):
        pytest.skip(
            "the kernels were decorated for the interpreter in this process (the tests above run or say why not)"
        )
    env = {**os.environ, "TRITON_INTERPRET": "1", "ATTNKIT_TRITON_SUBPROCESS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    # The compile tests (slow) need no interpreter and have run in this process already.
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", __file__],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


def _compile_check(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run `tests/triton_compile_check.py` in a fresh process, without the interpreter (kernels compile for sm_90a)."""
    script = os.path.join(os.path.dirname(__file__), "triton_compile_check.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9's default, stated (it warns when unset)
    proc = subprocess.run([sys.executable, script, *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_feature_variants_compile_for_an_h100_without_a_gpu():
    """Every feature at once, varlen, fp16/fp32, D = 32..256: the front end and ptxas accept them and they fit."""
    proc = _compile_check("--smoke")
    assert proc.stdout.count("ok ") == 8, proc.stdout


@pytest.mark.slow
def test_compiler_report_no_spills_and_a_tutorial_sized_bulk_loop(tmp_path):
    """The offline compiler report (sm_90a, bf16, launch-time specialisations, D = 64 and 128).

    Every autotune config of the forward, dK/dV and dQ kernels compiles with 0 spilled
    bytes, and the forward's unmasked bulk loop is within 10% of the tutorial-form kernel's
    SASS instruction count compiled with the same config.
    """
    path = tmp_path / "report.json"
    _compile_check("--json", str(path))
    rows = json.loads(path.read_text())
    from attnkit.kernels.triton import backward, forward

    compiled = {(r["kernel"], r["D"], r["BLOCK_M"], r["BLOCK_N"], r["warps"], r["stages"]) for r in rows}
    for kernel, tuned in (("forward", forward._fwd_tuned), ("dkdv", backward._dkdv_tuned), ("dq", backward._dq_tuned)):
        for c in tuned.configs:
            for D in (64, 128):
                key = (kernel, D, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                assert key in compiled, f"autotune config {key} missing from the report"
    spilling = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    assert not spilling, f"configs that spill: {spilling}"
    tutorial = {(r["D"], r["BLOCK_M"], r["BLOCK_N"], r["warps"], r["stages"]): r["bulk_loop"] for r in rows
                if r["kernel"] == "tutorial"}  # fmt: skip
    for r in rows:
        if r["kernel"] == "forward" and r["variant"] == "plain":
            ref = tutorial[(r["D"], r["BLOCK_M"], r["BLOCK_N"], r["warps"], r["stages"])]
            assert r["bulk_loop"] <= 1.10 * ref, f"bulk loop {r['bulk_loop']} vs tutorial {ref}: {r}"


# Other modules' tests must not run under the interpreter: restore the variable once this
# module's kernels are decorated (above); the fixture sets it again while these tests run.
if _previous is None:
    os.environ.pop("TRITON_INTERPRET", None)
else:
    os.environ["TRITON_INTERPRET"] = _previous
