"""Every public name is used by a test: `__all__` of the public modules against the text of tests/.

The rule, checked statically (no test is run here): a name counts as used when it appears as a
Python name token in some ``tests/*.py`` other than this file, outside ``import`` / ``from``
statements, comments and strings. So ``attnkit.inspect.Recording`` or ``isinstance(r, Recording)``
count; ``from attnkit.inspect import Recording`` alone, ``# Recording`` or ``"PeerError: ..."`` do
not. A name can still be used weakly; this test only finds the names no test touches at all.
"""

from __future__ import annotations

import importlib
import io
import tokenize
from pathlib import Path

import pytest

MODULES = ("attnkit", "attnkit.nn", "attnkit.inspect", "attnkit.distributed", "attnkit.viz")
TESTS = Path(__file__).parent


def used_names(source: str) -> set[str]:
    """Name tokens of ``source`` outside import statements (comments and strings are other tokens)."""
    used, in_import, line_start = set(), False, True
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.NEWLINE, tokenize.ENDMARKER):
            in_import, line_start = False, True
            continue
        if tok.type in (tokenize.NL, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT):
            continue
        if line_start and tok.type == tokenize.NAME and tok.string in ("import", "from"):
            in_import = True
        line_start = False
        if tok.type == tokenize.NAME and not in_import:
            used.add(tok.string)
    return used


def test_the_rule_counts_uses_and_ignores_imports_comments_and_strings():
    source = (
        "from attnkit.inspect import Recording, LayerRecord\n"
        "import attnkit.viz as ReportData\n"
        "x = attnkit.inspect.head_roles  # Faithfulness\n"
        "assert isinstance(r, (Recording,))\n"
        "msg = 'PeerError: failed'\n"
    )
    assert used_names(source) & {"Recording", "LayerRecord", "ReportData", "head_roles", "Faithfulness",
                                 "PeerError"} == {"Recording", "head_roles"}  # fmt: skip


@pytest.fixture(scope="module")
def used_in_tests() -> set[str]:
    names: set[str] = set()
    for path in sorted(TESTS.glob("*.py")):
        if path.name != Path(__file__).name:
            names |= used_names(path.read_text(encoding="utf-8"))
    return names


@pytest.mark.parametrize("module", MODULES)
def test_every_public_name_is_used_by_a_test(module, used_in_tests):
    public = importlib.import_module(module).__all__
    assert public, f"{module} exports nothing"
    unused = sorted(set(public) - used_in_tests)
    assert not unused, f"{module}.__all__ names no test in tests/ uses (see this file's rule): {unused}"
