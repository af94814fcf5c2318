"""``attnkit bench triton``: the Triton kernels against PyTorch's on one GPU, in one run.

One command on a CUDA machine (``python -m attnkit.apps.bench.triton_gpu --out docs/results/``)
measures, in bf16 with ``B x N = 16K`` tokens and ``H = 2048 / D`` heads (the
FlashAttention-2 paper's benchmark setting, Dao 2023, section 4.1):

* forward, backward and forward+backward TFLOP/s for head dims 64 and 128, ``N`` from
  512 to 16K, causal and not, for attnkit's ``triton`` backend, PyTorch SDPA with each
  of its backends (flash, cuDNN, memory-efficient; each tried, the reason recorded when
  one is unavailable) and FlexAttention (``torch.compile``-d);
* the cost of ALiBi, a window and softcap against plain causal attention, and the time
  of the statistics pass (`attnkit.kernels.triton.stats`) against the forward.

FLOPs are counted as FlashAttention's benchmarks count them (`attention_flops`): forward
``4 B H N^2 D`` (two matmuls of ``2 N^2 D`` each), halved for causal; backward 2.5x the
forward (five matmuls instead of two). Times are medians of ``triton.testing.do_bench``.
Results: ``triton_gpu_<card>.json`` and ``.md`` under ``--out``, with the card, the
versions and the command. Targets (issue 7; H100, bf16, D = 128, N >= 4K): forward
>= 1.0x SDPA flash, backward >= 0.8x, ALiBi/window/softcap cost <= 10%, statistics
pass <= 1.5x the forward; the Markdown states each as met or not from the measured rows.

``--quick`` is the prepared first check of issue 17 instead (under five minutes on one
H100/H200): see the ``--quick`` section below and ``docs/triton.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from attnkit.apps.checks import (
    DefaultsHelpFormatter,
    UsageError,
    check_output_dir,
    int_at_least,
    main_for,
    positive_float,
)

NAME = "triton"
HELP = "Triton kernels vs PyTorch SDPA (flash, cuDNN, efficient) and FlexAttention on a GPU: TFLOP/s"

PROVIDERS = ("attnkit-triton", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "flex")
MODES = ("fwd", "bwd", "fwd+bwd")
FEATURES = ("plain", "alibi", "window", "softcap", "stats")
HIDDEN = 2048  # H = HIDDEN / D heads, as in FlashAttention's benchmarks
TOKENS = 16 * 1024  # B x N
SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
HEAD_DIMS = (64, 128)
QUICK_BUDGET = 240.0  # seconds of measuring in --quick (the compiles and the writing fit in the rest of 5 min)


# ------------------------------------------------------------------ the counting
def attention_flops(
    batch: int, heads: int, q_len: int, kv_len: int, head_dim: int, *, causal: bool, mode: str
) -> float:
    """FLOPs of one attention call, FlashAttention's convention.

    Forward: ``q k^T`` and ``p v`` are ``2 Lq Lk D`` each per head, so ``4 B H Lq Lk D``;
    causal computes half of it. Backward: five matmuls (``dV``, ``dP``, ``dQ``, ``dK`` and
    the recomputed ``q k^T``), counted as 2.5x the forward. ``mode``: fwd, bwd or fwd+bwd.
    """
    forward = 4.0 * batch * heads * q_len * kv_len * head_dim
    if causal:
        forward /= 2
    factor = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
    if mode not in factor:
        raise ValueError(f"attention_flops: mode must be one of {sorted(factor)}, got {mode!r}")
    return forward * factor[mode]


def tflops(flops: float, seconds: float | None) -> float | None:
    """Throughput in TFLOP/s (None when there is no time)."""
    return None if not seconds else flops / seconds / 1e12


def cases(head_dims=HEAD_DIMS, seqlens=SEQLENS, *, tokens: int = TOKENS, hidden: int = HIDDEN) -> list[dict[str, Any]]:
    """The throughput cases: every head dim x length x causal, ``B = tokens / N``, ``H = hidden / D``."""
    out = []
    for D in head_dims:
        for N in seqlens:
            if tokens % N or hidden % D:
                raise ValueError(f"cases: N={N} must divide tokens={tokens} and D={D} must divide hidden={hidden}")
            for causal in (False, True):
                out.append({"D": D, "N": N, "B": tokens // N, "H": hidden // D, "causal": causal})
    return out


def plan_order(case_provider: tuple[dict[str, Any], str]) -> tuple:
    """The order cases run in, so that ``--budget`` cuts the least important ones.

    FlexAttention comes last: ``torch.compile`` recompiles it for every shape (tens of
    seconds each). Before it, D = 128 and the longest N first, as the targets concern
    D = 128, N >= 4K.
    """
    case, provider = case_provider
    return (provider == "flex", case["D"] != 128, -case["N"], case["causal"], PROVIDERS.index(provider))


def card_slug(name: str) -> str:
    """A file-name-safe form of the GPU's name: ``NVIDIA H100 80GB HBM3`` -> ``NVIDIA_H100_80GB_HBM3``."""
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") or "unknown_gpu"


# ------------------------------------------------------------------- the targets
def _row(rows, **match) -> dict[str, Any] | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def target_notes(rows: list[dict[str, Any]], feature_rows: list[dict[str, Any]], *, head_dim: int = 128) -> list[str]:
    """The issue's targets, judged from the measured rows (``D = head_dim``, ``N >= 4096``)."""
    notes = []
    for mode, need in (("fwd", 1.0), ("bwd", 0.8)):
        ratios = []
        for r in rows:
            if r["provider"] != "attnkit-triton" or r["D"] != head_dim or r["N"] < 4096:
                continue
            ref = _row(rows, provider="sdpa-flash", D=r["D"], N=r["N"], causal=r["causal"])
            if ref and r.get(f"{mode}_ms") and ref.get(f"{mode}_ms"):
                ratios.append(ref[f"{mode}_ms"] / r[f"{mode}_ms"])  # > 1: attnkit faster
        if ratios:
            worst = min(ratios)
            verdict = "met" if worst >= need else "NOT met"
            notes.append(
                f"Target {mode} >= {need}x SDPA flash (D={head_dim}, N >= 4K): worst {worst:.2f}x over "
                f"{len(ratios)} cases, {verdict}."
            )
        else:
            notes.append(f"Target {mode} >= {need}x SDPA flash: not measured (no attnkit-triton/sdpa-flash pair).")
    plain = _row(feature_rows, feature="plain")
    for feat in ("alibi", "window", "softcap"):
        r = _row(feature_rows, feature=feat)
        if plain and r and plain.get("fwd_ms") and r.get("fwd_ms"):
            costs = [r[f"{m}_ms"] / plain[f"{m}_ms"] - 1 for m in ("fwd", "fwd+bwd") if r.get(f"{m}_ms")]
            worst = max(costs)
            verdict = "met" if worst <= 0.10 else "NOT met"
            notes.append(f"Target {feat} cost <= 10%: {100 * worst:+.1f}% (worst of fwd, fwd+bwd), {verdict}.")
        else:
            notes.append(f"Target {feat} cost <= 10%: not measured.")
    stats = _row(feature_rows, feature="stats")
    if plain and stats and plain.get("fwd_ms") and stats.get("fwd_ms"):
        ratio = stats["fwd_ms"] / plain["fwd_ms"]
        notes.append(f"Target statistics pass <= 1.5x forward: {ratio:.2f}x, {'met' if ratio <= 1.5 else 'NOT met'}.")
    else:
        notes.append("Target statistics pass <= 1.5x forward: not measured.")
    return notes


def feature_lines(feature_rows: list[dict[str, Any]]) -> list[str]:
    """One line per feature-cost row: times and the cost against plain causal attention."""
    if not feature_rows:
        return ["Feature costs: not measured (time budget spent)."]
    plain = _row(feature_rows, feature="plain") or {}
    lines = []
    for r in feature_rows:
        where = f"D={r['D']}, N={r['N']}, B={r['B']}, H={r['H']}, causal"
        if "error" in r:
            lines.append(f"Feature {r['feature']} ({where}): failed: {r['error']}")
            continue
        parts = []
        for mode in ("fwd", "fwd+bwd"):
            ms, base = r.get(f"{mode}_ms"), plain.get(f"{mode}_ms")
            if ms is None:
                continue
            vs = f" ({100 * (ms / base - 1):+.1f}% vs plain)" if base and r["feature"] not in ("plain", "stats") else ""
            parts.append(f"{mode} {ms:.3f} ms{vs}")
        if r["feature"] == "stats" and plain.get("fwd_ms") and r.get("fwd_ms"):
            parts.append(f"{r['fwd_ms'] / plain['fwd_ms']:.2f}x the forward")
        lines.append(f"Feature {r['feature']} ({where}): " + ", ".join(parts))
    return lines


# ------------------------------------------------------------------ on the GPU
def _bench_ms(fn: Callable[[], Any]) -> float:
    """Median milliseconds of ``fn`` (Triton's do_bench: warm-up, L2 flush between runs)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _provider_fn(provider: str, q, k, v, *, causal: bool) -> tuple[Callable[[], Any], Any]:
    """``(forward, context)``: a zero-argument forward for ``provider`` and the context to run it in."""
    import torch.nn.functional as F

    import attnkit

    if provider == "attnkit-triton":
        return (lambda: attnkit.attention(q, k, v, causal=causal, backend="triton")), contextlib.nullcontext()
    if provider.startswith("sdpa-"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = {
            "sdpa-flash": SDPBackend.FLASH_ATTENTION,
            "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
            "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
        }[provider]
        return (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)), sdpa_kernel(backend)
    if provider == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        compiled = _compiled_flex(flex_attention)
        block_mask = None
        if causal:
            N = q.shape[-2]
            block_mask = create_block_mask(lambda b, h, i, j: i >= j, None, None, N, N, device=q.device)
        return (lambda: compiled(q, k, v, block_mask=block_mask)), contextlib.nullcontext()
    raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")


_FLEX = {}


def _compiled_flex(flex_attention):
    import torch

    if "fn" not in _FLEX:
        # One compiled graph per shape: lift dynamo's recompile limit (8 by default) above the case count.
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 256)
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


def _measure(forward: Callable[[], Any], context, q, k, v, *, modes=MODES) -> dict[str, float]:
    """Forward, backward and forward+backward times in ms (backward alone: gradients of a kept graph)."""
    import torch

    result = {}
    with context:
        with torch.no_grad():
            if "fwd" in modes:
                result["fwd_ms"] = _bench_ms(forward)
        if "bwd" in modes or "fwd+bwd" in modes:
            out = forward()
            out = out[0] if isinstance(out, tuple) else out
            dout = torch.randn_like(out)
            if "bwd" in modes:
                result["bwd_ms"] = _bench_ms(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True))

            def step():
                o = forward()
                o = o[0] if isinstance(o, tuple) else o
                torch.autograd.grad(o, (q, k, v), dout)

            if "fwd+bwd" in modes:
                result["fwd+bwd_ms"] = _bench_ms(step)
    return result


def _inputs(case: dict[str, Any], dtype):
    import torch

    shape = (case["B"], case["H"], case["N"], case["D"])  # (B, H, N, D)
    return [torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3)]


def _throughput_row(case: dict[str, Any], provider: str, dtype, modes=MODES) -> dict[str, Any]:
    import torch

    row = {"provider": provider, **case}
    try:
        q, k, v = _inputs(case, dtype)
        forward, context = _provider_fn(provider, q, k, v, causal=case["causal"])
        times = _measure(forward, context, q, k, v, modes=modes)
    except Exception as exc:  # each provider may be unavailable on this card/build: record why
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        torch.cuda.empty_cache()
        return row
    row.update(times)
    for mode in modes:
        flops = attention_flops(case["B"], case["H"], case["N"], case["N"], case["D"], causal=case["causal"], mode=mode)
        row[f"{mode}_tflops"] = tflops(flops, times.get(f"{mode}_ms", 0) / 1e3)
    return row


def _feature_rows(dtype, *, N: int, D: int) -> list[dict[str, Any]]:
    """Plain causal vs ALiBi / window / softcap (same work: the window spans every key) and the statistics pass."""
    import torch

    import attnkit
    from attnkit.functional import build_spec
    from attnkit.kernels.triton.stats import stats_forward

    case = {"D": D, "N": N, "B": TOKENS // N, "H": HIDDEN // D, "causal": True}
    q, k, v = _inputs(case, dtype)
    slopes = attnkit.alibi_slopes(case["H"]).to("cuda")
    options = {
        "plain": {},
        "alibi": {"alibi": slopes},
        "window": {"window": (N, 0)},  # masks nothing beyond causal: the cost of the window code path itself
        "softcap": {"softcap": 30.0},
    }
    rows = []
    for feature, opts in options.items():
        row = {"feature": feature, **case}
        try:

            def forward(opts=opts):
                return attnkit.attention(q, k, v, causal=True, backend="triton", **opts)

            row.update(_measure(forward, contextlib.nullcontext(), q, k, v, modes=("fwd", "fwd+bwd")))
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        rows.append(row)
    row = {"feature": "stats", **case}
    try:
        spec = build_spec(q, k, v, causal=True)
        _, lse = attnkit.attention(q, k, v, causal=True, backend="triton", return_lse=True)
        with torch.no_grad():
            row["fwd_ms"] = _bench_ms(lambda: stats_forward(q, k, v, spec, lse, topk=8, pool=64))
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    rows.append(row)
    return rows


# ------------------------------------------------------------------ --quick: the prepared check
# ``--quick`` (under five minutes on one H100/H200, most of it the autotuner compiling) measures
# what issue 17 asks of a first GPU run and writes ``triton_quick_<card>.json`` and ``.md``:
# forward and backward TFLOP/s against SDPA-flash (bf16, D = 128 N = 8192 and D = 64 N = 4096,
# causal and not), the largest difference of the output and gradients from SDPA-flash's, the
# backward's split per kernel (torch.profiler), the cost of softcap, ALiBi and a window on the
# causal forward at D = 128 N = 8192, the autotuner's chosen configs and the registers, spills
# and shared memory of every compiled variant. The pure parts (the plan, `quick_report`) are
# tested on the CPU.
QUICK_CASES = tuple(
    {"D": D, "N": N, "B": 16384 // N, "H": 2048 // D, "causal": causal}
    for D, N in ((128, 8192), (64, 4096))
    for causal in (False, True)
)
QUICK_PROVIDERS = ("attnkit-triton", "sdpa-flash")
QUICK_FEATURES = ("plain", "softcap", "alibi", "window")
BACKWARD_KERNELS = ("_prep_kernel", "_dkdv_kernel", "_dq_kernel")


# ----------------------------------------------------------------- pure: the report
def quick_report(
    throughput: list[dict[str, Any]],
    errors: list[dict[str, Any]],
    split: list[dict[str, Any]],
    features: list[dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[tuple[str, str]], list[str]]:
    """Rows, columns and notes of the quick check's Markdown, from its measurements.

    ``throughput``: rows of ``provider, D, N, B, H, causal, fwd_ms, bwd_ms, fwd_tflops, bwd_tflops``;
    ``errors``: ``D, N, causal, out, dq, dk, dv`` (max abs difference from SDPA-flash);
    ``split``: ``D, N, causal, kernel, ms``; ``features``: ``feature, fwd_ms`` (causal, D = 128).
    """
    rows = []
    for r in throughput:
        if r["provider"] != "attnkit-triton":
            continue
        same = lambda s, r=r: all(s[k] == r[k] for k in ("D", "N", "causal"))
        ref = next((s for s in throughput if s["provider"] == "sdpa-flash" and same(s)), {})
        row = {k: r.get(k) for k in ("D", "N", "B", "H", "causal", "fwd_tflops", "bwd_tflops", "error")}
        row["sdpa_fwd_tflops"], row["sdpa_bwd_tflops"] = ref.get("fwd_tflops"), ref.get("bwd_tflops")
        for mode in ("fwd", "bwd"):
            mine, theirs = r.get(f"{mode}_ms"), ref.get(f"{mode}_ms")
            row[f"{mode}_vs_sdpa"] = round(theirs / mine, 3) if mine and theirs else None  # > 1: attnkit faster
        err = next((e for e in errors if all(e[k] == r[k] for k in ("D", "N", "causal"))), {})
        row["max_err"] = max((err[k] for k in ("out", "dq", "dk", "dv") if err.get(k) is not None), default=None)
        parts = [s for s in split if all(s[k] == r[k] for k in ("D", "N", "causal"))]
        total = sum(s["ms"] for s in parts)
        row["bwd_split"] = ", ".join(f"{s['kernel']} {100 * s['ms'] / total:.0f}%" for s in parts) if total else None
        rows.append(row)
    columns = [
        ("D", "D"), ("N", "N"), ("causal", "causal"), ("fwd_tflops", "fwd TFLOP/s"),
        ("sdpa_fwd_tflops", "SDPA-flash fwd"), ("fwd_vs_sdpa", "fwd x SDPA"), ("bwd_tflops", "bwd TFLOP/s"),
        ("sdpa_bwd_tflops", "SDPA-flash bwd"), ("bwd_vs_sdpa", "bwd x SDPA"), ("max_err", "max diff vs SDPA"),
        ("bwd_split", "backward split"), ("error", "error"),
    ]  # fmt: skip
    notes = []
    for mode, need in (("fwd", 1.0), ("bwd", 0.8)):
        ratios = [r[f"{mode}_vs_sdpa"] for r in rows if r["D"] == 128 and r[f"{mode}_vs_sdpa"] is not None]
        if ratios:
            verdict = "met" if min(ratios) >= need else "NOT met"
            notes.append(f"Target {mode} >= {need}x SDPA-flash at D=128: worst {min(ratios):.2f}x, {verdict}.")
        else:
            notes.append(f"Target {mode} >= {need}x SDPA-flash at D=128: not measured.")
    plain = next((f for f in features if f["feature"] == "plain" and f.get("fwd_ms")), None)
    for f in features:
        if f["feature"] == "plain":
            continue
        if plain and f.get("fwd_ms"):
            cost = f["fwd_ms"] / plain["fwd_ms"] - 1
            need = 0.25 if f["feature"] == "softcap" else 0.10
            verdict = "met" if cost <= need else "NOT met"
            notes.append(
                f"Causal forward D=128 N=8192, {f['feature']}: {f['fwd_ms']:.3f} ms vs {plain['fwd_ms']:.3f} ms "
                f"plain ({100 * cost:+.1f}%; target <= {100 * need:.0f}%, {verdict})."
            )
        else:
            notes.append(f"Causal forward D=128 N=8192, {f['feature']}: not measured ({f.get('error', 'no time')}).")
    return rows, columns, notes


# ----------------------------------------------------------------- on the GPU
def _max_errors(case: dict[str, Any], dtype) -> dict[str, Any]:
    """Largest |attnkit - SDPA-flash| of the output and the gradients, same inputs and output gradient."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import attnkit

    q, k, v = _inputs(case, dtype)
    dout = torch.randn_like(q)
    results = []
    for run in ("triton", "sdpa"):
        if run == "triton":
            out = attnkit.attention(q, k, v, causal=case["causal"], backend="triton")
        else:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=case["causal"])
        grads = torch.autograd.grad(out, (q, k, v), dout)
        results.append((out.detach(), *grads))
    names = ("out", "dq", "dk", "dv")
    return {name: (a.float() - b.float()).abs().max().item() for name, a, b in zip(names, *results, strict=True)}


def _backward_split(case: dict[str, Any], dtype) -> list[dict[str, Any]]:
    """Device time of each backward kernel over five backward calls, from ``torch.profiler``."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    import attnkit

    q, k, v = _inputs(case, dtype)
    out = attnkit.attention(q, k, v, causal=case["causal"], backend="triton")
    dout = torch.randn_like(out)
    torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)  # autotuned and compiled before profiling
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
        torch.cuda.synchronize()
    totals = dict.fromkeys(BACKWARD_KERNELS, 0.0)
    for event in prof.key_averages():
        for name in BACKWARD_KERNELS:
            if name in event.key:
                totals[name] += event.device_time_total / 1e3 / 5  # us over 5 calls -> ms per call
    where = {"D": case["D"], "N": case["N"], "causal": case["causal"]}
    return [{**where, "kernel": name, "ms": ms} for name, ms in totals.items()]


def _feature_times(dtype) -> list[dict[str, Any]]:
    """The causal forward at D = 128, N = 8192: plain, softcap, ALiBi, a window spanning every key."""
    import torch

    import attnkit

    case = {"D": 128, "N": 8192, "B": 2, "H": 16, "causal": True}
    q, k, v = _inputs(case, dtype)
    options = {
        "plain": {},
        "softcap": {"softcap": 30.0},
        "alibi": {"alibi": attnkit.alibi_slopes(case["H"]).to("cuda")},
        "window": {"window": (case["N"], 0)},  # masks nothing beyond causal: the window code's own cost
    }
    rows = []
    for feature in QUICK_FEATURES:
        row = {"feature": feature, **case}
        try:
            with torch.no_grad():
                row["fwd_ms"] = _bench_ms(
                    lambda o=options[feature]: attnkit.attention(q, k, v, causal=True, backend="triton", **o)
                )
        except Exception as exc:  # record and go on: the other features still say something
            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        rows.append(row)
    return rows


def chosen_configs() -> list[dict[str, Any]]:
    """The config each autotuned kernel chose, per autotune key it has seen."""
    from attnkit.kernels.triton import backward, forward

    rows = []
    for name, tuned in (("forward", forward._fwd_tuned), ("dkdv", backward._dkdv_tuned), ("dq", backward._dq_tuned)):
        for key, cfg in tuned.cache.items():
            rows.append({"kernel": name, "key": [str(x) for x in key], "config": str(cfg)})
    return rows


def compiled_variants() -> list[dict[str, Any]]:
    """Registers, spills and shared memory of every variant the kernels were compiled to in this process."""
    from attnkit.kernels.triton import backward, forward

    rows = []
    for fn in (forward._fwd_kernel, backward._prep_kernel, backward._dkdv_kernel, backward._dq_kernel):
        for caches in fn.device_caches.values():
            for kernel in caches[0].values():
                consts = {fn.arg_names[path[0]]: value for path, value in kernel.src.constants.items()}
                row = {
                    "kernel": fn.__name__,
                    "blocks": {k: consts[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_D") if k in consts},
                    "flags": {k: v for k, v in consts.items() if k.isupper() and not k.startswith("BLOCK")},
                    "warps": kernel.metadata.num_warps,
                    "stages": kernel.metadata.num_stages,
                    "shared": kernel.metadata.shared,
                }
                try:
                    kernel._init_handles()  # loads the cubin: the driver's register and spill counts
                    row.update(registers=kernel.n_regs, spills=kernel.n_spills)
                except Exception as exc:  # a config the autotuner found too large for this card
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                rows.append(row)
    return rows


def run_quick(out_dir: str, budget: float) -> tuple[str, str]:
    """Measure everything in the module docstring; returns the JSON and Markdown paths."""
    import torch
    import triton

    from attnkit.apps.harness import write_results

    dtype = torch.bfloat16
    card = torch.cuda.get_device_name(0)
    start = time.perf_counter()
    throughput, errors, split, failures = [], [], [], []
    for case in QUICK_CASES:  # the D = 128 cases first: the targets concern them
        for provider in QUICK_PROVIDERS:
            if time.perf_counter() - start > budget:
                throughput.append({"provider": provider, **case, "error": "skipped: time budget spent"})
                continue
            throughput.append(_throughput_row(case, provider, dtype, modes=("fwd", "bwd")))
        if time.perf_counter() - start <= budget:
            where = f"D={case['D']} N={case['N']} causal={case['causal']}"
            try:
                errors.append({"D": case["D"], "N": case["N"], "causal": case["causal"], **_max_errors(case, dtype)})
            except Exception as exc:  # the column stays empty; the note says why
                failures.append(f"Max difference vs SDPA, {where}: failed: {type(exc).__name__}: {str(exc)[:200]}")
            try:
                split += _backward_split(case, dtype)
            except Exception as exc:
                failures.append(f"Backward split, {where}: failed: {type(exc).__name__}: {str(exc)[:200]}")
    features = _feature_times(dtype) if time.perf_counter() - start <= budget else []
    rows, columns, notes = quick_report(throughput, errors, split, features)
    notes = [
        f"Card: {card}; bf16; B x N = 16K tokens, H = 2048 / D; triton {triton.__version__}, "
        f"torch {torch.__version__}.",
        "FLOPs: forward 4 B H N^2 D (halved for causal), backward 2.5x forward; medians of triton.testing.do_bench.",
        *notes,
        *failures,
        f"Wall time of the run: {time.perf_counter() - start:.0f} s (budget {budget:.0f} s).",
    ]
    extra = {
        "card": card, "triton": triton.__version__, "throughput": throughput, "errors": errors,
        "backward_split": split, "features": features, "configs": chosen_configs(), "variants": compiled_variants(),
    }  # fmt: skip
    json_path, md_path = write_results(
        f"triton_quick_{card_slug(card)}", rows, columns, out_dir=out_dir,
        title=f"Triton kernels, quick check on {card}", notes=notes, extra=extra,
    )  # fmt: skip
    return str(json_path), str(md_path)


# ----------------------------------------------------------------------- command
POSITIVE = int_at_least(1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = DefaultsHelpFormatter
    parser.add_argument(
        "--out", default=".", help="directory for triton_gpu_<card>.json and .md (default: the current directory)"
    )
    parser.add_argument("--head-dims", type=POSITIVE, nargs="+", default=list(HEAD_DIMS), help="head dims")
    parser.add_argument("--seqlens", type=POSITIVE, nargs="+", default=list(SEQLENS), help="lengths N (B = 16K / N)")
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS, help="what to time")
    parser.add_argument("--feature-length", type=POSITIVE, default=8192, help="N of the feature-cost cases (D = 128)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the prepared check (under 5 min on one H100/H200): D=128 N=8K and D=64 N=4K against SDPA-flash, "
        "errors, backward split, feature costs, chosen configs, registers/spills",
    )
    parser.add_argument(
        "--budget",
        type=positive_float,
        default=450.0,
        help="seconds; cases left when it runs out are recorded as skipped",
    )


def run(args: argparse.Namespace) -> int:
    check_output_dir(args.out, "--out")
    import torch

    from attnkit.apps.harness import progress, write_results

    if not torch.cuda.is_available():
        raise UsageError("needs a CUDA device (none is visible); nothing measured")
    try:
        import triton
    except ImportError:
        raise UsageError("needs triton: pip install 'attnkit[triton]'") from None
    if args.quick:
        json_path, md_path = run_quick(args.out, budget=min(args.budget, QUICK_BUDGET))
        print(Path(md_path).read_text())
        print(f"wrote {json_path} and {md_path}")
        return 0
    dtype = torch.bfloat16
    card = torch.cuda.get_device_name(0)
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    plan = [(c, p) for c in cases(args.head_dims, args.seqlens) for p in args.providers]
    plan.sort(key=plan_order)
    for case, provider in progress(plan, desc="triton bench", total=len(plan)):
        if time.perf_counter() - start > args.budget:
            rows.append({"provider": provider, **case, "error": "skipped: time budget spent"})
            continue
        rows.append(_throughput_row(case, provider, dtype))
    feature_rows = []
    if time.perf_counter() - start <= args.budget + 60:
        feature_rows = _feature_rows(dtype, N=args.feature_length, D=128)
    rows.sort(key=lambda r: (r["D"], r["causal"], r["N"], PROVIDERS.index(r["provider"])))
    columns = [("D", "D"), ("N", "N"), ("B", "B"), ("H", "H"), ("causal", "causal"), ("provider", "provider")]
    columns += [(f"{m}_tflops", f"{m} TFLOP/s") for m in MODES] + [("error", "error")]
    notes = [
        f"Card: {card}; bf16; B x N = {TOKENS} tokens, H = {HIDDEN} / D; triton {triton.__version__}.",
        "FLOPs: forward 4 B H N^2 D (halved for causal), backward 2.5x forward, fwd+bwd 3.5x; "
        "times are medians of triton.testing.do_bench.",
        *feature_lines(feature_rows),
        *target_notes(rows, feature_rows),
        f"Wall time of the run: {time.perf_counter() - start:.0f} s.",
    ]
    json_path, md_path = write_results(
        f"triton_gpu_{card_slug(card)}",
        rows,
        columns,
        out_dir=args.out,
        title=f"Triton kernels vs PyTorch attention on {card}",
        notes=notes,
        extra={"card": card, "triton": triton.__version__, "features": feature_rows},
    )
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return main_for("python -m attnkit.apps.bench.triton_gpu", HELP, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
