"""The tiled kernel (`attnkit.kernels.tiled`) against the fp64 reference kernel, tile edge by tile edge.

Small blocks (``block_q = block_k = 4``) put every boundary the kernel has inside a dozen rows:
a length one past a block, the causal diagonal on a tile edge, ``Lq < Lk`` and ``Lq > Lk`` (rows
without keys), a window edge on a tile edge. Each case runs both tile engines, forward and
backward (through the output alone, which the fused engine's backward takes, and through the
output and the log-sum-exp), in fp64 against the reference kernel on the same spec, so that
dropout draws the same keep mask.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from attnkit.functional import build_spec
from attnkit.kernels import flash_cpu, reference, tiled
from attnkit.spec import AttentionSpec
from attnkit.stats import pool_segments
from tests.conftest import make_qkv

TOL = {"rtol": 1e-9, "atol": 1e-11}


def _tensors(B, Hq, Hk, Lq, Lk, D=8, Dv=8, dtype=torch.float64, seed=0):
    return make_qkv(B, Hq, Hk, Lq, Lk, D, Dv, dtype=dtype, grad=True, seed=seed)


def _case(name, dtype=torch.float64):
    """``(q, k, v, opts)`` for a named case; ``opts`` go to `build_spec`."""
    shapes = {
        "causal_lq_lt_lk": (9, 13),
        "causal_lq_gt_lk": (13, 9),
        "causal_square": (12, 12),
        "two_rows_float_mask": (2, 13),
    }
    Lq, Lk = shapes.get(name, (9, 13))
    q, k, v = _tensors(2, 4, 2, Lq, Lk, dtype=dtype, seed=len(name))
    g = torch.Generator().manual_seed(7)
    opts = {"scale": 0.37}
    if name.startswith("causal"):
        opts["causal"] = True
    elif name == "window":
        opts["window"] = (4, 3)  # row i sees [i + 4 - 4, i + 4 + 3]: edges on multiples of 4
    elif name == "alibi_window":
        opts.update(alibi=True, window=(5, 2))
    elif name == "full_float_mask":
        opts["mask"] = torch.randn(2, 4, Lq, Lk, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    elif name == "fixed_float_mask":  # a float mask that needs no gradient
        opts["mask"] = torch.randn(2, 4, Lq, Lk, generator=g, dtype=torch.float64).to(dtype)
    elif name == "heads_float_mask":  # one mask for every head, a value per (row, key)
        opts["mask"] = torch.randn(2, 1, Lq, Lk, generator=g, dtype=torch.float64).to(dtype)
    elif name == "two_rows_float_mask":  # a mask of two rows is one per row, not one broadcast over rows
        opts["mask"] = torch.randn(2, 4, Lq, Lk, generator=g, dtype=torch.float64).to(dtype)
    elif name == "row_float_mask":
        opts["mask"] = torch.randn(2, 1, 1, Lk, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    elif name == "bool_mask_causal":
        mask = torch.rand(2, 1, Lq, Lk, generator=g) < 0.7
        mask[:, :, 2] = False  # a row that sees no key
        opts.update(mask=mask, causal=True)
    elif name == "softcap":
        opts["softcap"] = 2.5
    elif name == "dropout":
        torch.manual_seed(3)
        opts["dropout_p"] = 0.3
    return q, k, v, opts


def _grads(out, lse, inputs, with_lse, seed=11):
    """Gradients of ``sum(out * dO) [+ sum(lse * dlse)]`` (finite lse rows only) for fixed random weights."""
    g = torch.Generator().manual_seed(seed)
    loss = (out * torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)).sum()
    if with_lse:
        w = torch.randn(lse.shape, generator=g, dtype=torch.float64).to(lse.dtype)
        loss = loss + torch.where(torch.isinf(lse), 0.0, lse * w).sum()
    return torch.autograd.grad(loss, inputs, retain_graph=True)


BOTH = ["plain", "causal_lq_lt_lk", "causal_lq_gt_lk", "causal_square", "window", "alibi_window"]
BOTH += ["full_float_mask", "row_float_mask", "bool_mask_causal"]


@pytest.mark.parametrize(
    ("name", "engine"),
    [(n, e) for n in BOTH for e in ("torch", "fused", None)] + [("softcap", "torch"), ("dropout", "torch")],
)
def test_outputs_and_gradients_equal_the_fp64_reference(name, engine):
    q, k, v, opts = _case(name)
    spec = build_spec(q, k, v, **opts)
    inputs = [q, k, v] + ([spec.mask] if spec.mask is not None and spec.mask.requires_grad else [])
    out, lse = tiled.attention(q, k, v, spec, True, block_q=4, block_k=4, engine=engine)
    ref_out, ref_lse = reference.attention(q, k, v, spec, True)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(lse, ref_lse, **TOL)
    for with_lse in (False, True):
        got = _grads(out, lse, inputs, with_lse)
        want = _grads(ref_out, ref_lse, inputs, with_lse)
        for which, a, b in zip("qkvm", got, want, strict=False):
            torch.testing.assert_close(a, b, **TOL, msg=f"d{which}, with_lse={with_lse}")


@pytest.mark.parametrize("engine", ["torch", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs_give_outputs_and_gradients_in_their_dtype(engine, dtype):
    """The output and the gradients come back in the inputs' dtype; the lse in the accumulation dtype (fp32)."""
    q, k, v, opts = _case("causal_lq_lt_lk", dtype)
    spec = build_spec(q, k, v, **opts)
    out, lse = tiled.attention(q, k, v, spec, True, block_q=4, block_k=4, engine=engine)
    assert out.dtype == dtype and lse.dtype == torch.float32
    dq, dk, dv = _grads(out, lse, [q, k, v], with_lse=False)
    assert dq.dtype == dk.dtype == dv.dtype == dtype
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref_out, ref_lse = reference.attention(q64, k64, v64, build_spec(q64, k64, v64, **opts), True)
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(out.double(), ref_out, **tol)
    torch.testing.assert_close(lse.double(), ref_lse, **tol)
    for a, b in zip((dq, dk, dv), _grads(ref_out, ref_lse, [q64, k64, v64], with_lse=False), strict=True):
        torch.testing.assert_close(a.double(), b, **tol)


@pytest.mark.parametrize("engine", ["torch", "fused"])
def test_out_dtype_and_grad_dtype_are_honoured(engine):
    """Ring attention asks for the accumulation dtype (fp32 for bf16 inputs) from `forward` and `backward`."""
    q, k, v, opts = _case("causal_lq_lt_lk", torch.bfloat16)
    spec = build_spec(q, k, v, **opts)
    out, lse = tiled.forward(q, k, v, spec, block_q=4, block_k=4, engine=engine, out_dtype=torch.float32)
    default, _ = tiled.forward(q, k, v, spec, block_q=4, block_k=4, engine=engine)
    assert out.dtype == torch.float32 and default.dtype == torch.bfloat16
    torch.testing.assert_close(default, out.to(torch.bfloat16), rtol=0, atol=0)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(q.dtype)
    args = dout, q, k, v, default, lse, spec  # ring attention passes the output in q's dtype
    grads = tiled.backward(*args, block_q=4, block_k=4, engine=engine, grad_dtype=torch.float32)
    plain = tiled.backward(*args, block_q=4, block_k=4, engine=engine)
    assert [g.dtype for g in grads[:3]] == [torch.float32] * 3 and grads[3] is None
    assert [g.dtype for g in plain[:3]] == [torch.bfloat16] * 3
    for a, b in zip(grads[:3], plain[:3], strict=True):
        torch.testing.assert_close(a.to(torch.bfloat16), b, rtol=0, atol=0)


def test_the_default_blocks_and_one_block_per_length():
    """Lengths past one default block (``BLOCK_Q = 256``, ``BLOCK_K = 512``) and the fused engine's
    whole-length blocks give the reference's output."""
    q, k, v = _tensors(1, 2, 1, 300, 520, D=4, Dv=4)
    for opts in ({}, {"causal": True}, {"window": (40, 0)}, {"alibi": True}):
        spec = build_spec(q, k, v, **opts)
        ref_out, ref_lse = reference.attention(q, k, v, spec, True)
        for engine in ("torch", "fused"):
            out, lse = tiled.attention(q, k, v, spec, True, engine=engine)
            torch.testing.assert_close(out, ref_out, **TOL, msg=f"{opts} {engine}")
            torch.testing.assert_close(lse, ref_lse, **TOL, msg=f"{opts} {engine}")


def _spec(Lq, Lk, **opts):
    q, k, v = _tensors(1, 1, 1, Lq, Lk)
    return build_spec(q, k, v, **opts)


@pytest.mark.parametrize(
    ("Lq", "Lk", "opts", "i0", "i1", "merge_open", "want"),
    [
        # plain causal: the open keys before the block's diagonal, then the diagonal square
        (12, 12, {"causal": True}, 4, 8, True, [(0, 4, False), (4, 8, True)]),
        (12, 12, {"causal": True}, 0, 4, True, [(0, 4, True)]),  # diagonal at key 0: no open part
        (8, 9, {"causal": True}, 0, 4, True, [(0, 1, False), (1, 5, True)]),  # one open key before it
        (8, 12, {"causal": True}, 4, 8, True, [(0, 8, False), (8, 12, True)]),  # diagonal ends at Lk
        (12, 8, {"causal": True}, 4, 8, True, [(0, 4, True)]),  # diagonal starts at key 0
        (12, 8, {"causal": True}, 0, 4, True, []),  # rows before the first key see nothing
        (12, 8, {"causal": True}, 2, 6, True, [(0, 2, False)]),  # diagonal from -2: a partial tile
        (12, 12, {"causal": True}, 4, 8, False, [(0, 4, False), (4, 8, False)]),
        # no structure: tiles of block_k, merged into one range when open
        (4, 10, {}, 0, 4, False, [(0, 4, False), (4, 8, False), (8, 10, False)]),
        (4, 10, {}, 0, 4, True, [(0, 10, False)]),
        # a window: only the key range the block's rows see; only fully open tiles merge
        (16, 16, {"window": (4, 3)}, 8, 12, False, [(4, 8, False), (8, 12, False), (12, 15, False)]),
        (16, 16, {"window": (8, 8)}, 8, 12, True, [(0, 4, False), (4, 16, False)]),  # (0, 4) is cut by the left edge
        (16, 16, {"window": (12, 12)}, 8, 12, True, [(0, 16, False)]),
        (16, 16, {"window": (None, 0), "alibi": True}, 8, 12, True, [(0, 8, False), (8, 12, False)]),
    ],
)
def test_key_segments_visit_exactly_the_keys_the_block_sees(Lq, Lk, opts, i0, i1, merge_open, want):
    assert tiled.key_segments(_spec(Lq, Lk, **opts), i0, i1, 4, merge_open) == want


@pytest.mark.parametrize(
    ("change", "want"),
    [
        ({}, True),
        ({"softcap": 3.0}, False),
        ({"dropout_p": 0.1}, False),
        ({"scale": 0.5}, True),  # scales below 1 are fine: only > 0 is asked
        ({"scale": 1e-30}, True),
        ({"scale": 0.0}, False),
        ({"scale": -0.5}, False),
        ({"v_head_dim": 6}, False),
        ("meta", False),
    ],
    ids=str,
)
def test_fused_engine_is_chosen_exactly_where_it_is_exact(change, want):
    q, k, v = _tensors(1, 2, 2, 5, 7)
    spec = build_spec(q, k, v)
    if change == "meta":
        q = torch.zeros(1, 2, 5, 8, device="meta")
    else:
        spec = dataclasses.replace(spec, **change)
    assert tiled.fused_supported(q, spec) is want
    assert tiled._choose_engine(q, spec, None) is want
    assert tiled._choose_engine(q, spec, "torch") is False
    if want:
        assert tiled._choose_engine(q, spec, "fused") is True
    else:
        with pytest.raises(ValueError) as err:
            tiled._choose_engine(q, spec, "fused")
        assert str(err.value) == (
            "tiled: engine='fused' needs a CPU tensor, no softcap, no dropout, Dv == D and scale > 0"
        )


@pytest.mark.parametrize("engine", ["Fused", "TORCH", "flash", ""])
def test_an_unknown_engine_is_named(engine):
    q, k, v = _tensors(1, 1, 1, 3, 3)
    with pytest.raises(ValueError) as err:
        tiled.forward(q, k, v, build_spec(q, k, v), engine=engine)
    assert str(err.value) == f"tiled: engine must be 'torch', 'fused' or None, got {engine!r}"


def test_pure_causal_is_causal_with_nothing_else():
    assert tiled._pure_causal(_spec(6, 6, causal=True))
    assert tiled._pure_causal(_spec(6, 9, causal=True))
    assert not tiled._pure_causal(_spec(6, 6))
    assert not tiled._pure_causal(_spec(6, 6, window=(None, 1)))
    assert not tiled._pure_causal(_spec(6, 6, causal=True, alibi=True))
    assert not tiled._pure_causal(_spec(6, 6, causal=True, mask=torch.ones(1, 1, 6, 6, dtype=torch.bool)))


def test_reduce_to_sums_over_broadcast_axes_only():
    x = torch.arange(24, dtype=torch.float64).view(2, 3, 4)
    assert torch.equal(tiled._reduce_to(x, torch.Size([2, 3, 4])), x)
    assert torch.equal(tiled._reduce_to(x, torch.Size([1, 3, 1])), x.sum(dim=(0, 2), keepdim=True))
    assert torch.equal(tiled._reduce_to(x, torch.Size([2, 1, 4])), x.sum(dim=1, keepdim=True))
    assert torch.equal(tiled._reduce_to(x[:, :1], torch.Size([2, 1, 4])), x[:, :1])


def test_varlen_returns_no_lse_unless_asked():
    q, k, v = (torch.randn(9, 2, 4, dtype=torch.float64) for _ in range(3))
    cu = torch.tensor([0, 4, 9])
    spec = build_spec(q[None].transpose(1, 2), k[None].transpose(1, 2), v[None].transpose(1, 2))
    out, lse = tiled.attention_varlen(q, k, v, cu, cu, 5, 5, spec)
    assert lse is None and out.shape == (9, 2, 4)
    _, lse = tiled.attention_varlen(q, k, v, cu, cu, 5, 5, spec, True)
    assert lse.shape == (2, 9)


def test_the_tiled_kernel_refuses_nothing():
    q, k, v = _tensors(1, 1, 1, 3, 3)
    assert tiled.refusal(q, build_spec(q, k, v, softcap=2.0, dropout_p=0.5), True) is None


STATS = ("entropy", "mean_distance", "received", "topk_weight", "pooled")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_statistics_in_one_pass_with_a_float_mask_keep_the_output_gradient(dtype):
    """``lse=None`` with inputs that need a gradient: `StripAttention`, whose statistics see the mask
    and whose output (in q's dtype) has the reference's gradients, through the output and the lse."""
    q, k, v, opts = _case("full_float_mask", dtype)
    spec = build_spec(q, k, v, causal=True, **opts)
    pool = pool_segments(3, spec.q_len, spec.kv_len, q.device)
    got = tiled.statistics(q, k, v, spec, None, topk=3, pool=pool)
    with torch.no_grad():
        plain = tiled.statistics(q, k, v, spec, None, topk=3, pool=pool)  # the eager branch, no autograd
        _, lse = tiled.forward(q, k, v, spec)
        second = tiled.statistics(q, k, v, spec, lse, topk=3, pool=pool)  # the second pass, given the lse
    assert got["output"].dtype == plain["output"].dtype == dtype and got["output"].requires_grad
    assert set(got) == set(plain) == {"output", "lse", "topk_index", *STATS}
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else TOL
    for name in ("lse", "topk_index", *STATS):
        torch.testing.assert_close(got[name], plain[name], **TOL, msg=name)
    for name in STATS:
        torch.testing.assert_close(second[name].to(got[name].dtype), got[name], **tol, msg=name)
    inputs = [q, k, v, spec.mask]
    q64, k64, v64, m64 = (x.detach().double().requires_grad_() for x in inputs)
    ref_spec = dataclasses.replace(spec, mask=m64)
    ref_out, ref_lse = reference.attention(q64, k64, v64, ref_spec, True)
    torch.testing.assert_close(got["output"].double(), ref_out, **tol)
    for with_lse in (False, True):
        got_grads = _grads(got["output"], got["lse"], inputs, with_lse)
        want = _grads(ref_out, ref_lse, [q64, k64, v64, m64], with_lse)
        for which, a, b in zip("qkvm", got_grads, want, strict=True):
            assert a.dtype == dtype, which
            torch.testing.assert_close(a.double(), b, **tol, msg=f"d{which}, with_lse={with_lse}")


@pytest.mark.parametrize(
    "name",
    [
        *("plain", "causal_lq_lt_lk", "window", "alibi_window"),
        *("full_float_mask", "fixed_float_mask", "heads_float_mask", "two_rows_float_mask"),
    ],
)
@pytest.mark.parametrize("engine", ["torch", "fused"])
def test_tiles_stay_within_the_blocks_asked_for(monkeypatch, name, engine):
    """Memory is ``O(block_q * block_k)`` per head: the torch engine scores no tile larger than the
    blocks, the fused engine builds no bias tile larger than them, and with causal/window structure
    it runs no fused call on more than ``block_q`` rows (without structure it takes all rows at once);
    3 and 5 here, in the backward as in the forward.
    The fused engine runs the backward too, unless the lse or a float mask needs a gradient."""
    seen = {"scores": [], "bias": [], "fused_rows": []}
    scores, additive, fused_forward, fused_backward = (
        AttentionSpec.scores, AttentionSpec.additive_tile, flash_cpu.forward, flash_cpu.backward,
    )  # fmt: skip

    def spy_scores(self, q, k, *args, **kwargs):
        seen["scores"].append((q.shape[-2], k.shape[-2]))
        return scores(self, q, k, *args, **kwargs)

    def spy_additive(self, i0, i1, j0, j1, device):
        tile = additive(self, i0, i1, j0, j1, device)
        if tile is not None:
            seen["bias"].append((i1 - i0, j1 - j0))
        return tile

    def spy_forward(q, *args, **kwargs):
        seen["fused_rows"].append(q.shape[-2])
        return fused_forward(q, *args, **kwargs)

    def spy_backward(dout, q, *args, **kwargs):
        seen["fused_rows"].append(q.shape[-2])
        return fused_backward(dout, q, *args, **kwargs)

    monkeypatch.setattr(AttentionSpec, "scores", spy_scores)
    monkeypatch.setattr(AttentionSpec, "additive_tile", spy_additive)
    monkeypatch.setattr(flash_cpu, "forward", spy_forward)
    monkeypatch.setattr(flash_cpu, "backward", spy_backward)
    q, k, v, opts = _case(name)
    spec = build_spec(q, k, v, **opts)
    out, lse = tiled.attention(q, k, v, spec, True, block_q=3, block_k=5, engine=engine)
    _grads(out, lse, [q, k, v], with_lse=False)
    assert all(bq <= 3 and bk <= 5 for bq, bk in seen["scores"] + seen["bias"]), seen
    if engine == "torch":
        assert seen["scores"] and not seen["fused_rows"]
        return
    if name != "full_float_mask":  # the lse's gradient is zero here: the fused backward runs
        assert not seen["scores"], seen
    if name in ("plain", "causal_lq_lt_lk"):  # nothing to add, and the causal diagonal is the kernel's own
        assert not seen["bias"], seen
    if spec.has_structure_mask:
        assert seen["fused_rows"] and max(seen["fused_rows"]) <= 3, seen
    elif name == "plain":
        assert seen["fused_rows"] == [q.shape[-2]] * 2  # one call forward, one backward: every row, every key


@pytest.mark.parametrize(("Lq", "Lk"), [(2, 2), (3, 2), (2, 3)])
@pytest.mark.parametrize("mask_shape", ["full", "per_key", "per_row"])
def test_float_mask_gradient_with_tiles_of_one_row_and_one_key(Lq, Lk, mask_shape):
    """Tiles of 1 x 1 over two or three rows and keys: each tile adds its own cell of the mask's gradient
    (a mask broadcast over an axis gets that axis summed; one broadcast over keys has gradient 0)."""
    q, k, v = _tensors(1, 2, 1, Lq, Lk, D=4, Dv=4)
    shape = {"full": (1, 2, Lq, Lk), "per_key": (1, 1, 1, Lk), "per_row": (1, 2, Lq, 1)}[mask_shape]
    mask = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).requires_grad_()
    spec = build_spec(q, k, v, mask=mask)
    out, lse = tiled.attention(q, k, v, spec, True, block_q=1, block_k=1, engine="torch")
    ref_out, ref_lse = reference.attention(q, k, v, spec, True)
    torch.testing.assert_close(out, ref_out, **TOL)
    got, want = _grads(out, lse, [q, k, v, mask], True), _grads(ref_out, ref_lse, [q, k, v, mask], True)
    for which, a, b in zip("qkvm", got, want, strict=True):
        torch.testing.assert_close(a, b, **TOL, msg=f"d{which}")


@pytest.mark.parametrize(
    ("name", "engine", "mask_grad"),
    [("full_float_mask", "torch", True), ("fixed_float_mask", "fused", False), ("causal_square", "fused", False)],
)
def test_backward_called_directly_makes_its_buffers_on_q_device(name, engine, mask_grad):
    """`tiled.backward` (ring attention's per-shard backward) under ``torch.device("meta")``: the gradient
    buffers are made on ``q``'s device, not torch's default one, so the same gradients on the CPU."""
    q, k, v, opts = _case(name)
    spec = build_spec(q, k, v, **opts)
    with torch.no_grad():
        out, lse = tiled.forward(q, k, v, spec, block_q=4, block_k=4, engine=engine)
    dout = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(2))
    kwargs = {"mask_grad": mask_grad, "block_q": 4, "block_k": 4, "engine": engine}
    want = tiled.backward(dout, q, k, v, out, lse, spec, **kwargs)
    with torch.device("meta"):
        got = tiled.backward(dout, q, k, v, out, lse, spec, **kwargs)
    assert (got[3] is None) == (not mask_grad)
    for which, a, b in zip("qkvm", got, want, strict=True):
        if b is not None:
            assert a.device.type == "cpu", which
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"d{which}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: on a CPU the tiles' device cannot go wrong")
def test_dropout_gradients_on_cuda_equal_the_cpu():
    """The counter-based keep masks are the same on every device: CUDA inputs give the CPU's output and
    gradients (fp64), with every tile's mask drawn on the inputs' device in the forward and the backward."""
    results = []
    for device in ("cpu", "cuda"):
        q, k, v, opts = _case("dropout")  # seeds torch's generator: the same dropout seed on both
        q, k, v = (x.detach().to(device).requires_grad_() for x in (q, k, v))
        spec = build_spec(q, k, v, **opts)
        out, lse = tiled.attention(q, k, v, spec, True, block_q=4, block_k=4, engine="torch")
        results.append([out, *_grads(out, lse, [q, k, v], with_lse=False)])
    for which, a, b in zip(["out", "dq", "dk", "dv"], *results, strict=True):
        assert b.device.type == "cuda", which
        torch.testing.assert_close(b.cpu(), a, **TOL, msg=which)
