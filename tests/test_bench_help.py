"""``attnkit bench ... --help`` and ``attnkit compare --help``: every option explained, with its default;
results go where the user says, by default the current directory (never ``./docs/results``)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from attnkit.apps import harness
from attnkit.apps.checks import DefaultsHelpFormatter
from attnkit.apps.cli import bench_modules, build_parser

BENCHMARKS = sorted(bench_modules())


def _subparser(parser: argparse.ArgumentParser, *path: str) -> argparse.ArgumentParser:
    for name in path:
        (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


def _commands() -> list[tuple[str, ...]]:
    return [("bench", name) for name in BENCHMARKS] + [("compare",)]


def test_every_benchmark_is_checked() -> None:
    assert {"kernels", "mha", "stats", "distributed", "show", "triton"} <= set(BENCHMARKS), BENCHMARKS


@pytest.mark.parametrize("command", _commands(), ids=" ".join)
def test_every_option_has_help_and_shows_its_default(command: tuple[str, ...]) -> None:
    parser = _subparser(build_parser(), *command)
    assert parser.formatter_class is DefaultsHelpFormatter
    formatter = parser._get_formatter()
    options = [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
    assert options
    for action in options:
        name = action.option_strings[-1]
        assert action.help and action.help.strip(), f"attnkit {' '.join(command)} {name}: no help text"
        shown = formatter._get_help_string(action) % {"default": action.default, "prog": parser.prog}
        if action.nargs == 0:  # a flag: off unless given, or its help says what it turns off
            assert action.default in (False, None) or "default" in shown, f"{name}: {shown!r}"
            continue
        assert "default" in shown, f"attnkit {' '.join(command)} {name}: the help does not show the default: {shown!r}"
        if "default" not in action.help.lower():  # appended by the formatter: the value as typed
            value = action.default
            typed = " ".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
            assert f"(default: {typed})" in shown, shown
    # And the text argparse prints carries them.
    assert "(default:" in parser.format_help()


@pytest.mark.parametrize("name", BENCHMARKS)
def test_results_default_to_the_current_directory(name: str) -> None:
    parser = _subparser(build_parser(), "bench", name)
    out = next(a for a in parser._actions if "--out" in a.option_strings)
    assert Path(out.default) == Path("."), f"attnkit bench {name}: --out defaults to {out.default!r}"
    assert "current directory" in out.help


def test_compare_writes_under_the_current_directory() -> None:
    out = next(a for a in _subparser(build_parser(), "compare")._actions if "--out" in a.option_strings)
    assert not Path(out.default).is_absolute() and "docs" not in Path(out.default).parts


def test_write_results_defaults_to_the_current_directory(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    json_path, md_path = harness.write_results("probe", [{"n": 1}], [("n", "N")], title="Probe")
    assert json_path.resolve() == tmp_path / "probe.json" and md_path.resolve() == tmp_path / "probe.md"
    assert not (tmp_path / "docs").exists()


def test_formatter_shows_lists_as_typed_and_leaves_worded_defaults() -> None:
    parser = argparse.ArgumentParser(prog="p", formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2], help="lengths")
    parser.add_argument("--threads", type=int, default=None, help="threads (default: torch's)")
    parser.add_argument("--rate", default="5%", help="50%% of it")  # a '%' in a default is escaped
    parser.add_argument("--fast", action="store_true", help="go fast")
    text = " ".join(parser.format_help().split())
    assert "lengths (default: 1 2)" in text
    assert "threads (default: torch's)" in text and "None" not in text
    assert "50% of it (default: 5%)" in text
    assert "go fast" in text and "False" not in text
