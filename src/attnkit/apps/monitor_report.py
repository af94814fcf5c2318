"""``attnkit monitor-report LOGDIR``: how the heads' roles evolved over training, from a `Monitor`'s CSV.

Reads ``LOGDIR/heads.csv`` (and ``LOGDIR/steps.csv`` when present), written by
`attnkit.inspect.Monitor`, and draws one figure (PNG, and an HTML page holding it with a
table):

* reach over training: one row per head, one column per monitored step, coloured local /
  middle / long-range (``near_share >= 0.5`` / ``far_share >= 0.5``);
* role over training: the same grid with the head role of `attnkit.inspect.head_roles`;
* the near and far shares, the entropy and the mean distance of every head against the step;
* the speed vs memory the engineer watches: attention time, step time and peak memory.

The text lists when each head settled: the first monitored step from which its reach (and
its role) stayed the same to the end of the log.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import math
from pathlib import Path
from typing import Any

from attnkit.apps.checks import UsageError, check_output_file, main_for, require_module

HELP = "draw how the heads' roles evolved over training, from an attnkit.inspect.Monitor log folder"

REACH_COLOURS = {"local": "#1f77b4", "middle": "#c7c7c7", "long-range": "#ff7f0e", "none": "#ffffff"}
ROLE_COLOURS = {
    "local": "#1f77b4", "broad": "#ff7f0e", "sink": "#7f7f7f", "previous-token": "#2ca02c",
    "induction": "#d62728", "rare-token": "#9467bd", "mixed": "#dbdb8d",
}  # fmt: skip


def read_log(logdir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(heads, steps)`` rows of a monitor log, numbers parsed (``steps`` empty without steps.csv)."""
    heads_csv = logdir / "heads.csv"
    if not heads_csv.is_file():
        raise UsageError(f"LOGDIR {str(logdir)!r} holds no heads.csv; pass the logdir given to attnkit.inspect.Monitor")

    def parse(row: dict[str, str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, text in row.items():
            try:
                out[key] = int(text) if key in ("step", "head", "batch", "length") else float(text)
            except (TypeError, ValueError):
                out[key] = text
        return out

    with open(heads_csv, newline="") as f:
        heads = [parse(r) for r in csv.DictReader(f)]
    if not heads:
        raise UsageError(f"{str(heads_csv)!r} has no rows yet: the monitor has not logged a step")
    steps: list[dict[str, Any]] = []
    if (logdir / "steps.csv").is_file():
        with open(logdir / "steps.csv", newline="") as f:
            steps = [parse(r) for r in csv.DictReader(f)]
    return heads, steps


def settled(heads: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """Per head (in log order): its last ``key`` label and the first step from which it held to the end."""
    series: dict[tuple[str, int], list[tuple[int, str]]] = {}
    for r in heads:
        series.setdefault((r["layer"], r["head"]), []).append((r["step"], r[key]))
    out = []
    for (layer, head), points in series.items():
        points.sort()
        label = points[-1][1]
        since = points[-1][0]
        for step, value in reversed(points):
            if value != label:
                break
            since = step
        out.append({"layer": layer, "head": head, "label": label, "since": since, "first": points[0][1]})
    return out


def _grid(heads: list[dict[str, Any]], key: str) -> tuple[list[str], list[int], list[list[str]]]:
    """``(head names, steps, labels[head][step])`` for the label ``key``."""
    steps = sorted({r["step"] for r in heads})
    names: dict[tuple[str, int], dict[int, str]] = {}
    for r in heads:
        names.setdefault((r["layer"], r["head"]), {})[r["step"]] = r[key]
    labels = [[cells.get(s, "none") for s in steps] for cells in names.values()]
    return [f"{layer} h{head}" for layer, head in names], steps, labels


def draw(heads: list[dict[str, Any]], steps: list[dict[str, Any]], png: Path) -> None:
    """Write the report's figure to ``png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    names, columns, _ = _grid(heads, "reach")
    n_heads = len(names)
    fig, axes = plt.subplots(
        4, 2, figsize=(13, 6.5 + 0.45 * n_heads), gridspec_kw={"height_ratios": [max(n_heads, 3) / 3, 1, 1, 1]}
    )
    for ax, key, colours, title in (
        (axes[0, 0], "reach", REACH_COLOURS, "reach over training (local: near_share >= 0.5; long-range: far >= 0.5)"),
        (axes[0, 1], "role", ROLE_COLOURS, "head role over training (attnkit.inspect.head_roles)"),
    ):
        _, _, labels = _grid(heads, key)
        seen = [c for c in colours if any(c in row for row in labels)] or list(colours)[:1]
        index = {c: i for i, c in enumerate(seen)}
        ax.imshow(
            [[index.get(v, 0) for v in row] for row in labels], aspect="auto", interpolation="nearest",
            cmap=ListedColormap([colours[c] for c in seen]), vmin=-0.5, vmax=len(seen) - 0.5,
        )  # fmt: skip
        ax.set_yticks(range(n_heads), names, fontsize=8)
        ticks = list(range(0, len(columns), max(1, len(columns) // 8)))
        ax.set_xticks(ticks, [str(columns[t]) for t in ticks], fontsize=8)
        ax.set_xlabel("step")
        ax.set_title(title, fontsize=9)
        ax.legend(handles=[Patch(color=colours[c], label=c) for c in seen], fontsize=7, loc="upper left",
                  bbox_to_anchor=(1.0, 1.0))  # fmt: skip
    panels = {"near_share": axes[1, 0], "far_share": axes[1, 1], "entropy": axes[2, 0], "mean_distance": axes[2, 1]}
    series: dict[str, dict[str, list[tuple[int, float]]]] = {key: {} for key in panels}
    for r in heads:
        for key in series:
            series[key].setdefault(f"{r['layer']} h{r['head']}", []).append((r["step"], r[key]))
    for key, ax in panels.items():
        for name, points in series[key].items():
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], lw=1, marker=".", ms=3, label=name)
        if key.endswith("_share"):
            ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("step")
        ax.set_title(f"{key} per head" + (" (nats)" if key == "entropy" else ""), fontsize=9)
    if n_heads <= 16:
        axes[1, 1].legend(fontsize=6, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax_time, ax_mem = axes[3, 0], axes[3, 1]
    if steps:
        x = [s["step"] for s in steps]
        for key in ("step_ms", "attention_ms", "attention_forward_ms", "attention_backward_ms"):
            ax_time.plot(x, [s[key] for s in steps], marker=".", lw=1, label=key)
        ax_time.set_ylabel("ms")
        ax_time.legend(fontsize=7)
        ax_mem.plot(x, [s["peak_memory_mib"] for s in steps], marker=".", color="#d62728")
        ax_mem.set_ylabel(f"peak MiB ({steps[0]['memory_source']})")
    else:
        for ax in (ax_time, ax_mem):
            ax.text(0.5, 0.5, "no steps.csv", ha="center", va="center", transform=ax.transAxes)
    ax_time.set_title("time per monitored step", fontsize=9)
    ax_mem.set_title("peak memory per monitored step", fontsize=9)
    for ax in (ax_time, ax_mem):
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def summary_lines(heads: list[dict[str, Any]]) -> list[str]:
    """One line per head: its reach and role at the end and since when."""
    roles = {(r["layer"], r["head"]): r for r in settled(heads, "role")}
    last = max(r["step"] for r in heads)
    final = {(r["layer"], r["head"]): r for r in heads if r["step"] == last}
    start = min(r["step"] for r in heads)
    lines = []
    for r in settled(heads, "reach"):
        role = roles[(r["layer"], r["head"])]
        f = final.get((r["layer"], r["head"]), {})
        near, far = f.get("near_share", math.nan), f.get("far_share", math.nan)
        became = "from the start" if r["since"] == start else f"since step {r['since']}"
        lines.append(
            f"{r['layer']} head {r['head']}: {r['label']} {became} (near {near:.2f}, far {far:.2f}); "
            f"role {role['label']} since step {role['since']}"
        )
    return lines


def write_html(path: Path, png: Path, lines: list[str], logdir: Path) -> None:
    data = base64.b64encode(png.read_bytes()).decode()
    items = "\n".join(f"<li>{html.escape(line)}</li>" for line in lines)
    path.write_text(
        "<!doctype html><meta charset='utf-8'><title>attnkit monitor report</title>"
        "<style>body{font-family:sans-serif;max-width:1300px;margin:2em auto}li{font-family:monospace}</style>"
        f"<h1>Attention heads over training</h1><p>Log: {html.escape(str(logdir))}</p>"
        f"<img alt='heads over training' style='max-width:100%' src='data:image/png;base64,{data}'>"
        f"<h2>When each head settled</h2><ul>{items}</ul>"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("logdir", metavar="LOGDIR", help="the folder given to attnkit.inspect.Monitor(logdir=...)")
    parser.add_argument("--png", default=None, help="figure path (default: LOGDIR/monitor-report.png)")
    parser.add_argument("--html", default=None, help="HTML page path (default: LOGDIR/monitor-report.html)")


def run(args: argparse.Namespace) -> int:
    logdir = Path(args.logdir)
    if not logdir.is_dir():
        raise UsageError(f"LOGDIR {args.logdir!r} is not a folder")
    png = check_output_file(args.png or logdir / "monitor-report.png", "--png")
    page = check_output_file(args.html or logdir / "monitor-report.html", "--html")
    require_module("matplotlib", "the figure", "pip install 'attnkit[monitor]'")
    heads, steps = read_log(logdir)
    png.parent.mkdir(parents=True, exist_ok=True)
    page.parent.mkdir(parents=True, exist_ok=True)
    draw(heads, steps, png)
    lines = summary_lines(heads)
    write_html(page, png, lines, logdir)
    print("\n".join(lines))
    print(f"wrote {png} and {page}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return main_for("attnkit monitor-report", HELP, add_arguments, run, argv)
