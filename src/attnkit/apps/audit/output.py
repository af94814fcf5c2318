"""What `attnkit audit` prints and writes once the documents are measured: the terminal summary, the
tables (`attnkit.apps.audit.tables`) and the HTML summary (`attnkit.apps.audit.page`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from attnkit.apps.audit import abtest, page
from attnkit.apps.audit.aggregate import Corpus
from attnkit.apps.audit.runner import Variant
from attnkit.apps.audit.tables import has_parquet, write_table

__all__ = ["COLUMNS", "LABELS", "headline", "write_outputs"]

# How the summary names each built-in category.
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
    """The ``count`` documents of ``corpus`` whose attention shares are farthest from their token shares
    (`Corpus.focus_off`), with the categories most over- and under-attended. The page passes a corpus
    without special tokens: [CLS]/[SEP] would top every document's list."""
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
            off=_off_rows(Corpus(first.docs, first.categories, first.shape, exclude_special=True), args.top),
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
