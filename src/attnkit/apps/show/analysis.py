"""What `attnkit show` found, shared by its two ways in (a pretrained checkpoint, the protein example).

`Analysis` is the result (the report's `ReportData`, the strongest long-range links, notes);
`report_data` turns an `attnkit.inspect.Recording` into the report's data (through
`attnkit.viz.ReportData.from_stats`), `long_range_links` picks the links the summary prints,
`StageBar` is the progress bar both show while they run.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from attnkit.viz.report import POOL_TILES, TOPK

__all__ = [
    "POOL_TILES",
    "TOPK",
    "Analysis",
    "Link",
    "StageBar",
    "is_word",
    "long_range_links",
    "report_data",
    "role_rows",
]


@dataclass(frozen=True)
class Link:
    """One strong attention link between distant tokens."""

    layer: int
    head: int
    source: int  # query position
    target: int  # key position
    weight: float
    source_context: str
    target_context: str

    @property
    def distance(self) -> int:
        return abs(self.target - self.source)


@dataclass
class Analysis:
    """What `analyse` found: the report's data, the strongest long-range links, and what was done to the input.

    In a notebook it displays as the whole offline report (`report`); `head`, `flow` and `roles` are the
    smaller inline views (`attnkit.viz.notebook`). ``data.shape`` is ``(N layers, H heads, L tokens)``.
    """

    data: Any  # attnkit.viz.report.ReportData
    links: list[Link]
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    sections: Any = None  # attnkit.apps.show.flow.SectionView, or None
    causal: bool = False  # a decoder: every flow points backwards

    def report(self, *, height: int = 760):
        """The whole report inline (`attnkit.viz.ReportView`; ``.save(path)`` writes the standalone page)."""
        from attnkit.viz.notebook import ReportView

        return ReportView(self.data, height=height)

    def head(self, layer: int | None = None, head: int | None = None, **kwargs: Any):
        """One head's ``(L, L)`` map (pooled tiles on long inputs) as an `attnkit.viz.HeadView`.

        Default: the head of the strongest long-range link (`links`), else layer 0, head 0.
        """
        from attnkit.viz.notebook import HeadView

        if (layer is None) != (head is None):
            raise ValueError(f"Analysis.head: give both layer and head, or neither; got layer={layer}, head={head}")
        if layer is None:
            layer, head = (self.links[0].layer, self.links[0].head) if self.links else (0, 0)
        return HeadView.from_report(self.data, layer, head, **kwargs)

    def flow(self, layer: int | None = None, head: int | None = None, **kwargs: Any):
        """The section flow ``(S, S)`` as an `attnkit.viz.FlowView`: every head averaged, one layer, or one head."""
        from attnkit.viz.notebook import FlowView

        return FlowView.from_report(self.data, layer=layer, head=head, **kwargs)

    def roles(self, **kwargs: Any):
        """Every head's role (`attnkit.inspect.head_roles`) as an `attnkit.viz.RolesView` table."""
        from attnkit.viz.notebook import RolesView

        kwargs.setdefault("title", f"Head roles: {self.data.title}")
        return RolesView.from_report(self.data, **kwargs)

    def _repr_html_(self) -> str:
        return self.report()._repr_html_()

    def __repr__(self) -> str:
        N, H, L = self.data.shape
        return f"Analysis({self.data.title!r}: {L} tokens, {N} layers x {H} heads, {len(self.links)} long-range links)"


# ----------------------------------------------------------------------------- summary helpers
def is_word(token: str) -> bool:
    """Whether ``token`` has a letter or a digit (punctuation and special tokens do not count as words)."""
    return any(ch.isalnum() for ch in token)


def _context(tokens: list[str], spacing: list[str], i: int, width: int = 5) -> str:
    lo, hi = max(0, i - width), min(len(tokens), i + width + 1)
    parts = []
    for j in range(lo, hi):
        gap = " " if spacing[j] and j > lo else ""
        parts.append(gap + (f"[{tokens[j]}]" if j == i else tokens[j]))
    return ("…" if lo > 0 else "") + "".join(parts) + ("…" if hi < len(tokens) else "")


def long_range_links(
    data: Any,
    *,
    count: int = 10,
    min_distance: int | None = None,
    skip: set[int] | None = None,
    per_head: int | None = 2,
) -> list[Link]:
    """The strongest links between tokens at least ``min_distance`` apart, over every layer and head.

    Reads ``data.topk_index`` / ``data.topk_weight`` ``(N, H, L, k)``. Links from or to positions
    in ``skip`` (default ``data.special``: special tokens such as ``[CLS]``/``[SEP]``, which act as attention sinks) and
    to or from tokens without a letter or digit are left out; each (source, target) pair is
    reported once, with its strongest head, and at most ``per_head`` links come from one head
    (None: no cap) so that one positional head cannot fill the list.
    """
    tokens = data.tokens
    L = len(tokens)
    spacing = data.spacing or [""] + [" "] * (L - 1)
    min_distance = max(8, L // 8) if min_distance is None else min_distance
    skip = set(data.special) if skip is None else skip
    words = np.array([is_word(t) and i not in skip for i, t in enumerate(tokens)])  # (L,)
    index, weight = data.topk_index, data.topk_weight  # (N, H, L, k)
    source = np.broadcast_to(np.arange(L)[None, None, :, None], index.shape)
    keep = (np.abs(index - source) >= min_distance) & words[index] & words[source] & (weight > 0)
    layer, head, src, rank = np.nonzero(keep)
    tgt = index[layer, head, src, rank]
    w = weight[layer, head, src, rank]
    best: dict[tuple[int, int], Link] = {}
    taken: dict[tuple[int, int], int] = {}
    for n in np.argsort(-w, kind="stable"):
        pair = (int(src[n]), int(tgt[n]))
        where = (int(layer[n]), int(head[n]))
        if pair in best or (per_head is not None and taken.get(where, 0) >= per_head):
            continue
        taken[where] = taken.get(where, 0) + 1
        best[pair] = Link(
            layer=int(layer[n]),
            head=int(head[n]),
            source=pair[0],
            target=pair[1],
            weight=float(w[n]),
            source_context=_context(tokens, spacing, pair[0]),
            target_context=_context(tokens, spacing, pair[1]),
        )
        if len(best) == count:
            break
    return list(best.values())


class StageBar:
    """A stage-by-stage progress bar on stderr (tqdm), or nothing when ``enabled`` is False.

    ``stage(name)`` closes the previous stage and starts ``name``; ``detail(text)`` says what the stage
    is doing (per-layer progress on long inputs); ``close()`` fills the bar;
    ``discard()`` erases it (before an error message, which is then the one line left).
    """

    def __init__(self, stages: list[str], enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=len(stages), file=sys.stderr, bar_format="{desc:<28} {bar:24} {n}/{total} {elapsed}")

    def stage(self, name: str) -> None:
        if self.bar is not None:
            if self.bar.desc:
                self.bar.update(1)
            self.bar.set_description_str(name)

    def detail(self, text: str) -> None:
        """Say what the current stage is doing (``attention: layer 3/24``) without moving the bar."""
        if self.bar is not None:
            self.bar.set_description_str(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.update(self.bar.total - self.bar.n)
            self.bar.set_description_str("done")
            self.bar.close()

    def discard(self) -> None:
        if self.bar is not None:
            self.bar.leave = False
            self.bar.close()


def role_rows(rec, tokens: list[str]) -> list[dict]:
    """`attnkit.inspect.head_roles` as report rows ``{layer: int, head, role, scores}`` (a few telling scores)."""
    from attnkit.inspect import head_roles

    index = {name: i for i, name in enumerate(rec.layer_names())}
    keys = ("locality", "previous_token", "sink", "duplicate_token", "induction", "entropy_norm")
    return [
        {
            "layer": index[row["layer"]],
            "head": int(row["head"]),
            "role": row["role"],
            "scores": {key.replace("_", " "): row[key] for key in keys if key in row},
        }
        for row in head_roles(rec, tokens=tokens).rows
    ]


def report_data(
    rec,
    tokens: list[str],
    *,
    spacing: list[str] | None = None,
    skip: set[int] | None = None,
    map_budget: int | None = None,
    fine: Any = None,
    view: Any = None,
    **fields: Any,
):
    """`ReportData` from a `attnkit.inspect.Recording` of one self-attention pass over ``tokens`` (batch 0).

    Full maps when every layer kept one and ``L <= map_budget``; otherwise the recorded pooled
    maps. Links are each query's top-k keys from the statistics; per-head entropy and mean
    distance are averaged over the queries not in ``skip`` (special tokens).

    ``fine``: the ``(F + 1,)`` edges the recording pooled over (`attnkit.apps.show.flow.fine_edges`:
    sections and ``POOL_TILES`` tiles together); the tiled map is summed from it. ``view``: the
    `attnkit.apps.show.flow.SectionView` whose sections, flow and section roles go into the report.
    """
    from dataclasses import replace

    from attnkit.apps.show.flow import coarsen, tile_edges
    from attnkit.inspect import ROLE_DESCRIPTIONS, SECTION_ROLE_DESCRIPTIONS
    from attnkit.viz.report import MAP_BUDGET, ReportData

    L = len(tokens)
    layers = list(rec)
    for layer in layers:
        if layer.stats is None or tuple(layer.shape[2:]) != (L, L):
            raise ValueError(f"report_data: layer {layer.name} is not a recorded self-attention over {L} tokens")
    maps = [layer.maps[0] for layer in layers] if rec.has_maps() else None
    stats = [layer.stats.select(0) for layer in layers]  # (1, H, ...) each
    if fine is not None:  # the tiled map: fine blocks summed into POOL_TILES x POOL_TILES tiles (exact)
        tiles = tile_edges(L, POOL_TILES)
        stats = [replace(s, pooled=coarsen(s.pooled, fine, tiles), query_edges=tiles, key_edges=tiles) for s in stats]
    roles = role_rows(rec, tokens)
    descriptions = dict(ROLE_DESCRIPTIONS)
    if view is not None:
        for row, section in zip(roles, view.roles):
            row["section_role"] = section["section_role"]
            row["scores"].update({"within section": section["within"], "far sections": section["far"]})
        descriptions.update(SECTION_ROLE_DESCRIPTIONS)
        fields.update(sections=view.report_sections, section_flow=view.report_flow)
    return ReportData.from_stats(
        tokens,
        stats,
        maps=maps,  # (H, L, L) each
        skip=skip,
        map_budget=MAP_BUDGET if map_budget is None else map_budget,
        spacing=spacing,
        layer_names=[f"layer {i}" for i in range(len(layers))],
        roles=roles,
        role_descriptions=descriptions,
        **fields,
    )
