"""Watch attention heads specialise while a small language model learns to retrieve.

Two of `attnkit compare`'s retrieval tasks (`attnkit.apps.compare.tasks`), written as one token
stream for a decoder-only `attnkit.nn.LanguageModel`; each position ``(symbol, role)`` becomes
two tokens:

* ``--task lookup`` (the default; `Lookup`, multi-query associative recall): a source of ``m``
  facts ``k v`` among noise ``n NONE``, a separator, then the ``m`` keys asked in a new order,
  each as ``QUERY k``; the model answers each key's value at its ``k`` token. That is the form
  ``k v ... k -> v`` an induction circuit solves (Olsson et al., 2022, "In-context learning and
  induction heads"): a head that copies the previous token into each position (*local*), then a
  head that matches the asked key against those copies, about ``2 (d + 1)`` tokens back, and
  reads the value there (*long range*). ``m`` answers per sequence give a dense loss.
* ``--task retrieval`` (`Retrieval`, one query): a fact ``v k`` among distractor facts and
  noise, and the query ``QUERY k`` ``d`` positions later, answered at its ``k`` token; sequences
  are left-padded with noise to ``2 (36 + 8) = 88`` tokens. One answer per sequence, and the
  target sits at an exact distance: this is the run of ``docs/results/train_monitor.md`` whose
  heads became long-range only (it says why).

`attnkit.inspect.Monitor` describes every head every ``--every`` steps, as a probe: on one fixed
batch, run without gradients, so that the figures move with training and not with the batch
drawn, and only at the positions the loss scores (``focus``), where the answer is looked up.
The figure drawn by ``attnkit monitor-report`` shows which heads became local and which
long-range, and when (the time and memory it shows are those of the probe's no-grad forward).
Sequences are short, so ``far`` is 16 tokens (the default, 256, suits long contexts) and
``near`` stays 8.

Run (a few minutes on a CPU)::

    python examples/train_monitor.py --minutes 4 --threads 1 --logdir runs/train_monitor \
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
from attnkit.apps.compare.tasks import Lookup, Retrieval
from attnkit.inspect import Monitor
from attnkit.nn import LanguageModel

Stream = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # tokens (B, T), scored positions (B, Q), answers (B, Q)


def as_tokens(task: Retrieval | Lookup, inputs: torch.Tensor, role_first: torch.Tensor | bool) -> torch.Tensor:
    """``(B, L, 2)`` (symbol, role) channels -> ``(B, 2L)`` tokens, two per position.

    Symbols keep their ids ``[0, S)``; roles (values, QUERY, NONE) follow as ``S + role``. A
    position is written ``role symbol`` where ``role_first`` (a bool, or ``(L,)`` per position),
    else ``symbol role``.
    """
    symbol, role = inputs[..., 0], task.vocab_sizes[0] + inputs[..., 1]  # (B, L) each
    first = torch.where(torch.as_tensor(role_first), role, symbol)
    second = torch.where(torch.as_tensor(role_first), symbol, role)
    return torch.stack([first, second], dim=-1).flatten(1)  # (B, 2L)


def lookup_stream(task: Lookup, size: int, d: int, g: torch.Generator) -> Stream:
    """`Lookup` as one stream: source ``k v`` / ``n NONE``, ``SEP NONE``, then ``QUERY k`` per asked key.

    Scored: each asked key's ``k`` token (the second token of its position), ``(B, m)``; answers
    ``(B, m)`` value ids. ``T = 2 (d + 1 + m)``.
    """
    b = task.sample(size, d, generator=g)
    inputs = torch.cat([b.source, b.sep_token.expand(size, 1, 2), b.target_inputs], dim=1)  # (B, L, 2)
    L = inputs.shape[1]
    asked = torch.arange(L - task.m, L)  # (m,) the query positions
    role_first = torch.zeros(L, dtype=torch.bool)
    role_first[asked] = True
    where = (2 * asked + 1).expand(size, -1)  # (B, m)
    return as_tokens(task, inputs, role_first), where, b.targets


def retrieval_stream(task: Retrieval, size: int, d: int, longest: int, g: torch.Generator) -> Stream:
    """`Retrieval` as one stream of ``role symbol`` pairs, left-padded with noise to ``longest + slack`` positions.

    The padding (``longest - d`` noise positions) gives every batch one length and keeps the
    facts off fixed positions. Scored: the query's key token ``(B, 1)``; answer ``(B, 1)``.
    """
    b = task.sample(size, d, generator=g)
    pad = longest - d
    noise = torch.stack(
        [torch.randint(0, task.n_noise, (size, pad), generator=g), torch.full((size, pad), task.none_role)], dim=-1
    )  # (B, pad, 2): (noise symbol, NONE)
    tokens = as_tokens(task, torch.cat([noise, b.inputs], dim=1), True)  # (B, 2L)
    query = pad + b.loss_mask.float().argmax(-1)  # (B,): the query's position
    answer = b.targets[torch.arange(size), query - pad]  # (B,) value ids
    return tokens, (2 * query + 1)[:, None], answer[:, None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=("lookup", "retrieval"), default="lookup", help="the data (default lookup)")
    parser.add_argument("--minutes", type=float, default=4.0, help="training time budget (default 4)")
    parser.add_argument("--every", type=int, default=50, help="monitor every N steps (default 50)")
    parser.add_argument("--logdir", default="runs/train_monitor", help="the monitor's log folder")
    parser.add_argument("--png", default=None, help="figure path (default LOGDIR/monitor-report.png)")
    parser.add_argument(
        "--distances", type=int, nargs=2, default=None, help="range of d (default: lookup 8 16, retrieval 12 36)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)

    if args.task == "lookup":
        task = Lookup()
        lo, hi = args.distances or (8, 16)
        # the model names the value token itself: the copy an induction head makes
        classes = slice(task.vocab_sizes[0], task.vocab_sizes[0] + task.n_values)

        def draw(size: int, d: int, gen: torch.Generator) -> Stream:
            return lookup_stream(task, size, d, gen)
    else:
        task = Retrieval()
        lo, hi = args.distances or (12, 36)
        classes = slice(0, task.n_values)  # the first ids' logits as class scores (the committed run)

        def draw(size: int, d: int, gen: torch.Generator) -> Stream:
            return retrieval_stream(task, size, d, hi, gen)

    vocab = task.vocab_sizes[0] + task.vocab_sizes[1]
    model = LanguageModel(vocab, 64, 4, 2, positions="rope", ff_dim=128)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    monitor = Monitor(model, every=args.every, logdir=args.logdir, near=8, far=16)
    probe, probe_where, _ = draw(32, (lo + hi) // 2, torch.Generator().manual_seed(args.seed + 1))
    scored = torch.zeros(probe.shape, dtype=torch.bool)
    scored.scatter_(1, probe_where, True)  # (B, T): the scored positions of each sequence
    deadline = time.monotonic() + 60 * args.minutes
    correct, seen, step = 0, 0, 0
    with contextlib.closing(monitor):
        while time.monotonic() < deadline:
            d = int(torch.randint(lo, hi + 1, (1,), generator=g))
            tokens, where, answer = draw(32, d, g)
            logits = model(tokens)  # (B, T, V)
            picked = logits[torch.arange(len(where))[:, None], where, classes]  # (B, Q, n_values)
            loss = F.cross_entropy(picked.flatten(0, 1), answer.flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            correct += int((picked.argmax(-1) == answer).sum())
            seen += answer.numel()
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
