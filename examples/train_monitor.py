"""Watch attention heads specialise while a small language model learns the retrieval task.

The data is `attnkit compare`'s retrieval task (`attnkit.apps.compare.tasks.Retrieval`):
facts ``(key, value)`` among distractor facts and noise, and a query naming one key ``d``
positions later; the answer is the key's value. For a decoder-only language model each
position ``(symbol, role)`` becomes two tokens, ``role symbol``: a fact reads ``v k``, noise
``NONE n``, the query ``QUERY k``, and the model answers at the query's last token ``k``. It can
find the earlier ``k`` by its content, but the value sits one token before it: the two steps of
an induction circuit (Olsson et al., 2022), a head that copies the previous token into each
position (local), then a head that reaches back ``2d`` tokens to the matching key (long range).

`attnkit.inspect.Monitor` describes every head every ``--every`` steps, as a probe: on one fixed
batch (``d = 24``), run without gradients, so that the figures move with training and not with
the batch drawn, and at the position the loss scores (``focus``: the query's key token), where
the answer is looked up; averaged over every position (mostly noise the loss never reads) the
heads stay alike. The figure drawn by ``attnkit monitor-report`` shows which heads became
local and which long-range, and when (the time and memory it shows are those of the probe's
no-grad forward).

Each batch draws its distance ``d`` from ``--distances`` (default 12 to 36; one fixed ``d``
would let the model find the answer at a fixed offset), and sequences are left-padded with
noise to one length, ``2 (36 + 8) = 88`` tokens, so that the facts do not sit at fixed
positions. Here ``far`` is 16 tokens (the default, 256, suits long contexts) and ``near`` stays 8.

Run (a few minutes on a CPU)::

    python examples/train_monitor.py --minutes 6 --threads 1 --logdir runs/train_monitor \
        --png docs/results/train_monitor.png
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from attnkit.apps import monitor_report
from attnkit.apps.compare.tasks import Retrieval
from attnkit.inspect import Monitor
from attnkit.nn import LanguageModel


def as_tokens(task: Retrieval, inputs: torch.Tensor) -> torch.Tensor:
    """``(B, L, 2)`` (symbol, role) channels -> ``(B, 2L)`` tokens ``role_0 symbol_0 role_1 symbol_1 ...``.

    Symbols keep their ids ``[0, S)``; roles (values, QUERY, NONE) follow as ``S + role``.
    """
    symbols = task.vocab_sizes[0]
    pairs = torch.stack([symbols + inputs[..., 1], inputs[..., 0]], dim=-1)  # (B, L, 2)
    return pairs.flatten(1)  # (B, 2L)


def batch_of(
    task: Retrieval, size: int, d: int, longest: int, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``tokens (B, 2L)``, the answer's position ``(B,)`` (the query's key token) and the answer ``(B,)``.

    Each sequence is left-padded with ``longest - d`` noise positions, so every batch has the same
    length ``L = longest + slack`` and the facts do not sit at fixed positions.
    """
    b = task.sample(size, d, generator=g)
    pad = longest - d
    noise = torch.stack(
        [torch.randint(0, task.n_noise, (size, pad), generator=g), torch.full((size, pad), task.none_role)], dim=-1
    )  # (B, pad, 2): (noise symbol, NONE)
    tokens = as_tokens(task, torch.cat([noise, b.inputs], dim=1))  # (B, 2L)
    query = pad + b.loss_mask.float().argmax(-1)  # (B,): the query's position
    answer = b.targets[torch.arange(size), query - pad]  # (B,) value ids
    return tokens, 2 * query + 1, answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=6.0, help="training time budget (default 6)")
    parser.add_argument("--every", type=int, default=50, help="monitor every N steps (default 50)")
    parser.add_argument("--logdir", default="runs/train_monitor", help="the monitor's log folder")
    parser.add_argument("--png", default=None, help="figure path (default LOGDIR/monitor-report.png)")
    parser.add_argument("--distances", type=int, nargs=2, default=(12, 36), help="range of d (default 12 36)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)

    task = Retrieval()
    vocab = task.vocab_sizes[0] + task.vocab_sizes[1]
    model = LanguageModel(vocab, 64, 4, 2, positions="rope", ff_dim=128)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    monitor = Monitor(model, every=args.every, logdir=args.logdir, near=8, far=16)
    probe, probe_where, _ = batch_of(task, 32, 24, args.distances[1], torch.Generator().manual_seed(args.seed + 1))
    scored = torch.zeros(probe.shape, dtype=torch.bool)
    scored[torch.arange(len(probe_where)), probe_where] = True  # (B, 2L): the query's key token of each sequence
    deadline = time.monotonic() + 60 * args.minutes
    correct, seen, step = 0, 0, 0
    with contextlib.closing(monitor):
        while time.monotonic() < deadline:
            d = int(torch.randint(args.distances[0], args.distances[1] + 1, (1,), generator=g))
            tokens, where, answer = batch_of(task, 32, d, args.distances[1], g)
            logits = model(tokens)  # (B, 2L, V)
            picked = logits[torch.arange(len(where)), where, : task.n_values]  # (B, values): the answer's logits
            loss = F.cross_entropy(picked, answer)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            correct += int((picked.argmax(-1) == answer).sum())
            seen += len(answer)
            row = monitor.step(probe, focus=scored)  # every `every` steps: one no-grad forward on the probe
            if row is not None:
                heads = [r for r in monitor.history if r["step"] == step]
                labels = " ".join(f"{r['layer'][7]}.{r['head']}:{r['reach'][:4]}/{r['role'][:4]}" for r in heads)
                print(f"step {step:5d}  loss {loss.item():.3f}  accuracy {correct / max(seen, 1):.2f}  {labels}")
                correct = seen = 0
            step += 1
    png = Path(args.png) if args.png else Path(args.logdir) / "monitor-report.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    heads, steps = monitor_report.read_log(Path(args.logdir))
    monitor_report.draw(heads, steps, png)
    print("\n".join(monitor_report.summary_lines(heads)))
    print(f"{step} steps; wrote {png}")


if __name__ == "__main__":
    main()
