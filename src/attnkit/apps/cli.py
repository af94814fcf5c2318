"""The ``attnkit`` command: explain, show, compare, bench.

Each command lives in its own module exposing ``add_arguments(parser)`` and ``run(args)``;
this file only wires them up, importing each lazily so ``attnkit --help`` stays fast and
a command whose optional dependencies are missing fails with its own clear message.

A user error is one line on stderr and exit status 2 (`attnkit.apps.checks`): argparse's
own errors, and the `UsageError` a command raises while checking its arguments, before it
loads a model or runs anything long.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import pkgutil
import sys

from attnkit.apps.checks import Parser, run_command

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "show": (
        "attnkit.apps.show.command",
        "see what a real pretrained model attends to: terminal summary, HTML report, PNGs",
    ),
    "explain": (
        "attnkit.apps.walkthrough",
        "walk through one head of self-attention on a short sentence, step by step",
    ),
    "audit": (
        "attnkit.apps.audit.command",
        "where attention goes over a corpus, by token category (dates, amounts, boilerplate, ...), with A/B",
    ),
    "compare": (
        "attnkit.apps.compare.command",
        "measure self-attention against an LSTM, and cross-attention, on tasks",
    ),
    "monitor-report": (
        "attnkit.apps.monitor_report",
        "draw how the heads' roles evolved over training, from a Monitor log",
    ),
}


def _present(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def bench_modules() -> dict[str, str]:
    """``attnkit bench <NAME>`` -> module, for every module under attnkit.apps.bench defining NAME."""
    import attnkit.apps.bench as bench

    found = {}
    for info in pkgutil.iter_modules(bench.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"attnkit.apps.bench.{info.name}")
        if hasattr(module, "NAME"):
            found[module.NAME] = module.__name__
    return found


def attnkit_version() -> str:
    """The installed package's version (`attnkit.__version__`, the one source)."""
    from attnkit import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="attnkit", description="Exact, fast self-attention and tools to see it.")
    parser.add_argument("--version", action="version", version=f"attnkit {attnkit_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        if not _present(module):
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(_run=importlib.import_module(module).run, _parser=p)
    bench = sub.add_parser(
        "bench", help="benchmarks (each case in a fresh subprocess; results in --out, default the current directory)"
    )
    bench_sub = bench.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    for name, module_name in sorted(bench_modules().items()):
        module = importlib.import_module(module_name)
        p = bench_sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run, _parser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``attnkit ARGV``; returns the exit status.

    A user error is one line on stderr and status 2: returned for the checks a command makes
    (`attnkit.apps.checks.UsageError`), raised as ``SystemExit(2)`` by argparse for the rest.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    return run_command(args._parser, args._run, args)


if __name__ == "__main__":
    sys.exit(main())
