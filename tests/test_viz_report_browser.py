"""The HTML report in a real browser: Debian's Chromium driven by Playwright.

Skips, with the reason in the test summary, where /usr/bin/chromium or playwright is missing
(`make test` installs Chromium when it runs as root).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

import attnkit
from attnkit.viz.report import ReportData, write_report

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
HOSTILE = "<img src=x onerror=alert(1)>"
HOSTILE_SCRIPT = "</script><script>window.__pwned=1</script>"


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(
            f"{CHROMIUM} is absent: install Debian's chromium (apt-get install -y chromium) to run browser tests"
        )
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


class Page:
    """A loaded report with everything it logged and requested."""

    def __init__(self, browser, path: Path):
        self.page = browser.new_page(viewport={"width": 1280, "height": 900})
        self.console, self.requests, self.dialogs = [], [], []
        self.page.on("console", lambda m: self.console.append((m.type, m.text)))
        self.page.on("pageerror", lambda e: self.console.append(("pageerror", str(e))))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.url = path.resolve().as_uri()
        self.page.goto(self.url)
        self.page.wait_for_selector("body[data-ready='1']", timeout=20000)

    def errors(self) -> list:
        return [entry for entry in self.console if entry[0] in ("error", "pageerror")]

    def canvas(self, selector: str) -> str:
        return self.page.eval_on_selector(selector, "c => c.toDataURL()")


def _report(tmp_path: Path, tokens: list[str], *, layers=2, heads=3, **fields) -> Path:
    torch.manual_seed(0)
    L = len(tokens)
    q = torch.randn(1, layers * heads, L, 8) * 2
    k = torch.randn(1, layers * heads, L, 8) * 2
    maps = attnkit.attention_weights(q, k)[0].reshape(layers, heads, L, L)  # (layers, H, L, L)
    data = ReportData.from_maps(tokens, maps, **fields)
    return write_report(data, tmp_path / "report.html")


@pytest.fixture
def report(browser, tmp_path):
    tokens = [f"word{i}" for i in range(30)]
    roles = [
        {"layer": l, "head": h, "role": "local" if h else "broad", "scores": {"score": l + h / 10}}
        for l in range(2)
        for h in range(3)
    ]
    path = _report(
        tmp_path,
        tokens,
        roles=roles,
        role_descriptions={"local": "attends to near neighbours", "broad": "spreads over the text"},
        entropy=np.arange(6).reshape(2, 3) / 2,
        mean_distance=np.arange(6)[::-1].reshape(2, 3) * 1.5,
        saliency={"rollout": np.r_[5.0, np.linspace(0, 1, 28), 0.0]},
        special=[0, 29],
        faithfulness=[{"name": "deletion AUC", "value": 0.25, "note": "lower is better"}],
    )
    return Page(browser, path)


def test_loads_offline_without_errors(report):
    assert report.errors() == []
    assert report.requests == [report.url], f"unexpected requests: {report.requests}"
    assert report.page.locator("#text .tok").count() == 30
    assert report.page.locator("#grid canvas").count() == 6


def test_picking_a_head_changes_the_map(report):
    before = report.canvas("#map")
    report.page.select_option("#head", "2")
    after_head = report.canvas("#map")
    report.page.select_option("#layer", "1")
    after_layer = report.canvas("#map")
    assert len({before, after_head, after_layer}) == 3


def test_clicking_a_thumbnail_opens_that_head(report):
    report.page.click("#grid canvas[data-l='1'][data-h='2']")
    assert report.page.input_value("#layer") == "1" and report.page.input_value("#head") == "2"
    assert report.page.locator("#grid canvas.current").count() == 1


def test_hovering_a_token_highlights_its_links(report):
    before = report.canvas("#map")
    report.page.hover("#text .tok[data-i='7']")
    targets = report.page.eval_on_selector_all("#text .tok.to", "s => s.map(x => Number(x.dataset.i))")
    assert 1 <= len(targets) <= 5  # its top-k keys
    assert "word7" in report.page.inner_text("#links")
    assert report.canvas("#map") != before  # the row is marked on the map
    sources = report.page.eval_on_selector_all("#text .tok.from", "s => s.length")
    assert sources >= 1 or "no token has it" in report.page.inner_text("#links")
    report.page.hover("#title")
    assert report.page.locator("#text .tok.to").count() == 0


def test_role_table_sorts(report):
    report.page.click("#role-table th[data-key='mean distance']")
    first = report.page.eval_on_selector_all("#role-table tbody tr", "rows => rows.map(r => r.cells[4].textContent)")
    values = [float(v) for v in first]
    assert values == sorted(values)
    report.page.click("#role-table th[data-key='mean distance']")
    values = [
        float(v)
        for v in report.page.eval_on_selector_all("#role-table tbody tr", "r => r.map(x => x.cells[4].textContent)")
    ]
    assert values == sorted(values, reverse=True)
    assert "attends to near neighbours" in report.page.inner_text("#role-descriptions")


def test_saliency_is_scaled_past_the_special_tokens(report):
    alphas = report.page.eval_on_selector_all(
        "#saliency-text .tok", "s => s.map(x => parseFloat(getComputedStyle(x).backgroundColor.split(',')[3] ?? '1'))"
    )
    assert alphas[0] == 1 and alphas[28] == 1  # [CLS] (5.0) clipped; the largest ordinary token (1.0) is full colour
    assert 0.45 < alphas[14] < 0.55  # halfway, not washed out by the sink
    assert report.page.locator("#saliency-text .tok.special").count() == 2
    assert "5.14" not in report.page.inner_text("#faithfulness") and "lower is better" in report.page.inner_text(
        "#faithfulness"
    )


def test_screenshot_is_not_blank(report):
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(report.page.screenshot(full_page=True))).convert("RGB"))
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) > 100, f"screenshot has only {len(colours)} colours"
    assert pixels.std() > 10


def test_hostile_tokens_show_as_text_and_run_nothing(browser, tmp_path):
    tokens = ["start", HOSTILE, HOSTILE_SCRIPT, "end"]
    path = _report(tmp_path, tokens, title=HOSTILE, notes=[HOSTILE_SCRIPT])
    report = Page(browser, path)
    report.page.hover("#text .tok[data-i='1']")
    report.page.wait_for_timeout(200)
    assert report.dialogs == []
    assert report.page.evaluate("window.__pwned") is None
    assert report.page.locator("img").count() == 0
    assert report.page.locator("#text .tok[data-i='1']").text_content() == HOSTILE
    assert report.page.locator("#text .tok[data-i='2']").text_content() == HOSTILE_SCRIPT
    assert report.page.locator("#title").text_content() == HOSTILE
    assert report.page.title() == HOSTILE
    assert report.errors() == [] and report.requests == [report.url]


def test_long_pooled_report_stays_responsive(browser, tmp_path):
    L = 4096
    rng = np.random.default_rng(1)
    P, k = 96, 5
    edges = np.round(np.linspace(0, L, P + 1)).astype(int)
    pooled = rng.dirichlet(np.ones(P), size=(6, 12, P)) / (L / P)
    index = rng.integers(0, L, size=(6, 12, L, k))
    weight = np.sort(rng.random((6, 12, L, k)) / k, axis=-1)[..., ::-1]
    data = ReportData([f"t{i}" for i in range(L)], pooled, index, weight, edges=edges)
    path = write_report(data, tmp_path / "long.html")
    assert path.stat().st_size < 10 * 2**20
    report = Page(browser, path)
    assert report.errors() == []
    assert "pooled" in report.page.inner_text("#subtitle")
    report.page.select_option("#head", "5")
    report.page.hover("#text .tok[data-i='2000']")
    expected = sorted(index[0, 5, 2000].tolist())
    got = sorted(report.page.eval_on_selector_all("#text .tok.to", "s => s.map(x => Number(x.dataset.i))"))
    assert got == sorted(set(expected))


def _section_report(
    tmp_path: Path, *, sections=24, per=10, layers=2, heads=3, causal=False, titles=(), **fields
) -> Path:
    """A report over ``sections x per`` tokens whose flow is computed from its own maps, with the tokens of
    section ``sections - 4`` drawing on section 2 (a clause using an early definition)."""
    torch.manual_seed(0)
    L = sections * per
    q = torch.randn(1, layers * heads, L, 8)
    k = torch.randn(1, layers * heads, L, 8)
    scores = q @ k.transpose(-1, -2) / 8**0.5  # (1, layers * heads, L, L)
    late, early = sections - 4, 2
    scores[..., late * per : (late + 1) * per, early * per : (early + 1) * per] += 3.0
    if causal:
        scores = scores.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    maps = scores.softmax(-1)[0].reshape(layers, heads, L, L)  # (layers, H, L, L)
    member = torch.arange(L) // per  # section of each token
    onehot = torch.nn.functional.one_hot(member, sections).float()  # (L, S)
    flow = (onehot.T @ maps @ onehot) / per  # (layers, H, S, S): mean over a section's tokens of the weight per section
    titles = [*titles, *["Definitions", "Services", "Availability", "Fees"][len(titles) :]]
    titles += [f"Clause about topic {i}" for i in range(sections)]
    spans = [
        {"label": f"{1 + i // 4}.{1 + i % 4}", "title": titles[i], "start": i * per, "end": (i + 1) * per}
        for i in range(sections)
    ]
    tokens = [f"w{i}" for i in range(L)]
    data = ReportData.from_maps(tokens, maps, sections=spans, section_flow=flow.numpy(), **fields)
    return write_report(data, tmp_path / "sections.html")


def test_sections_view_ranks_sources_and_shows_token_links(browser, tmp_path):
    report = Page(browser, _section_report(tmp_path))
    page = report.page
    assert report.errors() == [], report.errors()
    assert page.locator("#sections").is_visible() and page.locator("#nav-sections").is_visible()
    assert page.locator("#section-list li").count() == 24
    # The clause that draws on the early section has the longest reach and is picked first.
    first = page.locator("#section-list button").first
    assert "6.1" in first.inner_text() and first.get_attribute("aria-pressed") == "true"
    # Pick it by keyboard from the list; its strongest source beyond itself is section 2 ("1.3 Availability").
    page.locator("#section-list button[title^='6.1 ']").focus()
    page.keyboard.press("Enter")
    sources = page.locator("#section-sources button")
    assert "1.3 “Availability”" in sources.nth(0).inner_text() or "1.3 “Availability”" in sources.nth(1).inner_text()
    assert "17 sections back" in page.inner_text("#section-sources")
    assert "1.3" in page.inner_text("#section-summary")
    # Choosing the source lists the token links from 6.1 into 1.3, strongest first, with their context.
    sources.filter(has_text="Availability").click()
    assert "6.1 → 1.3" in page.inner_text("#section-links-title")
    links = page.locator("#section-links button")
    assert links.count() >= 3
    first_link = links.first.locator("mark")
    q, k = (int(first_link.nth(n).inner_text()[1:]) for n in range(2))
    assert 200 <= q < 210 and 20 <= k < 30  # query in section 6.1 (tokens 200-209), key in 1.3 (20-29)
    # A single head, then back to the averages; the map redraws.
    before = report.canvas("#section-map")
    page.select_option("#section-layer", "1")
    page.select_option("#section-head", "2")
    assert report.canvas("#section-map") != before
    # The caption follows the head choice; wait for it rather than read it once (the page redraws asynchronously).
    page.wait_for_function(
        "() => document.querySelector('#section-links-caption').textContent.includes('in this head')", timeout=5000
    )
    # Hovering the heatmap names both sections.
    box = page.locator("#section-map").bounding_box()
    page.mouse.move(box["x"] + 48 + 2.5 * 468 / 24, box["y"] + 48 + 20.5 * 468 / 24)
    assert "6.1" in page.inner_text("#section-readout") and "1.3" in page.inner_text("#section-readout")
    # A link opens its head in the head view with the query token pinned.
    links.first.click()
    assert page.locator("#text .tok.pinned").count() == 1
    assert report.errors() == [] and report.requests == [report.url]
    assert page.locator("#section-causal").is_hidden()
    page.locator("#sections").screenshot(path=str(tmp_path / "sections.png"))


def test_sections_view_of_a_causal_model_points_only_backwards(browser, tmp_path):
    report = Page(browser, _section_report(tmp_path, causal=True))
    page = report.page
    assert report.errors() == []
    assert "Causal model: a section draws only on earlier sections" in page.inner_text("#section-causal")
    page.locator("#section-list button[title^='1.2 ']").click()
    listed = page.inner_text("#section-sources")
    assert "forward" not in listed and "(later sections: zero, causal)" in listed


def test_without_sections_there_is_no_sections_view(report):
    assert report.page.locator("#sections").is_hidden() and report.page.locator("#nav-sections").is_hidden()


def test_hostile_section_titles_show_as_text_and_run_nothing(browser, tmp_path):
    report = Page(browser, _section_report(tmp_path, sections=6, titles=[HOSTILE, HOSTILE_SCRIPT]))
    page = report.page
    page.locator("#section-list button", has_text=HOSTILE).click()
    page.locator("#section-sources button").first.click()
    page.wait_for_timeout(100)
    assert report.dialogs == [] and page.evaluate("window.__pwned") is None and page.locator("img").count() == 0
    assert HOSTILE in page.inner_text("#section-picked") and HOSTILE_SCRIPT[:30] in page.inner_text("#section-list")
    assert report.errors() == [] and report.requests == [report.url]


def test_sections_view_says_what_the_size_budget_left_out(browser, tmp_path):
    report = Page(browser, _section_report(tmp_path, sections=12, section_flow_budget=0))
    page = report.page
    assert report.errors() == []
    assert "size budget" in page.inner_text("#section-note") and page.locator("#section-note").is_visible()
    assert page.locator("#section-layer option:disabled").count() == 2  # both layers: only the mean of all is kept
    assert page.locator("#section-head option:disabled").count() == 3
    assert page.locator("#section-links button").count() >= 1  # links come from the top-k, which are all kept


@pytest.mark.slow
def test_a_long_show_report_from_a_real_pipeline_opens_without_errors(browser, tmp_path):
    """`attnkit show` on 3000 tokens of the long contract (a tiny decoder): the report opens, pooled, with sections."""
    from attnkit.apps.bench.show import long_text, tiny_llama
    from attnkit.apps.cli import build_parser
    from attnkit.apps.show import command

    ckpt = tiny_llama(tmp_path / "llama", positions=4096)
    text = tmp_path / "contract.txt"
    text.write_text(long_text(3000), encoding="utf-8")
    out = tmp_path / "report.html"
    argv = [
        "show",
        "--model",
        str(ckpt),
        "--file",
        str(text),
        "--max-tokens",
        "3000",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert command.run(build_parser().parse_args(argv)) == 0
    assert out.stat().st_size < 15 * 2**20
    report = Page(browser, out)
    page = report.page
    assert report.errors() == [], report.errors()
    assert page.locator("#sections").is_visible()
    assert page.locator("#section-list li").count() > 20
    assert page.locator("#section-causal").is_visible()  # a decoder: flows point backwards only
    page.locator("#section-list button").nth(3).click()
    assert page.inner_text("#section-summary").strip()
    assert report.errors() == [] and report.requests == [report.url]
