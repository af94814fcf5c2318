"""The ``attnkit::`` custom ops of `attnkit.kernels.ops`, called eagerly, without ``torch.compile``.

``tests/test_compile.py`` traces the ops inside compiled graphs (minutes on two cores) and runs
``torch.library.opcheck`` on one spec. Here, in seconds, each op is called directly through
``torch.ops.attnkit`` and held to the eager kernels and the float64 reference:

* every spec field travels through `ops.spec_arguments` and back through `ops._spec`
  (scale, causal, both window sides and one-sided windows, softcap, ALiBi, bool and float
  masks, dropout probability and seed, ``align``, fp64 accumulation, ``Dv != D``, GQA, ``Lq != Lk``);
* gradients through the registered autograd (``torch.autograd.grad`` on the op's outputs,
  the float mask's gradient exactly when the mask requires one, the ``lse`` gradient);
* the fake implementations under ``FakeTensorMode`` (shapes, dtypes and strides of the real outputs);
* the entry points' traced branch run eagerly: ``torch.compiler.is_compiling`` patched to answer
  True sends `ops.tiled_attention`, `ops.tiled_varlen`, `ops.tiled_statistics` and
  `ops.nonfinite_rows` through the ops, and each must compute what the eager path computes.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from attnkit.functional import build_spec, build_varlen_spec
from attnkit.kernels import nonfinite, ops, packed, reference, tiled
from attnkit.spec import AttentionSpec
from tests.conftest import make_qkv

F64 = torch.float64
ARG_NAMES = (
    "mask", "alibi_slopes", "dropout_seed", "scale", "causal", "window_left", "window_right", "softcap",
    "dropout_p", "align",
)  # fmt: skip
SPEC_FIELDS = (
    "batch", "q_heads", "kv_heads", "q_len", "kv_len", "head_dim", "v_head_dim", "scale", "causal", "window",
    "softcap", "dropout_p", "dropout_seed", "align", "acc_dtype",
)  # fmt: skip


def _qkv(B=2, Hq=4, Hk=2, Lq=5, Lk=7, D=8, Dv=6, dtype=F64, seed=0):
    """``q (B, Hq, Lq, D)``, ``k (B, Hk, Lk, D)``, ``v (B, Hk, Lk, Dv)`` requiring grad (GQA, Lq != Lk, Dv != D)."""
    return make_qkv(B, Hq, Hk, Lq, Lk, D, Dv, dtype=dtype, grad=True, seed=seed)


def _bool_mask():
    """``(2, 1, 5, 7)``: a padded batch element (its last 3 keys) and a query row of element 0 that sees 2 keys."""
    mask = torch.ones(2, 1, 5, 7, dtype=torch.bool)
    mask[1, ..., -3:] = False
    mask[0, :, 2, 2:] = False
    return mask


def _float_mask(dtype=F64):
    return torch.randn(1, 4, 5, 7, generator=torch.Generator().manual_seed(1), dtype=dtype)


# Each case changes the attention output, so a field lost between the spec and the op changes a result.
CASES = {
    "plain": {},
    "scale": dict(scale=0.3),
    "causal": dict(causal=True),
    "window": dict(window=(2, 1)),
    "window_left_only": dict(window=(1, None)),
    "window_right_only": dict(window=(None, 1)),
    "causal_and_window": dict(causal=True, window=(2, 3)),
    "softcap": dict(softcap=1.5),
    "alibi": dict(alibi=True),
    "bool_mask": dict(mask="bool"),
    "float_mask": dict(mask="float"),
    "dropout": dict(dropout_p=0.3),
    "align": dict(causal=True, align=1),
}


def _spec(q, k, v, opts: dict) -> AttentionSpec:
    """The spec of one of `CASES` (masks made here; ``align`` set after validation, as ring attention does)."""
    opts = dict(opts)
    align = opts.pop("align", None)
    if opts.get("mask") == "bool":
        opts["mask"] = _bool_mask()
    elif opts.get("mask") == "float":
        opts["mask"] = _float_mask(q.dtype)
    torch.manual_seed(3)  # the dropout seed
    return dataclasses.replace(build_spec(q, k, v, **opts), align=align)


def _same_spec(got, want) -> None:
    for name in SPEC_FIELDS:
        assert getattr(got, name) == getattr(want, name), name
    for name in ("alibi_slopes", "mask"):
        assert getattr(got, name) is getattr(want, name), name


def _op_args(spec):
    """The op arguments of ``spec`` for CPU tensors."""
    return ops.spec_arguments(spec, torch.device("cpu"))


def _loss(out, lse, seed=5):
    """A scalar of ``out`` and ``lse`` with random weights; ``-inf`` lse (rows with no key) carries no gradient."""
    g = torch.Generator().manual_seed(seed)
    w_out = torch.randn(out.shape, generator=g, dtype=out.dtype)
    w_lse = torch.randn(lse.shape, generator=g, dtype=lse.dtype)
    finite = torch.isfinite(lse)
    return (out * w_out).sum() + (torch.where(finite, lse, 0) * w_lse).sum()


# ------------------------------------------------------------------------------ the spec as arguments
def test_seed_tensor_is_a_0d_int64_on_the_device_and_passes_tensors_and_none_through():
    seed = ops.seed_tensor(2**32 - 5, torch.device("meta"))
    assert (seed.shape, seed.dtype, seed.device.type) == ((), torch.int64, "meta")
    seed = ops.seed_tensor(123, torch.device("cpu"))
    assert (seed.shape, seed.dtype, int(seed)) == ((), torch.int64, 123)
    t = torch.tensor(7)
    assert ops.seed_tensor(t, torch.device("meta")) is t
    assert ops.seed_tensor(None, torch.device("cpu")) is None


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_spec_arguments_carry_every_field_and_spec_rebuilds_it(case):
    q, k, v = _qkv()
    spec = _spec(q, k, v, CASES[case])
    args = _op_args(spec)
    assert tuple(args) == ARG_NAMES
    left, right = spec.window if spec.window is not None else (None, None)
    assert (args["window_left"], args["window_right"]) == (left, right)
    for name in ("scale", "causal", "softcap", "dropout_p", "align"):
        assert args[name] == getattr(spec, name), name
    assert args["mask"] is spec.mask and args["alibi_slopes"] is spec.alibi_slopes
    if spec.dropout_seed is None:
        assert args["dropout_seed"] is None
    else:
        assert args["dropout_seed"].dtype == torch.int64 and int(args["dropout_seed"]) == spec.dropout_seed
    _same_spec(ops._spec(q, k, v, **args), spec)


def test_spec_arguments_put_the_seed_on_the_given_device():
    q, k, v = (x.detach().to("meta") for x in _qkv())
    torch.manual_seed(3)
    spec = build_spec(q, k, v, dropout_p=0.5)
    seed = ops.spec_arguments(spec, q.device)["dropout_seed"]
    assert (seed.device.type, seed.dtype, seed.shape) == ("meta", torch.int64, ())


ENTRY_POINTS = {
    "tiled_attention": ("_tiled_forward", lambda q, k, v, cu, spec: ops.tiled_attention(q, k, v, spec)),
    "tiled_varlen": (
        "_varlen_forward",
        lambda q, k, v, cu, spec: ops.tiled_varlen(*(x[0].transpose(0, 1) for x in (q, k, v)), cu, cu, 5, 7, spec),
    ),
    "tiled_statistics": (
        "_statistics",
        lambda q, k, v, cu, spec: ops.tiled_statistics(q, k, v, spec, q[..., 0], topk=2, pool=(cu, cu)),
    ),
    "nonfinite_rows": ("_nonfinite_rows", lambda q, k, v, cu, spec: ops.nonfinite_rows(q, k, v, spec)),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_entry_points_hand_the_op_the_spec_with_the_seed_on_q_device(entry, monkeypatch):
    """Traced, each entry point calls its op with `ops.spec_arguments` of the spec on ``q``'s device (meta here)."""
    q, k, v = (x.detach().to("meta") for x in _qkv(B=1))
    torch.manual_seed(3)
    spec = build_spec(q, k, v, dropout_p=0.5, causal=True, window=(None, 2), softcap=2.0, scale=0.5, alibi=True)
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return (q,) * 6

    op_name, call = ENTRY_POINTS[entry]
    monkeypatch.setattr(ops, op_name, spy)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    call(q, k, v, torch.tensor([0, 5], device="meta"), spec)
    (kwargs,) = calls
    seed = kwargs.pop("dropout_seed")
    assert (seed.device, seed.dtype, seed.shape) == (q.device, torch.int64, ())
    want = {n: a for n, a in ops.spec_arguments(spec, q.device).items() if n != "dropout_seed"}
    if entry == "tiled_varlen":
        del want["mask"], want["align"]
    assert {n: kwargs[n] for n in want} == want


def test_spec_from_the_op_arguments_reads_shapes_dtype_and_a_seed_tensor():
    """Shapes from ``q, k, v`` (``v`` None: ``Dv = D``); fp64 inputs accumulate in fp64, others in fp32."""
    q, k, v = _qkv(B=3, Hq=6, Hk=2, Lq=4, Lk=9, D=5, Dv=7)
    args = dict(_op_args(build_spec(q, k, v)), dropout_seed=torch.tensor(2**32 - 1), dropout_p=0.5)
    spec = ops._spec(q, k, v, **args)
    got = (spec.batch, spec.q_heads, spec.kv_heads, spec.q_len, spec.kv_len, spec.head_dim, spec.v_head_dim)
    assert got == (3, 6, 2, 4, 9, 5, 7)
    assert spec.acc_dtype == F64 and spec.dropout_seed == 2**32 - 1 and isinstance(spec.dropout_seed, int)
    assert spec.window is None
    assert ops._spec(q, k, None, **args).v_head_dim == 5
    for dtype, acc in ((torch.float32, torch.float32), (torch.float16, torch.float32), (torch.bfloat16, torch.float32)):
        assert ops._spec(q.to(dtype), k.to(dtype), v.to(dtype), **args).acc_dtype == acc
        assert ops._acc(q.to(dtype)) == acc
    assert ops._acc(q) == F64


# ---------------------------------------------------------------------------------- tiled ops
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_tiled_forward_op_and_its_autograd_match_the_reference(case):
    """The op (torch engine, 2 x 3 tiles) against the fp64 reference: out, lse and the gradients of both."""
    q, k, v = _qkv()
    spec = _spec(q, k, v, CASES[case])
    mask_grad = spec.mask is not None and spec.mask.dtype != torch.bool
    if mask_grad:
        spec = dataclasses.replace(spec, mask=spec.mask.clone().requires_grad_())
    out, lse = torch.ops.attnkit.tiled_forward(q, k, v, **_op_args(spec), block_q=2, block_k=3, engine="torch")
    want_out, want_lse = reference.attention(q, k, v, spec)
    assert (out.dtype, lse.dtype) == (F64, F64)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(lse, want_lse)
    wrt = (q, k, v, spec.mask) if mask_grad else (q, k, v)
    got = torch.autograd.grad(_loss(out, lse), wrt)
    want = torch.autograd.grad(_loss(want_out, want_lse), wrt)
    for name, g, w in zip(["q", "k", "v", "mask"], got, want, strict=False):
        torch.testing.assert_close(g, w, msg=lambda m, name=name: f"d{name}: {m}")


def test_tiled_forward_op_takes_the_out_gradient_alone_and_the_lse_gradient_alone():
    q, k, v = _qkv()
    spec = _spec(q, k, v, dict(causal=True, alibi=True))
    out, lse = torch.ops.attnkit.tiled_forward(q, k, v, **_op_args(spec), block_q=4, block_k=4, engine=None)
    want_out, want_lse = reference.attention(q, k, v, spec)
    w = torch.randn(lse.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    for got_y, want_y in ((out.sum(), want_out.sum()), ((lse * w).sum(), (want_lse * w).sum())):
        got = torch.autograd.grad(got_y, (q, k, v), retain_graph=True)
        want = torch.autograd.grad(want_y, (q, k, v), retain_graph=True, allow_unused=True)  # lse: v unused
        for x, g, w in zip((q, k, v), got, want, strict=True):
            torch.testing.assert_close(g, torch.zeros_like(x) if w is None else w)


def test_tiled_forward_op_drops_the_same_weights_for_a_seed_given_as_int_or_0d_tensor():
    """A traced spec carries its dropout seed as a 0-d int64 tensor (`attnkit.dropout.new_seed`): same weights."""
    q, k, v = (x.detach() for x in _qkv())
    spec = dataclasses.replace(build_spec(q, k, v, dropout_p=0.4), dropout_seed=2**32 - 3)
    outs = [
        torch.ops.attnkit.tiled_forward(q, k, v, **_op_args(s), block_q=4, block_k=4, engine=None)[0]
        for s in (spec, dataclasses.replace(spec, dropout_seed=torch.tensor(2**32 - 3)),
                  dataclasses.replace(spec, dropout_seed=2**32 - 4))
    ]  # fmt: skip
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    torch.testing.assert_close(outs[0], reference.attention(q, k, v, spec)[0])


def test_float_mask_gets_a_gradient_only_when_it_requires_one():
    """A float mask without ``requires_grad``: the backward asks for no mask gradient, and q gets its own.

    Then the mask requiring grad while ``q, k, v`` do not: the mask's gradient alone.
    """
    q, k, v = _qkv()
    mask = _float_mask()
    spec = build_spec(q, k, v, mask=mask)
    out, lse = torch.ops.attnkit.tiled_forward(q, k, v, **_op_args(spec), block_q=4, block_k=4, engine="torch")
    (dq,) = torch.autograd.grad(_loss(out, lse), (q,))
    want_out, want_lse = reference.attention(q, k, v, spec)
    torch.testing.assert_close(dq, torch.autograd.grad(_loss(want_out, want_lse), (q,))[0])
    q0, k0, v0 = (x.detach() for x in (q, k, v))
    mask = _float_mask().requires_grad_()
    spec = build_spec(q0, k0, v0, mask=mask)
    out, lse = torch.ops.attnkit.tiled_forward(q0, k0, v0, **_op_args(spec), block_q=4, block_k=4, engine="torch")
    (dmask,) = torch.autograd.grad(_loss(out, lse), (mask,))
    want_out, want_lse = reference.attention(q0, k0, v0, spec)
    torch.testing.assert_close(dmask, torch.autograd.grad(_loss(want_out, want_lse), (mask,))[0])


# ------------------------------------------------------------------ the entry points' traced branch
@pytest.mark.parametrize("case", ["plain", "float_mask", "dropout", "window_left_only", "align"])
def test_tiled_attention_traced_branch_computes_what_the_eager_branch_computes(case, monkeypatch):
    """The op path and `tiled.attention` call the same kernel with the same blocks: bitwise equal, gradients too.

    ``Lq = 300`` and ``Lk = 520`` exceed one query block (256) and one key tile (512), so the blocks matter.
    """
    q, k, v = _qkv(B=1, Hq=2, Hk=1, Lq=300, Lk=520, D=4, Dv=3, dtype=torch.float32)
    spec = _spec(q, k, v, CASES[case] if case != "float_mask" else {})
    if case == "float_mask":  # one of (1, Hq, Lq, Lk) here
        spec = dataclasses.replace(spec, mask=torch.randn(1, 2, 300, 520, requires_grad=True))
    results = []
    for compiling in (False, True):
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda c=compiling: c)
        out, lse = ops.tiled_attention(q, k, v, spec, return_lse=False)
        wrt = (q, k, v) if spec.mask is None else (q, k, v, spec.mask)
        results.append((out, lse, *torch.autograd.grad(_loss(out, lse), wrt)))
    for eager, op in zip(*results, strict=True):
        assert torch.equal(eager, op)
    # Eager calls keep the kernel's own autograd.Function; only the traced branch goes through the op.
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    assert type(ops.tiled_attention(q, k, v, spec)[0].grad_fn).__name__ == "TiledAttentionBackward"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert "attnkit_tiled_forward" in type(ops.tiled_attention(q, k, v, spec)[0].grad_fn).__name__


def _statistics_case():
    q, k, _ = (x.detach() for x in _qkv())
    spec = _spec(q, k, None, dict(window=(3, 1), alibi=True, softcap=1.5, mask="float", scale=0.4))
    lse = reference.attention(q, k, torch.zeros(*k.shape[:3], 1, dtype=F64), spec)[1]  # (B, Hq, Lq)
    return q, k, spec, lse, (torch.tensor([0, 2, 5]), torch.tensor([0, 3, 4, 7]))


def test_statistics_op_and_traced_branch_match_the_eager_statistics(monkeypatch):
    """``attnkit::statistics`` called directly and through `ops.tiled_statistics`'s traced branch."""
    q, k, spec, lse, pool = _statistics_case()
    want = tiled.statistics(q, k, None, spec, lse, topk=3, pool=pool)
    got = torch.ops.attnkit.statistics(q, k, lse, *pool, 3, **_op_args(spec))
    assert len(got) == len(tiled.STAT_NAMES)
    for name, value in zip(tiled.STAT_NAMES, got, strict=True):
        torch.testing.assert_close(value, want[name], rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    got = ops.tiled_statistics(q, k, None, spec, lse, topk=3, pool=pool)
    assert list(got) == list(tiled.STAT_NAMES)
    assert got["pooled"].shape == (2, 4, 2, 3) and got["topk_index"].shape == (2, 4, 5, 3)
    for name in tiled.STAT_NAMES:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")


def test_tiled_statistics_eager_branch_is_the_kernel_with_or_without_the_forward_lse():
    """Eager, `ops.tiled_statistics` is `tiled.statistics`: the second pass given ``lse``, else the one pass."""
    q, k, spec, lse, pool = _statistics_case()
    v = torch.randn(*k.shape[:3], 6, dtype=F64, generator=torch.Generator().manual_seed(6))
    for given in (lse, None):
        got = ops.tiled_statistics(q, k, v, spec, given, topk=3, pool=pool)
        want = tiled.statistics(q, k, v, spec, given, topk=3, pool=pool)
        assert sorted(got) == sorted(want) == sorted((*tiled.STAT_NAMES, *(("output", "lse") if given is None else ())))
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")
    torch.testing.assert_close(got["output"], reference.attention(q, k, v, spec)[0])


def test_tiled_statistics_traced_branch_needs_the_forward_lse(monkeypatch):
    q, k, spec, _, pool = _statistics_case()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with pytest.raises(ValueError) as info:
        ops.tiled_statistics(q, k, None, spec, None, topk=3, pool=pool)
    assert str(info.value) == "tiled_statistics: under torch.compile the statistics pass needs the forward's lse"


# ----------------------------------------------------------------------------------- non-finite rows
def test_nonfinite_rows_op_names_the_rows_the_rule_poisons():
    """A NaN query row and a key reached only by some rows (window): the op names those, as `nonfinite` does."""
    q, k, v = _qkv(Lq=6, Lk=9)
    spec = _spec(q, k, v, dict(window=(1, 0), dropout_p=0.2))
    assert not ops.nonfinite_rows(q, k, v, spec).any()
    assert ops.nonfinite_rows(q, k, v, spec).shape == (2, 4, 6)
    with torch.no_grad():
        q[1, 2, 0, 3] = float("nan")
        k[0, 1, 5, 0] = float("inf")  # seen by queries 2 and 3 of element 0, heads 2 and 3 (window (1, 0), offset 3)
    want = nonfinite.poisoned_rows(spec, nonfinite.find(q, k, v))
    assert int(want.sum()) == 5
    got = ops.nonfinite_rows(q, k, v, spec)
    assert got.dtype == torch.bool and torch.equal(got, want)
    assert torch.equal(torch.ops.attnkit.nonfinite_rows(q.detach(), k.detach(), v.detach(), **_op_args(spec)), want)


# ------------------------------------------------------------------------------------------ varlen
LENS_Q, LENS_K = [3, 0, 5, 2, 4], [4, 3, 0, 6, 2]  # no query in sequence 1, no key in sequence 2
VARLEN_CASES = {
    "causal_alibi_softcap": dict(causal=True, alibi=True, softcap=2.0, scale=0.4),
    "window_left_dropout": dict(window=(2, None), dropout_p=0.25),
    "window_right": dict(window=(None, 0)),
}


def _packed(lens_q=LENS_Q, lens_k=LENS_K, Hq=4, Hk=2, D=8, Dv=6, dtype=F64):
    """``q (total_q, Hq, D)``, ``k (total_k, Hk, D)``, ``v (total_k, Hk, Dv)`` and int32 ``cu_seqlens_q``, ``_k``."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (
        torch.randn(n, h, d, generator=g, dtype=dtype).requires_grad_()
        for n, h, d in ((sum(lens_q), Hq, D), (sum(lens_k), Hk, D), (sum(lens_k), Hk, Dv))
    )
    cu_q, cu_k = (torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32) for lens in (lens_q, lens_k))
    return q, k, v, cu_q, cu_k


def _varlen_args(spec):
    args = _op_args(spec)
    del args["mask"], args["align"]
    return args


@pytest.mark.parametrize("case", list(VARLEN_CASES), ids=list(VARLEN_CASES))
def test_tiled_varlen_traced_branch_computes_what_the_eager_branch_computes(case, monkeypatch):
    """The ``attnkit::varlen_forward`` op and its registered backward against `tiled.attention_varlen`."""
    q, k, v, cu_q, cu_k = _packed()
    torch.manual_seed(3)
    spec, max_q, max_k = build_varlen_spec(q, k, v, cu_q, cu_k, **VARLEN_CASES[case])
    results = []
    for compiling in (False, True):
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda c=compiling: c)
        out, lse = ops.tiled_varlen(q, k, v, cu_q, cu_k, max_q, max_k, spec, return_lse=True)
        assert (out.shape, lse.shape, lse.dtype) == ((14, 4, 6), (4, 14), F64)
        results.append((out, lse, *torch.autograd.grad(_loss(out, lse), (q, k, v))))
    for name, eager, op in zip(("out", "lse", "dq", "dk", "dv"), *results, strict=True):
        torch.testing.assert_close(op, eager, msg=lambda m, name=name: f"{name}: {m}")
    out, lse = results[1][:2]  # sequence 2 (rows 3 to 7) has no key: 0 and -inf
    assert bool((out[3:8] == 0).all()) and bool(torch.isneginf(lse[:, 3:8]).all())


def test_tiled_varlen_eager_branch_returns_the_lse_only_when_asked():
    """Eager, `ops.tiled_varlen` is `tiled.attention_varlen`: ``lse`` None by default (the traced op always has it)."""
    q, k, v, cu_q, cu_k = _packed()
    spec, max_q, max_k = build_varlen_spec(q, k, v, cu_q, cu_k, window=(1, 1))
    out, lse = ops.tiled_varlen(q, k, v, cu_q, cu_k, max_q, max_k, spec)
    assert lse is None
    want_out, want_lse = tiled.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, spec, True)
    assert torch.equal(out, want_out)
    assert torch.equal(ops.tiled_varlen(q, k, v, cu_q, cu_k, max_q, max_k, spec, return_lse=True)[1], want_lse)


def test_varlen_op_matches_the_reference_sequence_by_sequence_with_gqa_and_dv():
    """Out, lse and gradients of every sequence (one with no key: 0 and ``-inf``; one with no query: nothing)."""
    q, k, v, cu_q, cu_k = _packed()
    torch.manual_seed(3)
    opts = VARLEN_CASES["causal_alibi_softcap"]
    spec = build_varlen_spec(q, k, v, cu_q, cu_k, **opts)[0]
    out, lse = torch.ops.attnkit.varlen_forward(q, k, v, cu_q, cu_k, **_varlen_args(spec))
    got = torch.autograd.grad(_loss(out, lse), (q, k, v))
    outs, lses = [], []  # (Lq, Hq, Dv) and (Hq, Lq) of each sequence with queries
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b, (n_q, n_k) in enumerate(zip(LENS_Q, LENS_K, strict=True)):
        if n_q and not n_k:
            outs.append(q.new_zeros(n_q, 4, 6))
            lses.append(torch.full((4, n_q), float("-inf"), dtype=F64))
        elif n_q:
            qb, kb, vb = (
                packed.packed_view(x) for x in (q[cq[b] : cq[b + 1]], k[ck[b] : ck[b + 1]], v[ck[b] : ck[b + 1]])
            )
            # out_b (1, Hq, Lq, Dv), lse_b (1, Hq, Lq)
            out_b, lse_b = reference.attention(qb, kb, vb, build_spec(qb, kb, vb, **opts))
            outs.append(out_b[0].transpose(0, 1))
            lses.append(lse_b[0])
    want_out, want_lse = torch.cat(outs), torch.cat(lses, dim=1)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(lse, want_lse)
    want = torch.autograd.grad(_loss(want_out, want_lse), (q, k, v), allow_unused=True)
    for name, g, w, x in zip("qkv", got, want, (q, k, v), strict=True):
        torch.testing.assert_close(g, torch.zeros_like(x) if w is None else w, msg=lambda m, name=name: f"d{name}: {m}")


def test_varlen_op_applies_the_nonfinite_rule_per_sequence_and_passes_no_gradient_from_poisoned_rows():
    """A NaN key of sequence 3 poisons the rows of sequence 3 that see it (causal), no other row."""
    q, k, v, cu_q, cu_k = _packed()
    with torch.no_grad():
        k[8, 1, 2] = float("nan")  # key 1 of sequence 3 (keys 7 to 12), head 1; causal offset 4: both queries see it
    spec, max_q, max_k = build_varlen_spec(q, k, v, cu_q, cu_k, causal=True)
    out, lse = torch.ops.attnkit.varlen_forward(q, k, v, cu_q, cu_k, **_varlen_args(spec))
    poisoned = torch.zeros(14, 4, dtype=torch.bool)
    poisoned[8:10, 2:4] = True  # query heads 2 and 3 share key head 1
    assert torch.equal(torch.isnan(lse).transpose(0, 1), poisoned)
    assert torch.equal(torch.isnan(out).any(-1), poisoned) and bool(torch.isnan(out[poisoned]).all())
    # Every other row as on cleaned keys and values; the poisoned rows pass no gradient (not a NaN one).
    want_out = tiled.attention_varlen(q, nonfinite.clean(k), nonfinite.clean(v), cu_q, cu_k, max_q, max_k, spec)[0]
    torch.testing.assert_close(out[~poisoned], want_out[~poisoned])
    w = torch.linspace(-1, 1, 6, dtype=F64)
    got = torch.autograd.grad((torch.where(poisoned[..., None], 0, out) * w).sum(), (q, k, v))
    want = torch.autograd.grad((torch.where(poisoned[..., None], 0, want_out) * w).sum(), (q, k, v))
    for g, w in zip(got, want, strict=True):
        assert bool(torch.isfinite(g).all())
        torch.testing.assert_close(g, w)


def test_sequences_validate_both_cumulative_lengths_and_return_them():
    """`ops._sequences` (the op's check, the values being known only when it runs) names the faulty argument."""
    cu_q, cu_k = torch.tensor([0, 3, 3, 8], dtype=torch.int32), torch.tensor([0, 4, 7, 7])
    assert ops._sequences(cu_q, cu_k, 8, 7, torch.device("cpu")) == ([0, 3, 3, 8], [0, 4, 7, 7])
    cpu = torch.device("cpu")
    errors = {
        "cu_seqlens_q must start at 0, never decrease and end at the packed length 7, got [0, 3, 3, 8]": (
            cu_q, cu_k, 7, 7, cpu),
        "cu_seqlens_k must start at 0, never decrease and end at the packed length 8, got [0, 4, 7, 7]": (
            cu_q, cu_k, 8, 8, cpu),
        "cu_seqlens_q is on cpu but q is on meta": (cu_q, cu_k, 8, 7, torch.device("meta")),
        "cu_seqlens_k is on meta but q is on cpu": (cu_q, cu_k.to("meta"), 8, 7, cpu),
        "cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got 3 and 2": (
            cu_q, torch.tensor([0, 4, 7]), 8, 7, cpu),
    }  # fmt: skip
    for message, args in errors.items():
        with pytest.raises(ValueError) as info:
            ops._sequences(*args)
        assert str(info.value) == f"attention_varlen: {message}"


def test_varlen_op_checks_the_cumulative_lengths_it_is_given():
    q, k, v, cu_q, cu_k = _packed()
    args = _varlen_args(build_varlen_spec(q, k, v, cu_q, cu_k)[0])
    with pytest.raises(ValueError, match=r"^attention_varlen: cu_seqlens_k must start at 0, .* length 15, got \[0,"):
        torch.ops.attnkit.varlen_forward(q, k, v, cu_q, cu_q, **args)  # the query lengths given for the keys
    with pytest.raises(ValueError, match=r"^attention_varlen: cu_seqlens_q must start at 0, .* length 14, got \[0,"):
        torch.ops.attnkit.varlen_forward(q, k, v, cu_k, cu_k, **args)


# ----------------------------------------------------------------------------- fake implementations
def _fake_and_real(op, *args, **kwargs):
    """``op``'s outputs run for real and under ``FakeTensorMode`` (shapes from the fake implementation)."""
    real = op(*args, **kwargs)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake_kwargs = {n: mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for n, a in kwargs.items()}
        fake = op(*fake_args, **fake_kwargs)
    real, fake = (x if isinstance(x, tuple | list) else (x,) for x in (real, fake))
    assert len(real) == len(fake)
    for r, f in zip(real, fake, strict=True):
        assert (f.shape, f.dtype, f.stride(), f.device) == (r.shape, r.dtype, r.stride(), r.device)
    return real


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_fake_implementations_give_the_real_outputs_shapes_dtypes_and_strides(dtype):
    q, k, v = (x.detach().to(dtype) for x in _qkv(Lq=5, Lk=7, D=8, Dv=6))
    spec = build_spec(q, k, v, mask=_float_mask(dtype), causal=True)
    args = _op_args(spec)
    out, lse = _fake_and_real(torch.ops.attnkit.tiled_forward.default, q, k, v, **args, block_q=4, block_k=4,
                              engine=None)  # fmt: skip
    for mask_grad in (False, True):
        _fake_and_real(torch.ops.attnkit.tiled_backward.default, torch.ones_like(out), lse, q, k, v, out, lse,
                       **args, block_q=4, block_k=4, engine=None, mask_grad=mask_grad)  # fmt: skip
    edges = torch.tensor([0, 2, 5]), torch.tensor([0, 1, 3, 7])
    for topk in (3, 9):  # at most Lk weights kept
        _fake_and_real(torch.ops.attnkit.statistics.default, q, k, lse, *edges, topk, **args)
    _fake_and_real(torch.ops.attnkit.nonfinite_rows.default, q, k, v, **args)
    pq, pk, pv, cu_q, cu_k = (x.detach() for x in _packed())
    pq, pk, pv = pq.to(dtype), pk.to(dtype), pv.to(dtype)
    vargs = _varlen_args(build_varlen_spec(pq, pk, pv, cu_q, cu_k, causal=True)[0])
    out, lse = _fake_and_real(torch.ops.attnkit.varlen_forward.default, pq, pk, pv, cu_q, cu_k, **vargs)
    _fake_and_real(torch.ops.attnkit.varlen_backward.default, torch.ones_like(out), lse, pq, pk, pv, out, lse, cu_q,
                   cu_k, **vargs)  # fmt: skip
