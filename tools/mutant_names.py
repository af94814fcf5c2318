"""The mutants that mutmut has not decided yet, by name, for `make mutate MUTANTS=...`.

mutmut reruns every mutant it is given on its command line, decided or not (a plain `mutmut run`
skips the decided ones), so a glob such as ``attnkit.kernels.stats*`` starts the module over. This
prints, one per line, the names matching the globs whose result in ``mutants/**/*.meta`` is still
empty, so a run can resume where the last one stopped. ``--all`` prints the decided ones too.

    python tools/mutant_names.py 'attnkit.kernels.stats*' 'attnkit.functional*'
"""

from __future__ import annotations

import argparse
import fnmatch
import json
from pathlib import Path


def mutant_names(globs: list[str], root: Path = Path("mutants"), *, undecided_only: bool = True) -> list[str]:
    """Names in ``root``'s ``.meta`` files that match one of ``globs`` (and have no exit code yet)."""
    names = []
    for meta in sorted(root.glob("src/**/*.meta")):
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            if any(fnmatch.fnmatchcase(name, g) for g in globs) and (code is None or not undecided_only):
                names.append(name)
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("globs", nargs="+", help="mutant name globs, as mutmut takes them")
    parser.add_argument("--all", action="store_true", help="also the mutants already decided")
    args = parser.parse_args()
    print("\n".join(mutant_names(args.globs, undecided_only=not args.all)))


if __name__ == "__main__":
    main()
