"""The compared models, at a matched parameter budget.

Every model is ``inputs -> embed -> mix -> head``: the same `InputEmbedding` (the sum of one
embedding per token channel, or a linear map of float features) and the same linear head, so
the models differ only in how positions exchange information:

- `SelfAttentionModel`: attnkit's causal `attnkit.nn.TransformerEncoder` (pre-norm, RoPE):
  every position reads every earlier one in one step.
- `LSTMModel`: `torch.nn.LSTM` (the ecosystem's own, cuDNN/oneDNN-backed): information
  travels step by step through the hidden state.
- `EncoderDecoderModel`: attnkit's `attnkit.nn.Transformer`: the decoder reads the source
  through cross-attention (two-sequence tasks only).

`build_models` sizes the LSTM (hidden width) and, for two-sequence tasks, the decoder-only
model (width) so that every parameter count lies within ``tolerance`` (10%) of the
self-attention model's.

Shapes: ``B`` batch, ``L`` length, ``C`` token channels, ``F`` float features, ``W`` width.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from attnkit.apps.compare.tasks import Batch, PairBatch, Task
from attnkit.nn import Transformer, TransformerEncoder

__all__ = [
    "EncoderDecoderModel",
    "InputEmbedding",
    "LSTMModel",
    "ModelSize",
    "SelfAttentionModel",
    "build_models",
    "count_parameters",
    "logits_for",
]


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class InputEmbedding(nn.Module):
    """Token channels ``(B, L, C)`` int64 -> sum of the channels' embeddings ``(B, L, W)``;
    or float features ``(B, L, F)`` -> ``Linear(F, W)``."""

    def __init__(self, task: Task, width: int) -> None:
        super().__init__()
        if task.vocab_sizes is not None:
            self.tokens = nn.ModuleList(nn.Embedding(v, width) for v in task.vocab_sizes)
            self.features = None
        else:
            self.tokens = None
            self.features = nn.Linear(task.input_features, width)

    def forward(self, inputs: Tensor) -> Tensor:
        if self.tokens is None:
            return self.features(inputs)  # (B, L, W)
        if inputs.dim() != 3 or inputs.shape[-1] != len(self.tokens):
            raise ValueError(
                f"InputEmbedding: inputs must be (B, L, {len(self.tokens)}) token channels, got {tuple(inputs.shape)}"
            )
        return sum(emb(inputs[..., c]) for c, emb in enumerate(self.tokens))  # (B, L, W)


class SequenceModel(nn.Module, metaclass=ABCMeta):
    """``embed -> mix -> head``; `mix` is what the subclasses define.

    ``forward(inputs)``: ``(B, L, C)`` or ``(B, L, F)`` -> outputs ``(B, L, n_outputs)``.
    `mix` is public so the gradient probe can differentiate with respect to the embeddings.
    """

    kind: str

    def __init__(self, task: Task, width: int, mix_width: int) -> None:
        super().__init__()
        self.embed = InputEmbedding(task, width)
        self.head = nn.Linear(mix_width, task.n_outputs)

    @abstractmethod
    def mix(self, x: Tensor) -> Tensor:
        """Embeddings ``(B, L, width)`` -> features ``(B, L, mix_width)``."""

    def forward(self, inputs: Tensor) -> Tensor:
        return self.head(self.mix(self.embed(inputs)))


class SelfAttentionModel(SequenceModel):
    """attnkit's causal Transformer encoder stack (pre-norm, RoPE, GELU feed-forward)."""

    kind = "self-attention"

    def __init__(self, task: Task, *, width: int, heads: int, depth: int, ff_dim: int | None = None) -> None:
        super().__init__(task, width, width)
        self.width, self.heads, self.depth = width, heads, depth
        self.ff_dim = 4 * width if ff_dim is None else ff_dim
        self.stack = TransformerEncoder(width, heads, depth, ff_dim=self.ff_dim, causal=True, positions="rope")

    def mix(self, x: Tensor) -> Tensor:
        return self.stack(x)  # (B, L, W)


class LSTMModel(SequenceModel):
    """`torch.nn.LSTM` (``batch_first``), input width ``width``, hidden width ``hidden``."""

    kind = "LSTM"

    def __init__(self, task: Task, *, width: int, hidden: int, depth: int = 1) -> None:
        super().__init__(task, width, hidden)
        self.width, self.hidden, self.depth = width, hidden, depth
        self.lstm = nn.LSTM(width, hidden, num_layers=depth, batch_first=True)

    def mix(self, x: Tensor) -> Tensor:
        return self.lstm(x)[0]  # (B, L, hidden)


class EncoderDecoderModel(nn.Module):
    """attnkit's encoder-decoder `attnkit.nn.Transformer` (bidirectional encoder, causal decoder
    with cross-attention), with one `InputEmbedding` shared by source and target.

    ``forward(source (B, Ls, C), target_inputs (B, Lt, C))`` -> ``(B, Lt, n_outputs)``.
    """

    kind = "encoder-decoder"

    def __init__(self, task: Task, *, width: int, heads: int, depth: int, ff_mult: int = 4) -> None:
        super().__init__()
        self.width, self.heads, self.depth = width, heads, depth
        self.embed = InputEmbedding(task, width)
        self.transformer = Transformer(
            width, heads, encoder_depth=depth, decoder_depth=depth, ff_dim=ff_mult * width, positions="rope"
        )
        self.head = nn.Linear(width, task.n_outputs)

    def forward(self, source: Tensor, target_inputs: Tensor) -> Tensor:
        out = self.transformer(self.embed(source), self.embed(target_inputs))  # (B, Lt, W)
        return self.head(out)


def logits_for(model: nn.Module, batch: Batch | PairBatch) -> tuple[Tensor, Tensor, Tensor]:
    """Run ``model`` on ``batch`` in the form it reads.

    Returns ``(outputs (B, L, n_outputs), targets (B, L), loss_mask (B, L))``; a single-sequence
    model given a `PairBatch` reads it concatenated (`PairBatch.concatenated`).
    """
    if isinstance(model, EncoderDecoderModel):
        if not isinstance(batch, PairBatch):
            raise TypeError("logits_for: an encoder-decoder needs a PairBatch (a two-sequence task)")
        out = model(batch.source, batch.target_inputs)
        return out, batch.targets, torch.ones(batch.targets.shape, dtype=torch.bool, device=out.device)
    if isinstance(batch, PairBatch):
        batch = batch.concatenated()
    return model(batch.inputs), batch.targets, batch.loss_mask


@dataclass(frozen=True)
class ModelSize:
    """The self-attention model's size, which sets the budget the others are fitted to."""

    width: int = 64
    heads: int = 4
    depth: int = 2
    lstm_depth: int = 1
    tolerance: float = 0.10


def _fit(make: Callable[[int], nn.Module], target: int, candidates: range) -> tuple[nn.Module, int]:
    """The candidate size whose model's parameter count is closest to ``target``.

    The count must grow with the size (it does for widths); a bisection builds ``O(log n)`` models.
    """

    def count(n: int) -> int:
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            return count_parameters(make(n))

    lo, hi = 0, len(candidates) - 1
    while lo < hi:  # first candidate with count >= target (or the last)
        mid = (lo + hi) // 2
        if count(candidates[mid]) >= target:
            hi = mid
        else:
            lo = mid + 1
    options = [candidates[i] for i in {max(lo - 1, 0), lo}]
    best = min(options, key=lambda n: abs(count(n) - target))
    return make(best), best


def build_models(task: Task, size: ModelSize = ModelSize(), *, seed: int = 0) -> dict[str, nn.Module]:
    """The models compared on ``task``, each initialised from ``seed``, within ``size.tolerance`` of
    the reference budget.

    Single-sequence tasks: ``{"self-attention", "LSTM"}``, the budget being the self-attention
    model's. Two-sequence tasks: ``{"encoder-decoder", "decoder-only", "LSTM"}``, the budget
    being the encoder-decoder's (``size.depth`` layers per stack, ``2 * size.depth`` layers for
    the decoder-only model, whose width is fitted).

    Raises ValueError if a model cannot be fitted within the tolerance.
    """
    W, H = size.width, size.heads

    def seeded(make: Callable[[int], nn.Module]) -> Callable[[int], nn.Module]:
        def build(n: int) -> nn.Module:
            torch.manual_seed(seed)
            return make(n)

        return build

    models: dict[str, nn.Module] = {}
    if task.two_sequence:
        per_stack = max(1, size.depth // 2)
        models["encoder-decoder"] = seeded(lambda _: EncoderDecoderModel(task, width=W, heads=H, depth=per_stack))(0)
        budget = count_parameters(models["encoder-decoder"])
        # same width and layer count; the feed-forward width absorbs the cross-attention's parameters
        make_dec = seeded(lambda f: SelfAttentionModel(task, width=W, heads=H, depth=2 * per_stack, ff_dim=f))
        models["decoder-only"], _ = _fit(make_dec, budget, range(W, 16 * W + 1))
    else:
        models["self-attention"] = seeded(lambda _: SelfAttentionModel(task, width=W, heads=H, depth=size.depth))(0)
        budget = count_parameters(models["self-attention"])
    make_lstm = seeded(lambda h: LSTMModel(task, width=W, hidden=h, depth=size.lstm_depth))
    models["LSTM"], _ = _fit(make_lstm, budget, range(8, 4 * W + 1))
    for name, model in models.items():
        n = count_parameters(model)
        if abs(n - budget) > size.tolerance * budget:
            raise ValueError(
                f"build_models: {name} has {n} parameters, more than {size.tolerance:.0%} from the budget {budget}"
            )
    return models
