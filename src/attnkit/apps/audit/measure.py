"""Measuring one document: the attention each token receives, per layer and head, in O(L) memory.

`Measurer.measure` tokenizes a document, cuts it into windows the model can read, runs each
window through the model inside `attnkit.inspect.record` (statistics only: ``maps=False``), and
returns per token ``received[l, h, j] = sum_i p_ij``, the column sums of layer ``l``'s head ``h``
map (`attnkit.AttentionStats.received`, computed blockwise by `attnkit.attention_stats` without
the ``L x L`` map), with each token's category and section kind.

Windows: the model is loaded as ``attnkit show`` loads it (`attnkit.apps.show.pretrained.load_checkpoint`)
and reads as many tokens as show reads by default (``Checkpoint.length``: the length a
sentence-transformers checkpoint was trained for, else its position table). A longer document is
cut into consecutive windows of at most that many tokens, special tokens included (each window
gets the tokenizer's own [CLS]/[SEP] or BOS), cut between words where one starts within the last
16 tokens; a token's attention is that of its own window. A window of
``L_w`` tokens has ``L_w`` query rows, each summing to 1, so the attention received over the
whole document sums to the number of tokens read, special tokens of every window included.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from attnkit.apps.audit.categories import Tagger

__all__ = ["Measured", "Measurer", "section_kinds"]


@dataclass
class Measured:
    """One document, measured.

    Attributes:
        received: ``(N, H, L)`` float64: attention received by each token, per layer and head.
        categories: ``(L,)`` int64: each token's index into ``Tagger.categories``.
        sections: ``(L,)`` the section kind of each token (`section_kinds`).
        windows: how many windows the document was read in.
        tokens: ``(L,)`` token strings.
    """

    received: np.ndarray
    categories: np.ndarray
    sections: list[str]
    windows: int
    tokens: list[str]


_MEANS = re.compile(r"[\"”][ \t]+(?:shall[ \t]+)?means?\b")  # '"Fees" means': a clause of definitions


def _section_kind(section, kind: str, text: str) -> str:
    """What a section is, for the audit's table: definitions, clause, signatures, a speaker's message, ..."""
    body = text[section.start : section.end]
    title = section.title
    if title in ("(preamble)", "(whole text)", "(gap)", "(tail)"):
        return title.strip("()")
    if kind == "messages":
        who = title.split("]", 1)[-1].strip() if "]" in title else title
        return f"message: {who or 'unknown'}"
    if kind == "clauses":
        lowered = body.lower()
        if "definition" in title.lower() or "interpretation" in title.lower() or _MEANS.search(body):
            return "definitions"
        if "signed" in lowered or "signature" in lowered or "in witness" in lowered:
            return "signatures"
        return "clause"
    if kind == "articles":
        return "article"
    return kind.rstrip("s") or "section"


def section_kinds(text: str) -> tuple[list[tuple[int, int]], list[str]]:
    """``(spans, kinds)``: the sections `attnkit.inspect.sections` finds in ``text`` (``"auto"``) and their kinds.

    Kinds: ``"definitions"``, ``"clause"``, ``"signatures"`` (contracts), ``"message: SPEAKER"`` (support
    and chat logs), ``"article"`` (news), ``"preamble"``, ``"whole text"`` (no sections found).
    """
    from attnkit.inspect.sections import detect_kind, sections

    kind = detect_kind(text)
    found = sections(text, kind)
    return [(s.start, s.end) for s in found], [_section_kind(s, kind, text) for s in found]


def _special_frame(tokenizer) -> tuple[list[int], list[int]]:
    """``(prefix, suffix)``: the special token ids the tokenizer puts before and after a text ([CLS] ... [SEP],
    <s> ... </s>, BOS alone, or nothing), read from how it encodes one word with and without them."""
    bare = tokenizer("word", add_special_tokens=False)["input_ids"]
    full = tokenizer("word", add_special_tokens=True)["input_ids"]
    for at in range(len(full) - len(bare) + 1):
        if full[at : at + len(bare)] == bare:
            return list(full[:at]), list(full[at + len(bare) :])
    raise ValueError(f"{type(tokenizer).__name__}: cannot tell its special tokens from the text's own")


class Measurer:
    """Runs documents through a loaded checkpoint and tags their tokens.

    Args:
        checkpoint: `attnkit.apps.show.pretrained.Checkpoint`.
        tagger: the `Tagger` of this corpus (its profile) and the user's categories.
        window: tokens per window (default ``checkpoint.length``), at most ``checkpoint.max_length``.
    """

    def __init__(self, checkpoint, tagger: Tagger, *, window: int | None = None):
        self.checkpoint = checkpoint
        self.tagger = tagger
        self.window = window or checkpoint.length
        self.prefix, self.suffix = _special_frame(checkpoint.tokenizer)
        self.extra = len(self.prefix) + len(self.suffix)
        if self.window - self.extra < 1:
            raise ValueError(f"--window must exceed the {self.extra} special tokens a window holds, got {self.window}")

    def _windows(self, ids: list[int], offsets: list[tuple[int, int]]) -> list[tuple[list[int], list[int]]]:
        """``[(input_ids, positions)]``: each window's ids with special tokens, and the document index of each
        (``-1`` for a special token).

        A window holds at most ``window`` tokens; it ends before a token that continues a word (no gap
        between its characters and the previous token's) when a word start lies within the last 16 tokens,
        so a word's pieces stay in one window.
        """
        step = self.window - self.extra
        out, lo = [], 0
        while lo < len(ids):
            hi = min(lo + step, len(ids))
            if hi < len(ids):
                back = next(
                    (c for c in range(hi, max(lo + 1, hi - 16) - 1, -1) if offsets[c][0] > offsets[c - 1][1]), hi
                )
                hi = back
            chunk = ids[lo:hi]
            positions = [-1] * len(self.prefix) + list(range(lo, hi)) + [-1] * len(self.suffix)
            out.append((self.prefix + chunk + self.suffix, positions))
            lo = hi
        return out

    def received(self, input_ids: list[int]):
        """``(N, H, L)`` float64 numpy: the attention each of ``input_ids``'s tokens receives, per layer and head.

        One forward pass inside `attnkit.inspect.record` with statistics only (``topk=0``, one pool
        tile): nothing of size ``L x L`` is kept.
        """
        import torch

        from attnkit.inspect import record

        net = self.checkpoint.model
        ids = torch.tensor([input_ids])  # (1, L)
        with torch.no_grad(), record(net, stats=True, maps=False, topk=0, pool=1) as rec:
            net(input_ids=ids, attention_mask=torch.ones_like(ids))
        if len(rec) == 0:
            raise RuntimeError(f"{self.checkpoint.name}: the model ran but no attention call was recorded")
        return torch.stack([layer.stats.received[0] for layer in rec]).double().numpy()  # (N, H, L)

    def measure(self, text: str) -> Measured:
        """Measure one document (module docstring).

        Raises:
            ValueError: the tokenizer keeps no token of ``text``.
        """
        tok = self.checkpoint.tokenizer
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True, truncation=False, verbose=False)
        ids, offsets = enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]
        if not ids:
            raise ValueError("the tokenizer keeps no token of it")
        spans, kinds = section_kinds(text)
        starts = np.array([a for a, _ in spans])
        parts, all_offsets, special, names = [], [], [], []
        windows = self._windows(ids, offsets)
        for full, positions in windows:
            parts.append(self.received(full))  # (N, H, L_w)
            for token_id, p in zip(full, positions):
                special.append(p < 0)
                all_offsets.append((0, 0) if p < 0 else offsets[p])
                names.append(tok.convert_ids_to_tokens(token_id))
        received = np.concatenate(parts, axis=-1)  # (N, H, L)
        categories = self.tagger.tag(text, all_offsets, special)
        at = np.searchsorted(starts, [a for a, _ in all_offsets], side="right") - 1  # (L,) section of each token
        sections = [kinds[max(0, int(s))] if not sp else "special" for s, sp in zip(at, special)]
        return Measured(received, categories, sections, len(windows), names)
