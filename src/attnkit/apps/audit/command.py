"""`attnkit audit`: where a model's attention goes over a corpus, by token category.

Usage::

    attnkit audit                                   # the shipped demo corpus through all-MiniLM-L6-v2
    attnkit audit docs/ --out audit/                # a folder of .txt files
    attnkit audit tickets.jsonl --text-column body --category product='Widget\\w*'
    attnkit audit corpus.csv --format-b strip.py    # A/B: the text as strip.py's reformat() rewrites it
    attnkit audit corpus/ --against ./other-checkpoint --resume

For each document, the attention each token receives in every layer and head (the statistics
pass, O(L) memory: `attnkit.apps.audit.measure`), summed by token category
(`attnkit.apps.audit.categories`: precedence and definitions) and by section kind, one
document at a time into a resumable results file (`attnkit.apps.audit.runner`,
`attnkit.apps.audit.store`); then the corpus figures (`attnkit.apps.audit.aggregate`), an A/B
comparison when asked (`attnkit.apps.audit.abtest`), the terminal summary, tables (CSV, Parquet
with pyarrow) and a self-contained HTML summary under ``--out`` (`attnkit.apps.audit.output`,
`attnkit.apps.audit.page`). This module reads the command line.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

from attnkit.apps.audit import abtest
from attnkit.apps.audit.categories import UserCategory, parse_category
from attnkit.apps.audit.corpus import DEMO_CORPUS, read_corpus
from attnkit.apps.audit.output import write_outputs
from attnkit.apps.audit.runner import Variant, load_checkpoints, run_variant, texts_of
from attnkit.apps.checks import UsageError, check_output_dir, int_at_least
from attnkit.apps.show.pretrained import DEFAULT_MODEL

__all__ = ["add_arguments", "check_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "corpus",
        nargs="?",
        default=DEMO_CORPUS,
        help="a folder of .txt files, a .jsonl/.csv/.parquet file, or a saved Hugging Face dataset folder "
        "(default: the shipped demo corpus of 30 contracts, tickets and news items)",
    )
    parser.add_argument("--text-column", default="text", help="the text's column in JSONL/CSV/Parquet/datasets")
    parser.add_argument("--id-column", help="a column of unique document ids (default: FILE:ROW)")
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"any model attnkit show takes (default {DEFAULT_MODEL})"
    )
    parser.add_argument("--against", metavar="MODEL", help="A/B: run the corpus through this model too")
    parser.add_argument(
        "--format-b",
        metavar="SCRIPT[:FUNCTION]",
        help="A/B: run the corpus again as FUNCTION (default reformat) rewrites it",
    )
    parser.add_argument(
        "--category",
        action="append",
        default=[],
        metavar="NAME=REGEX|NAME=@WORDS.txt",
        help="a category of your own (repeatable; it takes precedence over the built-in ones, in the order given)",
    )
    parser.add_argument(
        "--rare",
        default="vocab",
        metavar="vocab|corpus:N",
        help="rare tokens: vocab (a word the tokenizer splits into pieces; default) or corpus:N (a word in at most N "
        "documents)",
    )
    parser.add_argument(
        "--template-docs",
        type=int_at_least(2),
        default=3,
        help="a line repeated in at least this many documents is template boilerplate (default 3)",
    )
    parser.add_argument(
        "--window", type=int_at_least(3), help="tokens per window (default: the length the model was trained for)"
    )
    parser.add_argument(
        "--exclude-special",
        action="store_true",
        help="shares among the other tokens: leave out [CLS]/[SEP]/BOS, which many heads use as a no-op target",
    )
    parser.add_argument("--limit", type=int_at_least(1), help="read only the first N documents")
    parser.add_argument("--out", type=Path, default=Path("audit-out"), help="output folder (default audit-out)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    parser.add_argument("--overwrite", action="store_true", help="start afresh even if --out holds a run")
    parser.add_argument("--bootstrap", type=int_at_least(100), default=2000, help="bootstrap resamples (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="the bootstrap's random seed (default 0)")
    parser.add_argument("--top", type=int_at_least(1), default=10, help="documents listed as most off (default 10)")
    parser.add_argument("--threads", type=int_at_least(1), help="torch intra-op threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _parse_rare(value: str) -> str | int:
    if value == "vocab":
        return "vocab"
    if value.startswith("corpus:"):
        try:
            n = int(value[len("corpus:") :])
        except ValueError:
            n = -1
        if n >= 1:
            return n
    raise UsageError(f"--rare expected vocab or corpus:N with an integer N >= 1, got {value!r}")


def check_arguments(args: argparse.Namespace) -> None:
    """What can be checked before anything is read or loaded; fills ``args.user``, ``args.rare_rule``,
    ``args.reformat``.

    Raises:
        UsageError: naming the argument: a bad ``--category``, ``--rare``, ``--format-b``, ``--out``, both
            ``--resume`` and ``--overwrite``.
    """
    users: list[UserCategory] = []
    for value in args.category:
        try:
            users.append(parse_category(value, taken=[u.name for u in users]))
        except ValueError as err:
            raise UsageError(str(err)) from None
    args.user = tuple(users)
    args.rare_rule = _parse_rare(args.rare)
    if args.resume and args.overwrite:
        raise UsageError("--resume continues the run in --out and --overwrite starts it again; give one")
    args.reformat = None
    if args.format_b is not None:
        try:
            args.reformat = abtest.load_format(args.format_b)
        except ValueError as err:
            raise UsageError(str(err)) from None
    check_output_dir(args.out, "--out")


def run(args: argparse.Namespace, *, measure_hook: Callable | None = None) -> int:
    """Read the corpus, measure every document (A, then B for an A/B run), write the outputs; exit status.

    ``measure_hook(doc_id)``: called before each document is measured (`attnkit.apps.audit.runner.run_variant`).
    """
    start = time.perf_counter()
    check_arguments(args)
    documents = read_corpus(args.corpus, text_column=args.text_column, id_column=args.id_column)
    seen: set[str] = set()
    for doc in documents:
        if doc.id in seen:
            raise UsageError(f"--id-column {args.id_column}: the id {doc.id!r} appears twice; ids must be unique")
        seen.add(doc.id)
    if args.limit is not None:
        documents = documents[: args.limit]
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    a_texts, a_skipped = texts_of(documents, None)
    variants = [Variant("a", f"A: {args.model}", args.model, a_texts, a_skipped)]
    if args.against is not None or args.reformat is not None:
        b_texts, b_skipped = texts_of(documents, args.reformat)
        label = f"B: {args.against or args.model}" + (f", text by {args.format_b}" if args.format_b else "")
        variants.append(Variant("b", label, args.against or args.model, b_texts, b_skipped, args.format_b))
    checkpoints = load_checkpoints(args, variants)
    for variant in variants:
        run_variant(args, variant, checkpoints[variant.model], measure_hook=measure_hook)
    write_outputs(args, variants)
    print(f"took {time.perf_counter() - start:.1f} s")
    return 0
