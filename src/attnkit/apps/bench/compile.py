"""``attnkit bench compile``: a small `attnkit.nn.LanguageModel` training step, compiled against eager.

One step is forward, cross-entropy loss, backward and an AdamW step. Two copies of the model
start from the same weights, one run eagerly and one with its loss ``torch.compile``-d
(``fullgraph=True``, Inductor: forward and backward graphs; the optimizer step is eager on
both sides). After the compiled copy's first (compiling) step, the two are timed alternately,
step by step, in one process, so a change in the machine's load hits both alike; the medians
are reported, and the losses of the two copies after the same steps are compared.

Cases (each in a fresh process): ``causal``, the language model's causal attention (PyTorch's
SDPA kernel under both), and ``window``, sliding-window attention (the tiled kernel: eager
calls its ``torch.autograd.Function``, compiled graphs its ``attnkit::tiled_*`` custom ops).

Target (issue 15): compiled not slower than eager.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from attnkit.apps.checks import DefaultsHelpFormatter, check_output_dir, int_at_least, main_for, positive_float

NAME = "compile"
HELP = "training step of a small attnkit.nn LanguageModel: torch.compile (Inductor) vs eager, alternated"

CASES = {"causal": {}, "window": {"window": 32}}


def case(
    *, name: str, vocab: int, dim: int, heads: int, depth: int, batch: int, length: int, steps: int,
    threads: int | None = None, backend: str = "inductor",
) -> dict[str, Any]:  # fmt: skip
    """One case, run in a fresh process by `attnkit.apps.harness.run_case`."""
    import copy
    import statistics
    import time

    import torch
    import torch.nn.functional as F

    from attnkit.nn import LanguageModel

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    eager_model = LanguageModel(vocab, dim, heads, depth, **CASES[name])
    compiled_model = copy.deepcopy(eager_model)
    batches = [torch.randint(0, vocab, (batch, length + 1)) for _ in range(steps + 1)]

    def make_step(model):
        def loss_fn(tokens):
            logits = model(tokens[:, :-1])  # (B, L, V)
            return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())

        return loss_fn, torch.optim.AdamW(model.parameters(), lr=1e-3)

    eager_loss, eager_opt = make_step(eager_model)
    compiled_fn, compiled_opt = make_step(compiled_model)
    compiled_loss = torch.compile(compiled_fn, fullgraph=True, backend=backend)

    def step(loss_fn, opt, tokens) -> tuple[float, float]:
        t0 = time.perf_counter()
        loss = loss_fn(tokens)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, float(loss.detach())

    compile_s, first_compiled = step(compiled_loss, compiled_opt, batches[0])
    _, first_eager = step(eager_loss, eager_opt, batches[0])
    eager_times, compiled_times, loss_diff = [], [], abs(first_compiled - first_eager)
    for i, tokens in enumerate(batches[1:]):
        order = ((eager_loss, eager_opt, eager_times), (compiled_loss, compiled_opt, compiled_times))
        losses = []
        for loss_fn, opt, times in order if i % 2 == 0 else order[::-1]:  # alternate who goes first
            seconds, loss = step(loss_fn, opt, tokens)
            times.append(seconds)
            losses.append(loss)
        loss_diff = max(loss_diff, abs(losses[0] - losses[1]))
    return {
        "eager_s": statistics.median(eager_times),
        "compiled_s": statistics.median(compiled_times),
        "first_compiled_step_s": compile_s,
        "max_loss_difference": loss_diff,
        "steps": len(eager_times),
    }


POSITIVE = int_at_least(1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = DefaultsHelpFormatter
    parser.add_argument(
        "--cases", nargs="+", choices=sorted(CASES), default=sorted(CASES), help="attention kinds (default: all)"
    )
    parser.add_argument("--vocab", type=POSITIVE, default=512, help="vocabulary size (default 512)")
    parser.add_argument("--dim", type=POSITIVE, default=128, help="model width (default 128)")
    parser.add_argument("--heads", type=POSITIVE, default=4, help="attention heads (default 4)")
    parser.add_argument("--depth", type=POSITIVE, default=4, help="layers (default 4)")
    parser.add_argument("--batch", type=POSITIVE, default=8, help="sequences per step (default 8)")
    parser.add_argument("--length", type=POSITIVE, default=256, help="tokens per sequence (default 256)")
    parser.add_argument("--steps", type=POSITIVE, default=20, help="timed steps of each (median reported; default 20)")
    parser.add_argument("--threads", type=POSITIVE, default=None, help="torch threads in each case (default: torch's)")
    parser.add_argument(
        "--backend", default="inductor", help="torch.compile backend (default inductor; aot_eager for a quick check)"
    )
    parser.add_argument("--timeout", type=positive_float, default=900.0, help="seconds allowed per case (default 900)")
    parser.add_argument(
        "--out", default=".", help="directory for compile.json and compile.md (default: the current directory)"
    )


def run(args: argparse.Namespace) -> int:
    check_output_dir(args.out, "--out")
    from attnkit.apps.harness import progress, run_case, write_results

    load_before = os.getloadavg()[0]
    config = {
        "vocab": args.vocab, "dim": args.dim, "heads": args.heads, "depth": args.depth, "batch": args.batch,
        "length": args.length, "steps": args.steps, "threads": args.threads, "backend": args.backend,
    }  # fmt: skip
    rows = []
    for name in progress(args.cases, desc="compile", total=len(args.cases)):
        r = run_case("attnkit.apps.bench.compile:case", {"name": name, **config}, timeout=args.timeout)
        rows.append(
            {
                "case": name,
                "eager_s": r.get("eager_s"),
                "compiled_s": r.get("compiled_s"),
                "speedup": r["eager_s"] / r["compiled_s"] if "eager_s" in r else None,
                "first_compiled_step_s": r.get("first_compiled_step_s"),
                "max_loss_difference": r.get("max_loss_difference"),
                "error": r.get("error"),
            }
        )
    columns = [
        ("case", "attention"), ("eager_s", "eager step s"), ("compiled_s", "compiled step s"),
        ("speedup", "eager / compiled"), ("first_compiled_step_s", "first compiled step (compiling) s"),
        ("max_loss_difference", "largest loss difference, eager vs compiled"), ("error", "error"),
    ]  # fmt: skip
    slower = [r for r in rows if r["speedup"] is not None and r["speedup"] < 1.0]
    notes = [
        "Target 'compiled not slower than eager': "
        + ("met." if not slower else "NOT met in " + ", ".join(f"{r['case']} ({r['speedup']:.2f}x)" for r in slower)),
        "Step = forward + cross-entropy + backward + AdamW step; medians of steps alternated in one process, "
        "after the compiled copy's first step (its compile time, in its own column).",
        f"torch.compile(fullgraph=True, backend={args.backend!r}). "
        f"Model: LanguageModel(vocab={args.vocab}, dim={args.dim}, heads={args.heads}, depth={args.depth}), "
        f"batch {args.batch} x {args.length} tokens.",
    ]
    cores, busiest = os.cpu_count() or 1, max(load_before, os.getloadavg()[0])
    if busiest > cores:
        notes.append(
            f"The machine was shared: load average up to {busiest:.1f} on {cores} cores during the run, so the "
            "step times are inflated; eager and compiled steps alternate, so their ratio is the figure to read. "
            "Re-run on a quiet machine for absolute times."
        )
    json_path, md_path = write_results(
        NAME, rows, columns, out_dir=args.out, title="torch.compile: a LanguageModel training step, compiled vs eager",
        notes=notes, extra={"config": config},
    )  # fmt: skip
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")
    return 0 if all(r["error"] is None for r in rows) else 1


def main(argv: list[str] | None = None) -> int:
    return main_for("python -m attnkit.apps.bench.compile", HELP, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
