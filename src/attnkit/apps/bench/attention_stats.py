"""``attnkit bench stats``: `attention_stats` against the SDPA forward, time and peak memory.

For each length N it runs, each in a fresh process (so peaks do not leak between cases):

* ``sdpa``: ``attnkit.attention(q, k, v, backend="sdpa")``, PyTorch's fused forward;
* ``stats``: ``attnkit.attention_stats(q, k, v, topk=..., pool=...)``: the same forward plus
  the statistics pass (entropy, mean distance, received, top-k, pooled map).

It reports the median time of each, their ratio, and the peak resident memory each added
(inputs excluded), beside what one materialised ``(B, H, N, N)`` fp32 map would need.
Targets (issue 4): at N = 32K, B=1, H=8, D=64, fp32 on CPU, peak memory under 1.5 GB and
time at most 3x the SDPA forward.

Full run (the lead runs it on a quiet machine)::

    attnkit bench stats --out docs/results    # N = 4096, 16384, 32768
    python -m attnkit.apps.bench.attention_stats --sizes 256 512 --repeat 1 --out /tmp/stats-smoke
"""

from __future__ import annotations

import argparse

from attnkit.apps.checks import DefaultsHelpFormatter, check_output_dir, int_at_least, main_for, positive_float

NAME = "stats"
HELP = "attention_stats (exact statistics, O(N) memory) versus the SDPA forward: time and peak memory"

CASE = "attnkit.apps.bench.attention_stats:case"


def case(
    kind: str, n: int, batch: int, heads: int, dim: int, topk: int, pool: int, repeat: int, threads: int | None,
    causal: bool, seed: int = 0,
) -> dict:  # fmt: skip
    """One measurement in this (fresh) process: peak memory of the first call, then the median time."""
    import torch

    import attnkit
    from attnkit.apps.harness import peak_memory, time_fn

    if threads:
        torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n, dim, generator=g) for _ in range(3))
    if kind == "sdpa":
        fn = lambda: attnkit.attention(q, k, v, causal=causal, backend="sdpa")
    elif kind == "stats":
        fn = lambda: attnkit.attention_stats(q, k, v, causal=causal, topk=topk, pool=pool, return_output=True)
    else:
        raise ValueError(f"case: kind must be 'sdpa' or 'stats', got {kind!r}")
    with torch.no_grad():
        mem = peak_memory(fn)  # the first call also warms up
        timing = time_fn(fn, warmup=0, repeat=repeat, max_seconds=600.0)
    return {**mem, **timing, "threads": torch.get_num_threads()}


POSITIVE = int_at_least(1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = DefaultsHelpFormatter
    parser.add_argument("--sizes", type=POSITIVE, nargs="+", default=[4096, 16384, 32768], help="sequence lengths N")
    parser.add_argument("--batch", type=POSITIVE, default=1, help="batch size B")
    parser.add_argument("--heads", type=POSITIVE, default=8, help="heads H")
    parser.add_argument("--dim", type=POSITIVE, default=64, help="head dim D")
    parser.add_argument("--topk", type=POSITIVE, default=8, help="top-k keys per query")
    parser.add_argument("--pool", type=POSITIVE, default=256, help="pooled map size P (P x P)")
    parser.add_argument("--causal", action="store_true", help="causal attention (default: full)")
    parser.add_argument("--repeat", type=POSITIVE, default=3, help="timed runs per case (median reported)")
    parser.add_argument("--threads", type=POSITIVE, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--timeout", type=positive_float, default=1800.0, help="seconds per case")
    parser.add_argument(
        "--out", default=".", help="directory for stats.json and stats.md (default: the current directory)"
    )


def run(args: argparse.Namespace) -> int:
    check_output_dir(args.out, "--out")
    from attnkit.apps.harness import markdown_table, progress, run_case, write_results

    rows = []
    common = {
        "batch": args.batch, "heads": args.heads, "dim": args.dim, "topk": args.topk, "pool": args.pool,
        "repeat": args.repeat, "threads": args.threads, "causal": args.causal,
    }  # fmt: skip
    for n in progress(args.sizes, desc="stats"):
        res = {
            kind: run_case(CASE, {"kind": kind, "n": n, **common}, timeout=args.timeout) for kind in ("sdpa", "stats")
        }
        row = {"n": n, "map_gib": args.batch * args.heads * n * n * 4 / 2**30}
        for kind, r in res.items():
            if "error" in r:
                row[f"{kind}_error"] = r["error"]
                continue
            row[f"{kind}_s"] = r["median_s"]
            row[f"{kind}_peak_mib"] = r["peak_bytes"] / 2**20
            row["threads"] = r["threads"]
        if "sdpa_s" in row and "stats_s" in row:
            row["ratio"] = row["stats_s"] / row["sdpa_s"]
        rows.append(row)
    columns = [
        ("n", "N"), ("sdpa_s", "SDPA forward (s)"), ("stats_s", "attention_stats (s)"), ("ratio", "time / SDPA"),
        ("sdpa_peak_mib", "SDPA peak (MiB)"), ("stats_peak_mib", "stats peak (MiB)"), ("map_gib", "full map (GiB)"),
    ]  # fmt: skip
    notes = [
        f"B={args.batch}, H={args.heads}, D={args.dim}, fp32, {'causal' if args.causal else 'full'} attention; "
        f"topk={args.topk}, pool={args.pool}; median of {args.repeat} runs; each case in a fresh process.",
        "attention_stats time includes its own forward (output + log-sum-exp) and the statistics pass.",
        "Peak = resident-memory high-water mark added by the first call (inputs excluded).",
        "Targets at N = 32768: stats peak < 1.5 GB (1430 MiB) and time / SDPA <= 3.",
    ]
    errors = [f"N={r['n']}: {k}: {v}" for r in rows for k, v in r.items() if k.endswith("_error")]
    json_path, md_path = write_results(
        "stats", rows, columns, out_dir=args.out, title="attention_stats versus the SDPA forward",
        notes=notes + errors,
    )  # fmt: skip
    print(markdown_table(rows, columns))
    for e in errors:
        print("error:", e)
    print(f"wrote {json_path} and {md_path}")
    return 1 if errors else 0


if __name__ == "__main__":
    import sys

    sys.exit(main_for("python -m attnkit.apps.bench.attention_stats", HELP, add_arguments, run))
