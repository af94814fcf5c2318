"""One pass of `attnkit audit` over the corpus: texts, the model, the results file, the measurements.

`Variant` is one pass (A, or B of an A/B run); `load_checkpoints` loads each model once and checks
``--window`` before anything is measured; `run_variant` measures every document not yet in the
pass's results file (`attnkit.apps.audit.store`), one at a time, behind a progress bar.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from attnkit.apps.audit.aggregate import DocResult, doc_result
from attnkit.apps.audit.categories import CorpusProfile, Tagger
from attnkit.apps.audit.corpus import Document
from attnkit.apps.audit.store import ResultsFile
from attnkit.apps.checks import UsageError

__all__ = ["RESULTS_VERSION", "Variant", "load_checkpoints", "run_variant", "texts_of"]

RESULTS_VERSION = 1  # of the results files' layout


# How the headline names each built-in category.
@dataclass
class Variant:
    """One pass over the corpus: a model and the texts it reads (the original, or reformatted)."""

    key: str  # "a" or "b"
    label: str  # what it is, for the summary
    model: str
    texts: dict[str, str]  # id -> text to read
    skipped: dict[str, str]  # id -> reason it cannot be read
    reformat: str | None = None  # the --format-b script, or None
    docs: list[DocResult] = field(default_factory=list)
    shape: tuple[int, int] = (0, 0)
    categories: tuple[str, ...] = ()
    rows: list[dict] = field(default_factory=list)  # Corpus.category_rows() once measured


def texts_of(documents: list[Document], reformat: Callable[[str], str] | None) -> tuple[dict, dict]:
    """``({id: text}, {id: reason})``: what each document reads (through ``reformat`` when given), or why not."""
    texts, skipped = {}, {}
    for doc in documents:
        if doc.text is None:
            skipped[doc.id] = doc.error or "unreadable"
            continue
        text = doc.text
        if reformat is not None:
            try:
                text = reformat(text)
            except Exception as err:  # the user's function: a failure on one document skips that document
                skipped[doc.id] = f"--format-b failed on it ({type(err).__name__}: {err})"
                continue
            if not isinstance(text, str):
                skipped[doc.id] = f"--format-b returned a {type(text).__name__}, not a str"
                continue
            if not text.strip():
                skipped[doc.id] = "empty after --format-b"
                continue
        texts[doc.id] = text
    return texts, skipped


def _checkpoint(model: str, option: str):
    from attnkit.apps.show.pretrained import load_checkpoint

    try:
        return load_checkpoint(model)
    except UsageError as err:
        raise UsageError(str(err).replace("--model", option)) from None


def _header(args, variant: Variant, checkpoint, tagger: Tagger, window: int) -> dict:
    template = hashlib.sha256("\n".join(sorted(tagger.profile.template)).encode()).hexdigest()[:16]
    script = None
    if variant.reformat is not None:
        path = Path(variant.reformat.rsplit(":", 1)[0] if not Path(variant.reformat).is_file() else variant.reformat)
        script = f"{variant.reformat} sha256:{hashlib.sha256(path.read_bytes()).hexdigest()[:16]}"
    return {
        "version": RESULTS_VERSION,
        "variant": variant.key,
        "model": checkpoint.name,
        "window": window,
        "categories": list(tagger.categories),
        "user": [u.source for u in tagger.user],
        "rare": tagger.rare,
        "template_docs": args.template_docs,
        "template": template,
        "format_b": script,
    }


def load_checkpoints(args, variants: list[Variant]) -> dict[str, Any]:
    """``{model: Checkpoint}`` for every variant's model, loaded once each, ``--window`` checked against each
    before any document is measured.

    Raises:
        UsageError: naming ``--model`` or ``--against`` (an unreadable checkpoint) or ``--window`` (too long).
    """
    loaded: dict[str, Any] = {}
    for variant in variants:
        if variant.model in loaded:
            continue
        option = "--against" if variant.key == "b" else "--model"
        checkpoint = loaded[variant.model] = _checkpoint(variant.model, option)
        if args.window is not None and args.window > checkpoint.max_length:
            raise UsageError(
                f"--window must be at most {checkpoint.max_length} for {checkpoint.name}, got {args.window}"
            )
    return loaded


def run_variant(args, variant: Variant, checkpoint, *, measure_hook: Callable | None = None) -> None:
    """Measure every document of ``variant`` not already in its results file; fills ``variant.docs``.

    ``checkpoint``: its model, loaded (`load_checkpoints`). ``measure_hook(doc_id)``: called before each
    document is measured (tests use it to interrupt a run).
    """
    from tqdm.auto import tqdm

    from attnkit.apps.audit.measure import Measurer

    window = args.window or checkpoint.length
    texts = list(variant.texts.values())
    word_counts = isinstance(args.rare_rule, int)  # --rare corpus:N needs the words' document frequencies
    profile = CorpusProfile.of(texts, template_docs=args.template_docs, words=word_counts)
    tagger = Tagger(args.user, profile, args.rare_rule)
    measurer = Measurer(checkpoint, tagger, window=window)
    variant.categories = tagger.categories
    path = args.out / f"results-{variant.key}.jsonl"
    with ResultsFile(
        path, _header(args, variant, checkpoint, tagger, window), resume=args.resume, overwrite=args.overwrite
    ) as results:
        for doc_id, reason in variant.skipped.items():
            if doc_id not in results.done:
                results.add({"id": doc_id, "status": "skipped", "reason": reason})
        todo = [i for i in variant.texts if i not in results.done]
        bar = tqdm(
            total=len(variant.texts),
            initial=len(variant.texts) - len(todo),
            unit="doc",
            desc=variant.label,
            disable=args.no_progress or None,
            leave=False,
            dynamic_ncols=True,
        )
        try:
            for doc_id in todo:
                if measure_hook is not None:
                    measure_hook(doc_id)
                start = time.perf_counter()
                try:
                    measured = measurer.measure(variant.texts[doc_id])
                except (ValueError, RuntimeError) as err:  # one bad document is reported, never fatal
                    results.add({"id": doc_id, "status": "skipped", "reason": f"{type(err).__name__}: {err}"})
                else:
                    row = doc_result(doc_id, measured, tagger.categories, time.perf_counter() - start).to_json()
                    results.add(row)
                bar.update(1)
        finally:
            bar.close()
        rows = results.done
    ok = [r for r in rows.values() if r.get("status") == "ok"]
    layers, heads = np.asarray(next(iter(ok[0]["received"].values()))).shape if ok else (0, 0)
    variant.shape = (int(layers), int(heads))
    order = list(variant.texts) + list(variant.skipped)
    variant.docs = [DocResult.from_json(rows[i]) for i in order if i in rows and rows[i].get("status") == "ok"]
    variant.skipped = {i: rows[i]["reason"] for i in order if i in rows and rows[i].get("status") == "skipped"}
