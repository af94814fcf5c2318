"""`attnkit audit`: where a model's attention goes over a corpus, by token category.

Usage::

    attnkit audit                                   # the shipped demo corpus through all-MiniLM-L6-v2
    attnkit audit docs/ --out audit/                # a folder of .txt files
    attnkit audit tickets.jsonl --text-column body --category product='Widget\\w*'
    attnkit audit corpus.csv --format-b strip.py    # A/B: the text as strip.py's reformat() rewrites it
    attnkit audit corpus/ --against ./other-checkpoint --resume

For each document, the attention each token receives in every layer and head (the statistics
pass, O(L) memory: `attnkit.apps.audit.measure`), summed by token category
(`attnkit.apps.audit.categories`: precedence and definitions) and by section kind; then the
corpus figures (`attnkit.apps.audit.aggregate`), an A/B comparison when asked
(`attnkit.apps.audit.abtest`), tables (CSV, Parquet with pyarrow) and a self-contained HTML
summary (`attnkit.apps.audit.page`) under ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from attnkit.apps.audit import abtest, page
from attnkit.apps.audit.aggregate import Corpus, DocResult, doc_result
from attnkit.apps.audit.categories import CorpusProfile, Tagger, UserCategory, parse_category
from attnkit.apps.audit.corpus import DEMO_CORPUS, Document, read_corpus
from attnkit.apps.audit.store import ResultsFile
from attnkit.apps.audit.tables import has_parquet, write_table
from attnkit.apps.checks import UsageError, check_output_dir, int_at_least
from attnkit.apps.show.pretrained import DEFAULT_MODEL

__all__ = [
    "LABELS",
    "Variant",
    "add_arguments",
    "check_arguments",
    "headline",
    "load_checkpoints",
    "run",
    "run_variant",
]

FORMAT_VERSION = 1
# How the headline names each built-in category.
LABELS = {
    "special": "special tokens",
    "date": "dates",
    "amount": "amounts and numbers",
    "defined_term": "defined terms",
    "name": "names",
    "rare": "rare tokens",
    "boilerplate": "boilerplate",
    "other": "other",
}


# The columns of the tables that may be empty (a run with no skipped document still writes the header).
COLUMNS = {"skipped": ["variant", "document", "reason"]}


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


# ----------------------------------------------------------------------------- one run over the corpus
@dataclass
class Variant:
    """One pass over the corpus: a model and the texts it reads (the original, or reformatted)."""

    key: str  # "a" or "b"
    label: str  # what it is, for the summary
    model: str
    texts: dict[str, str]  # id -> text to read
    skipped: dict[str, str]  # id -> reason it cannot be read
    reformat: str | None = None  # the --format-b script, or None
    docs: list[DocResult] = field(default_factory=list)
    shape: tuple[int, int] = (0, 0)
    categories: tuple[str, ...] = ()
    rows: list[dict] = field(default_factory=list)  # Corpus.category_rows() once measured


def _texts(documents: list[Document], reformat: Callable[[str], str] | None) -> tuple[dict, dict]:
    texts, skipped = {}, {}
    for doc in documents:
        if doc.text is None:
            skipped[doc.id] = doc.error or "unreadable"
            continue
        text = doc.text
        if reformat is not None:
            try:
                text = reformat(text)
            except Exception as err:  # the user's function: a failure on one document skips that document
                skipped[doc.id] = f"--format-b failed on it ({type(err).__name__}: {err})"
                continue
            if not isinstance(text, str):
                skipped[doc.id] = f"--format-b returned a {type(text).__name__}, not a str"
                continue
            if not text.strip():
                skipped[doc.id] = "empty after --format-b"
                continue
        texts[doc.id] = text
    return texts, skipped


def _checkpoint(model: str, option: str):
    from attnkit.apps.show.pretrained import load_checkpoint

    try:
        return load_checkpoint(model)
    except UsageError as err:
        raise UsageError(str(err).replace("--model", option)) from None


def _header(args, variant: Variant, checkpoint, tagger: Tagger, window: int) -> dict:
    template = hashlib.sha256("\n".join(sorted(tagger.profile.template)).encode()).hexdigest()[:16]
    script = None
    if variant.reformat is not None:
        path = Path(variant.reformat.rsplit(":", 1)[0] if not Path(variant.reformat).is_file() else variant.reformat)
        script = f"{variant.reformat} sha256:{hashlib.sha256(path.read_bytes()).hexdigest()[:16]}"
    return {
        "format": FORMAT_VERSION,
        "variant": variant.key,
        "model": checkpoint.name,
        "window": window,
        "categories": list(tagger.categories),
        "user": [u.source for u in tagger.user],
        "rare": tagger.rare,
        "template_docs": args.template_docs,
        "template": template,
        "format_b": script,
    }


def load_checkpoints(args, variants: list[Variant]) -> dict[str, Any]:
    """``{model: Checkpoint}`` for every variant's model, loaded once each, ``--window`` checked against each
    before any document is measured.

    Raises:
        UsageError: naming ``--model`` or ``--against`` (an unreadable checkpoint) or ``--window`` (too long).
    """
    loaded: dict[str, Any] = {}
    for variant in variants:
        if variant.model in loaded:
            continue
        option = "--against" if variant.key == "b" else "--model"
        checkpoint = loaded[variant.model] = _checkpoint(variant.model, option)
        if args.window is not None and args.window > checkpoint.max_length:
            raise UsageError(
                f"--window must be at most {checkpoint.max_length} for {checkpoint.name}, got {args.window}"
            )
    return loaded


def run_variant(args, variant: Variant, checkpoint, *, measure_hook: Callable | None = None) -> None:
    """Measure every document of ``variant`` not already in its results file; fills ``variant.docs``.

    ``checkpoint``: its model, loaded (`load_checkpoints`). ``measure_hook(doc_id)``: called before each
    document is measured (tests use it to interrupt a run).
    """
    from tqdm.auto import tqdm

    from attnkit.apps.audit.measure import Measurer

    window = args.window or checkpoint.length
    texts = list(variant.texts.values())
    profile = CorpusProfile.of(texts, template_docs=args.template_docs, words=variant_rare_corpus(args))
    tagger = Tagger(args.user, profile, args.rare_rule)
    measurer = Measurer(checkpoint, tagger, window=window)
    variant.categories = tagger.categories
    path = args.out / f"results-{variant.key}.jsonl"
    with ResultsFile(
        path, _header(args, variant, checkpoint, tagger, window), resume=args.resume, overwrite=args.overwrite
    ) as results:
        for doc_id, reason in variant.skipped.items():
            if doc_id not in results.done:
                results.add({"id": doc_id, "status": "skipped", "reason": reason})
        todo = [i for i in variant.texts if i not in results.done]
        bar = tqdm(
            total=len(variant.texts),
            initial=len(variant.texts) - len(todo),
            unit="doc",
            desc=variant.label,
            disable=args.no_progress or None,
            leave=False,
            dynamic_ncols=True,
        )
        try:
            for doc_id in todo:
                if measure_hook is not None:
                    measure_hook(doc_id)
                start = time.perf_counter()
                try:
                    measured = measurer.measure(variant.texts[doc_id])
                except (ValueError, RuntimeError) as err:  # one bad document is reported, never fatal
                    results.add({"id": doc_id, "status": "skipped", "reason": f"{type(err).__name__}: {err}"})
                else:
                    row = doc_result(doc_id, measured, tagger.categories, time.perf_counter() - start).to_json()
                    results.add(row)
                bar.update(1)
        finally:
            bar.close()
        rows = results.done
    ok = [r for r in rows.values() if r.get("status") == "ok"]
    layers, heads = np.asarray(next(iter(ok[0]["received"].values()))).shape if ok else (0, 0)
    variant.shape = (int(layers), int(heads))
    order = list(variant.texts) + list(variant.skipped)
    variant.docs = [DocResult.from_json(rows[i]) for i in order if i in rows and rows[i].get("status") == "ok"]
    variant.skipped = {i: rows[i]["reason"] for i in order if i in rows and rows[i].get("status") == "skipped"}


def variant_rare_corpus(args) -> bool:
    """Whether ``--rare corpus:N`` asks for the corpus's word frequencies."""
    return isinstance(args.rare_rule, int)


# ----------------------------------------------------------------------------- summary
def headline(corpus: Corpus, *, layer: str = "all", rows: list[dict] | None = None) -> list[str]:
    """One line per category: ``"dates: 4.1% of tokens, 10.9% of attention received (2.7x)"``."""
    rows = rows if rows is not None else corpus.category_rows(draws=200)
    lines = []
    for r in rows:
        if r["layer"] != layer or r["token_share"] == 0:
            continue
        label = LABELS.get(r["category"], r["category"])
        lines.append(
            f"{label}: {100 * r['token_share']:.1f}% of tokens, {100 * r['attention_share']:.1f}% of attention "
            f"received ({r['ratio']:.1f}x; 95% CI {100 * r['ci_low']:.1f}-{100 * r['ci_high']:.1f}%)"
        )
    if layer == "all" and {"date", "amount"} <= set(corpus.categories):
        tokens, attention = corpus.combined(("date", "amount"))
        if tokens > 0:
            lines.insert(
                0,
                f"dates and amounts: {100 * tokens:.1f}% of tokens, {100 * attention:.1f}% of attention received "
                f"({attention / tokens:.1f}x)",
            )
    return lines


def _off_rows(corpus: Corpus, count: int) -> list[dict]:
    off = corpus.focus_off()
    overall = corpus.overall()
    rows = []
    for d in np.argsort(-off, kind="stable")[:count].tolist():
        gap = overall[d] - corpus.tokens[d]
        rows.append(
            {
                "document": corpus.ids[d],
                "off": float(off[d]),
                "over": f"{corpus.categories[int(gap.argmax())]} ({100 * gap.max():+.1f} points)",
                "under": f"{corpus.categories[int(gap.argmin())]} ({100 * gap.min():+.1f} points)",
            }
        )
    return rows


def _print_summary(variant: Variant, corpus: Corpus, rows: list[dict]) -> None:
    print(f"{variant.label}: {len(corpus)} documents, {variant.shape[0]} layers x {variant.shape[1]} heads")
    for line in headline(corpus, rows=rows):
        print(f"  {line}")
    print("  ratio attention/token share per layer:")
    by = {(r["layer"], r["category"]): r for r in rows}
    N = variant.shape[0]
    print("    " + f"{'category':<14}" + "".join(f"{'L' + str(n):>7}" for n in range(N)))
    for name in corpus.categories:
        cells = [by[(str(n), name)]["ratio"] for n in range(N)]
        if cells[0] is not None:
            print("    " + f"{name:<14}" + "".join(f"{c:>7.2f}" for c in cells))
    for name in corpus.categories:
        if name in ("special", "other") or corpus.tokens[:, corpus.categories.index(name)].sum() == 0:
            continue
        heads = ", ".join(f"L{n}H{h} {100 * a:.1f}% ({q:.1f}x)" for n, h, a, q in corpus.top_heads(name))
        print(f"  heads giving {LABELS.get(name, name)} most attention: {heads}")


def run(args: argparse.Namespace, *, measure_hook: Callable | None = None) -> int:
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
    a_texts, a_skipped = _texts(documents, None)
    variants = [Variant("a", f"A: {args.model}", args.model, a_texts, a_skipped)]
    if args.against is not None or args.reformat is not None:
        b_texts, b_skipped = _texts(documents, args.reformat)
        label = f"B: {args.against or args.model}" + (f", text by {args.format_b}" if args.format_b else "")
        variants.append(Variant("b", label, args.against or args.model, b_texts, b_skipped, args.format_b))
    checkpoints = load_checkpoints(args, variants)
    for variant in variants:
        run_variant(args, variant, checkpoints[variant.model], measure_hook=measure_hook)
    write_outputs(args, variants)
    print(f"took {time.perf_counter() - start:.1f} s")
    return 0


def _notes(args) -> list[str]:
    notes = []
    if args.exclude_special:
        notes.append(
            "Special tokens left out (--exclude-special): the shares are of the other tokens and of the attention "
            "paid to them."
        )
    if not has_parquet():
        notes.append("Tables written as CSV only: install pyarrow (attnkit[audit]) for Parquet.")
    return notes


def _points(value: float, low: float, high: float) -> str:
    """``"+1.23 [+0.50, +2.01]"``: a share difference in percentage points and its interval."""
    return f"{100 * value:+6.2f} [{100 * low:+.2f}, {100 * high:+.2f}]"


def write_outputs(args, variants: list[Variant]) -> None:
    """The tables, the HTML summary and the terminal summary of a finished run."""
    out: Path = args.out
    tables: dict[str, list[dict]] = {k: [] for k in ("documents", "categories", "heads", "sections", "skipped")}
    corpora = []
    for v in variants:
        corpus = Corpus(v.docs, v.categories, v.shape, exclude_special=args.exclude_special)
        corpora.append(corpus)
        if not len(corpus):
            print(f"{v.label}: no document could be read")
            continue
        rows = corpus.category_rows(draws=args.bootstrap, seed=args.seed)
        tag = {"variant": v.key} if len(variants) > 1 else {}
        tables["categories"] += [{**tag, **r} for r in rows]
        tables["documents"] += [{**tag, **r} for r in corpus.document_rows()]
        tables["heads"] += [{**tag, **r} for r in corpus.head_rows()]
        tables["sections"] += [{**tag, **r} for r in corpus.section_rows()]
        _print_summary(v, corpus, rows)
        v.rows = rows
    for v in variants:
        tables["skipped"] += [{"variant": v.key, "document": i, "reason": r} for i, r in v.skipped.items()]
        for i, reason in v.skipped.items():
            print(f"skipped ({v.key}) {i}: {reason}", file=sys.stderr)
    ab_rows: list[dict] = []
    if len(variants) == 2 and len(corpora[0]) and len(corpora[1]):
        ab_rows, _ = abtest.compare(corpora[0], corpora[1], draws=args.bootstrap, seed=args.seed)
        tables["ab"] = ab_rows
        print(
            f"A/B ({variants[1].label} against {variants[0].label}), B - A over "
            f"{ab_rows[0]['documents'] if ab_rows else 0} documents, attention share in points [95% CI]; "
            "excess = attention - token share:"
        )
        for r in ab_rows:
            diff = _points(r["diff"], r["diff_low"], r["diff_high"])
            print(
                f"  {r['category']:<14} {diff}   excess {_points(r['excess_diff'], r['excess_low'], r['excess_high'])}"
            )
    written = []
    for name, rows in tables.items():
        written += write_table(rows, out, name, columns=COLUMNS.get(name))
    first = variants[0]
    if len(corpora[0]):
        corpus = corpora[0]
        summary = page.Summary(
            title=f"Where {first.model} attends, by token category",
            subtitle=f"{len(corpus)} documents of {args.corpus}; {first.shape[0]} layers x {first.shape[1]} heads; "
            f"{sum(len(v.skipped) for v in variants)} skipped",
            headline=headline(corpus, rows=first.rows),
            categories=list(corpus.categories),
            layers=first.shape[0],
            category_rows=first.rows,
            top_heads={
                c: corpus.top_heads(c)
                for c in corpus.categories
                if c != "other" and corpus.tokens[:, corpus.categories.index(c)].sum() > 0
            },
            sections=corpus.section_summary(),
            off=_off_rows(corpus, args.top),
            skipped=tables["skipped"],
            ab=ab_rows,
            ab_title=f"{variants[-1].label} against {first.label}",
            notes=_notes(args),
        )
        written.append(page.write(summary, out / "summary.html"))
    print(f"wrote {', '.join(p.name for p in written)} in {out}")
    if not has_parquet():
        print("note: install pyarrow (pip install 'attnkit[audit]') to also get the tables as Parquet")
    (out / "settings.json").write_text(
        json.dumps(
            {"corpus": str(args.corpus), "model": args.model, "against": args.against, "format_b": args.format_b},
            indent=1,
        )
    )
