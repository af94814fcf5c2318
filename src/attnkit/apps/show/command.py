"""`attnkit show`: what a real pretrained model attends to, as a terminal summary, an HTML report and PNGs.

Usage::

    attnkit show                                  # the shipped contract example through all-MiniLM-L6-v2
    attnkit show "Some text to look at."          # your text
    attnkit show --file notes.txt --model ./my-bert-checkpoint --out report.html --png pngs/
    attnkit show --example support|news|contract|protein

This module parses the arguments, runs the analysis and writes the results: the analysis itself
is `attnkit.apps.show.pretrained.analyse` (a Hugging Face checkpoint) or
`attnkit.apps.show.protein.analyse` (the protein example), both returning an
`attnkit.apps.show.analysis.Analysis` without printing anything.
"""

from __future__ import annotations

import argparse
import sys
import time
from importlib import resources
from pathlib import Path

import numpy as np

from attnkit.apps.show.analysis import Analysis, is_word
from attnkit.apps.show.pretrained import DEFAULT_MODEL, analyse

__all__ = ["EXAMPLES", "add_arguments", "example_text", "print_summary", "run", "write_pngs"]

EXAMPLES = ("contract", "support", "news", "protein")
DEFAULT_EXAMPLE = "contract"


def example_text(name: str) -> str:
    """The text of a shipped sample document (``contract``, ``support``, ``news`` or ``protein``)."""
    if name not in EXAMPLES:
        raise ValueError(f"example must be one of {', '.join(EXAMPLES)}, got {name!r}")
    return resources.files("attnkit").joinpath("examples", f"{name}.txt").read_text(encoding="utf-8")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", nargs="?", help="the text to look at (default: the contract example)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--file", type=Path, help="read the text from this file (UTF-8)")
    source.add_argument("--example", choices=EXAMPLES, help="a shipped sample document")
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"{DEFAULT_MODEL!r} (shipped, offline) or a local Hugging Face checkpoint directory",
    )
    parser.add_argument("--out", type=Path, default=Path("report.html"), help="the HTML report (default report.html)")
    parser.add_argument("--png", type=Path, metavar="DIR", help="also write PNG figures into DIR")
    parser.add_argument("--links", type=int, default=10, help="long-range links to print (default 10)")
    parser.add_argument("--map-budget", type=int, help="full maps up to this many tokens, pooled beyond (default 384)")
    parser.add_argument(
        "--max-tokens",
        type=int,
        help="read at most this many tokens (default: the length the model was trained for; at most its positions)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads (default: torch's choice, one per core); 1 is much faster on a busy machine",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    if args.threads is not None:
        if args.threads < 1:
            print(f"attnkit show: --threads must be >= 1, got {args.threads}", file=sys.stderr)
            return 2
        import torch

        torch.set_num_threads(args.threads)
    if args.text is not None and (args.file is not None or args.example is not None):
        print("attnkit show: give TEXT, --file or --example, not several", file=sys.stderr)
        return 2
    if args.file is not None:
        try:
            text = args.file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
            print(f"attnkit show: cannot read --file {args.file}: {reason}", file=sys.stderr)
            return 2
        title = f"What the model attends to in {args.file.name}"
    elif args.text is not None:
        text, title = args.text, None
    else:
        name = args.example or DEFAULT_EXAMPLE
        text, title = example_text(name), f"The {name} example"
        if name == "protein":
            from attnkit.apps.show import protein

            if args.model != DEFAULT_MODEL:
                print(
                    "attnkit show: --example protein runs its own character-level model; drop --model", file=sys.stderr
                )
                return 2
            result = protein.analyse(text, progress=not args.no_progress)
            return _finish(args, result, start)
    try:
        result = analyse(
            text,
            model=args.model,
            title=title,
            map_budget=args.map_budget,
            max_tokens=args.max_tokens,
            progress=not args.no_progress,
        )
    except (ValueError, ImportError) as err:
        print(str(err), file=sys.stderr)
        return 2
    return _finish(args, result, start)


def _finish(args: argparse.Namespace, result: Analysis, start: float) -> int:
    from attnkit.viz.report import write_report

    data = result.data
    path = write_report(data, args.out)
    pngs = write_pngs(result, args.png) if args.png is not None else []
    print_summary(result, links=args.links)
    print()
    print(f"report: {path} ({path.stat().st_size / 2**20:.1f} MiB; open it in a browser, it works offline)")
    for png in pngs:
        print(f"figure: {png}")
    print(f"took {time.perf_counter() - start:.1f} s")
    return 0


def print_summary(result: Analysis, *, links: int = 10) -> None:
    """The terminal summary: what was read, the strongest long-range links, the heads by role."""
    data = result.data
    N, H, L = data.shape
    print(f"{data.title}: {L} tokens, {N} layers x {H} heads ({data.model})")
    for note in result.notes:
        print(f"note: {note}")
    print()
    if result.links:
        print(
            f"Strongest long-range links (at least {max(8, L // 8)} tokens apart, special tokens left out, "
            "at most two per head):"
        )
        for link in result.links[:links]:
            print(
                f"  L{link.layer}H{link.head}  {data.tokens[link.source]!r} -> {data.tokens[link.target]!r}"
                f"  distance {link.distance}, weight {link.weight:.2f}"
            )
            print(f"      {link.source_context}")
            print(f"   -> {link.target_context}")
    else:
        print("No long-range links among the strongest keys of any head.")
    if data.saliency:
        print()
        for name, values in data.saliency.items():
            order = [int(i) for i in np.argsort(-np.asarray(values), kind="stable") if is_word(data.tokens[i])][:8]
            print(f"Most salient tokens by {name}: " + ", ".join(repr(data.tokens[i]) for i in sorted(order)))
    for row in data.faithfulness:
        print(f"  faithfulness: {row['name']}: {row['value']:.4f} ({row['note']})")
    if data.roles:
        print()
        print("Heads by role:")
        by_role: dict[str, list[str]] = {}
        for row in data.roles:
            by_role.setdefault(str(row["role"]), []).append(f"L{row['layer']}H{row['head']}")
        for role, heads in sorted(by_role.items(), key=lambda kv: -len(kv[1])):
            description = data.role_descriptions.get(role, "")
            print(f"  {role:<14} {len(heads):>3}  {' '.join(heads)}")
            if description:
                print(f"  {'':<14}      {description}")


def write_pngs(result: Analysis, folder: Path) -> list[Path]:
    """The figures: the head grid, the head with the strongest long-range link, head scatter, token saliency."""
    from attnkit.viz import plots

    data = result.data
    folder.mkdir(parents=True, exist_ok=True)
    written = [
        plots.save(plots.head_grid(data.maps, layer_names=data.layer_names, title=data.title), folder / "heads.png")
    ]
    layer, head = (result.links[0].layer, result.links[0].head) if result.links else (0, 0)
    figure = plots.head_heatmap(
        data.maps[layer, head],
        data.tokens,
        edges=data.edges,
        title=f"{(data.layer_names or [f'layer {layer}'] * (layer + 1))[layer]}, head {head}",
    )
    written.append(plots.save(figure, folder / f"head_L{layer}H{head}.png"))
    if data.entropy is not None and data.mean_distance is not None:
        written.append(
            plots.save(plots.entropy_distance(data.entropy, data.mean_distance), folder / "entropy_distance.png")
        )
    for name, values in data.saliency.items():
        slug = "_".join("".join(ch if ch.isalnum() else " " for ch in name).split())
        written.append(plots.save(plots.token_strip(data.tokens, values, title=name), folder / f"saliency_{slug}.png"))
    return written
