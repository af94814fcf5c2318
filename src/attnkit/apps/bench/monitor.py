"""``attnkit bench monitor``: the cost of `attnkit.inspect.Monitor` on training.

A small `attnkit.nn.LanguageModel` trains on random tokens on the CPU (AdamW, cross-entropy
on the next token). In one fresh process, blocks of ``--steps`` training steps alternate:
unmonitored, then monitored with ``Monitor(model, every=--every, logdir=...)`` (CSV and, when
installed, TensorBoard), ``--rounds`` times, on the same sequence of batches. Each block is
timed whole, in CPU time of the process (``time.process_time``, the verdict: on a shared
machine it leaves out the time other jobs hold the cores) and in wall time; the ratio
monitored / unmonitored is taken per round and over all rounds (total time). Alternating in
one process keeps both modes under the same load and the same warm caches.

Target (issue 16): with ``every=100`` the monitored training is at most 5% slower.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from typing import Any

from attnkit.apps.checks import (
    DefaultsHelpFormatter,
    UsageError,
    check_output_dir,
    int_at_least,
    main_for,
    positive_float,
)

NAME = "monitor"
HELP = "training with attnkit.inspect.Monitor(every=N) vs without: time ratio on a small language model (CPU)"

TARGET = 1.05


def case(
    *, steps: int, rounds: int, every: int, vocab: int, dim: int, heads: int, depth: int, batch: int, length: int,
    threads: int | None, seed: int,
) -> dict[str, Any]:  # fmt: skip
    """The alternated measurement, run in a fresh process by `attnkit.apps.harness.run_case`."""
    import time

    import torch

    from attnkit.inspect import Monitor
    from attnkit.nn import LanguageModel

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = LanguageModel(vocab, dim, heads, depth, positions="rope")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, vocab, (batch, length), generator=g) for _ in range(steps)]

    def train_step(tokens) -> None:
        logits = model(tokens)  # (B, L, V)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab), tokens[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def block(monitored: bool, logdir: str) -> tuple[float, float, list[dict]]:
        """``(wall s, CPU s of the process, the monitor's step rows)`` of one block."""
        t0, c0 = time.perf_counter(), time.process_time()
        if not monitored:
            for tokens in batches:
                train_step(tokens)
            return time.perf_counter() - t0, time.process_time() - c0, []
        with Monitor(model, every=every, logdir=logdir, tensorboard=_has_tensorboard()) as monitor:
            for tokens in batches:
                train_step(tokens)
                monitor.step()
        return time.perf_counter() - t0, time.process_time() - c0, monitor.steps

    for tokens in batches[:3]:  # warm-up: allocator, threads, first-call costs
        train_step(tokens)
    rows, watched = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            plain, plain_cpu, _ = block(False, tmp)
            monitored, monitored_cpu, summary = block(True, f"{tmp}/round{r}")
            watched += summary
            rows.append(
                {
                    "round": r, "unmonitored_cpu_s": plain_cpu, "monitored_cpu_s": monitored_cpu,
                    "cpu_ratio": monitored_cpu / plain_cpu, "unmonitored_s": plain, "monitored_s": monitored,
                    "ratio": monitored / plain,
                }
            )  # fmt: skip
    return {
        "rows": rows,
        "monitored_steps_per_block": len(watched) // max(rounds, 1),
        "monitor_ms_mean": statistics.fmean(s["monitor_ms"] for s in watched) if watched else None,
        "step_ms_monitored_mean": statistics.fmean(s["step_ms"] for s in watched) if watched else None,
        "attention_ms_mean": statistics.fmean(s["attention_ms"] for s in watched) if watched else None,
        "peak_memory_mib": max(s["peak_memory_mib"] for s in watched) if watched else None,
        "memory_source": watched[0]["memory_source"] if watched else None,
        "tensorboard": _has_tensorboard(),
    }


def _has_tensorboard() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


POSITIVE = int_at_least(1)


# option -> (default, help) of the measured model and its training
SIZES = {
    "steps": (100, "training steps per block"),
    "rounds": (3, "unmonitored/monitored block pairs"),
    "every": (100, "Monitor(every=...)"),
    "vocab": (256, "vocabulary size"),
    "dim": (128, "model width"),
    "heads": (4, "attention heads"),
    "depth": (4, "layers"),
    "batch": (8, "sequences per step"),
    "length": (256, "tokens per sequence"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = DefaultsHelpFormatter
    for name, (default, text) in SIZES.items():
        parser.add_argument(f"--{name}", type=POSITIVE, default=default, help=f"{text} (default {default})")
    parser.add_argument("--threads", type=POSITIVE, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model and the batches")
    parser.add_argument("--timeout", type=positive_float, default=3600.0, help="seconds allowed for the run")
    parser.add_argument(
        "--note", default=None, help="a line added to the results' notes, e.g. the machine's load (default: none)"
    )
    parser.add_argument(
        "--out", default=".", help="directory for monitor.json and monitor.md (default: the current directory)"
    )


def run(args: argparse.Namespace) -> int:
    if args.dim % args.heads:
        raise UsageError(f"--dim {args.dim} must be divisible by --heads {args.heads}")
    if args.every > args.steps:
        raise UsageError(f"--every {args.every} must be <= --steps {args.steps}, or no step of a block is monitored")
    check_output_dir(args.out, "--out")
    from attnkit.apps.harness import run_case, write_results

    config = {k: getattr(args, k) for k in (*SIZES, "threads", "seed")}
    result = run_case("attnkit.apps.bench.monitor:case", config, timeout=args.timeout)
    if "error" in result:
        print(f"attnkit bench monitor: the measurement failed: {result['error']}", file=sys.stderr)
        return 1
    rows = result.pop("rows")
    cpu = sum(r["monitored_cpu_s"] for r in rows) / sum(r["unmonitored_cpu_s"] for r in rows)
    wall = sum(r["monitored_s"] for r in rows) / sum(r["unmonitored_s"] for r in rows)
    notes = [
        f"Monitored / unmonitored training, CPU time of the process over all rounds: {cpu:.3f} (per round: median "
        f"{statistics.median(r['cpu_ratio'] for r in rows):.3f}); target <= {TARGET}: "
        f"{'met' if cpu <= TARGET else 'NOT met'}. Wall time: {wall:.3f} (median "
        f"{statistics.median(r['ratio'] for r in rows):.3f}).",
        f"Monitored steps per block: {result['monitored_steps_per_block']} of {args.steps}; the monitor's own work per "
        f"monitored step (statistics, bands, roles, logs): {_ms(result['monitor_ms_mean'])} on average, against "
        f"{_ms(result['step_ms_monitored_mean'])} for the monitored step itself.",
        f"Attention per monitored step (forward + backward): {_ms(result['attention_ms_mean'])}; peak memory "
        f"{_mib(result['peak_memory_mib'])} ({result['memory_source']}). TensorBoard events written: "
        f"{result['tensorboard']}.",
        "Whole blocks timed, the two modes alternated in one process on the same batches. CPU time (all threads of "
        "the process, the TensorBoard writer's too) is the verdict's measure: on a shared machine it does not count "
        "the time other jobs hold the cores, which wall time does.",
    ]
    if args.note:
        notes.append(args.note)
    columns = [
        ("round", "round"), ("unmonitored_cpu_s", "unmonitored CPU s"), ("monitored_cpu_s", "monitored CPU s"),
        ("cpu_ratio", "CPU ratio"), ("unmonitored_s", "unmonitored wall s"), ("monitored_s", "monitored wall s"),
        ("ratio", "wall ratio"),
    ]  # fmt: skip
    json_path, md_path = write_results(
        NAME, rows, columns, out_dir=args.out, title="Training monitor overhead (attnkit.inspect.Monitor)",
        notes=notes, extra={"config": config, "cpu_ratio": cpu, "wall_ratio": wall, **result},
    )  # fmt: skip
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")
    return 0


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f} ms"


def _mib(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f} MiB"


def main(argv: list[str] | None = None) -> int:
    return main_for("python -m attnkit.apps.bench.monitor", HELP, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
