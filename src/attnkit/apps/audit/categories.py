"""Token categories: which kind of text each token of a document belongs to.

Every token gets exactly one category, the first rule that claims it in this precedence order:

1. ``special``: the tokenizer's special tokens ([CLS], [SEP], <s>, ...), which cover no character.
2. user categories, in the order given (``--category NAME=REGEX`` or ``NAME=@words.txt``).
3. ``boilerplate`` (template): every token of a template line, a line found in at least
   ``template_docs`` documents of the corpus once white space is folded and a leading list
   number (``6.``) is set aside (``This Agreement is governed by the laws of England and
   Wales.``). A template line is boilerplate as a whole, dates and names in it included.
4. ``date``: dates and times of day in several formats: ISO ``2026-03-15`` (with an optional
   ``09:14`` time), numeric ``15/03/2026``, ``03-15-26``, ``01.09.2026``; ``15 March 2026``,
   ``15th of March, 2026``, ``March 15, 2026``, ``Mar 3``, ``March 2026``, ``Q3 2026``; full
   month names (but ``May``) and weekday names alone; years 1900-2099 alone; ``9:00``, ``7am``.
5. ``amount``: amounts and other numbers: a currency symbol or code before or after a number
   (``£4,800``, ``$49.99``, ``€3.5m``, ``USD 9,600``, ``1,000 EUR``, ``20 dollars``), percentages
   (``3%``, ``12 percent``) and any other number (``#4481``, ``3.14.2``, ``36``).
6. ``defined_term``: a capitalised term the document introduces by a definition, at that
   definition and everywhere else in the same document (optionally plural):
   ``"Supplier" means``, ``"Fees" shall mean``, ``"Users" refers to``, ``(the "Agreement")``,
   ``(each a "Party")``; straight or curly quotes.
7. ``name``: a heuristic for proper nouns: a capitalised word (``Okafor``, ``McDonald``,
   ``O'Neill``) that is not at the start of a sentence (after ``.``, ``!``, ``?``, ``:`` or at
   the start of a line, once leading list markers such as ``1.``, ``-`` or ``[...]`` are skipped),
   not a stop word and not ALL-CAPS; then every occurrence in the document of a word so found,
   at a sentence start too (``Hiroshi Tanaka: ...`` after ``Good morning Hiroshi``). It also tags
   title-case words in mid-sentence (``the Help Centre``): a heuristic, not a named-entity model.
8. ``rare``: with ``rare="vocab"`` (default) the tokens of a word the tokenizer splits into two or
   more pieces, i.e. a word outside its vocabulary (WordPiece and BPE vocabularies keep the
   frequent words whole, so this is the tokenizer's rank); with ``rare=N`` (``--rare corpus:N``)
   the tokens of a word (lower-cased) found in at most ``N`` documents of the corpus.
9. ``boilerplate`` (words): stop words (`STOP_WORDS`) and punctuation (underscores included).
10. ``other``: everything else.

A token claims a category when any of its characters lies in one of the category's character
spans (a token ``£4`` touching the amount ``£4,800`` is an amount). Because the assignment is
exclusive, the shares of the categories (``other`` included) sum to 1 per document, layer and head.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "BUILTIN",
    "OTHER",
    "SPECIAL",
    "STOP_WORDS",
    "CorpusProfile",
    "Tagger",
    "UserCategory",
    "amount_spans",
    "date_spans",
    "defined_term_spans",
    "defined_terms",
    "name_spans",
    "parse_category",
    "template_lines",
]

SPECIAL = "special"
OTHER = "other"
# The built-in categories after the user's, in precedence order (module docstring).
BUILTIN = ("date", "amount", "defined_term", "name", "rare", "boilerplate")

STOP_WORDS = frozenset(
    """
    a about above after again against all am an and any are as at be because been before being below between
    both but by can could did do does doing down during each either every few for from further had has have
    having he her here hers herself him himself his how i if in into is it its itself just may me might more
    most must my myself neither no nor not now of off on once only or other our ours ourselves out over own same
    shall she should so some such than that the their theirs them themselves then there these they this those
    through to too under until up upon us very was we were what when where which while who whom why will with
    within without would you your yours yourself yourselves per via
    """.split()  # noqa: SIM905 (a word list reads better as text)
)

# ----------------------------------------------------------------------------- dates
_MONTH = (
    r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|Sep(?:t(?:ember)?)?"
    r"|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)\.?"
)
_DAY = r"\d{1,2}(?:st|nd|rd|th)?"
_AM_PM = r"(?:[ap]m\b|[ap]\.m\.)"
_TIME = rf"\d{{1,2}}:\d{{2}}(?::\d{{2}})?(?:\s?{_AM_PM})?"
_DATE = re.compile(
    "|".join(
        [
            rf"\b\d{{4}}-\d{{2}}-\d{{2}}(?:[T ]{_TIME})?\b",  # ISO 2026-03-15, with a time
            r"(?<![\d.,/-])\d{1,2}[/.-]\d{1,2}[/.-](?:\d{4}|\d{2})(?![\d/-]|\.\d)",  # 15/03/2026, 03-15-26, 01.09.2026
            rf"\b{_DAY}(?:\s+of)?\s+{_MONTH}(?:,?\s+\d{{4}})?(?![\w])",  # 15 March 2026, 15th of March, 2026
            rf"\b{_MONTH}\s+{_DAY}(?:,?\s+\d{{4}})?\b",  # March 15, 2026; Mar 3
            rf"\b{_MONTH}\s+\d{{4}}\b",  # March 2026
            r"\bQ[1-4]\s+\d{4}\b",  # Q3 2026
            r"\b(?:January|February|March|April|June|July|August|September|October|November|December)\b",
            r"\b(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday)s?\b",
            r"(?<![\d.,£$€¥₹#])(?:19|20)\d{2}(?![\d%]|[.,]\d)",  # a year alone
            rf"(?<![\d.:]){_TIME}(?![\d:])",  # 9:00, 17:30
            rf"(?<![\d.:])\d{{1,2}}\s?{_AM_PM}",  # 7am, 9 p.m.
        ]
    )
)

# ----------------------------------------------------------------------------- amounts and numbers
_NUMBER = r"\d+(?:,\d{3})*(?:\.\d+)*"
_SCALE = r"(?:\s?(?:k|m|bn|million|billion|thousand)\b)?"
_CODES = r"(?:USD|EUR|GBP|JPY|INR|CHF|CAD|AUD|CNY|SEK|NOK|DKK)"
_WORDS = r"(?:dollars?|euros?|pounds?|pence|cents?|yen|rupees?|francs?)"
_AMOUNT = re.compile(
    "|".join(
        [
            rf"[$€£¥₹₩]\s?{_NUMBER}{_SCALE}",  # £4,800, $49.99, €3.5m
            rf"\b{_CODES}\s?{_NUMBER}{_SCALE}",  # USD 9,600
            rf"\b{_NUMBER}{_SCALE}\s?(?:{_CODES}|{_WORDS})\b",  # 1,000 EUR, 20 dollars
            rf"\b{_NUMBER}\s?(?:%|percent\b|per\s?cent\b)",  # 3%, 12 percent
            r"#?\b" + _NUMBER,  # any other number
        ]
    )
)

# ----------------------------------------------------------------------------- defined terms
_TERM = r"[A-Z][\w'’-]*(?:[ \t]+(?:of|and|the|[A-Z][\w'’-]*))*"
_DEFINITION = re.compile(
    rf"[\"“](?P<a>{_TERM})[\"”][ \t]+(?:shall[ \t]+)?(?:means?|refers?[ \t]+to|includes?|has[ \t]+the[ \t]+meaning)\b"
    rf"|\((?:the|each|together|collectively|hereinafter)?[ \t]*(?:an?[ \t]+|the[ \t]+)?[\"“](?P<b>{_TERM})[\"”]\)"
)

# ----------------------------------------------------------------------------- names
_CAPITALISED = re.compile(r"\b[A-Z][a-z]*(?:[A-Z][a-z]+)*(?:['’-][A-Z]?[a-z]+)*\b")
_LIST_MARKER = re.compile(r"[ \t]*(?:(?:\d{1,3}(?:\.\d{1,3})*\.?|[-*•–]|\([a-z0-9]{1,4}\)|\[[^\]\n]{0,60}\])[ \t]*)*")
_SENTENCE_END = frozenset(".!?:")

_WORD = re.compile(r"[^\W_]+")  # letters and digits
_PUNCT = re.compile(r"[^\w\s]+|_+")


def _spans(pattern: re.Pattern[str], text: str) -> list[tuple[int, int]]:
    return [m.span() for m in pattern.finditer(text) if m.end() > m.start()]


def date_spans(text: str) -> list[tuple[int, int]]:
    """``[(start, end)]`` character spans of the dates and times in ``text`` (formats: module docstring)."""
    return _spans(_DATE, text)


def amount_spans(text: str) -> list[tuple[int, int]]:
    """``[(start, end)]`` character spans of the amounts (with currencies), percentages and numbers in ``text``."""
    return _spans(_AMOUNT, text)


def defined_terms(text: str) -> list[str]:
    """The capitalised terms ``text`` defines (``"Supplier" means``, ``(the "Agreement")``), in order, once each."""
    found: dict[str, None] = {}
    for m in _DEFINITION.finditer(text):
        term = " ".join((m.group("a") or m.group("b")).split())
        found.setdefault(term, None)
    return list(found)


def defined_term_spans(text: str, terms: Iterable[str] | None = None) -> list[tuple[int, int]]:
    """Every occurrence of the document's defined terms (``terms``, default `defined_terms`), plural included."""
    terms = defined_terms(text) if terms is None else list(terms)
    if not terms:
        return []
    words = sorted(terms, key=len, reverse=True)  # the longest term wins where two overlap
    pattern = re.compile(r"\b(?:" + "|".join(re.escape(t).replace(r"\ ", r"\s+") for t in words) + r")s?\b")
    return _spans(pattern, text)


def _sentence_starts(text: str) -> Callable[[int], bool]:
    """A test ``starts(i)``: whether the word at offset ``i`` opens a sentence or a line (after list markers
    such as ``1.``, ``-`` or ``[timestamp]``). Linear in the text: each line's markers are matched once."""
    line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
    marker_end: dict[int, int] = {}

    def starts(i: int) -> bool:
        line_start = line_starts[bisect_right(line_starts, i) - 1]
        if line_start not in marker_end:
            marker_end[line_start] = _LIST_MARKER.match(text, line_start).end()
        if marker_end[line_start] >= i:
            return True
        j = i - 1
        while j >= line_start and text[j] in " \t\"“'‘(":
            j -= 1
        return j < line_start or text[j] in _SENTENCE_END

    return starts


def name_spans(text: str) -> list[tuple[int, int]]:
    """The proper-noun heuristic of the module docstring: capitalised words not at a sentence start, not stop
    words, not ALL-CAPS; then every occurrence of such a word in ``text``."""
    starts = _sentence_starts(text)
    words = set()
    for m in _CAPITALISED.finditer(text):
        word = m.group()
        if len(word) < 2 or word.lower() in STOP_WORDS or starts(m.start()):
            continue
        words.add(word)
    return [m.span() for m in _CAPITALISED.finditer(text) if m.group() in words]


_LEADING_NUMBER = re.compile(r"\A\s*\d{1,3}(?:\.\d{1,3})*\.?\s+")


def _fold_line(line: str) -> str:
    """A line as template lines are compared: white space folded, a leading list number (``6.``) set aside."""
    return " ".join(_LEADING_NUMBER.sub("", line, count=1).split())


def template_lines(texts: Iterable[str], *, min_docs: int = 3) -> frozenset[str]:
    """The (folded) lines of at least two words found in at least ``min_docs`` of ``texts``: the corpus's template."""
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update({_fold_line(line) for line in text.splitlines() if len(_WORD.findall(line)) >= 2})
    return frozenset(line for line, n in counts.items() if n >= min_docs)


def _template_spans(text: str, lines: frozenset[str]) -> list[tuple[int, int]]:
    out, pos = [], 0
    for raw in text.splitlines(keepends=True):
        body = raw.rstrip("\r\n")
        if lines and _fold_line(body) in lines:
            out.append((pos, pos + len(body)))
        pos += len(raw)
    return out


# ----------------------------------------------------------------------------- user categories
@dataclass(frozen=True)
class UserCategory:
    """A category the user defines: every match of ``pattern`` in a document's text."""

    name: str
    pattern: re.Pattern[str]
    source: str  # what was given: the regular expression, or ``@words.txt``


_NAME = re.compile(r"[A-Za-z_][\w-]{0,39}")


def parse_category(value: str, *, taken: Sequence[str] = ()) -> UserCategory:
    """``NAME=REGEX`` or ``NAME=@FILE`` (one word or phrase a line, matched whole, ignoring case) -> `UserCategory`.

    Raises:
        ValueError: naming ``--category``: no ``=``, a bad name (or a built-in's, or given twice), a bad
            regular expression, an unreadable or empty word list.
    """
    name, sep, rule = value.partition("=")
    name = name.strip()
    if not sep or not rule:
        raise ValueError(f"--category expected NAME=REGEX or NAME=@WORDS.txt, got {value!r}")
    if not _NAME.fullmatch(name):
        raise ValueError(f"--category {value!r}: NAME must be a word (letters, digits, _ and -), got {name!r}")
    if name in (SPECIAL, OTHER, *BUILTIN) or name in taken:
        raise ValueError(f"--category {value!r}: the category {name!r} already exists; pick another NAME")
    if rule.startswith("@"):
        path = Path(rule[1:]).expanduser()
        try:
            words = [w.strip() for w in path.read_text(encoding="utf-8").splitlines()]
        except (OSError, UnicodeDecodeError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else "not UTF-8 text"
            raise ValueError(f"--category {name}=@{path}: cannot read the word list ({reason})") from None
        words = sorted({w for w in words if w and not w.startswith("#")}, key=len, reverse=True)
        if not words:
            raise ValueError(f"--category {name}=@{path}: the word list holds no word (one word or phrase a line)")
        body = "|".join(re.escape(w).replace(r"\ ", r"\s+") for w in words)
        return UserCategory(name, re.compile(rf"(?<!\w)(?:{body})(?!\w)", re.IGNORECASE), rule)
    try:
        pattern = re.compile(rule)
    except re.error as err:
        raise ValueError(f"--category {name}={rule}: not a valid regular expression ({err})") from None
    return UserCategory(name, pattern, rule)


# ----------------------------------------------------------------------------- the corpus's own statistics
@dataclass(frozen=True)
class CorpusProfile:
    """What tagging needs from the whole corpus: its template lines and each word's document frequency."""

    template: frozenset[str] = frozenset()
    word_docs: dict[str, int] = field(default_factory=dict)  # lower-cased word -> documents holding it

    @classmethod
    def of(cls, texts: Sequence[str], *, template_docs: int = 3, words: bool = False) -> CorpusProfile:
        """The profile of ``texts``; ``words``: also count word document frequencies (for ``rare=N``)."""
        counts: Counter[str] = Counter()
        if words:
            for text in texts:
                counts.update({w.lower() for w in _WORD.findall(text)})
        return cls(template_lines(texts, min_docs=template_docs), dict(counts))


# ----------------------------------------------------------------------------- the tagger
@dataclass(frozen=True)
class Tagger:
    """Assigns each token of a document one category (precedence: module docstring).

    Args:
        user: the user's categories, first to last in precedence.
        profile: the corpus's template lines and word frequencies.
        rare: ``"vocab"`` (a word split into several tokens) or an int ``N`` (a word in at most ``N``
            documents of the corpus, counted in ``profile``).
    """

    user: tuple[UserCategory, ...] = ()
    profile: CorpusProfile = field(default_factory=CorpusProfile)
    rare: str | int = "vocab"

    @property
    def categories(self) -> tuple[str, ...]:
        """All category names: special, the user's, the built-in ones, ``other`` last."""
        return (SPECIAL, *(u.name for u in self.user), *BUILTIN, OTHER)

    @property
    def rules(self) -> tuple[tuple[str, str], ...]:
        """``(rule, category)`` in precedence order (module docstring): a token takes the first rule's category."""
        users = tuple((u.name, u.name) for u in self.user)
        builtin = (
            ("template", "boilerplate"),
            ("date", "date"),
            ("amount", "amount"),
            ("defined_term", "defined_term"),
            ("name", "name"),
            ("rare", "rare"),
            ("words", "boilerplate"),
        )
        return ((SPECIAL, SPECIAL), *users, *builtin, (OTHER, OTHER))

    def char_spans(self, text: str) -> dict[str, list[tuple[int, int]]]:
        """``{rule: [(start, end)]}``: the character spans each text-based rule claims (`rules`)."""
        spans = {u.name: _spans(u.pattern, text) for u in self.user}
        spans["date"] = date_spans(text)
        spans["amount"] = amount_spans(text)
        spans["defined_term"] = defined_term_spans(text)
        spans["name"] = name_spans(text)
        stop = [m.span() for m in _WORD.finditer(text) if m.group().lower() in STOP_WORDS]
        spans["words"] = stop + _spans(_PUNCT, text)
        spans["template"] = _template_spans(text, self.profile.template)
        return spans

    def tag(self, text: str, offsets: Sequence[tuple[int, int]], special: Sequence[bool]) -> np.ndarray:
        """The category index (into `categories`) of each token.

        Args:
            text: the document.
            offsets: ``(L,)`` pairs ``(start, stop)``, the characters each token covers (``stop <= start``:
                none, as for special tokens).
            special: ``(L,)`` whether each token is a special token.

        Returns:
            ``(L,)`` int64 array of indices into `categories`.
        """
        rules = self.rules
        rank = {rule: i for i, (rule, _) in enumerate(rules)}
        category = np.array([self.categories.index(c) for _, c in rules])  # rule rank -> category index
        chars = np.full(len(text) + 1, rank[OTHER], dtype=np.int64)  # (len(text) + 1,): best rule of each char
        for rule, spans in self.char_spans(text).items():
            r = rank[rule]
            for a, b in spans:
                np.minimum(chars[a:b], r, out=chars[a:b])
        starts = np.array([a for a, _ in offsets], dtype=np.int64).reshape(-1)  # (L,)
        stops = np.array([b for _, b in offsets], dtype=np.int64).reshape(-1)
        best = np.full(len(offsets), rank[OTHER], dtype=np.int64)  # (L,) the rule each token takes
        rare = self._rare(text, starts, stops, special)
        for i, (a, b) in enumerate(zip(starts.tolist(), stops.tolist())):
            if special[i] or b <= a:
                best[i] = rank[SPECIAL]
                continue
            best[i] = int(chars[a:b].min())
            if rare[i]:
                best[i] = min(best[i], rank["rare"])
        return category[best]

    def _rare(self, text: str, starts: np.ndarray, stops: np.ndarray, special: Sequence[bool]) -> np.ndarray:
        """``(L,)`` bool: the tokens of rare words (`Tagger` docstring)."""
        L = len(starts)
        out = np.zeros(L, dtype=bool)
        words = [m.span() for m in _WORD.finditer(text)]
        if not words or L == 0:
            return out
        word_start = np.array([a for a, _ in words])
        # The word each token starts in (a token of several words counts for the first).
        index = np.searchsorted(word_start, starts, side="right") - 1  # (L,)
        inside = (index >= 0) & (starts < np.array([b for _, b in words])[np.clip(index, 0, None)])
        inside &= ~np.asarray(special, dtype=bool) & (stops > starts)
        if self.rare == "vocab":
            pieces = Counter(index[inside].tolist())
            out[inside] = [pieces[w] >= 2 for w in index[inside].tolist()]
        else:
            limit = int(self.rare)
            docs = self.profile.word_docs
            out[inside] = [docs.get(text[words[w][0] : words[w][1]].lower(), 0) <= limit for w in index[inside]]
        return out
