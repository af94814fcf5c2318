"""Reading a corpus: a folder of ``.txt`` files, a JSONL/CSV/Parquet file, or a saved Hugging Face dataset.

`read_corpus` returns every document it finds as a `Document`; one it cannot read (not UTF-8, a
malformed JSON line, a missing or non-text field, nothing but white space) comes back with its
``error`` set instead of its text, so the audit reports and skips it and goes on.

* a folder: every ``*.txt`` under it (recursively, sorted), the id the relative path; a folder
  holding ``dataset_info.json`` or ``state.json`` is a dataset saved with
  ``datasets.Dataset.save_to_disk`` (or a ``DatasetDict``: every split, the id ``split:row``),
  read with ``datasets.load_from_disk`` (imported only then).
* ``.jsonl`` / ``.ndjson``: one JSON object a line; ``.csv`` (UTF-8, header row); ``.parquet``
  (needs pyarrow); ``.txt``: one document. The text is in ``text_column`` (default ``"text"``);
  the id in ``id_column`` when given, else ``FILE:ROW`` (1-based line or row number).
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from attnkit.apps.checks import UsageError

__all__ = ["DEMO_CORPUS", "Document", "demo_corpus", "read_corpus"]

DEMO_CORPUS = "demo"  # the corpus argument that names the shipped corpus


@dataclass(frozen=True)
class Document:
    """One document of a corpus: its id and text, or the reason it cannot be read (``text`` None)."""

    id: str
    text: str | None
    error: str | None = None


def demo_corpus() -> Path:
    """The folder of the shipped demo corpus: 30 short contracts, support tickets and news items."""
    return Path(str(resources.files("attnkit").joinpath("examples", "corpus")))


def _checked(doc_id: str, text: Any) -> Document:
    if text is None:
        return Document(doc_id, None, "no text (the field is empty)")
    if not isinstance(text, str):
        return Document(doc_id, None, f"the text field holds a {type(text).__name__}, not a string")
    if not text.strip():
        return Document(doc_id, None, "empty (only white space)")
    return Document(doc_id, text)


def _txt(path: Path, doc_id: str) -> Document:
    try:
        return _checked(doc_id, path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        return Document(doc_id, None, f"not UTF-8 text (byte {err.start})")
    except OSError as err:
        return Document(doc_id, None, f"cannot read it ({err.strerror or err})")


def _rows(rows: Iterable[tuple[int, dict]], name: str, text_column: str, id_column: str | None, unit: str):
    """Documents from ``(number, row)`` pairs; checks the columns exist on the first row."""
    out, checked = [], False
    for number, row in rows:
        if not isinstance(row, dict):
            out.append(Document(f"{name}:{number}", None, f"{unit} {number} is not an object"))
            continue
        if not checked:
            missing = [c for c in (text_column, id_column) if c is not None and c not in row]
            if missing:
                option = "--text-column" if missing[0] == text_column else "--id-column"
                raise UsageError(
                    f"{option} {missing[0]!r}: no such column in {name}; its columns are "
                    f"{', '.join(map(repr, row)) or 'none'}"
                )
            checked = True
        doc_id = str(row.get(id_column)) if id_column is not None else f"{name}:{number}"
        if text_column not in row:
            out.append(Document(doc_id, None, f"{unit} {number} has no {text_column!r} field"))
            continue
        out.append(_checked(doc_id, row[text_column]))
    return out


def _jsonl(path: Path, text_column: str, id_column: str | None) -> list[Document]:
    good: list[tuple[int, dict]] = []
    bad: list[tuple[int, Document]] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise UsageError(f"corpus {path}: not UTF-8 text (byte {err.start})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            good.append((number, json.loads(line)))
        except json.JSONDecodeError as err:
            bad.append(
                (number, Document(f"{path.name}:{number}", None, f"line {number} is not valid JSON ({err.msg})"))
            )
    read = _rows(good, path.name, text_column, id_column, "line")  # one document per good line, in order
    merged = sorted([*zip((n for n, _ in good), read), *bad], key=lambda pair: pair[0])
    return [doc for _, doc in merged]


def _csv(path: Path, text_column: str, id_column: str | None) -> list[Document]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:  # a BOM (as Excel writes) is not a column name
            rows = list(enumerate(csv.DictReader(f), 2))  # row 1 is the header
    except UnicodeDecodeError as err:
        raise UsageError(f"corpus {path}: not UTF-8 text (byte {err.start})") from None
    except csv.Error as err:
        raise UsageError(f"corpus {path}: not a readable CSV file ({err})") from None
    return _rows(rows, path.name, text_column, id_column, "row")


def _parquet(path: Path, text_column: str, id_column: str | None) -> list[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError(f"corpus {path}: reading Parquet needs pyarrow: pip install 'attnkit[audit]'") from None
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises its own error types for a damaged file
        raise UsageError(f"corpus {path}: not a readable Parquet file ({err})") from None
    return _rows(enumerate(table.to_pylist(), 1), path.name, text_column, id_column, "row")


def _dataset(path: Path, text_column: str, id_column: str | None) -> list[Document]:
    try:
        import datasets
    except ImportError:
        raise UsageError(
            f"corpus {path} is a saved Hugging Face dataset; reading it needs datasets: pip install datasets"
        ) from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except (OSError, ValueError, FileNotFoundError) as err:
        raise UsageError(f"corpus {path}: cannot load the saved dataset ({err})") from None
    splits = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [(None, loaded)]
    docs = []
    for split, part in splits:
        name = f"{path.name}/{split}" if split is not None else path.name
        docs += _rows(enumerate(part, 1), name, text_column, id_column, "row")
    return docs


def read_corpus(source: str | Path, *, text_column: str = "text", id_column: str | None = None) -> list[Document]:
    """Every document of ``source`` (module docstring), in a stable order; ``"demo"``: the shipped corpus.

    Raises:
        UsageError: naming the corpus: it does not exist, a folder without ``.txt`` files, an unknown
            file type, an unreadable file as a whole, ``text_column``/``id_column`` missing.
    """
    path = demo_corpus() if str(source) == DEMO_CORPUS else Path(source).expanduser()
    if not path.exists():
        raise UsageError(f"corpus {source}: no such file or folder (a folder of .txt, .jsonl, .csv, .parquet)")
    if path.is_dir():
        if (
            (path / "dataset_info.json").is_file()
            or (path / "state.json").is_file()
            or (path / "dataset_dict.json").is_file()
        ):
            return _dataset(path, text_column, id_column)
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise UsageError(f"corpus {source}: the folder holds no .txt file (nor a saved Hugging Face dataset)")
        return [_txt(p, p.relative_to(path).as_posix()) for p in files]
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return _jsonl(path, text_column, id_column)
    if suffix == ".csv":
        return _csv(path, text_column, id_column)
    if suffix == ".parquet":
        return _parquet(path, text_column, id_column)
    if suffix == ".txt":
        return [_txt(path, path.name)]
    raise UsageError(
        f"corpus {source}: unknown file type {suffix or '(none)'!r}; expected a folder of .txt files, .jsonl, .csv, "
        ".parquet, or a saved Hugging Face dataset folder"
    )
