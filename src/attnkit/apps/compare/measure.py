"""Measurements: step time, throughput and peak memory (each case in a fresh process), the
gradient reaching each position against its distance from the loss, and the per-layer
complexity of Vaswani et al. 2017, Table 1.

`step_case` is a `attnkit.apps.harness.run_case` target: it builds one model, runs one
training step to allocate the optimizer state, then measures the peak resident memory of one
more step and of one inference forward pass, and the median time of a few steps.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from attnkit.apps.compare.networks import ModelSize, SequenceModel, build_models, count_parameters
from attnkit.apps.compare.tasks import Batch, PairBatch, Task, get_task
from attnkit.apps.compare.train import loss_and_correct

__all__ = ["complexity", "gradient_by_distance", "pick_distances", "ratio", "step_case"]


def complexity(kind: str, n: int, width: int, *, m: int | None = None) -> dict[str, Any]:
    """Per-layer cost of a model kind on a length-``n`` sequence of width ``width``.

    Vaswani et al. 2017, "Attention Is All You Need", Table 1: self-attention costs
    ``O(n^2 d)`` with ``O(1)`` sequential operations and maximum path length ``O(1)``; a
    recurrent layer ``O(n d^2)``, ``O(n)`` and ``O(n)``. Cross-attention from ``m`` target
    positions to ``n`` source positions (not in the table; the same reasoning) costs
    ``O(n m d)``, ``O(1)``, and joins any target position to any source position in one step.
    The decoder-only and encoder-decoder models are self-attention layers here; their
    cross-sequence path is 1 as well.

    Returns the formulas and their values at ``n`` (``flops`` counts multiply-adds of the
    mixing step only: ``n^2 d`` for the scores plus ``n^2 d`` for the weighted sum; ``4 n d^2``
    gates times 2 matrices for an LSTM).
    """
    if kind == "LSTM":
        return {
            "complexity": "O(n·d²)",
            "sequential_ops": "O(n)",
            "max_path": "O(n)",
            "sequential_ops_at_n": n,
            "max_path_at_n": n,
            "mix_madds_at_n": 8 * n * width * width,
        }
    if kind == "cross-attention":
        m = n if m is None else m
        return {
            "complexity": "O(n·m·d)",
            "sequential_ops": "O(1)",
            "max_path": "O(1)",
            "sequential_ops_at_n": 1,
            "max_path_at_n": 1,
            "mix_madds_at_n": 2 * n * m * width,
        }
    return {
        "complexity": "O(n²·d)",
        "sequential_ops": "O(1)",
        "max_path": "O(1)",
        "sequential_ops_at_n": 1,
        "max_path_at_n": 1,
        "mix_madds_at_n": 2 * n * n * width,
    }


def pick_distances(max_distance: int) -> list[int]:
    """Distances at which the gradient is reported: 0, 1, then powers of 4, up to ``max_distance``."""
    out = [0, 1]
    k = 4
    while k <= max_distance:
        out.append(k)
        k *= 4
    if out[-1] != max_distance:
        out.append(max_distance)
    return out


def gradient_by_distance(model: SequenceModel, batch: Batch, *, task: Task) -> dict[str, list[float]]:
    """Mean norm of the gradient reaching each position from the loss, against its distance.

    For each row, the loss is the task's loss at the row's *first* scored position ``q``; the
    gradient with respect to the input embedding ``x_t (W,)`` is taken for every ``t <= q``
    and its norm is averaged over the rows, by distance ``q - t``. Rows do not interact (all
    norms in these models are per position), so one backward pass serves the whole batch.

    Returns ``{"distance": [0 .. max], "grad_norm": [...]}`` (distances no row reaches are left out).
    """
    B, L = batch.loss_mask.shape
    first = batch.loss_mask.float().argmax(dim=1)  # (B,) first scored position of each row
    if not bool(batch.loss_mask[torch.arange(B), first].all()):
        raise ValueError("gradient_by_distance: every row needs at least one scored position")
    was_training = model.training
    model.eval()
    x = model.embed(batch.inputs).detach().requires_grad_(True)  # (B, L, W)
    out = model.head(model.mix(x))  # (B, L, n_outputs)
    rows = torch.arange(B)
    picked = out[rows, first]  # (B, n_outputs)
    want = batch.targets[rows, first]  # (B,)
    if task.kind == "regression":
        loss = ((picked[:, 0] - want) ** 2).sum()
    else:
        loss = nn.functional.cross_entropy(picked, want, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)
    model.train(was_training)
    norms = grad.norm(dim=-1)  # (B, L)
    distance = first[:, None] - torch.arange(L, device=norms.device)[None, :]  # (B, L) q - t
    valid = distance >= 0
    sums = torch.zeros(L, dtype=torch.float64).index_add_(0, distance[valid].cpu(), norms[valid].double().cpu())
    counts = torch.zeros(L, dtype=torch.float64).index_add_(
        0, distance[valid].cpu(), torch.ones(int(valid.sum()), dtype=torch.float64)
    )
    seen = counts > 0
    dist = torch.arange(L)[seen]
    return {"distance": dist.tolist(), "grad_norm": (sums[seen] / counts[seen]).tolist()}


def _train_step(model: nn.Module, task: Task, batch: Batch | PairBatch, opt: torch.optim.Optimizer) -> None:
    loss, _, _ = loss_and_correct(model, task, batch)
    opt.zero_grad(set_to_none=False)
    loss.backward()
    opt.step()


def _tokens(task: Task, batch: Batch | PairBatch, model: nn.Module) -> int:
    """Tokens one step processes: every input position the model reads."""
    if isinstance(batch, PairBatch):
        B, Ls = batch.source.shape[:2]
        Lt = batch.target_inputs.shape[1]
        return B * (Ls + Lt) if model.kind == "encoder-decoder" else B * (Ls + 1 + Lt)
    return batch.loss_mask.numel()


def _lean_malloc() -> bool:
    """Make the process's resident memory follow its live allocations (glibc only).

    Returns the memory freed so far to the system (``malloc_trim``) and stops glibc's dynamic
    mmap threshold from growing, so that every block over 64 KiB is mapped on allocation and
    unmapped on free: a peak of resident memory is then a peak of live memory, not of what the
    allocator kept from earlier steps. Returns False where glibc is not there (the peak then
    counts only memory the process had not held before).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_mmap_threshold = -3  # glibc malloc.h
        return bool(libc.mallopt(m_mmap_threshold, 64 * 1024)) and bool(libc.malloc_trim(0) >= 0)
    except (OSError, AttributeError):
        return False


def step_case(
    *,
    task: str,
    model: str,
    distance: int,
    batch: int,
    width: int,
    heads: int,
    depth: int,
    threads: int,
    seed: int = 0,
    repeat: int = 3,
    max_seconds: float = 30.0,
) -> dict[str, Any]:
    """One throughput/memory case (run in a fresh process by `attnkit.apps.harness.run_case`).

    Returns ``step_s`` (median training step after one warm-up step), ``tokens_per_s``,
    ``train_peak_bytes`` (resident memory one training step adds, optimizer state already
    allocated), ``infer_peak_bytes`` (one forward pass without gradients), the sequence length
    and the parameter count. Memory is read after the timing, with `_lean_malloc`.
    """
    from attnkit.apps.harness import peak_memory, time_fn

    torch.set_num_threads(threads)
    t = get_task(task)
    net = build_models(t, ModelSize(width=width, heads=heads, depth=depth), seed=seed)[model]
    data = t.sample(batch, distance, generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    # time first, with the allocator as users have it; the first step allocates gradients and Adam's moments
    timing = time_fn(lambda: _train_step(net, t, data, opt), warmup=1, repeat=repeat, max_seconds=max_seconds)
    lean = _lean_malloc()  # then make resident memory follow the live tensors

    train_mem = peak_memory(lambda: _train_step(net, t, data, opt))

    def infer() -> None:
        with torch.no_grad():
            loss_and_correct(net, t, data)

    _lean_malloc()
    infer_mem = peak_memory(infer)
    tokens = _tokens(t, data, net)
    return {
        "step_s": timing["median_s"],
        "tokens_per_s": tokens / timing["median_s"],
        "train_peak_bytes": train_mem["peak_bytes"],
        "infer_peak_bytes": infer_mem["peak_bytes"],
        "peak_reset": train_mem["peak_reset"],
        "malloc_trimmed": lean,
        "length": t.length(distance),
        "tokens": tokens,
        "parameters": count_parameters(net),
        "threads": torch.get_num_threads(),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or None when either is missing or ``b`` is 0."""
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b
