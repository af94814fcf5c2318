"""`attnkit audit`'s outputs without a model: the results file behind --resume, the tables, the HTML page."""

from __future__ import annotations

import csv
import json

import pytest

from attnkit.apps.audit import page
from attnkit.apps.audit.store import ResultsFile
from attnkit.apps.audit.tables import write_table
from attnkit.apps.checks import UsageError

HEADER = {"version": 1, "model": "m", "window": 256}


def test_results_file_appends_flushes_and_resumes(tmp_path):
    path = tmp_path / "results-a.jsonl"
    with ResultsFile(path, HEADER, resume=False) as results:
        results.add({"id": "one", "status": "ok"})
        assert path.read_text(encoding="utf-8").count("\n") == 2  # on disk at once, before close
    with path.open("a", encoding="utf-8") as f:
        f.write('{"id": "two", "sta')  # cut short by an interruption
    with ResultsFile(path, HEADER, resume=True) as results:
        assert set(results.done) == {"one"}
        results.add({"id": "two", "status": "skipped", "reason": "empty"})
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert lines == [
        {"header": HEADER},
        {"id": "one", "status": "ok"},
        {"id": "two", "status": "skipped", "reason": "empty"},
    ]


def test_results_file_refuses_to_overwrite_or_to_resume_other_settings(tmp_path):
    path = tmp_path / "results-a.jsonl"
    ResultsFile(path, HEADER, resume=False).close()
    with pytest.raises(UsageError, match="--resume to continue it, --overwrite"):
        ResultsFile(path, HEADER, resume=False)
    with pytest.raises(UsageError, match=r"--resume: .* other settings \(window: 256 then, 128 now\)"):
        ResultsFile(path, {**HEADER, "window": 128}, resume=True)
    ResultsFile(path, {**HEADER, "window": 128}, resume=False, overwrite=True).close()
    assert json.loads(path.read_text(encoding="utf-8").splitlines()[0])["header"]["window"] == 128
    path.write_text("not a header\n", encoding="utf-8")
    with pytest.raises(UsageError, match="does not start with an attnkit audit header"):
        ResultsFile(path, HEADER, resume=True)


def test_tables_csv_and_parquet_with_empty_cells_and_empty_tables(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet", reason="Parquet output needs pyarrow: attnkit[audit]")
    rows = [{"document": "a", "ratio": 1.5}, {"document": "b", "ratio": None, "extra": 3}]
    written = write_table(rows, tmp_path, "t")
    assert [p.name for p in written] == ["t.csv", "t.parquet"]
    with (tmp_path / "t.csv").open(encoding="utf-8") as f:
        assert list(csv.reader(f)) == [["document", "ratio", "extra"], ["a", "1.5", ""], ["b", "", "3"]]
    assert pq.read_table(tmp_path / "t.parquet").to_pylist() == [
        {"document": "a", "ratio": 1.5, "extra": None},
        {"document": "b", "ratio": None, "extra": 3},
    ]
    write_table([], tmp_path, "empty", columns=["variant", "document", "reason"], parquet=False)
    assert (tmp_path / "empty.csv").read_text(encoding="utf-8").strip() == "variant,document,reason"


def summary(**changes) -> page.Summary:
    rows = [
        {"layer": layer, "category": c, "token_share": t, "attention_share": a, "ci_low": a - 0.01,
         "ci_high": a + 0.01, "ratio": a / t, "documents": 2}
        for layer in ("0", "all")
        for c, t, a in (("date", 0.2, 0.1), ("other", 0.8, 0.9))
    ]  # fmt: skip
    fields = dict(
        title="Audit <b>", subtitle="2 documents", headline=["dates: 20% of tokens"], categories=["date", "other"],
        layers=1, category_rows=rows, top_heads={"date": [(0, 1, 0.3, 1.5)]}, sections=[],
        off=[{"document": "<script>alert(1)</script>.txt", "off": 0.2, "over": "other", "under": "date"}],
        skipped=[{"variant": "a", "document": "x&y.txt", "reason": "empty"}],
    )  # fmt: skip
    fields.update(changes)
    return page.Summary(**fields)


def test_page_is_self_contained_and_escapes_what_it_shows():
    html = page.render(summary())
    assert "<script" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;.txt" in html
    assert "Audit &lt;b&gt;" in html and "x&amp;y.txt" in html
    assert "default-src 'none'" in html and "http" not in html.replace("http-equiv", "")
    assert html.count("<svg") == 2  # all layers, layer 0
    assert "A/B" not in html


def test_page_draws_the_ab_forest_plot():
    shares = {"attention_share_a": 0.1, "attention_share_b": 0.05}
    diff = {"diff": -0.05, "diff_low": -0.07, "diff_high": -0.03}
    excess = {"excess_diff": -0.01, "excess_low": -0.02, "excess_high": 0.0}
    ab = [{"category": "date", "documents": 2, **shares, **diff, **excess}]
    html = page.render(summary(ab=ab, ab_title="B against A"))
    assert "A/B: B against A" in html and html.count("<svg") == 3
    assert "-5.00 [-7.00, -3.00]" in html and "-1.00 [-2.00, +0.00]" in html


def test_format_b_script_of_the_examples_strips_the_template_lines():
    from pathlib import Path

    from attnkit.apps.audit.abtest import load_format
    from attnkit.apps.audit.corpus import demo_corpus

    script = Path(__file__).resolve().parents[1] / "examples" / "audit_strip_boilerplate.py"
    reformat = load_format(f"{script}:reformat")
    assert load_format(str(script))("Dear all,\n--\nBye") == "Dear all,\nBye"  # reformat, the default name
    for name, gone in (("contract-01.txt", "Signed for"), ("ticket-01.txt", "Please do not reply"),
                       ("news-01.txt", "All rights reserved")):  # fmt: skip
        text = (demo_corpus() / name).read_text(encoding="utf-8")
        out = reformat(text)
        assert gone in text and gone not in out
        removed = [line for line in text.splitlines() if line not in out.splitlines()]
        assert 1 <= len(removed) <= 3  # only the template lines went
    with pytest.raises(ValueError, match=r"--format-b .*expected a function 'tidy'.*reformat"):
        load_format(f"{script}:tidy")
