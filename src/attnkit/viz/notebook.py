"""Inline views for Jupyter: the offline report, one head, the section flow and the head-role table.

Each view is a small object that IPython displays through its rich-display methods
(``_repr_html_``, and ``_repr_png_`` where a static picture is natural), so the last
expression of a notebook cell shows it. Rendering only, like the rest of `attnkit.viz`:
the views take what `attnkit.inspect` (or `attnkit show`'s analysis) computed.

* `ReportView`: the self-contained report page (`attnkit.viz.render_report`) in an
  ``<iframe srcdoc=...>``: the same page ``attnkit show`` writes, with its own script, style and
  Content-Security-Policy, sandboxed (scripts only: no same-origin access to the notebook),
  offline (nothing is fetched).
* `HeadView`: one head's ``(Lq, Lk)`` map as a heatmap (`attnkit.viz.plots.head_heatmap`), with its
  strongest links written out.
* `FlowView`: the section flow, ``(S, S)``: how much a token of one section attends to each section.
* `RolesView`: every head's role (`attnkit.inspect.head_roles`) as a layer x head table, with a legend.

Every string that comes from the input (tokens, titles, section names, role names) is escaped
with `html.escape` before it reaches the HTML. Figures are embedded as ``data:`` URIs, so no view
refers to anything outside itself.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from attnkit.viz.report import ReportData, render_report

__all__ = ["FlowView", "HeadView", "ReportView", "RolesView"]

# Marks the outer element of each view, so a notebook (or a test) can find it in the output.
MARKER = "attnkit-view"
# Colour of each head role in `RolesView` (roles not listed here are drawn grey).
ROLE_COLOURS = {
    "induction": "#d62728",
    "previous-token": "#ff7f0e",
    "sink": "#7f7f7f",
    "rare-token": "#9467bd",
    "local": "#2ca02c",
    "broad": "#1f77b4",
    "mixed": "#bcbd22",
    "within-section": "#17becf",
    "neighbour-section": "#8c564b",
    "cross-section": "#e377c2",
}


def _e(value: Any) -> str:
    """``value`` as text safe inside HTML content and quoted attributes."""
    return html.escape(str(value), quote=True)


def _array(x: Any, name: str, ndim: int | tuple[int, ...]) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        x = x.detach().to("cpu").float().numpy()
    a = np.asarray(x, dtype=np.float64)
    allowed = (ndim,) if isinstance(ndim, int) else ndim
    if a.ndim not in allowed:
        expected = " or ".join(f"{n}-D" for n in allowed)
        raise ValueError(f"{name} must be {expected}, got shape {a.shape}")
    return a


class ReportView:
    """The whole offline report (`attnkit.viz.render_report`), displayed inline in a notebook.

    ``_repr_html_`` is an ``<iframe>`` whose ``srcdoc`` is the complete page, escaped for a
    double-quoted attribute: the page keeps its own scripts, styles and Content-Security-Policy,
    runs in a sandbox (``allow-scripts`` only: it cannot reach the notebook's page or cookies) and
    fetches nothing, so it works offline. (Jupyter may sanitise the stored HTML outputs of a notebook
    opened from disk until it is trusted; running the cell again shows the report.)

    The notebook stores the page with its outputs: a few hundred kB for a short text, up to the
    report's 15 MB budget for a long document (then `save` the page and open it in a browser instead).

    Args:
        data: what the report shows (`attnkit.viz.ReportData`; ``N`` layers, ``H`` heads, ``L`` tokens).
        height: the frame's height in CSS pixels (the width follows the notebook's output area).
    """

    def __init__(self, data: ReportData, *, height: int = 760):
        if not isinstance(data, ReportData):
            raise TypeError(f"ReportView: data must be an attnkit.viz.ReportData, got {type(data).__name__}")
        if not isinstance(height, int) or height < 100:
            raise ValueError(f"ReportView: height must be an int >= 100 (CSS pixels), got {height!r}")
        self.data = data
        self.height = height
        self._page: str | None = None

    @property
    def page(self) -> str:
        """The report as one HTML document, rendered once (what `save` writes)."""
        if self._page is None:
            self._page = render_report(self.data)
        return self._page

    def save(self, path: str | Path) -> Path:
        """Write the standalone report to ``path`` (UTF-8), as ``attnkit show --out`` does; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.page, encoding="utf-8")
        return path

    def _repr_html_(self) -> str:
        N, H, L = self.data.shape
        label = f"{self.data.title}: {L} tokens, {N} layers x {H} heads"
        return (
            f'<div class="{MARKER} attnkit-report">'
            f'<iframe srcdoc="{_e(self.page)}" sandbox="allow-scripts" title="{_e(label)}" loading="lazy" '
            f'style="width:100%;height:{self.height}px;border:1px solid #ccc;border-radius:4px"></iframe>'
            "</div>"
        )

    def __repr__(self) -> str:
        N, H, L = self.data.shape
        return f"ReportView({self.data.title!r}: {L} tokens, {N} layers x {H} heads)"


class HeadView:
    """One head's attention map: a heatmap (`attnkit.viz.plots.head_heatmap`, matplotlib) and its strongest links.

    Args:
        weights: ``(Lq, Lk)`` attention probabilities (query rows, key columns), or a pooled
            ``(P, P)`` map with ``edges``.
        tokens: ``L`` token strings when ``Lq == Lk == L`` (None: positions are numbered).
        title: shown above the heatmap and in the caption.
        edges: ``(P + 1,)`` token boundaries of a pooled map (`attnkit.viz.ReportData.edges`).
        links: how many of the strongest query -> key weights the caption lists (0: none).
        gamma: the heatmap's colour exponent (``weight ** gamma``).
    """

    def __init__(
        self,
        weights: Any,
        tokens: Sequence[str] | None = None,
        *,
        title: str | None = None,
        edges: Any = None,
        links: int = 5,
        gamma: float = 0.5,
    ):
        self.weights = _array(weights, "HeadView: weights", 2)  # (Lq, Lk) or (P, P)
        Lq, Lk = self.weights.shape
        if tokens is not None:
            tokens = [str(t) for t in tokens]
            if edges is None and not len(tokens) == Lq == Lk:
                raise ValueError(f"HeadView: tokens must have {Lq} entries for a ({Lq}, {Lk}) map, got {len(tokens)}")
        if links < 0:
            raise ValueError(f"HeadView: links must be >= 0, got {links}")
        self.tokens = tokens
        self.title = title
        self.edges = None if edges is None else np.asarray(edges, dtype=np.int64)
        self.links = links
        self.gamma = gamma
        self._png: bytes | None = None

    @classmethod
    def from_report(cls, data: ReportData, layer: int, head: int, **kwargs: Any) -> HeadView:
        """Head ``head`` of layer ``layer`` (both from 0) of a report's maps (full, or pooled with its edges)."""
        N, H, _ = data.shape
        if not (0 <= layer < N and 0 <= head < H):
            raise IndexError(
                f"HeadView.from_report: layer must lie in [0, {N}) and head in [0, {H}), got layer={layer}, head={head}"
            )
        name = (data.layer_names or [f"layer {i}" for i in range(N)])[layer]
        kwargs.setdefault("title", f"{name}, head {head}")
        return cls(data.maps[layer, head], data.tokens, edges=data.edges, **kwargs)

    def figure(self):
        """The heatmap as a ``matplotlib.figure.Figure`` (needs the ``viz`` extra)."""
        from attnkit.viz import plots

        return plots.head_heatmap(self.weights, self.tokens, edges=self.edges, title=self.title, gamma=self.gamma)

    def _repr_png_(self) -> bytes:
        if self._png is None:
            buffer = io.BytesIO()
            self.figure().savefig(buffer, format="png", dpi=100)
            self._png = buffer.getvalue()
        return self._png

    def strongest(self) -> list[tuple[str, str, float]]:
        """The ``links`` largest weights as ``(query, key, weight)``, strongest first (labels: tokens or ranges)."""
        if self.links == 0:
            return []
        w = self.weights
        flat = np.argsort(-w, axis=None, kind="stable")[: self.links]
        rows, cols = np.unravel_index(flat, w.shape)
        return [(self._label(int(i)), self._label(int(j)), float(w[i, j])) for i, j in zip(rows, cols)]

    def _label(self, i: int) -> str:
        if self.edges is not None:
            a, b = int(self.edges[i]), int(self.edges[i + 1])
            return f"tokens {a}–{b - 1}" if b - a > 1 else f"token {a}"
        return f"{self.tokens[i]!r} ({i})" if self.tokens is not None else f"position {i}"

    def _repr_html_(self) -> str:
        png = base64.b64encode(self._repr_png_()).decode("ascii")
        Lq, Lk = self.weights.shape
        what = f"{Lq} x {Lk} pooled tiles" if self.edges is not None else f"{Lq} queries x {Lk} keys"
        caption = f"{_e(self.title)}: {what}" if self.title else what
        items = "".join(f"<li>{_e(q)} → {_e(k)}: {w:.3f}</li>" for q, k, w in self.strongest())
        links = f"<p>Strongest weights (query → key):</p><ol>{items}</ol>" if items else ""
        return (
            f'<figure class="{MARKER} attnkit-head" style="margin:0">'
            f'<img alt="{_e(caption)}" src="data:image/png;base64,{png}" style="max-width:100%">'
            f"<figcaption>{caption}{links}</figcaption></figure>"
        )

    def __repr__(self) -> str:
        return f"HeadView({self.title or 'attention map'!r}, shape={self.weights.shape})"


class FlowView:
    """The section flow as a table: cell ``[a, b]`` is the mean attention a token of section ``a`` pays to ``b``.

    Args:
        flow: ``(S, S)``, or ``(H, S, S)`` per head, or ``(N, H, S, S)`` per layer and head
            (`attnkit.viz.ReportData.section_flow`), averaged here over layers and heads (each head counts the same).
        sections: ``S`` sections, as `attnkit.viz.ReportData.sections` dicts (``label``, ``title``) or strings.
        title: shown above the table.
        digits: decimals of each cell.

    Each cell's shade is its value over the table's largest one (a square-root scale, as the report's).
    """

    def __init__(self, flow: Any, sections: Sequence[Any], *, title: str | None = None, digits: int = 2):
        f = _array(flow, "FlowView: flow", (2, 3, 4))
        S = f.shape[-1]
        if f.shape[-2] != S:
            raise ValueError(f"FlowView: flow must end in a square (S, S), got {f.shape}")
        f = f.reshape(-1, S, S).mean(axis=0)  # (S, S): the mean over layers and heads (each counts the same)
        if len(sections) != S:
            raise ValueError(f"FlowView: sections must have {S} entries for a {S}x{S} flow, got {len(sections)}")
        self.flow = f
        self.names = [self._name(s, i) for i, s in enumerate(sections)]
        self.title = title
        self.digits = digits

    @staticmethod
    def _name(section: Any, i: int) -> str:
        if isinstance(section, dict):
            label, title = str(section.get("label", "")), str(section.get("title", ""))
            return " ".join(part for part in (label, title) if part) or f"section {i}"
        return str(section)

    @classmethod
    def from_report(cls, data: ReportData, *, layer: int | None = None, head: int | None = None, **kwargs: Any):
        """A report's section flow: all layers and heads averaged, one ``layer``, or one ``head`` of that layer."""
        if data.section_flow is None:
            raise ValueError("FlowView.from_report: this report has no sections (ReportData.sections is empty)")
        N, H, _ = data.shape
        flow = data.section_flow  # (N, H, S, S)
        where = "all layers and heads"
        if layer is not None:
            if not 0 <= layer < N:
                raise IndexError(f"FlowView.from_report: layer must lie in [0, {N}), got {layer}")
            flow, where = flow[layer], f"layer {layer}, heads averaged"
            if head is not None:
                if not 0 <= head < H:
                    raise IndexError(f"FlowView.from_report: head must lie in [0, {H}), got {head}")
                flow, where = flow[head], f"layer {layer}, head {head}"
        elif head is not None:
            raise ValueError("FlowView.from_report: head needs layer")
        kwargs.setdefault("title", f"Section flow ({where})")
        return cls(flow, data.sections, **kwargs)

    def _repr_html_(self) -> str:
        peak = float(self.flow.max()) if self.flow.size else 0.0
        head = "".join(f'<th title="{_e(n)}" style="{_TH}">{_e(_short(n))}</th>' for n in self.names)
        rows = []
        for name, values in zip(self.names, self.flow):
            cells = "".join(_shade(v, peak, self.digits) for v in values)
            label = f'<th title="{_e(name)}" style="{_TH};text-align:left">{_e(_short(name, 40))}</th>'
            rows.append(f"<tr>{label}{cells}</tr>")
        caption = f"<caption>{_e(self.title)}</caption>" if self.title else ""
        return (
            f'<div class="{MARKER} attnkit-flow" style="overflow-x:auto">'
            f'<table style="border-collapse:collapse;font-size:12px">{caption}'
            f'<tr><th style="{_TH}">reader \\ source</th>{head}</tr>{"".join(rows)}</table>'
            '<p style="font-size:12px">Row: the section whose tokens attend; column: the section they attend to. '
            "A row sums to 1 (special tokens aside).</p></div>"
        )

    def __repr__(self) -> str:
        return f"FlowView({len(self.names)} sections)"


_TH = "padding:2px 6px;border:1px solid #ddd;font-weight:600"


def _short(text: str, n: int = 14) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _shade(value: float, peak: float, digits: int) -> str:
    strength = math.sqrt(max(value, 0.0) / peak) if peak > 0 else 0.0
    colour = "#fff" if strength > 0.6 else "#000"
    return (
        f'<td style="padding:2px 6px;border:1px solid #ddd;text-align:right;color:{colour};'
        f'background:rgba(31,119,180,{strength:.3f})">{value:.{digits}f}</td>'
    )


class RolesView:
    """Every head's role as a layer x head table, with the number of heads and a description per role.

    Args:
        rows: one dict per head with ``layer`` (an index or a layer name), ``head`` and ``role``
            (`attnkit.inspect.HeadRoles.rows`, or `attnkit.viz.ReportData.roles`); a ``scores`` dict
            or score keys, when present, show when the pointer rests on a cell.
        descriptions: one line per role (default `attnkit.inspect.ROLE_DESCRIPTIONS`).
        title: shown above the table.
    """

    SCORES = ("entropy_norm", "mean_distance", "locality", "previous_token", "sink", "induction")

    def __init__(self, rows: Sequence[dict], *, descriptions: dict[str, str] | None = None, title: str | None = None):
        if not rows:
            raise ValueError("RolesView: rows is empty (no head was scored)")
        for key in ("layer", "head", "role"):
            if any(key not in row for row in rows):
                raise ValueError(f"RolesView: every row needs 'layer', 'head' and 'role'; a row lacks {key!r}")
        if descriptions is None:
            from attnkit.inspect import ROLE_DESCRIPTIONS

            descriptions = dict(ROLE_DESCRIPTIONS)
        self.rows = list(rows)
        self.descriptions = dict(descriptions)
        self.title = title
        self.layers = list(dict.fromkeys(row["layer"] for row in self.rows))  # in recording order
        self.heads = max(int(row["head"]) for row in self.rows) + 1

    @classmethod
    def from_head_roles(cls, roles: Any, **kwargs: Any) -> RolesView:
        """From `attnkit.inspect.head_roles`'s result (`attnkit.inspect.HeadRoles`)."""
        return cls(roles.rows, **kwargs)

    @classmethod
    def from_report(cls, data: ReportData, **kwargs: Any) -> RolesView:
        """From a report's role rows and descriptions (`attnkit.viz.ReportData.roles`)."""
        kwargs.setdefault("descriptions", data.role_descriptions or None)
        return cls(data.roles, **kwargs)

    def counts(self) -> dict[str, int]:
        """How many heads have each role, most first."""
        out: dict[str, int] = {}
        for row in self.rows:
            out[str(row["role"])] = out.get(str(row["role"]), 0) + 1
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def _tip(self, row: dict) -> str:
        scores = row.get("scores") or {k: row[k] for k in self.SCORES if k in row}
        finite = {name: v for name, v in scores.items() if isinstance(v, float) and math.isfinite(v)}
        parts = [f"{name}: {value:.2f}" for name, value in finite.items()]
        return f"layer {row['layer']}, head {row['head']}: {row['role']}" + ("; " + ", ".join(parts) if parts else "")

    def _repr_html_(self) -> str:
        grid: dict[tuple[Any, int], dict] = {(row["layer"], int(row["head"])): row for row in self.rows}
        head = "".join(f'<th style="{_TH}">H{h}</th>' for h in range(self.heads))
        body = []
        for layer in self.layers:
            name = f"layer {layer}" if isinstance(layer, int) else str(layer)
            cells = []
            for h in range(self.heads):
                row = grid.get((layer, h))
                if row is None:
                    cells.append('<td style="border:1px solid #ddd"></td>')
                    continue
                role = str(row["role"])
                cells.append(
                    f'<td title="{_e(self._tip(row))}" style="padding:2px 4px;border:1px solid #ddd;color:#fff;'
                    f'background:{ROLE_COLOURS.get(role, "#555")};text-align:center">{_e(role)}</td>'
                )
            body.append(f'<tr><th style="{_TH};text-align:left">{_e(name)}</th>{"".join(cells)}</tr>')
        legend = "".join(
            f'<li><span style="color:{ROLE_COLOURS.get(role, "#555")}">■</span> <b>{_e(role)}</b> ({n}): '
            f"{_e(self.descriptions.get(role, ''))}</li>"
            for role, n in self.counts().items()
        )
        caption = f"<caption>{_e(self.title)}</caption>" if self.title else ""
        return (
            f'<div class="{MARKER} attnkit-roles" style="overflow-x:auto">'
            f'<table style="border-collapse:collapse;font-size:11px">{caption}<tr><th style="{_TH}"></th>{head}</tr>'
            f'{"".join(body)}</table><ul style="font-size:12px;list-style:none;padding-left:0">{legend}</ul></div>'
        )

    def __repr__(self) -> str:
        return f"RolesView({len(self.rows)} heads: {self.counts()})"
