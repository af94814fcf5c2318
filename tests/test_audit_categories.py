"""`attnkit audit`'s token categories on written examples (no model): dates, amounts, names, defined terms,
template lines, user categories, and the exclusive precedence that makes the shares sum to 1."""

from __future__ import annotations

import re

import numpy as np
import pytest

from attnkit.apps.audit.categories import (
    OTHER,
    SPECIAL,
    CorpusProfile,
    Tagger,
    amount_spans,
    date_spans,
    defined_term_spans,
    defined_terms,
    name_spans,
    parse_category,
    template_lines,
)


def found(text: str, spans) -> list[str]:
    return [text[a:b] for a, b in spans]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Signed on 2026-03-15 at noon.", ["2026-03-15"]),
        ("[2026-03-02 09:14] Anna: hello", ["2026-03-02 09:14"]),
        ("Due 15/03/2026, paid 03-15-26 and 01.09.2026.", ["15/03/2026", "03-15-26", "01.09.2026"]),
        ("Made on 15 March 2026 and on 15th of March, 2026.", ["15 March 2026", "15th of March, 2026"]),
        ("Made on March 15, 2026, renewed Mar 3.", ["March 15, 2026", "Mar 3"]),
        ("From September 2026 to Q3 2027.", ["September 2026", "Q3 2027"]),
        ("Open Monday to Friday, 9:00 to 17:30, news at 7am.", ["Monday", "Friday", "9:00", "17:30", "7am"]),
        ("Founded in 2015.", ["2015"]),
    ],
)
def test_dates_in_several_formats(text, expected):
    assert found(text, date_spans(text)) == expected


def test_dates_leave_amounts_versions_and_may_alone():
    text = "The Supplier may charge £2,000 for version 3.14.2 of ISO 8217."
    assert found(text, date_spans(text)) == []


@pytest.mark.parametrize(
    "text, expected",
    [
        ("A fee of £4,800 and $49.99 and €3.5m.", ["£4,800", "$49.99", "€3.5m"]),
        ("Pay USD 9,600 or 1,000 EUR or 20 dollars.", ["USD 9,600", "1,000 EUR", "20 dollars"]),
        ("Rates rose 3% and 12 percent; ₹8,500 failed.", ["3%", "12 percent", "₹8,500"]),
        ("Ticket #4481 for 36 months, 2,000 copies.", ["#4481", "36", "2,000"]),
    ],
)
def test_amounts_with_currencies_and_numbers(text, expected):
    assert found(text, amount_spans(text)) == expected


def test_names_are_capitalised_words_not_at_a_sentence_start():
    text = "Yesterday we met Anna Kowalski in Paris. The meeting went well.\n1. Fees are due to McDonald."
    assert found(text, name_spans(text)) == ["Anna", "Kowalski", "Paris", "McDonald"]


def test_a_name_is_tagged_at_every_occurrence_once_found():
    text = "Hiroshi: the app fails.\nGood morning Hiroshi, which phone?"
    assert found(text, name_spans(text)) == ["Hiroshi", "Hiroshi"]


def test_defined_terms_from_definitions_and_their_uses():
    text = (
        'This Agreement is made between Acme Ltd (the "Customer") and Brightwater plc (the “Supplier”).\n'
        '1. "Services" means the hosting. "Fees" shall mean the charges. "Service Credits" refers to refunds.\n'
        "The Supplier provides the Services; the Customer pays the Fees and may claim Service Credits."
    )
    assert defined_terms(text) == ["Customer", "Supplier", "Services", "Fees", "Service Credits"]  # text order
    uses = found(text, defined_term_spans(text))
    assert uses.count("Supplier") == 2 and uses.count("Customer") == 2 and uses.count("Fees") == 2
    assert "Service Credits" in uses  # the longer term wins over "Services"/"Service"
    assert "Acme" not in uses


def test_template_lines_need_enough_documents_and_ignore_clause_numbers():
    docs = [
        "Intro one.\n6. Governing Law. English law applies.\nSigned: ____",
        "Intro two.\n7. Governing Law. English law applies.\nSigned: ____",
        "Intro three.\n9. Governing Law. English law applies.",
    ]
    assert template_lines(docs, min_docs=3) == frozenset({"Governing Law. English law applies."})
    assert "Signed: ____" not in template_lines(docs, min_docs=3)  # one word: too short to be a template line
    assert "Governing Law. English law applies." in template_lines(docs[:2], min_docs=2)


def word_tokens(text: str) -> tuple[list[tuple[int, int]], list[bool]]:
    """One token per word or punctuation mark, with a special token at each end (as [CLS] ... [SEP])."""
    offsets = [(0, 0)] + [m.span() for m in re.finditer(r"\w+|[^\w\s]", text)] + [(0, 0)]
    return offsets, [True] + [False] * (len(offsets) - 2) + [True]


def test_tag_precedence_and_partition():
    profile = CorpusProfile.of(["Footer line for all.\nx"] * 3, template_docs=3)
    tagger = Tagger(profile=profile)
    text = 'Yesterday, on 5 May 2026 the "Fee" means £20 paid by Anna Smith.\nFooter line for all.'
    offsets, special = word_tokens(text)
    cats = tagger.tag(text, offsets, special)
    names = tagger.categories
    assert names[cats[0]] == names[cats[-1]] == SPECIAL
    span = lambda s: [
        names[c] for (a, b), c in zip(offsets, cats) if b > a and text.find(s) <= a < text.find(s) + len(s)
    ]
    assert set(span("5 May 2026")) == {"date"}  # "5" is a number too; the date comes first
    assert set(span("£20")) == {"amount"}
    assert set(span("Fee")) == {"defined_term"}
    assert set(span("Anna Smith")) == {"name"}
    assert set(span("Footer line for all.")) == {"boilerplate"}  # a template line, whatever it holds
    assert set(span("Yesterday")) == {OTHER}  # it opens the sentence: not a name
    assert set(span("the")) == set(span(",")) == {"boilerplate"}  # a stop word, punctuation
    counts = np.bincount(cats, minlength=len(names))
    assert counts.sum() == len(offsets)  # every token in exactly one category


def test_template_line_wins_over_a_date_in_it():
    profile = CorpusProfile.of(["Open Monday to Friday.\n"] * 3, template_docs=3)
    text = "Hello there.\nOpen Monday to Friday."
    offsets, special = word_tokens(text)
    cats = Tagger(profile=profile).tag(text, offsets, special)
    names = Tagger(profile=profile).categories
    monday = [
        names[c] for (a, b), c in zip(offsets, cats) if b > a and text.find("Monday") <= a < text.find("Monday") + 6
    ]
    assert set(monday) == {"boilerplate"}
    assert set(found(text, date_spans(text))) == {"Monday", "Friday"}  # dates, outside a template line


def test_rare_by_vocabulary_pieces_and_by_corpus_frequency():
    text = "common word Okonkwo"
    # "Okonkwo" in three pieces, the other words whole
    offsets = [(0, 6), (7, 11), (12, 14), (14, 17), (17, 19)]
    special = [False] * 5
    names = Tagger().categories
    vocab = [names[c] for c in Tagger().tag(text, offsets, special)]
    assert vocab == ["other", "other", "name", "name", "name"]  # a name first, though rare too
    plain = "common word zebra"
    offsets = [(0, 6), (7, 11), (12, 17)]
    profile = CorpusProfile.of(["common word", "common word zebra", "common"], words=True)
    corpus = [names[c] for c in Tagger(profile=profile, rare=1).tag(plain, offsets, [False] * 3)]
    assert corpus == ["other", "other", "rare"]  # "zebra" is in one document, "word" in two
    assert [names[c] for c in Tagger().tag(plain, offsets, [False] * 3)] == ["other", "other", "other"]


def test_rare_vocab_pieces_on_a_lowercase_word():
    text = "the refurbishing"
    offsets = [(0, 3), (4, 7), (7, 9), (9, 12), (12, 16)]
    names = Tagger().categories
    assert [names[c] for c in Tagger().tag(text, offsets, [False] * 5)] == ["boilerplate"] + ["rare"] * 4


def test_user_categories_regex_and_word_list(tmp_path):
    words = tmp_path / "products.txt"
    words.write_text("# products\nWidget Pro\ngizmo\n", encoding="utf-8")
    product = parse_category(f"product=@{words}")
    ticket = parse_category(r"ticket=#\d+", taken=["product"])
    text = "Ticket #4481: the widget   pro and a Gizmo broke on 2026-01-02."
    assert found(text, [m.span() for m in product.pattern.finditer(text)]) == ["widget   pro", "Gizmo"]
    tagger = Tagger(user=(ticket, product))
    assert tagger.categories[:3] == (SPECIAL, "ticket", "product")
    offsets, special = word_tokens(text)
    cats = tagger.tag(text, offsets, special)
    hash_at = text.index("#")
    assert tagger.categories[cats[[a for a, _ in offsets].index(hash_at)]] == "ticket"  # user before amount


@pytest.mark.parametrize(
    "value, message",
    [
        ("nothing", "NAME=REGEX"),
        ("date=foo", "already exists"),
        ("bad name=x", "NAME must be a word"),
        ("x=(unclosed", "not a valid regular expression"),
        ("x=@/no/such/file.txt", "cannot read the word list"),
    ],
)
def test_category_errors_name_the_argument(value, message):
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        parse_category(value)
    assert "--category" in str(info.value)


def test_section_kinds_of_a_contract_and_a_support_ticket():
    from attnkit.apps.audit.measure import section_kinds

    contract = (
        'SERVICES AGREEMENT\n\n1. Definitions. "Fees" means the charges.\n2. Term. It runs by means of renewal.\n'
        "3. Notices. In writing.\n\nSigned for the Customer: ____\n"
    )
    spans, kinds = section_kinds(contract)
    assert kinds == ["clause", "definitions", "clause", "signatures"]  # "by means of" defines nothing
    assert spans[0][0] == 0 and spans[-1][1] == len(contract)
    ticket = (
        "Ticket #1\n\n[2026-03-02 09:14] Anna Kowalski: hello\n[2026-03-02 09:40] Agent (Tom): hi\n"
        "[2026-03-02 09:52] Anna Kowalski: thanks\n"
    )
    assert section_kinds(ticket)[1] == [
        "preamble",
        *(f"message: {w}" for w in ("Anna Kowalski", "Agent (Tom)", "Anna Kowalski")),
    ]
