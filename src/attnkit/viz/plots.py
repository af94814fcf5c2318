"""Static pictures of attention (matplotlib, imported lazily): heatmaps, head grids, head scatter, token strips.

Every function takes plain arrays (numpy or torch, any float dtype) and returns a
``matplotlib.figure.Figure`` without touching pyplot's global state, so they are safe in
servers and tests. `save` writes PNG or SVG by the path's suffix.

Long inputs: a map wider than ``pool_above`` tokens is averaged over square tiles
(`pool_map`), and the axes name the token range of each tile instead of a token.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from attnkit.kernels.stats import pool_edges

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = [
    "entropy_distance",
    "head_grid",
    "head_heatmap",
    "pool_map",
    "save",
    "tile_edges",
    "token_strip",
]

# Above this many tokens a heatmap is drawn as pooled tiles (labels stop being readable long before).
POOL_ABOVE = 256
# Tiles per side when a heatmap is pooled.
HEATMAP_TILES = 64
# At most this many tick labels per axis.
MAX_LABELS = 64


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - exercised only without matplotlib
        raise ImportError("attnkit.viz needs matplotlib: pip install 'attnkit[viz]'") from err
    return Figure


def _array(x: Any, name: str, ndim: int) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor
        x = x.detach().to("cpu").float().numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    return a


def tile_edges(length: int, tiles: int) -> np.ndarray:
    """Token boundaries of ``P = min(tiles, length)`` near-equal tiles over ``length`` tokens: shape ``(P + 1,)``.

    Tile ``t`` covers tokens ``edges[t] <= i < edges[t + 1]``, with ``edges[t] = floor(t * length / P)``:
    the statistics' tiles (`attnkit.AttentionStats.pool_edges`), so a map pooled here and one
    pooled by `attnkit.attention_stats` cover the same tokens.
    """
    if length < 1 or tiles < 1:
        raise ValueError(f"tile_edges: length and tiles must be >= 1, got length={length}, tiles={tiles}")
    return pool_edges(length, min(tiles, length), torch.device("cpu")).numpy()


def pool_map(weights: Any, edges: np.ndarray) -> np.ndarray:
    """Mean attention weight over square tiles.

    Args:
        weights: ``(..., Lq, Lk)`` with ``Lq == Lk == edges[-1]``.
        edges: ``(P + 1,)`` tile boundaries from `tile_edges`.

    Returns:
        ``(..., P, P)``: entry ``[s, t]`` is the mean weight from query tile ``s`` to key tile ``t``
        (so each pooled row still sums to one once multiplied by the key tile sizes). Over
        `tile_edges` this is `attnkit.AttentionStats.pooled_density` of the same map: the
        statistics' ``pooled`` (sums) divided by each tile's number of pairs.
    """
    w = np.asarray(weights.detach().cpu().numpy() if hasattr(weights, "detach") else weights, dtype=np.float64)
    edges = np.asarray(edges, dtype=np.int64)
    if w.shape[-1] != edges[-1] or w.shape[-2] != edges[-1]:
        raise ValueError(f"pool_map: weights {w.shape} do not match tile edges ending at {edges[-1]}")
    sizes = np.diff(edges).astype(np.float64)  # (P,)
    summed = np.add.reduceat(np.add.reduceat(w, edges[:-1], axis=-1), edges[:-1], axis=-2)  # (..., P, P)
    return summed / sizes[:, None] / sizes[None, :]


def _tile_labels(edges: np.ndarray) -> list[str]:
    return [f"{a}–{b - 1}" if b - a > 1 else str(a) for a, b in itertools.pairwise(edges)]


def _ticks(labels: Sequence[str], limit: int) -> tuple[np.ndarray, list[str]]:
    step = max(1, int(np.ceil(len(labels) / limit)))
    idx = np.arange(0, len(labels), step)
    return idx, [labels[i] for i in idx]


def head_heatmap(
    weights: Any,
    tokens: Sequence[str] | None = None,
    *,
    edges: Any = None,
    pool_above: int = POOL_ABOVE,
    tiles: int = HEATMAP_TILES,
    title: str | None = None,
    gamma: float = 0.5,
    figsize: tuple[float, float] = (7.0, 6.0),
) -> Figure:
    """One head's attention map, queries down, keys across, with token (or tile-range) labels.

    Args:
        weights: ``(Lq, Lk)`` attention probabilities, or an already pooled ``(P, P)`` map
            when ``edges`` is given.
        tokens: ``Lq`` labels (used when ``Lq == Lk``); None numbers the positions.
        edges: ``(P + 1,)`` token boundaries of a pooled map; the axes show the ranges.
        pool_above: maps with more tokens than this are pooled into ``tiles`` tiles per side.
        gamma: colour scale exponent (``weight ** gamma``); 0.5 keeps diffuse heads visible.
    """
    w = _array(weights, "weights", 2)
    if edges is None and w.shape[0] == w.shape[1] and w.shape[0] > pool_above:
        edges = tile_edges(w.shape[0], tiles)
        w = pool_map(w, edges)
    if edges is not None:
        edges = np.asarray(edges, dtype=np.int64)
        if w.shape != (len(edges) - 1, len(edges) - 1):
            raise ValueError(f"head_heatmap: pooled weights {w.shape} do not match {len(edges) - 1} tiles")
        ylabels = xlabels = _tile_labels(edges)
        axis_name = "token range"
    else:
        if tokens is not None and len(tokens) == w.shape[0] == w.shape[1]:
            ylabels = xlabels = [str(t) for t in tokens]
        else:
            ylabels = [str(i) for i in range(w.shape[0])]
            xlabels = [str(i) for i in range(w.shape[1])]
        axis_name = "token"
    fig = _figure_class()(figsize=figsize, layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(np.clip(w, 0, None) ** gamma, cmap="viridis", aspect="auto", interpolation="nearest")
    yi, yl = _ticks(ylabels, MAX_LABELS)
    xi, xl = _ticks(xlabels, MAX_LABELS)
    small = 6 if max(len(yl), len(xl)) > 24 else 8
    ax.set_yticks(yi, yl, fontsize=small)
    ax.set_xticks(xi, xl, fontsize=small, rotation=90)
    ax.set_ylabel(f"query {axis_name}")
    ax.set_xlabel(f"key {axis_name}")
    bar = fig.colorbar(image, ax=ax, shrink=0.8)
    label = "mean weight per tile" if edges is not None else "weight"
    bar.set_label(f"({label}) ** {gamma:g}" if gamma != 1 else label)
    if title:
        ax.set_title(title)
    return fig


def head_grid(
    maps: Any,
    *,
    layer_names: Sequence[str] | None = None,
    gamma: float = 0.5,
    title: str | None = None,
    cell: float = 0.9,
    thumb: int = 64,
) -> Figure:
    """The layer x head grid of thumbnails, drawn as one mosaic image (fast for 100+ heads).

    Args:
        maps: ``(layers, H, P, P)`` full or pooled maps; each thumbnail is scaled to its own maximum
            and averaged down to at most ``thumb`` pixels a side.
        layer_names: one label per row; default ``L0, L1, ...``.
    """
    m = np.clip(_array(maps, "maps", 4), 0, None)
    n_layers, n_heads, P, _ = m.shape
    if thumb < P:
        m = pool_map(m, tile_edges(P, thumb))  # (layers, H, thumb, thumb)
        P = m.shape[-1]
    peak = m.max(axis=(-1, -2), keepdims=True)
    m = (m / np.where(peak > 0, peak, 1.0)) ** gamma
    gap = max(1, P // 12)
    mosaic = np.full((n_layers * (P + gap) - gap, n_heads * (P + gap) - gap), np.nan)
    for layer in range(n_layers):
        for head in range(n_heads):
            r, c = layer * (P + gap), head * (P + gap)
            mosaic[r : r + P, c : c + P] = m[layer, head]
    names = list(layer_names) if layer_names is not None else [f"L{i}" for i in range(n_layers)]
    fig = _figure_class()(figsize=(cell * n_heads + 1.6, cell * n_layers + 0.9), layout="constrained")
    ax = fig.add_subplot()
    ax.imshow(np.ma.masked_invalid(mosaic), cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    centres = np.arange(max(n_layers, n_heads)) * (P + gap) + (P - 1) / 2
    ax.set_xticks(centres[:n_heads], [f"H{h}" for h in range(n_heads)], fontsize=8)
    ax.set_yticks(centres[:n_layers], names, fontsize=8)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    ax.set_title(title or "every head, scaled to its own maximum", fontsize=10)
    return fig


def entropy_distance(
    entropy: Any,
    mean_distance: Any,
    *,
    title: str | None = None,
    figsize: tuple[float, float] = (6.5, 4.5),
) -> Figure:
    """Each head's mean attention entropy against its mean attention distance, coloured by layer.

    Mean attention distance (the weighted mean of ``|i - j|`` in tokens) is the measure
    Dosovitskiy et al. plot per head and depth in the ViT paper (arXiv:2010.11929, fig. 7):
    low values are local heads, high values long-range ones; low entropy marks a focused head.

    Args:
        entropy: ``(layers, H)`` mean entropy in nats.
        mean_distance: ``(layers, H)`` mean distance in tokens.
    """
    e = _array(entropy, "entropy", 2)
    d = _array(mean_distance, "mean_distance", 2)
    if e.shape != d.shape:
        raise ValueError(f"entropy_distance: entropy {e.shape} and mean_distance {d.shape} must match")
    fig = _figure_class()(figsize=figsize, layout="constrained")
    ax = fig.add_subplot()
    n_layers, n_heads = e.shape
    layer_of = np.repeat(np.arange(n_layers), n_heads)
    points = ax.scatter(d.ravel(), e.ravel(), c=layer_of, cmap="plasma", s=28, edgecolors="black", linewidths=0.3)
    ax.set_xlabel("mean attention distance (tokens)")
    ax.set_ylabel("mean attention entropy (nats)")
    ax.grid(alpha=0.3)
    bar = fig.colorbar(points, ax=ax, ticks=np.arange(n_layers))
    bar.set_label("layer")
    ax.set_title(title or "Heads: focus against reach")
    return fig


def token_strip(
    tokens: Sequence[str],
    values: Any,
    *,
    title: str | None = None,
    per_line: int = 16,
    max_tokens: int = 512,
    cmap: str = "Reds",
) -> Figure:
    """Tokens in reading order, each on a cell coloured by ``values`` (rollout, received attention, saliency).

    Args:
        tokens: ``L`` strings.
        values: ``(L,)`` non-negative scores; scaled to their maximum.
        per_line: tokens per row.
        max_tokens: only the first ``max_tokens`` are drawn (the title says so).
    """
    v = _array(values, "values", 1)
    if len(tokens) != v.shape[0]:
        raise ValueError(f"token_strip: {len(tokens)} tokens but values has shape {v.shape}")
    shown = min(len(tokens), max_tokens)
    v = v[:shown]
    peak = np.abs(v).max()
    scaled = np.abs(v) / peak if peak > 0 else v
    rows = int(np.ceil(shown / per_line))
    figure = _figure_class()(figsize=(per_line * 0.75, rows * 0.32 + 0.7), layout="constrained")
    ax = figure.add_subplot()
    ax.set_xlim(0, per_line)
    ax.set_ylim(rows, 0)
    ax.axis("off")
    import matplotlib

    colours = matplotlib.colormaps[cmap]
    for i in range(shown):
        row, col = divmod(i, per_line)
        rgba = colours(0.05 + 0.9 * float(scaled[i]))
        ax.add_patch(matplotlib.patches.Rectangle((col, row), 0.96, 0.9, color=rgba))
        text = str(tokens[i])
        text = text if len(text) <= 10 else text[:9] + "…"
        dark = scaled[i] > 0.55
        ax.text(col + 0.48, row + 0.47, text, ha="center", va="center", fontsize=7, color="white" if dark else "black")
    label = title or "token scores"
    if shown < len(tokens):
        label += f" (first {shown} of {len(tokens)} tokens)"
    ax.set_title(label, fontsize=9)
    return figure


def save(figure: Figure, path: str | Path, *, dpi: int = 120) -> Path:
    """Write ``figure`` as PNG or SVG, chosen by the suffix of ``path``; returns the path."""
    path = Path(path)
    if path.suffix.lower() not in (".png", ".svg"):
        raise ValueError(f"save: path must end in .png or .svg, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    return path
