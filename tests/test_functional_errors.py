"""`attnkit.functional`: every error names the argument, what was expected and what arrived (whole
messages, not a keyword), the varlen spec's lengths in both branches, ``layout="blhd"``'s checks,
`explain_backend`'s arguments reaching the refusals, and the traced branch of `run_guarded`.

Written against the survivors of the mutation run over ``functional.py`` (``docs/results/mutation.md``).
"""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch

import attnkit
from attnkit import backends, hooks
from attnkit.functional import WEIGHTS_LIMIT_BYTES, build_spec, build_varlen_spec, run_guarded, to_bhld
from attnkit.kernels import nonfinite, reference
from tests.conftest import make_qkv

SMALL = dict(B=2, Hq=4, Lq=5, Lk=6, D=8, dtype=torch.float32)  # Hk = 2; masks broadcast to (2, 4, 5, 6)
NO_LSE_GRAD = "its log-sum-exp output carries no gradient"  # sdpa's refusal of an lse for a q that needs grad


def raises_exactly(exc: type[Exception], message: str, fn, *args, **kwargs) -> None:
    """``fn(*args, **kwargs)`` raises ``exc`` whose text is exactly ``message``."""
    with pytest.raises(exc) as info:
        fn(*args, **kwargs)
    assert str(info.value) == message


def _packed(Dv=4):
    """Three packed sequences: query lengths 2, 4, 1 (longest 4), key lengths 5, 1, 3 (longest 5).

    ``q (7, 2, 4)``, ``k (9, 1, 4)``, ``v (9, 1, Dv)``: every total differs from its heads axis."""
    q, k, v = torch.randn(7, 2, 4), torch.randn(9, 1, 4), torch.randn(9, 1, Dv)
    return q, k, v, torch.tensor([0, 2, 6, 7], dtype=torch.int32), torch.tensor([0, 5, 6, 9], dtype=torch.int32)


@pytest.fixture
def traced(monkeypatch):
    """`attnkit.functional`'s checks of `torch.compiler.is_compiling` answer True: its branches for a traced
    call run eagerly, while the ops they call (``attnkit::nonfinite_rows``) run as inside a compiled graph."""
    real = torch.compiler.is_compiling

    def is_compiling():
        return sys._getframe(1).f_globals.get("__name__") == "attnkit.functional" or real()

    monkeypatch.setattr(torch.compiler, "is_compiling", is_compiling)


def _lengths(result):
    spec, max_q, max_k = result
    return spec.batch, spec.q_len, spec.kv_len, max_q, max_k


# ------------------------------------------------------------------ attention: masks, return_lse
MASK_CASES = {
    "not a tensor": ([[True]], TypeError, "attention: mask must be a torch.Tensor or None, got list"),
    "another device": (
        torch.ones(5, 6, dtype=torch.bool, device="meta"),
        ValueError,
        "attention: mask is on meta but q is on cpu",
    ),
    "B axis": (
        torch.ones(3, 1, 1, 6, dtype=torch.bool),
        ValueError,
        "attention: mask of shape (3, 1, 1, 6) does not broadcast to (B, Hq, Lq, Lk) = (2, 4, 5, 6): "
        "its B axis is 3, expected 1 or 2",
    ),
    "Lq axis of a 2-D mask": (
        torch.ones(4, 6, dtype=torch.bool),
        ValueError,
        "attention: mask of shape (4, 6) does not broadcast to (B, Hq, Lq, Lk) = (2, 4, 5, 6): "
        "its Lq axis is 4, expected 1 or 5",
    ),
    "Lk axis": (
        torch.ones(5, 7, dtype=torch.bool),
        ValueError,
        "attention: mask of shape (5, 7) does not broadcast to (B, Hq, Lq, Lk) = (2, 4, 5, 6): "
        "its Lk axis is 7, expected 1 or 6",
    ),
}


@pytest.mark.parametrize("case", MASK_CASES, ids=list(MASK_CASES))
def test_mask_errors_name_the_axis_and_what_arrived(case):
    mask, exc, message = MASK_CASES[case]
    raises_exactly(exc, message, attnkit.attention, *make_qkv(**SMALL), mask=mask)


@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        ({"softcap": "5"}, TypeError, "attention: softcap must be a float or None, got '5'"),
        ({"scale": True}, TypeError, "attention: scale must be a float or None, got True"),
        ({"scale": float("nan")}, ValueError, "attention: scale must be a finite number (None turns it off), got nan"),
    ],
)
def test_numbers_name_the_option_and_what_arrived(kwargs, exc, message):
    raises_exactly(exc, message, attnkit.attention, *make_qkv(**SMALL), **kwargs)


def test_q_k_v_that_are_not_4d_tensors_are_named_with_what_arrived():
    q, k, v = make_qkv(**SMALL)
    raises_exactly(TypeError, "attention: q must be a torch.Tensor, got list", attnkit.attention, [1.0], k, v)
    raises_exactly(TypeError, "attention: k must be a torch.Tensor, got NoneType", attnkit.attention, q, None, v)
    for name, bad, layout in (("k", (q, k[0], v), "(B, Hk, Lk, D)"), ("v", (q, k, v[0]), "(B, Hk, Lk, Dv)")):
        message = f"attention: {name} must be 4-D {layout}, got shape (2, 6, 8)"
        raises_exactly(ValueError, message, attnkit.attention, *bad)
    message = "attention: every dimension of q must be >= 1, got shape (2, 4, 0, 8)"
    raises_exactly(ValueError, message, attnkit.attention, q[:, :, :0], k, v)


def test_window_sides_must_be_ints_not_floats_or_bools():
    for window in ((1.5, 2), (True, 2)):
        message = f"attention: window sides must be non-negative ints or None, got {window!r}"
        raises_exactly(ValueError, message, attnkit.attention, *make_qkv(**SMALL), window=window)


def test_alibi_slopes_are_constants_made_on_q_device_in_the_accumulation_dtype():
    """The spec's slopes are on ``q``'s device (a Triton kernel reads them there) in ``acc_dtype``."""
    for dtype in (torch.float64, torch.float16):
        q, k, v = (torch.empty(1, 12, 3, 4, dtype=dtype, device="meta") for _ in range(3))
        for alibi in (True, [0.5] * 12):
            slopes = build_spec(q, k, v, alibi=alibi).alibi_slopes
            assert slopes.device.type == "meta" and slopes.dtype == build_spec(q, k, v).acc_dtype
    message = "attention: alibi slopes are constants; pass a tensor that does not require grad"
    raises_exactly(ValueError, message, attnkit.attention, *make_qkv(**SMALL), alibi=torch.ones(4, requires_grad=True))


def test_return_lse_must_be_a_bool_and_reaches_the_refusal():
    q, k, v = make_qkv(**SMALL)
    raises_exactly(TypeError, "attention: return_lse must be a bool, got 1", attnkit.attention, q, k, v, return_lse=1)
    q.requires_grad_()
    assert attnkit.attention(q, k, v, backend="sdpa").shape == (2, 4, 5, 8)  # no lse asked: sdpa runs it
    raises_exactly(
        ValueError,
        f"attention: backend='sdpa' cannot compute this request: {NO_LSE_GRAD}. "
        "Use backend='auto', or 'tiled', which supports every feature.",
        attnkit.attention, q, k, v, return_lse=True, backend="sdpa",
    )  # fmt: skip


def test_no_backend_under_auto_lists_every_backend_with_its_reason():
    """With every registered backend refusing, ``auto``'s error gives each one's reason, in auto's order."""
    tiled = backends.get_backend("tiled")
    backends.register_backend(
        dataclasses.replace(tiled, refusal=lambda q, spec, lse: "refused in this test"), replace=True
    )
    try:
        q, k, v = make_qkv(**SMALL)
        choice = attnkit.explain_backend(q, k, v, softcap=5.0)
        with pytest.raises(ValueError) as info:
            attnkit.attention(q, k, v, softcap=5.0)
    finally:
        backends.register_backend(tiled, replace=True)
    head, tail = "attention: no registered backend can compute this request (", "); drop the unsupported option."
    msg = str(info.value)
    assert choice.backend is None and msg.startswith(head) and msg.endswith(tail)
    reasons = msg[len(head) : -len(tail)].split("; ")
    assert reasons == [f"{name}: {why}" for name, why in choice.reasons.items()]
    assert [r.split(": ")[0] for r in reasons] == backends.available_backends()
    assert "tiled: refused in this test" in reasons and "sdpa: SDPA has no softcap" in reasons


# ------------------------------------------------------------------ layout="blhd"
def test_blhd_checks_name_each_tensor_and_pass_non_tensors_to_attention():
    q, k, v = (x.transpose(1, 2) for x in make_qkv(**SMALL))  # (B, L, H, D)
    for i, name in enumerate("qkv"):
        bad = [q, k, v]
        bad[i] = bad[i][0]  # 3-D
        message = f"attention: with layout='blhd' {name} must be 4-D (B, L, H, D), got shape {tuple(bad[i].shape)}"
        raises_exactly(ValueError, message, attnkit.attention, *bad, layout="blhd")
    raises_exactly(
        TypeError, "attention: v must be a torch.Tensor, got list", attnkit.attention, q, k, [1.0], layout="blhd"
    )


def test_blhd_passes_every_argument_to_the_bhld_call():
    """``layout="blhd"`` is the ``bhld`` call on transposed views: each option changes the result here, so
    each must reach it; ``return_lse``, ``backend`` and ``caller`` reach it too (the hook sees them)."""
    q, k, v = make_qkv(Lq=5, Lk=6, D=8, Dv=3)  # fp64, B = 2, Hq = 4, Hk = 2
    mask = torch.ones(5, 6, dtype=torch.bool)
    mask[:, 1] = False  # key 1 is inside the causal window of queries 0 to 3
    options = dict(causal=True, mask=mask, window=(3, 1), alibi=True, softcap=5.0, scale=0.3, dropout_p=0.25)
    blhd = [x.transpose(1, 2) for x in (q, k, v)]  # (B, L, H, D) views
    for return_lse in (True, False):
        torch.manual_seed(0)  # the same dropout pattern for both layouts
        want = attnkit.attention(q, k, v, return_lse=return_lse, **options)
        torch.manual_seed(0)
        got = attnkit.attention(*blhd, return_lse=return_lse, layout="blhd", **options)
        if return_lse:
            (got, got_lse), (want, want_lse) = got, want
            torch.testing.assert_close(got_lse, want_lse)  # lse keeps (B, Hq, Lq)
        assert got.shape == (2, 5, 4, 3)
        torch.testing.assert_close(got, want.transpose(1, 2))
    seen = []

    def watch(call, proceed):
        seen.append((call.caller, call.backend, call.return_lse, call.q.shape))
        return proceed(call)

    caller = torch.nn.Identity()
    with hooks.attention_hook(watch):
        attnkit.attention(*blhd, layout="blhd", backend="tiled", caller=caller)
        attnkit.attention(*blhd, layout="blhd", return_lse=True)
    assert seen == [(caller, "tiled", False, (2, 4, 5, 8)), (None, "auto", True, (2, 4, 5, 8))]
    message = (
        "attention: backend='sdpa' cannot compute this request: SDPA has no softcap. "
        "Use backend='auto', or 'tiled', which supports every feature."
    )
    raises_exactly(ValueError, message, attnkit.attention, *blhd, layout="blhd", softcap=5.0, backend="sdpa")
    message = "attention: layout must be 'bhld' (B, H, L, D) or 'blhd' (B, L, H, D), got 'bshd'"
    raises_exactly(ValueError, message, attnkit.attention, q, k, v, layout="bshd")


def test_to_bhld_transposes_as_many_tensors_as_it_is_given():
    """``attnkit.compat`` passes two (``q``, ``k`` for the weights); non-tensors pass through untouched."""
    q, k, _ = make_qkv(**SMALL)
    (one,) = to_bhld(q)
    two = to_bhld(q, k)
    assert one.shape == (2, 5, 4, 8) and one.data_ptr() == q.data_ptr()
    assert [x.shape for x in two] == [(2, 5, 4, 8), (2, 6, 2, 8)]
    assert to_bhld(q, k, None)[2] is None


# ------------------------------------------------------------------ attention_weights
def test_attention_weights_limit_is_inclusive_and_the_message_gives_shape_size_and_limit():
    q = torch.empty(1, 64, 16384, 8, device="meta")  # meta: shapes only, nothing allocated
    at_limit = torch.empty(1, 64, 1024, 8, device="meta")  # 64 * 16384 * 1024 fp32 scores = 4 GiB exactly
    assert backends.scores_bytes(build_spec(q, at_limit, None)) == WEIGHTS_LIMIT_BYTES
    assert attnkit.attention_weights(q, at_limit).shape == (1, 64, 16384, 1024)
    raises_exactly(
        ValueError,
        "attention_weights: the (1, 64, 16384, 32768) weight matrix needs 128.0 GiB (limit 4 GiB); "
        "use attnkit.attention_stats for pooled maps and statistics at this length",
        attnkit.attention_weights, q, torch.empty(1, 64, 32768, 8, device="meta"),
    )  # fmt: skip


# ------------------------------------------------------------------ explain_backend
def test_explain_backend_validates_v_and_asks_about_the_lse_only_for_attention():
    q, k, v = make_qkv(**SMALL)
    q.requires_grad_()
    assert attnkit.explain_backend(q, k, v).backend == "sdpa"  # return_lse defaults to False
    with_lse = attnkit.explain_backend(q, k, v, return_lse=True)
    assert with_lse.backend == "tiled" and with_lse.reasons["sdpa"] == NO_LSE_GRAD
    narrow_v = attnkit.explain_backend(q, k, make_qkv(**SMALL, Dv=4)[2])
    assert narrow_v.reasons["sdpa"] == "its fused kernels need Dv == D (its fallback would materialise Lq x Lk)"
    message = "attention: v must be 4-D (B, Hk, Lk, Dv), got shape (2, 6, 8)"
    raises_exactly(ValueError, message, attnkit.explain_backend, q, k, v[0])


def test_explain_backend_varlen_builds_the_packed_spec_with_the_options():
    q, k, v, cu_q, cu_k = _packed(Dv=4)
    cu = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    choice = attnkit.explain_backend(q, k, v, task="varlen", **cu)
    assert choice.backend == "tiled" and choice.reasons["sdpa"] == "has no varlen kernel"
    softcap = attnkit.explain_backend(q, k, v, task="varlen", backend="sdpa", softcap=5.0, **cu)
    assert softcap.backend is None and softcap.reasons == {"sdpa": "SDPA has no softcap"}
    q.requires_grad_()
    assert attnkit.explain_backend(q, k, v, task="varlen", backend="sdpa", **cu).backend == "sdpa"
    lse = attnkit.explain_backend(q, k, v, task="varlen", backend="sdpa", return_lse=True, **cu)
    assert lse.backend is None and lse.reasons == {"sdpa": NO_LSE_GRAD}


def test_explain_backend_cu_seqlens_go_with_task_varlen_only():
    q, k, v, cu_q, cu_k = _packed()
    needs = "explain_backend: task='varlen' needs cu_seqlens_q and cu_seqlens_k"
    raises_exactly(ValueError, needs, attnkit.explain_backend, q, k, v, task="varlen", cu_seqlens_q=cu_q)
    raises_exactly(ValueError, needs, attnkit.explain_backend, q, k, v, task="varlen", cu_seqlens_k=cu_k)
    q4, k4, v4 = make_qkv(**SMALL)
    for task, given in (("attention", dict(cu_seqlens_q=cu_q)), ("statistics", dict(cu_seqlens_k=cu_k))):
        message = f"explain_backend: cu_seqlens_q/cu_seqlens_k are for task='varlen', got task={task!r}"
        raises_exactly(ValueError, message, attnkit.explain_backend, q4, k4, v4, task=task, **given)


# ------------------------------------------------------------------ varlen
def _varlen_cases():
    q, k, v, cu_q, cu_k = _packed()
    packed = (q, k, v, cu_q, cu_k)
    return {
        "q not a tensor": (([1.0], *packed[1:]), {}, TypeError, "attention_varlen: q must be a torch.Tensor, got list"),
        "k not packed": (
            (q, k[:, 0], *packed[2:]), {}, ValueError,
            "attention_varlen: k must be 3-D (total_k, Hk, D) (packed), got shape (9, 4)",
        ),
        "v not packed": (
            (q, k, v[:, 0], cu_q, cu_k), {}, ValueError,
            "attention_varlen: v must be 3-D (total_k, Hk, Dv) (packed), got shape (9, 4)",
        ),
        "a mask": (
            packed, {"mask": torch.ones(7, 9, dtype=torch.bool)}, ValueError,
            "attention_varlen: mask is not supported (got a mask); express per-sequence structure with "
            "cu_seqlens, causal and window, or pad the batch and call attnkit.attention with a mask",
        ),
        "cu_seqlens_q decreasing": (
            (q, k, v, torch.tensor([0, 4, 2, 7], dtype=torch.int32), cu_k), {}, ValueError,
            "attention_varlen: cu_seqlens_q must start at 0, never decrease and end at the packed length 7, "
            "got [0, 4, 2, 7]",
        ),
        "max_seqlen_q short": (
            packed, {"max_seqlen_q": 3}, ValueError,
            "attention_varlen: max_seqlen_q=3 is shorter than the longest sequence (4)",
        ),
        "max_seqlen_k short": (
            packed, {"max_seqlen_k": 4}, ValueError,
            "attention_varlen: max_seqlen_k=4 is shorter than the longest sequence (5)",
        ),
    }  # fmt: skip


@pytest.mark.parametrize("case", list(_varlen_cases()))
def test_varlen_errors_name_the_argument_and_what_arrived(case):
    args, kwargs, exc, message = _varlen_cases()[case]
    raises_exactly(exc, message, attnkit.attention_varlen, *args, **kwargs)


def test_varlen_spec_has_one_batch_element_per_sequence_and_the_longest_lengths():
    packed = _packed()
    assert _lengths(build_varlen_spec(*packed)) == (3, 4, 5, 4, 5)
    assert _lengths(build_varlen_spec(*packed, max_seqlen_q=4, max_seqlen_k=5)) == (3, 4, 5, 4, 5)  # the bound
    assert _lengths(build_varlen_spec(*packed, max_seqlen_q=6, max_seqlen_k=8)) == (3, 6, 8, 6, 8)  # as given


def test_traced_varlen_spec_takes_the_lengths_as_given_and_checks_only_the_form(traced):
    """The branch `torch.compile` traces (run eagerly here): ``cu_seqlens`` values are never read, so the
    lengths are ``max_seqlen_*`` as given, else the packed totals; the form of each is still checked."""
    q, k, v, cu_q, cu_k = _packed()
    assert _lengths(build_varlen_spec(q, k, v, cu_q, cu_k)) == (3, 7, 9, 7, 9)
    assert _lengths(build_varlen_spec(q, k, v, cu_q, cu_k, max_seqlen_q=6, max_seqlen_k=8)) == (3, 6, 8, 6, 8)
    for name, cu in (("cu_seqlens_q", (cu_q.float(), cu_k)), ("cu_seqlens_k", (cu_q, cu_k.float()))):
        message = f"attention_varlen: {name} must be a 1-D int32/int64 tensor (S + 1,), got torch.float32 of shape (4,)"
        raises_exactly(ValueError, message, build_varlen_spec, q, k, v, *cu)


# ------------------------------------------------------------------ run_guarded, traced branch
def test_traced_run_guarded_cleans_k_and_v_and_poisons_the_same_rows_as_eager(traced):
    """Traced, `run_guarded` always cleans ``k`` and ``v`` and sets the rule's rows to NaN, as the eager rule does."""
    q, k, v = make_qkv(1, 2, 1, 4, 5, 4)
    k[0, 0, 3, 1] = float("nan")  # causal, Lq = 4 < Lk = 5: key 3 is seen by queries 2 and 3 only
    spec = build_spec(q, k, v, causal=True)
    seen = []

    def run(q, k, v, spec, return_lse):
        seen.append((return_lse, bool(k.isfinite().all()), bool(v.isfinite().all())))
        return reference.attention(q, k, v, spec, return_lse)

    want = nonfinite.run_guarded(run, q, k, v, spec, True)  # the eager rule
    got = run_guarded(run, q, k, v, spec, True)
    assert seen == [(True, True, True)] * 2
    nan_rows = torch.tensor([False, False, True, True]).expand(1, 2, 4)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, equal_nan=True)
    assert torch.equal(got[1].isnan(), nan_rows) and torch.equal(got[0].isnan().all(-1), nan_rows)
    assert not got[0][~nan_rows].isnan().any()


# ------------------------------------------------------------------ the end of the hook chain
def test_the_end_of_the_hook_chain_computes_the_call_as_the_last_hook_passed_it():
    """``proceed`` computes the call a hook hands it: its tensors, options, ``return_lse`` and backend."""
    q, k, v = make_qkv(**SMALL)
    q2, k2, v2 = make_qkv(**SMALL)
    scaled = attnkit.AttentionOptions(scale=0.25)

    def swap(call, proceed):
        return proceed(call.replace(q=q2, k=k2, v=v2, options=scaled, return_lse=True, backend="sdpa"))

    with hooks.attention_hook(swap):
        out, lse = attnkit.attention(q, k, v)
    want_out, want_lse = attnkit.attention(q2, k2, v2, scale=0.25, return_lse=True, backend="sdpa")
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(lse, want_lse)

    def softcap_on_sdpa(call, proceed):
        return proceed(call.replace(options=attnkit.AttentionOptions(softcap=5.0), backend="sdpa"))

    message = (
        "attention: backend='sdpa' cannot compute this request: SDPA has no softcap. "
        "Use backend='auto', or 'tiled', which supports every feature."
    )
    with hooks.attention_hook(softcap_on_sdpa):
        raises_exactly(ValueError, message, attnkit.attention, q, k, v)


def test_batch_mismatch_names_v_only_when_given():
    """The batch error lists every tensor it was given: v's shape with v, no v without it (attention_weights)."""
    q, k, v = make_qkv(**SMALL)
    with pytest.raises(
        ValueError, match=r"^attention: batch sizes differ: q \(2, 4, 5, 8\), k \(2, 2, 6, 8\), v \(1, 2, 6, 8\)$"
    ):
        attnkit.attention(q, k, v[:1])
    with pytest.raises(ValueError, match=r"^attention: batch sizes differ: q \(2, 4, 5, 8\), k \(1, 2, 6, 8\)$"):
        attnkit.attention_weights(q, k[:1])
