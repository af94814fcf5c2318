"""Training and evaluation, identical for every model: same optimizer, steps, batches and seeds.

The optimizer is AdamW with a linear warm-up and a cosine decay, gradients clipped to norm 1.
Every model of a comparison sees the same batches: they come from one `torch.Generator`
seeded with ``TrainConfig.seed``, and the distance schedule is a function of the step only.

Distance curriculum. A model that starts by attending uniformly over ``L`` positions gets a
learning signal of order ``1 / L`` from the one position that matters, so at ``d = 512`` the
first hundreds of steps are spent near chance (we measured it). As is common for
long-range synthetic tasks (Zaremba and Sutskever 2014, "Learning to Execute", section 3),
the distance of the training batches grows geometrically from ``start_distance`` to ``d``
over the first ``curriculum`` share of the steps, then stays at ``d``; evaluation is always
at ``d`` exactly. Every model gets the same schedule; ``curriculum=None`` turns it off.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit.apps.compare.networks import logits_for
from attnkit.apps.compare.tasks import Batch, PairBatch, Task

__all__ = ["TrainConfig", "TrainResult", "distance_at", "evaluate", "loss_and_correct", "train"]

Progress = Callable[..., Iterable]


@dataclass(frozen=True)
class TrainConfig:
    """What every model of a comparison shares."""

    steps: int = 200
    batch: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup: int = 20
    clip: float = 1.0
    curriculum: float | None = 0.5
    start_distance: int = 16
    eval_examples: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch < 1:
            raise ValueError(f"TrainConfig: steps and batch must be >= 1, got steps={self.steps}, batch={self.batch}")
        if self.curriculum is not None and not 0.0 < self.curriculum <= 1.0:
            raise ValueError(f"TrainConfig: curriculum must lie in (0, 1] or be None, got {self.curriculum!r}")

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    """What one training run produced."""

    steps: int
    seconds: float
    final_loss: float
    losses: list[float] = field(default_factory=list)  # the loss every `log_every` steps
    log_every: int = 1


def distance_at(step: int, d: int, config: TrainConfig, task: Task) -> int:
    """The training distance at ``step``: ``start -> d`` geometrically over the curriculum, then ``d``."""
    start = max(task.min_distance, min(config.start_distance, d))
    if config.curriculum is None or d <= start:
        return d
    frac = min(1.0, step / (config.curriculum * config.steps))
    return min(d, round(start * (d / start) ** frac))


def loss_and_correct(model: nn.Module, task: Task, batch: Batch | PairBatch) -> tuple[Tensor, int, int]:
    """The task's loss on ``batch`` and how many scored positions ``model`` gets right.

    Classification: cross-entropy, right = argmax equals the target. Regression: mean squared
    error, right = within ``task.tolerance``. Returns ``(loss, correct, scored)``.
    """
    out, targets, mask = logits_for(model, batch)  # (B, L, n_outputs), (B, L), (B, L)
    if task.kind == "regression":
        pred, want = out[..., 0][mask], targets[mask]  # (n,)
        return F.mse_loss(pred, want), int(((pred - want).abs() < task.tolerance).sum()), int(mask.sum())
    scored, want = out[mask], targets[mask]  # (n, n_outputs), (n,)
    return F.cross_entropy(scored, want), int((scored.argmax(-1) == want).sum()), int(mask.sum())


def _schedule(config: TrainConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / max(1, config.warmup))
        return warm * 0.5 * (1.0 + math.cos(math.pi * min(step, config.steps) / config.steps))

    return factor


def train(
    model: nn.Module,
    task: Task,
    d: int,
    config: TrainConfig,
    *,
    progress: Progress | None = None,
    desc: str = "train",
    log_every: int = 10,
) -> TrainResult:
    """Train ``model`` on ``task`` at distance ``d`` (with the curriculum of ``config``).

    ``progress(iterable, desc=..., total=...)`` wraps the step loop (a tqdm bar in the CLI).
    """
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(config))
    gen = torch.Generator().manual_seed(config.seed)
    steps: Iterable[int] = range(config.steps)
    if progress is not None:
        steps = progress(steps, desc=desc, total=config.steps)
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    loss = torch.zeros(())
    for step in steps:
        batch = task.sample(config.batch, distance_at(step, d, config, task), generator=gen).to(device)
        loss, _, _ = loss_and_correct(model, task, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), config.clip)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == config.steps - 1:
            losses.append(loss.item())
    return TrainResult(config.steps, time.perf_counter() - start, loss.item(), losses, log_every)


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, d: int, config: TrainConfig, *, chunk: int = 64) -> float:
    """Accuracy at distance ``d`` on ``config.eval_examples`` fresh examples (a generator of its
    own, seeded from ``config.seed``, never the training batches)."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(config.seed + 1_000_003)
    model.eval()
    correct = scored = 0
    left = config.eval_examples
    while left > 0:
        n = min(chunk, left)
        _, c, s = loss_and_correct(model, task, task.sample(n, d, generator=gen).to(device))
        correct, scored, left = correct + c, scored + s, left - n
    model.train()
    return correct / scored
