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

from attnkit.apps.checks import UsageError, check_output_dir, check_output_file, int_at_least, require_module
from attnkit.apps.show.analysis import Analysis, is_word
from attnkit.apps.show.pretrained import DEFAULT_MODEL, analyse

__all__ = [
    "EXAMPLES",
    "add_arguments",
    "check_arguments",
    "example_text",
    "print_summary",
    "read_text",
    "run",
    "write_pngs",
]

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
        help=f"{DEFAULT_MODEL!r} (shipped, offline) or a local Hugging Face checkpoint directory with safetensors "
        "weights",
    )
    parser.add_argument("--out", type=Path, default=Path("report.html"), help="the HTML report (default report.html)")
    parser.add_argument("--png", type=Path, metavar="DIR", help="also write PNG figures into DIR (needs matplotlib)")
    parser.add_argument("--links", type=int_at_least(0), default=10, help="long-range links to print (default 10)")
    parser.add_argument(
        "--map-budget",
        type=int_at_least(0),
        help="full maps up to this many tokens, pooled beyond (default 384; 0: always pooled)",
    )
    parser.add_argument(
        "--max-tokens",
        type=int_at_least(3),
        help="read at most this many tokens (default: the length the model was trained for; at most its positions)",
    )
    parser.add_argument(
        "--threads",
        type=int_at_least(1),
        help="torch intra-op threads (default: torch's choice, one per core); 1 is much faster on a busy machine",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar (there is one only when stderr is a terminal)"
    )


def check_arguments(args: argparse.Namespace) -> None:
    """Everything about the command line that can be checked before the model loads.

    Raises:
        UsageError: two sources of text, an empty text, an option the protein example does not
            take, an output path that cannot be written, ``--png`` without matplotlib.
    """
    if args.text is not None and (args.file is not None or args.example is not None):
        raise UsageError("give TEXT, --file or --example, not several")
    if args.text is not None and not args.text.strip():
        raise UsageError("TEXT is empty")
    if args.example == "protein":
        if args.model != DEFAULT_MODEL:
            raise UsageError("--example protein runs its own character-level model; drop --model")
        if args.max_tokens is not None:
            raise UsageError("--example protein reads the whole sequence; drop --max-tokens")
    check_output_file(args.out, "--out")
    if args.png is not None:
        check_output_dir(args.png, "--png")
        if args.png.resolve() == args.out.resolve():
            raise UsageError(f"--png {args.png} is also the --out report; give them different paths")
        require_module("matplotlib", "--png", "pip install 'attnkit[viz]'")


def read_text(args: argparse.Namespace) -> tuple[str, str | None, str | None]:
    """``(text, title, example)``: what to read, the report's title (None: the model's name) and the example's name."""
    if args.file is not None:
        try:
            text = args.file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            reason = (err.strerror or str(err)) if isinstance(err, OSError) else "not UTF-8 text"
            raise UsageError(f"cannot read --file {args.file}: {reason}") from None
        if not text.strip():
            raise UsageError(f"--file {args.file} holds no text")
        return text, f"What the model attends to in {args.file.name}", None
    if args.text is not None:
        return args.text, None, None
    name = args.example or DEFAULT_EXAMPLE
    return example_text(name), f"The {name} example", name


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    check_arguments(args)
    text, title, example = read_text(args)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    if example == "protein":
        from attnkit.apps.show import protein

        result = protein.analyse(text, progress=_progress(args), map_budget=args.map_budget)
        return _finish(args, result, start)
    result = analyse(
        text,
        model=args.model,
        title=title,
        map_budget=args.map_budget,
        max_tokens=args.max_tokens,
        progress=_progress(args),
    )
    return _finish(args, result, start)


def _progress(args: argparse.Namespace) -> bool:
    return not args.no_progress and sys.stderr.isatty()


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
