"""The glossary's "At a Glance" table, regenerated from measurements, plus the detail tables
and the plots.

Input is the results dict the command builds (see `attnkit.apps.compare.command`):
``accuracy`` rows ``{task, distance, model, accuracy, chance, ...}``, ``speed`` rows
``{task, model, length, step_s, tokens_per_s, train_peak_bytes, ...}`` (or ``error``),
``gradient`` rows ``{task, model, when, distance, grad_norm}``, ``complexity`` rows.
Every verdict is derived from those numbers; where a claim does not hold, the table says so.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = ["glance_rows", "markdown", "plot_all"]

SELF, LSTM, ENCDEC, DECONLY = "self-attention", "LSTM", "encoder-decoder", "decoder-only"
SOLVED = 0.95  # accuracy that counts as "captured"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def _mib(x: float | None) -> str:
    return "–" if x is None else f"{x / 2**20:.1f} MiB"


def _rate(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x / 1000:.1f}k tok/s" if x >= 1000 else f"{x:.0f} tok/s"


def _acc(results: dict, task: str, model: str) -> dict[int, float]:
    return {r["distance"]: r["accuracy"] for r in results["accuracy"] if r["task"] == task and r["model"] == model}


def _speed(results: dict, task: str, model: str) -> dict[int, dict]:
    return {r["length"]: r for r in results["speed"] if r["task"] == task and r["model"] == model}


def _grad_ratio(results: dict, task: str, model: str, when: str) -> tuple[int, float] | None:
    """``(d, g(d) / g(1))``: the gradient reaching the task's distance ``d`` against the one reaching
    the previous position (distance 0 is the scored position itself, which every model reads
    through its residual or input path, so it is not the reference)."""
    rows = [r for r in results["gradient"] if r["task"] == task and r["model"] == model and r["when"] == when]
    if not rows:
        return None
    row = max(rows, key=lambda r: r["d"])
    by_d = dict(zip(row["distance"], row["grad_norm"]))
    d = row["d"] if row["d"] in by_d else max(by_d)
    if not by_d.get(1):
        return None
    return d, by_d[d] / by_d[1]


def _slope(points: dict[int, float]) -> float | None:
    """Log-log slope between the two longest lengths (the growth exponent: 1 linear, 2 quadratic)."""
    pts = sorted((n, v) for n, v in points.items() if v and v > 0)
    if len(pts) < 2:
        return None
    (n0, v0), (n1, v1) = pts[-2], pts[-1]
    return math.log(v1 / v0) / math.log(n1 / n0)


def _distances(acc: dict[int, float]) -> str:
    return ", ".join(f"d={d}: {_pct(a)}" for d, a in sorted(acc.items())) or "not measured"


def glance_rows(results: dict) -> list[dict[str, str]]:
    """The regenerated "At a Glance" rows: ``{aspect, self-attention, LSTM, cross-attention, verdict}``."""
    rows: list[dict[str, str]] = []
    ok = {r["length"] for r in results["speed"] if "error" not in r}
    n_max = max(ok) if ok else None

    # 1. how it relates positions: Table 1 of Vaswani et al. beside the lengths measured
    n = n_max or 0
    rows.append(
        {
            "aspect": "How it relates positions",
            SELF: f"every position to every earlier one in one step: 1 sequential op, path 1 per layer (at L={n})",
            LSTM: f"step by step through the hidden state: {n} sequential ops, path {n} per layer (at L={n})",
            "cross-attention": "each target position reads the whole source in one step: path 1",
            "verdict": "holds (by construction; Vaswani et al. 2017, Table 1)",
        }
    )

    # 2. long-range dependencies: retrieval accuracy by distance, gradient reaching distance d
    sa, ls = _acc(results, "retrieval", SELF), _acc(results, "retrieval", LSTM)
    ed, do = _acc(results, "lookup", ENCDEC), _acc(results, "lookup", DECONLY)
    chance = next((r["chance"] for r in results["accuracy"] if r["task"] == "retrieval"), None)
    g_sa, g_ls = _grad_ratio(results, "retrieval", SELF, "init"), _grad_ratio(results, "retrieval", LSTM, "init")
    grad_sa, grad_ls = _grad_text(g_sa), _grad_text(g_ls)
    long_d = [d for d in sa if d >= 512]
    verdicts = []
    for d in sorted(long_d):
        if d in ls:
            holds = sa[d] >= SOLVED and ls[d] < SOLVED
            verdicts.append(
                f"d={d}: {'holds' if holds else 'does not hold'} (self-attention {_pct(sa[d])}, LSTM {_pct(ls[d])})"
            )
    fails = [d for d, a in sorted(sa.items()) if a < SOLVED]
    lstm_ok = [d for d, a in sorted(ls.items()) if a >= SOLVED]
    notes = []
    if fails:
        notes.append(f"self-attention below {_pct(SOLVED)} at d={', '.join(map(str, fails))}")
    if lstm_ok:
        notes.append(f"the LSTM solved d={', '.join(map(str, lstm_ok))}")
    if ls and ls[min(ls)] < SOLVED:
        notes.append(
            f"the LSTM did not solve retrieval even at d={min(ls)} with this budget and number of steps, so its "
            "accuracy does not isolate the effect of distance (the gradient probe does)"
        )
    both = sorted(set(ed) & set(do))
    if both:
        d = both[-1]
        if ed[d] >= SOLVED and do[d] >= SOLVED:
            pair = "both solve it: at this budget cross-attention is not needed, concatenation works too"
        elif ed[d] > do[d]:
            pair = "cross-attention does better"
        else:
            pair = "the decoder-only model does as well or better: the claim does not hold here"
        notes.append(f"two sequences at d={d}: encoder-decoder {_pct(ed[d])}, decoder-only {_pct(do[d])}; {pair}")
    rows.append(
        {
            "aspect": "Long-range dependencies (retrieval accuracy; chance " + _pct(chance) + ")",
            SELF: _distances(sa) + grad_sa,
            LSTM: _distances(ls) + grad_ls,
            "cross-attention": f"two-sequence lookup, encoder-decoder: {_distances(ed)}; "
            f"decoder-only on the concatenation: {_distances(do)}",
            "verdict": "; ".join(verdicts + notes) or "no distance >= 512 measured",
        }
    )

    # 3. training speed on long sequences
    s_sa, s_ls = _speed(results, "retrieval", SELF), _speed(results, "retrieval", LSTM)
    s_ed, s_do = _speed(results, "lookup", ENCDEC), _speed(results, "lookup", DECONLY)

    def rates(s: dict[int, dict]) -> str:
        return (
            ", ".join(
                f"L={n}: {_rate(r.get('tokens_per_s'))}" if "error" not in r else f"L={n}: {r['error']}"
                for n, r in sorted(s.items())
            )
            or "not measured"
        )

    faster_lstm = [n for n in s_sa if n in s_ls and _faster(s_ls[n], s_sa[n])]
    faster_sa = [n for n in s_sa if n in s_ls and _faster(s_sa[n], s_ls[n])]
    speed_verdict = []
    if faster_sa:
        speed_verdict.append(f"self-attention trained faster at L={', '.join(map(str, sorted(faster_sa)))}")
    if faster_lstm:
        speed_verdict.append(f"the LSTM trained faster at L={', '.join(map(str, sorted(faster_lstm)))}")
    claim = "holds" if faster_sa and max(faster_sa) == max(s_sa) else "does not hold at the longest length measured"
    threads = results.get("threads")
    if threads is not None:
        claim += f" ({threads} CPU thread{'s' if threads != 1 else ''}: attention's parallelism over positions needs "
        claim += "parallel hardware to pay)"
    failed = [
        f"{m} at L={n}: {r['error']}"
        for m, by_len in ((SELF, s_sa), (LSTM, s_ls))
        for n, r in sorted(by_len.items())
        if "error" in r
    ]
    rows.append(
        {
            "aspect": "Training speed on long sequences (tokens/s, one training step)",
            SELF: rates(s_sa),
            LSTM: rates(s_ls),
            "cross-attention": f"encoder-decoder: {rates(s_ed)}; decoder-only: {rates(s_do)}",
            "verdict": f"'fast, parallel' {claim}: " + "; ".join(speed_verdict + failed),
        }
    )

    # 4. memory
    def mem(s: dict[int, dict]) -> str:
        got = [f"L={n}: {_mib(r.get('train_peak_bytes'))}" for n, r in sorted(s.items()) if "error" not in r]
        return ", ".join(got) or "not measured"

    m_sa = {n: r["train_peak_bytes"] for n, r in s_sa.items() if "error" not in r}
    m_ls = {n: r["train_peak_bytes"] for n, r in s_ls.items() if "error" not in r}
    e_sa, e_ls = _slope(m_sa), _slope(m_ls)
    size = results.get("size", {})
    n_top = max(m_sa) if m_sa else None
    would = (
        size.get("batch_speed", 0) * size.get("heads", 0) * size.get("depth", 0) * n_top * n_top * 4 if n_top else None
    )
    mem_verdict = []
    if e_sa is not None:
        shape = "quadratic" if e_sa > 1.5 else "linear" if e_sa < 1.3 else "between linear and quadratic"
        mem_verdict.append(f"self-attention's training memory grew as L^{e_sa:.2f} ({shape})")
    if e_ls is not None:
        mem_verdict.append(f"the LSTM's as L^{e_ls:.2f} (backpropagation through time keeps every step)")
    if n_top and n_top in m_ls:
        more = m_sa[n_top] > m_ls[n_top]
        mem_verdict.append(
            f"at L={n_top} self-attention used {m_sa[n_top] / max(m_ls[n_top], 1):.2f}× the LSTM's memory"
            + ("" if more else " (less: the N² claim does not hold for attnkit's kernels)")
        )
    rows.append(
        {
            "aspect": "Memory (peak of one training step)",
            SELF: mem(s_sa)
            + (f"; the score matrices alone would take {_mib(would)} at L={n_top} if materialised" if would else ""),
            LSTM: mem(s_ls),
            "cross-attention": f"encoder-decoder: {mem(s_ed)}; decoder-only: {mem(s_do)}",
            "verdict": "; ".join(mem_verdict) or "not measured",
        }
    )
    rows.append(
        {
            "aspect": "Typical use",
            SELF: "encoders, decoders, LLMs",
            LSTM: "streaming, small models",
            "cross-attention": "translation, retrieval, multimodal",
            "verdict": "not measured (the glossary's words, kept)",
        }
    )
    return rows


def _grad_text(ratio: tuple[int, float] | None) -> str:
    if ratio is None:
        return ""
    d, r = ratio
    value = "0 (below float32's range)" if r == 0 else f"{r:.2g}×"
    return f"; at init the gradient reaching d={d} is {value} that reaching d=1"


def _faster(a: dict, b: dict) -> bool:
    return "error" not in a and ("error" in b or a["tokens_per_s"] > b["tokens_per_s"])


def _table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    from attnkit.apps.harness import markdown_table

    return markdown_table(rows, columns)


def markdown(results: dict) -> str:
    """The whole report: the regenerated table, then every measured number."""
    meta = results["meta"]
    lines = ['# attnkit compare: the glossary\'s "At a Glance" table, measured', ""]
    lines += [f"Command: `{meta['command']}`  ", f"Seed: {meta['seed']}  "]
    m = meta["machine"]
    lines += [
        f"Machine: {m.get('cpu')}, {m.get('cores')} cores, {m.get('torch_threads')} torch threads, "
        f"torch {m.get('torch')}, Python {m.get('python')}; load average {m.get('load_average')}; {m.get('date')}.",
        f"Wall time of the whole run: {meta['seconds']:.0f} s.",
        "",
        "## At a Glance, regenerated",
        "",
    ]
    cols = [("aspect", ""), (SELF, "Self-attention"), (LSTM, "RNN/LSTM"), ("cross-attention", "Cross-attention")]
    lines += [_table(results["glance"], [*cols, ("verdict", "Does the claim hold here?")]), ""]
    lines += ["## Models (parameters; budget matched within 10%)", ""]
    param_cols = [("task", "task"), ("model", "model"), ("size", "size"), ("parameters", "parameters"),
                  ("vs_budget", "vs budget")]  # fmt: skip
    lines += [_table(results["parameters"], param_cols), ""]
    t = results["train_config"]
    lines += [
        "## Accuracy against dependency distance",
        "",
        f"Every model: AdamW lr {t['lr']}, {t['steps']} steps of batch {t['batch']}, warm-up {t['warmup']}, cosine "
        f"decay, clip {t['clip']}, distance curriculum over the first {t['curriculum']} of the steps "
        f"(from d={t['start_distance']}), the same batches; evaluated on {t['eval_examples']} fresh examples at d.",
        "",
        _table(results["accuracy"], [("task", "task"), ("distance", "d"), ("length", "L"), ("model", "model"),
                                     ("accuracy", "accuracy"), ("chance", "chance"), ("train_s", "train s")]),
        "",
    ]  # fmt: skip
    lines += ["## Throughput and peak memory against length (fresh process per case)", ""]
    speed_rows = [
        {**r, "train_mib": _mb(r.get("train_peak_bytes")), "infer_mib": _mb(r.get("infer_peak_bytes"))}
        for r in results["speed"]
    ]
    lines += [
        _table(speed_rows, [("task", "task"), ("model", "model"), ("length", "L"), ("batch", "B"),
                            ("step_s", "s/step"), ("tokens_per_s", "tokens/s"), ("train_mib", "train peak MiB"),
                            ("infer_mib", "forward peak MiB"), ("sequential_ops", "sequential ops/layer"),
                            ("max_path", "max path/layer"), ("error", "stopped")]),
        "",
    ]  # fmt: skip
    lines += ["## Gradient reaching position t from the loss, against distance (mean norm)", ""]
    grad_rows = []
    for r in results["gradient"]:
        by_d = dict(zip(r["distance"], r["grad_norm"]))
        from attnkit.apps.compare.measure import pick_distances

        for d in pick_distances(max(by_d)):
            if d in by_d:
                rel = by_d[d] / by_d[1] if by_d.get(1) else None
                grad_rows.append({**{k: r[k] for k in ("task", "model", "when")}, "d": d, "g": by_d[d], "rel": rel})
    lines += [_table(grad_rows, [("task", "task"), ("model", "model"), ("when", "when"), ("d", "distance"),
                                 ("g", "‖∂loss/∂x_t‖"), ("rel", "relative to d=1")]), ""]  # fmt: skip
    lines += ["## Per-layer complexity (Vaswani et al. 2017, Table 1)", ""]
    lines += [_table(results["complexity"], [("model", "layer"), ("complexity", "complexity"),
                                             ("sequential_ops", "sequential ops"), ("max_path", "max path length")]),
              ""]  # fmt: skip
    lines += [f"- {n}" for n in results.get("notes", [])]
    return "\n".join(lines).rstrip() + "\n"


def _mb(x: float | None) -> float | None:
    return None if x is None else x / 2**20


def plot_all(results: dict, out_dir: str | Path) -> list[Path]:
    """Four PNGs: accuracy vs distance, throughput vs length, gradient vs distance, memory vs length."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("attnkit compare's plots need matplotlib: pip install 'attnkit[viz]'") from exc
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    tasks = sorted({r["task"] for r in results["accuracy"]})
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(4 * max(1, len(tasks)), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = [r for r in results["accuracy"] if r["task"] == task]
        for model in sorted({r["model"] for r in rows}):
            pts = sorted((r["distance"], r["accuracy"]) for r in rows if r["model"] == model)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=model)
        ax.axhline(rows[0]["chance"], color="grey", ls=":", label="chance")
        ax.set(xscale="log", xlabel="dependency distance d", ylabel="accuracy", title=task, ylim=(0, 1.05))
        ticks = sorted({r["distance"] for r in rows})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.legend(fontsize=7)
    save(fig, "accuracy_vs_distance.png")

    for key, name, label in (
        ("tokens_per_s", "throughput_vs_length.png", "training tokens / s"),
        ("train_peak_bytes", "memory_vs_length.png", "peak memory of a training step (MiB)"),
    ):
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for task in sorted({r["task"] for r in results["speed"]}):
            for model in sorted({r["model"] for r in results["speed"] if r["task"] == task}):
                pts = sorted(
                    (r["length"], r[key] / (2**20 if key.endswith("bytes") else 1))
                    for r in results["speed"]
                    if r["task"] == task and r["model"] == model and "error" not in r
                )
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{model} ({task})")
        ax.set(xscale="log", yscale="log", xlabel="sequence length L", ylabel=label)
        ax.legend(fontsize=7)
        save(fig, name)

    grad_tasks = sorted({r["task"] for r in results["gradient"]})
    n = max(1, len(grad_tasks))
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 3.4), squeeze=False)
    for ax, task in zip(axes[0], grad_tasks):
        for r in (r for r in results["gradient"] if r["task"] == task):
            pts = [(d, g) for d, g in zip(r["distance"], r["grad_norm"]) if d > 0 and g > 0]
            style = "-" if r["when"] == "init" else "--"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{r['model']} ({r['when']})")
        ax.set(xscale="log", yscale="log", xlabel="distance from the loss q - t", ylabel="‖∂loss/∂x_t‖", title=task)
        ax.legend(fontsize=7)
    save(fig, "gradient_vs_distance.png")
    return paths
