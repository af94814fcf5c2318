"""The native row helper of the one-pass statistics (`attnkit.kernels.native`) against PyTorch and fp64."""

from __future__ import annotations

import itertools
import logging

import pytest
import torch

import attnkit
from attnkit.kernels import native
from attnkit.kernels import stats as stats_kernel
from attnkit.stats import pool_segments

needs_native = pytest.mark.skipif(not native.available(), reason="no C compiler: the native helper is not built")
STATS = ("output", "lse", "entropy", "mean_distance", "received", "pooled", "topk_weight")


def one_pass(q, k, v, opts, *, topk=4, pool=5, block_q=None, native_rows=True):
    spec = attnkit.functional.build_spec(q, k, v, **opts)
    edges = pool_segments(pool, spec.q_len, spec.kv_len, q.device)
    return stats_kernel.strip_forward(q, k, v, spec, topk=topk, pool=edges, block_q=block_q, native_rows=native_rows)


def assert_topk_consistent(got, q, k, opts):
    """Top-k weights equal fp64's, and every index points at a key whose fp64 weight is the one reported."""
    p = attnkit.attention_weights(q.double(), k.double(), **opts)
    want = p.topk(got["topk_weight"].shape[-1], dim=-1).values
    torch.testing.assert_close(got["topk_weight"].double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.gather(p, -1, got["topk_index"]), want, rtol=1e-5, atol=1e-6)


OPTS = [
    {},
    {"causal": True},
    {"window": (7, 3), "alibi": True},
    {"softcap": 5.0, "mask": "float"},
    {"mask": "bool", "causal": True},
]


@needs_native
@pytest.mark.parametrize("opts", OPTS, ids=["plain", "causal", "window_alibi", "softcap_float_mask", "bool_causal"])
@pytest.mark.parametrize("shape", [(2, 4, 2, 70, 70), (1, 2, 1, 30, 700), (1, 2, 2, 90, 30)], ids=str)
def test_native_rows_equal_fp64_and_the_pytorch_path(opts, shape):
    B, Hq, Hk, Lq, Lk = shape
    torch.manual_seed(Lq * Lk)
    q, k, v = torch.randn(B, Hq, Lq, 8), torch.randn(B, Hk, Lk, 8), torch.randn(B, Hk, Lk, 8)
    opts = dict(opts)
    if opts.get("mask") == "float":
        opts["mask"] = torch.randn(B, 1, Lq, Lk).masked_fill(torch.rand(B, 1, Lq, Lk) < 0.1, -torch.inf)
    elif opts.get("mask") == "bool":
        opts["mask"] = torch.rand(B, Hq, Lq, Lk) < 0.7
        opts["mask"][:, :, 3] = False  # a row that sees nothing
    got = one_pass(q, k, v, opts, block_q=16)
    eager = one_pass(q, k, v, opts, block_q=16, native_rows=False)
    ref = one_pass(q.double(), k.double(), v.double(), opts, block_q=16)
    for name in STATS:
        torch.testing.assert_close(got[name].double(), ref[name], rtol=2e-5, atol=2e-5, msg=name)
        torch.testing.assert_close(got[name], eager[name], rtol=2e-5, atol=2e-5, msg=name)
    assert_topk_consistent(got, q, k, opts)


@needs_native
def test_rows_without_keys_are_zero_with_lse_minus_inf():
    q, k, v = torch.randn(1, 2, 50, 8), torch.randn(1, 1, 20, 8), torch.randn(1, 1, 20, 8)
    got = one_pass(q, k, v, {"causal": True}, topk=3)  # Lq > Lk: the first 30 rows see no key
    assert torch.isneginf(got["lse"][:, :, :30]).all()
    for name in ("entropy", "mean_distance", "topk_weight", "output"):
        assert (got[name][:, :, :30] == 0).all(), name
    assert torch.isfinite(got["lse"][:, :, 30:]).all()


@needs_native
@pytest.mark.parametrize("scale", [30.0, 100.0])
def test_large_logits_stay_exact(scale):
    """Scores of several hundred: the exponent is taken after the row maximum is subtracted."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 64, 16) * scale, torch.randn(1, 2, 300, 16), torch.randn(1, 2, 300, 16)
    got = one_pass(q, k, v, {"causal": True}, topk=4)
    ref = one_pass(q.double(), k.double(), v.double(), {"causal": True}, topk=4)
    assert all(torch.isfinite(got[n]).all() for n in STATS)
    for name in ("entropy", "topk_weight", "received", "pooled"):
        torch.testing.assert_close(got[name].double(), ref[name], rtol=1e-4, atol=1e-4, msg=name)
    # lse and the output scale with the logits: relative to them
    torch.testing.assert_close(got["lse"].double(), ref["lse"], rtol=1e-5, atol=1e-3)


@needs_native
@pytest.mark.parametrize("W", [63, 64 * 8, 64 * 33 + 17, 9000])
@pytest.mark.parametrize("k", [1, 8, 64])
def test_native_top_k_screen_is_exact(W, k):
    """Long rows take the chunk screen; ties keep the smaller index, as a scan in key order does."""
    if k > W:
        pytest.skip(f"k={k} > W={W}")
    torch.manual_seed(W + k)
    s = torch.randn(3, 5, W) * 4
    s[0, 0] = 0.0  # a uniform row: every weight tied
    s[1, 1, W // 2 :] = -torch.inf
    s[2, 3] = -torch.inf  # a row with no allowed key: weights 0, scale 0, lse -inf
    scores = s.clone()
    # fp64 reference: fp32 softmax itself errs by 2e-6 on the largest weight of a peaked row
    p_want = torch.softmax(scores.double(), dim=-1).float().nan_to_num(0.0)
    row_segment = torch.tensor([0, 0, 1, 1, 2])  # query segments of the 5 rows
    key_edges = torch.tensor([0, 1, W // 3, W - 1, W])  # key segments of 1, many and 1 keys
    lse, scale, ent, dist, w, i, colsum, cells = native.strip_rows(s, 0, k, row_segment, 3, key_edges)
    # s now holds e = exp(s - max), the weights times z
    torch.testing.assert_close(s * scale[..., None], p_want, rtol=3e-6, atol=1e-7)  # fp32 s - m: 2e-6 at |s - m| ~ 40
    assert scale[2, 3] == 0 and lse[2, 3] == -torch.inf and ent[2, 3] == 0 and dist[2, 3] == 0
    torch.testing.assert_close(colsum, p_want.sum(1), rtol=1e-5, atol=1e-6)
    bands = torch.stack([p_want[:, :2].sum(1), p_want[:, 2:4].sum(1), p_want[:, 4]], dim=1)  # (3, 3, W)
    want_cells = torch.stack([bands[..., a:b].sum(-1) for a, b in itertools.pairwise(key_edges)], dim=-1)
    torch.testing.assert_close(cells, want_cells, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w, p_want.topk(k, dim=-1).values, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.gather(p_want, -1, i), w, rtol=1e-6, atol=1e-7)
    assert torch.equal(i[0, 0], torch.arange(k))
    torch.testing.assert_close(lse, torch.logsumexp(scores, dim=-1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ent, -torch.special.xlogy(p_want, p_want).sum(-1), rtol=1e-5, atol=1e-5)
    pos = (torch.arange(5, dtype=torch.float32)[:, None] - torch.arange(W, dtype=torch.float32)).abs()
    torch.testing.assert_close(dist, (p_want * pos).sum(-1), rtol=1e-5, atol=1e-3)


@needs_native
@pytest.mark.parametrize("W", [40, 700])
def test_native_row_ranges_equal_masking(W):
    """Keys outside a row's [lo, hi) count as masked whatever the strip holds there (causal/window rows)."""
    torch.manual_seed(W)
    s = torch.randn(2, 6, W) * 3
    lo = torch.tensor([0, 0, 5, 9, 3, 7])
    hi = torch.tensor([W, 1, W - 4, 9, 20, W])  # full, one key, a window, none, short, a left edge
    inside = (torch.arange(W) >= lo[:, None]) & (torch.arange(W) < hi[:, None])  # (6, W)
    masked = s.masked_fill(~inside, -torch.inf)
    rows, edges = torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([0, W // 2, W])
    got = native.strip_rows(s.clone(), 2, 3, rows, 2, edges, (lo, hi))
    want = native.strip_rows(masked.clone(), 2, 3, rows, 2, edges)
    for name, a, b in zip(("lse", "scale", "entropy", "distance", "top_w", "top_i", "colsum", "cells"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    p_want = torch.softmax(masked.double(), dim=-1).nan_to_num(0.0)
    s_out = s.clone()
    native.strip_rows(s_out, 2, 3, rows, 2, edges, (lo, hi))
    torch.testing.assert_close((s_out * got[1][..., None]).double(), p_want, rtol=3e-6, atol=1e-7)
    with pytest.raises(ValueError, match="out of range"):
        native.strip_rows(s.clone(), 2, 3, rows, 2, edges, (lo, hi + W))  # a range past the strip


@needs_native
def test_native_full_resolution_pool_is_the_weights():
    """A segment per query and per key (the pooled map at full resolution): the cells are the weights."""
    torch.manual_seed(3)
    s = torch.randn(2, 5, 33) * 2
    s[1, 2, 10:] = -torch.inf
    p_want = torch.softmax(s.double(), dim=-1)
    *_, w, i, colsum, cells = native.strip_rows(s.clone(), 0, 4, torch.arange(5), 5, torch.arange(34))
    torch.testing.assert_close(cells.double(), p_want, rtol=3e-6, atol=1e-7)
    torch.testing.assert_close(colsum.double(), p_want.sum(1), rtol=1e-5, atol=1e-6)
    # without the sums the weights themselves stay in the strip (scale 1), with the same top-k
    stored = s.clone()
    _, scale, *_, w2, i2, no_sum, no_cells = native.strip_rows(
        stored, 0, 4, torch.arange(5), 5, torch.arange(34), sums=False
    )
    assert no_sum is None and no_cells is None and bool((scale == 1).all())
    torch.testing.assert_close(stored.double(), p_want, rtol=3e-6, atol=1e-7)
    assert torch.equal(w2, w) and torch.equal(i2, i)


@needs_native
def test_top_k_above_the_native_limit_uses_pytorch():
    q, k, v = torch.randn(1, 1, 20, 8), torch.randn(1, 1, 200, 8), torch.randn(1, 1, 200, 8)
    got = one_pass(q, k, v, {}, topk=native.MAX_TOPK + 6)
    assert got["topk_weight"].shape[-1] == native.MAX_TOPK + 6
    assert_topk_consistent(got, q, k, {})


def test_without_a_compiler_the_pytorch_path_runs(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CC", "/bin/false")
    monkeypatch.setenv("ATTNKIT_CACHE", str(tmp_path))
    native._library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="attnkit.kernels.native"):
            assert not native.available()
        assert "native statistics helper unavailable" in caplog.text
        q, k, v = torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8)
        st = attnkit.attention_stats(q, k, v, causal=True, topk=3, return_output=True)
        torch.testing.assert_close(st.output, attnkit.attention(q, k, v, causal=True), rtol=1e-5, atol=1e-6)
        assert not list(tmp_path.glob("*.so"))
    finally:
        native._library.cache_clear()


def test_attnkit_native_0_turns_the_helper_off(monkeypatch):
    monkeypatch.setenv("ATTNKIT_NATIVE", "0")
    native._library.cache_clear()
    try:
        assert not native.available()
        assert not native.usable(torch.zeros(2, 3, 4), 2)
    finally:
        native._library.cache_clear()


@needs_native
def test_built_once_per_source_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNKIT_CACHE", str(tmp_path))
    native._library.cache_clear()
    try:
        assert native.available()
        built = list(tmp_path.glob("strip_rows-*.so"))
        assert len(built) == 1
        native._library.cache_clear()
        stamp = built[0].stat().st_mtime_ns
        assert native.available() and built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt
    finally:
        native._library.cache_clear()


def test_units_run_on_worker_threads_with_the_same_results_and_thread_count_restored():
    """Several (batch, head) units are spread over torch's thread count; the count is restored after."""
    q, k, v = torch.randn(3, 4, 90, 8), torch.randn(3, 2, 90, 8), torch.randn(3, 2, 90, 8)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        many = one_pass(q, k, v, {"causal": True}, topk=3)
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        one = one_pass(q, k, v, {"causal": True}, topk=3)
    finally:
        torch.set_num_threads(before)
    for name in STATS:
        torch.testing.assert_close(many[name], one[name], rtol=1e-6, atol=1e-6, msg=name)
