"""Section flow for `attnkit show`: one statistics pass pooled over sections AND tiles, and what it says.

A document's sections (`attnkit.inspect.sections`, mapped onto tokens by
`attnkit.inspect.token_boundaries`) and the report's ``POOL_TILES`` near-equal tiles are two
partitions of the tokens. Their union (plus a segment of its own for each special token at
either end: [CLS]/BOS, [SEP]/EOS, which act as attention sinks) is one finer partition: the
statistics pass pools over it once (``pool=fine edges``), and since every tile and every
section is a union of fine segments, the exact sums over tiles and over sections both
follow by adding fine blocks together (`coarsen`). Nothing of size ``L x L`` is built.

From the per-layer pooled sums:

* ``flow (N, H, S, S)``: the mean attention a token of section ``a`` pays to section ``b``
  (`attnkit.AttentionStats.segment_flow` over the sections), what the report shows;
* ``content (N, H, S, S)``: the same without the special tokens (neither as queries nor as
  keys), so a head parked on [CLS] or BOS does not look like a head that reads section 0;
  what the summary (`section_draws`) and the section roles read.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "FLOW_VALUES",
    "MAX_SECTIONS",
    "SectionDraw",
    "SectionView",
    "coarsen",
    "fine_edges",
    "merge_for_report",
    "section_draws",
    "section_flows",
    "section_view",
    "tile_edges",
]

# The report's section x section flow holds N * H * S * S values; sections are merged (in order) so
# that it stays under this many values (about 8 bytes each in the page's JSON) and S under MAX_SECTIONS.
FLOW_VALUES = 1_000_000
MAX_SECTIONS = 200


def tile_edges(length: int, tiles: int) -> Tensor:
    """``(P + 1,)`` int64 edges of ``P = min(tiles, length)`` near-equal tiles: ``floor(r L / P)``."""
    P = min(tiles, length)
    return torch.div(torch.arange(P + 1, dtype=torch.int64) * length, P, rounding_mode="floor")


def fine_edges(length: int, *partitions: Tensor, special: set[int] | None = None) -> Tensor:
    """The union of several edge tensors over ``[0, length]``, plus a segment of its own for each special
    token at either end of the text (positions 0, 1, ... and ..., L-1 while they are special)."""
    cuts = {0, length}
    for edges in partitions:
        cuts.update(int(e) for e in edges.tolist())
    special = special or set()
    i = 0
    while i < length and i in special:
        cuts.update((i, i + 1))
        i += 1
    i = length - 1
    while i >= 0 and i in special:
        cuts.update((i, i + 1))
        i -= 1
    return torch.tensor(sorted(cuts), dtype=torch.int64)


def _owner(fine: Tensor, coarse: Tensor) -> Tensor:
    """``(F,)``: the coarse segment holding each fine segment (every coarse edge must be a fine edge)."""
    missing = set(coarse.tolist()) - set(fine.tolist())
    if missing:
        raise ValueError(f"coarsen: coarse edges {sorted(missing)[:5]} are not fine edges")
    return torch.searchsorted(coarse, fine[:-1], right=True) - 1  # (F,)


def coarsen(pooled: Tensor, fine: Tensor, coarse_q: Tensor, coarse_k: Tensor | None = None) -> Tensor:
    """Sum a pooled map ``(..., F, F)`` over fine segments into ``(..., C_q, C_k)`` coarse blocks (exact)."""
    coarse_k = coarse_q if coarse_k is None else coarse_k
    rows, cols = _owner(fine, coarse_q), _owner(fine, coarse_k)
    shape = pooled.shape[:-2]
    out = pooled.new_zeros(*shape, coarse_q.numel() - 1, pooled.shape[-1])
    out.index_add_(pooled.dim() - 2, rows.to(pooled.device), pooled)  # (..., C_q, F)
    final = pooled.new_zeros(*shape, coarse_q.numel() - 1, coarse_k.numel() - 1)
    final.index_add_(pooled.dim() - 1, cols.to(pooled.device), out)  # (..., C_q, C_k)
    return final


def section_flows(pooled: Tensor, fine: Tensor, sections: Tensor, special: set[int]) -> tuple[Tensor, Tensor]:
    """``(flow, content)``, both ``(..., S, S)``, from a map pooled over ``fine`` segments ``(..., F, F)``.

    ``flow[a, b]``: attention summed over section ``a``'s queries and section ``b``'s keys, divided by
    the queries of ``a`` (a row sums to 1). ``content``: the same with the fine segments made only of
    special tokens left out as queries and as keys, divided by the other queries of ``a``.
    """
    flow = coarsen(pooled, fine, sections) / sections.diff().to(pooled.dtype)[:, None]  # (..., S, S)
    sink = torch.tensor(
        [all(t in special for t in range(int(a), int(b))) for a, b in itertools.pairwise(fine)], dtype=torch.bool
    )  # (F,)
    kept = pooled * (~sink).to(pooled.dtype)[:, None] * (~sink).to(pooled.dtype)[None, :]
    real = (fine.diff() * (~sink)).to(pooled.dtype)  # (F,) non-special queries per fine segment
    queries = real.new_zeros(sections.numel() - 1).index_add_(0, _owner(fine, sections), real)  # (S,)
    content = coarsen(kept, fine, sections) / queries.clamp(min=1)[:, None]  # (..., S, S)
    return flow, content


# --------------------------------------------------------------------------- the report's sections
def _top_label(label: str) -> str:
    """``"14.2" -> "14"``, ``"msg 12" -> "msg 12"``: the first part of a dotted clause number."""
    return label.split(".")[0] if label[:1].isdigit() else label


def merge_for_report(kept: list, edges: Tensor, *, layers: int, heads: int) -> tuple[list, Tensor]:
    """Sections for the report: ``(kept, edges)`` unchanged while ``layers * heads * S^2 <= FLOW_VALUES`` and
    ``S <= MAX_SECTIONS``, else merged in order: first by top-level clause number (1.1 .. 1.33 into 1), then
    runs of neighbours of about equal token count. Merged sections keep the first one's title and a
    ``"first-last"`` label."""
    limit = max(2, min(MAX_SECTIONS, int((FLOW_VALUES / max(1, layers * heads)) ** 0.5)))
    groups = [[i] for i in range(len(kept))]
    if len(groups) > limit:
        merged: list[list[int]] = []
        for i in range(len(kept)):
            top = _top_label(kept[i].label)
            if merged and top and top == _top_label(kept[merged[-1][0]].label):
                merged[-1].append(i)
            else:
                merged.append([i])
        groups = merged
    if len(groups) > limit:
        sizes = np.array([int(edges[g[-1] + 1] - edges[g[0]]) for g in groups])
        bounds = np.searchsorted(np.cumsum(sizes), np.linspace(0, sizes.sum(), limit + 1)[1:-1], side="right")
        cuts = [0, *sorted(set(int(b) for b in bounds if 0 < b < len(groups))), len(groups)]
        groups = [[i for g in groups[a:b] for i in g] for a, b in itertools.pairwise(cuts)]
    if len(groups) == len(kept):
        return kept, edges
    out, new_edges = [], [0]
    for g in groups:
        first, last = kept[g[0]], kept[g[-1]]
        label = first.label if len(g) == 1 else f"{first.label}-{last.label}".strip("-")
        out.append(replace(first, label=label, end=last.end))
        new_edges.append(int(edges[g[-1] + 1]))
    return out, torch.tensor(new_edges, dtype=torch.int64)


# --------------------------------------------------------------------------- the summary's sentences
@dataclass(frozen=True)
class SectionDraw:
    """What one section draws on: ``sources`` are ``(section index, flow, distance in sections)``, strongest first.

    ``far`` is the share of its tokens' attention (special tokens aside, averaged over layers and
    heads) that goes two or more sections away.
    """

    section: int
    far: float
    sources: list[tuple[int, float, int]]


def section_draws(content: np.ndarray, *, count: int = 6, sources: int = 2, min_gap: int = 2) -> list[SectionDraw]:
    """The sections that draw most on distant sections, most first.

    Args:
        content: ``(N, H, S, S)`` section flow without special tokens (`section_flows`); averaged here
            over layers and heads (plain mean: every head counts the same).
        min_gap: sources at least this many sections away count as distant (2: not itself, not its neighbours).
    """
    M = np.asarray(content, dtype=np.float64).reshape(-1, *content.shape[-2:]).mean(0)  # (S, S)
    S = M.shape[0]
    gap = np.abs(np.arange(S)[:, None] - np.arange(S)[None, :])  # (S, S)
    far = np.where(gap >= min_gap, M, 0.0)
    order = np.argsort(-far.sum(1), kind="stable")
    out = []
    for a in order[:count]:
        if far[a].sum() <= 0:
            break
        best = [int(b) for b in np.argsort(-far[a], kind="stable")[:sources] if far[a, b] > 0]
        out.append(SectionDraw(int(a), float(far[a].sum()), [(b, float(M[a, b]), b - int(a)) for b in best]))
    return out


# --------------------------------------------------------------------------- everything show needs
@dataclass
class SectionView:
    """The section-level view of one recording (batch element 0).

    Attributes:
        sections: the `attnkit.inspect.Section` list the tokens were pooled over (as detected, merged
            only where a section received no token); ``edges (S + 1,)`` their token boundaries.
        content: ``(N, H, S, S)`` section flow without special tokens (`section_flows`).
        sizes: ``(S,)`` tokens per section.
        report_sections, report_flow: what `attnkit.viz.ReportData` gets (``sections`` dicts and
            ``section_flow (N, H, S', S')``), merged by `merge_for_report` when ``S`` is large.
        roles: `attnkit.inspect.section_roles` rows; draws: `section_draws`.
    """

    sections: list
    edges: Tensor
    content: np.ndarray
    sizes: np.ndarray
    report_sections: list[dict]
    report_flow: np.ndarray
    roles: list[dict]
    draws: list[SectionDraw]


def section_view(pooled: list[Tensor], fine: Tensor, kept: list, edges: Tensor, special: set[int]) -> SectionView:
    """Build the `SectionView` from each layer's map pooled over ``fine`` segments, ``(H, F, F)`` per layer."""
    from attnkit.inspect import section_roles

    N, H = len(pooled), pooled[0].shape[0]
    report_kept, report_edges = merge_for_report(kept, edges, layers=N, heads=H)
    contents, flows = [], []
    for layer in pooled:  # (H, F, F) each, fp32
        _, content = section_flows(layer, fine, edges, special)  # (H, S, S)
        flow, _ = section_flows(layer, fine, report_edges, special)  # (H, S', S')
        contents.append(content.float().numpy())
        flows.append(flow.float().numpy())
    content = np.stack(contents)  # (N, H, S, S)
    sizes = edges.diff().numpy()
    report_sections = [
        {"label": s.label, "title": s.title, "start": int(a), "end": int(b)}
        for s, a, b in zip(report_kept, report_edges[:-1].tolist(), report_edges[1:].tolist())
    ]
    return SectionView(
        sections=list(kept),
        edges=edges,
        content=content,
        sizes=sizes,
        report_sections=report_sections,
        report_flow=np.stack(flows),
        roles=section_roles(torch.from_numpy(content), torch.from_numpy(sizes)),
        draws=section_draws(content),
    )
