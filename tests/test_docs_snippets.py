"""Every ```python block in README.md and docs/ runs as written.

Each block runs on its own, in a fresh namespace, in a temporary working directory (files it
writes land there). An HTML comment on the line just before a block's opening fence changes that;
it is invisible on GitHub, on the package index and on the docs site:

* ``<!-- snippet: continue -->``: the block continues the previous Python block of the same
  file (same namespace); the chain runs as one test, named after its first block.
* ``<!-- snippet: processes N -->``: the block is a whole program run in ``N`` processes at once,
  with the variables ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ...), so
  ``dist.init_process_group("gloo")`` forms a group of ``N`` on this machine.
* ``<!-- snippet: skip REASON -->``: not run (it needs a GPU, several machines, a file only the
  reader has); the reason is shown in pytest's summary. Keep these few.

Failures point at the Markdown: a traceback's line numbers are the file's own.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
DIRECTIVE = re.compile(r"^<!-- snippet: (?P<kind>continue|processes|skip)(?: (?P<arg>.*?))? -->$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>```+|~~~+)\s*(?P<lang>[\w+-]*)")
MAX_SKIPPED = 3  # blocks that may be marked skip across all files


@dataclass
class Block:
    """One fenced ```python block: where it starts (1-based line of its first code line) and its code."""

    path: Path
    line: int
    code: str
    directive: str | None = None
    arg: str | None = None


@dataclass
class Snippet:
    """What one test runs: a block and the blocks that continue it."""

    blocks: list[Block] = field(default_factory=list)

    @property
    def name(self) -> str:
        first = self.blocks[0]
        more = f"+{len(self.blocks) - 1}" if len(self.blocks) > 1 else ""
        return f"{first.path.relative_to(ROOT)}:{first.line}{more}"


def parse_blocks(path: Path, text: str) -> list[Block]:
    """The ```python blocks of ``text`` with their directives.

    Raises:
        ValueError: a malformed ``<!-- snippet: ... -->`` directive, or one not right before a
            Python block.
    """
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            if lines[i].startswith("<!-- snippet:"):
                after = FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
                if DIRECTIVE.match(lines[i]) is None or after is None or after.group("lang") != "python":
                    raise ValueError(
                        f"{path}:{i + 1}: expected '<!-- snippet: continue|processes N|skip REASON -->' on the line "
                        f"right before a ```python fence, got {lines[i]!r}"
                    )
            i += 1
            continue
        fence, lang, indent = opening.group("fence"), opening.group("lang"), len(opening.group("indent"))
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            end += 1
        if lang == "python":
            directive = DIRECTIVE.match(lines[i - 1]) if i > 0 else None
            code = "\n".join(line[indent:] for line in lines[i + 1 : end])
            block = Block(path, i + 2, code)
            if directive is not None:
                block.directive, block.arg = directive.group("kind"), directive.group("arg")
            blocks.append(block)
        i = end + 1
    return blocks


def group_snippets(blocks: list[Block]) -> list[Snippet]:
    """Blocks chained by ``continue`` into one snippet each.

    Raises:
        ValueError: a ``continue`` with no block before it, or after a skipped or multi-process block.
    """
    snippets: list[Snippet] = []
    for block in blocks:
        if block.directive == "continue":
            if not snippets or snippets[-1].blocks[0].path != block.path:
                raise ValueError(f"{block.path}:{block.line}: 'snippet: continue' with no Python block before it")
            if snippets[-1].blocks[0].directive in ("skip", "processes"):
                raise ValueError(
                    f"{block.path}:{block.line}: 'snippet: continue' after a skipped or multi-process block"
                )
            snippets[-1].blocks.append(block)
        else:
            snippets.append(Snippet([block]))
    return snippets


def collect() -> list[Snippet]:
    snippets: list[Snippet] = []
    for path in FILES:
        snippets += group_snippets(parse_blocks(path, path.read_text(encoding="utf-8")))
    return snippets


SNIPPETS = collect()


def _numbered(block: Block) -> str:
    """The block's code preceded by blank lines, so that tracebacks give the Markdown file's line numbers."""
    return "\n" * (block.line - 1) + block.code + "\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_in_processes(block: Block, world: int, tmp_path: Path, timeout: float = 240.0) -> None:
    """Run ``block`` as a program in ``world`` processes with torchrun's environment; fail with their output."""
    script = tmp_path / "snippet.py"
    script.write_text(_numbered(block))
    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "OMP_NUM_THREADS": "1",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script)],
                cwd=tmp_path,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs, failed = [], False
    for rank, proc in enumerate(procs):
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            out, _ = proc.communicate()
            out += f"\n(rank {rank} timed out after {timeout:.0f} s)"
        failed |= proc.returncode != 0
        outputs.append(f"--- rank {rank} (exit {proc.returncode}) ---\n{out}")
    if failed:
        pytest.fail(f"{block.path.relative_to(ROOT)}:{block.line} failed in {world} processes:\n" + "\n".join(outputs))


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.name for s in SNIPPETS])
def test_snippet_runs(snippet: Snippet, tmp_path, monkeypatch) -> None:
    first = snippet.blocks[0]
    if first.directive == "skip":
        pytest.skip(f"{snippet.name}: {first.arg or 'marked skip without a reason'}")
    if first.directive == "processes":
        if first.arg is None or not first.arg.isdigit() or int(first.arg) < 1:
            pytest.fail(f"{snippet.name}: 'snippet: processes N' needs a positive N, got {first.arg!r}")
        run_in_processes(first, int(first.arg), tmp_path)
        return
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__snippet__"}
    for block in snippet.blocks:
        exec(compile(_numbered(block), str(block.path), "exec"), namespace)


def test_snippets_are_collected() -> None:
    """The collector finds the blocks (a parser that found none would pass every file) and few are skipped."""
    readme = [s for s in SNIPPETS if s.blocks[0].path.name == "README.md"]
    assert len(readme) >= 6, [s.name for s in readme]
    assert sum(len(s.blocks) for s in SNIPPETS) >= 15
    skipped = [s.name for s in SNIPPETS if s.blocks[0].directive == "skip"]
    assert len(skipped) <= MAX_SKIPPED, f"too many snippets skipped: {skipped}"
    for snippet in SNIPPETS:
        if snippet.blocks[0].directive == "skip":
            assert snippet.blocks[0].arg, f"{snippet.name}: a skip needs a reason"


def test_parser_directives_and_errors(tmp_path) -> None:
    text = "\n".join(
        [
            "```python",
            "x = 1",
            "```",
            "<!-- snippet: continue -->",
            "```python",
            "assert x == 1",
            "```",
            "```bash",
            "echo not python",
            "```",
            "<!-- snippet: skip needs a GPU -->",
            "```python",
            "raise SystemExit",
            "```",
            "<!-- snippet: processes 2 -->",
            "```python",
            "import torch.distributed",
            "```",
        ]
    )
    blocks = parse_blocks(tmp_path / "a.md", text)
    assert [(b.line, b.directive, b.arg) for b in blocks] == [
        (2, None, None),
        (6, "continue", None),
        (13, "skip", "needs a GPU"),
        (17, "processes", "2"),
    ]
    snippets = group_snippets(blocks)
    assert [len(s.blocks) for s in snippets] == [2, 1, 1]
    with pytest.raises(ValueError, match="right before a ```python fence"):
        parse_blocks(tmp_path / "b.md", "<!-- snippet: skip x -->\n```bash\nls\n```")
    with pytest.raises(ValueError, match="right before a ```python fence"):
        parse_blocks(tmp_path / "c.md", "<!-- snippet: sikp x -->\n```python\npass\n```")
    with pytest.raises(ValueError, match="no Python block before it"):
        group_snippets(parse_blocks(tmp_path / "d.md", "<!-- snippet: continue -->\n```python\npass\n```"))


def test_line_numbers_point_at_the_markdown(tmp_path) -> None:
    (block,) = parse_blocks(tmp_path / "e.md", "# title\n\n```python\nx = 1\nraise ValueError('here')\n```\n")
    with pytest.raises(ValueError) as info:
        exec(compile(_numbered(block), "e.md", "exec"), {})
    assert info.traceback[-1].lineno + 1 == 5  # pytest's lineno is 0-based
