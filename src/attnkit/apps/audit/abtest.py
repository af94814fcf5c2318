"""A/B: the same corpus run twice (another model, or the text reformatted), compared per category.

`load_format` reads ``--format-b SCRIPT[:FUNCTION]``: a Python file defining a function
``str -> str`` (default name ``reformat``) that rewrites a document, e.g. strips boilerplate or
puts the dates first. `compare` pairs the documents both runs measured and reports, per
category, the mean difference B - A of the attention share (over all layers and heads) and of
the excess ``attention share - token share``, each with a percentile bootstrap confidence
interval over documents (`attnkit.apps.audit.aggregate.bootstrap_mean`). The excess is the
fairer measure of a formatting change: stripping boilerplate lowers its attention share simply
because fewer boilerplate tokens remain; the excess says whether the model's focus moved.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import numpy as np

from attnkit.apps.audit.aggregate import Corpus, bootstrap_mean

__all__ = ["compare", "load_format"]


def load_format(value: str) -> Callable[[str], str]:
    """The function ``--format-b SCRIPT[:FUNCTION]`` names (default ``reformat``).

    The script runs as a module (it is Python: run only a script you trust).

    Raises:
        ValueError: naming ``--format-b``: no such file, the script fails to import, no such function.
    """
    path_text, _, name = value.rpartition(":") if value.count(":") and not Path(value).is_file() else (value, "", "")
    name = name or "reformat"
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise ValueError(f"--format-b expected a Python file (SCRIPT or SCRIPT:FUNCTION), no such file: {path_text!r}")
    spec = importlib.util.spec_from_file_location(f"attnkit_format_b_{abs(hash(str(path.resolve())))}", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"--format-b {value}: not a Python file attnkit can import")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # the user's script: any failure is theirs, reported as such
        raise ValueError(f"--format-b {value}: the script failed to import ({type(err).__name__}: {err})") from None
    function = getattr(module, name, None)
    if not callable(function):
        defined = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ValueError(
            f"--format-b {value}: expected a function {name!r} (str -> str) in {path.name}; it defines "
            f"{', '.join(defined) or 'no function'}"
        )
    return function


def compare(a: Corpus, b: Corpus, *, draws: int = 2000, seed: int = 0) -> tuple[list[dict], list[str]]:
    """``(rows, ids)``: per category, B - A over the documents both measured, with bootstrap CIs; the ids paired.

    Each row: ``category``, ``documents``, the mean token and attention shares of A and B, ``diff``
    (attention share B - A) with ``diff_low``/``diff_high``, and ``excess_diff`` (the change of
    attention share minus token share) with its interval.
    """
    common = [i for i in a.ids if i in set(b.ids)]
    ia = [a.ids.index(i) for i in common]
    ib = [b.ids.index(i) for i in common]
    names = [c for c in a.categories if c in b.categories]
    ca = [a.categories.index(c) for c in names]
    cb = [b.categories.index(c) for c in names]
    if not common:
        return [], []
    ta, tb = a.tokens[np.ix_(ia, ca)], b.tokens[np.ix_(ib, cb)]  # (D, C)
    aa, ab = a.overall()[np.ix_(ia, ca)], b.overall()[np.ix_(ib, cb)]  # (D, C)
    diff, low, high = bootstrap_mean(ab - aa, draws=draws, seed=seed)
    excess, e_low, e_high = bootstrap_mean((ab - tb) - (aa - ta), draws=draws, seed=seed + 1)
    rows = []
    for c, name in enumerate(names):
        rows.append(
            {
                "category": name,
                "documents": len(common),
                "token_share_a": float(ta[:, c].mean()),
                "token_share_b": float(tb[:, c].mean()),
                "attention_share_a": float(aa[:, c].mean()),
                "attention_share_b": float(ab[:, c].mean()),
                "diff": float(diff[c]),
                "diff_low": float(low[c]),
                "diff_high": float(high[c]),
                "excess_diff": float(excess[c]),
                "excess_low": float(e_low[c]),
                "excess_high": float(e_high[c]),
            }
        )
    return rows, common
