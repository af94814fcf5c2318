"""Beyond raw attention weights: rollout, gradient-weighted attention, and a faithfulness test.

Attention weights say where a head looked, not what mattered for the output (Jain and
Wallace, 2019, "Attention is not Explanation"; Wiegreffe and Pinter, 2019). Three tools
give more, and a test says how much each is worth on a given input:

* `rollout` (Abnar and Zuidema, 2020, "Quantifying Attention Flow in Transformers"): per
  layer, the head-averaged map plus the identity for the residual stream,
  ``A_hat = 0.5 A + 0.5 I``, rows renormalised; multiplied through the layers,
  ``R = A_hat_L ... A_hat_1``. Saliency of token ``j`` = row(s) of ``R`` at ``j``.
* `gradient_weighted` (Chefer, Gur and Wolf, 2021, "Generic Attention-model Explainability
  for Interpreting Bi-Modal and Encoder-Decoder Transformers"): per layer
  ``A_bar = mean_h (dy/dA ⊙ A)^+``, rolled as ``R <- R + A_bar R`` from ``R = I``.
* `faithfulness`: remove the top-``k`` tokens of each explanation, and ``k`` random tokens,
  and measure how much the model's output (embedding or logit) moves. An explanation worth
  something moves it more than random tokens do (a deletion test in the spirit of
  DeYoung et al., 2020, "ERASER", comprehensiveness).

All saliencies are ``(B, L)``: how much each input token matters for the chosen query rows
(``query=None``: the mean over the real query rows; an int: that row, e.g. 0 for [CLS],
-1 for the last token of a causal model).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from attnkit.inspect.record import Recording, record

__all__ = ["Faithfulness", "explain", "faithfulness", "gradient_weighted", "raw_attention", "rollout"]


def _stack(source, what: str) -> Tensor:
    """``(layers, B, H, L, L)`` from a Recording or a tensor / list of tensors."""
    if isinstance(source, Recording):
        x = source.maps() if what == "maps" else source.grads()
    elif isinstance(source, list | tuple):
        x = torch.stack(list(source))
    else:
        x = source
    if x.dim() != 5 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"expected {what} of shape (layers, B, H, L, L) for self-attention, got {tuple(x.shape)}")
    return x.double()


def _read_rows(R: Tensor, query: int | None, query_mask: Tensor | None) -> Tensor:
    """``(B, L)`` from the ``(B, L, L)`` relevance matrix: one row, or the mean of the real rows."""
    if query is not None:
        return R[:, query]
    if query_mask is None:
        return R.mean(1)
    w = query_mask.to(R.dtype)  # (B, L)
    return (R * w[:, :, None]).sum(1) / w.sum(1, keepdim=True).clamp(min=1)


def raw_attention(maps, *, layer: int = -1, query: int | None = None, query_mask: Tensor | None = None) -> Tensor:
    """``(B, L)``: one layer's attention averaged over heads (the raw-weights baseline)."""
    A = _stack(maps, "maps")[layer].mean(1)  # (B, L, L)
    return _read_rows(A, query, query_mask).float()


def rollout(maps, *, query: int | None = None, query_mask: Tensor | None = None, residual: float = 0.5) -> Tensor:
    """Attention rollout (Abnar and Zuidema, 2020).

    Args:
        maps: a `Recording` recorded with ``maps=True`` or ``(layers, B, H, L, L)`` weights.
        query: the query row to explain (None: mean over rows where ``query_mask``).
        residual: weight of the identity, ``A_hat = (1 - residual) A + residual I`` (0.5 in the paper).

    Returns:
        ``(B, L)`` token saliency (each row of the rolled matrix sums to 1).
    """
    A = _stack(maps, "maps").mean(2)  # (layers, B, L, L): heads averaged
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    R = None
    for layer in A:
        a = (1 - residual) * layer + residual * eye
        a = a / a.sum(-1, keepdim=True).clamp(min=1e-12)  # renormalise rows
        R = a if R is None else torch.bmm(a, R)  # later layers on the left
    return _read_rows(R, query, query_mask).float()


def gradient_weighted(maps, grads=None, *, query: int | None = None, query_mask: Tensor | None = None) -> Tensor:
    """Gradient-weighted attention rolled through the layers (Chefer et al., 2021).

    Args:
        maps: a `Recording` recorded with ``maps=True, grads=True`` (after ``backward()``) or
            ``(layers, B, H, L, L)`` weights; then ``grads`` holds ``dy/dA`` of the same shape.

    Returns:
        ``(B, L)`` token saliency.
    """
    A = _stack(maps, "maps")
    G = _stack(maps if grads is None else grads, "grads")
    if G.shape != A.shape:
        raise ValueError(f"gradient_weighted: grads {tuple(G.shape)} must match maps {tuple(A.shape)}")
    cam = (G * A).clamp(min=0).mean(2)  # (layers, B, L, L): positive part, heads averaged
    R = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device).expand_as(cam[0]).clone()
    for layer in cam:
        R = R + torch.bmm(layer, R)
    return _read_rows(R, query, query_mask).float()


# ------------------------------------------------------------------------- model side
def default_output(output, inputs: dict) -> Tensor:
    """``(B, D)``: the model's output as a vector per input.

    ``logits`` of the last real token when the output has logits (a language model or a
    classifier: then the row of the last position), else the mean of ``last_hidden_state``
    over the real tokens (sentence-transformers' mean pooling).
    """
    mask = inputs.get("attention_mask")
    if hasattr(output, "logits") and output.logits is not None:
        logits = output.logits
        if logits.dim() == 2:
            return logits
        n = logits.shape[0]
        last = (mask.sum(1) - 1).long() if mask is not None else torch.full((n,), logits.shape[1] - 1)
        return logits[torch.arange(n, device=logits.device), last.to(logits.device)]
    hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
    if mask is None:
        return hidden.mean(1)
    w = mask.to(hidden.dtype).unsqueeze(-1)  # (B, L, 1)
    return (hidden * w).sum(1) / w.sum(1).clamp(min=1e-9)


def explain(
    model,
    inputs: dict,
    *,
    output_fn: Callable = default_output,
    target_fn: Callable | None = None,
    query: int | None = None,
) -> dict[str, Tensor]:
    """Run ``model(**inputs)`` once with recording and return every explanation.

    Args:
        inputs: keyword inputs of the model (``input_ids``, ``attention_mask``, ...).
        output_fn: ``(model output, inputs) -> (B, D)`` vector whose change is explained.
        target_fn: ``(B, D) -> scalar`` back-propagated for the gradient; default
            ``sum_b y_b . stopgrad(y_b)``, the output's own direction (for logits pass e.g.
            ``lambda y: y[:, label].sum()``).
        query: the query row to explain (None: mean over the real rows).

    Returns:
        ``{"raw": ..., "rollout": ..., "gradient": ...}``, each ``(B, L)``.
    """
    qmask = inputs.get("attention_mask")
    qmask = None if qmask is None else qmask.bool()
    with torch.enable_grad(), record(model, maps=True, stats=False, grads=True, max_map_bytes=2**31) as rec:
        y = output_fn(model(**inputs), inputs)
        target = target_fn(y) if target_fn is not None else (y * y.detach()).sum()
        target.backward()
    for p in model.parameters():  # leave the model as we found it
        p.grad = None
    return {
        "raw": raw_attention(rec, query=query, query_mask=qmask),
        "rollout": rollout(rec, query=query, query_mask=qmask),
        "gradient": gradient_weighted(rec, query=query, query_mask=qmask),
    }


@dataclass
class Faithfulness:
    """How much the output moves when each explanation's top-k tokens are removed, versus k random ones.

    Attributes:
        k: tokens removed per input.
        deltas: explanation -> mean output change over the batch.
        random_mean, random_std: the same for random choices of ``k`` tokens (mean and spread
            over draws and inputs).
        per_example: explanation -> ``(B,)`` changes; ``random_per_example`` ``(B, draws)``.
        metric: ``"cosine"`` (1 - cosine similarity) or ``"l2"``.
    """

    k: int
    deltas: dict[str, float]
    random_mean: float
    random_std: float
    per_example: dict[str, Tensor]
    random_per_example: Tensor
    metric: str

    def ratio(self, name: str) -> float:
        """``delta / random_mean``: above 1, the explanation found tokens that matter more than chance."""
        return self.deltas[name] / self.random_mean if self.random_mean > 0 else float("inf")

    def to_markdown(self) -> str:
        lines = [
            f"| explanation | output change ({self.metric}), top-{self.k} removed | vs random |",
            "|---|---|---|",
        ]
        for name, d in self.deltas.items():
            lines.append(f"| {name} | {d:.4g} | {self.ratio(name):.2f}x |")
        lines.append(f"| random ({self.random_per_example.shape[1]} draws) | {self.random_mean:.4g} "
                     f"± {self.random_std:.2g} | 1.00x |")  # fmt: skip
        return "\n".join(lines)


def _remove(inputs: dict, drop: Tensor, replace_id: int | None) -> dict:
    """Inputs with the tokens ``drop (B, L)`` removed: replaced by ``replace_id``, or masked out of attention."""
    out = dict(inputs)
    if replace_id is not None:
        out["input_ids"] = inputs["input_ids"].masked_fill(drop, replace_id)
    else:
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(inputs["input_ids"]) if mask is None else mask
        out["attention_mask"] = mask.masked_fill(drop, 0)
    return out


def _moved(model, inputs: dict, base: Tensor, drops: list[Tensor], replace_id, output_fn, metric, batch_size) -> Tensor:
    """``(len(drops), B)`` output change for each perturbation, run in batches of ``batch_size`` rows."""
    if not drops:
        return torch.zeros(0, base.shape[0], dtype=torch.float64)
    n, B = len(drops), base.shape[0]
    drop = torch.cat(drops)  # (n * B, L)
    tiled = {key: value.repeat(n, *([1] * (value.dim() - 1))) if isinstance(value, Tensor) else value
             for key, value in inputs.items()}  # fmt: skip
    changes = []
    for s in range(0, n * B, batch_size):
        part = {key: value[s : s + batch_size] if isinstance(value, Tensor) else value for key, value in tiled.items()}
        part = _remove(part, drop[s : s + batch_size], replace_id)
        y = output_fn(model(**part), part)
        changes.append(_change(base.repeat(n, 1)[s : s + batch_size], y, metric))
    return torch.cat(changes).view(n, B)


def _change(a: Tensor, b: Tensor, metric: str) -> Tensor:
    if metric == "cosine":
        return 1 - torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)
    return (a.double() - b.double()).norm(dim=-1)


@torch.no_grad()
def faithfulness(
    model,
    inputs: dict,
    explanations: dict[str, Tensor],
    *,
    k: int = 3,
    candidates: Tensor | None = None,
    replace_id: int | None = None,
    output_fn: Callable = default_output,
    metric: str = "cosine",
    draws: int = 16,
    seed: int = 0,
    batch_size: int = 64,
) -> Faithfulness:
    """Remove each explanation's top-``k`` tokens and ``k`` random tokens; compare how the output moves.

    Args:
        inputs: keyword inputs with ``input_ids (B, L)`` (and ``attention_mask``).
        explanations: name -> ``(B, L)`` saliency (e.g. from `explain`).
        k: tokens removed per input.
        candidates: ``(B, L)`` bool, the tokens that may be removed; default the real tokens
            (``attention_mask``) except the first and the last (special tokens such as
            [CLS]/[SEP] stay). Explanations and random draws pick among the same candidates.
        replace_id: replace removed tokens by this id (e.g. ``tokenizer.mask_token_id``);
            None removes them from attention (``attention_mask = 0``).
        output_fn: ``(model output, inputs) -> (B, D)``; the default pools over the tokens
            that remain.
        metric: ``"cosine"`` (1 - cosine similarity) or ``"l2"``.
        draws: random draws of ``k`` tokens per input.
        batch_size: perturbed inputs per forward pass (perturbations are batched together).

    Returns:
        `Faithfulness`.
    """
    if metric not in ("cosine", "l2"):
        raise ValueError(f"faithfulness: metric must be 'cosine' or 'l2', got {metric!r}")
    ids = inputs["input_ids"]
    B, L = ids.shape
    dev = ids.device
    if candidates is None:
        real = inputs.get("attention_mask", torch.ones_like(ids)).bool()
        candidates = real.clone()
        candidates[:, 0] = False
        last = real.long().sum(1) - 1
        candidates[torch.arange(B, device=dev), last] = False
    candidates = candidates.to(dev).bool()
    n_cand = candidates.sum(1)
    if int(n_cand.min()) < k:
        raise ValueError(f"faithfulness: k={k} but some input has only {int(n_cand.min())} candidate tokens")
    base = output_fn(model(**inputs), inputs)  # (B, D)
    drops = []  # (B, L) bool per perturbation: explanations first, then random draws
    for name, sal in explanations.items():
        if tuple(sal.shape) != (B, L):
            raise ValueError(f"faithfulness: explanation {name!r} must be (B, L) = {(B, L)}, got {tuple(sal.shape)}")
        score = sal.to(dev, torch.float64).masked_fill(~candidates, float("-inf"))
        drops.append(torch.zeros(B, L, dtype=torch.bool, device=dev).scatter_(1, score.topk(k, dim=1).indices, True))
    g = torch.Generator().manual_seed(seed)
    for _ in range(draws):
        noise = torch.rand(B, L, generator=g, dtype=torch.float64).to(dev).masked_fill(~candidates, -1.0)
        drops.append(torch.zeros(B, L, dtype=torch.bool, device=dev).scatter_(1, noise.topk(k, dim=1).indices, True))
    moved = _moved(model, inputs, base, drops, replace_id, output_fn, metric, batch_size)  # (n, B)
    names = list(explanations)
    per_example = {name: moved[n].float() for n, name in enumerate(names)}
    random_per_example = moved[len(names) :].t().float()  # (B, draws)
    return Faithfulness(
        k=k,
        deltas={n: float(v.mean()) for n, v in per_example.items()},
        random_mean=float(random_per_example.mean()),
        random_std=float(random_per_example.std()) if random_per_example.numel() > 1 else 0.0,
        per_example=per_example,
        random_per_example=random_per_example,
        metric=metric,
    )
