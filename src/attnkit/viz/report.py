"""The offline attention report: one self-contained HTML file (no CDN, no network, opens from disk).

`ReportData` holds what the page shows, as plain arrays; `ReportData.to_dict` makes it
JSON-serialisable (the large arrays quantised, deflate-compressed and base64-encoded), and
`render_report` inlines it with the page's HTML, CSS and JavaScript (package data under
``attnkit/viz/assets/``). The page decompresses with the browser's ``DecompressionStream``.

Two map modes keep the file small and the page responsive:

* full maps, ``(layers, H, L, L)``, while ``L <= map_budget`` tokens;
* beyond that, maps averaged over ``P x P`` tiles (``edges`` gives the token range of each tile)
  plus, for every query, its ``k`` strongest keys (``topk_index``/``topk_weight``), which is
  what the hover links use in both modes.

Two ways in: `ReportData.from_stats` takes `attnkit.AttentionStats` (one per layer) and uses what
they carry (top-k links, pooled maps, entropy, distance); `ReportData.from_maps` takes full maps
and derives the links (`topk_links`) and the pooled maps (`attnkit.viz.plots.pool_map` over
`attnkit.viz.plots.tile_edges`) with the statistics' conventions.

Security: every string that comes from the input (tokens, title, notes) reaches the page only
through JSON inside a ``<script type="application/json">`` block (with ``<``, ``>``, ``&`` and the
line separators escaped) or `html.escape`, and the page writes it with ``textContent``. A
Content-Security-Policy allows only the page's own script and style (by hash) and no network.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from attnkit.viz.plots import pool_map, tile_edges

__all__ = ["FORMAT_VERSION", "ReportData", "render_report", "write_report"]

FORMAT_VERSION = 1
# Full maps up to this many tokens; above it, pooled maps plus top-k links.
MAP_BUDGET = 384
# Tiles per side of a pooled map (the ``pool`` of the statistics recorded for a report).
POOL_TILES = 96
# Strongest keys kept per query for the hover links (the ``topk`` of those statistics).
TOPK = 5
# Characters of base64 the section flow may take (its mean over all layers is kept even beyond; `_encode_section_flow`).
SECTION_FLOW_BUDGET = 8 * 2**20
# What the embedded data may reach before the section flow stops adding per-layer detail (the page: 15 MB).
REPORT_BUDGET = 14 * 2**20


def _np(x: Any, dtype=np.float32) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        x = x.detach().to("cpu").float().numpy()
    return np.asarray(x, dtype=dtype)


def _b64(raw: bytes) -> str:
    return base64.b64encode(zlib.compress(raw, 6)).decode("ascii")


def _unb64(text: str) -> bytes:
    return zlib.decompress(base64.b64decode(text))


def _sqrt_codes(values: np.ndarray, *, per_row: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(..., A, B)`` values -> ``round(255 * sqrt(v / peak))`` as uint8, and the peaks.

    ``peak`` is each matrix's maximum, ``(...)``, or with ``per_row`` each row's, ``(..., A)``. The square
    root spends the 256 steps where attention lives (small weights): a value is read back as
    ``(code / 255) ** 2 * peak``, within ``peak / 255`` of the original (``0.5 / 255`` on the square-root scale).
    """
    v = np.clip(values, 0, None)
    peak = v.max(axis=-1) if per_row else v.reshape(*v.shape[:-2], -1).max(axis=-1)  # (..., A) or (...)
    safe = np.where(peak > 0, peak, 1.0)
    safe = safe[..., None] if per_row else safe[..., None, None]
    return np.round(255 * np.sqrt(v / safe)).astype(np.uint8), peak


def _from_codes(codes: np.ndarray, peak: Any) -> np.ndarray:
    """Inverse of `_sqrt_codes`: ``codes (..., A, B)`` and ``peak (...)`` or ``(..., A)`` -> float32 values."""
    peak = np.asarray(peak, dtype=np.float32)
    peak = peak.reshape(peak.shape + (1,) * (codes.ndim - peak.ndim))  # broadcast over the rows and/or columns
    return ((codes.astype(np.float32) / 255) ** 2 * peak).astype(np.float32)


def _spread_order(n: int) -> list[int]:
    """``0 .. n-1`` ordered so that every prefix spreads evenly: first, last, middle, quarters, ..."""
    order = [0, n - 1][: min(n, 2)]
    spans = [(0, n - 1)]
    while spans:
        lo, hi = spans.pop(0)
        if hi - lo < 2:
            continue
        mid = (lo + hi) // 2
        order.append(mid)
        spans += [(lo, mid), (mid, hi)]
    return order


def _encode_section_flow(flow: np.ndarray, layer_names: list[str], budget: int) -> dict:
    """The page's section-flow block for ``flow (N, H, S, S)``, within ``budget`` characters of base64.

    Every ``(S, S)`` matrix is stored like the maps, ``round(255 * sqrt(f / peak))`` (uint8, `_sqrt_codes`),
    but with a peak per row (float32): a late section's row of small, even flows keeps its precision
    beside an early section that attends only to itself. Codes and peaks are deflated and base64-encoded.
    Always kept, even beyond ``budget``: ``mean``, the flow averaged over all layers and heads. Then,
    while the base64 text fits in ``budget``: ``layers[l]``, layer ``l``'s flow averaged over its heads
    (computed here, from the exact flow), and after those ``heads[l]``, all ``H`` heads of layer ``l``.
    Layers are taken in `_spread_order` (first, last, middle, ...), so a partial set still spans the
    model; a layer left out is ``None`` and ``note`` says which were kept.
    ``causal`` is True when no section draws on a later one (the strict upper triangle is zero).
    """
    N, H, S, _ = flow.shape
    layer_mean = flow.mean(axis=1, dtype=np.float64)  # (N, S, S)

    def block(values: np.ndarray) -> dict:
        codes, peak = _sqrt_codes(values, per_row=True)  # (..., S, S) uint8, (..., S)
        return {"peak": _b64(peak.astype("<f4").tobytes()), "data": _b64(codes.tobytes())}

    def size(entry: dict) -> int:
        return len(entry["peak"]) + len(entry["data"])

    mean = block(layer_mean.mean(axis=0))
    used = size(mean)
    layers: list[dict | None] = [None] * N
    heads: list[dict | None] = [None] * N
    for parts, make in ((layers, lambda l: block(layer_mean[l])), (heads, lambda l: block(flow[l]))):
        for l in _spread_order(N):
            if parts is heads and layers[l] is None:
                continue
            entry = make(l)
            if used + size(entry) > budget:
                break
            parts[l] = entry
            used += size(entry)
    note = None
    if any(entry is None for entry in heads):
        some_heads = any(entry is not None for entry in heads)
        note = f"The section flow ({N} layers x {H} heads x {S}x{S} sections) is over the report's size budget: " + (
            f"single heads are kept for {_which(heads, layer_names)}; " if some_heads else "no single heads; "
        )
        if all(entry is not None for entry in layers):
            note += (
                "the other layers show their heads averaged." if some_heads else "every layer shows its heads averaged."
            )
        else:
            note += f"heads averaged for {_which(layers, layer_names)}; the rest only as the mean of all layers."
    return {
        "size": S,
        "causal": bool(S > 1 and not np.any(np.triu(layer_mean, 1) > 1e-6)),
        "mean": mean,
        "layers": layers,
        "heads": heads,
        "note": note,
    }


def _which(parts: list, names: list[str]) -> str:
    """Which entries of ``parts`` are not None: "layer 0, layer 5 (2 of 24 layers)" or "all layers but layer 3"."""
    kept = [name for name, entry in zip(names, parts, strict=True) if entry is not None]
    left = [name for name, entry in zip(names, parts, strict=True) if entry is None]
    if not kept:
        return "no layer"
    if len(left) < len(kept):
        return f"all layers but {', '.join(left)}"
    return f"{', '.join(kept)} ({len(kept)} of {len(names)} layers)"


def _decode_section_flow(block: dict, N: int, H: int) -> np.ndarray:
    """Inverse of `_encode_section_flow`, ``(N, H, S, S)``: a layer without its heads repeats its head average
    (or, without that, the all-layers mean) for every head."""
    S = block["size"]

    def values(entry: dict, shape: tuple[int, ...]) -> np.ndarray:
        peak = np.frombuffer(_unb64(entry["peak"]), dtype="<f4").reshape(shape[:-1])
        return _from_codes(np.frombuffer(_unb64(entry["data"]), dtype=np.uint8).reshape(shape), peak)

    mean = values(block["mean"], (S, S))
    flow = np.empty((N, H, S, S), dtype=np.float32)
    for l in range(N):
        if block["heads"][l] is not None:
            flow[l] = values(block["heads"][l], (H, S, S))
        elif block["layers"][l] is not None:
            flow[l] = values(block["layers"][l], (S, S))
        else:
            flow[l] = mean
    return flow


def topk_links(maps: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each query's ``k`` strongest keys, for full maps without statistics (`AttentionStats` carry them).

    Args:
        maps: ``(layers, H, L, L)`` attention probabilities.

    Returns:
        ``index (layers, H, L, k)`` int64 and ``weight (layers, H, L, k)`` float32, strongest first.
    """
    m = _np(maps)
    k = min(k, m.shape[-1])
    index = np.argpartition(-m, k - 1, axis=-1)[..., :k]  # (layers, H, L, k), unordered
    weight = np.take_along_axis(m, index, axis=-1)
    order = np.argsort(-weight, axis=-1, kind="stable")
    return np.take_along_axis(index, order, axis=-1).astype(np.int64), np.take_along_axis(weight, order, axis=-1)


@dataclass
class ReportData:
    """Everything the report shows. Shapes: ``N`` layers, ``H`` heads, ``L`` tokens, ``P`` map size, ``k`` links.

    Attributes:
        tokens: ``L`` token strings as they should read (word pieces without ``##``).
        maps: ``(N, H, P, P)`` attention maps: full (``P == L``, ``edges`` None) or pooled over tiles.
        topk_index: ``(N, H, L, k)`` each query's strongest keys, strongest first.
        topk_weight: ``(N, H, L, k)`` their weights.
        edges: ``(P + 1,)`` token boundaries of the tiles of a pooled map; None for full maps.
        spacing: ``L`` strings, the white space before each token in the text: ``""``, ``" "`` or ``"\n"``
            (None: a space between every two tokens).
        special: positions of special tokens ([CLS], [SEP]); saliency colours are scaled to the
            largest value among the other tokens, since these sinks would wash everything else out.
        title, model: shown in the header.
        layer_names: ``N`` names (default ``layer 0``...).
        entropy: ``(N, H)`` mean attention entropy per head, nats.
        mean_distance: ``(N, H)`` mean attention distance per head, tokens.
        roles: head-role rows ``{"layer", "head", "role", "scores": {name: float}}``.
        role_descriptions: one line per role name.
        saliency: name -> ``(L,)`` token scores (rollout, gradient-weighted, received attention).
        faithfulness: rows ``{"name", "value", "note"}`` shown beside the saliency.
        notes: messages for the reader (truncation, untrained weights, pooling).
        sections: ``S`` document sections as token spans, ``{"label", "title", "start", "end"}`` with
            ``end`` exclusive, in order, covering ``[0, L)`` (`attnkit.inspect.sections` and
            `attnkit.inspect.token_boundaries` make them). Empty: the report has no Sections view.
        section_flow: ``(N, H, S, S)`` mean attention a token of section ``a`` pays to section ``b``
            (`attnkit.AttentionStats.segment_flow`); a row sums to 1 when every token of ``a``
            attends somewhere. Required with ``sections``.
        section_flow_budget: characters of base64 the report may spend on the section flow
            (`_encode_section_flow`); its mean over all layers and heads is kept even beyond.
    """

    tokens: list[str]
    maps: np.ndarray
    topk_index: np.ndarray
    topk_weight: np.ndarray
    edges: np.ndarray | None = None
    spacing: list[str] | None = None
    special: list[int] = field(default_factory=list)
    title: str = "attnkit attention report"
    model: str = ""
    layer_names: list[str] | None = None
    entropy: np.ndarray | None = None
    mean_distance: np.ndarray | None = None
    roles: list[dict] = field(default_factory=list)
    role_descriptions: dict[str, str] = field(default_factory=dict)
    saliency: dict[str, np.ndarray] = field(default_factory=dict)
    faithfulness: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    sections: list[dict] = field(default_factory=list)
    section_flow: np.ndarray | None = None
    section_flow_budget: int = SECTION_FLOW_BUDGET

    def __post_init__(self) -> None:
        self.tokens = [str(t) for t in self.tokens]
        L = len(self.tokens)
        self.maps = _np(self.maps)
        self.topk_index = _np(self.topk_index, np.int64)
        self.topk_weight = _np(self.topk_weight)
        if self.maps.ndim != 4 or self.maps.shape[2] != self.maps.shape[3]:
            raise ValueError(f"ReportData: maps must be (layers, H, P, P), got {self.maps.shape}")
        N, H, P, _ = self.maps.shape
        if self.edges is None:
            if P != L:
                raise ValueError(f"ReportData: full maps must be ({N}, {H}, L, L) with L={L} tokens, got {P}x{P}")
        else:
            self.edges = _np(self.edges, np.int64)
            if self.edges.shape != (P + 1,) or self.edges[0] != 0 or self.edges[-1] != L:
                raise ValueError(
                    f"ReportData: edges must be ({P + 1},) from 0 to {L}, got {self.edges.tolist()[:8]}..."
                )
            if np.any(np.diff(self.edges) < 1):
                raise ValueError("ReportData: edges must be strictly increasing")
        if self.topk_index.shape != self.topk_weight.shape or self.topk_index.shape[:3] != (N, H, L):
            raise ValueError(
                f"ReportData: topk_index and topk_weight must both be ({N}, {H}, {L}, k), "
                f"got {self.topk_index.shape} and {self.topk_weight.shape}"
            )
        if self.topk_index.size and (self.topk_index.min() < 0 or self.topk_index.max() >= L):
            raise ValueError(f"ReportData: topk_index must lie in [0, {L}), got [{self.topk_index.min()}, ...]")
        if self.spacing is not None:
            self.spacing = [str(s) for s in self.spacing]
            if len(self.spacing) != L or not set(self.spacing) <= {"", " ", "\n"}:
                raise ValueError(
                    f"ReportData: spacing must be {L} strings from '', ' ', '\\n', got {len(self.spacing)}"
                )
        self.special = sorted({int(i) for i in self.special})
        if self.special and (self.special[0] < 0 or self.special[-1] >= L):
            raise ValueError(f"ReportData: special positions must lie in [0, {L}), got {self.special}")
        if self.layer_names is not None and len(self.layer_names) != N:
            raise ValueError(f"ReportData: layer_names must have {N} entries, got {len(self.layer_names)}")
        for name in ("entropy", "mean_distance"):
            value = getattr(self, name)
            if value is not None:
                value = _np(value)
                if value.shape != (N, H):
                    raise ValueError(f"ReportData: {name} must be ({N}, {H}), got {value.shape}")
                setattr(self, name, value)
        self.saliency = {str(k): _np(v).reshape(-1) for k, v in self.saliency.items()}
        for name, values in self.saliency.items():
            if values.shape != (L,):
                raise ValueError(f"ReportData: saliency[{name!r}] must be ({L},), got {values.shape}")
        self._check_sections(N, H, L)

    def _check_sections(self, N: int, H: int, L: int) -> None:
        """Sections tile ``[0, L)`` in order; their flow is ``(N, H, S, S)``."""
        self.sections = [
            {"label": str(s.get("label", "")), "title": str(s.get("title", "")), "start": int(s["start"]),
             "end": int(s["end"])}
            for s in self.sections
        ]  # fmt: skip
        if not self.sections:
            if self.section_flow is not None:
                raise ValueError("ReportData: section_flow needs sections")
            return
        ends = [0] + [s["end"] for s in self.sections]
        starts = [s["start"] for s in self.sections] + [L]
        if ends != starts or any(s["end"] <= s["start"] for s in self.sections):
            raise ValueError(
                f"ReportData: sections must be non-empty token spans covering [0, {L}) in order, got "
                f"{[(s['start'], s['end']) for s in self.sections][:8]}..."
            )
        S = len(self.sections)
        if self.section_flow is None:
            raise ValueError(f"ReportData: sections need section_flow ({N}, {H}, {S}, {S})")
        self.section_flow = _np(self.section_flow)
        if self.section_flow.shape != (N, H, S, S):
            raise ValueError(f"ReportData: section_flow must be ({N}, {H}, {S}, {S}), got {self.section_flow.shape}")

    @classmethod
    def from_maps(
        cls,
        tokens: list[str],
        maps: Any,
        *,
        map_budget: int = MAP_BUDGET,
        tiles: int = POOL_TILES,
        topk: int = TOPK,
        **fields: Any,
    ) -> ReportData:
        """Build from full maps ``(N, H, L, L)``: top-k links, and pooled tiles when ``L > map_budget``."""
        m = _np(maps)
        if m.ndim != 4 or m.shape[2:] != (len(tokens), len(tokens)):
            raise ValueError(
                f"ReportData.from_maps: maps must be (layers, H, {len(tokens)}, {len(tokens)}), got {m.shape}"
            )
        index, weight = topk_links(m, topk)
        edges = None
        if len(tokens) > map_budget:
            edges = tile_edges(len(tokens), tiles)
            m = pool_map(m, edges).astype(np.float32)
            note = (
                f"{len(tokens)} tokens is over the report's map budget of {map_budget}: maps are averaged over "
                f"{len(edges) - 1}x{len(edges) - 1} tiles; hover links use each token's "
                f"{index.shape[-1]} strongest keys."
            )
            fields["notes"] = [*fields.get("notes", []), note]
        return cls(list(tokens), m, index, weight, edges=edges, **fields)

    @classmethod
    def from_stats(
        cls,
        tokens: list[str],
        stats: Sequence[Any],
        *,
        maps: Sequence[Any] | None = None,
        skip: set[int] | None = None,
        map_budget: int = MAP_BUDGET,
        **fields: Any,
    ) -> ReportData:
        """Build from one `attnkit.AttentionStats` per layer (batch of one) over ``L = len(tokens)`` tokens.

        The links are the statistics' own top-k (``topk_index``/``topk_weight``); per-head entropy and
        mean distance are averaged over the queries not in ``skip`` (special tokens). The maps are
        ``maps`` (one ``(H, L, L)`` per layer) when given and ``L <= map_budget``, otherwise the
        statistics' pooled maps as mean weight per tile (`AttentionStats.pooled_density`, over its
        `AttentionStats.pool_edges`).
        """
        L = len(tokens)
        index = np.stack([s.topk_index[0].cpu().numpy() for s in stats])  # (N, H, L, k)
        weight = np.stack([s.topk_weight[0].float().cpu().numpy() for s in stats])  # (N, H, L, k)
        queries = np.array([i not in (skip or set()) for i in range(L)])  # (L,)
        entropy = np.stack([s.entropy[0].float().cpu().numpy()[:, queries].mean(-1) for s in stats])  # (N, H)
        distance = np.stack([s.mean_distance[0].float().cpu().numpy()[:, queries].mean(-1) for s in stats])  # (N, H)
        notes = list(fields.pop("notes", []))
        if map_budget >= L and maps is not None:
            m = np.stack([_np(layer_maps) for layer_maps in maps])  # (N, H, L, L)
            edges = None
        else:
            m = np.stack([s.pooled_density()[0].float().cpu().numpy() for s in stats])  # (N, H, P, P)
            edges = stats[0].pool_edges()[0].cpu().numpy()
            notes.append(
                f"{L} tokens is over the report's map budget of {map_budget}: maps are exact weights averaged over "
                f"{len(edges) - 1}x{len(edges) - 1} tiles; hover links use each token's "
                f"{index.shape[-1]} strongest keys."
            )
        return cls(
            list(tokens), m, index, weight, edges=edges, entropy=entropy, mean_distance=distance, notes=notes, **fields
        )

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(layers, heads, tokens)``."""
        return self.maps.shape[0], self.maps.shape[1], len(self.tokens)

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (the format the page reads; `from_dict` reads it back).

        Maps are stored per head as ``round(255 * sqrt(w / max))`` (uint8) with the head's max,
        links as uint16/uint32 indices and ``round(65535 * w)`` (uint16) weights, all deflate + base64.
        The section flow is stored the same way with a peak per row, within ``section_flow_budget``
        (`_encode_section_flow`).
        """
        N, H, L = self.shape
        layer_names = self.layer_names or [f"layer {i}" for i in range(N)]
        P = self.maps.shape[-1]
        quantised, peak = _sqrt_codes(self.maps)  # (N, H, P, P) uint8, (N, H)
        index_dtype = np.uint16 if L <= 65535 else np.uint32
        k = self.topk_index.shape[-1]
        weights = np.round(np.clip(self.topk_weight, 0, 1) * 65535).astype("<u2")
        data = {
            "version": FORMAT_VERSION,
            "title": self.title,
            "model": self.model,
            "notes": list(self.notes),
            "tokens": self.tokens,
            "spacing": self.spacing,
            "special": self.special,
            "layers": N,
            "heads": H,
            "length": L,
            "layer_names": layer_names,
            "map": {
                "size": P,
                "edges": self.edges.tolist() if self.edges is not None else None,
                "peak": np.round(peak, 6).tolist(),
                "data": _b64(quantised.tobytes()),
            },
            "links": {
                "k": k,
                "index_bytes": np.dtype(index_dtype).itemsize,
                "index": _b64(self.topk_index.astype(np.dtype(index_dtype).newbyteorder("<")).tobytes()),
                "weight": _b64(weights.tobytes()),
            },
            "entropy": _rounded(self.entropy),
            "mean_distance": _rounded(self.mean_distance),
            "roles": [_json_row(row) for row in self.roles],
            "role_descriptions": dict(self.role_descriptions),
            "saliency": {name: _rounded(values) for name, values in self.saliency.items()},
            "faithfulness": [_json_row(row) for row in self.faithfulness],
            "sections": [dict(section) for section in self.sections],
            "section_flow": None,
        }
        if self.section_flow is not None:
            # The section flow takes what the rest of the report leaves of REPORT_BUDGET, at most its own budget.
            rest = len(json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8"))
            budget = max(0, min(self.section_flow_budget, REPORT_BUDGET - rest))
            data["section_flow"] = _encode_section_flow(self.section_flow, layer_names, budget)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> ReportData:
        """Read back `to_dict`'s output (maps, link weights and section flow come back quantised; a layer whose
        single heads were left out of the section flow repeats its head average for every head)."""
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"ReportData.from_dict: expected format version {FORMAT_VERSION}, got {data.get('version')}"
            )
        N, H, L, P = data["layers"], data["heads"], data["length"], data["map"]["size"]
        k = data["links"]["k"]
        maps = _from_codes(
            np.frombuffer(_unb64(data["map"]["data"]), dtype=np.uint8).reshape(N, H, P, P), data["map"]["peak"]
        )
        index_dtype = np.dtype("<u2" if data["links"]["index_bytes"] == 2 else "<u4")
        index = np.frombuffer(_unb64(data["links"]["index"]), dtype=index_dtype).reshape(N, H, L, k)
        weight = np.frombuffer(_unb64(data["links"]["weight"]), dtype="<u2").reshape(N, H, L, k) / 65535
        edges = data["map"]["edges"]
        return cls(
            data["tokens"],
            maps,
            index.astype(np.int64),
            weight.astype(np.float32),
            edges=np.asarray(edges) if edges is not None else None,
            spacing=data["spacing"],
            special=data["special"],
            title=data["title"],
            model=data["model"],
            layer_names=data["layer_names"],
            entropy=np.asarray(data["entropy"]) if data["entropy"] is not None else None,
            mean_distance=np.asarray(data["mean_distance"]) if data["mean_distance"] is not None else None,
            roles=data["roles"],
            role_descriptions=data["role_descriptions"],
            saliency={name: np.asarray(v) for name, v in data["saliency"].items()},
            faithfulness=data["faithfulness"],
            notes=data["notes"],
            sections=data.get("sections", []),
            section_flow=_decode_section_flow(data["section_flow"], N, H) if data.get("section_flow") else None,
        )


def _rounded(values: np.ndarray | None) -> list | None:
    if values is None:
        return None
    return np.round(np.asarray(values, dtype=np.float64), 5).tolist()


def _json_value(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, str | int | bool) or value is None:
        return value
    return str(value)


def _json_row(row: dict) -> dict:
    return {str(k): _json_value(v) for k, v in row.items()}


def _asset(name: str) -> str:
    return resources.files("attnkit.viz").joinpath("assets", name).read_text(encoding="utf-8")


def _script_json(data: dict) -> str:
    """JSON that cannot close its ``<script>`` element or open a comment: ``<``, ``>``, ``&``, U+2028/9 escaped."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for raw, escaped in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(raw, escaped)
    return text


def _csp_hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode("utf-8")).digest()).decode("ascii") + "'"


def render_report(data: ReportData) -> str:
    """The report as one HTML document (a string)."""
    css = _asset("report.css")
    js = _asset("report.js")
    policy = (
        "default-src 'none'; "
        f"script-src {_csp_hash(js)}; "
        f"style-src {_csp_hash(css)}; "
        "img-src data: blob:; connect-src 'none'; base-uri 'none'; form-action 'none'"
    )
    page = _asset("report.html")
    parts = {
        "{{CSP}}": html.escape(policy, quote=True),
        "{{TITLE}}": html.escape(data.title),
        "{{CSS}}": css,
        "{{JS}}": js,
        "{{DATA}}": _script_json(data.to_dict()),
    }
    # The placeholders are counted in the template alone, then all substituted in one pass over it,
    # so no substituted text (a title such as "{{JS}}.txt", the data) is ever scanned for placeholders.
    for key in parts:
        if page.count(key) != 1:
            raise RuntimeError(f"render_report: template must contain {key} exactly once")
    pattern = re.compile("|".join(re.escape(key) for key in parts))
    return pattern.sub(lambda m: parts[m.group(0)], page)


def write_report(data: ReportData, path: str | Path) -> Path:
    """Write the report to ``path`` (UTF-8); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(data), encoding="utf-8")
    return path
