"""The one definition of a tile: every torch-level form of it agrees with `AttentionSpec.scores`.

`AttentionSpec.scores` (scale, softcap, + ALiBi + float mask, bool/causal/window) is what the
reference kernel and the tiled kernel's torch engine compute; `AttentionSpec.additive_tile` is
what the fused CPU engine and SDPA are handed as their mask; the statistics pass adds
`AttentionSpec.add_bias` and masks with `AttentionSpec.allowed_tile`. They must agree tile by tile.
"""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit.functional import build_spec

f64 = torch.float64

CASES = {
    "plain": {},
    "causal": dict(causal=True),
    "window": dict(window=(3, 2)),
    "alibi": dict(alibi=True, causal=True),
    "float_mask": dict(mask="float"),
    "bool_mask": dict(mask="bool", window=(None, 4)),
    "everything": dict(alibi=True, window=(5, 1), mask="float", scale=0.3),
}


def _spec_and_inputs(options, Lq=11, Lk=17):
    q = torch.randn(2, 4, Lq, 8, dtype=f64)
    k = torch.randn(2, 2, Lk, 8, dtype=f64)
    options = dict(options)
    if options.get("mask") == "float":
        options["mask"] = torch.randn(2, 1, Lq, Lk, dtype=f64).masked_fill(torch.rand(2, 1, Lq, Lk) < 0.2, -torch.inf)
    elif options.get("mask") == "bool":
        options["mask"] = torch.rand(2, 1, 1, Lk) < 0.8
    return build_spec(q, k, None, **options), q, k


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("tile", [(0, 11, 0, 17), (3, 9, 5, 12)])
def test_additive_tile_and_add_bias_restate_scores(name, tile):
    spec, q, k = _spec_and_inputs(CASES[name])
    i0, i1, j0, j1 = tile
    q_t, k_t = q[:, :, i0:i1], k[:, :, j0:j1]
    expected, _ = spec.scores(q_t, k_t, i0, j0)  # (B, Hq, bq, bk)
    raw = spec.raw_scores(q_t, k_t)
    additive = spec.additive_tile(i0, i1, j0, j1, q.device)
    fused_view = raw if additive is None else raw + additive
    torch.testing.assert_close(fused_view, expected, rtol=0, atol=1e-12)
    biased = spec.add_bias(raw.clone(), i0, j0, inplace=True)
    allowed = spec.allowed_tile(i0, i1, j0, j1, q.device)
    stats_view = biased if allowed is None else biased.masked_fill(~allowed, -torch.inf)
    torch.testing.assert_close(stats_view, expected, rtol=0, atol=1e-12)


def test_scores_follow_the_documented_order():
    """Written out by hand for one pair: softcap comes before the biases, masking last."""
    q = torch.randn(1, 2, 3, 4, dtype=f64)
    k = torch.randn(1, 2, 5, 4, dtype=f64)
    bias = torch.randn(1, 2, 3, 5, dtype=f64)
    spec = build_spec(q, k, None, softcap=2.0, alibi=True, mask=bias, causal=True, scale=0.7)
    s, _ = spec.scores(q, k, 0, 0)
    slopes = attnkit.alibi_slopes(2).to(f64)
    for h in range(2):
        for i in range(3):
            for j in range(5):
                pos = i + 5 - 3  # bottom-right aligned
                want = (
                    2.0 * torch.tanh(q[0, h, i] @ k[0, h, j] * 0.7 / 2.0) - slopes[h] * abs(pos - j) + bias[0, h, i, j]
                )
                if j > pos:
                    assert s[0, h, i, j] == -torch.inf
                else:
                    torch.testing.assert_close(s[0, h, i, j], want, rtol=0, atol=1e-12)


def test_explain_backend_explains_every_kind_of_work():
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    dense = attnkit.explain_backend(q, k, v, causal=True)
    assert dense.backend == "sdpa"
    stats = attnkit.explain_backend(q, k, v, task="statistics", window=(2, 0))
    assert stats.backend == "tiled"
    assert "has no statistics kernel" in stats.reasons["sdpa"]
    assert "CUDA" in stats.reasons["triton"]
    packed = torch.randn(10, 2, 8)
    cu = torch.tensor([0, 4, 10])
    varlen = attnkit.explain_backend(packed, packed, packed, task="varlen", cu_seqlens_q=cu, cu_seqlens_k=cu)
    assert varlen.backend == "tiled"
    assert "has no varlen kernel" in varlen.reasons["sdpa"]
    named = attnkit.explain_backend(
        packed, packed, packed, task="varlen", cu_seqlens_q=cu, cu_seqlens_k=cu, backend="sdpa"
    )
    assert named.backend == "sdpa"  # named: runs sequence by sequence through its dense kernel
    with pytest.raises(ValueError, match="task must be one of"):
        attnkit.explain_backend(q, k, v, task="training")
    with pytest.raises(ValueError, match="needs cu_seqlens_q and cu_seqlens_k"):
        attnkit.explain_backend(packed, packed, packed, task="varlen")


def test_attention_stats_uses_the_registered_statistics_kernel():
    """A registered backend's statistics kernel is what attention_stats runs (one dispatcher)."""
    from attnkit.backends import Backend, get_backend, register_backend, unregister_backend

    tiled = get_backend("tiled")
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return tiled.run_stats(*args, **kwargs)

    register_backend(
        Backend("counting", tiled.run, tiled.refusal, priority=1, run_stats=counting, auto=True), replace=True
    )
    try:
        q, k, v = (torch.randn(1, 2, 9, 4, dtype=f64) for _ in range(3))
        st = attnkit.attention_stats(q, k, v, causal=True, backend="reference")
        assert calls == [1]
        p = attnkit.attention_weights(q, k, causal=True)
        torch.testing.assert_close(st.received, p.sum(-2))
    finally:
        unregister_backend("counting")


@pytest.mark.parametrize("Lq, Lk", [(5, 5), (3, 8), (8, 3), (1, 6)])
@pytest.mark.parametrize(
    "options", [{}, {"causal": True}, {"window": (1, 0)}, {"window": (None, 2)}, {"window": (0, 0), "causal": True}]
)
def test_rows_without_keys_are_the_rows_causal_and_window_leave_empty(Lq, Lk, options):
    """`AttentionSpec.rows_without_keys` against the allowed set, row by row, for every query block."""
    q, k = torch.randn(1, 1, Lq, 4), torch.randn(1, 1, Lk, 4)
    spec = build_spec(q, k, k, **options)
    assert isinstance(spec, attnkit.AttentionSpec) and (spec.q_len, spec.kv_len, spec.offset) == (Lq, Lk, Lk - Lq)
    allowed = spec.allowed_tile(0, Lq, 0, Lk, q.device)  # None: every pair
    want = torch.zeros(Lq, dtype=torch.bool) if allowed is None else ~allowed.reshape(Lq, Lk).any(-1)
    assert torch.equal(spec.rows_without_keys(0, Lq, q.device), want)
    for i0 in range(Lq):  # any block [i0, i1) gives its own rows
        assert torch.equal(spec.rows_without_keys(i0, Lq, q.device), want[i0:])
    if options.get("causal") and Lq > Lk:  # bottom-right causal: the first Lq - Lk rows see nothing
        assert want[: Lq - Lk].all() and not want[Lq - Lk :].any()


def test_backend_choice_names_the_backend_and_every_refusal():
    q = torch.randn(1, 2, 3, 4)
    k = torch.randn(1, 2, 5, 4)
    choice = attnkit.explain_backend(q, k, k, causal=True, backend="sdpa")  # SDPA aligns causal top-left
    assert isinstance(choice, attnkit.BackendChoice)
    assert choice.backend is None and choice.requested == "sdpa" and "top-left" in choice.reasons["sdpa"]
    assert str(choice).splitlines()[0] == "backend: None (requested 'sdpa')"
    auto = attnkit.explain_backend(q, k, k, causal=True)
    assert isinstance(auto, attnkit.BackendChoice) and auto.backend in attnkit.available_backends()
    assert auto.requested == "auto" and "sdpa" in auto.reasons  # passed over, with its reason


@pytest.mark.parametrize(
    "causal, window", [(False, None), (True, None), (False, (3, 2)), (True, (4, None)), (False, (None, 1))]
)
def test_row_key_ranges_are_the_rows_of_the_structure_mask(causal, window):
    """Per row, ``[a, b)`` holds exactly the keys `structure_tile` allows (Lq != Lk, a tile inside the keys)."""
    q, k = torch.zeros(1, 2, 7, 4), torch.zeros(1, 2, 12, 4)
    spec = build_spec(q, k, k, causal=causal, window=window)
    a, b = spec.row_key_ranges(1, 6, 2, 11, q.device)
    allowed = spec.structure_tile(1, 6, 2, 11, q.device)
    allowed = torch.ones(5, 9, dtype=torch.bool) if allowed is None else allowed
    cols = torch.arange(9)
    assert torch.equal((cols >= a[:, None]) & (cols < b[:, None]), allowed)
