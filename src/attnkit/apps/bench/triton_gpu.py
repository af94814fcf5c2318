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
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import time
from collections.abc import Callable
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


def _throughput_row(case: dict[str, Any], provider: str, dtype) -> dict[str, Any]:
    import torch

    row = {"provider": provider, **case}
    try:
        q, k, v = _inputs(case, dtype)
        forward, context = _provider_fn(provider, q, k, v, causal=case["causal"])
        times = _measure(forward, context, q, k, v)
    except Exception as exc:  # each provider may be unavailable on this card/build: record why
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        torch.cuda.empty_cache()
        return row
    row.update(times)
    for mode in MODES:
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
