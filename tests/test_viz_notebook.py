"""attnkit.viz.notebook: the inline views' HTML (content, escaping, nothing fetched), and show()'s Python API."""

from __future__ import annotations

import base64
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

import attnkit
from attnkit.apps.checks import UsageError
from attnkit.apps.show import Analysis, show
from attnkit.apps.show.analysis import long_range_links
from attnkit.inspect import head_roles
from attnkit.viz import FlowView, HeadView, ReportData, ReportView, RolesView, render_report
from tests.test_viz_report_browser import browser  # noqa: F401 (the Chromium fixture; skips without it)

HOSTILE = "<img src=x onerror=alert(1)>"
HOSTILE_SCRIPT = "</script><script>window.__pwned=1</script>"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A URL the browser would fetch: in src/href/action/url(...) or @import, quoted or not.
FETCHED_URL = re.compile(
    r"""(?:src|href|action|poster|data)\s*=\s*["']?\s*(?:https?:)?//|url\(\s*["']?(?:https?:)?//|@import"""
)


class Elements(HTMLParser):
    """The start tags of an HTML fragment, with their attributes (entities decoded, as a browser reads them)."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def find(self, tag: str) -> list[dict[str, str]]:
        return [attrs for name, attrs in self.tags if name == tag]


def _maps(layers: int, heads: int, length: int) -> torch.Tensor:
    q, k = torch.randn(1, layers * heads, length, 8), torch.randn(1, layers * heads, length, 8)
    return attnkit.attention_weights(q, k)[0].reshape(layers, heads, length, length)  # (layers, H, L, L)


def _data(tokens: list[str], *, layers: int = 2, heads: int = 3, **fields) -> ReportData:
    return ReportData.from_maps(tokens, _maps(layers, heads, len(tokens)), topk=3, **fields)


def _sectioned(tokens: list[str], titles: list[str], layers: int = 2, heads: int = 3) -> ReportData:
    L, S = len(tokens), len(titles)
    edges = np.linspace(0, L, S + 1).astype(int)
    sections = [
        {"label": str(i + 1), "title": t, "start": a, "end": b}
        for i, (t, a, b) in enumerate(zip(titles, edges, edges[1:]))
    ]
    flow = np.random.default_rng(0).dirichlet(np.ones(S), size=(layers, heads, S))  # (N, H, S, S), rows sum to 1
    return _data(tokens, layers=layers, heads=heads, sections=sections, section_flow=flow)


def _no_fetch(text: str) -> None:
    found = FETCHED_URL.search(text)
    assert found is None, (
        f"the HTML refers to something outside itself: {text[max(0, found.start() - 40) : found.end() + 40]!r}"
    )


# ----------------------------------------------------------------------------- ReportView
def test_report_view_embeds_the_whole_page_in_a_sandboxed_srcdoc():
    data = _data([f"t{i}" for i in range(12)], title="A title")
    view = ReportView(data, height=500)
    out = view._repr_html_()
    frames = Elements(out).find("iframe")
    assert len(frames) == 1
    frame = frames[0]
    # The attribute decodes to exactly the page `attnkit show` writes: the escaping loses nothing.
    assert frame["srcdoc"] == render_report(data) == view.page
    assert frame["sandbox"] == "allow-scripts"  # scripts run, but with an opaque origin: no access to the notebook
    assert "height:500px" in frame["style"] and "width:100%" in frame["style"]
    assert frame["title"] == "A title: 12 tokens, 2 layers x 3 heads"
    assert "attnkit-view" in out and "attnkit-report" in out
    _no_fetch(out)
    _no_fetch(view.page)


def test_report_view_escapes_what_comes_from_the_input():
    tokens = ["a", HOSTILE, HOSTILE_SCRIPT, 'say "hi"', "b&c"]
    view = ReportView(_data(tokens, title=HOSTILE_SCRIPT + HOSTILE))
    out = view._repr_html_()
    # Outside the quoted attribute there is nothing but the div and the iframe: no tag of the input's own.
    assert [tag for tag, _ in Elements(out).tags] == ["div", "iframe"]
    assert "<script" not in out and "<img" not in out and '"hi"' not in out
    assert out.count('"') == out.count('="') * 2  # every double quote opens or closes an attribute
    # Inside the page the input reaches the DOM only through the escaped JSON block (`render_report`'s own rule).
    page = Elements(out).find("iframe")[0]["srcdoc"]  # decoded once, as the browser reads the attribute
    assert page == render_report(view.data) and HOSTILE_SCRIPT not in page and HOSTILE not in page


def test_report_view_saves_the_standalone_page_and_checks_its_arguments(tmp_path):
    data = _data([f"t{i}" for i in range(6)])
    view = ReportView(data)
    path = view.save(tmp_path / "out" / "report.html")
    assert path.read_text(encoding="utf-8") == view.page
    assert "6 tokens" in repr(view)
    with pytest.raises(ValueError, match="height must be an int >= 100"):
        ReportView(data, height=20)
    with pytest.raises(TypeError, match=r"data must be an attnkit\.viz\.ReportData, got dict"):
        ReportView({"tokens": []})


@pytest.mark.browser
def test_report_view_runs_in_a_page_as_a_notebook_shows_it(browser):  # noqa: F811
    """In Chromium: the framed report decodes its data and draws, fetches nothing and cannot reach the host page."""
    tokens = [f"w{i}" for i in range(14)]
    tokens[3] = HOSTILE_SCRIPT
    frame_html = ReportView(_data(tokens), height=400)._repr_html_()
    host = f"<!DOCTYPE html><title>notebook</title><h1>a notebook</h1>{frame_html}"
    page = browser.new_page(viewport={"width": 1000, "height": 700})
    errors, requests = [], []
    page.on("console", lambda m: m.type == "error" and errors.append(m.text))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: requests.append(r.url))
    try:
        page.set_content(host)
        frame = page.frame_locator("iframe")
        frame.locator("body[data-ready='1']").wait_for(timeout=20000)
        assert frame.locator("#text .tok").count() == 14
        assert frame.locator("#grid canvas").count() == 6
        report = next(f for f in page.frames if f != page.main_frame)
        reach = "() => { try { return window.parent.document.title } catch (e) { return 'blocked' } }"
        assert report.evaluate(reach) == "blocked"  # sandboxed: an opaque origin
        assert report.evaluate("() => window.__pwned") is None and page.evaluate("() => window.__pwned") is None
        assert errors == []
        assert not [url for url in requests if not url.startswith(("about:", "data:", "blob:"))], requests
    finally:
        page.close()


# ----------------------------------------------------------------------------- HeadView
def test_head_view_png_and_html_show_the_same_heatmap_and_the_strongest_links():
    pytest.importorskip("matplotlib")
    tokens = ["[CLS]", "the", "cat", HOSTILE, "sat", "[SEP]"]
    weights = torch.full((6, 6), 0.02)
    weights[4, 2] = 0.9  # sat -> cat, the strongest
    weights[3, 0] = 0.5  # the hostile token -> [CLS], second
    view = HeadView(weights, tokens, title=f"head {HOSTILE}", links=2)
    png = view._repr_png_()
    assert png.startswith(PNG_SIGNATURE)
    assert view.strongest() == [
        ("'sat' (4)", "'cat' (2)", pytest.approx(0.9)),
        (f"{HOSTILE!r} (3)", "'[CLS]' (0)", pytest.approx(0.5)),
    ]
    out = view._repr_html_()
    page = Elements(out)
    images = page.find("img")
    assert len(images) == 1 and images[0]["src"].startswith("data:image/png;base64,")
    assert base64.b64decode(images[0]["src"].split(",", 1)[1]) == png
    assert [tag for tag, _ in page.tags].count("img") == 1 and "<img src=x" not in out
    text = "".join(page.text)
    assert f"head {HOSTILE}: 6 queries x 6 keys" in text
    assert "'sat' (4) → 'cat' (2): 0.900" in text and len(page.find("li")) == 2
    _no_fetch(out)


def test_head_view_from_a_pooled_report_names_token_ranges():
    pytest.importorskip("matplotlib")
    tokens = [f"t{i}" for i in range(40)]
    data = ReportData.from_maps(tokens, _maps(1, 2, 40), map_budget=20, tiles=8, topk=2)
    view = HeadView.from_report(data, 0, 1, links=1)
    assert view.weights.shape == (8, 8) and view.title == "layer 0, head 1"
    ((query, key, weight),) = view.strongest()
    assert re.fullmatch(r"tokens \d+–\d+", query) and re.fullmatch(r"tokens \d+–\d+", key)
    assert weight == pytest.approx(data.maps[0, 1].max())
    assert "8 x 8 pooled tiles" in view._repr_html_()
    with pytest.raises(IndexError, match=r"and head in \[0, 2\), got layer=0, head=2"):
        HeadView.from_report(data, 0, 2)


def test_head_view_checks_its_arguments():
    with pytest.raises(ValueError, match=r"weights must be 2-D, got shape \(2, 3, 3\)"):
        HeadView(torch.rand(2, 3, 3))
    with pytest.raises(ValueError, match=r"tokens must have 3 entries for a \(3, 3\) map, got 2"):
        HeadView(torch.rand(3, 3), ["a", "b"])
    with pytest.raises(ValueError, match="links must be >= 0, got -1"):
        HeadView(torch.rand(3, 3), links=-1)


# ----------------------------------------------------------------------------- FlowView
def test_flow_view_tabulates_the_mean_flow_with_escaped_section_names():
    data = _sectioned([f"t{i}" for i in range(24)], ["Definitions", HOSTILE, "Payment"])
    view = FlowView.from_report(data)
    expected = data.section_flow.reshape(-1, 3, 3).mean(0)  # (S, S): every layer and head counts the same
    np.testing.assert_allclose(view.flow, expected)
    out = view._repr_html_()
    page = Elements(out)
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", out)
    assert cells == [f"{v:.2f}" for v in expected.ravel()]
    assert "<img" not in out and f"2 {HOSTILE}" in "".join(page.text)
    assert "Section flow (all layers and heads)" in "".join(page.text)
    _no_fetch(out)


def test_flow_view_of_one_layer_or_head_and_its_errors():
    data = _sectioned([f"t{i}" for i in range(12)], ["a", "b", "c"])
    np.testing.assert_allclose(FlowView.from_report(data, layer=1).flow, data.section_flow[1].mean(0))
    one = FlowView.from_report(data, layer=1, head=2)
    np.testing.assert_allclose(one.flow, data.section_flow[1, 2])
    assert one.title == "Section flow (layer 1, head 2)"
    with pytest.raises(ValueError, match="head needs layer"):
        FlowView.from_report(data, head=0)
    with pytest.raises(IndexError, match=r"layer must lie in \[0, 2\), got 5"):
        FlowView.from_report(data, layer=5)
    with pytest.raises(ValueError, match="this report has no sections"):
        FlowView.from_report(_data(["a", "b"]))
    with pytest.raises(ValueError, match="sections must have 3 entries for a 3x3 flow, got 2"):
        FlowView(np.eye(3), ["a", "b"])
    with pytest.raises(ValueError, match=r"flow must be 2-D or 3-D or 4-D, got shape \(3,\)"):
        FlowView(np.ones(3), ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"flow must end in a square \(S, S\), got \(2, 3\)"):
        FlowView(np.ones((2, 3)), ["a", "b", "c"])


# ----------------------------------------------------------------------------- RolesView
def test_roles_view_from_head_roles_puts_every_head_in_its_cell():
    q = torch.randn(1, 4, 16, 8)
    stats = [attnkit.attention_stats(q, q, q, topk=3) for _ in range(2)]  # two "layers" of 4 heads
    roles = head_roles(stats)
    view = RolesView.from_head_roles(roles, title="roles")
    out = view._repr_html_()
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", out)
    assert cells == [row["role"] for row in roles.rows]  # layer by layer, head by head
    assert view.counts() == {k: v for k, v in sorted(roles.counts().items(), key=lambda kv: -kv[1]) if v}
    assert out.count("<tr>") == 1 + 2 and "H3" in out and "H4" not in out
    _no_fetch(out)


def test_roles_view_escapes_and_checks_rows():
    rows = [
        {"layer": 0, "head": 0, "role": HOSTILE, "scores": {"locality": 0.25}},
        {"layer": 0, "head": 2, "role": "local", "scores": {"locality": float("nan")}},
    ]
    view = RolesView(rows, descriptions={HOSTILE: HOSTILE_SCRIPT})
    out = view._repr_html_()
    assert "<img" not in out and "<script" not in out
    assert [tag for tag, _ in Elements(out).tags].count("td") == 3  # head 1 was not scored: an empty cell
    tips = [attrs["title"] for attrs in Elements(out).find("td") if "title" in attrs]
    assert tips == [f"layer 0, head 0: {HOSTILE}; locality: 0.25", "layer 0, head 2: local"]
    assert HOSTILE_SCRIPT in "".join(Elements(out).text)  # the description, as text
    with pytest.raises(ValueError, match="rows is empty"):
        RolesView([])
    with pytest.raises(ValueError, match="a row lacks 'role'"):
        RolesView([{"layer": 0, "head": 0}])


# ----------------------------------------------------------------------------- Analysis and show()
def test_analysis_displays_as_the_report_and_gives_the_small_views():
    pytest.importorskip("matplotlib")
    tokens = [f"w{i}" for i in range(20)]
    data = _sectioned(tokens, ["one", "two", "three"])
    data.roles = [{"layer": l, "head": h, "role": "local", "scores": {}} for l in range(2) for h in range(3)]
    result = Analysis(data=data, links=long_range_links(data, min_distance=2))
    assert Elements(result._repr_html_()).find("iframe")[0]["srcdoc"] == render_report(data)
    assert repr(result).startswith("Analysis('attnkit attention report': 20 tokens, 2 layers x 3 heads")
    first = result.links[0]
    assert result.head().title == f"layer {first.layer}, head {first.head}"
    assert result.head(1, 0).title == "layer 1, head 0"
    with pytest.raises(ValueError, match="give both layer and head"):
        result.head(1)
    assert isinstance(result.flow(layer=0), FlowView) and isinstance(result.report(height=300), ReportView)
    assert result.roles().counts() == {"local": 6}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"text": "hi", "example": "news"}, "give one of text, example or file, got text and example"),
        ({"example": "poem"}, "example must be one of contract, "),
        ({"text": "  "}, "text is empty"),
        ({"file": "/nonexistent/notes.txt"}, "cannot read file '/nonexistent/notes.txt'"),
        ({"example": "protein", "max_tokens": 50}, "reads the whole sequence; drop max_tokens=50"),
    ],
)
def test_show_rejects_bad_arguments_before_loading_a_model(kwargs, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        show(**kwargs)


def test_show_reads_a_file(tmp_path: Path):
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(UsageError, match="holds no text"):
        show(file=tmp_path / "empty.txt")
