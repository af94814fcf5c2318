"""A native CPU helper for the one-pass statistics, compiled on first use with the system's C compiler.

`strip_rows` normalises a scored strip in place and reduces each row into its log-sum-exp,
entropy, mean distance and top-k in one call (``strip_rows.c``: three passes over each row
while it is in cache, vectorised; row ranges in parallel on PyTorch's
thread count, as ctypes releases the GIL during the call). PyTorch's eager operations
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
    fn.argtypes = [ptr, i64, i64, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr]
    fn.restype = None
    return lib


def available() -> bool:
    """True when the native helper is built and loaded (built on the first call)."""
    return _library() is not None


def usable(s: Tensor, k: int) -> bool:
    """True when `strip_rows` can take this strip: fp32, CPU, contiguous, ``k <= MAX_TOPK``, helper built."""
    return s.dtype == torch.float32 and s.device.type == "cpu" and s.is_contiguous() and k <= MAX_TOPK and available()


def strip_rows(s: Tensor, row_pos0: int, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Normalise a scored strip in place and reduce each row (see ``strip_rows.c``).

    Args:
        s: ``(G, bq, W)`` fp32 contiguous scores of ``bq`` query rows of ``G`` heads against ``W``
            consecutive keys, ``-inf`` where masked. Overwritten by the weights ``p``.
        row_pos0: aligned position of the strip's first query row, counted from the first key.
        k: top-k size, ``0 <= k <= min(W, MAX_TOPK)``.

    Returns:
        ``lse, entropy, mean_distance (G, bq)`` and ``top_w (G, bq, k)``, ``top_i (G, bq, k)``
        (int64, key index relative to the strip's first key).
    """
    G, bq, W = s.shape
    R = G * bq
    # on s's device (the CPU), never torch's default device: the C helper writes through these pointers
    lse, entropy, distance = (torch.empty(G, bq, dtype=torch.float32, device=s.device) for _ in range(3))
    top_w = torch.empty(G, bq, k, dtype=torch.float32, device=s.device)
    top_i = torch.empty(G, bq, k, dtype=torch.int64, device=s.device)
    fn = _library().strip_rows_f32
    pointers = (lse.data_ptr(), entropy.data_ptr(), distance.data_ptr(), top_w.data_ptr(), top_i.data_ptr())

    def rows(r0: int, r1: int) -> None:
        fn(s.data_ptr(), r0, r1, W, bq, row_pos0, k, *pointers)

    threads = min(torch.get_num_threads(), R // MIN_ROWS_PER_THREAD)
    if threads <= 1:
        rows(0, R)
    else:
        edges = [R * t // threads for t in range(threads + 1)]
        list(_pool(threads).map(rows, edges[:-1], edges[1:]))
    return lse, entropy, distance, top_w, top_i


@functools.lru_cache(maxsize=4)
def _pool(threads: int) -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="attnkit-rows")
