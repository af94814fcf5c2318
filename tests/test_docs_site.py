"""The documentation site builds with ``mkdocs build --strict`` and documents every public name.

Strict mode turns every warning into a failure: a broken link between pages, a missing anchor,
a page left out of the navigation, a docstring griffe cannot parse (an argument documented
that the signature does not have). The build goes to a temporary folder, never ``site/``.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

pytest.importorskip("mkdocs", reason="the docs site needs the docs extra: pip install 'attnkit[docs]'")
pytest.importorskip("mkdocstrings_handlers.python", reason="the docs site needs mkdocstrings[python] (docs extra)")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import mkdocs_hooks  # noqa: E402

pytestmark = pytest.mark.slow

# Module -> the API page that documents it (every name of its __all__ that is not a module).
API_PAGES = {
    "attnkit": "api/attnkit",
    "attnkit.nn": "api/nn",
    "attnkit.inspect": "api/inspect",
    "attnkit.distributed": "api/distributed",
    "attnkit.viz": "api/viz",
    "attnkit.compat": "api/compat",
    "attnkit.hooks": "api/hooks",
    "attnkit.stats": "api/stats-varlen",
    "attnkit.varlen": "api/stats-varlen",
}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    return out


def test_every_public_name_is_documented(site: Path) -> None:
    for module_name, page in API_PAGES.items():
        module = importlib.import_module(module_name)
        html = (site / f"{page}.html").read_text(encoding="utf-8")
        ids = set(re.findall(r'id="([\w.]+)"', html))
        names = [n for n in module.__all__ if not isinstance(getattr(module, n), types.ModuleType)]
        # A function named like its own module (attnkit.inspect.record) is documented at its definition.
        missing = [n for n in names if f"{module_name}.{n}" not in ids and f"{module_name}.{n}.{n}" not in ids]
        assert not missing, f"{page}: no entry for {module_name}.{missing}"
    # Docstrings are rendered, not just headings: attention's argument table is there.
    attention = (site / "api/attnkit.html").read_text(encoding="utf-8")
    assert "bottom-right aligned" in attention and "dropout_p" in attention


def test_readme_sections_become_pages(site: Path) -> None:
    function = (site / "guide/function.html").read_text(encoding="utf-8")
    assert '<h1 id="the-function">' in function and '<h2 id="backends">' in function  # headings raised one level
    assert "key_padding_mask" in function  # the section's code blocks came along
    assert "github.com/attnkit/attnkit/blob/main/docs/triton.md" not in function  # made a link between pages
    assert 'href="../triton.html"' in function
    home = (site / "index.html").read_text(encoding="utf-8")
    assert "Exact, fast and memory-lean self-attention" in home
    changelog = (site / "changelog.html").read_text(encoding="utf-8")
    assert "Keep a Changelog" in changelog


def test_section_extraction() -> None:
    text = "# T\n\nintro\n\n## A\n\na\n\n```bash\n# not a heading\n```\n\n### A.1\n\nsub\n\n## B\n\nb\n"
    assert mkdocs_hooks.section(text, "intro") == "# T\n\nintro\n\n"
    assert mkdocs_hooks.section(text, "## A") == "# A\n\na\n\n```bash\n# not a heading\n```\n\n## A.1\n\nsub\n\n"
    assert mkdocs_hooks.section(text, None) == text
    with pytest.raises(ValueError, match="'## C' not found"):
        mkdocs_hooks.section(text, "## C")


def test_repository_links_become_relative(tmp_path: Path) -> None:
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "index.md").write_text("x")
    (tmp_path / "nn.md").write_text("x")
    repo = mkdocs_hooks.REPOSITORY
    md = (
        f"[a]({repo}/blob/main/docs/nn.md#shapes) [b]({repo}/tree/main/docs/results) "
        f"[c]({repo}/blob/main/docs/missing.md) [d]({repo}/blob/main/examples/ring_attention.py)"
    )
    out = mkdocs_hooks.relative_links(md, "guide/function.md", tmp_path)
    assert out == (
        f"[a](../nn.md#shapes) [b](../results/index.md) "
        f"[c]({repo}/blob/main/docs/missing.md) [d]({repo}/blob/main/examples/ring_attention.py)"
    )
