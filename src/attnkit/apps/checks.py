"""What every command checks before it loads a model or runs anything long.

A user error is one line on stderr and exit status 2, before any work is done:

* numbers are checked by argparse, through the ``type=`` functions here (`int_at_least`,
  `positive_float`), so ``--map-budget -5`` is refused as ``attnkit show --map-budget -5`` is parsed;
* output paths (`check_output_file`, `check_output_dir`), optional dependencies
  (`require_module`) and anything that needs several arguments at once are checked at the
  start of the command's ``run``, which raises `UsageError`;
* `Parser` prints every argparse error as one line, ``attnkit show: error: ...``, and exits
  with status 2; `run_command` prints a `UsageError` the same way and returns 2.

`DefaultsHelpFormatter` makes ``--help`` show each option's default (the benchmarks use it).
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

__all__ = [
    "DefaultsHelpFormatter",
    "Parser",
    "UsageError",
    "check_output_dir",
    "check_output_file",
    "error_line",
    "int_at_least",
    "main_for",
    "positive_float",
    "require_module",
    "run_command",
]


class UsageError(ValueError):
    """A mistake in what the user asked for: printed as ``attnkit CMD: error: MESSAGE``, exit status 2.

    A `ValueError`, so code calling the commands' functions from Python can catch it as one.
    """


def error_line(prog: str, message: object) -> str:
    """``"{prog}: error: {message}\n"``, the message's white space (newlines too) folded into single spaces."""
    return f"{prog}: error: {' '.join(str(message).split())}\n"


class Parser(argparse.ArgumentParser):
    """An `argparse.ArgumentParser` whose errors are one line on stderr (no usage block), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, error_line(self.prog, message))


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """``--help`` that ends each option's text with its default, as typed: ``(default: 1024 2048)``.

    An option whose help already says ``default`` in words (a default of None, computed at run
    time, or a flag's meaning) is left as written; flags (``store_true``/``store_false``) get no
    ``(default: False)``. Set it with ``parser.formatter_class = DefaultsHelpFormatter``.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, argparse.SUPPRESS) or action.nargs == 0:
            return text
        default = action.default
        shown = " ".join(map(str, default)) if isinstance(default, list | tuple) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


def run_command(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int | None], args) -> int:
    """``run(args)``'s exit status; a `UsageError` it raises is printed as `Parser` prints errors, status 2."""
    try:
        return int(run(args) or 0)
    except UsageError as err:
        sys.stderr.write(error_line(parser.prog, err))
        return 2


def main_for(prog: str, help_text: str, add_arguments, run, argv: Sequence[str] | None = None) -> int:
    """A module's own ``python -m`` entry point, with the same argument checks and errors as ``attnkit``."""
    parser = Parser(prog=prog, description=help_text)
    add_arguments(parser)
    return run_command(parser, run, parser.parse_args(argv))


# ----------------------------------------------------------------------------- numbers (argparse types)
def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type=``: an integer ``>= low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def positive_float(text: str) -> float:
    """An argparse ``type=``: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


# ----------------------------------------------------------------------------- output paths
def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (``.`` for a relative path whose first part is missing)."""
    current = path
    while not os.path.lexists(current):
        if current.parent == current:
            break
        current = current.parent
    return current


def _check_can_create_in(folder: Path, option: str, path: Path) -> None:
    """That ``folder`` (a directory ``path`` lives in, maybe not created yet) can be made and written."""
    existing = folder
    try:
        existing = _nearest_existing(folder)
        if not existing.is_dir():
            raise UsageError(f"{option} {path}: {existing} is a file, not a directory")
        # Opening a file is the only honest test (root ignores permissions, a read-only mount does not);
        # TemporaryFile leaves nothing behind (O_TMPFILE, or created and unlinked at once).
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise UsageError(f"{option} {path}: cannot create a file in {existing} ({err.strerror or err})") from None


def check_output_file(path: str | Path, option: str) -> Path:
    """That the file ``path`` can be written (its folders are created then): not a directory, not under a file.

    Raises:
        UsageError: naming ``option`` and what is wrong.
    """
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{option} {path} is a directory; give a file name, such as {path / 'report.html'}")
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"{option} {path}: the file exists and is not writable")
    _check_can_create_in(path.parent, option, path)
    return path


def check_output_dir(path: str | Path, option: str) -> Path:
    """That files can be written into the folder ``path`` (created then if it does not exist).

    Raises:
        UsageError: naming ``option`` and what is wrong.
    """
    path = Path(path)
    if os.path.lexists(path) and not path.is_dir():
        raise UsageError(f"{option} {path} is a file; give a folder (it is created if missing)")
    _check_can_create_in(path, option, path)
    return path


# ----------------------------------------------------------------------------- optional dependencies
def require_module(module: str, why: str, install: str) -> None:
    """Import ``module`` now, so that a missing optional dependency stops the command before any work.

    Raises:
        UsageError: ``"{why} needs {module}: {install}"``.
    """
    try:
        importlib.import_module(module)
    except ImportError:
        raise UsageError(f"{why} needs {module}: {install}") from None
