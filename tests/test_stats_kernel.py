"""The statistics kernels (`attnkit.kernels.stats`) at their boundaries: strip and unit splits, top-k corners, devices.

Written against the survivors of the mutation run over `attnkit.kernels.stats` (issue 18,
docs/results/mutation.md): each test holds the kernels to the float64 reference
(`tests.test_stats.reference_stats`, the statistics of the materialised weights) or to a
documented contract (memory per strip, units on worker threads, outputs on ``q``'s device).
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

import attnkit
from attnkit.kernels import native
from attnkit.kernels import stats as stats_kernel
from attnkit.stats import pool_segments
from tests.conftest import make_qkv
from tests.test_stats import largest_tensor, reference_stats

NAMES = ("entropy", "mean_distance", "received", "pooled", "topk_weight")
needs_native = pytest.mark.skipif(not native.available(), reason="no C compiler: the native helper is not built")


def one_pass(q, k, v, opts, *, topk, pool, **kwargs):
    spec = attnkit.functional.build_spec(q, k, v, **opts)
    edges = pool_segments(pool, spec.q_len, spec.kv_len, q.device)
    return stats_kernel.strip_forward(q, k, v, spec, topk=topk, pool=edges, **kwargs)


def two_pass(q, k, v, opts, *, topk, pool, **kwargs):
    spec = attnkit.functional.build_spec(q, k, v, **opts)
    _, lse = attnkit.attention(q, k, v, **opts, return_lse=True, backend="reference")
    edges = pool_segments(pool, spec.q_len, spec.kv_len, q.device)
    return stats_kernel.stats_forward(q, k, v, spec, lse, topk=topk, pool=edges, **kwargs)


def assert_reference(got, q, k, opts, *, topk, pool, tol=1e-12):
    """Every statistic equals the fp64 reference; every top-k index of a weight above 0 points at that weight.

    (The index of a weight-0 slot is unspecified in the two-pass kernel; `strip_forward` pads with keys
    outside the row's range, tested on its own below.)
    """
    p, ref = reference_stats(q, k, opts, topk=topk, pool=pool)
    for name in NAMES:
        torch.testing.assert_close(got[name].double(), ref[name], rtol=tol, atol=tol, msg=name)
    weighted = ref["topk_weight"] > 0
    assert bool(weighted.any())
    pointed = torch.gather(p, -1, got["topk_index"])
    torch.testing.assert_close(pointed[weighted], ref["topk_weight"][weighted], rtol=tol, atol=tol)


# ------------------------------------------------------------------ strips and tiles at their edges
@pytest.mark.parametrize(
    ("opts", "Lq", "Lk", "block"),
    [
        ({}, 16, 17, 16),  # offset 1: one key left of the strip's first aligned row
        ({}, 17, 17, 16),  # one key right of the first strip's last row; a last strip of one row
        ({"causal": True}, 17, 17, 1),  # strips of one row: the first sees one key
        ({"window": (1, 0)}, 9, 9, 4),  # each strip sees one key left of its first row
        ({"window": (0, 1)}, 9, 9, 4),  # and one key right of its last
    ],
    ids=["offset_1", "one_key_right", "rows_of_one", "window_left_1", "window_right_1"],
)
@pytest.mark.parametrize("topk", [1, 3])
def test_both_passes_equal_fp64_at_strip_and_tile_edges(opts, Lq, Lk, block, topk):
    q, k, v = make_qkv(1, 2, 1, Lq, Lk, 4)
    got = one_pass(q, k, v, opts, topk=topk, pool=5, block_q=block)
    assert_reference(got, q, k, opts, topk=topk, pool=5)
    got = two_pass(q, k, v, opts, topk=topk, pool=5, block_q=block, block_k=block)
    assert_reference(got, q, k, opts, topk=topk, pool=5)


def test_mean_distance_of_a_peaked_last_row_has_no_cancellation():
    """The last row of a strip attends to its own key with weight ``1 - 1e-12``: its mean distance (``~1e-11``)
    is a sum of non-negative terms, exact to fp64 rounding, not a difference of two sums near 1."""
    q = torch.zeros(1, 1, 8, 2, dtype=torch.float64)
    k = torch.zeros(1, 1, 8, 2, dtype=torch.float64)
    q[..., 1] = 1.0  # rows 0-2 and 4-7: spread over every key
    q[0, 0, 3] = torch.tensor([40.0, 0.0])  # row 3, the last of the strip [0, 4)
    k[..., 1] = 1.0
    k[0, 0, 3] = torch.tensor([1.0, 0.0])  # key 3: row 3's own position
    got = one_pass(q, k, k, {}, topk=2, pool=2, block_q=4)
    _, ref = reference_stats(q, k, {}, topk=2, pool=2)
    assert 1e-12 < float(ref["mean_distance"][0, 0, 3]) < 1e-10
    torch.testing.assert_close(got["mean_distance"], ref["mean_distance"], rtol=1e-9, atol=0)


@pytest.mark.parametrize("native_rows", [True, False], ids=["native", "pytorch"])
def test_without_top_k_the_other_statistics_are_unchanged(native_rows):
    q, k, v = make_qkv(1, 2, 1, 20, 20, 4, dtype=torch.float32)
    opts = {"causal": True}
    with_top = one_pass(q, k, v, opts, topk=2, pool=3, block_q=8, native_rows=native_rows)
    for run in (one_pass, two_pass):
        kwargs = {"native_rows": native_rows} if run is one_pass else {"block_k": 8}
        got = run(q, k, v, opts, topk=0, pool=3, block_q=8, **kwargs)
        assert got["topk_weight"].shape == got["topk_index"].shape == (1, 2, 20, 0)
        for name in ("entropy", "mean_distance", "received", "pooled"):
            torch.testing.assert_close(got[name], with_top[name], rtol=1e-5, atol=1e-6, msg=name)
    q, k, v = (t.double() for t in (q, k, v))
    for run in (one_pass, two_pass):
        got = run(q, k, v, opts, topk=0, pool=3, block_q=8)
        assert got["topk_weight"].shape == (1, 2, 20, 0)
        _, ref = reference_stats(q, k, opts, topk=1, pool=3)
        for name in ("entropy", "mean_distance", "received", "pooled"):
            torch.testing.assert_close(got[name], ref[name], rtol=1e-12, atol=1e-12, msg=name)


# ------------------------------------------------------------------ top-k padding and screening
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["native", "fp64"])
@pytest.mark.parametrize(
    ("opts", "Lq", "Lk"),
    [
        ({"window": (2, None)}, 1, 4),  # the strip sees keys [1, 4): one key (0) left to pad with
        ({"window": (1, 0)}, 6, 6),  # two keys per row: keys on both sides pad
        ({"causal": True}, 3, 5),  # keys [0, hi): the keys after hi pad
    ],
    ids=["one_key_left", "window", "causal"],
)
def test_rows_with_fewer_keys_than_k_pad_with_keys_of_weight_zero(dtype, opts, Lq, Lk):
    """Padding slots name keys outside the row's range, so each index points at the weight reported (0)."""
    q, k, v = make_qkv(1, 2, 1, Lq, Lk, 4, dtype=dtype)
    with torch.device("meta"):  # torch's default device: the padding keys are made on q's device
        got = one_pass(q, k, v, opts, topk=Lk, pool=2, block_q=1)  # strips of one row: W < K
    p = attnkit.attention_weights(q.double(), k.double(), **opts)
    torch.testing.assert_close(torch.gather(p, -1, got["topk_index"]), got["topk_weight"].double(), rtol=1e-5, atol=0)
    assert bool((got["topk_weight"] == 0).any())  # some slots are padding
    for row in got["topk_index"].reshape(-1, Lk):  # every key once: the padding repeats no key
        assert sorted(row.tolist()) == list(range(Lk))


@pytest.mark.parametrize("k", [1, 8])
@pytest.mark.parametrize("W", [64 * 40 + 1, 64 * 40 + 17])
def test_row_top_k_finds_maxima_in_the_tail_after_the_whole_chunks(k, W):
    """The largest weights at the first and last key of the tail (keys past the last whole chunk)."""
    p = torch.rand(3, W) * 0.5
    p[0, 64 * 40] = 1.0  # the first key of the tail
    p[1, W - 1] = 1.0  # the last
    p[2, 64 * 40 - 1] = 1.0  # the last key of the bulk, for contrast
    with torch.device("meta"):  # torch's default device: the screen makes its indices on p's device
        w, i = stats_kernel.row_topk(p, k)
    want_w, want_i = torch.topk(p, k, dim=-1)
    torch.testing.assert_close(w, want_w, rtol=0, atol=0)
    assert torch.equal(i[:, 0], want_i[:, 0])
    torch.testing.assert_close(torch.gather(p, -1, i), w, rtol=0, atol=0)


@pytest.mark.parametrize("tail", [0, 5])  # without a tail the chunks are a view of contiguous rows
def test_row_top_k_above_half_a_chunk_keeps_every_lane(tail):
    """``k > TOPK_CHUNK / 2`` (here above a whole chunk, for the PyTorch path's large k): no lane screen."""
    k = stats_kernel.TOPK_CHUNK + 1
    p = torch.rand(2, stats_kernel.TOPK_CHUNK * 4 * k + tail) ** 4
    with torch.device("meta"):
        w, i = stats_kernel.row_topk(p, k)
    torch.testing.assert_close(w, torch.topk(p, k, dim=-1).values, rtol=0, atol=0)
    torch.testing.assert_close(torch.gather(p, -1, i), w, rtol=0, atol=0)


def test_row_top_k_screens_the_last_axis_of_a_stack_of_strips():
    """``p (G, bq, W)`` as `_strip_weights` passes it, ``bq`` (320) not ``W`` (300): chunks run along ``W``."""
    p = torch.rand(2, 320, 300, dtype=torch.float64) ** 8
    w, i = stats_kernel.row_topk(p, 1)  # 300 // 64 = 4 whole chunks: the screen, for k = 1
    torch.testing.assert_close(w, p.amax(dim=-1, keepdim=True), rtol=0, atol=0)
    assert torch.equal(i, p.argmax(dim=-1, keepdim=True))


def test_update_top_k_merges_a_single_row_that_can_change():
    """One row of a tile holds a weight above its K-th best: only it is merged, the other keeps its buffer."""
    run_w = torch.tensor([[[[0.5, 0.3], [0.2, 0.1]]]], dtype=torch.float64)  # (1, 1, 2, K=2)
    run_i = torch.tensor([[[[0, 1], [2, 3]]]])
    p = torch.tensor([[[[0.05, 0.01, 0.02], [0.0, 0.6, 0.15]]]], dtype=torch.float64)  # (1, 1, 2, 3), keys 10..12
    w, i = stats_kernel.update_topk(p, 10, run_w, run_i, 2)
    assert torch.equal(w, torch.tensor([[[[0.5, 0.3], [0.6, 0.2]]]], dtype=torch.float64))
    assert torch.equal(i, torch.tensor([[[[0, 1], [11, 2]]]]))


# ------------------------------------------------------------------ units: heads and batch elements
@pytest.mark.parametrize(
    ("bundle", "B"),
    [(1, 2), (2, 3)],  # one (batch, kv head) unit each; two batch elements a unit, the last alone
    ids=["per_group", "two_batch_elements"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["native", "pytorch"])
def test_units_split_the_batch_and_heads_exactly_and_run_on_single_thread_workers(monkeypatch, bundle, B, dtype):
    """Every unit's slices are its own (none summed twice), on ``attnkit-stats`` workers of one thread each."""
    Hq, Hk, L = 4, 2, 24
    q, k, v = make_qkv(B, Hq, Hk, L, L, 4, dtype=dtype)
    opts = {"causal": True}
    group_bytes = (Hq // Hk) * L * L * torch.empty((), dtype=dtype).element_size()
    monkeypatch.setattr(stats_kernel, "BUNDLE_BYTES", 1 if bundle == 1 else 2 * Hk * group_bytes)
    seen = []
    watched = "strip_rows" if dtype == torch.float32 else "_strip_weights"
    owner = native if dtype == torch.float32 else stats_kernel
    original = getattr(owner, watched)

    def spy(s, *args, **kwargs):
        seen.append((threading.current_thread().name, torch.get_num_threads(), s.shape[0]))
        time.sleep(0.02)  # every unit is queued before one ends: a larger pool would start a thread for each
        return original(s, *args, **kwargs)

    monkeypatch.setattr(owner, watched, spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = one_pass(q, k, v, opts, topk=3, pool=5)  # the default path: native rows where they apply
    finally:
        torch.set_num_threads(before)
    units = B * Hk if bundle == 1 else 2
    assert len(seen) == units, seen  # one strip (block of all rows) per unit
    assert all(name.startswith("attnkit-stats") and threads == 1 for name, threads, _ in seen), seen
    assert len({name for name, *_ in seen}) <= 2, seen  # a pool of torch's thread count, not one per unit
    rows = sorted(r for *_, r in seen)  # strips of G heads, or of two (then one) whole batch elements
    assert rows == ([Hq // Hk] * units if bundle == 1 else [Hq, 2 * Hq])
    assert_reference(got, q, k, opts, topk=3, pool=5, tol=1e-12 if dtype == torch.float64 else 2e-5)
    out, lse = attnkit.attention(q, k, v, **opts, return_lse=True, backend="reference")
    torch.testing.assert_close(got["output"], out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["lse"], lse, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["native", "pytorch"])
def test_units_past_the_first_batch_element_and_head_take_their_own_mask_and_slopes(monkeypatch, dtype):
    """A unit per (batch element, kv head) of three and two, strips of 8 causal rows: each unit scores
    with its own rows of a per-batch key-padding mask and its own heads' ALiBi slopes."""
    B, Hq, Hk, L = 3, 4, 2, 24
    q, k, v = make_qkv(B, Hq, Hk, L, L, 4, dtype=dtype)
    mask = torch.arange(L) < torch.tensor([24, 13, 19])[:, None]  # (B, L): a different length per element
    opts = {"causal": True, "alibi": True, "mask": mask[:, None, None, :]}
    monkeypatch.setattr(stats_kernel, "BUNDLE_BYTES", 1)  # one (batch element, kv head) per unit
    got = one_pass(q, k, v, opts, topk=3, pool=5, block_q=8)  # strips [0, 8) and [8, 16) see fewer than L keys
    assert_reference(got, q, k, opts, topk=3, pool=5, tol=1e-12 if dtype == torch.float64 else 2e-5)
    out = attnkit.attention(q, k, v, **opts, backend="reference")
    torch.testing.assert_close(got["output"], out, rtol=1e-5, atol=1e-6)


@needs_native
@pytest.mark.parametrize("topk", [native.MAX_TOPK, native.MAX_TOPK + 1], ids=["max_topk", "above"])
def test_native_rows_take_top_k_up_to_max_topk(monkeypatch, topk):
    """fp32 on CPU, the helper reduces the rows for ``topk <= MAX_TOPK``; above it, PyTorch's ``topk`` does."""
    q, k, v = make_qkv(1, 2, 1, 12, 80, 4, dtype=torch.float32)
    calls = []
    original = native.strip_rows
    monkeypatch.setattr(native, "strip_rows", lambda *a, **kw: calls.append(a[2]) or original(*a, **kw))
    got = one_pass(q, k, v, {}, topk=topk, pool=3)
    assert calls == ([topk] if topk <= native.MAX_TOPK else []), calls
    assert_reference(got, q, k, {}, topk=topk, pool=3, tol=2e-5)


# ------------------------------------------------------------------ memory: the default strip height
@pytest.mark.parametrize(
    ("strip_bytes", "Lq", "want"),
    [
        (64 * 40 * 4, 100, 64),  # STRIP_BYTES // (G * Lk * 4) rows
        (64 * 40 * 8, 100, 64),  # fp64: the accumulation dtype's 8 bytes, not the default dtype's 4
        (20 * 40 * 4, 100, 32),  # at least 32 rows
        (2**30, 300, 256),  # at most 256 rows
    ],
    ids=["from_bytes", "fp64_from_bytes", "floor_32", "cap_256"],
)
def test_default_strip_height_follows_strip_bytes(monkeypatch, strip_bytes, Lq, want):
    """Without ``block_q``, a strip holds ``max(32, min(256, STRIP_BYTES // (G * Lk * itemsize)))`` rows."""
    dtype = torch.float64 if strip_bytes == 64 * 40 * 8 else torch.float32
    q, k, v = make_qkv(1, 1, 1, Lq, 40, 2, dtype=dtype)
    monkeypatch.setattr(stats_kernel, "STRIP_BYTES", strip_bytes)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the dispatch mode that watches is thread-local
    try:
        with largest_tensor() as biggest:
            got = one_pass(q, k, v, {}, topk=2, pool=4)
    finally:
        torch.set_num_threads(threads)
    assert biggest[0] == want * 40
    torch.testing.assert_close(got["output"], attnkit.attention(q, k, v), rtol=1e-5, atol=1e-6)


@needs_native
def test_native_strips_of_a_unit_share_one_scores_buffer():
    """Five strips of one unit score into one buffer allocated once, not a strip-sized tensor per strip."""
    q, k, v = make_qkv(1, 2, 1, 40, 40, 4, dtype=torch.float32)
    from torch.utils._python_dispatch import TorchDispatchMode

    fresh = []  # outputs the size of the last (widest) strip's scores sharing storage with no input: allocations

    class Allocations(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            given = [*args, *(kwargs or {}).values()]
            ins = {a.untyped_storage().data_ptr() for a in given if isinstance(a, torch.Tensor)}
            for t in out if isinstance(out, tuple | list) else [out]:
                new = isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in ins
                if new and t.numel() >= 2 * 8 * 40:
                    fresh.append((str(func), tuple(t.shape)))
            return out

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the dispatch mode is thread-local: the unit runs on this thread
    try:
        with Allocations():
            got = one_pass(q, k, v, {"causal": True}, topk=2, pool=4, block_q=8)
    finally:
        torch.set_num_threads(threads)
    assert fresh == [("aten.empty.memory_format", (2 * 8 * 40,))], fresh
    torch.testing.assert_close(got["output"], attnkit.attention(q, k, v, causal=True), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ devices and dtypes
CASES = [
    ("two_pass", {"causal": True, "alibi": True}, torch.float64, 23),
    ("two_pass", {"window": (3, 2), "softcap": 4.0}, torch.float64, 23),
    ("one_pass", {"window": (3, 2), "alibi": True}, torch.float64, 23),
    ("one_pass", {"alibi": True}, torch.float64, 800),  # rows long enough for the top-k screen
    ("one_pass", {"causal": True}, torch.float32, 23),
    ("one_pass_pytorch", {"causal": True}, torch.float32, 23),
]


@pytest.mark.parametrize(
    ("run", "opts", "dtype", "Lk"), CASES, ids=[f"{r}-{'_'.join(o)}-{Lk}" for r, o, _, Lk in CASES]
)
def test_kernels_make_everything_on_q_device_not_torch_default_device(run, opts, dtype, Lk):
    """Under ``with torch.device("meta")``, both passes on CPU tensors compute on the CPU, as without it."""
    q, k, v = make_qkv(2, 2, 1, 21, Lk, 4, dtype=dtype)
    fn = {"two_pass": two_pass, "one_pass": one_pass, "one_pass_pytorch": one_pass}[run]
    kwargs = {"block_q": 8, "block_k": 8} if run == "two_pass" else {"block_q": 8}
    if run == "one_pass_pytorch":
        kwargs["native_rows"] = False
    pool = (torch.tensor([0, 4, 21]), torch.tensor([0, 9, 10, Lk]))
    spec = attnkit.functional.build_spec(q, k, v, **opts)
    _, lse = attnkit.attention(q, k, v, **opts, return_lse=True, backend="reference")
    want = (stats_kernel.stats_forward(q, k, v, spec, lse, topk=3, pool=pool, **kwargs) if fn is two_pass else
            stats_kernel.strip_forward(q, k, v, spec, topk=3, pool=pool, **kwargs))  # fmt: skip
    with torch.device("meta"):
        got = (stats_kernel.stats_forward(q, k, v, spec, lse, topk=3, pool=pool, **kwargs) if fn is two_pass else
               stats_kernel.strip_forward(q, k, v, spec, topk=3, pool=pool, **kwargs))  # fmt: skip
    for name, tensor in want.items():
        assert got[name].device.type == "cpu", name
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0, msg=name)


def test_low_precision_inputs_are_scored_in_the_accumulation_dtype():
    """bf16 ``q`` and ``k``: the statistics pass scores ``q * scale`` in fp32, as for the same values in fp32."""
    q, k, v = make_qkv(1, 2, 2, 30, 30, 8, dtype=torch.bfloat16)
    opts = {"causal": True, "alibi": True}
    spec = attnkit.functional.build_spec(q, k, v, **opts)
    _, lse = attnkit.attention(q.float(), k.float(), v.float(), **opts, return_lse=True, backend="reference")
    edges = pool_segments(4, 30, 30, q.device)
    low = stats_kernel.stats_forward(q, k, v, spec, lse.float(), topk=3, pool=edges)
    high_spec = attnkit.functional.build_spec(q.float(), k.float(), v.float(), **opts)
    high = stats_kernel.stats_forward(q.float(), k.float(), v.float(), high_spec, lse.float(), topk=3, pool=edges)
    for name in NAMES:
        assert low[name].dtype == torch.float32, name
        torch.testing.assert_close(low[name], high[name], rtol=1e-6, atol=1e-7, msg=name)
