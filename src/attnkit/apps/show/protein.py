"""`attnkit show --example protein`: an amino-acid sequence through a small character-level attnkit model.

MiniLM reads English, so a protein sequence goes through a model built here from
`attnkit.nn` parts: residue embeddings, a 2-layer, 4-head `TransformerEncoder` with rotary
positions, and a residue classifier. No pretrained protein model ships with attnkit, so at
first use it is trained for a few seconds on masked-residue prediction (BERT's objective,
Devlin et al. 2019, as protein language models use it, Rives et al. 2021) over the input
sequence itself, then cached. Its attention therefore shows what a model must look at to
fill a gap *in this sequence* (a neighbour, the matching residue of another repeat), not
biology learnt from protein databases; the report says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from pathlib import Path

import torch
from torch import nn

from attnkit.apps.show.analysis import POOL_TILES, TOPK, Analysis, StageBar, long_range_links, report_data
from attnkit.nn.transformer import TransformerEncoder

log = logging.getLogger(__name__)

__all__ = ["ALPHABET", "ProteinModel", "analyse", "load_or_train", "parse_fasta", "residue_offsets", "train"]

# The 20 standard amino acids, then X (unknown), then the mask and padding symbols.
ALPHABET = "ACDEFGHIKLMNPQRSTVWY" + "X"
MASK = len(ALPHABET)
VOCAB = len(ALPHABET) + 1
DIM, HEADS, DEPTH = 64, 4, 2
STEPS, BATCH, MASK_RATE, CROP = 250, 8, 0.15, 64
SEED = 0


def parse_fasta(text: str) -> tuple[str, str]:
    """``(name, sequence)`` from FASTA text (one record) or a bare sequence; white space is ignored.

    Raises:
        ValueError: a character is not one of the 20 amino acids or X (the message names it).
    """
    name, residues = "", []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(">"):
            if name or residues:
                break  # first record only
            name = line[1:].strip()
        elif line:
            residues.append("".join(line.split()).upper())
    sequence = "".join(residues)
    bad = sorted(set(sequence) - set(ALPHABET))
    if not sequence or bad:
        raise ValueError(
            f"protein: expected a sequence over {ALPHABET!r}, got {len(sequence)} residues"
            + (f" with unknown letters {''.join(bad)!r}" if bad else "")
        )
    return name, sequence


class ProteinModel(nn.Module):
    """Residue embeddings -> `TransformerEncoder` (rotary positions) -> residue logits.

    ``ids (B, L)`` int64 (`ALPHABET` indices, `MASK` for a hidden residue) -> logits ``(B, L, 21)``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.encoder = TransformerEncoder(DIM, HEADS, DEPTH, positions="rope")
        self.head = nn.Linear(DIM, len(ALPHABET))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(ids)))  # (B, L, 21)


def _ids(sequence: str) -> torch.Tensor:
    return torch.tensor([ALPHABET.index(c) for c in sequence], dtype=torch.long)  # (L,)


@contextlib.contextmanager
def _one_thread():
    """Run on one intra-op thread: this model's matrices (at most 8 x 64 rows by 64) are too small to gain
    from more, and on a busy machine the extra threads' synchronisation cost 20x (measured: 11 ms a step on
    one thread, 240 ms on two, under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train(sequence: str, *, steps: int = STEPS, batch: int = BATCH, crop: int = CROP, seed: int = SEED):
    """Train a fresh model on masked-residue prediction over ``batch`` random ``crop``-residue windows per step.

    Returns ``(model, info)``; ``info`` has ``steps``, ``seconds``, ``loss_start``, ``loss_end``
    (mean cross-entropy of the first and last 20 steps, nats) and ``accuracy`` (masked residues
    recovered over the whole sequence, 15 % masked, fixed seed).
    """
    with _one_thread():
        return _train(sequence, steps=steps, batch=batch, crop=crop, seed=seed)


def _train(sequence: str, *, steps: int, batch: int, crop: int, seed: int):

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = ProteinModel()
    ids = _ids(sequence)
    L = ids.shape[0]
    crop = min(crop, L)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    losses = []
    start = time.perf_counter()
    model.train()
    for _ in range(steps):
        offsets = torch.randint(0, L - crop + 1, (batch,), generator=generator)
        windows = torch.stack([ids[o : o + crop] for o in offsets.tolist()])  # (batch, crop)
        masked = torch.rand(windows.shape, generator=generator) < MASK_RATE  # (batch, crop)
        masked[:, 0] |= ~masked.any(dim=1)  # at least one target per row
        logits = model(windows.masked_fill(masked, MASK))  # (batch, crop, 21)
        loss = torch.nn.functional.cross_entropy(logits[masked], windows[masked])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        masked = torch.rand(L, generator=torch.Generator().manual_seed(seed + 1)) < MASK_RATE
        guess = model(ids.masked_fill(masked, MASK)[None])[0].argmax(-1)  # (L,)
        accuracy = float((guess[masked] == ids[masked]).float().mean()) if masked.any() else float("nan")
    head, tail = losses[:20], losses[-20:]
    info = {
        "steps": steps,
        "seconds": seconds,
        "loss_start": sum(head) / len(head),
        "loss_end": sum(tail) / len(tail),
        "accuracy": accuracy,
    }
    return model, info


def _cache_dir() -> Path:
    """``$ATTNKIT_CACHE``, else ``$XDG_CACHE_HOME/attnkit``, else ``~/.cache/attnkit``."""
    if os.environ.get("ATTNKIT_CACHE"):
        return Path(os.environ["ATTNKIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "attnkit"


def load_or_train(sequence: str, *, cache: bool = True):
    """The model trained on ``sequence``, from the cache when it was trained before; ``(model, info, cached)``."""

    key = hashlib.sha256(f"{sequence}|{DIM},{HEADS},{DEPTH},{STEPS},{BATCH},{MASK_RATE},{CROP},{SEED}".encode())
    path = _cache_dir() / f"protein-{key.hexdigest()[:16]}.pt"
    if cache and path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            model = ProteinModel()
            model.load_state_dict(saved["state"])
            return model.eval(), dict(saved["info"]), True
        except (OSError, RuntimeError, KeyError, ValueError) as err:
            log.warning("protein: ignoring the unreadable cached model %s (%s); training again", path, err)
    model, info = train(sequence)
    if cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"state": model.state_dict(), "info": info}, path)
        except OSError as err:
            log.warning("protein: could not cache the trained model at %s (%s)", path, err)
    return model, info, False


def residue_offsets(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` character span of each residue of the first record in ``text``, as `parse_fasta` reads it."""
    spans, seen_header, pos = [], False, 0
    for line in text.splitlines(keepends=True):
        body = line.strip()
        if body.startswith(">"):
            if seen_header or spans:
                break
            seen_header = True
        elif body:
            for i, ch in enumerate(line):
                if not ch.isspace():
                    spans.append((pos + i, pos + i + 1))
        pos += len(line)
    return spans


def analyse(
    text: str,
    *,
    progress: bool = False,
    cache: bool = True,
    map_budget: int | None = None,
    sections: str | list = "auto",
):
    """Run the protein example through the character-level model: an `attnkit.apps.show.analysis.Analysis`.

    ``map_budget``: full maps up to this many residues (default `attnkit.viz.report.MAP_BUDGET`); beyond
    it no ``L x L`` map is built (statistics pooled over the sections and tiles, O(L) saliency).
    ``sections``: how to cut the record (`attnkit.inspect.sections`; ``"auto"``: its declared domains).
    """
    from attnkit.apps.show.flow import fine_edges, section_view, tile_edges
    from attnkit.inspect import raw_attention, record, rollout, token_boundaries
    from attnkit.inspect import sections as cut_sections
    from attnkit.viz.report import MAP_BUDGET

    name, sequence = parse_fasta(text)
    document = cut_sections(text, sections)
    offsets = residue_offsets(text)
    L = len(sequence)
    edges, kept = token_boundaries(document, offsets, L)
    fine = fine_edges(L, edges, tile_edges(L, POOL_TILES))
    long = (MAP_BUDGET if map_budget is None else map_budget) < L
    bar = StageBar(["model", "attention", "report"], progress)
    bar.stage("training the protein model")
    model, info, cached = load_or_train(sequence, cache=cache)
    bar.stage("running attention")
    tokens = list(sequence)
    options = dict(maps=not long, stats=True, topk=TOPK, pool=fine, tokens=tokens, max_map_bytes=0 if long else 2**30)
    with _one_thread(), torch.no_grad(), record(model, **options) as rec:
        model(_ids(sequence)[None])
    bar.stage("building report")
    notes = []
    if long:
        last = rec[len(rec) - 1].stats.received[0].float().mean(0) / L  # (L,): head-averaged, over all queries
        saliency = {"raw attention (last layer)": last}
        notes.append(
            f"Long sequence ({L} residues, over the map budget of {MAP_BUDGET if map_budget is None else map_budget}):"
            " no L x L map was built; statistics come from one exact pass of attnkit.attention_stats pooled over "
            "the domains and the report's tiles. Saliency is the attention each residue receives in the last layer "
            "(AttentionStats.received); rollout is left out (it multiplies L x L matrices through the layers)."
        )
    else:
        saliency = {"rollout": rollout(rec)[0], "raw attention (last layer)": raw_attention(rec)[0]}  # (L,) each
    how = "loaded from the cache, where it was " if cached else ""
    note = (
        f"Character-level attnkit model (attnkit.nn.TransformerEncoder: {DEPTH} layers x {HEADS} heads, width {DIM}, "
        f"rotary positions), {how}trained for {info['steps']} steps ({info['seconds']:.1f} s) on masked-residue "
        f"prediction over this one sequence only (loss {info['loss_start']:.2f} -> {info['loss_end']:.2f} nats; "
        f"{100 * info['accuracy']:.0f}% of masked residues recovered). It has learnt this sequence, not proteins: "
        "its attention shows what helps fill a gap here (neighbours, the same position in another repeat)."
    )
    view = section_view([layer.stats.pooled[0] for layer in rec], fine, kept, edges, set())
    data = report_data(
        rec,
        tokens,
        spacing=[""] * len(tokens),
        map_budget=map_budget,
        fine=fine,
        view=view,
        title=f"The protein example: {name.split('|')[0].strip() or 'sequence'}",
        model="character-level attnkit encoder trained on this sequence (not a pretrained protein model)",
        notes=[note, *notes],
        saliency=saliency,
    )
    links = long_range_links(data)
    bar.close()
    return Analysis(
        data=data, links=links, notes=data.notes, seconds={"train": 0.0 if cached else info["seconds"]}, sections=view
    )
