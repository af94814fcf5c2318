"""``attnkit bench distributed``: context-parallel attention at a fixed total length on 1, 2, 4 ranks.

For every (method, ranks) it starts ``P`` fresh processes on loopback (gloo on CPU, NCCL
on GPU, one GPU per rank), each holding ``L / P`` of the sequence, and measures per rank:

* the step time (forward + backward of the attention alone), the slowest rank's median;
* the peak memory the step adds (RSS high-water mark on CPU, the allocator's peak on GPU):
  with the sequence split, it should fall about as ``1 / P``;
* the bytes this rank sends in one step, measured (by counting what is handed to
  ``batch_isend_irecv`` / ``all_to_all_single``) and computed from the formulas below;
* the time of one bare K/V hop (the ring's unit of communication) next to the time of one
  block of compute, the two numbers the overlap model of ``docs/distributed.md`` compares.

Bytes sent per rank per step (``S = B * Hk * (L / P)``, ``e`` the element size):

* ring: forward ``(P - 1) * S * (D + Dv) * e``; backward the same K/V again plus ``P`` hops
  of the fp32 dK/dV accumulator, ``P * S * (D + Dv) * 4``;
* Ulysses: forward ``(P - 1) / P`` of q, k, v and out; backward the same for their gradients.

Example (the lead's full run on a quiet machine)::

    attnkit bench distributed --length 16384 --ranks 1 2 4
"""

from __future__ import annotations

import argparse
import concurrent.futures
import socket
import sys
from typing import Any

from attnkit.apps.checks import (
    DefaultsHelpFormatter,
    UsageError,
    check_output_dir,
    int_at_least,
    main_for,
    positive_float,
)
from attnkit.apps.harness import DEFAULT_OUT, progress, run_case, write_results

NAME = "distributed"
HELP = "ring and Ulysses attention on 1/2/4 ranks: step time, per-rank peak memory, bytes sent"


# ------------------------------------------------------------------ formulas
def computed_bytes(
    method: str, world: int, *, batch: int, heads: int, kv_heads: int, length: int, head_dim: int, itemsize: int
) -> int:
    """Bytes one rank sends in a forward + backward step (see the module docstring)."""
    if world == 1:
        return 0
    shard = length // world
    if method == "ring":
        kv = batch * kv_heads * shard * 2 * head_dim * itemsize  # one K/V shard
        dkv = batch * kv_heads * shard * 2 * head_dim * 4  # its fp32 dK/dV accumulator
        return 2 * (world - 1) * kv + world * dkv
    kv_heads_sent = kv_heads if kv_heads % world == 0 else heads  # replicated when P does not divide Hk
    per_tensor = {"q": heads, "k": kv_heads_sent, "v": kv_heads_sent, "out": heads}
    elems = sum(batch * h * shard * head_dim for h in per_tensor.values())
    return 2 * elems * itemsize * (world - 1) // world  # forward, and the same for the gradients


def flops(batch: int, heads: int, length: int, head_dim: int, causal: bool) -> float:
    """Forward 4·B·H·L²·D (halved for causal), backward 2.5x forward: one training step of attention."""
    fwd = 4 * batch * heads * length * length * head_dim * (0.5 if causal else 1.0)
    return 3.5 * fwd


# -------------------------------------------------------------- one rank
def rank_case(
    *,
    rank: int,
    world: int,
    port: int,
    method: str,
    layout: str,
    device: str,
    dtype: str,
    batch: int,
    heads: int,
    kv_heads: int,
    length: int,
    head_dim: int,
    causal: bool,
    threads: int,
    repeat: int,
) -> dict[str, Any]:
    """One rank of one configuration, in its own process (run by `run_case`)."""
    import datetime

    import torch
    import torch.distributed as dist

    import attnkit
    from attnkit.apps.harness import peak_memory, time_fn
    from attnkit.distributed import ring_attention, ulysses_attention
    from attnkit.distributed.ring import Ring, pack

    torch.set_num_threads(threads)
    cuda = device == "cuda"
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=300),
    )
    dev = torch.device(f"cuda:{rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(dev)
    dt = getattr(torch, dtype)
    shard = length // world
    gen = torch.Generator(device=dev).manual_seed(rank)
    q = torch.randn(batch, heads, shard, head_dim, device=dev, dtype=dt, generator=gen, requires_grad=True)
    k = torch.randn(batch, kv_heads, shard, head_dim, device=dev, dtype=dt, generator=gen, requires_grad=True)
    v = torch.randn(batch, kv_heads, shard, head_dim, device=dev, dtype=dt, generator=gen, requires_grad=True)
    dout = torch.randn(batch, heads, shard, head_dim, device=dev, dtype=dt, generator=gen)

    if method == "single":  # the baseline: attnkit.attention in one process, no torch.distributed in the way

        def attend():
            return attnkit.attention(q, k, v, causal=causal)
    else:
        fn = ring_attention if method == "ring" else ulysses_attention

        def attend():
            return fn(q, k, v, causal=causal, layout=layout)

    def step():
        q.grad = k.grad = v.grad = None
        attend().backward(dout)

    # Count what this rank hands to the transport during one step.
    sent = {"bytes": 0}
    real_batch, real_a2a = dist.batch_isend_irecv, dist.all_to_all_single

    def counting_batch(ops):
        sent["bytes"] += sum(op.tensor.numel() * op.tensor.element_size() for op in ops if op.op is dist.isend)
        return real_batch(ops)

    def counting_a2a(output, input, *args, **kwargs):
        own = input.numel() // world  # the row that stays on this rank is not sent
        sent["bytes"] += (input.numel() - own) * input.element_size()
        return real_a2a(output, input, *args, **kwargs)

    step()  # warm-up (allocator, gloo buffers, first-call paths)
    dist.batch_isend_irecv, dist.all_to_all_single = counting_batch, counting_a2a
    try:
        step()
    finally:
        dist.batch_isend_irecv, dist.all_to_all_single = real_batch, real_a2a
    mem = peak_memory(step)
    dist.barrier()
    timing = time_fn(step, warmup=0, repeat=repeat)

    # One bare K/V hop, and one block of compute (this rank's queries against one K/V shard).
    hop_s = None
    if world > 1:
        ring = Ring(None)
        buf = pack(k.detach(), v.detach(), dtype=dt)

        def hop():
            _, works = ring.exchange(buf, 99)
            ring.wait(works, "a benchmark hop", 0)

        hop_s = time_fn(hop, warmup=1, repeat=repeat)["median_s"]
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    block_s = time_fn(lambda: attnkit.attention(qd, kd, vd), warmup=1, repeat=repeat)["median_s"]
    dist.barrier()
    dist.destroy_process_group()
    peak = mem.get("cuda_peak_bytes", mem["peak_bytes"])
    return {"step_s": timing["median_s"], "peak_bytes": peak, "sent_bytes": sent["bytes"], "hop_s": hop_s,
            "block_forward_s": block_s}  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(world: int, timeout: float, **kwargs: Any) -> dict[str, Any]:
    """Start ``world`` rank processes together; combine their results (slowest rank, largest peak)."""
    port = _free_port()
    with concurrent.futures.ThreadPoolExecutor(world) as pool:
        futures = [
            pool.submit(
                run_case,
                "attnkit.apps.bench.distributed:rank_case",
                {**kwargs, "rank": r, "world": world, "port": port},
                timeout=timeout,
            )
            for r in range(world)
        ]
        ranks = [f.result() for f in futures]
    errors = [r["error"] for r in ranks if "error" in r]
    if errors:
        return {"error": errors[0]}
    hops = [r["hop_s"] for r in ranks if r["hop_s"] is not None]
    return {
        "step_ms": 1e3 * max(r["step_s"] for r in ranks),
        "peak_mib": max(r["peak_bytes"] for r in ranks) / 2**20,
        "sent_mib": max(r["sent_bytes"] for r in ranks) / 2**20,
        "hop_ms": 1e3 * max(hops) if hops else None,
        "block_fwd_ms": 1e3 * max(r["block_forward_s"] for r in ranks),
    }


# ----------------------------------------------------------------- command
POSITIVE = int_at_least(1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = DefaultsHelpFormatter
    parser.add_argument("--length", type=POSITIVE, default=16384, help="total sequence length L")
    parser.add_argument("--ranks", type=POSITIVE, nargs="+", default=[1, 2, 4], help="world sizes (processes)")
    parser.add_argument(
        "--methods", nargs="+", default=["ring", "ulysses"], choices=["ring", "ulysses"], help="methods to run"
    )
    parser.add_argument("--layout", default="zigzag", choices=["contiguous", "zigzag"], help="sequence sharding")
    parser.add_argument("--batch", type=POSITIVE, default=1, help="batch size B")
    parser.add_argument("--heads", type=POSITIVE, default=8, help="query heads H")
    parser.add_argument("--kv-heads", type=POSITIVE, default=None, help="key/value heads (default: --heads)")
    parser.add_argument("--head-dim", type=POSITIVE, default=64, help="head dim D")
    parser.add_argument("--no-causal", dest="causal", action="store_false", help="bidirectional (default causal)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cpu: gloo; cuda: NCCL, a GPU/rank")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "float64", "bfloat16", "float16"],
        help="element type (default: float32 on cpu, bfloat16 on cuda)",
    )
    parser.add_argument(
        "--threads",
        type=POSITIVE,
        default=None,
        help="torch threads per rank (default: $OMP_NUM_THREADS, else $MKL_NUM_THREADS, else cores / ranks)",
    )
    parser.add_argument("--repeat", type=POSITIVE, default=3, help="timed steps per configuration (median)")
    parser.add_argument("--timeout", type=positive_float, default=1800.0, help="seconds per configuration")
    parser.add_argument(
        "--out",
        default=str(DEFAULT_OUT),
        help="directory for distributed.json and .md (default: the current directory)",
    )


def run(args: argparse.Namespace) -> int:
    import os

    kv_heads = args.kv_heads or args.heads
    if args.heads % kv_heads:
        raise UsageError(f"--heads {args.heads} must be a multiple of --kv-heads {kv_heads}")
    check_output_dir(args.out, "--out")
    import torch

    from attnkit.apps.harness import thread_count

    chosen, source = thread_count(args.threads)
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    itemsize = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    configs = [("single", 1)] + [(m, p) for m in args.methods for p in args.ranks]
    rows = []
    for method, world in progress(configs, desc="distributed"):
        row: dict[str, Any] = {"method": method, "ranks": world, "length": args.length}
        n = 2 * world if args.layout == "zigzag" else world
        why = None
        if args.length % n:
            why = f"length {args.length} not divisible by {n} ({args.layout})"
        elif method == "ulysses" and args.heads % world:
            why = f"{args.heads} heads not divisible by {world} ranks"
        elif args.device == "cuda" and world > torch.cuda.device_count():
            why = f"needs {world} GPUs, {torch.cuda.device_count()} present"
        if why:
            rows.append({**row, "note": f"skipped: {why}"})
            continue
        threads = chosen if source != "torch's default" else max(1, (os.cpu_count() or 1) // world)
        result = run_config(
            world, args.timeout, method=method, layout=args.layout, device=args.device, dtype=dtype,
            batch=args.batch, heads=args.heads, kv_heads=kv_heads, length=args.length, head_dim=args.head_dim,
            causal=args.causal, threads=threads, repeat=args.repeat,
        )  # fmt: skip
        if "error" in result:
            rows.append({**row, "note": result["error"]})
            continue
        computed = 0 if method == "single" else computed_bytes(
            method, world, batch=args.batch, heads=args.heads, kv_heads=kv_heads, length=args.length,
            head_dim=args.head_dim, itemsize=itemsize,
        )  # fmt: skip
        row.update(result, computed_mib=computed / 2**20)
        row["tflops"] = flops(args.batch, args.heads, args.length, args.head_dim, args.causal) / world
        row["tflops"] = row["tflops"] / (result["step_ms"] / 1e3) / 1e12  # per rank
        rows.append(row)
    base = {r["method"]: r for r in rows if r["ranks"] == 1 and "peak_mib" in r}
    for r in rows:
        ref = base.get(r["method"]) or base.get("single")
        if "peak_mib" in r and ref:
            r["memory_ratio"] = r["peak_mib"] / ref["peak_mib"] if ref["peak_mib"] else None
    columns = [
        ("method", "method"), ("ranks", "ranks"), ("length", "total L"), ("step_ms", "step ms (slowest rank)"),
        ("tflops", "TFLOP/s per rank"), ("peak_mib", "peak MiB per rank"), ("memory_ratio", "memory vs 1 rank"),
        ("sent_mib", "sent MiB/rank/step (measured)"), ("computed_mib", "sent MiB (computed)"),
        ("hop_ms", "one K/V hop ms"), ("block_fwd_ms", "one block fwd ms"), ("note", "note"),
    ]  # fmt: skip
    notes = [
        f"B={args.batch}, H={args.heads}, Hk={kv_heads}, D={args.head_dim}, {dtype}, "
        f"{'causal' if args.causal else 'bidirectional'}, layout {args.layout}, device {args.device}.",
        "single = attnkit.attention in one process (auto backend: SDPA where it applies); ring/ulysses with 1 "
        "rank run the same code with no peers. Ring blocks use the tiled kernel, Ulysses calls attnkit.attention, "
        "so ring's 1-rank row against single is the tiled kernel's cost against SDPA's.",
        "Step = forward + backward of the attention alone. Peak memory: what the step adds to the process "
        "(RSS high-water mark on CPU, the CUDA allocator's peak on GPU).",
        "Ranks share the machine's cores on CPU (cores / ranks threads each), so step times compare the "
        "communication pattern, not a cluster; see docs/distributed.md for the overlap model.",
    ]
    json_path, md_path = write_results(
        NAME, rows, columns, out_dir=args.out, title="Context-parallel attention", notes=notes
    )
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main_for("python -m attnkit.apps.bench.distributed", HELP, add_arguments, run))
