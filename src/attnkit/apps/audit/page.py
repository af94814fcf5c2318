"""The audit's HTML summary: one self-contained file, plots drawn as inline SVG, no script, no network.

Following the conventions of `attnkit.viz.report`: every string from the input (document ids,
category names, the title) goes through `html.escape`; a Content-Security-Policy allows no
network and no script at all (the page has none; its styles are inline); nothing is loaded from
outside the file.

`render(summary)` takes plain data (the `Summary` the command assembles) and returns the page.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Summary", "render", "write"]

_STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d1f23; margin: 0;
       background: #fafbfc; }
header { padding: 14px 24px 8px; background: #fff; border-bottom: 1px solid #d7dae0; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 0 0 8px; }
main { padding: 8px 24px 40px; }
section { background: #fff; border: 1px solid #d7dae0; border-radius: 6px; padding: 12px 16px; margin: 14px 0; }
.caption { color: #5c6370; font-size: 12.5px; margin: 4px 0 8px; }
.headline li { margin: 2px 0; } .note { color: #8a4b00; }
table { border-collapse: collapse; font-size: 13px; } th, td { padding: 3px 8px; border-bottom: 1px solid #eceef1; }
th { text-align: left; font-weight: 600; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
.grid { display: flex; flex-wrap: wrap; gap: 14px; } .grid figure { margin: 0; }
figcaption { font-size: 12.5px; color: #5c6370; text-align: center; }
.legend span { display: inline-block; width: 10px; height: 10px; margin: 0 4px 0 12px; vertical-align: middle; }
.tok { background: #b8bec9; } .att { background: #1f77b4; }
"""

TOKEN_COLOR, ATTENTION_COLOR = "#b8bec9", "#1f77b4"


@dataclass
class Summary:
    """What the page shows (rows as `attnkit.apps.audit.aggregate.Corpus` and `compare` make them)."""

    title: str
    subtitle: str
    headline: list[str]
    categories: list[str]
    layers: int
    category_rows: list[dict]  # Corpus.category_rows()
    top_heads: dict[str, list[tuple[int, int, float, float]]]  # category -> Corpus.top_heads()
    sections: list[dict]  # Corpus.section_summary()
    off: list[dict]  # documents most off: {"document", "off", "over", "under"}
    skipped: list[dict]  # {"variant", "document", "reason"}
    notes: list[str] = field(default_factory=list)
    ab: list[dict] = field(default_factory=list)  # compare() rows
    ab_title: str = ""


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def _ratio(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}x"


def _interval(row: dict, key: str) -> str:
    """``"+1.23 [+0.50, +2.01]"``: ``row[key]`` and its interval ``row[key_low]``, ``row[key_high]``, in points."""
    value = row[key if key in row else f"{key}_diff"]
    return f"{100 * value:+.2f} [{100 * row[f'{key}_low']:+.2f}, {100 * row[f'{key}_high']:+.2f}]"


def _bars(rows: list[dict], categories: list[str], title: str) -> str:
    """A horizontal grouped bar chart (SVG): token share and attention share per category."""
    by = {r["category"]: r for r in rows}
    width, label_w, bar_h, gap = 300, 96, 7, 6
    top = max([r["token_share"] for r in rows] + [r["attention_share"] for r in rows] + [1e-9])
    height = len(categories) * (2 * bar_h + gap) + 6
    parts = [f'<svg width="{width}" height="{height}" role="img" aria-label="{html.escape(title)}">']
    for i, name in enumerate(categories):
        r = by.get(name, {"token_share": 0.0, "attention_share": 0.0})
        y = 3 + i * (2 * bar_h + gap)
        parts.append(
            f'<text x="{label_w - 4}" y="{y + bar_h + 3}" font-size="10" text-anchor="end">{html.escape(name)}</text>'
        )
        for j, (key, color) in enumerate((("token_share", TOKEN_COLOR), ("attention_share", ATTENTION_COLOR))):
            w = (width - label_w - 44) * r[key] / top
            parts.append(
                f'<rect x="{label_w}" y="{y + j * bar_h}" width="{w:.1f}" height="{bar_h - 1}" fill="{color}">'
                f"<title>{html.escape(name)}: {key.replace('_', ' ')} {_pct(r[key])}</title></rect>"
            )
        parts.append(
            f'<text x="{label_w + (width - label_w - 44) * max(r["token_share"], r["attention_share"]) / top + 3:.1f}" '
            f'y="{y + bar_h + 3}" font-size="9" fill="#5c6370">{_ratio(r.get("ratio"))}</text>'
        )
    parts.append("</svg>")
    return f"<figure>{''.join(parts)}<figcaption>{html.escape(title)}</figcaption></figure>"


def _heat_cell(ratio: float | None) -> str:
    if ratio is None:
        return '<td class="n"></td>'
    # log2 ratio in [-2, 2] -> white..blue (above 1) or white..orange (below 1)
    t = max(-2.0, min(2.0, math.log2(max(ratio, 1e-6)))) / 2
    rgb = (31, 119, 180) if t > 0 else (230, 120, 20)
    alpha = abs(t) * 0.75
    return f'<td class="n" style="background: rgba({rgb[0]},{rgb[1]},{rgb[2]},{alpha:.2f})">{ratio:.2f}</td>'


def _forest(rows: list[dict]) -> str:
    """A forest plot (SVG): the change B - A of each category's attention share, with its interval."""
    lo = min([r["diff_low"] for r in rows] + [0.0])
    hi = max([r["diff_high"] for r in rows] + [0.0])
    span = (hi - lo) or 1e-9
    width, label_w, row_h = 420, 110, 18
    x = lambda v: label_w + (width - label_w - 20) * (v - lo) / span
    parts = [f'<svg width="{width}" height="{len(rows) * row_h + 20}" role="img" aria-label="A/B differences">']
    parts.append(
        f'<line x1="{x(0):.1f}" y1="0" x2="{x(0):.1f}" y2="{len(rows) * row_h}" stroke="#999" stroke-dasharray="3 3"/>'
    )
    for i, r in enumerate(rows):
        y = i * row_h + row_h / 2
        parts.append(
            f'<text x="{label_w - 6}" y="{y + 4}" font-size="11" text-anchor="end">{html.escape(r["category"])}</text>'
        )
        parts.append(
            f'<line x1="{x(r["diff_low"]):.1f}" y1="{y}" x2="{x(r["diff_high"]):.1f}" y2="{y}" '
            'stroke="#1f77b4" stroke-width="2"/>'
        )
        parts.append(
            f'<circle cx="{x(r["diff"]):.1f}" cy="{y}" r="3.5" fill="#1f77b4"><title>{html.escape(r["category"])}: '
            f"{100 * r['diff']:+.2f} points [{100 * r['diff_low']:+.2f}, {100 * r['diff_high']:+.2f}]</title></circle>"
        )
    parts.append(f'<text x="{x(lo):.1f}" y="{len(rows) * row_h + 14}" font-size="10">{100 * lo:+.1f}</text>')
    parts.append(
        f'<text x="{x(hi):.1f}" y="{len(rows) * row_h + 14}" font-size="10" '
        f'text-anchor="end">{100 * hi:+.1f} points</text>'
    )
    parts.append("</svg>")
    return "".join(parts)


def _table(header: list[str], rows: list[list[str]], numeric: set[int]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            c if c.startswith("<td") else f"<td{' class=n' if i in numeric else ''}>{html.escape(c)}</td>"
            for i, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render(s: Summary) -> str:
    """The page's HTML (module docstring)."""
    esc = html.escape
    out = [f"<header><h1>{esc(s.title)}</h1><div class='caption'>{esc(s.subtitle)}</div>"]
    out += [f"<div class='note'>{esc(n)}</div>" for n in s.notes]
    out.append("</header><main>")
    out.append("<section><h2>Where attention goes</h2><ul class='headline'>")
    out += [f"<li>{esc(line)}</li>" for line in s.headline]
    out.append(
        "</ul><div class='caption'>Shares are means over documents (each counts the same); attention received "
        "by a category's tokens, as a share of all attention paid, over every layer and head.</div></section>"
    )
    legend = (
        "<div class='legend'>share of tokens<span class='tok'></span> share of attention received"
        "<span class='att'></span></div>"
    )
    figures = [_bars([r for r in s.category_rows if r["layer"] == "all"], s.categories, "all layers")]
    figures += [
        _bars([r for r in s.category_rows if r["layer"] == str(n)], s.categories, f"layer {n}") for n in range(s.layers)
    ]
    out.append(
        f"<section><h2>Share of attention vs share of tokens, per layer</h2>{legend}"
        f"<div class='grid'>{''.join(figures)}</div></section>"
    )
    by = {(r["layer"], r["category"]): r for r in s.category_rows}
    header = ["category", *[f"layer {n}" for n in range(s.layers)], "all", "95% CI (all)"]
    rows = []
    for name in s.categories:
        cells = [name] + [_heat_cell(by[(str(n), name)]["ratio"]) for n in range(s.layers)]
        r = by[("all", name)]
        cells += [_heat_cell(r["ratio"]), f"{_pct(r['ci_low'])} to {_pct(r['ci_high'])}"]
        rows.append(cells)
    out.append(
        "<section><h2>Attention share / token share, per layer</h2><div class='caption'>Above 1 (blue): the "
        "category draws more attention than its size; below 1 (orange): less. The interval is the bootstrap "
        f"95% CI of the attention share over documents.</div>{_table(header, rows, set())}</section>"
    )
    rows = [
        [name, *[f"L{n}H{h} {_pct(a)} ({_ratio(q)})" for n, h, a, q in heads]] for name, heads in s.top_heads.items()
    ]
    out.append(
        "<section><h2>The heads that matter most</h2><div class='caption'>Per category, the heads that give "
        "it the largest share of their attention (corpus mean), with that share and its ratio to the token "
        f"share.</div>{_table(['category', 'first', 'second', 'third'], rows, set())}</section>"
    )
    if s.sections:
        shares = ("token_share", "attention_share")
        rows = [
            [r["section_kind"], str(r["documents"]), *(_pct(r[k]) for k in shares), _ratio(r["ratio"])]
            for r in s.sections
        ]
        out.append(
            "<section><h2>By section kind</h2><div class='caption'>Sections found by attnkit.inspect.sections "
            "(clauses, definitions, signatures; messages by speaker; articles); means over the documents that "
            "hold each kind.</div>"
            f"{_table(['section kind', 'documents', 'tokens', 'attention', 'ratio'], rows, {1, 2, 3, 4})}</section>"
        )
    rows = [[r["document"], f"{r['off']:.3f}", r["over"], r["under"]] for r in s.off]
    out.append(
        "<section><h2>Documents where the focus is most off</h2><div class='caption'>Total variation distance "
        "between the attention shares and the token shares of the categories, special tokens left out (0: "
        "attention spreads as the tokens do), with the category most over- and most under-attended.</div>"
        f"{_table(['document', 'distance', 'most over-attended', 'most under-attended'], rows, {1})}</section>"
    )
    if s.ab:
        rows = []
        for r in s.ab:
            shares = [_pct(r["attention_share_a"]), _pct(r["attention_share_b"])]
            rows.append([r["category"], str(r["documents"]), *shares, _interval(r, "diff"), _interval(r, "excess")])
        out.append(
            f"<section><h2>A/B: {esc(s.ab_title)}</h2><div class='caption'>B - A in percentage points, "
            "mean over the documents both runs read, with the bootstrap 95% CI; excess = attention share "
            f"minus token share.</div>{_forest(s.ab)}"
            + _table(["category", "documents", "attention A", "attention B", "B - A", "excess B - A"], rows, {1, 2, 3})
            + "</section>"
        )
    if s.skipped:
        rows = [[r["variant"], r["document"], r["reason"]] for r in s.skipped]
        out.append(f"<section><h2>Skipped documents</h2>{_table(['run', 'document', 'reason'], rows, set())}</section>")
    out.append("</main>")
    csp = "default-src 'none'; style-src 'unsafe-inline'"  # no script at all; styles only inline
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><meta http-equiv="Content-Security-Policy" '
        f'content="{csp}"><title>{esc(s.title)}</title><style>{_STYLE}</style></head><body>{"".join(out)}</body></html>'
    )


def write(s: Summary, path: Path) -> Path:
    """Write `render` to ``path`` (its folder created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(s), encoding="utf-8")
    return path
