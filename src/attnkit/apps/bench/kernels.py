"""``attnkit bench kernels``: forward and forward+backward time and peak memory per backend.

Cases (B=1, H=8, D=64, fp32 by default): plain, causal, and ALiBi + window + softcap,
for N in 1K..16K, on the naive materialised attention (plain PyTorch ops, the way most
code writes it), ``reference``, ``tiled``, ``sdpa`` and ``auto``. Each case runs in a
fresh subprocess (so peak memory is its own), and materialising backends are skipped,
with the reason, where their score matrices would not fit in memory. Ratios against
``sdpa`` are taken from the same run. FLOPs: forward ``4 B H N^2 D`` (halved for causal),
backward 2.5x forward.
"""

from __future__ import annotations

import argparse
import math
import sys

from attnkit.apps import harness
from attnkit.apps.checks import DefaultsHelpFormatter, check_output_dir, int_at_least, main_for, positive_float

NAME = "kernels"
HELP = "time and peak memory of every attention backend, N = 1K..16K (CPU)"

VARIANTS: dict[str, dict] = {
    "plain": {},
    "causal": {"causal": True},
    # Local attention as in Longformer-style encoders: a symmetric window of 512 keys each side.
    "alibi+window+softcap": {"alibi": True, "window": (512, 512), "softcap": 30.0},
}
BACKENDS = ["naive", "reference", "tiled", "sdpa", "auto"]
# How many (B, H, N, N) fp32 tensors each materialising path holds at its peak in fwd+bwd.
MATRICES_HELD = {"naive": 4, "reference": 6}


def flops(B: int, H: int, N: int, D: int, causal: bool, backward: bool) -> float:
    """FLOPs of attention: ``4 B H N^2 D`` forward (two matmuls), halved for causal; backward 2.5x."""
    f = 4.0 * B * H * N * N * D * (0.5 if causal else 1.0)
    return f * 3.5 if backward else f


def naive_attention(q, k, v, causal=False, alibi=None, window=None, softcap=None):
    """Attention as it is usually written: the full score matrix in plain PyTorch ops."""
    import torch

    import attnkit

    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, N, N)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    N = q.shape[-2]
    i = torch.arange(N)[:, None]
    j = torch.arange(N)[None, :]
    if alibi:
        s = s - attnkit.alibi_slopes(q.shape[1]).view(1, -1, 1, 1) * (i - j).abs()
    allowed = torch.ones(N, N, dtype=torch.bool)
    if causal:
        allowed &= j <= i
    if window is not None:
        allowed &= (j >= i - window[0]) & (j <= i + window[1])
    if causal or window is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def case(
    backend: str, variant: str, N: int, B: int, H: int, D: int, dtype: str, threads: int | None, repeat: int
) -> dict:
    """One benchmark case, run in a fresh process: peak memory, then forward and fwd+bwd times."""
    import torch

    import attnkit

    if threads:
        torch.set_num_threads(threads)
    options = VARIANTS[variant]
    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, generator=gen, dtype=dt).requires_grad_() for _ in range(3))

    if backend == "naive":
        fn = lambda: naive_attention(q, k, v, **options)
    else:
        fn = lambda: attnkit.attention(q, k, v, backend=backend, **options)

    def forward():
        with torch.no_grad():
            fn()

    def forward_backward():
        out = fn()
        out.backward(torch.ones_like(out))
        q.grad = k.grad = v.grad = None

    result = {"backend": backend, "variant": variant, "N": N}
    if backend == "auto":
        result["auto_chose"] = attnkit.explain_backend(q, k, v, **options).backend
    result["fwd_peak_mib"] = harness.peak_memory(forward)["peak_bytes"] / 2**20
    result["fwdbwd_peak_mib"] = harness.peak_memory(forward_backward)["peak_bytes"] / 2**20
    # The two peak-memory runs above were this process's warm-up.
    fwd = harness.time_fn(forward, warmup=0, repeat=repeat)
    fb = harness.time_fn(forward_backward, warmup=0, repeat=repeat)
    causal = bool(options.get("causal"))
    result["fwd_s"] = fwd["median_s"]
    result["fwdbwd_s"] = fb["median_s"]
    result["fwd_gflops"] = flops(B, H, N, D, causal, False) / fwd["median_s"] / 1e9
    return result


def _skip_reason(backend: str, variant: str, N: int, B: int, H: int, limit_gib: float) -> str | None:
    if backend in MATRICES_HELD:
        need = MATRICES_HELD[backend] * B * H * N * N * 4 / 2**30
        if need > limit_gib:
            return f"skipped: holds ~{need:.0f} GiB of N x N matrices (limit {limit_gib:g} GiB)"
    if backend == "sdpa" and variant not in ("plain", "causal"):
        return "not supported: SDPA would need an N x N float mask for ALiBi/window/softcap"
    return None


POSITIVE = int_at_least(1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = DefaultsHelpFormatter
    parser.add_argument(
        "--sizes", type=POSITIVE, nargs="+", default=[1024, 2048, 4096, 8192, 16384], help="sequence lengths N"
    )
    parser.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), help="masks and biases"
    )
    parser.add_argument(
        "--backends", nargs="+", default=BACKENDS, choices=BACKENDS, help="what to time (naive: plain PyTorch ops)"
    )
    parser.add_argument("--batch", type=POSITIVE, default=1, help="batch size B")
    parser.add_argument("--heads", type=POSITIVE, default=8, help="heads H")
    parser.add_argument("--head-dim", type=POSITIVE, default=64, help="head dim D")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"], help="element type")
    parser.add_argument("--threads", type=POSITIVE, default=None, help="torch threads per case (default: torch's)")
    parser.add_argument(
        "--memory-limit-gib", type=positive_float, default=12.0, help="skip materialising cases above this many GiB"
    )
    parser.add_argument("--repeat", type=POSITIVE, default=3, help="timed runs per case; the median is reported")
    parser.add_argument("--timeout", type=positive_float, default=900.0, help="seconds per case")
    parser.add_argument(
        "--out",
        default=str(harness.DEFAULT_OUT),
        help="directory for kernels.json and kernels.md (default: the current directory)",
    )


def _targets(rows: list[dict]) -> list[str]:
    """The issue's targets, checked on the measured rows (each line says met or missed)."""
    by = {(r["backend"], r["variant"], r["N"]): r for r in rows if "error" not in r and "fwd_s" in r}
    notes = []

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    sizes = sorted({r["N"] for r in rows})
    top = sizes[-1] if sizes else None
    t = by.get(("tiled", "causal", top)) or by.get(("tiled", "plain", top))
    if t:
        mib = t["fwdbwd_peak_mib"]
        notes.append(
            f"tiled fwd+bwd peak at N={top} ({t['variant']}): {mib:.0f} MiB (target < 1024): {verdict(mib < 1024)}"
        )
    for N in (4096, 16384):
        t, s = by.get(("tiled", "plain", N)), by.get(("sdpa", "plain", N))
        if t and s:
            ratio = s["fwd_s"] / t["fwd_s"]
            notes.append(f"tiled forward speed vs sdpa at N={N}: {ratio:.2f}x (target >= 0.7): {verdict(ratio >= 0.7)}")
        f = by.get(("tiled", "alibi+window+softcap", N))
        if f and s:
            ratio = s["fwd_s"] / f["fwd_s"]
            notes.append(
                f"tiled ALiBi+window(512,512)+softcap forward speed vs plain sdpa at N={N}: {ratio:.2f}x "
                f"(target >= 0.6): {verdict(ratio >= 0.6)}"
            )
    for N in sizes:
        c, p = by.get(("tiled", "causal", N)), by.get(("tiled", "plain", N))
        if c and p:
            ratio = c["fwd_s"] / p["fwd_s"]
            notes.append(
                f"causal/plain tiled forward time at N={N}: {ratio:.2f} (target <= 0.6): {verdict(ratio <= 0.6)}"
            )
    for (backend, variant, N), a in sorted(by.items()):
        if backend != "auto":
            continue
        others = [by[(b, variant, N)] for b in ("tiled", "sdpa", "reference") if (b, variant, N) in by]
        for kind in ("fwd_s", "fwdbwd_s"):
            best = min(others, key=lambda r: r[kind], default=None)
            if best:
                ratio = a[kind] / best[kind]
                notes.append(
                    f"auto ({a.get('auto_chose')}) {kind[:-2]} time vs best ({best['backend']}) at {variant} N={N}: "
                    f"{ratio:.2f} (target <= 1.05): {verdict(ratio <= 1.05)}"
                )
    return notes


def run(args: argparse.Namespace) -> int:
    check_output_dir(args.out, "--out")
    plan = [(v, n, b) for v in args.variants for n in args.sizes for b in args.backends]
    rows: list[dict] = []
    for variant, N, backend in harness.progress(plan, desc="kernels"):
        base = {"backend": backend, "variant": variant, "N": N}
        reason = _skip_reason(backend, variant, N, args.batch, args.heads, args.memory_limit_gib)
        if reason:
            rows.append({**base, "error": reason})
            continue
        kwargs = dict(
            backend=backend, variant=variant, N=N, B=args.batch, H=args.heads, D=args.head_dim,
            dtype=args.dtype, threads=args.threads,
            # The materialising baselines are timed once where a run takes seconds.
            repeat=1 if backend in MATRICES_HELD and N > 4096 else args.repeat,
        )  # fmt: skip
        result = harness.run_case("attnkit.apps.bench.kernels:case", kwargs, timeout=args.timeout)
        rows.append({**base, **result})
        print(_row_line(rows[-1]), flush=True)
    columns = [
        ("variant", "variant"),
        ("N", "N"),
        ("backend", "backend"),
        ("auto_chose", "auto chose"),
        ("fwd_s", "fwd s"),
        ("fwdbwd_s", "fwd+bwd s"),
        ("fwd_gflops", "fwd GFLOP/s"),
        ("fwd_peak_mib", "fwd peak MiB"),
        ("fwdbwd_peak_mib", "fwd+bwd peak MiB"),
        ("error", "note"),
    ]
    notes = _targets(rows)
    notes.append(
        f"B={args.batch}, H={args.heads}, D={args.head_dim}, {args.dtype}; each case in a fresh process; "
        "peak memory = high-water RSS above the inputs; times are the median of "
        f"{args.repeat} runs after the two peak-memory runs (naive and reference above N=4096: one run)."
    )
    json_path, md_path = harness.write_results(
        "kernels", rows, columns, out_dir=args.out, title="attnkit bench kernels", notes=notes
    )
    print("\n".join(notes))
    print(f"wrote {json_path} and {md_path}")
    return 0


def _row_line(r: dict) -> str:
    if "error" in r:
        return f"{r['variant']:>22} N={r['N']:>6} {r['backend']:>9}: {r['error']}"
    return (
        f"{r['variant']:>22} N={r['N']:>6} {r['backend']:>9}: fwd {r['fwd_s']:.3f}s  fwd+bwd {r['fwdbwd_s']:.3f}s  "
        f"peak {r['fwdbwd_peak_mib']:.0f} MiB"
    )


if __name__ == "__main__":
    sys.exit(main_for("python -m attnkit.apps.bench.kernels", HELP, add_arguments, run))
