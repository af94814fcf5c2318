"""``attnkit compare``: measure the glossary's "At a Glance" claims on your machine.

Self-attention (attnkit's Transformer) against ``torch.nn.LSTM`` at one parameter budget on
long-range retrieval, selective copy and the adding problem; an encoder-decoder (cross-
attention) against a decoder-only model on a two-sequence task. It measures accuracy against
dependency distance, training throughput, time per step and peak memory against length
(a fresh process per case), and the gradient reaching each position against its distance,
then regenerates the table with the measured numbers (Markdown and JSON) and draws four plots.

    attnkit compare --quick              # 26 s on 2 quiet cores, 32-111 s busy (docs/compare.md)
    attnkit compare --out docs/results/compare
    python -m attnkit.apps.compare.command --quick
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from attnkit.apps.checks import (
    DefaultsHelpFormatter,
    UsageError,
    check_output_dir,
    int_at_least,
    main_for,
    positive_float,
    require_module,
)

HELP = "self-attention vs LSTM (and cross-attention) on long-range tasks: accuracy, speed, memory, gradients"

# Accuracy distances per task, throughput/memory lengths (distances) per task, and training budget.
PRESETS: dict[str, dict[str, Any]] = {
    "full": {
        "accuracy": {"retrieval": [16, 64, 256, 512, 1024], "copy": [16, 64, 256], "adding": [16, 64, 256],
                     "lookup": [16, 64, 256]},
        "speed": {"retrieval": [256, 1024, 4096, 8192], "lookup": [256, 1024, 4096]},
        "steps": 300,
        "batch": 16,
        "speed_batch": 4,
        "eval_examples": 512,
    },
    "quick": {
        "accuracy": {"retrieval": [16, 64], "copy": [16], "adding": [16], "lookup": [16]},
        "speed": {"retrieval": [64, 256]},
        "steps": 120,
        "batch": 16,
        "speed_batch": 4,
        "eval_examples": 128,
    },
}  # fmt: skip
SPEED_MODELS = {"retrieval": ["self-attention", "LSTM"], "lookup": ["encoder-decoder", "decoder-only"]}


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = DefaultsHelpFormatter
    positive = int_at_least(1)
    parser.add_argument("--quick", action="store_true", help="a small run (26 s on 2 quiet cores: docs/compare.md)")
    parser.add_argument("--out", default="out/compare", help="folder for compare.json, compare.md and the PNGs")
    parser.add_argument("--seed", type=int_at_least(0), default=0, help="seed of the data, the initialisations, order")
    parser.add_argument(
        "--threads",
        type=positive,
        default=None,
        help="torch threads, here and in every case's process (default: $OMP_NUM_THREADS, else $MKL_NUM_THREADS, "
        "else torch's default, one per core)",
    )
    parser.add_argument(
        "--tasks", default=None, help="comma-separated subset of retrieval,copy,adding,lookup (default: all four)"
    )
    parser.add_argument(
        "--distances",
        type=_ints,
        default=None,
        help="accuracy distances for every task (d1,d2,..; default: per task, from the preset: docs/compare.md)",
    )
    parser.add_argument(
        "--lengths",
        type=_ints,
        default=None,
        help="throughput/memory distances (d1,d2,..; default: from the preset: docs/compare.md)",
    )
    parser.add_argument(
        "--steps",
        type=positive,
        default=None,
        help=f"training steps per model, the same for all (default: {PRESETS['quick']['steps']} with --quick, "
        f"else {PRESETS['full']['steps']})",
    )
    parser.add_argument(
        "--batch", type=positive, default=None, help=f"training batch size (default: {PRESETS['full']['batch']})"
    )
    parser.add_argument("--lr", type=positive_float, default=3e-3, help="AdamW learning rate (same for all)")
    parser.add_argument("--width", type=positive, default=64, help="self-attention width; the others are fitted to it")
    parser.add_argument("--heads", type=positive, default=4, help="attention heads (they divide --width)")
    parser.add_argument("--depth", type=positive, default=2, help="attention layers (the LSTM has --lstm-depth)")
    parser.add_argument("--lstm-depth", type=positive, default=1, help="LSTM layers")
    parser.add_argument(
        "--case-timeout",
        type=positive_float,
        default=180.0,
        help="seconds a throughput/memory case may take; longer lengths of that model are then skipped",
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNGs (no matplotlib needed)")


def check_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """Everything about the command line checked before any model trains; returns the plan (`_plan`).

    Raises:
        UsageError: an unknown task, a distance below a task's minimum, ``--width`` not divisible
            by ``--heads``, an output folder that cannot be written, plots without matplotlib.
    """
    if args.width % args.heads:
        raise UsageError(f"--width {args.width} must be divisible by --heads {args.heads}")
    plan = _plan(args)
    from attnkit.apps.compare.tasks import get_task

    for option, distances_by_task in (("--distances", plan["accuracy"]), ("--lengths", plan["speed"])):
        for name, distances in distances_by_task.items():
            low = get_task(name).min_distance
            if min(distances) < low:
                raise UsageError(f"{option}: task {name!r} needs distances >= {low}, got {min(distances)}")
    check_output_dir(args.out, "--out")
    if not args.no_plots:
        require_module("matplotlib", "the plots", "pip install 'attnkit[viz]', or pass --no-plots")
    return plan


def _plan(args: argparse.Namespace) -> dict[str, Any]:
    preset = PRESETS["quick" if args.quick else "full"]
    from attnkit.apps.compare.tasks import TASKS

    tasks = list(preset["accuracy"]) if args.tasks is None else [t.strip() for t in args.tasks.split(",") if t.strip()]
    for t in tasks:
        if t not in TASKS:
            raise UsageError(f"--tasks must name tasks among {sorted(TASKS)}, got {t!r}")
    if not tasks:
        raise UsageError(f"--tasks names no task; choose among {sorted(TASKS)}")
    accuracy = {t: args.distances or preset["accuracy"].get(t, preset["accuracy"]["retrieval"]) for t in tasks}
    speed = {t: args.lengths or lengths for t, lengths in preset["speed"].items() if t in tasks}
    return {
        "accuracy": accuracy,
        "speed": speed,
        "steps": args.steps or preset["steps"],
        "batch": args.batch or preset["batch"],
        "speed_batch": preset["speed_batch"],
        "eval_examples": preset["eval_examples"],
    }


def _accuracy(plan, size, config, results, progress) -> dict:
    """Train every model on every (task, distance); returns the models trained at each task's longest d."""
    import torch

    from attnkit.apps.compare.measure import gradient_by_distance
    from attnkit.apps.compare.networks import build_models, count_parameters
    from attnkit.apps.compare.tasks import get_task
    from attnkit.apps.compare.train import evaluate, train

    for name, distances in plan["accuracy"].items():
        task = get_task(name)
        for d in distances:
            models = build_models(task, size, seed=config.seed)
            if d == max(distances):
                _record_parameters(task, models, results)
            for model_name, model in models.items():
                if d == max(distances) and not task.two_sequence:
                    probe = task.sample(64, d, generator=torch.Generator().manual_seed(config.seed + 7))
                    results["gradient"].append(
                        {"task": name, "model": model_name, "when": "init", "d": d,
                         **gradient_by_distance(model, probe, task=task)}
                    )  # fmt: skip
                run = train(model, task, d, config, progress=progress, desc=f"{name} d={d} {model_name}")
                acc = evaluate(model, task, d, config)
                results["accuracy"].append(
                    {"task": name, "distance": d, "length": task.length(d), "model": model_name, "accuracy": acc,
                     "chance": task.chance, "final_loss": run.final_loss, "train_s": run.seconds,
                     "parameters": count_parameters(model)}
                )  # fmt: skip
                if d == max(distances) and not task.two_sequence:
                    results["gradient"].append(
                        {"task": name, "model": model_name, "when": "trained", "d": d,
                         **gradient_by_distance(model, probe, task=task)}
                    )  # fmt: skip
    return results


def _record_parameters(task, models, results) -> None:
    from attnkit.apps.compare.networks import count_parameters

    budget = count_parameters(next(iter(models.values())))
    for model_name, model in models.items():
        size = (
            f"hidden {model.hidden}, {model.depth} layer(s)"
            if model_name == "LSTM"
            else f"width {model.width}, {model.heads} heads, {model.depth} layer(s)"
            + (" per stack" if model_name == "encoder-decoder" else f", feed-forward {model.ff_dim}")
        )
        n = count_parameters(model)
        results["parameters"].append(
            {
                "task": task.name,
                "model": model_name,
                "size": size,
                "parameters": n,
                "vs_budget": f"{n / budget - 1:+.1%}",
            }
        )


def _speed(plan, size, threads, seed, timeout, results, progress) -> None:
    from attnkit.apps.compare.measure import complexity
    from attnkit.apps.compare.tasks import get_task
    from attnkit.apps.harness import run_case, thread_env

    cases = [(t, m, d) for t, ds in plan["speed"].items() for m in SPEED_MODELS[t] for d in ds]
    stopped: set[tuple[str, str]] = set()
    env = thread_env(threads)
    for task, model, d in progress(cases, desc="throughput and memory", total=len(cases)):
        length = get_task(task).length(d)
        row: dict[str, Any] = {"task": task, "model": model, "distance": d, "length": length,
                               "batch": plan["speed_batch"]}  # fmt: skip
        kind = "LSTM" if model == "LSTM" else "self-attention"
        c = complexity(kind, length, size.width)
        row.update(sequential_ops=c["sequential_ops_at_n"], max_path=c["max_path_at_n"])
        if (task, model) in stopped:
            row["error"] = "skipped: a shorter length already failed or ran out of time"
        else:
            kwargs = {"task": task, "model": model, "distance": d, "batch": plan["speed_batch"], "width": size.width,
                      "heads": size.heads, "depth": size.depth, "threads": threads, "seed": seed}  # fmt: skip
            got = run_case("attnkit.apps.compare.measure:step_case", kwargs, timeout=timeout, env=env)
            row.update(got)
            if "error" in got:
                stopped.add((task, model))
        results["speed"].append(row)


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    plan = check_arguments(args)
    import torch

    from attnkit.apps.compare.measure import complexity
    from attnkit.apps.compare.networks import ModelSize
    from attnkit.apps.compare.report import glance_rows, markdown, plot_all
    from attnkit.apps.compare.train import TrainConfig
    from attnkit.apps.harness import command_line, machine_info, progress, thread_count

    threads, threads_from = thread_count(args.threads)
    torch.set_num_threads(threads)
    size = ModelSize(width=args.width, heads=args.heads, depth=args.depth, lstm_depth=args.lstm_depth)
    config = TrainConfig(
        steps=plan["steps"], batch=plan["batch"], lr=args.lr, eval_examples=plan["eval_examples"], seed=args.seed
    )
    results: dict[str, Any] = {"accuracy": [], "speed": [], "gradient": [], "parameters": [], "notes": []}
    _accuracy(plan, size, config, results, progress)
    _speed(plan, size, threads, args.seed, args.case_timeout, results, progress)
    results["complexity"] = [
        {"model": m, **complexity(m, 1, size.width)} for m in ("self-attention", "LSTM", "cross-attention")
    ]
    results["train_config"] = config.as_dict()
    results["size"] = {**size.__dict__, "batch_speed": plan["speed_batch"]}
    results["plan"] = plan
    results["threads"] = threads
    results["threads_from"] = threads_from
    results["notes"] += _notes(plan, results)
    results["glance"] = glance_rows(results)
    results["meta"] = {
        "command": command_line(),
        "seed": args.seed,
        "machine": machine_info(),
        "seconds": time.perf_counter() - start,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(results, indent=2) + "\n")
    md = markdown(results)
    (out / "compare.md").write_text(md)
    pngs = [] if args.no_plots else plot_all(results, out)
    print(md.split("## Models")[0].rstrip())
    print(f"\nwrote {out / 'compare.md'}, {out / 'compare.json'}" + "".join(f", {p}" for p in pngs))
    return 0


def _notes(plan: dict, results: dict) -> list[str]:
    notes = [
        "Retrieval, lookup: one position holds a (key, value) fact as two token channels whose embeddings add; "
        "the query shares the key's symbol. Copy: Gu and Dao 2023's selective copying. Adding: Hochreiter and "
        "Schmidhuber 1997 (solved = error below 0.04).",
        "Throughput = input tokens of one training step (forward, backward, AdamW) / its median time; memory = "
        "peak resident memory the step added, each case in a fresh process (CPU: resident memory).",
        "Gradient probe: norm of ∂loss/∂x_t for the input embedding x_t, loss at the first scored position, "
        "averaged over 64 examples, by distance; 'init' before training, 'trained' after.",
        "attnkit's attention runs through `attnkit.attention`, whose kernels never hold the full L×L score "
        "matrix, so 'memory grows as N²' is about naive attention; the table shows the memory actually used.",
    ]
    stopped = [r for r in results["speed"] if "error" in r]
    if stopped:
        notes.append(
            "Where the machine stopped: "
            + "; ".join(f"{r['model']} on {r['task']} at L={r['length']}: {r['error']}" for r in stopped)
        )
    return notes


def main(argv: list[str] | None = None) -> int:
    return main_for("python -m attnkit.apps.compare.command", HELP, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
