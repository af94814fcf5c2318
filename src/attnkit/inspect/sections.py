"""Sections: split a long document into the parts people reason about, and map them onto tokens.

People read a contract by clauses, a support history by messages, a news bundle by
articles and a protein by domains, not in tiles of 96 tokens. `sections` partitions a
text into such character spans; `token_boundaries` turns them into the token edges that
``attnkit.attention_stats(..., pool=edges)`` pools attention over, so every statistic
can be read as "section a draws on section b".

    from attnkit.inspect import sections, token_boundaries

    secs = sections(text)                        # kind="auto": clauses, messages, articles, ...
    enc = tokenizer(text, return_offsets_mapping=True)
    edges, kept = token_boundaries(secs, enc["offset_mapping"], len(enc["input_ids"]))
    st = attnkit.attention_stats(q, k, v, pool=edges)   # pooled: (B, H, S, S)

`parse_sections_arg` reads the command line's ``--sections auto|paragraphs|lines|regex:PATTERN|FILE.json``.
"""

from __future__ import annotations

import json
import re
import warnings
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "KINDS",
    "Section",
    "detect_kind",
    "parse_sections_arg",
    "sections",
    "token_boundaries",
]

#: The named kinds `sections` accepts (besides ``"regex:PATTERN"`` and a list of spans).
KINDS = ("auto", "clauses", "messages", "articles", "protein", "paragraphs", "lines")

_TITLE_CHARS = 60  # titles are cut to this many characters ("..." marks a cut)


@dataclass(frozen=True)
class Section:
    """One part of a text: the characters ``text[start:end]`` (``end`` exclusive).

    ``title`` says what it is ("Availability", "[12 Aug] Customer", a headline, "SH3");
    ``label`` says where it sits ("1.3", "msg 14", "article 2", "residues 51-100"), or "".
    ``str(section)`` gives both: ``1.3 "Availability"``.
    """

    title: str
    start: int
    end: int
    label: str = ""

    def __str__(self) -> str:
        if self.label and self.title and self.title != self.label:
            return f'{self.label} "{self.title}"'
        return self.label or self.title


# ----------------------------------------------------------------------------------------
# Small helpers: lines with their offsets, titles, the partition itself.


@dataclass(frozen=True)
class _Line:
    start: int  # offset of the line's first character
    end: int  # offset just past its line break
    body: str  # the line without its line break

    @property
    def blank(self) -> bool:
        return not self.body.strip()


def _lines(text: str) -> list[_Line]:
    out, pos = [], 0
    for raw in text.splitlines(keepends=True):
        out.append(_Line(pos, pos + len(raw), raw.rstrip("\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")))
        pos += len(raw)
    return out


def _shorten(s: str, n: int = _TITLE_CHARS) -> str:
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - 3].rstrip() + "..."


def _partition(text: str, heads: list[tuple[int, str, str]], *, none_title: str = "(whole text)") -> list[Section]:
    """Sections from ``(start, title, label)`` heads: each runs to the next head.

    Text before the first head becomes a "(preamble)" section, unless it is only whitespace
    (then the first section starts at 0). No head: one section, the whole text.
    """
    if not text:
        return []
    heads = sorted({h[0]: h for h in reversed(heads)}.values())  # one head per offset, the first given
    heads = [h for h in heads if 0 <= h[0] < len(text)]
    if not heads:
        return [Section(none_title, 0, len(text), "")]
    if heads[0][0] > 0:
        if text[: heads[0][0]].strip():
            heads.insert(0, (0, "(preamble)", ""))
        else:
            heads[0] = (0, *heads[0][1:])
    ends = [h[0] for h in heads[1:]] + [len(text)]
    return [Section(title, start, end, label) for (start, title, label), end in zip(heads, ends)]


# ----------------------------------------------------------------------------------------
# Contracts and policies: numbered clauses and headings.

_CLAUSE_NUMBERED = re.compile(r"[ \t]*(?P<num>\d{1,3}(?:\.\d{1,3})+\.?|\d{1,3}\.)[ \t]+(?P<rest>\S.*)")
_CLAUSE_BARE = re.compile(r"[ \t]*(?P<num>\d{1,3})[ \t]+(?P<rest>[A-Z].*)")
_CLAUSE_WORD = re.compile(
    r"[ \t]*(?P<word>article|section|clause|schedule|annex|appendix|exhibit|part)[ \t]+"
    r"(?P<num>\d{1,3}(?:\.\d{1,3})*|[IVXLC]{1,7}|[A-Z])(?![\w])\.?[ \t]*(?:[-–—:.][ \t]*)?(?P<rest>.*)",
    re.IGNORECASE,
)
_DEFINED_TERM = re.compile(
    r"[\"“'‘](?P<term>[^\"”'’\n]{1,60})[\"”'’][ \t]+(?:means|shall mean|has the meaning|includes|refers)"
)
_INLINE_HEADING = re.compile(r"(?P<head>[A-Z][^.!?:;\n]{0,60}?)\.[ \t]+\S")


def _heading_like(s: str, max_words: int = 12) -> bool:
    """A short line that reads like a heading: few words, no sentence-ending punctuation."""
    s = s.strip()
    return bool(s) and len(s.split()) <= max_words and len(s) <= 100 and s[-1] not in ".,;:"


_VERBS = frozenset(
    ["shall", "may", "must", "will", "is", "are", "was", "were", "means", "has", "have", "does", "do", "can"]
)


def _inline_heading(s: str) -> bool:
    """A few words before the first full stop that read as a heading ("Service Credits",
    "Long-stop date"), not as a sentence (no "shall", "may", "is", "means"...)."""
    words = s.split()
    return 0 < len(words) <= 6 and not any(w.lower() in _VERBS for w in words)


def _clause_title(rest: str) -> str:
    rest = rest.strip()
    if _heading_like(rest):
        return _shorten(rest)
    m = _DEFINED_TERM.match(rest)
    if m:
        return _shorten(m.group("term"))
    m = _INLINE_HEADING.match(rest)
    if m and _inline_heading(m.group("head")):
        return _shorten(m.group("head"))
    return _shorten(rest, 40)


def _caps_heading(body: str) -> bool:
    s = body.strip()
    letters = [c for c in s if c.isalpha()]
    return (
        len(letters) >= 4
        and len(s) <= 80
        and not any(c.islower() for c in s)
        and len(letters) >= 0.6 * len(s.replace(" ", ""))
        and s[-1] not in ".,;"
    )


def _clause_heads(lines: list[_Line]) -> list[tuple[int, str, str]]:
    """``(start, title, label)`` of every clause or heading line.

    A candidate counts when it starts the text, follows a blank line, follows another
    heading, or follows a line that ends a sentence (``. : ; ! ? ) ] "``); this keeps a
    wrapped line that happens to begin with "99.5" or "Section 4 of" out.
    """
    heads: list[tuple[int, str, str]] = []
    prev_ok, prev_head = True, False
    for line in lines:
        body = line.body
        if line.blank:
            prev_ok, prev_head = True, False
            continue
        head = None
        if prev_ok or prev_head:
            m = _CLAUSE_WORD.fullmatch(body)
            if m and (not m.group("rest") or m.group("rest")[0] in "\"“'(" or m.group("rest")[0].isupper()):
                label = f"{m.group('word').capitalize()} {m.group('num')}"
                head = (line.start, _clause_title(m.group("rest")) if m.group("rest").strip() else label, label)
            elif (m := _CLAUSE_NUMBERED.fullmatch(body)) and (
                m.group("rest")[0] in "\"“'‘(" or m.group("rest")[0].isupper()
            ):
                head = (line.start, _clause_title(m.group("rest")), m.group("num").rstrip("."))
            elif (m := _CLAUSE_BARE.fullmatch(body)) and _heading_like(m.group("rest"), 10):
                head = (line.start, _shorten(m.group("rest")), m.group("num"))
            elif _caps_heading(body):
                head = (line.start, _shorten(body), "")
        if head is not None:
            heads.append(head)
        stripped = body.rstrip()
        prev_head = head is not None
        prev_ok = stripped[-1] in ".:;!?)]\"”'’" if stripped else True
    return heads


# ----------------------------------------------------------------------------------------
# Support and chat logs: timestamped or speaker-prefixed lines, grouped into messages.

_MONTHS = (
    "jan january feb february mar march apr april may jun june jul july aug august sep sept september "
    "oct october nov november dec december"
)
_TIME_WORDS = frozenset(
    (
        _MONTHS + " mon monday tue tues tuesday wed wednesday thu thur thurs thursday fri friday sat saturday "
        "sun sunday am pm utc gmt z t h cet cest est edt pst pdt bst ist"
    ).split()
)
_MONTH_WORDS = frozenset(_MONTHS.split())
_BRACKET = re.compile(r"[ \t]*\[(?P<inner>[^\]\n]{1,80})\]")
_UNBRACKETED_TS = re.compile(
    r"[ \t]*(?:\d{4}-\d{2}-\d{2}(?:[ T]\d{1,2}:\d{2}(?::\d{2})?)?"
    r"|\d{1,2}[/.]\d{1,2}[/.]\d{2,4}(?:,?[ ]\d{1,2}:\d{2}(?::\d{2})?)?"
    r"|\d{1,2}:\d{2}(?::\d{2})?(?:[ ]?[AaPp][Mm])?)"
    r"(?:[ ]?(?:Z|UTC|GMT|[+-]\d{2}:?\d{2}))?"
)
_SPEAKER = re.compile(r"(?P<who>[A-Z][\w.'’-]*(?:[ \t][\w.'’&-]+){0,3}(?:[ \t]?\([^()\n]{1,40}\))?)[ \t]?:(?=\s|$)")


def _is_timestamp(s: str) -> bool:
    """Only dates and times: digits plus month, weekday, am/pm and time-zone words."""
    tokens = re.findall(r"[^\W\d_]+|\d+", s)
    return any(t.isdigit() for t in tokens) and all(t.isdigit() or t.lower() in _TIME_WORDS for t in tokens)


def _message_header(body: str) -> tuple[str | None, str | None] | None:
    """``(timestamp, speaker)`` when the line opens a message, else None.

    A message opens with a bracketed timestamp (``[12:03]``, ``[3 Sep]``), an unbracketed
    one followed by a speaker (``2024-03-02 14:11 Agent:``), or a speaker alone
    (``Customer:``, ``Agent (Lena):``: up to four words, an optional parenthesis, a colon).
    """
    ts, bracketed, rest = None, False, body
    m = _BRACKET.match(body)
    if m and _is_timestamp(m.group("inner")):
        ts, bracketed, rest = m.group("inner").strip(), True, body[m.end() :]
    elif m is None and (m := _UNBRACKETED_TS.match(body)) and (m.end() == len(body) or not body[m.end()].isalnum()):
        ts, rest = m.group(0).strip(), body[m.end() :]
    w = _SPEAKER.match(rest.lstrip(" \t-–—|>"))
    who = " ".join(w.group("who").split()) if w else None
    if ts is not None and (bracketed or who):
        return ts, who
    if ts is None and who and not body[:1].isspace():  # an indented "Name:" continues a message
        return None, who
    return None


def _message_heads(lines: list[_Line]) -> list[tuple[int, str, str]]:
    heads = []
    for line in lines:
        h = _message_header(line.body)
        if h is not None:
            ts, who = h
            title = f"[{ts}] {who}" if ts and who else (who or ts or "")
            heads.append((line.start, _shorten(title), f"msg {len(heads) + 1}"))
    return heads


# ----------------------------------------------------------------------------------------
# News bundles: articles separated by datelines, headlines and separator lines.

_SEPARATOR = re.compile(r"[ \t]*(?:-{3,}|={3,}|\*{3,}|_{3,}|~{3,}|(?:\*[ \t]*){3,})[ \t]*")
_DATELINE = re.compile(
    r"(?P<head>(?P<place>[^\W\d_][^\n,()\[\]]{1,40}?)(?:,[ \t]+(?P<date>[^\n()\[\]]{3,30}?))?[ \t]*"
    r"(?:\((?P<src>[^()\n]{1,40})\))?)[ \t]*[-–—]{1,2}[ \t]"
)


def _dateline(body: str) -> str | None:
    """The dateline that opens an article, or None.

    ``BERLIN, March 3 (Reuters) - ...`` (a place in capitals, an optional date, an optional
    source in parentheses, a dash) or a bracketed source and date, ``[Regional Courier,
    Monday 14 October, 07:10] ...`` (a bracket holding a date or time and other words).
    """
    m = _DATELINE.match(body)
    if m:
        place = m.group("place").strip()
        dated = m.group("date") and (re.search(r"\d", m.group("date")) or _words_in(m.group("date"), _MONTH_WORDS))
        if place.upper() == place and any(c.isalpha() for c in place) and (dated or m.group("src")):
            return m.group("head").strip()
    m = _BRACKET.match(body)
    if m and not _is_timestamp(m.group("inner")) and body[m.end() :].strip():
        inner = m.group("inner")
        if re.search(r"\d", inner) and (_words_in(inner, _TIME_WORDS) or re.search(r"\d:\d\d", inner)):
            return inner.strip()
    return None


def _words_in(s: str, words: frozenset[str]) -> bool:
    return any(t.lower() in words for t in re.findall(r"[^\W\d_]+", s))


def _headline(lines: list[_Line], i: int) -> bool:
    """A short title line between blank lines (or the text's edges, or a separator)."""
    body = lines[i].body.strip()
    if not _heading_like(body, 14) or not (body[0].isupper() or body[0].isdigit() or body[0] in "\"“'‘"):
        return False
    before = i == 0 or lines[i - 1].blank or bool(_SEPARATOR.fullmatch(lines[i - 1].body))
    after = i + 1 < len(lines) and lines[i + 1].blank
    return before and after and _dateline(lines[i].body) is None


def _article_heads(lines: list[_Line]) -> list[tuple[int, str, str]]:
    """An article starts at a separator, a headline or a dateline; a headline (or separator)
    followed only by blank lines before a dateline forms one article with it."""
    heads: list[list[Any]] = []  # [start, title or None, has_body]
    for i, line in enumerate(lines):
        if line.blank:
            continue
        open_ = bool(heads) and not heads[-1][2]  # an article has begun but has no body yet
        if _SEPARATOR.fullmatch(line.body):
            if not open_:
                heads.append([line.start, None, False])
        elif _headline(lines, i):
            if open_ and heads[-1][1] is None:
                heads[-1][1] = line.body.strip()
            else:
                heads.append([line.start, line.body.strip(), False])
        elif (dl := _dateline(line.body)) is not None:
            if open_:
                heads[-1][1] = heads[-1][1] or dl
                heads[-1][2] = True
            else:
                heads.append([line.start, dl, True])
        elif heads:
            heads[-1][2] = True
    return [(start, _shorten(title or "(untitled)"), f"article {n}") for n, (start, title, _) in enumerate(heads, 1)]


# ----------------------------------------------------------------------------------------
# Proteins: FASTA records, declared domains, fixed residue windows.

_RESIDUES = frozenset("ACDEFGHIKLMNPQRSTVWYBXZUOJ*-")
_DOMAINS = re.compile(r"domains?\s*[:=]\s*(?P<list>.+)", re.IGNORECASE)
_DOMAIN_ITEM = re.compile(r"\s*(?P<name>\S(?:.*?\S)?)\s+(?P<a>\d+)\s*(?:-|–|\.\.)\s*(?P<b>\d+)\s*")


def _sequence_line(body: str) -> bool:
    s = "".join(body.split())
    return bool(s) and all(c.upper() in _RESIDUES or c.isdigit() for c in s) and any(c.isalpha() for c in s)


def _is_fasta(lines: list[_Line]) -> bool:
    nonblank = [ln for ln in lines if not ln.blank]
    return (
        len(nonblank) >= 2
        and nonblank[0].body.lstrip().startswith(">")
        and all(ln.body.lstrip().startswith(">") or _sequence_line(ln.body) for ln in nonblank)
    )


def _is_bare_sequence(text: str) -> bool:
    """Whitespace-separated blocks of residue letters (digits allowed, as in GenBank), one case,
    10+ letters a block on average, 20+ residues."""
    blocks = [re.sub(r"\d", "", b) for b in text.split()]
    blocks = [b for b in blocks if b]
    letters = "".join(blocks)
    return (
        len(letters) >= 20
        and all(c.upper() in _RESIDUES for c in letters)
        and (letters.isupper() or letters.islower())
        and len(letters) / len(blocks) >= 10
    )


def _residue_offsets(text: str, lo: int, hi: int) -> list[int]:
    return [i for i in range(lo, hi) if text[i].isalpha() or text[i] in "*-"]


def _residue_heads(text: str, lo: int, hi: int, window: int, header: str) -> list[tuple[int, str, str]]:
    """Heads over the residues of ``text[lo:hi]``: the header's declared domains when they
    are valid, else windows of ``window`` residues. The first head starts at ``lo``."""
    pos = _residue_offsets(text, lo, hi)
    if not pos:
        return []
    spans = _declared_domains(header, len(pos))
    if spans is None:
        spans = [
            (f"residues {a + 1}-{min(a + window, len(pos))}", a, min(a + window, len(pos)))
            for a in range(0, len(pos), window)
        ]
        heads = [(pos[a], title, title) for title, a, _ in spans]
    else:
        heads, covered = [], 0
        for name, a, b in spans:
            if a > covered:
                heads.append((pos[covered], "(linker)", f"{covered + 1}-{a}"))
            heads.append((pos[a], name, f"{a + 1}-{b}"))
            covered = b
        if covered < len(pos):
            heads.append((pos[covered], "(tail)", f"{covered + 1}-{len(pos)}"))
    return [(lo if i == 0 else start, title, label) for i, (start, title, label) in enumerate(heads)]


def _declared_domains(header: str, n: int) -> list[tuple[str, int, int]] | None:
    """``domains: NAME A-B; NAME A-B`` in a FASTA header (1-based, inclusive), when the
    ranges are sorted, non-overlapping and inside the ``n`` residues; else None."""
    m = _DOMAINS.search(header)
    if not m:
        return None
    spans, last = [], 0
    for item in re.split(r"[;,]", m.group("list").split("|")[0]):
        if not item.strip():
            continue
        d = _DOMAIN_ITEM.fullmatch(item)
        if not d:
            return None
        a, b = int(d.group("a")), int(d.group("b"))
        if not (last < a <= b <= n):
            warnings.warn(
                f"sections: the FASTA header's domain {item.strip()!r} is out of order or outside the "
                f"{n} residues; using fixed windows instead",
                stacklevel=4,
            )
            return None
        spans.append((d.group("name"), a - 1, b))
        last = b
    return spans or None


def _protein_heads(text: str, lines: list[_Line], window: int) -> list[tuple[int, str, str]]:
    if not _is_fasta(lines):
        first = next((ln.start for ln in lines if not ln.blank), 0)
        return _residue_heads(text, first, len(text), window, "")
    records = [ln for ln in lines if ln.body.lstrip().startswith(">")]
    if len(records) > 1:
        heads = []
        for n, ln in enumerate(records, 1):
            name = ln.body.lstrip()[1:].strip()
            heads.append((ln.start, _shorten(name.split()[0] if name else f"record {n}"), f"record {n}"))
        return heads
    (rec,) = records
    name = rec.body.lstrip()[1:].strip()
    heads = [(rec.start, _shorten(name.split()[0] if name else "(header)"), "header")]
    return heads + _residue_heads(text, rec.end, len(text), window, name)


# ----------------------------------------------------------------------------------------
# Paragraphs, lines, regular expressions, explicit spans.


def _paragraph_heads(lines: list[_Line]) -> list[tuple[int, str, str]]:
    heads = []
    for i, line in enumerate(lines):
        if not line.blank and (i == 0 or lines[i - 1].blank):
            heads.append((line.start, _shorten(line.body), f"para {len(heads) + 1}"))
    return heads


def _line_heads(lines: list[_Line]) -> list[tuple[int, str, str]]:
    return [(ln.start, _shorten(ln.body), f"line {i}") for i, ln in enumerate(lines, 1) if not ln.blank]


def _compile(pattern: str, *, name: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern, re.MULTILINE)
    except re.error as err:
        raise ValueError(
            f"{name}: expected a valid regular expression after 'regex:'; got {pattern!r} ({err})"
        ) from None


def _regex_heads(text: str, pattern: re.Pattern[str]) -> list[tuple[int, str, str]]:
    heads = []
    for m in pattern.finditer(text):
        if "title" in pattern.groupindex and m.group("title"):
            title = m.group("title")
        elif pattern.groups and m.group(1):
            title = m.group(1)
        else:
            title = m.group(0)
        n = len(heads) + 1
        heads.append((m.start(), _shorten(title) or f"match {n}", f"match {n}"))
    if not heads:
        warnings.warn(
            f"sections: the pattern {pattern.pattern!r} matched nothing; one section holds the whole text", stacklevel=3
        )
    return heads


def _as_spans(spans: Any, *, name: str) -> list[tuple[str | None, int, int]]:
    """Check the shape of a list of spans: ``(start, end)``, ``(title, start, end)``, a
    `Section` or ``{"start", "end", "title"?}``; returns ``(title or None, start, end)``."""
    if isinstance(spans, (str, bytes)) or not isinstance(spans, Sequence):
        raise ValueError(f"{name}: expected a list of spans; got {type(spans).__name__}")
    out = []
    for i, s in enumerate(spans):
        if isinstance(s, Section):
            item: tuple[Any, ...] = (s.title, s.start, s.end)
        elif isinstance(s, dict):
            if set(s) - {"title", "start", "end", "label"} or not {"start", "end"} <= set(s):
                raise ValueError(
                    f'{name}: span {i} expected keys "start", "end" and optionally "title"; got {sorted(s)}'
                )
            item = (s.get("title"), s["start"], s["end"])
        elif isinstance(s, (list, tuple)) and len(s) in (2, 3):
            item = (None, *s) if len(s) == 2 else tuple(s)
        else:
            raise ValueError(f"{name}: span {i} expected (start, end), (title, start, end) or a Section; got {s!r}")
        title, start, end = item
        if title is not None and not isinstance(title, str):
            raise ValueError(f"{name}: span {i} expected a string title; got {title!r}")
        for v in (start, end):
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name}: span {i} expected integer character offsets; got {s!r}")
        out.append((title, start, end))
    return out


def _span_sections(text: str, spans: Any) -> list[Section]:
    items = _as_spans(spans, name="sections: kind")
    n, covered, out = len(text), 0, []
    for i, (title, start, end) in enumerate(items):
        if not 0 <= start < end <= n:
            raise ValueError(
                f"sections: kind: span {i} expected 0 <= start < end <= len(text) = {n}; got ({start}, {end})"
            )
        if start < covered:
            what = "overlaps" if start >= (items[i - 1][1] if i else 0) else "is out of order with"
            raise ValueError(
                f"sections: kind: spans expected sorted and non-overlapping; span {i} ({start}, {end}) {what} "
                f"span {i - 1} {items[i - 1][1:]}"
            )
        if start > covered:
            out.append(Section("(preamble)" if covered == 0 else "(gap)", covered, start, ""))
        out.append(
            Section(
                _shorten(title) if title else _shorten(text[start:end]) or f"span {i + 1}", start, end, f"span {i + 1}"
            )
        )
        covered = end
    if covered < n and out:
        out.append(Section("(tail)", covered, n, ""))
    if not out and n:
        out.append(Section("(whole text)", 0, n, ""))
    return out


# ----------------------------------------------------------------------------------------
# The public functions.


def detect_kind(text: str) -> str:
    """The kind ``sections(text, kind="auto")`` uses; the rules, first match wins:

    1. ``"protein"``: FASTA (the first non-blank line starts with ``>`` and every other line
       is residue letters), or a bare sequence (blocks of one-case residue letters, 20+ of them,
       10+ letters a block on average; digits allowed, as in GenBank's numbered lines).
    2. ``"messages"``: 3 or more message header lines making up at least 30% of the non-blank
       lines. A header is a bracketed timestamp (``[12:03]``, ``[3 Sep]``, ``[2024-03-02
       14:11]``: only digits, months, weekdays, am/pm and time zones inside), an unbracketed
       timestamp followed by a speaker (``2024-03-02 14:11 Agent:``) or a speaker alone at
       the start of a line (``Customer:``, ``Agent (Lena):``; up to four words and a colon).
    3. ``"clauses"``: 3 or more clause or heading lines, and more of them than dateline and
       separator lines. Clause lines start ``1.``, ``1.3``, ``3.1.2``, ``ARTICLE IV``,
       ``Section 2.``, ``Schedule A`` (also Clause, Annex, Appendix, Exhibit, Part), ``7
       Term`` (a bare number before a short heading), or are ALL-CAPS headings; each must
       begin the text or follow a blank line, a heading, or a line ending a sentence, and be
       followed by a capital, a quote or a parenthesis (so "99.5 per cent" on a wrapped line
       is not a clause).
    4. ``"articles"``: 2 or more datelines (``BERLIN, March 3 (Reuters) -``, or a bracketed
       source and date such as ``[Regional Courier, Monday 14 October, 07:10]``) or 2 or more
       separator lines (``---``, ``===``, ``***``).
    5. ``"paragraphs"`` otherwise.
    """
    if not isinstance(text, str):
        raise ValueError(f"detect_kind: text expected a str; got {type(text).__name__}")
    lines = _lines(text)
    if _is_fasta(lines) or _is_bare_sequence(text):
        return "protein"
    nonblank = sum(not ln.blank for ln in lines)
    n_messages = sum(_message_header(ln.body) is not None for ln in lines)
    if n_messages >= 3 and n_messages >= 0.3 * nonblank:
        return "messages"
    n_articles = sum(
        bool(_SEPARATOR.fullmatch(ln.body)) or _dateline(ln.body) is not None for ln in lines if not ln.blank
    )
    n_clauses = len(_clause_heads(lines))
    if n_clauses >= 3 and n_clauses > n_articles:
        return "clauses"
    if n_articles >= 2:
        return "articles"
    return "paragraphs"


def sections(text: str, kind: str | Sequence[Any] = "auto", *, window: int = 50) -> list[Section]:
    """Partition ``text`` into sections: every character belongs to exactly one, in order.

    Args:
        text: the document.
        kind: how to cut it (``detect_kind`` gives the rules ``"auto"`` follows):

            * ``"auto"``: pick one of the four kinds below from the text's patterns.
            * ``"clauses"`` (contracts, policies): a section per numbered clause or heading
              (``1.``, ``1.3``, ``ARTICLE IV``, ``Section 2.``, ``Schedule A``, ALL-CAPS);
              label the number, title the heading, the defined term (``1.3 "Availability"
              means`` gives "Availability"), an inline heading (``14.1 Service Credits. If``)
              or the clause's first words.
            * ``"messages"`` (support and chat logs): a header line (timestamp and/or speaker)
              plus its continuation lines; title ``[timestamp] speaker``, label ``msg N``.
            * ``"articles"`` (news bundles): from a separator, headline or dateline to the
              next; a headline and the dateline under it are one article; label ``article N``.
            * ``"protein"``: one section per FASTA record when there are several; for one
              record or a bare sequence, the header line, then the domains the header declares
              (``domains: SH3 12-70; kinase 110-380``, 1-based inclusive residues; linkers
              between them become "(linker)" sections) or else windows of ``window`` residues.
            * ``"paragraphs"``: blocks separated by blank lines (a blank line joins the block
              before it); ``"lines"``: each non-blank line (blank lines join the line before).
            * ``"regex:PATTERN"``: a section starts at every match (``re.MULTILINE``, so ``^``
              is a line start); the title is the group ``title``, else group 1, else the match.
            * a list of spans ``(start, end)``, ``(title, start, end)``, `Section` or
              ``{"start", "end", "title"}``: sorted, non-overlapping, ``0 <= start < end <=
              len(text)``; gaps become "(preamble)", "(gap)" and "(tail)" sections.

        window: residues per window for a sequence without declared domains, >= 1.

    Returns:
        A list of `Section`, empty for an empty text. Text before the first heading, message
        or article is a "(preamble)" section (merged into the first when it is only
        whitespace); a text with no heading at all is one "(whole text)" section.

    Raises:
        ValueError: an unknown kind, a bad regular expression, malformed or overlapping spans.
    """
    if not isinstance(text, str):
        raise ValueError(f"sections: text expected a str; got {type(text).__name__}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"sections: window expected an int >= 1; got {window!r}")
    if not isinstance(kind, str):
        return _span_sections(text, kind)
    if kind.startswith("regex:"):
        pattern = _compile(kind[len("regex:") :], name="sections: kind")
        return _partition(text, _regex_heads(text, pattern))
    if kind not in KINDS:
        raise ValueError(
            f"sections: kind expected one of {', '.join(map(repr, KINDS))}, 'regex:PATTERN' or a list of spans; "
            f"got {kind!r}"
        )
    if kind == "auto":
        kind = detect_kind(text)
    lines = _lines(text)
    heads = {
        "clauses": lambda: _clause_heads(lines),
        "messages": lambda: _message_heads(lines),
        "articles": lambda: _article_heads(lines),
        "protein": lambda: _protein_heads(text, lines, window),
        "paragraphs": lambda: _paragraph_heads(lines),
        "lines": lambda: _line_heads(lines),
    }[kind]()
    return _partition(text, heads)


def _offset_pairs(offsets: Any) -> list[tuple[int, int]]:
    if isinstance(offsets, Tensor):
        offsets = offsets.detach().cpu()
        if offsets.dim() == 3 and offsets.shape[0] == 1:
            offsets = offsets[0]  # (1, L, 2) -> (L, 2)
        if offsets.dim() != 2 or offsets.shape[-1] != 2:
            raise ValueError(f"token_boundaries: offsets expected shape (L, 2); got {tuple(offsets.shape)}")
        offsets = offsets.tolist()
    elif hasattr(offsets, "tolist"):  # numpy
        return _offset_pairs(torch.as_tensor(offsets))
    if len(offsets) == 1 and len(offsets[0]) and isinstance(offsets[0][0], (list, tuple)):
        offsets = offsets[0]  # a batch of one, as tokenizers return it
    pairs = []
    for i, p in enumerate(offsets):
        try:
            a, b = (int(x) for x in p)
        except (TypeError, ValueError):
            raise ValueError(
                f"token_boundaries: offsets expected (char_start, char_end) pairs; token {i} is {p!r}"
            ) from None
        if a < 0 or b < a:
            raise ValueError(f"token_boundaries: offsets expected 0 <= char_start <= char_end; token {i} is {(a, b)}")
        pairs.append((a, b))
    return pairs


def token_boundaries(
    sections: Sequence[Section], offsets: Any, num_tokens: int | None = None
) -> tuple[Tensor, list[Section]]:
    """Token edges of the sections, for ``attnkit.attention_stats(..., pool=edges)``.

    A token belongs to the section holding its last character (``char_end - 1``), so a
    token that carries the space or line break before a word (GPT-2, SentencePiece) goes
    with the word. Tokens with an empty span (``char_start == char_end``: special tokens,
    ``(0, 0)`` in Hugging Face's ``offset_mapping``) go with the token before them, or the
    first section when none comes before: [CLS]/BOS belongs to the first section,
    [SEP]/EOS to the last.

    A section that receives no token (a heading inside a longer token, a text the
    tokenizer skips) is merged into the section before it (the next one when it comes
    first), and that section's span grows to cover it. Sections after the last one that
    receives a token (those the model did not read, e.g. past a truncation) are left out.

    Args:
        sections: `Section` list, sorted and non-overlapping (what `sections` returns).
        offsets: ``(L_all, 2)`` character spans per token, as a list of pairs, a tensor or an
            array (a leading batch of one is dropped).
        num_tokens: the number of tokens the model read, ``L <= L_all`` (default ``L_all``);
            tokens past it are ignored.

    Returns:
        ``(edges, kept)``: ``edges`` is a ``(S + 1,)`` int64 tensor ``[0, e_1, ..., e_S = L]``,
        strictly increasing, where section ``s`` of ``kept`` holds tokens ``[edges[s],
        edges[s + 1])``; ``kept`` holds the ``S`` sections that received tokens, merged spans
        included.
    """
    secs = list(sections)
    if not secs or not all(isinstance(s, Section) for s in secs):
        raise ValueError(f"token_boundaries: sections expected a non-empty list of Section; got {sections!r:.80}")
    for i in range(1, len(secs)):
        if secs[i].start < secs[i - 1].end:
            raise ValueError(
                f"token_boundaries: sections expected sorted and non-overlapping; section {i} starts at "
                f"{secs[i].start}, before section {i - 1} ends at {secs[i - 1].end}"
            )
    pairs = _offset_pairs(offsets)
    if num_tokens is None:
        num_tokens = len(pairs)
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or not 1 <= num_tokens <= len(pairs):
        raise ValueError(
            f"token_boundaries: num_tokens expected an int in [1, len(offsets) = {len(pairs)}]; got {num_tokens!r}"
        )
    pairs = pairs[:num_tokens]
    starts = [s.start for s in secs]
    owner = [-1] * num_tokens  # section of each token
    current = -1
    for t, (a, b) in enumerate(pairs):
        if a == b:
            continue
        s = min(max(bisect_right(starts, b - 1) - 1, 0), len(secs) - 1)
        if s < current:
            raise ValueError(
                f"token_boundaries: offsets expected in text order; token {t} {(a, b)} lies in section {s}, "
                f"before section {current} of an earlier token"
            )
        owner[t] = current = s
    first_real = next((s for s in owner if s >= 0), 0)
    for t in range(num_tokens):  # empty-span tokens: the owner of the token before, or the first
        if owner[t] < 0:
            owner[t] = owner[t - 1] if t > 0 else first_real
    edges, kept_idx = [0], [owner[0]]
    for t in range(1, num_tokens):
        if owner[t] != owner[t - 1]:
            edges.append(t)
            kept_idx.append(owner[t])
    edges.append(num_tokens)
    kept = []
    for j, s in enumerate(kept_idx):
        lo = secs[0].start if j == 0 else secs[s].start
        hi = secs[kept_idx[j + 1] - 1].end if j + 1 < len(kept_idx) else secs[s].end
        kept.append(replace(secs[s], start=lo, end=hi))
    return torch.tensor(edges, dtype=torch.int64), kept


def parse_sections_arg(value: str) -> str | list[tuple[str | None, int, int]]:
    """Read ``--sections``: ``auto``, a kind name, ``regex:PATTERN`` or ``FILE.json``.

    The JSON file holds a list of spans: ``[start, end]``, ``[title, start, end]`` or
    ``{"title": ..., "start": ..., "end": ...}``. Returns what `sections` takes as ``kind``
    (the string, or the list of ``(title or None, start, end)``). Offsets are checked
    against the text later, by `sections`.

    Raises:
        ValueError: naming ``--sections``, what it expects and what it got.
    """
    name = "--sections"
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name}: expected auto, paragraphs, lines, regex:PATTERN or FILE.json; got {value!r}")
    if value in KINDS:
        return value
    if value.startswith("regex:"):
        if not value[len("regex:") :]:
            raise ValueError(f"{name}: expected a pattern after 'regex:'; got {value!r}")
        _compile(value[len("regex:") :], name=name)
        return value
    path = Path(value)
    if value.lower().endswith(".json") or path.is_file():
        if not path.is_file():
            raise ValueError(f"{name}: expected a JSON file of spans; {value!r} does not exist")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{name}: expected a JSON list of spans in {value!r}; could not read it ({err})") from None
        if not isinstance(data, list):
            raise ValueError(f"{name}: expected a JSON list of spans in {value!r}; got a {type(data).__name__}")
        return _as_spans(data, name=f"{name} {value}")
    raise ValueError(
        f"{name}: expected {', '.join(KINDS)}, regex:PATTERN or FILE.json (a list of spans); got {value!r}"
    )
