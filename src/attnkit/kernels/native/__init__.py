"""A native CPU helper for the one-pass statistics, compiled on first use with the system's C compiler.

`strip_rows` exponentiates a scored strip in place and reduces each row into its log-sum-exp,
entropy, mean distance and top-k, and the strip into its column sums and pooled cells, in one
call (``strip_rows.c``: three passes over each row while it is in cache, vectorised; row ranges
in parallel on PyTorch's thread count, as ctypes releases the GIL during the call). PyTorch's eager operations
need a dozen passes over the strip for the same work; this is what brings `attention_stats`
near the cost of a forward (docs/results/stats.md).

The library is built once per source and machine into ``$ATTNKIT_CACHE`` (default
``~/.cache/attnkit``) with ``$CC`` (default ``cc``) and ``-O3 -march=native``; building
takes about a second. Without a compiler, or with ``ATTNKIT_NATIVE=0``, `available` is False and
`attnkit.kernels.stats` uses PyTorch operations, with the same results to fp32 rounding.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import hashlib
import logging
import os
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("strip_rows.c")
# -fopenmp-simd honours the `omp simd` loops without linking an OpenMP runtime: a second runtime
# beside PyTorch's would spin against it; the rows are spread over threads from Python instead.
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC")
MIN_ROWS_PER_THREAD = 64  # below this a strip runs on the calling thread
MAX_TOPK = 64  # the insertion list is scanned linearly; larger k goes to PyTorch's topk


def _cache_dir() -> Path:
    return Path(os.environ.get("ATTNKIT_CACHE") or Path.home() / ".cache" / "attnkit")


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    """Build (once) and load the shared library; None, with one logged reason, when that fails."""
    if os.environ.get("ATTNKIT_NATIVE", "1") == "0":
        return None
    compiler = os.environ.get("CC", "cc")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join((compiler, *FLAGS)).encode()).hexdigest()[:16]
    target = _cache_dir() / f"strip_rows-{key}.so"
    try:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                built = Path(tmp) / target.name
                subprocess.run(
                    [compiler, *FLAGS, str(SOURCE), "-o", str(built), "-lm"],
                    check=True, capture_output=True, timeout=120,
                )  # fmt: skip
                os.replace(built, target)  # atomic: concurrent processes never load a partial file
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as err:
        detail = getattr(err, "stderr", b"") or b""
        log.warning("attnkit: native statistics helper unavailable (%s %s); using PyTorch operations", err,
                    detail.decode(errors="replace")[:500])  # fmt: skip
        return None
    fn = lib.strip_rows_f32
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [
        ptr,
        i64,
        i64,
        i64,
        i64,
        i64,
        ptr,
        ptr,
        i64,
        ptr,
        ptr,
        ptr,
        ptr,
        ptr,
        ptr,
        ptr,
        i64,
        ptr,
        i64,
        ptr,
        ptr,
        ptr,
    ]
    fn.restype = ctypes.c_int
    return lib


def available() -> bool:
    """True when the native helper is built and loaded (built on the first call)."""
    return _library() is not None


def usable(s: Tensor, k: int) -> bool:
    """True when `strip_rows` can take this strip: fp32, CPU, contiguous, ``k <= MAX_TOPK``, helper built."""
    return s.dtype == torch.float32 and s.device.type == "cpu" and s.is_contiguous() and k <= MAX_TOPK and available()


def strip_rows(
    s: Tensor,
    row_pos0: int,
    k: int,
    row_segment: Tensor,
    nr: int,
    key_edges: Tensor,
    key_range: tuple[Tensor, Tensor] | None = None,
    sums: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Exponentiate a scored strip in place and reduce it (see ``strip_rows.c``).

    Args:
        s: ``(G, bq, W)`` fp32 contiguous scores of ``bq`` query rows of ``G`` heads against ``W``
            consecutive keys, ``-inf`` where masked. Overwritten by ``e = exp(s - max)``, the
            weights times each row's normaliser: ``p = e * scale``.
        row_pos0: aligned position of the strip's first query row, counted from the first key.
        k: top-k size, ``0 <= k <= min(W, MAX_TOPK)``.
        row_segment: ``(bq,)`` int64 contiguous CPU: the pooled-map row of each query row, in ``[0, nr)``.
        nr: number of query segments the strip's rows fall in.
        key_edges: ``(nc + 1,)`` int64 contiguous CPU: strip-local key segment edges,
            ``0 = e_0 < ... < e_nc = W``.
        key_range: ``(lo, hi)``, each ``(bq,)`` int64: row ``i`` sees the strip's keys
            ``[lo[i], hi[i])`` (causal/window, ``0 <= lo <= hi <= W``); the others count as masked
            whatever ``s`` holds there. None: every key.
        sums: False skips the column sums and cells (returned as None) and leaves the weights
            ``p`` themselves in ``s`` (``scale`` is then 1), for a caller that sums them (a query
            segment per row: the bands would be the strip).

    Returns:
        ``lse, scale, entropy, mean_distance (G, bq)`` (``scale``: 0 for a row with no allowed key),
        ``top_w (G, bq, k)``, ``top_i (G, bq, k)``
        (int64, key index relative to the strip's first key), ``colsum (G, W)`` (``sum_i p_ij``)
        and ``cells (G, nr, nc)`` (``p`` summed over each query segment x key segment block), or
        None for both without ``sums``.

    Raises:
        ValueError: when the helper rejects an argument (a segment or edge out of range).
    """
    G, bq, W = s.shape
    R, nc, dev = G * bq, key_edges.numel() - 1, s.device
    if row_segment.shape != (bq,):
        raise ValueError(f"row_segment: expected shape ({bq},), got {tuple(row_segment.shape)}")
    row_segment = row_segment.to(device=dev, dtype=torch.int64).contiguous()  # no copy when already so
    if key_range is None:
        key_range = (
            torch.zeros(bq, dtype=torch.int64, device=dev),
            torch.full((bq,), W, dtype=torch.int64, device=dev),
        )
    key_lo, key_hi = (t.to(device=dev, dtype=torch.int64).contiguous() for t in key_range)
    if key_lo.shape != (bq,) or key_hi.shape != (bq,):
        raise ValueError(f"key_range: expected two ({bq},) tensors, got {tuple(key_lo.shape)}, {tuple(key_hi.shape)}")
    key_edges = key_edges.to(device=dev, dtype=torch.int64).contiguous()
    # on s's device (the CPU), never torch's default device: the C helper writes through these pointers
    rowwise = torch.empty(4, G, bq, dtype=torch.float32, device=dev)  # lse, scale, entropy, distance
    top_w = torch.empty(G, bq, k, dtype=torch.float32, device=dev)
    top_i = torch.empty(G, bq, k, dtype=torch.int64, device=dev)
    threads = max(1, min(torch.get_num_threads(), R // MIN_ROWS_PER_THREAD))
    # each thread sums into buffers of its own (zeros outside the strips its rows touch), added after
    new = torch.empty if threads == 1 else torch.zeros
    if sums:
        band = torch.empty(threads, G, nr, W if nc < W else 0, dtype=torch.float32, device=dev)  # nc = W: the cells
        colsum = new(threads, G, W, dtype=torch.float32, device=dev)
        cells = new(threads, G, nr, nc, dtype=torch.float32, device=dev)
    else:
        band = torch.empty(threads, W, dtype=torch.float32, device=dev)  # a scratch row per thread
        colsum = cells = None
    fn = _library().strip_rows_f32
    head = (W, bq, row_pos0, key_lo.data_ptr(), key_hi.data_ptr(), k)
    pointers = (*(row.data_ptr() for row in rowwise), top_w.data_ptr(), top_i.data_ptr(), row_segment.data_ptr(), nr,
                key_edges.data_ptr(), nc)  # fmt: skip

    def rows(t: int, r0: int, r1: int) -> int:
        sinks = (colsum[t].data_ptr(), cells[t].data_ptr()) if sums else (None, None)
        return fn(s.data_ptr(), r0, r1, *head, *pointers, band[t].data_ptr(), *sinks)

    if threads == 1:
        codes = [rows(0, 0, R)]
    else:
        edges = [R * t // threads for t in range(threads + 1)]
        codes = list(_pool(threads).map(rows, range(threads), edges[:-1], edges[1:]))
    if any(codes):
        raise ValueError(
            f"strip_rows: arguments out of range (W={W}, k={k}, nr={nr}, row_segment={row_segment.tolist()}, "
            f"key_edges={key_edges.tolist()}, key_range={key_lo.tolist()}, {key_hi.tolist()})"
        )
    if sums:
        colsum, cells = (colsum[0], cells[0]) if threads == 1 else (colsum.sum(0), cells.sum(0))
    return rowwise[0], rowwise[1], rowwise[2], rowwise[3], top_w, top_i, colsum, cells


@functools.lru_cache(maxsize=4)
def _pool(threads: int) -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="attnkit-rows")
