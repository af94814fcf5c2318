"""MkDocs hooks for the attnkit site (`mkdocs.yml`: ``hooks:``).

Two jobs, so that README.md stays the one source of its sections and still reads well on the
package index, where links must be absolute:

* a page line ``<!-- include: README.md ## The function -->`` is replaced by that section of the
  file (its heading down to the next heading of the same or a higher level, headings raised so the
  section's own becomes the page's title); ``<!-- include: README.md intro -->`` takes the text
  before the first ``##`` heading, and ``<!-- include: CHANGELOG.md -->`` the whole file;
* links to the repository's documentation (``https://github.com/attnkit/attnkit/blob/main/docs/...``
  and ``.../tree/main/docs/...``) become links between the site's pages, so that
  ``mkdocs build --strict`` checks them like any other.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

REPOSITORY = "https://github.com/attnkit/attnkit"
INCLUDE = re.compile(r"^<!-- include: (?P<file>[\w.-]+)(?: (?P<section>.+?))? -->$", re.MULTILINE)
DOCS_LINK = re.compile(re.escape(REPOSITORY) + r"/(?:blob|tree)/main/docs/(?P<path>[^)\s#]*)(?P<anchor>#[^)\s]*)?")
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6}) ")


def _outside_fences(lines: list[str]) -> list[bool]:
    """For each line, whether it lies outside fenced code (a ``# comment`` in a block is no heading)."""
    outside, inside = [], False
    for line in lines:
        if FENCE.match(line):
            outside.append(False)
            inside = not inside
        else:
            outside.append(not inside)
    return outside


def section(text: str, heading: str | None) -> str:
    """``heading``'s section of the Markdown ``text`` with its headings raised to start at ``#``.

    ``None`` gives the whole text; ``"intro"`` the text before the first ``##`` heading.

    Raises:
        ValueError: the heading is not in the text.
    """
    if heading is None:
        return text
    lines = text.splitlines()
    outside = _outside_fences(lines)
    if heading == "intro":
        end = next((i for i, line in enumerate(lines) if outside[i] and line.startswith("## ")), len(lines))
        return "\n".join(lines[:end]) + "\n"
    match = HEADING.match(heading)
    if match is None or heading not in lines:
        raise ValueError(f"include: section {heading!r} not found (expected a heading line such as '## Benchmarks')")
    level = len(match.group(1))
    start = lines.index(heading)
    end = next(
        (
            i
            for i in range(start + 1, len(lines))
            if outside[i] and (m := HEADING.match(lines[i])) and len(m.group(1)) <= level
        ),
        len(lines),
    )
    body = []
    for i in range(start, end):
        line = lines[i]
        if outside[i] and HEADING.match(line):
            line = line[level - 1 :]  # "## Title" -> "# Title", "### Sub" -> "## Sub"
        body.append(line)
    return "\n".join(body) + "\n"


def relative_links(markdown: str, page: str, docs_dir: Path) -> str:
    """Repository links to files under ``docs/`` rewritten relative to ``page`` (a path in ``docs_dir``)."""

    def rewrite(match: re.Match) -> str:
        target = match.group("path").rstrip("/")
        if (docs_dir / target).is_dir():
            target = posixpath.join(target, "index.md")
        if not (docs_dir / target).is_file():
            return match.group(0)
        return posixpath.relpath(target, posixpath.dirname(page) or ".") + (match.group("anchor") or "")

    return DOCS_LINK.sub(rewrite, markdown)


def on_page_markdown(markdown: str, page, config, files) -> str:
    root = Path(config["config_file_path"]).parent
    docs_dir = Path(config["docs_dir"])

    def include(match: re.Match) -> str:
        return section((root / match.group("file")).read_text(encoding="utf-8"), match.group("section"))

    markdown = INCLUDE.sub(include, markdown)
    return relative_links(markdown, page.file.src_uri, docs_dir)
