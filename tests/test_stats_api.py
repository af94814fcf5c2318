"""The public surface of `attnkit.stats`: `attention_stats`'s arguments, `pool_segments`, and the
`AttentionStats` helpers (`select`, `to`, `pool_edges`, `segment_flow`, `pooled_density`).

Small inputs and hand-computed values: these tests were written to kill the mutants that
`make mutate` left alive in ``stats.py`` (docs/results/mutation.md).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import attnkit
from attnkit import backends
from attnkit.stats import AttentionStats, attention_stats, pool_segments
from tests.conftest import make_qkv

FIELDS = [f.name for f in dataclasses.fields(AttentionStats)]
PER_HEAD = [name for name in FIELDS if name not in ("query_edges", "key_edges")]


@pytest.fixture(scope="module")
def stats():
    """Statistics of B=3, Hq=4 (Hk=2), L=9, with the output and segment edges, all fields distinct."""
    torch.manual_seed(0)
    q, k, v = make_qkv(3, 4, 2, 9, 9, 4, dtype=torch.float32)
    return attention_stats(q, k, v, causal=True, topk=3, pool=torch.tensor([0, 2, 9]), return_output=True)


# ------------------------------------------------------------------ select
@pytest.mark.parametrize(
    ("batch", "heads", "rows", "cols"),
    [
        (1, 2, [1], [2]),  # ints keep the dims: [b:b+1], [h:h+1]
        (0, 3, [0], [3]),
        (slice(1, 3), 1, [1, 2], [1]),
        (2, slice(None, None, 2), [2], [0, 2]),
        (slice(0, 2), torch.tensor([3, 0]), [0, 1], [3, 0]),  # heads as an index tensor, in its order
        (None, None, [0, 1, 2], [0, 1, 2, 3]),  # the defaults: everything
    ],
    ids=["ints", "b0-h3", "batch-slice", "head-step", "head-index", "all"],
)
def test_select_takes_exactly_the_batch_elements_and_heads_asked_for(stats, batch, heads, rows, cols):
    sub = stats.select() if batch is None else stats.select(batch, heads)
    for name in PER_HEAD:
        want = getattr(stats, name)[rows][:, cols]
        got = getattr(sub, name)
        assert got.shape == want.shape, name
        assert torch.equal(got, want), name
    assert sub.query_edges is stats.query_edges and sub.key_edges is stats.key_edges  # per segment: kept whole
    assert sub.shape == (len(rows), len(cols), 9, 9)


# ------------------------------------------------------------------ to
def test_to_a_dtype_converts_the_statistics_and_keeps_indices_and_edges_int64(stats):
    for moved in (stats.to(torch.float64), stats.to(dtype=torch.float64), stats.to("cpu", torch.float64)):
        for name in PER_HEAD:
            x, y = getattr(stats, name), getattr(moved, name)
            if name == "topk_index":
                assert y.dtype == torch.int64 and torch.equal(y, x)
            else:
                assert y.dtype == torch.float64, name
                assert torch.equal(y, x.double()), name
        for name in ("query_edges", "key_edges"):
            assert getattr(moved, name).dtype == torch.int64 and torch.equal(getattr(moved, name), stats.query_edges)


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        (("meta",), {}),
        ((), {"device": "meta"}),
        (("meta", torch.float16), {}),
        ((), {"device": "meta", "dtype": torch.float16}),
    ],
    ids=["device", "device-kw", "device-dtype", "device-dtype-kw"],
)
def test_to_a_device_moves_every_tensor(stats, args, kwargs):
    moved = stats.to(*args, **kwargs)
    want = kwargs.get("dtype", args[1] if len(args) > 1 else torch.float32)
    for name in FIELDS:
        x = getattr(moved, name)
        assert x.device.type == "meta", name
        assert x.dtype == (torch.int64 if name in ("topk_index", "query_edges", "key_edges") else want), name


def test_to_keeps_a_missing_output_missing():
    q, k, v = make_qkv(1, 2, 2, 5, 5, 4, dtype=torch.float32)
    st = attention_stats(q, k, v, topk=2, pool=2)
    assert st.to(torch.float64).output is None
    assert st.to("meta").output is None


# ------------------------------------------------------------------ pool_edges, segment_flow, pooled_density
def _without_edges(device="cpu"):
    """Statistics of Lq=10 queries, Lk=7 keys, pooled 3 x 4, built without edges (near-equal tiles)."""
    B, H, Lq, Lk, K = 1, 2, 10, 7, 2
    pooled = torch.arange(1.0, 1 + B * H * 3 * 4).view(B, H, 3, 4)  # (B, H, P_q, P_k)
    return AttentionStats(
        lse=torch.zeros(B, H, Lq),
        entropy=torch.zeros(B, H, Lq),
        mean_distance=torch.zeros(B, H, Lq),
        received=torch.zeros(B, H, Lk),
        topk_index=torch.zeros(B, H, Lq, K, dtype=torch.int64),
        topk_weight=torch.zeros(B, H, Lq, K),
        pooled=pooled,
    ).to(device)


def test_pool_edges_without_stored_edges_are_the_near_equal_tiles():
    st = _without_edges()
    eq, ek = st.pool_edges()
    assert eq.tolist() == [0, 3, 6, 10]  # floor(r * 10 / 3)
    assert ek.tolist() == [0, 1, 3, 5, 7]  # floor(r * 7 / 4)
    assert eq.dtype == ek.dtype == torch.int64
    # segment_flow: pooled / queries per row; pooled_density: pooled / pairs per block
    rows = torch.tensor([3.0, 3.0, 4.0])[:, None]
    cols = torch.tensor([1.0, 2.0, 2.0, 2.0])[None, :]
    torch.testing.assert_close(st.segment_flow(), st.pooled / rows, rtol=0, atol=0)
    torch.testing.assert_close(st.pooled_density(), st.pooled / (rows * cols), rtol=0, atol=0)
    assert st.segment_flow().dtype == st.pooled_density().dtype == torch.float32


def test_pool_edges_without_stored_edges_follow_the_pooled_device():
    eq, ek = _without_edges("meta").pool_edges()
    assert eq.device.type == ek.device.type == "meta"
    assert eq.shape == (4,) and ek.shape == (5,)


def test_stored_edges_are_returned_as_they_are(stats):
    eq, ek = stats.pool_edges()
    assert eq is stats.query_edges and ek is stats.key_edges


# ------------------------------------------------------------------ attention_stats's arguments
def test_defaults_are_top_8_and_256_tiles():
    q, k, v = make_qkv(1, 1, 1, 257, 257, 2, dtype=torch.float32)
    st = attention_stats(q, k, v)
    assert st.topk_index.shape == (1, 1, 257, 8)
    assert st.pooled.shape == (1, 1, 256, 256)
    assert st.query_edges.tolist() == (torch.arange(257) * 257 // 256).tolist()


def test_blhd_layout_is_bhld_transposed():
    q, k, v = make_qkv(2, 4, 2, 6, 9, 8, dtype=torch.float32)  # (B, H, L, D), L != H
    want = attention_stats(q, k, v, causal=True, topk=3, pool=4, return_output=True)
    blhd = [x.transpose(1, 2).contiguous() for x in (q, k, v)]  # (B, L, H, D)
    got = attention_stats(*blhd, causal=True, topk=3, pool=4, return_output=True, layout="blhd")
    for name in ("lse", "entropy", "mean_distance", "received", "topk_weight", "pooled"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), msg=name)
    assert torch.equal(got.topk_index, want.topk_index)
    assert got.output.shape == (2, 6, 4, 8)  # (B, Lq, Hq, Dv): the caller's layout
    torch.testing.assert_close(got.output, want.output.transpose(1, 2))


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"layout": "bthd"}, ValueError, r"layout must be 'bhld' \(B, H, L, D\) or 'blhd' \(B, L, H, D\), got 'bthd'"),
        ({"topk": -1}, ValueError, r"topk must be an int >= 0, got -1"),
        ({"topk": True}, ValueError, r"topk must be an int >= 0, got True"),
        ({"topk": 2.0}, ValueError, r"topk must be an int >= 0, got 2\.0"),
        ({"return_output": 1}, TypeError, r"return_output must be a bool, got 1"),
        ({"pool": 0}, ValueError, r"pool must be an int >= 1 or segment edges, got 0"),
        (
            {"pool": True},
            TypeError,
            r"pool must be an int >= 1, a 1-D tensor of segment edges or a pair \(query_edges, key_edges\), got bool$",
        ),
        (
            {"pool": [torch.tensor([0, 6])] * 3},
            TypeError,
            r"pool must be an int >= 1, .* or a pair \(query_edges, key_edges\), got list$",
        ),
    ],
    ids=["layout", "topk-negative", "topk-bool", "topk-float", "return_output", "pool-0", "pool-bool", "pool-3"],
)
def test_argument_errors_name_the_argument_and_what_arrived(kwargs, exc, match):
    q, k, v = make_qkv(1, 2, 2, 6, 6, 4, dtype=torch.float32)
    with pytest.raises(exc, match=f"^attention_stats: {match}"):
        attention_stats(q, k, v, **kwargs)


def test_the_two_passes_keep_the_output_autograd_and_the_backend_asked_for():
    q, k, v = make_qkv(1, 2, 2, 6, 6, 4, grad=True)
    st = attention_stats(q, k, v, causal=True, topk=2, pool=2, backend="tiled", return_output=True)
    assert not any(getattr(st, name).requires_grad for name in PER_HEAD if name != "output")
    got = torch.autograd.grad(st.output.sum(), (q, k, v))
    want = torch.autograd.grad(attnkit.attention(q, k, v, causal=True, backend="reference").sum(), (q, k, v))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    with pytest.raises(ValueError, match=r"backend='sdpa' cannot compute this request: SDPA's dropout"):
        attention_stats(q, k, v, dropout_p=0.5, backend="sdpa")  # the backend asked for, not auto's choice
    with pytest.raises(ValueError, match=r"backend must be 'auto' or one of \[.*\], got 'nope'"):
        attention_stats(q, k, v, backend="nope")


def test_v_is_validated_with_q_and_k():
    q, k, _ = make_qkv(1, 2, 2, 6, 6, 4, dtype=torch.float32)
    v = torch.randn(1, 2, 5, 4)  # one key short
    with pytest.raises(ValueError, match=r"k and v must have the same heads and length .* v \(1, 2, 5, 4\)"):
        attention_stats(q, k, v)


def test_everything_is_made_on_q_device_not_torch_default_device():
    """Under ``with torch.device("meta")`` (torch's default device), statistics of CPU inputs stay on the CPU."""
    q, k, v = make_qkv(1, 2, 2, 12, 12, 4, dtype=torch.float32)
    for pool in (5, torch.tensor([0, 5, 12])):
        want = attention_stats(q, k, v, pool=pool, topk=3, return_output=True)
        with torch.device("meta"):
            got = attention_stats(q, k, v, pool=pool, topk=3, return_output=True)
        for name in FIELDS:
            assert getattr(got, name).device.type == "cpu", name
            torch.testing.assert_close(getattr(got, name), getattr(want, name), msg=name)


@pytest.fixture
def spy_backend():
    """A statistics backend ahead of the built-ins (tiled's kernels) that records what it is given.

    ``asked``: ``(Lq, Lk, D, causal, return_lse)`` of each refusal call (it refuses ``D > 4``);
    ``ran``: ``(lse is None, q and k finite)`` of each statistics call (lse None: the one-pass kernel).
    """
    tiled = backends.get_backend("tiled")
    asked, ran = [], []

    def refusal(q, spec, return_lse):
        asked.append((spec.q_len, spec.kv_len, spec.head_dim, spec.causal, return_lse))
        return "head dims up to 4" if spec.head_dim > 4 else None

    def run_stats(q, k, v, spec, lse, *, topk, pool):
        ran.append((lse is None, bool(torch.isfinite(q).all() and torch.isfinite(k).all())))
        return tiled.run_stats(q, k, v, spec, lse, topk=topk, pool=pool)

    spy = backends.Backend(
        "stats-spy", tiled.run, tiled.refusal, priority=1, run_stats=run_stats, stats_refusal=refusal
    )
    backends.register_backend(spy, replace=True)
    try:
        yield asked, ran
    finally:
        backends.unregister_backend("stats-spy")


def test_a_registered_statistics_backend_is_asked_with_the_spec_and_no_lse(spy_backend):
    """`Backend.stats_refusal` receives the request's spec and ``return_lse=False`` (its documented contract)."""
    asked, ran = spy_backend
    q, k, v = make_qkv(1, 2, 2, 7, 9, 4, dtype=torch.float32)
    st = attention_stats(q, k, v, causal=True, topk=2, pool=3)
    assert asked == [(7, 9, 4, True, False)] and asked[0][-1] is False and len(ran) == 1
    want = attention_stats(q.double(), k.double(), v.double(), causal=True, topk=2, pool=3)
    torch.testing.assert_close(st.pooled.double(), want.pooled)
    q8, k8, v8 = make_qkv(1, 2, 2, 7, 9, 8, dtype=torch.float32)
    n = len(ran)
    attention_stats(q8, k8, v8, causal=True, topk=2, pool=3)  # refused: tiled runs it
    assert asked[-1][2] == 8 and len(ran) == n


def test_one_pass_only_without_dropout_on_auto_with_finite_inputs(spy_backend):
    """The one-pass kernel (``lse=None``) runs without dropout, on ``backend="auto"``, for finite inputs;
    otherwise a forward, then the statistics pass from its lse, on finite (cleaned) ``q`` and ``k``."""
    _, ran = spy_backend
    q, k, v = make_qkv(1, 2, 2, 6, 6, 4, dtype=torch.float32)
    attention_stats(q, k, v, topk=2, pool=2)
    assert ran[-1] == (True, True)
    attention_stats(q, k, v, topk=2, pool=2, dropout_p=0.5)
    assert ran[-1] == (False, True)
    attention_stats(q, k, v, topk=2, pool=2, backend="tiled")
    assert ran[-1] == (False, True)
    q[0, 1, 2, 0], k[0, 0, 4, 3] = float("nan"), float("inf")
    attention_stats(q, k, v, topk=2, pool=2)
    assert ran[-1] == (False, True)


def test_traced_calls_take_the_two_passes(spy_backend, monkeypatch):
    """Under ``torch.compile`` (its branch run eagerly here) the forward, then the statistics pass."""
    _, ran = spy_backend
    q, k, v = make_qkv(1, 2, 2, 6, 6, 4, dtype=torch.float32)
    want = attention_stats(q, k, v, causal=True, topk=2, pool=2)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    got = attention_stats(q, k, v, causal=True, topk=2, pool=2)
    monkeypatch.undo()
    assert [r[0] for r in ran] == [True, False]
    for name in ("lse", "entropy", "pooled", "topk_weight"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), msg=name)


def test_no_statistics_backend_is_an_error_with_every_reason():
    tiled = backends.get_backend("tiled")
    backends.register_backend(
        dataclasses.replace(tiled, stats_refusal=lambda q, spec, lse: "refused here"), replace=True
    )
    try:
        q, k, v = make_qkv(1, 2, 2, 6, 6, 4, dtype=torch.float32)
        with pytest.raises(ValueError) as info:
            attention_stats(q, k, v)
    finally:
        backends.register_backend(tiled, replace=True)
    msg = str(info.value)
    assert msg.startswith("attention_stats: no backend can run the statistics pass (") and msg.endswith(")")
    reasons = msg[len("attention_stats: no backend can run the statistics pass (") : -1].split("; ")
    assert "tiled: refused here" in reasons and "sdpa: has no statistics kernel" in reasons
    assert [r.split(": ")[0] for r in reasons] == backends.available_backends()


def test_non_finite_inputs_give_nan_rows_and_exact_statistics_elsewhere():
    """The non-finite rule (`attnkit.attention`): rows that hold or may read a NaN/inf are NaN; the others exact."""
    q, k, v = make_qkv(1, 2, 1, 8, 8, 4, dtype=torch.float32)
    q[0, 0, 2, 1] = float("nan")  # query row 2 of head 0
    k[0, 0, 5, 0] = float("inf")  # key 5: read by rows 5.. (causal) of both heads
    st = attention_stats(q, k, v, causal=True, topk=2, pool=8, return_output=True)
    bad = torch.zeros(1, 2, 8, dtype=torch.bool)
    bad[0, 0, 2] = True
    bad[0, :, 5:] = True
    for name in ("lse", "entropy", "mean_distance"):
        assert torch.equal(getattr(st, name).isnan(), bad), name
    assert st.topk_weight[bad].isnan().all()
    p = attnkit.attention_weights(q.double(), k.double(), causal=True)  # NaN in the bad rows
    good = ~bad
    _, lse = attnkit.attention(q.double(), k.double(), v.double(), causal=True, return_lse=True)
    torch.testing.assert_close(st.lse[good].double(), lse[good])
    torch.testing.assert_close(st.entropy[good].double(), -torch.special.xlogy(p, p).sum(-1)[good])
    torch.testing.assert_close(st.topk_weight[good].double(), p.topk(2, dim=-1).values[good])
    torch.testing.assert_close(st.output, attnkit.attention(q, k, v, causal=True), equal_nan=True)


# ------------------------------------------------------------------ pool_segments and the edges' checks
CPU = torch.device("cpu")


def test_edges_come_back_int64_and_pairs_may_be_lists():
    eq, ek = pool_segments(torch.tensor([0, 1, 5, 12], dtype=torch.int32), 12, 12, CPU)
    assert eq.dtype == torch.int64 and eq.tolist() == [0, 1, 5, 12] and ek is eq
    eq, ek = pool_segments([torch.tensor([0, 4]), torch.tensor([0, 2, 9], dtype=torch.int16)], 4, 9, CPU)
    assert (eq.tolist(), ek.tolist()) == ([0, 4], [0, 2, 9]) and ek.dtype == torch.int64


@pytest.mark.parametrize(
    ("pool", "match"),
    [
        (
            torch.tensor([0.0, 6.0, 12.0]),
            r"pool must be a 1-D integer tensor of segment edges, got torch\.float32 of shape \(3,\)$",
        ),
        (
            torch.tensor([False, True]),
            r"pool must be a 1-D integer tensor of segment edges, got torch\.bool of shape \(2,\)$",
        ),
        (
            torch.tensor([[0, 12]]),
            r"pool must be a 1-D integer tensor of segment edges, got torch\.int64 of shape \(1, 2\)$",
        ),
        (
            (torch.tensor([0, 12]), [0, 12]),
            r"pool\[1\] \(key edges\) must be a 1-D integer tensor of segment edges, got list$",
        ),
        (
            (None, torch.tensor([0, 12])),
            r"pool\[0\] \(query edges\) must be a 1-D integer tensor of segment edges, got NoneType$",
        ),
    ],
    ids=["float", "bool", "2-D", "list", "None"],
)
def test_edges_of_the_wrong_kind_are_named_with_what_arrived(pool, match):
    with pytest.raises(ValueError, match=f"^attention_stats: {match}"):
        pool_segments(pool, 12, 12, CPU)


@pytest.mark.parametrize(
    ("edges", "shown"),
    [
        ([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 19], "[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 19]"),  # 12 values: all shown
        ([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 19], "[0, 1, 2, 3, 4, 5, '...', 10, 11, 19]"),  # 13: first 6, last 3
        ([0, 5, 5, 20], "[0, 5, 5, 20]"),
        ([1, 5, 20], "[1, 5, 20]"),
        ([0], "[0]"),
    ],
    ids=["12", "13", "repeat", "start", "one"],
)
def test_edges_that_do_not_rise_from_0_to_the_length_are_shown(edges, shown):
    want = "attention_stats: pool must rise strictly from 0 to the length 20 "
    want += f"([0, e_1, ..., 20], one segment at least), got {shown}"
    with pytest.raises(ValueError) as info:
        pool_segments(torch.tensor(edges), 20, 20, CPU)
    assert str(info.value) == want


def _traced(monkeypatch):
    """Run the branch `torch.compile` traces, eagerly: the checks become `torch._assert_async`."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)


def test_traced_edges_are_moved_and_returned_unread(monkeypatch):
    _traced(monkeypatch)
    good = torch.tensor([0, 1, 5, 12], dtype=torch.int32)  # a step of 1 is a segment
    eq, _ = pool_segments(good, 12, 12, CPU)
    assert eq.dtype == torch.int64 and eq.tolist() == [0, 1, 5, 12]
    assert pool_segments(torch.tensor([0, 12]), 12, 12, CPU)[0].tolist() == [0, 12]
    meta = torch.device("meta")  # on the device asked for (values unread)
    for eq, ek in (pool_segments(good, 12, 12, meta), pool_segments((good, torch.tensor([0, 3, 12])), 12, 12, meta)):
        assert eq.device.type == ek.device.type == "meta" and eq.dtype == ek.dtype == torch.int64


@pytest.mark.parametrize(
    "edges",
    [[0, 5, 5, 12], [0, 7, 5, 12], [0, 5, 11], [1, 5, 12], [0, 12, 13], [0, 5], [0, 0]],
    ids=["repeat", "fall", "short", "start", "long", "two-short", "two-empty"],
)
def test_traced_edges_that_do_not_rise_fail_when_the_graph_runs(monkeypatch, edges):
    _traced(monkeypatch)
    with pytest.raises(RuntimeError, match=r"^attention_stats: pool must rise strictly from 0 to the length 12$"):
        pool_segments(torch.tensor(edges), 12, 12, CPU)
