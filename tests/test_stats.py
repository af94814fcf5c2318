"""attention_stats against statistics computed from the materialised float64 weights."""

from __future__ import annotations

import contextlib

import pytest
import torch

import attnkit
from attnkit.kernels import stats as stats_kernel
from attnkit.stats import AttentionStats, attention_stats, pool_segments
from tests.conftest import make_qkv


@contextlib.contextmanager
def largest_tensor():
    """Track the largest tensor (in elements) any operation creates inside the block: yields ``[largest]``."""
    from torch.utils._python_dispatch import TorchDispatchMode

    biggest = [0]

    class Largest(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple | list) else [out]:
                if isinstance(t, torch.Tensor):
                    biggest[0] = max(biggest[0], t.numel())
            return out

    with Largest():
        yield biggest


def reference_stats(q, k, opts, *, topk, pool):
    """Every statistic from the full fp64 weight matrix, written independently of the kernel."""
    p = attnkit.attention_weights(q.double(), k.double(), **opts)  # (B, H, Lq, Lk)
    B, H, Lq, Lk = p.shape
    offset = Lk - Lq
    pos_q = torch.arange(Lq, dtype=torch.float64)[:, None] + offset
    pos_k = torch.arange(Lk, dtype=torch.float64)[None, :]
    Pq, Pk = min(pool, Lq), min(pool, Lk)
    pooled = torch.zeros(B, H, Pq, Pk, dtype=torch.float64)
    for r in range(Pq):
        for c in range(Pk):
            rows = slice(r * Lq // Pq, (r + 1) * Lq // Pq)
            cols = slice(c * Lk // Pk, (c + 1) * Lk // Pk)
            pooled[:, :, r, c] = p[:, :, rows, cols].sum((-1, -2))
    weights, index = p.topk(min(topk, Lk), dim=-1)
    return p, {
        "entropy": -torch.special.xlogy(p, p).sum(-1),
        "mean_distance": (p * (pos_q - pos_k).abs()).sum(-1),
        "received": p.sum(-2),
        "pooled": pooled,
        "topk_weight": weights,
        "topk_index": index,
    }


def check_against_reference(st: AttentionStats, q, k, opts, *, topk, pool, rtol=1e-5, atol=1e-5):
    p, ref = reference_stats(q, k, opts, topk=topk, pool=pool)
    for name in ("entropy", "mean_distance", "received", "pooled", "topk_weight"):
        got = getattr(st, name)
        assert got.shape == ref[name].shape, name
        torch.testing.assert_close(got.double(), ref[name], rtol=rtol, atol=atol, msg=name)
    # indices: equal where the weight is not tied with a neighbour (or with the first left out)
    w = ref["topk_weight"]
    nxt = p.topk(min(topk + 1, p.shape[-1]), dim=-1).values
    gaps = torch.cat([nxt[..., :-1] - nxt[..., 1:], torch.full_like(w[..., :1], 1.0)], -1)[..., : w.shape[-1]]
    prev = torch.cat([torch.full_like(w[..., :1], 1.0), w[..., :-1] - w[..., 1:]], -1)
    untied = (gaps > 1e-6) & (prev > 1e-6) & (w > 0)
    assert untied.any()
    assert torch.equal(st.topk_index[untied], ref["topk_index"][untied])
    # the indices point at the weights they report
    torch.testing.assert_close(torch.gather(p, -1, st.topk_index), st.topk_weight.double(), rtol=1e-5, atol=1e-6)


CASES = [
    # (options, B, Hq, Hk, Lq, Lk, D)
    ({}, 2, 2, 2, 33, 47, 8),
    ({"causal": True}, 1, 4, 2, 300, 300, 16),  # GQA, several query blocks, diagonal tiles
    ({"causal": True}, 1, 2, 2, 40, 1100, 8),  # Lq < Lk: bottom-right alignment, several key tiles
    ({"causal": True}, 1, 2, 1, 290, 40, 8),  # Lq > Lk: the first rows see no key
    ({"window": (5, 3), "alibi": True}, 1, 4, 4, 70, 1500, 8),
    ({"softcap": 2.0, "scale": 0.9, "window": (None, 2)}, 2, 2, 1, 100, 90, 8),
]


@pytest.mark.parametrize(("opts", "B", "Hq", "Hk", "Lq", "Lk", "D"), CASES)
def test_stats_equal_materialised_reference(opts, B, Hq, Hk, Lq, Lk, D):
    q, k, v = torch.randn(B, Hq, Lq, D), torch.randn(B, Hk, Lk, D), torch.randn(B, Hk, Lk, 5)
    st = attention_stats(q, k, v, **opts, topk=5, pool=17)
    check_against_reference(st, q, k, opts, topk=5, pool=17)
    _, lse_ref = attnkit.attention(q.double(), k.double(), v.double(), **opts, return_lse=True, backend="reference")
    torch.testing.assert_close(st.lse.double(), lse_ref, rtol=1e-5, atol=1e-5)


def test_masks_bool_float_and_fully_masked_rows():
    B, H, Lq, Lk = 2, 2, 37, 29
    q, k, v = torch.randn(B, H, Lq, 8), torch.randn(B, H, Lk, 8), torch.randn(B, H, Lk, 8)
    pad = attnkit.key_padding_mask(torch.tensor([29, 11]), Lk)  # (B, 1, 1, Lk)
    check_against_reference(attention_stats(q, k, v, mask=pad, topk=4, pool=6), q, k, {"mask": pad}, topk=4, pool=6)
    full = torch.rand(B, H, Lq, Lk) > 0.4
    full[:, :, 3] = False  # a row that sees nothing
    st = attention_stats(q, k, v, mask=full, topk=4, pool=6)
    check_against_reference(st, q, k, {"mask": full}, topk=4, pool=6)
    assert (st.entropy[:, :, 3] == 0).all() and (st.topk_weight[:, :, 3] == 0).all()
    assert torch.isneginf(st.lse[:, :, 3]).all()
    bias = torch.randn(1, H, Lq, Lk)
    check_against_reference(attention_stats(q, k, v, mask=bias, topk=3), q, k, {"mask": bias}, topk=3, pool=256)


def test_exact_at_fp64_and_tiles_do_not_matter():
    q, k, v = (torch.randn(1, 2, 90, 8, dtype=torch.float64) for _ in range(3))
    opts = {"causal": True, "alibi": True}
    _, ref = reference_stats(q, k, opts, topk=3, pool=7)
    spec = attnkit.functional.build_spec(q, k, v, **opts)
    _, lse = attnkit.attention(q, k, v, **opts, return_lse=True)
    for bq, bk in [(90, 90), (16, 32), (13, 11)]:
        got = stats_kernel.stats_forward(
            q, k, v, spec, lse, topk=3, pool=pool_segments(7, spec.q_len, spec.kv_len, q.device), block_q=bq, block_k=bk
        )
        for name in ("entropy", "mean_distance", "received", "pooled", "topk_weight"):
            torch.testing.assert_close(got[name], ref[name], rtol=1e-10, atol=1e-10, msg=name)


def test_peaked_rows_take_the_partial_top_k_path():
    """Sharp attention: after the first key tiles most rows cannot change, so only some are merged."""
    q, k = torch.randn(1, 2, 130, 8) * 3, torch.randn(1, 2, 400, 8) * 3
    opts = {"causal": True}
    _, ref = reference_stats(q, k, opts, topk=4, pool=9)
    spec = attnkit.functional.build_spec(q, k, k, **opts)
    _, lse = attnkit.attention(q, k, k, **opts, return_lse=True)
    calls = []
    original = stats_kernel.update_topk

    def spy(p, j0, run_w, run_i, K):
        need = p.amax(-1) > run_w[..., -1]  # the rows the update must merge
        calls.append(0 < int(need.sum()) <= need.numel() // 2)
        return original(p, j0, run_w, run_i, K)

    stats_kernel.update_topk = spy
    try:
        got = stats_kernel.stats_forward(
            q, k, k, spec, lse, topk=4, pool=pool_segments(9, spec.q_len, spec.kv_len, q.device), block_q=64, block_k=40
        )
    finally:
        stats_kernel.update_topk = original
    torch.testing.assert_close(got["topk_weight"].double(), ref["topk_weight"], rtol=1e-5, atol=1e-6)
    p = attnkit.attention_weights(q.double(), k.double(), **opts)
    torch.testing.assert_close(torch.gather(p, -1, got["topk_index"]), ref["topk_weight"], rtol=1e-5, atol=1e-6)
    assert any(calls)  # some tiles merged only a few of their rows


def test_shapes_corners_and_output():
    q, k, v = torch.randn(1, 2, 1, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 6)
    st = attention_stats(q, k, v, topk=8, pool=256, return_output=True)
    assert st.topk_index.shape == (1, 2, 1, 3)  # topk = min(topk, Lk)
    assert st.pooled.shape == (1, 2, 1, 3)
    assert st.shape == (1, 2, 1, 3)
    torch.testing.assert_close(st.output, attnkit.attention(q, k, v))
    torch.testing.assert_close(st.pooled.sum((-1, -2)), torch.ones(1, 2))
    assert attention_stats(q, k, v).output is None
    assert attention_stats(q, k, v, topk=0).topk_index.shape == (1, 2, 1, 0)
    # the pooled density: the mean weight in each tile
    q, k = torch.randn(1, 1, 10, 4), torch.randn(1, 1, 10, 4)
    st = attention_stats(q, k, k, pool=3)
    p = attnkit.attention_weights(q, k)
    torch.testing.assert_close(st.pooled_density()[0, 0, 0, 0], p[0, 0, :3, :3].mean())
    sub = st.select(0, 0)
    assert sub.entropy.shape == (1, 1, 10)


def test_output_keeps_autograd_and_dropout_leaves_stats_alone():
    q, k, v = (torch.randn(1, 2, 20, 8, requires_grad=True) for _ in range(3))
    st = attention_stats(q, k, v, causal=True, return_output=True)
    st.output.sum().backward()
    assert q.grad is not None and not st.entropy.requires_grad
    clean = attention_stats(q, k, v, causal=True)
    noisy = attention_stats(q, k, v, causal=True, dropout_p=0.5, return_output=True)
    torch.testing.assert_close(noisy.entropy, clean.entropy)
    torch.testing.assert_close(noisy.pooled, clean.pooled)
    assert not torch.allclose(noisy.output, attnkit.attention(q, k, v, causal=True))


def test_errors_name_the_argument():
    q = torch.randn(1, 1, 4, 4)
    with pytest.raises(ValueError, match="topk"):
        attention_stats(q, q, q, topk=-1)
    with pytest.raises(ValueError, match="pool"):
        attention_stats(q, q, q, pool=0)
    with pytest.raises(ValueError, match="4-D"):
        attention_stats(q[0], q, q)


def test_memory_is_blockwise():
    """The kernel never allocates an Lq x Lk tensor: the largest intermediate is one tile."""
    L = 640
    q, k, v = (torch.randn(1, 1, L, 8) for _ in range(3))
    spec = attnkit.functional.build_spec(q, k, v, causal=True)
    _, lse = attnkit.attention(q, k, v, causal=True, return_lse=True)
    with largest_tensor() as biggest:
        stats_kernel.stats_forward(
            q,
            k,
            v,
            spec,
            lse,
            topk=4,
            pool=pool_segments(64, spec.q_len, spec.kv_len, q.device),
            block_q=64,
            block_k=128,
        )
    assert biggest[0] <= 64 * 128 * 2  # one tile (plus a concatenation), far below L * L = 410K


def _segment_sums(p, q_edges, k_edges):
    """``(B, H, S_q, S_k)`` sums of the fp64 weights over each block, by explicit slicing."""
    out = torch.zeros(*p.shape[:2], len(q_edges) - 1, len(k_edges) - 1, dtype=p.dtype)
    for r in range(len(q_edges) - 1):
        for c in range(len(k_edges) - 1):
            out[:, :, r, c] = p[:, :, q_edges[r] : q_edges[r + 1], k_edges[c] : k_edges[c + 1]].sum((-1, -2))
    return out


@pytest.mark.parametrize(
    "opts",
    [{"causal": True}, {"window": (5, 0), "alibi": True}, {"mask": "padding"}, {}],
    ids=["causal", "window_alibi", "padding", "plain"],
)
def test_segment_pooling_is_exact_against_the_materialised_weights(opts):
    """Sections of uneven length: the pooled map is the exact block sums; segment_flow rows sum to 1."""
    q, k, v = make_qkv(2, 4, 2, 61, 61, 8)
    opts = dict(opts)
    if opts.get("mask") == "padding":
        opts["mask"] = attnkit.key_padding_mask(torch.tensor([61, 40]), 61)
    edges = torch.tensor([0, 3, 17, 18, 40, 61])
    st = attention_stats(q, k, v, pool=edges, topk=2, **opts)
    p = attnkit.attention_weights(q, k, **opts)  # (B, H, Lq, Lk) fp64
    torch.testing.assert_close(st.pooled, _segment_sums(p, edges.tolist(), edges.tolist()), rtol=1e-12, atol=1e-12)
    assert torch.equal(st.query_edges, edges) and torch.equal(st.key_edges, edges)
    flow = st.segment_flow()  # (B, H, 5, 5): mean attention a token of segment a pays to segment b
    torch.testing.assert_close(flow.sum(-1), torch.ones(2, 4, 5, dtype=flow.dtype), rtol=0, atol=1e-12)
    mean_of_rows = p[:, :, 3:17].mean(-2)  # (B, H, Lk): segment 1's 14 queries, averaged
    torch.testing.assert_close(flow[:, :, 1, 2], mean_of_rows[..., 17:18].sum(-1), rtol=1e-12, atol=1e-12)
    one = st.select(batch=1, heads=slice(0, 2))  # edges travel whole
    assert torch.equal(one.query_edges, edges) and one.pooled.shape == (1, 2, 5, 5)


def test_query_and_key_segments_differ_when_lengths_do():
    q, k, v = make_qkv(1, 2, 2, 9, 30, 8)
    q_edges, k_edges = torch.tensor([0, 4, 9]), torch.tensor([0, 10, 11, 29, 30])
    st = attention_stats(q, k, v, causal=True, pool=(q_edges, k_edges))
    p = attnkit.attention_weights(q, k, causal=True)
    torch.testing.assert_close(st.pooled, _segment_sums(p, q_edges.tolist(), k_edges.tolist()), rtol=1e-12, atol=1e-12)
    assert st.pool_edges()[1] is st.key_edges


@pytest.mark.parametrize(
    ("pool", "exc", "match"),
    [
        (torch.tensor([0, 5, 5, 12]), ValueError, "rise strictly from 0 to the length 12"),
        (torch.tensor([0, 5, 11]), ValueError, "rise strictly from 0 to the length 12"),
        (torch.tensor([1, 5, 12]), ValueError, "rise strictly"),
        (torch.tensor([0.0, 5.0, 12.0]), ValueError, "1-D integer tensor of segment edges"),
        (torch.tensor([[0, 12]]), ValueError, "1-D integer tensor"),
        ((torch.tensor([0, 12]), torch.tensor([0, 3, 9])), ValueError, r"pool\[1\] \(key edges\).*length 12"),
        ("sections", TypeError, "pool must be an int >= 1, a 1-D tensor of segment edges or a pair"),
        (0, ValueError, "pool must be an int >= 1"),
    ],
)
def test_bad_segment_edges_are_clear_errors(pool, exc, match):
    q, k, v = make_qkv(1, 2, 2, 12, 12, 4)
    with pytest.raises(exc, match=match):
        attention_stats(q, k, v, pool=pool)


def test_one_edge_tensor_needs_equal_lengths():
    q, k, v = make_qkv(1, 2, 2, 5, 12, 4)
    with pytest.raises(ValueError, match=r"Lq=5 != Lk=12; pass pool=\(query_edges, key_edges\)"):
        attention_stats(q, k, v, pool=torch.tensor([0, 5, 12]))


@pytest.mark.parametrize(
    "opts",
    [
        {"causal": True},
        {"window": (7, 3), "alibi": True},
        {"softcap": 5.0, "mask": "float"},
        {"mask": "bool", "causal": True},
        {},
    ],
    ids=["causal", "window_alibi", "softcap_float_mask", "bool_mask_causal", "plain"],
)
@pytest.mark.parametrize("shape", [(2, 4, 2, 70, 70), (1, 2, 1, 30, 90), (1, 2, 2, 90, 30)], ids=str)
def test_one_pass_equals_forward_plus_statistics_pass(opts, shape):
    """The one-pass kernel (output and statistics together) against the forward + second pass."""
    B, Hq, Hk, Lq, Lk = shape
    q, k, v = make_qkv(B, Hq, Hk, Lq, Lk, 8)
    opts = dict(opts)
    if opts.get("mask") == "float":
        opts["mask"] = torch.randn(B, 1, Lq, Lk, dtype=torch.float64).masked_fill(
            torch.rand(B, 1, Lq, Lk) < 0.1, -torch.inf
        )
    elif opts.get("mask") == "bool":
        opts["mask"] = torch.rand(B, Hq, Lq, Lk) < 0.7
    spec = attnkit.functional.build_spec(q, k, v, **opts)
    edges = pool_segments(5, Lq, Lk, q.device)
    one = stats_kernel.strip_forward(q, k, v, spec, topk=4, pool=edges, block_q=16)
    out, lse = attnkit.attention(q, k, v, **opts, return_lse=True, backend="reference")
    two = stats_kernel.stats_forward(q, k, v, spec, lse, topk=4, pool=edges)
    torch.testing.assert_close(one["output"], out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(one["lse"], lse, rtol=1e-10, atol=1e-10)
    for name in ("entropy", "mean_distance", "received", "pooled", "topk_weight"):
        torch.testing.assert_close(one[name], two[name], rtol=1e-9, atol=1e-10, msg=name)


def test_one_pass_output_has_the_attention_gradient():
    q, k, v = make_qkv(1, 4, 2, 40, 40, 8, grad=True)
    st = attention_stats(q, k, v, causal=True, alibi=True, return_output=True)
    got = torch.autograd.grad(st.output.sum(), (q, k, v))
    want = torch.autograd.grad(attnkit.attention(q, k, v, causal=True, alibi=True).sum(), (q, k, v))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("heads_per_strip", [1, 4, 8])  # one group; a batch element; two
def test_one_pass_never_holds_more_than_a_strip(monkeypatch, heads_per_strip):
    """Memory: the one-pass kernel holds at most one strip (rows x visible keys; bundles up to BUNDLE_BYTES)."""
    q, k, v = make_qkv(2, 4, 4, 640, 640, 8, dtype=torch.float32)
    spec = attnkit.functional.build_spec(q, k, v)
    monkeypatch.setattr(stats_kernel, "BUNDLE_BYTES", heads_per_strip * 32 * 640 * 4)  # heads bundled up to it
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the dispatch mode that watches is thread-local (a worker holds one strip)
    with largest_tensor() as biggest:
        got = stats_kernel.strip_forward(q, k, v, spec, topk=4, pool=pool_segments(64, 640, 640, q.device), block_q=32)
    torch.set_num_threads(threads)
    # one strip, or the inputs/outputs; far below 4 * 640 * 640
    assert biggest[0] <= max(heads_per_strip * 32 * 640, 2 * 4 * 640 * 8)
    if heads_per_strip > 1:  # small groups are bundled: whole batch elements with all their heads
        assert biggest[0] == heads_per_strip * 32 * 640
    torch.testing.assert_close(got["output"], attnkit.attention(q, k, v), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("W", [31, 2048, 4099, 10000])
def test_row_topk_screens_by_chunks_and_equals_topk(W):
    """The chunk-maxima screen of the one-pass kernel keeps the exact top-k (values; indices point at them)."""
    torch.manual_seed(W)
    p = torch.rand(2, 5, W) ** 8  # peaked rows
    p[0, 0] = 0.0  # an empty row: all ties at 0
    p[1, 1, 100:] = 0.0
    want_w, _ = torch.topk(p, 8, dim=-1)
    got_w, got_i = stats_kernel.row_topk(p, 8)
    torch.testing.assert_close(got_w, want_w, rtol=0, atol=0)
    torch.testing.assert_close(torch.gather(p, -1, got_i), got_w, rtol=0, atol=0)
    assert bool((got_i >= 0).all() & (got_i < W).all())
