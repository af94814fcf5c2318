"""`show`: ``attnkit show`` as a Python call, for notebooks and scripts.

    from attnkit.apps.show import show

    result = show("The lease ends in May unless the tenant renews it.")
    result                       # in Jupyter: the whole offline report, inline
    result.head(2, 5)            # one head's map
    result.roles()               # the head-role table
    show(example="contract").flow()   # the section flow of a shipped document

`show` reads the text (given, from a file, or a shipped example), runs the analysis the command
runs (`attnkit.apps.show.pretrained.analyse` for a Hugging Face checkpoint, the bundled
all-MiniLM-L6-v2 by default; `attnkit.apps.show.protein.analyse` for the protein examples) and
returns its `attnkit.apps.show.analysis.Analysis`, which displays itself inline
(`attnkit.viz.notebook`). It prints nothing and writes no file (``result.report().save(path)`` does).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from attnkit.apps.checks import UsageError
from attnkit.apps.show.analysis import Analysis
from attnkit.apps.show.pretrained import DEFAULT_MODEL, analyse

__all__ = ["DEFAULT_EXAMPLE", "EXAMPLES", "PROTEIN", "analyse_text", "example_text", "show"]

EXAMPLES = ("contract", "support", "news", "protein", "contract-long", "support-long", "news-long", "protein-long")
PROTEIN = ("protein", "protein-long")  # through the character-level protein model (attnkit.apps.show.protein)
DEFAULT_EXAMPLE = "contract"


def example_text(name: str) -> str:
    """The text of a shipped sample document (one of `EXAMPLES`; ``-long``: the long versions, 2K-12K tokens)."""
    if name not in EXAMPLES:
        raise ValueError(f"example must be one of {', '.join(EXAMPLES)}, got {name!r}")
    return resources.files("attnkit").joinpath("examples", f"{name}.txt").read_text(encoding="utf-8")


def analyse_text(
    text: str,
    *,
    example: str | None = None,
    title: str | None = None,
    model: str = DEFAULT_MODEL,
    sections: str | list = "auto",
    map_budget: int | None = None,
    max_tokens: int | None = None,
    progress: bool = False,
    whole: bool = False,
) -> Analysis:
    """The analysis behind ``attnkit show`` for ``text``: the protein model for the protein examples, else ``model``.

    ``example``: the shipped example ``text`` came from (None: the user's own). ``whole``: ``text`` is a
    document, read up to the model's position limit (`attnkit.apps.show.pretrained.analyse`).

    Raises:
        UsageError (a ValueError): an option the protein example does not take, or one the analysis rejects.
    """
    if example in PROTEIN:
        from attnkit.apps.show import protein

        if model != DEFAULT_MODEL:
            raise UsageError(f"example {example!r} runs its own character-level model; drop model={model!r}")
        if max_tokens is not None:
            raise UsageError(f"example {example!r} reads the whole sequence; drop max_tokens={max_tokens}")
        try:
            return protein.analyse(text, progress=progress, map_budget=map_budget, sections=sections)
        except ValueError as err:
            raise UsageError(str(err)) from None
    return analyse(
        text,
        model=model,
        title=title,
        map_budget=map_budget,
        max_tokens=max_tokens,
        progress=progress,
        sections=sections,
        whole=whole,
    )


def show(
    text: str | None = None,
    *,
    example: str | None = None,
    file: str | Path | None = None,
    model: str = DEFAULT_MODEL,
    title: str | None = None,
    sections: str | list = "auto",
    map_budget: int | None = None,
    max_tokens: int | None = None,
    progress: bool = False,
) -> Analysis:
    """What a model attends to in a text, as ``attnkit show`` computes it; the result displays inline in Jupyter.

    Args:
        text: the text to read; or ``example`` (one of `EXAMPLES`) or ``file`` (UTF-8), not several.
            None of the three: the contract example.
        model: ``"all-MiniLM-L6-v2"`` (bundled, offline) or a local Hugging Face checkpoint directory
            with safetensors weights; nothing is downloaded.
        title: the report's title (default: the example's or file's name, else the model's; the protein
            examples keep their own).
        sections: how to cut the text into sections (`attnkit.inspect.sections`: ``"auto"``,
            ``"paragraphs"``, ``"lines"``, ``"regex:PATTERN"``, or a list of character spans).
        map_budget: full ``L x L`` maps up to this many tokens (default 384), pooled tiles beyond.
        max_tokens: read at most this many tokens (default: the model's limit for a file or an
            example, the length it was trained for otherwise).
        progress: a progress bar on stderr.

    Returns:
        An `attnkit.apps.show.analysis.Analysis` (``N`` layers, ``H`` heads, ``L`` tokens): ``.data``
        is the report's `attnkit.viz.ReportData`; ``.report()``, ``.head(layer, head)``, ``.flow()``
        and ``.roles()`` are its inline views; displayed as it is, it shows the whole report.

    Raises:
        UsageError (a ValueError): several sources, an empty text, an unknown example, a file that
            cannot be read, or an option the model rejects.
    """
    given = [name for name, value in (("text", text), ("example", example), ("file", file)) if value is not None]
    if len(given) > 1:
        raise UsageError(f"give one of text, example or file, got {' and '.join(given)}")
    if example is not None and example not in EXAMPLES:
        raise UsageError(f"example must be one of {', '.join(EXAMPLES)}, got {example!r}")
    if text is not None:
        if not text.strip():
            raise UsageError("text is empty")
        return analyse_text(
            text, title=title, model=model, sections=sections, map_budget=map_budget, max_tokens=max_tokens,
            progress=progress,
        )  # fmt: skip
    if file is not None:
        path = Path(file)
        try:
            body = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            reason = (err.strerror or str(err)) if isinstance(err, OSError) else "not UTF-8 text"
            raise UsageError(f"cannot read file {str(path)!r}: {reason}") from None
        if not body.strip():
            raise UsageError(f"file {str(path)!r} holds no text")
        default_title, name = f"What the model attends to in {path.name}", None
    else:
        name = example or DEFAULT_EXAMPLE
        body, default_title = example_text(name), f"The {name} example"
    return analyse_text(
        body, example=name, title=title or default_title, model=model, sections=sections, map_budget=map_budget,
        max_tokens=max_tokens, progress=progress, whole=True,
    )  # fmt: skip
