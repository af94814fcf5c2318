"""Synthetic long-range tasks, generated on the fly from a seed, with a dependency distance ``d``.

Every task answers ``sample(batch, d, generator=g)`` with a `Batch` whose loss positions
depend on an input ``d`` positions earlier (or, for the adding problem, up to ``d``), so
accuracy can be read against distance. Nothing is downloaded; the same generator state
gives the same batch on every machine (``torch.Generator`` on the CPU, then moved).

- `Retrieval`: a (key, value) token planted ``d`` positions before a query naming the key,
  among distractor pairs with other keys; answer: the value. The "definition on page 2
  that changes a clause on page 19" case, in the form of associative recall
  (Ba et al. 2016, "Using Fast Weights to Attend to the Recent Past", section 4.1).
- `SelectiveCopy`: copy the few data tokens scattered through ``d`` blanks, in order
  (the selective copying task of Gu and Dao 2023, "Mamba", section 3.1, after the
  copying memory task of Arjovsky et al. 2016).
- `Adding`: the adding problem (Hochreiter and Schmidhuber 1997, "Long Short-Term Memory",
  experiment 4), in the variant of Le et al. 2015 (one marker in each half); solved when
  the absolute error is below 0.04, the 1997 criterion.
- `Lookup`: a two-sequence task. The source lists ``m`` (key, value) tokens scattered
  through ``d`` noise tokens; the target gives the keys again in another order and must
  answer their values, i.e. the source's facts reordered. It is posed to an
  encoder-decoder as (source, target) and to a decoder-only model as one concatenated
  sequence ``source, SEP, target``.

Layouts use ``B`` batch and ``L`` length; token inputs are ``(B, L)`` int64, the adding
problem's are ``(B, L, 2)`` float32 (value, marker). Token inputs are ``(B, L, C)`` int64:
``C`` channels whose embeddings the models add (a fact is one position holding a key and a value).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

__all__ = ["TASKS", "Adding", "Batch", "Lookup", "PairBatch", "Retrieval", "SelectiveCopy", "Task", "get_task"]


@dataclass(frozen=True)
class Batch:
    """One batch for a single-sequence model.

    inputs: ``(B, L, C)`` int64 tokens (one per channel), or ``(B, L, F)`` float features.
    targets: ``(B, L)``: int64 classes, or float32 values for regression; read only where `loss_mask`.
    loss_mask: ``(B, L)`` bool, True where the model is scored.
    """

    inputs: Tensor
    targets: Tensor
    loss_mask: Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.inputs.to(device), self.targets.to(device), self.loss_mask.to(device))


@dataclass(frozen=True)
class PairBatch:
    """One batch for an encoder-decoder.

    source: ``(B, Ls, C)`` int64 tokens. target_inputs: ``(B, Lt, C)`` int64, what the decoder reads.
    targets: ``(B, Lt)`` int64, what it must answer at each position (all positions scored).
    sep_token: ``(C,)`` int64, the separator put between the two for a decoder-only model.
    """

    source: Tensor
    target_inputs: Tensor
    targets: Tensor
    sep_token: Tensor

    def concatenated(self) -> Batch:
        """The same examples as one sequence ``source, SEP, target_inputs`` for a decoder-only model.

        Returns a `Batch` of length ``Ls + 1 + Lt`` whose last ``Lt`` positions are scored.
        """
        B, Ls, C = self.source.shape
        sep = self.sep_token.to(self.source.device).expand(B, 1, C)  # (B, 1, C)
        inputs = torch.cat([self.source, sep, self.target_inputs], dim=1)  # (B, Ls + 1 + Lt, C), Lt the target length
        targets = torch.zeros(inputs.shape[:2], dtype=self.targets.dtype, device=inputs.device)
        targets[:, Ls + 1 :] = self.targets
        mask = torch.zeros(inputs.shape[:2], dtype=torch.bool, device=inputs.device)
        mask[:, Ls + 1 :] = True
        return Batch(inputs, targets, mask)

    def to(self, device: torch.device | str) -> PairBatch:
        return replace(
            self,
            source=self.source.to(device),
            target_inputs=self.target_inputs.to(device),
            targets=self.targets.to(device),
        )


def _check_args(name: str, batch: int, d: int, min_d: int) -> None:
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"{name}.sample: batch must be an int >= 1, got {batch!r}")
    if isinstance(d, bool) or not isinstance(d, int) or d < min_d:
        raise ValueError(f"{name}.sample: d must be an int >= {min_d}, got {d!r}")


def _distinct(batch: int, n: int, k: int, g: torch.Generator) -> Tensor:
    """``k`` distinct integers in ``[0, n)`` per row, in random order: ``(batch, k)`` int64."""
    return torch.rand(batch, n, generator=g).argsort(dim=1)[:, :k]


class Task(ABC):
    """A task: its vocabulary, its outputs and a seeded sampler.

    Attributes:
        name: short name used on the command line and in the tables.
        kind: ``"classification"`` (cross-entropy, accuracy = share of scored positions right)
            or ``"regression"`` (mean squared error, accuracy = share within `tolerance`).
        vocab_sizes: tokens per input channel (None for float inputs): token inputs are
            ``(B, L, C)`` int64 with ``C = len(vocab_sizes)``, and the models add the channels' embeddings.
        input_features: ``F`` of float inputs (None for tokens).
        n_outputs: classes, or 1 for regression.
        chance: accuracy of the best input-blind answer.
        two_sequence: True if `sample` returns a `PairBatch`.
    """

    name: str
    kind: Literal["classification", "regression"] = "classification"
    vocab_sizes: tuple[int, ...] | None = None
    input_features: int | None = None
    n_outputs: int
    chance: float
    two_sequence: bool = False
    min_distance: int = 1
    tolerance: float | None = None
    description: str = ""

    @abstractmethod
    def length(self, d: int) -> int:
        """Length of the sequence a single-sequence model reads at distance ``d``."""

    @abstractmethod
    def sample(self, batch: int, d: int, *, generator: torch.Generator) -> Batch | PairBatch:
        """A batch of ``batch`` examples at dependency distance ``d``, drawn from ``generator``."""


class Retrieval(Task):
    """Associative recall at an exact distance ``d``.

    Each position holds two token channels, ``(symbol, role)``, whose embeddings the models
    add: a fact is ``(key k, value v)``, its query ``(key k, QUERY)``, a filler
    ``(noise n, NONE)``. So the query shares its key's symbol, as a word shares its
    spelling with its definition, and attention can match them in one step; an LSTM reads
    the same inputs. Layout of a row of length ``L = d + slack``: the target fact at
    position ``p < slack``, its query at ``p + d``, and ``n_distractors`` facts with other
    (distinct) keys, ``k`` of them before the target and the rest between it and the query,
    ``k`` uniform in ``0 .. n_distractors``: the target is the first, the last or any fact in
    between with equal chance, so only its key, not its rank, identifies it. Noise
    elsewhere. Scored: the query position, whose answer is ``v`` (chance ``1 / n_values``).
    """

    name = "retrieval"
    description = "value of the key planted d tokens before the query, among distractor facts"

    def __init__(
        self, *, n_keys: int = 16, n_values: int = 16, n_noise: int = 16, n_distractors: int = 6, slack: int = 8
    ):
        if n_distractors >= n_keys:
            raise ValueError(f"Retrieval: n_distractors must be < n_keys={n_keys}, got {n_distractors}")
        if slack <= n_distractors:
            raise ValueError(f"Retrieval: slack must be > n_distractors={n_distractors}, got {slack}")
        self.n_keys, self.n_values, self.n_noise = n_keys, n_values, n_noise
        self.n_distractors, self.slack = n_distractors, slack
        self.query_role, self.none_role = n_values, n_values + 1
        self.vocab_sizes = (n_noise + n_keys, n_values + 2)  # symbols: noise then keys; roles: values, QUERY, NONE
        self.n_outputs = n_values
        self.chance = 1.0 / n_values
        self.min_distance = n_distractors + 2

    def length(self, d: int) -> int:
        return d + self.slack

    def sample(self, batch: int, d: int, *, generator: torch.Generator) -> Batch:
        _check_args("Retrieval", batch, d, self.min_distance)
        g, B, L = generator, batch, self.length(d)
        rows = torch.arange(B)[:, None]  # (B, 1)
        symbol = torch.randint(0, self.n_noise, (B, L), generator=g)  # (B, L) noise
        role = torch.full((B, L), self.none_role, dtype=torch.long)
        keys = self.n_noise + _distinct(B, self.n_keys, self.n_distractors + 1, g)  # (B, 1 + n_distractors)
        values = torch.randint(0, self.n_values, keys.shape, generator=g)  # column 0 is the target
        nd = self.n_distractors
        before = torch.randint(0, nd + 1, (B,), generator=g)  # k: distractors placed before the target
        u = torch.rand(B, generator=g)
        start = (before + (u * (self.slack - before)).long())[:, None]  # (B, 1) target position p in [k, slack)
        # distractor j < k: a distinct position in [0, p); j >= k: a distinct offset in [1, d - 1] after p
        pre = torch.rand(B, self.slack, generator=g).masked_fill(torch.arange(self.slack) >= start, 2.0)
        pre = pre.argsort(dim=1)[:, :nd]  # (B, nd): distinct positions, those in [0, p) first
        post = start + 1 + _distinct(B, d - 1, nd, g)  # (B, nd)
        j = torch.arange(nd)[None, :]  # (1, nd)
        where = torch.cat([start, torch.where(j < before[:, None], pre, post)], dim=1)  # (B, 1 + nd)
        symbol[rows, where] = keys
        role[rows, where] = values
        query = (start + d)[:, 0]  # (B,)
        symbol[rows[:, 0], query] = keys[:, 0]
        role[rows[:, 0], query] = self.query_role
        targets = torch.zeros(B, L, dtype=torch.long)
        targets[rows[:, 0], query] = values[:, 0]
        mask = torch.zeros(B, L, dtype=torch.bool)
        mask[rows[:, 0], query] = True
        return Batch(torch.stack([symbol, role], dim=-1), targets, mask)  # inputs (B, L, 2)


class SelectiveCopy(Task):
    """Copy the ``n_data`` data tokens scattered among ``d`` blanks, in order.

    Row layout (length ``d + 1 + n_data``): ``d`` input positions (blank 0, or one of
    ``n_symbols`` data tokens at ``n_data`` random positions), a separator, then the
    answer region read with teacher forcing: at the separator the model names the first
    data token, at each answer position the next. Scored: the separator and the first
    ``n_data - 1`` answer positions (``n_data`` in all); chance ``1 / n_symbols``.
    """

    name = "copy"
    description = "copy the data tokens scattered through d blanks, in order"

    def __init__(self, *, n_symbols: int = 8, n_data: int = 4):
        self.n_symbols, self.n_data = n_symbols, n_data
        self.sep = n_symbols + 1
        self.vocab_sizes = (n_symbols + 2,)  # blank, symbols 1..n, sep
        self.n_outputs = n_symbols + 2
        self.chance = 1.0 / n_symbols
        self.min_distance = n_data

    def length(self, d: int) -> int:
        return d + 1 + self.n_data

    def sample(self, batch: int, d: int, *, generator: torch.Generator) -> Batch:
        _check_args("SelectiveCopy", batch, d, self.min_distance)
        g, B, n = generator, batch, self.n_data
        rows = torch.arange(B)[:, None]  # (B, 1)
        where = _distinct(B, d, n, g).sort(dim=1).values  # (B, n) ascending positions
        data = torch.randint(1, self.n_symbols + 1, (B, n), generator=g)  # (B, n)
        x = torch.zeros(B, self.length(d), dtype=torch.long)
        x[rows, where] = data
        x[:, d] = self.sep
        x[:, d + 1 :] = data  # teacher forcing: answer k is read at position d + 1 + k
        targets = torch.zeros_like(x)
        targets[:, d : d + n] = data
        mask = torch.zeros(x.shape, dtype=torch.bool)
        mask[:, d : d + n] = True
        return Batch(x[..., None], targets, mask)  # inputs (B, L, 1)


class Adding(Task):
    """The adding problem: sum the two values whose marker is 1.

    Inputs ``(B, d, 2)``: a value uniform in [0, 1) and a marker, 1 at one position in each
    half (Le et al. 2015, "A Simple Way to Initialize Recurrent Networks of Rectified Linear
    Units", section 4.1). Scored: the last position, target the sum. Solved within 0.04
    (Hochreiter and Schmidhuber 1997); chance is what always answering 1 gets:
    ``P(|U1 + U2 - 1| < 0.04) = 1 - 0.96**2 = 0.0784``.
    """

    name = "adding"
    kind = "regression"
    description = "sum of the two marked values, one in each half of d steps"
    input_features = 2
    n_outputs = 1
    tolerance = 0.04
    chance = 1.0 - (1.0 - 0.04) ** 2
    min_distance = 2

    def length(self, d: int) -> int:
        return d

    def sample(self, batch: int, d: int, *, generator: torch.Generator) -> Batch:
        _check_args("Adding", batch, d, self.min_distance)
        g, B, half = generator, batch, d // 2
        rows = torch.arange(B)
        values = torch.rand(B, d, generator=g)  # (B, d)
        first = torch.randint(0, half, (B,), generator=g)
        second = torch.randint(half, d, (B,), generator=g)
        marker = torch.zeros(B, d)
        marker[rows, first] = 1.0
        marker[rows, second] = 1.0
        x = torch.stack([values, marker], dim=-1)  # (B, d, 2)
        targets = torch.zeros(B, d)
        targets[:, -1] = values[rows, first] + values[rows, second]
        mask = torch.zeros(B, d, dtype=torch.bool)
        mask[:, -1] = True
        return Batch(x, targets, mask)


class Lookup(Task):
    """Two sequences: the source states ``m`` facts ``(key, value)`` among ``d`` noise tokens;
    the target names the same keys in a new order and must answer their values.

    Tokens are ``(symbol, role)`` pairs as in `Retrieval`. Source ``(B, d, 2)``: ``m`` facts with
    distinct keys at random positions, noise elsewhere. Target inputs ``(B, m, 2)``: the keys
    as queries, in a random order; targets ``(B, m)``: their values. Every answer depends on a
    source token between ``2`` and ``d + m`` positions back in the concatenated sequence, and
    one cross-attention step away in the encoder-decoder. Chance ``1 / n_values``.
    """

    name = "lookup"
    description = "two sequences: answer, in a new order, the values the source gave m keys"
    two_sequence = True

    def __init__(self, *, n_keys: int = 16, n_values: int = 16, n_noise: int = 16, m: int = 8):
        if m > n_keys:
            raise ValueError(f"Lookup: m must be <= n_keys={n_keys}, got {m}")
        self.n_keys, self.n_values, self.n_noise, self.m = n_keys, n_values, n_noise, m
        self.query_role, self.none_role = n_values, n_values + 1
        self.sep_symbol = n_noise + n_keys
        self.vocab_sizes = (n_noise + n_keys + 1, n_values + 2)  # symbols: noise, keys, SEP; roles: values, QUERY, NONE
        self.n_outputs = n_values
        self.chance = 1.0 / n_values
        self.min_distance = m

    def length(self, d: int) -> int:
        return d + 1 + self.m

    def sample(self, batch: int, d: int, *, generator: torch.Generator) -> PairBatch:
        _check_args("Lookup", batch, d, self.min_distance)
        g, B, m = generator, batch, self.m
        rows = torch.arange(B)[:, None]  # (B, 1)
        symbol = torch.randint(0, self.n_noise, (B, d), generator=g)  # (B, d) noise
        role = torch.full((B, d), self.none_role, dtype=torch.long)
        keys = self.n_noise + _distinct(B, self.n_keys, m, g)  # (B, m)
        values = torch.randint(0, self.n_values, (B, m), generator=g)  # (B, m)
        where = _distinct(B, d, m, g)  # (B, m)
        symbol[rows, where] = keys
        role[rows, where] = values
        order = _distinct(B, m, m, g)  # (B, m): a permutation per row
        asked = torch.stack([keys.gather(1, order), torch.full((B, m), self.query_role)], dim=-1)  # (B, m, 2)
        sep = torch.tensor([self.sep_symbol, self.none_role])
        return PairBatch(torch.stack([symbol, role], dim=-1), asked, values.gather(1, order), sep)


TASKS: dict[str, type[Task]] = {t.name: t for t in (Retrieval, SelectiveCopy, Adding, Lookup)}


def get_task(name: str) -> Task:
    """A task with its default settings, by name (one of `TASKS`)."""
    try:
        return TASKS[name]()
    except KeyError:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {name!r}") from None
