"""`attnkit show`: what a real pretrained model attends to, as a terminal summary, an HTML report and PNGs.

Usage::

    attnkit show                                  # the shipped contract example through all-MiniLM-L6-v2
    attnkit show "Some text to look at."          # your text
    attnkit show --file notes.txt --model ./my-bert-checkpoint --out report.html --png pngs/
    attnkit show --example support|news|contract|protein
    attnkit show --example contract-long          # a 20-page contract: sections, what draws on what
    attnkit show --model ./my-llama --file contract.txt --sections auto   # a long-context checkpoint

This module parses the arguments, runs the analysis and writes the results: the analysis itself
(`attnkit.apps.show.api.analyse_text`; `attnkit.apps.show.api.show` is the same from Python)
is `attnkit.apps.show.pretrained.analyse` (a Hugging Face checkpoint) or
`attnkit.apps.show.protein.analyse` (the protein example), both returning an
`attnkit.apps.show.analysis.Analysis` without printing anything.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from attnkit.apps.checks import UsageError, check_output_dir, check_output_file, int_at_least, require_module
from attnkit.apps.show.analysis import Analysis, is_word
from attnkit.apps.show.api import DEFAULT_EXAMPLE, EXAMPLES, PROTEIN, analyse_text, example_text
from attnkit.apps.show.pretrained import DEFAULT_MODEL
from attnkit.inspect.sections import parse_sections_arg

__all__ = [
    "EXAMPLES",
    "add_arguments",
    "check_arguments",
    "example_text",
    "print_sections",
    "print_summary",
    "read_text",
    "run",
    "section_lines",
    "write_pngs",
]


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
        help="read at most this many tokens (default: the model's position limit for --file and --example, the "
        "length it was trained for otherwise)",
    )
    parser.add_argument(
        "--sections",
        default="auto",
        metavar="auto|paragraphs|lines|regex:PATTERN|FILE.json",
        help="how to cut the text into sections (clauses, messages, articles, domains; default auto: from the "
        "text's own patterns); FILE.json: a list of [start, end] or [title, start, end] character spans",
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
    if args.example in PROTEIN:
        if args.model != DEFAULT_MODEL:
            raise UsageError(f"--example {args.example} runs its own character-level model; drop --model")
        if args.max_tokens is not None:
            raise UsageError(f"--example {args.example} reads the whole sequence; drop --max-tokens")
    try:
        args.sections_kind = parse_sections_arg(args.sections)
    except ValueError as err:
        raise UsageError(str(err)) from None
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
    result = analyse_text(
        text,
        example=example,
        title=title,
        model=args.model,
        sections=getattr(args, "sections_kind", args.sections),
        map_budget=args.map_budget,
        max_tokens=args.max_tokens,
        progress=_progress(args),
        whole=args.text is None,
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
    if result.sections is not None:
        print()
        print_sections(result)
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


def section_lines(result: Analysis, *, count: int = 6) -> list[str]:
    """The summary's sentences about sections: which draw most on distant sections, and on which."""
    view = result.sections
    N, H, _ = result.data.shape
    S = len(view.sections)
    if S < 3:
        return [f"{S} section{'s' if S != 1 else ''}: too few for sections two or more apart (--sections)."]
    lines = [
        f"Sections ({S}): those that draw most on sections two or more away, first. Flow = the mean attention a "
        f"token of the section pays to another section, averaged over {N} layers x {H} heads (each head counts "
        "the same; special tokens such as [CLS]/BOS left out):"
    ]
    for draw in view.draws[:count]:
        parts = []
        for b, weight, gap in draw.sources:
            where = f"{-gap} section{'s' if -gap != 1 else ''} back" if gap < 0 else f"{gap} sections ahead"
            parts.append(f"{view.sections[b]} ({weight:.2f}, {where})")
        lines.append(
            f"  {view.sections[draw.section]} draws on {' and '.join(parts)}; "
            f"{draw.far:.2f} of its attention goes 2+ sections away"
        )
    if not view.draws:
        lines.append("  none: every head keeps to its own and the neighbouring sections.")
    return lines


def print_sections(result: Analysis) -> None:
    """The sections summary, then the heads by section reach (`attnkit.inspect.section_roles`)."""
    from attnkit.inspect import SECTION_ROLE_DESCRIPTIONS

    for line in section_lines(result):
        print(line)
    view = result.sections
    if len(view.sections) < 3:
        return
    print()
    print("Heads by section reach (from the section flow's diagonal: the share of a head's attention inside the")
    print("reader's own section, and two or more sections away; means over the heads of each group):")
    by_role: dict[str, list[dict]] = {}
    for row in view.roles:
        by_role.setdefault(row["section_role"], []).append(row)
    for role in SECTION_ROLE_DESCRIPTIONS:
        rows = by_role.get(role, [])
        if rows:
            within = sum(r["within"] for r in rows) / len(rows)
            far = sum(r["far"] for r in rows) / len(rows)
            heads = " ".join(f"L{r['layer']}H{r['head']}" for r in rows)
            print(f"  {role:<18} {len(rows):>3}  within {within:.2f}, far {far:.2f}: {heads}")
            print(f"  {'':<18}      {SECTION_ROLE_DESCRIPTIONS[role]}")


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
