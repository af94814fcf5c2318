"""The native statistics helper's build, cache, eligibility and ctypes call (`attnkit.kernels.native`).

`tests/test_stats_native.py` holds the helper's numbers against fp64 through the statistics pass;
this file holds the Python side to its documented contract: where the library is cached, which
strips `usable` accepts, the argument checks and conversions of `strip_rows`, and the split of a
strip's rows over threads.
"""

from __future__ import annotations

import itertools
import os
import shutil

import pytest
import torch

from attnkit.kernels import native

needs_native = pytest.mark.skipif(not native.available(), reason="no C compiler: the native helper is not built")
OUTPUTS = ("lse", "scale", "entropy", "distance", "top_w", "top_i", "colsum", "cells")


def test_the_cache_is_attnkit_cache_else_dot_cache_attnkit_under_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # Path.home() reads $HOME on POSIX
    monkeypatch.delenv("ATTNKIT_CACHE", raising=False)
    assert native._cache_dir() == tmp_path / ".cache" / "attnkit"
    monkeypatch.setenv("ATTNKIT_CACHE", "")  # set but empty: the default too
    assert native._cache_dir() == tmp_path / ".cache" / "attnkit"
    monkeypatch.setenv("ATTNKIT_CACHE", str(tmp_path / "elsewhere"))
    assert native._cache_dir() == tmp_path / "elsewhere"


@pytest.mark.skipif(not shutil.which(os.environ.get("CC", "cc")), reason="no C compiler on PATH")
def test_with_a_compiler_the_helper_is_available(monkeypatch):
    """`available` is True once the library is built and loaded (the other tests skip when it is not)."""
    monkeypatch.delenv("ATTNKIT_NATIVE", raising=False)
    native._library.cache_clear()
    try:
        assert native._library() is not None
        assert native.available() is True
    finally:
        native._library.cache_clear()


@needs_native
def test_the_library_is_built_into_the_default_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("ATTNKIT_CACHE", raising=False)
    native._library.cache_clear()
    try:
        assert native.available()
        built = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.so"))
        assert len(built) == 1 and built[0].startswith(".cache/attnkit/strip_rows-"), built
    finally:
        native._library.cache_clear()


@needs_native
@pytest.mark.parametrize(
    ("case", "want"),
    [
        ("fp32", True),
        ("k_at_limit", True),
        ("k_past_limit", False),
        ("fp64", False),
        ("fp16", False),
        ("not_contiguous", False),
        ("meta", False),
    ],
)
def test_usable_takes_exactly_fp32_contiguous_cpu_strips_up_to_max_topk(case, want):
    s, k = torch.zeros(2, 3, 80), 4
    if case == "k_at_limit":
        k = native.MAX_TOPK
    elif case == "k_past_limit":
        k = native.MAX_TOPK + 1
    elif case in ("fp64", "fp16"):
        s = s.to(getattr(torch, {"fp64": "float64", "fp16": "float16"}[case]))
    elif case == "not_contiguous":
        s = torch.zeros(2, 80, 3).transpose(1, 2)
    elif case == "meta":
        s = torch.zeros(2, 3, 80, device="meta")
    assert native.usable(s, k) is want


def _strip(G=2, bq=5, W=40, seed=0):
    torch.manual_seed(seed)
    return torch.randn(G, bq, W) * 3


@needs_native
def test_shape_errors_name_the_argument_the_expected_and_the_received():
    s, edges = _strip(), torch.tensor([0, 20, 40])
    with pytest.raises(ValueError) as err:
        native.strip_rows(s.clone(), 0, 2, torch.zeros(4, dtype=torch.int64), 1, edges)
    assert str(err.value) == "row_segment: expected shape (5,), got (4,)"
    rows = torch.zeros(5, dtype=torch.int64)
    good, short = torch.zeros(5, dtype=torch.int64), torch.zeros(3, dtype=torch.int64)
    for lo, hi, got in [(short, good + 40, "(3,), (5,)"), (good, short, "(5,), (3,)"), (short, short, "(3,), (3,)")]:
        with pytest.raises(ValueError) as err:
            native.strip_rows(s.clone(), 0, 2, rows, 1, edges, (lo, hi))
        assert str(err.value) == f"key_range: expected two (5,) tensors, got {got}", got
    with pytest.raises(ValueError) as err:  # the helper's own check: segment 1 of nr = 1
        native.strip_rows(s.clone(), 0, 2, torch.tensor([0, 0, 1, 0, 0]), 1, edges, (good, good + 40))
    assert str(err.value) == (
        "strip_rows: arguments out of range (W=40, k=2, nr=1, row_segment=[0, 0, 1, 0, 0], key_edges=[0, 20, 40], "
        "key_range=[0, 0, 0, 0, 0], [40, 40, 40, 40, 40])"
    )


@needs_native
@pytest.mark.parametrize("sums", [True, False])
def test_index_arguments_of_any_integer_dtype_and_layout_give_the_int64_results(sums):
    """``row_segment``, ``key_range`` and ``key_edges`` are converted to contiguous int64 before the call."""
    s = _strip(W=40)
    rows, edges = torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 7, 39, 40])
    lo, hi = torch.tensor([0, 3, 0, 10, 2]), torch.tensor([40, 30, 1, 10, 39])
    want = native.strip_rows(s.clone(), 3, 4, rows, 2, edges, (lo, hi), sums=sums)

    def strided(t, dtype):  # every other element of a tensor twice as long: not contiguous
        return torch.stack([t.to(dtype), t.to(dtype)], dim=1)[:, 0]

    for dtype in (torch.int64, torch.int32, torch.int16):
        args = strided(rows, dtype), strided(edges, dtype), (strided(lo, dtype), strided(hi, dtype))
        assert not args[0].is_contiguous()
        got = native.strip_rows(s.clone(), 3, 4, args[0], 2, args[1], args[2], sums=sums)
        for name, a, b in zip(OUTPUTS, got, want, strict=True):
            if b is None:
                assert a is None, name
            else:
                assert a.dtype == b.dtype and torch.equal(a, b), (name, dtype)


@needs_native
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: index tensors on another device than the strip")
def test_index_tensors_on_another_device_are_copied_to_the_strip_device():
    s, rows, edges = _strip(), torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 20, 40])
    lo, hi = torch.tensor([0, 2, 4, 6, 8]), torch.tensor([40, 30, 20, 10, 9])
    want = native.strip_rows(s.clone(), 0, 3, rows, 2, edges, (lo, hi))
    got = native.strip_rows(s.clone(), 0, 3, rows.cuda(), 2, edges.cuda(), (lo.cuda(), hi.cuda()))
    for name, a, b in zip(OUTPUTS, got, want, strict=True):
        assert a.device.type == "cpu" and torch.equal(a, b), name


@needs_native
def test_without_key_range_every_key_is_seen():
    """``key_range=None`` is ``[0, W)`` for every row: the same as passing it."""
    s, rows, edges = _strip(bq=6, W=50), torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 25, 49, 50])
    full = (torch.zeros(6, dtype=torch.int64), torch.full((6,), 50))
    got = native.strip_rows(s.clone(), 0, 3, rows, 3, edges)
    want = native.strip_rows(s.clone(), 0, 3, rows, 3, edges, full)
    for name, a, b in zip(OUTPUTS, got, want, strict=True):
        assert torch.equal(a, b), name
    p = torch.softmax(s.double(), dim=-1)
    torch.testing.assert_close(got[0].double(), torch.logsumexp(s.double(), dim=-1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[6].double(), p.sum(1), rtol=1e-5, atol=1e-6)


@needs_native
def test_outputs_are_made_on_the_strip_device_under_a_meta_default_device():
    """Every buffer the C helper writes through is made on the strip's device (the CPU), never torch's default."""
    s, rows, edges = _strip(), torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 20, 40])
    want = native.strip_rows(s.clone(), 0, 3, rows, 2, edges)
    with torch.device("meta"):
        got = native.strip_rows(s.clone(), 0, 3, rows, 2, edges)
        scratch = native.strip_rows(s.clone(), 0, 3, rows, 2, edges, sums=False)
    for name, a, b in zip(OUTPUTS, got, want, strict=True):
        assert a.device.type == "cpu" and torch.equal(a, b), name
    assert all(t.device.type == "cpu" for t in scratch[:6])


@needs_native
def test_outputs_are_fp32_and_int64_whatever_torch_default_dtype():
    """The helper writes fp32 and int64 through raw pointers: buffers made in torch's default dtype
    (fp64 here) would be read back wrong."""
    s, rows, edges = _strip(), torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 20, 39, 40])
    want = native.strip_rows(s.clone(), 0, 3, rows, 2, edges)
    want_scratch = native.strip_rows(s.clone(), 0, 3, rows, 2, edges, sums=False)
    before = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        got = native.strip_rows(s.clone(), 0, 3, rows, 2, edges)
        scratch = native.strip_rows(s.clone(), 0, 3, rows, 2, edges, sums=False)
    finally:
        torch.set_default_dtype(before)
    for name, a, b in zip(OUTPUTS, got, want, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    for name, a, b in zip(OUTPUTS[:6], scratch[:6], want_scratch[:6], strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name


def _reference(s, row_pos0, k, rows, nr, edges):
    """fp64 softmax rows of a strip and their reductions, by their definitions in ``strip_rows``."""
    p = torch.softmax(s.double(), dim=-1).nan_to_num(0.0)  # (G, bq, W)
    _, bq, W = s.shape
    pos = (torch.arange(bq, dtype=torch.float64)[:, None] + row_pos0 - torch.arange(W)).abs()
    bands = torch.stack([p[:, rows == r].sum(1) for r in range(nr)], dim=1)  # (G, nr, W)
    cells = torch.stack([bands[..., a:b].sum(-1) for a, b in itertools.pairwise(edges.tolist())], dim=-1)
    return {
        "lse": torch.logsumexp(s.double(), dim=-1),
        "entropy": -torch.special.xlogy(p, p).sum(-1),
        "distance": (p * pos).sum(-1),
        "top_w": p.topk(k, dim=-1).values,
        "colsum": p.sum(1),
        "cells": cells,
    }


@needs_native
@pytest.mark.parametrize("threads", [1, 2, 3, 4])
def test_rows_split_over_threads_give_the_fp64_reductions(threads):
    """``G * bq = 3 * 70 = 210`` rows: 1 to 3 threads of at least 64 rows (4 asked gives 3); the
    per-thread sums start from zero and add up to the whole strip's."""
    G, bq, W = 3, 70, 33
    torch.manual_seed(threads)
    s = torch.randn(G, bq, W) * 2
    s[1, 5] = -torch.inf  # a row with no allowed key
    rows = torch.arange(bq) * 4 // bq  # 4 query segments
    edges = torch.tensor([0, 1, 16, 32, 33])
    want = _reference(s, 2, 3, rows, 4, edges)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for _ in range(2):  # freed buffers of the same size are reused: stale sums would show
            junk = torch.full((3, G, 4 * W + W), float("nan"))
            del junk
            strip = s.clone()
            lse, scale, ent, dist, w, _, colsum, cells = native.strip_rows(strip, 2, 3, rows, 4, edges)
            scratch = s.clone()
            lse2, scale2, *_ = native.strip_rows(scratch, 2, 3, rows, 4, edges, sums=False)
    finally:
        torch.set_num_threads(before)
    got = {"lse": lse, "entropy": ent, "distance": dist, "top_w": w, "colsum": colsum, "cells": cells}
    for name, t in got.items():
        torch.testing.assert_close(t.double(), want[name], rtol=1e-5, atol=1e-5, msg=name)
    p = torch.softmax(s.double(), dim=-1).nan_to_num(0.0)
    torch.testing.assert_close((strip * scale[..., None]).double(), p, rtol=3e-6, atol=1e-7)
    torch.testing.assert_close(scratch.double(), p, rtol=3e-6, atol=1e-7)  # without sums: the weights
    assert torch.equal(lse2, lse) and torch.equal(scale2, (scale > 0).float())  # 1, and 0 for the row without keys
