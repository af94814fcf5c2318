"""The append-only results file of one run: what makes ``--resume`` possible.

``OUT/results-a.jsonl`` (and ``results-b.jsonl`` for an A/B run): the first line is a header,
``{"header": {...}}``, holding the run's settings (model, window, categories, the corpus
profile's fingerprint, ...); every following line is one document, written and flushed as soon
as it is measured: ``{"id", "status": "ok", ...}`` (`attnkit.apps.audit.aggregate.DocResult`) or
``{"id", "status": "skipped", "reason"}``. A run that is interrupted leaves every finished
document on disk; ``--resume`` reads them back, checks the header matches the new run's
settings, drops a last line cut short by the interruption, and measures only the rest.
"""

from __future__ import annotations

import json
from pathlib import Path

from attnkit.apps.checks import UsageError

__all__ = ["ResultsFile"]


class ResultsFile:
    """One run's results file.

    Args:
        path: the ``.jsonl`` file.
        header: the run's settings; a resumed file must hold the same.
        resume: continue the file (True) or start it (False: it must not hold results, unless ``overwrite``).
        overwrite: start afresh even when the file holds results.
    """

    def __init__(self, path: Path, header: dict, *, resume: bool, overwrite: bool = False):
        self.path = path
        self.done: dict[str, dict] = {}
        exists = path.is_file() and path.stat().st_size > 0
        if exists and not resume and not overwrite:
            raise UsageError(
                f"--out {path.parent}: {path.name} already holds the results of a run; pass --resume to continue it, "
                "--overwrite to start again, or another --out"
            )
        if resume and exists:
            self._read(header)
            self._file = path.open("a", encoding="utf-8")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("w", encoding="utf-8")
            self._write({"header": header})

    def _read(self, header: dict) -> None:
        raw = self.path.read_bytes()
        keep = len(raw)
        if not raw.endswith(b"\n"):  # the last line was cut short by the interruption: drop it
            keep = raw.rfind(b"\n") + 1
        lines = raw[:keep].decode("utf-8").splitlines()
        try:
            first = json.loads(lines[0])["header"] if lines else None
        except (json.JSONDecodeError, KeyError, TypeError):
            first = None
        if first is None:
            raise UsageError(f"--resume: {self.path} does not start with an attnkit audit header; use another --out")
        changed = sorted(k for k in set(first) | set(header) if first.get(k) != header.get(k))
        if changed:
            detail = "; ".join(f"{k}: {first.get(k)!r} then, {header.get(k)!r} now" for k in changed[:4])
            raise UsageError(
                f"--resume: {self.path} was written with other settings ({detail}); rerun with the same settings, "
                "or --overwrite to start again"
            )
        for line in lines[1:]:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "id" in row:
                self.done[str(row["id"])] = row
        if keep < len(raw):
            with self.path.open("r+b") as f:
                f.truncate(keep)

    def _write(self, row: dict) -> None:
        self._file.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")
        self._file.flush()

    def add(self, row: dict) -> None:
        """Append one document's row (flushed at once)."""
        self._write(row)
        self.done[str(row["id"])] = row

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ResultsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
