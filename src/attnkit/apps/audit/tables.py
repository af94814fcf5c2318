"""Writing the audit's tables: CSV always, Parquet too when pyarrow is installed (``attnkit[audit]``)."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

__all__ = ["has_parquet", "write_table"]


def has_parquet() -> bool:
    """Whether pyarrow is installed, so the tables are also written as Parquet."""
    try:
        return importlib.util.find_spec("pyarrow") is not None
    except ModuleNotFoundError:
        return False


def _columns(rows: list[dict]) -> list[str]:
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    return list(columns)


def write_table(
    rows: list[dict], folder: Path, name: str, *, columns: list[str] | None = None, parquet: bool | None = None
) -> list[Path]:
    """Write ``rows`` (dicts, one per row; a missing key or None is an empty cell) as ``folder/name.csv``
    and, when ``parquet`` (default: pyarrow installed), ``folder/name.parquet``; returns the paths written.

    ``columns``: the header when ``rows`` may be empty (default: the keys of the rows, in order).
    """
    folder.mkdir(parents=True, exist_ok=True)
    columns = _columns(rows) or list(columns or [])
    path = folder / f"{name}.csv"
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: ("" if v is None else round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}
            )
    written = [path]
    if parquet if parquet is not None else has_parquet():
        import pyarrow as pa
        import pyarrow.parquet as pq

        if rows:
            table = pa.Table.from_pylist([{c: row.get(c) for c in columns} for row in rows])
        else:
            table = pa.table({c: pa.array([], type=pa.string()) for c in columns})
        pq.write_table(table, folder / f"{name}.parquet")
        written.append(folder / f"{name}.parquet")
    return written
