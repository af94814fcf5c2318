"""Context-parallel attention on a laptop's CPU: 4 processes, gloo, loopback.

    torchrun --nproc-per-node 4 examples/ring_attention.py

(With GPUs, ``torchrun --nproc-per-node <GPUs> examples/ring_attention.py --device cuda`` uses NCCL.)

1. Splits one sequence over the ranks (zigzag layout: balanced causal work), runs
   `attnkit.distributed.ring_attention` and `ulysses_attention` forward and backward, and
   checks them against `attnkit.attention` on the whole sequence in one process.
2. Trains a small causal language model context-parallel: `context_parallel` makes its
   attention and RoPE work on shards; the parameter gradients are all-reduced.
"""

from __future__ import annotations

import argparse
import datetime
import os

import torch
import torch.distributed as dist

import attnkit
from attnkit.distributed import context_parallel, ring_attention, shard_sequence, ulysses_attention, unshard_sequence
from attnkit.nn import LanguageModel


def log(*args) -> None:
    if dist.get_rank() == 0:
        print(*args, flush=True)


def check_functions(device: torch.device, layout: str) -> None:
    B, H, Hk, L, D = 2, 8, 2, 1000, 64  # 1000 does not divide by 2 * 4: shard_sequence pads, seq_len says so
    gen = torch.Generator().manual_seed(0)  # the same full inputs on every rank
    q, k, v, dout = (torch.randn(B, h, L, D, generator=gen).to(device) for h in (H, Hk, Hk, H))
    full = attnkit.attention(q, k, v, causal=True)

    for fn in (ring_attention, ulysses_attention):
        qs, ks, vs = (shard_sequence(x, layout=layout).requires_grad_() for x in (q, k, v))
        out = fn(qs, ks, vs, causal=True, layout=layout, seq_len=L)  # (B, H, L_pad / P, D)
        out.backward(shard_sequence(dout, layout=layout))
        err = (unshard_sequence(out, layout=layout, seq_len=L) - full).abs().max().item()
        log(f"{fn.__name__:18s} P={dist.get_world_size()} L={L} shard={qs.shape[2]}: max |out - attention| = {err:.1e}")


def train_context_parallel(device: torch.device, layout: str, steps: int) -> None:
    torch.manual_seed(0)  # the same weights on every rank
    model = LanguageModel(vocab_size=256, dim=128, heads=8, depth=2, kv_heads=2).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    text = torch.randint(0, 256, (4, 513), generator=torch.Generator().manual_seed(1)).to(device)
    inputs, targets = text[:, :-1], text[:, 1:]  # (B, 512) each
    cp = context_parallel(model, layout=layout)  # every attention and RoPE module now works on shards
    for step in range(steps):
        x = shard_sequence(inputs, layout=layout, dim=1)  # (B, 512 / P) tokens of this rank
        y = shard_sequence(targets, layout=layout, dim=1)
        logits = model(x)  # (B, 512 / P, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum") / targets.numel()
        optimizer.zero_grad()
        loss.backward()
        for p in model.parameters():  # each rank holds a partial sum (DistributedDataParallel would do this)
            dist.all_reduce(p.grad)
        optimizer.step()
        dist.all_reduce(loss.detach())
        log(f"step {step}: loss {loss.item():.3f}")
    cp.restore()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--layout", default="zigzag", choices=["contiguous", "zigzag"])
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    # A dead or hung peer makes the others fail after this long, instead of waiting forever.
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=60))
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    check_functions(device, args.layout)
    train_context_parallel(device, args.layout, args.steps)
    dist.barrier()  # nobody tears down the group while a peer still uses it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
