"""``attnkit bench mha``: attnkit.nn.MultiheadAttention against torch.nn.MultiheadAttention.

For each length ``L``, each mode (default arguments, which return the head-averaged
weights, and ``need_weights=False``) and each pass (forward under ``torch.no_grad``, and
forward + backward), both modules run with the same parameters and input ``(L, B, dim)``
(default ``batch_first=False``), each case in a fresh process: peak memory of the first
call (resident memory above the inputs, `attnkit.apps.harness.peak_memory`), then the
median wall time of ``--repeat`` calls.

Targets (issue 3): attnkit at least as fast as torch in every case, and with
``need_weights=False`` at the longest length using under a quarter of torch-default's
peak memory.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from attnkit.apps.checks import (
    DefaultsHelpFormatter,
    UsageError,
    check_output_dir,
    int_at_least,
    main_for,
    positive_float,
)

NAME = "mha"
HELP = "attnkit.nn.MultiheadAttention vs torch.nn.MultiheadAttention: time and peak memory"

MODES = {"default": True, "need_weights=False": False}
PASSES = ("forward", "forward+backward")


def case(
    *, impl: str, length: int, need_weights: bool, backward: bool, dim: int, heads: int, batch: int, repeat: int,
    threads: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """One measurement, run in a fresh process by `attnkit.apps.harness.run_case`."""
    import torch

    from attnkit.apps.harness import peak_memory, time_fn

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    if impl == "torch":
        module = torch.nn.MultiheadAttention(dim, heads)
    else:
        from attnkit.nn import MultiheadAttention

        module = MultiheadAttention(dim, heads)
    x = torch.randn(length, batch, dim, requires_grad=backward)  # (L, B, dim)

    def step() -> None:
        if backward:
            out, _ = module(x, x, x, need_weights=need_weights)
            out.sum().backward()
            x.grad = None
            module.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                module(x, x, x, need_weights=need_weights)

    memory = peak_memory(step)
    timing = time_fn(step, warmup=1, repeat=repeat)
    return {"peak_mib": memory["peak_bytes"] / 2**20, "time_s": timing["median_s"], "runs": timing["runs"]}


POSITIVE = int_at_least(1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = DefaultsHelpFormatter
    parser.add_argument("--lengths", type=POSITIVE, nargs="+", default=[512, 2048, 8192], help="sequence lengths L")
    parser.add_argument("--dim", type=POSITIVE, default=512, help="embed_dim")
    parser.add_argument("--heads", type=POSITIVE, default=8, help="num_heads")
    parser.add_argument("--batch", type=POSITIVE, default=1, help="batch size")
    parser.add_argument("--repeat", type=POSITIVE, default=3, help="timed calls per case (median reported)")
    parser.add_argument("--threads", type=POSITIVE, default=None, help="torch threads in each case (default: torch's)")
    parser.add_argument("--timeout", type=positive_float, default=900.0, help="seconds allowed per case")
    parser.add_argument("--out", default=".", help="directory for mha.json and mha.md (default: the current directory)")


def run(args: argparse.Namespace) -> int:
    if args.dim % args.heads:
        raise UsageError(f"--dim {args.dim} must be divisible by --heads {args.heads}")
    check_output_dir(args.out, "--out")
    from attnkit.apps.harness import progress, run_case, write_results

    shared = {"dim": args.dim, "heads": args.heads, "batch": args.batch, "repeat": args.repeat, "threads": args.threads}
    plan = [(L, mode, p) for L in args.lengths for mode in MODES for p in PASSES]
    results: dict[tuple, dict[str, Any]] = {}
    for L, mode, p in progress(plan, desc="mha", total=len(plan)):
        for impl in ("torch", "attnkit"):
            kwargs = {"impl": impl, "length": L, "need_weights": MODES[mode], "backward": p != "forward", **shared}
            results[(impl, L, mode, p)] = run_case("attnkit.apps.bench.mha:case", kwargs, timeout=args.timeout)

    rows = []
    for L, mode, p in plan:
        t, a = results[("torch", L, mode, p)], results[("attnkit", L, mode, p)]
        rows.append(
            {
                "L": L,
                "mode": mode,
                "pass": p,
                "torch_s": t.get("time_s"),
                "attnkit_s": a.get("time_s"),
                "speedup": t["time_s"] / a["time_s"] if "time_s" in t and "time_s" in a else None,
                "torch_mib": t.get("peak_mib"),
                "attnkit_mib": a.get("peak_mib"),
                "error": "; ".join(f"{n}: {r['error']}" for n, r in (("torch", t), ("attnkit", a)) if "error" in r)
                or None,
            }
        )
    notes = _verdicts(rows, max(args.lengths))
    columns = [
        ("L", "L"), ("mode", "mode"), ("pass", "pass"), ("torch_s", "torch s"), ("attnkit_s", "attnkit s"),
        ("speedup", "torch / attnkit time"), ("torch_mib", "torch peak MiB"), ("attnkit_mib", "attnkit peak MiB"),
        ("error", "error"),
    ]  # fmt: skip
    json_path, md_path = write_results(
        NAME, rows, columns, out_dir=args.out, title="MultiheadAttention: attnkit.nn vs torch.nn", notes=notes,
        extra={"config": shared},
    )  # fmt: skip
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")
    return 0 if all(r["error"] is None for r in rows) else 1


def _verdicts(rows: list[dict[str, Any]], longest: int) -> list[str]:
    """The issue's targets, checked on these rows."""
    notes = []
    slower = [r for r in rows if r["speedup"] is not None and r["speedup"] < 1.0]
    if slower:
        cases = ", ".join(f"L={r['L']} {r['mode']} {r['pass']} ({r['speedup']:.2f}x)" for r in slower)
        notes.append(f"Target 'attnkit at least as fast as torch in every case': NOT met in {cases}.")
    else:
        notes.append("Target 'attnkit at least as fast as torch in every case': met.")
    for p in PASSES:
        lean = next(
            (r for r in rows if r["L"] == longest and r["mode"] == "need_weights=False" and r["pass"] == p), None
        )
        default = next((r for r in rows if r["L"] == longest and r["mode"] == "default" and r["pass"] == p), None)
        if lean and default and lean["attnkit_mib"] is not None and default["torch_mib"]:
            ratio = lean["attnkit_mib"] / default["torch_mib"]
            verdict = "met" if ratio < 0.25 else "NOT met"
            notes.append(
                f"Target 'need_weights=False at L={longest} under a quarter of torch-default's peak memory' "
                f"({p}): {ratio:.3f} of it, {verdict}."
            )
    notes.append("Peak memory: resident memory added by the first call, inputs excluded, each case in a fresh process.")
    return notes


def main(argv: list[str] | None = None) -> int:
    return main_for("python -m attnkit.apps.bench.mha", HELP, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
