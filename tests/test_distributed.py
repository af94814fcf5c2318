"""Ring and Ulysses attention over gloo on loopback, against single-process float64 attention.

The tests spawn ``P`` = 2, 3 and 4 worker processes (this file run as a script), one
process group per world size running every case, so the cost of starting processes is
paid once per world size. Every worker compares its own shard of the output and of the
gradients of ``q``, ``k``, ``v`` with the same shard of `attnkit.attention` computed in
float64 on the whole sequence, and writes the errors to a JSON file; the tests read them.

Bounded in time three ways: the process group's ``timeout`` (``GROUP_TIMEOUT_S``), the
``Popen.wait`` on each worker (``WORKER_TIMEOUT_S``, then killed) and pytest-timeout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import attnkit
from attnkit.distributed import (
    PeerError,
    merge_shards,
    overlap_block_length,
    padded_length,
    ring_attention,
    segments,
    shard,
    ulysses_attention,
)

GROUP_TIMEOUT_S = 20  # init_process_group(timeout=...) in the workers
FAULT_TIMEOUT_S = 3  # the timeout of the pair groups in the fault tests: the survivor must fail about this fast
WORKER_TIMEOUT_S = 120  # each worker process is killed after this
TOL = 1e-5  # fp32 ring/Ulysses against the float64 single-process result

# name -> options. Ring cases use Hq=4; Ulysses cases Hq=12 (divisible by 2, 3 and 4).
CASES: dict[str, dict] = {
    "ring-contiguous-full": dict(fn="ring", layout="contiguous", hk=4),
    "ring-contiguous-causal-gqa": dict(fn="ring", layout="contiguous", hk=2, causal=True),
    "ring-zigzag-causal-gqa": dict(fn="ring", layout="zigzag", hk=2, causal=True),
    "ring-zigzag-full-mqa-dv": dict(fn="ring", layout="zigzag", hk=1, dv=6),
    "ring-zigzag-causal-alibi": dict(fn="ring", layout="zigzag", hk=4, causal=True, alibi=True),
    "ring-contiguous-alibi-softcap-scale": dict(
        fn="ring", layout="contiguous", hk=2, alibi=True, softcap=2.0, scale=0.5
    ),
    "ring-contiguous-window": dict(fn="ring", layout="contiguous", hk=2, window=(5, 3)),
    "ring-zigzag-causal-window": dict(fn="ring", layout="zigzag", hk=2, causal=True, window=(4, None)),
    "ring-contiguous-causal-padded": dict(fn="ring", layout="contiguous", hk=2, causal=True, short=3),
    "ring-zigzag-full-padded": dict(fn="ring", layout="zigzag", hk=2, short=5),
    "ring-zigzag-causal-gqa-bf16": dict(fn="ring", layout="zigzag", hk=2, causal=True, dtype="bfloat16"),
    # Scores of magnitude ~1e2-1e3 (``logits``: the largest |q.k| * scale): exp() overflows unless every block
    # subtracts its row maximum. A softcap sends the blocks through the tiled kernel's torch engine.
    "ring-zigzag-causal-large-logits": dict(fn="ring", layout="zigzag", hk=2, causal=True, logits=600.0),
    "ring-contiguous-softcap-large-logits": dict(fn="ring", layout="contiguous", hk=4, softcap=800.0, logits=2000.0),
    "ulysses-contiguous-causal-gqa": dict(fn="ulysses", layout="contiguous", hq=12, hk=6, causal=True),
    "ulysses-zigzag-causal-alibi-mqa": dict(fn="ulysses", layout="zigzag", hq=12, hk=1, causal=True, alibi=True),
    "ulysses-contiguous-window-padded": dict(fn="ulysses", layout="contiguous", hq=12, hk=3, window=(3, 2), short=3),
    "ulysses-zigzag-full-padded": dict(fn="ulysses", layout="zigzag", hq=12, hk=12, short=5),
}
# Whole models made context-parallel by context_parallel(), in float64, against the same model in one process.
MODEL_CASES: dict[str, dict] = {
    "model-ring-zigzag-rope-gqa-padded": dict(method="ring", layout="zigzag", positions="rope", short=3),
    "model-ring-contiguous-learned": dict(method="ring", layout="contiguous", positions="learned"),
    "model-ulysses-zigzag-sinusoidal-window": dict(method="ulysses", layout="zigzag", positions="sinusoidal", window=4),
}
MODEL_TOL = 1e-9
WORLDS = (2, 3, 4)
# Ranks that pass different shards or options: one group of PEER_WORLD ranks runs every case, rank "odd"
# passes something else, and every rank must raise PeerError naming the field and each rank's value.
PEER_WORLD = 3
PEER_SHAPE = (1, 3, 4, 8)  # (B, H, L / P, D): Hq = 3 divides P = 3, so Ulysses takes it too
PEER_CASES: dict[str, dict] = {
    "length": dict(fn="ring", odd=2, field="q shape", shape=(1, 3, 6, 8), values=("(1, 3, 4, 8)", "(1, 3, 6, 8)")),
    "dtype": dict(fn="ring", odd=1, field="q dtype", dtype="float64", values=("torch.float32", "torch.float64")),
    "same-numel-other-shape": dict(
        fn="ulysses", odd=2, field="q shape", shape=(1, 6, 2, 8), values=("(1, 3, 4, 8)", "(1, 6, 2, 8)")
    ),
    "causal": dict(fn="ulysses", odd=1, field="causal", kw=dict(causal=True), values=("False", "True")),
    "window": dict(fn="ring", odd=2, field="window", kw=dict(window=(2, 1)), values=("None", "(2, 1)")),
    "scale": dict(fn="ring", odd=1, field="scale", kw=dict(scale=0.5), values=(repr(1 / 8**0.5), "0.5")),
    "alibi": dict(fn="ulysses", odd=2, field="alibi", kw=dict(alibi=True), values=("None", "slopes summing to")),
    "layout": dict(fn="ring", odd=1, field="layout", kw=dict(layout="zigzag"), values=("'contiguous'", "'zigzag'")),
    "gradients": dict(fn="ring", odd=2, field="gradients", grad=True, values=("no gradients", "needs gradients")),
    "function": dict(
        fn="ring", odd=1, field="function", other="ulysses", values=("ring_attention", "ulysses_attention")
    ),
    # k and v are described apart from q: one rank's GQA keys or narrower values differ from its peers'
    "key-heads": dict(
        fn="ring",
        odd=2,
        field="k shape",
        k_shape=(1, 1, 4, 8),
        v_shape=(1, 1, 4, 8),
        values=("(1, 3, 4, 8)", "(1, 1, 4, 8)"),
    ),
    "value-width": dict(
        fn="ring", odd=1, field="v shape", v_shape=(1, 3, 4, 6), values=("(1, 3, 4, 8)", "(1, 3, 4, 6)")
    ),
    "seq_len": dict(fn="ring", odd=2, field="seq_len", kw=dict(seq_len=11), values=("12", "11")),
}
# Each fault suite runs 4 ranks as two pairs: (what rank 1 does, method of pair 0), (rank 3, pair 1).
FAULT_SUITES = {
    "faults-a": (("dies", "ring"), ("hangs", "ulysses")),
    "faults-b": (("hangs", "ring"), ("dies", "ulysses")),
}


# ------------------------------------------------------------------ the worker
def _init(rank: int, world: int, port: int, timeout_s: float) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def _run_case(opts: dict, rank: int, world: int, counter: Callable | None = None) -> dict[str, float]:
    """Errors of this rank's shard of ``out``, ``dq``, ``dk``, ``dv`` against float64 attention.

    ``counter()`` starts counting the bytes this rank sends (``.stop()``, then ``.bytes``);
    default: `_count_sent_bytes`, which wraps ``torch.distributed``'s calls.
    """
    layout = opts["layout"]
    B, Hq, Hk, D, Dv = 2, opts.get("hq", 4), opts["hk"], 8, opts.get("dv", 8)
    L = padded_length(6 * world, world, layout) - opts.get("short", 0)  # the true length
    gen = torch.Generator().manual_seed(1234 + world)  # the same full inputs on every rank
    q = torch.randn(B, Hq, L, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, Hk, L, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, Hk, L, Dv, generator=gen, dtype=torch.float64)
    dout = torch.randn(B, Hq, L, Dv, generator=gen, dtype=torch.float64)
    kw = {name: opts[name] for name in ("causal", "window", "alibi", "softcap", "scale") if name in opts}
    if "logits" in opts:  # scale q so that the largest |score| before any softcap is opts["logits"]
        s = q @ k.repeat_interleave(Hq // Hk, dim=1).mT * kw.get("scale", D**-0.5)  # (B, Hq, L, L)
        q = q * (opts["logits"] / s.abs().max())

    # The single-process truth, in float64.
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    ref = attnkit.attention(qr, kr, vr, backend="reference", **kw)
    ref.backward(dout)

    # This rank's shards, in fp32 (or the case's dtype), padded if L does not divide.
    def sh(x):
        return shard(x, rank, world, layout=layout)

    dtype = getattr(torch, opts.get("dtype", "float32"))
    base = {}
    if dtype != torch.float32 or "logits" in opts:  # the error of one-process attention in that dtype: the yardstick
        qb, kb, vb = (x.to(dtype).requires_grad_() for x in (q, k, v))
        out_b = attnkit.attention(qb, kb, vb, **kw)
        out_b.backward(dout.to(dtype))
        base = {
            "base_out": (sh(out_b.detach()).double() - sh(ref.detach())).abs().max().item(),
            "base_dq": (sh(qb.grad).double() - sh(qr.grad)).abs().max().item(),
            "base_dk": (sh(kb.grad).double() - sh(kr.grad)).abs().max().item(),
            "base_dv": (sh(vb.grad).double() - sh(vr.grad)).abs().max().item(),
        }
    qs, ks, vs = (sh(x).to(dtype).requires_grad_() for x in (q, k, v))
    fn = ring_attention if opts["fn"] == "ring" else ulysses_attention
    sent = (counter or _count_sent_bytes)()
    try:
        out = fn(qs, ks, vs, layout=layout, seq_len=L, **kw)
        out.backward(sh(dout).to(dtype))  # zero at padded positions
    finally:
        sent.stop()
    n = qs.shape[2]
    pos = torch.cat([torch.arange(g.start, g.start + g.length) for g in segments(rank, world, layout, n)])  # (n,)
    real = pos < L  # the local rows that are not padding
    return {
        "out": (out[:, :, real].double() - sh(ref.detach())[:, :, real]).abs().max().item(),
        "dq": (qs.grad.double() - sh(qr.grad)).abs().max().item(),
        "dk": (ks.grad.double() - sh(kr.grad)).abs().max().item(),
        "dv": (vs.grad.double() - sh(vr.grad)).abs().max().item(),
        **{
            f"size_{name}": t.abs().max().item()
            for name, t in zip(("out", "dq", "dk", "dv"), (ref, qr.grad, kr.grad, vr.grad))
        },
        "sent_bytes": sent.bytes,
        "shape": [B, Hq, Hk, L, D, Dv],
        "itemsize": qs.element_size(),
        **base,
    }


class _count_sent_bytes:
    """Count the bytes this process hands to ``batch_isend_irecv`` and ``all_to_all_single``."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.bytes = 0
        self._batch, self._a2a = dist.batch_isend_irecv, dist.all_to_all_single

        def batch(ops):
            self.bytes += sum(op.tensor.numel() * op.tensor.element_size() for op in ops if op.op is dist.isend)
            return self._batch(ops)

        def a2a(output, input, *args, group=None, **kwargs):
            world = dist.get_world_size(group)
            self.bytes += (input.numel() - input.numel() // world) * input.element_size()  # own row stays
            return self._a2a(output, input, *args, group=group, **kwargs)

        dist.batch_isend_irecv, dist.all_to_all_single = batch, a2a

    def stop(self) -> None:
        import torch.distributed as dist

        dist.batch_isend_irecv, dist.all_to_all_single = self._batch, self._a2a


def _run_model_case(opts: dict, rank: int, world: int) -> dict[str, float]:
    """A small LanguageModel: this rank's logits and the all-reduced parameter gradients against one process."""
    import torch.distributed as dist

    from attnkit.distributed import context_parallel
    from attnkit.nn import LanguageModel

    layout = opts["layout"]
    L = padded_length(4 * world, world, layout) - opts.get("short", 0)
    extra = {"window": opts["window"]} if "window" in opts else {}
    torch.manual_seed(7)  # the same weights and tokens on every rank
    model = LanguageModel(32, 24, 12, 2, kv_heads=6, positions=opts["positions"], max_len=64, **extra).double()
    tokens = torch.randint(0, 32, (2, L))
    weight = torch.randn(2, L, 32, dtype=torch.float64)  # loss = sum(logits * weight)

    ref = model(tokens)  # (B, L, V)
    (ref * weight).sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    with context_parallel(model, layout=layout, method=opts["method"], seq_len=L):
        logits = model(shard(tokens, rank, world, layout=layout, dim=1))  # (B, L_pad / P, V)
        (logits * shard(weight, rank, world, layout=layout, dim=1)).sum().backward()
    for p in model.parameters():  # each rank holds a partial sum of the gradient
        dist.all_reduce(p.grad)
    n = logits.shape[1]
    pos = torch.cat([torch.arange(g.start, g.start + g.length) for g in segments(rank, world, layout, n)])
    real = pos < L
    want = shard(ref.detach(), rank, world, layout=layout, dim=1)
    return {
        "out": (logits[:, real] - want[:, real]).abs().max().item(),
        "grads": max((p.grad - ref_grads[n]).abs().max().item() for n, p in model.named_parameters()),
    }


def _run_sharding(rank: int, world: int) -> dict[str, bool]:
    """shard_sequence / unshard_sequence through the group: this rank's shard, and the whole back on every rank."""
    from attnkit.distributed import shard_sequence, unshard_sequence

    out = {}
    for layout in ("contiguous", "zigzag"):
        x = torch.randn(2, 3, 4 * world + 1, 5, generator=torch.Generator().manual_seed(world))  # never divides
        local = shard_sequence(x, layout=layout)
        out[f"{layout}-shard"] = torch.equal(local, shard(x, rank, world, layout=layout))
        out[f"{layout}-unshard"] = torch.equal(unshard_sequence(local, layout=layout, seq_len=x.shape[2]), x)
    return out


def timed_call(fn, *args, **kwargs) -> dict:
    """``fn(*args, **kwargs)``'s error (None if it returned), whether a PeerError, its cause's classes, seconds."""
    start = time.monotonic()
    try:
        fn(*args, **kwargs)
        return {"error": None}
    except Exception as e:
        cause = e.__cause__
        return {
            "error": f"{type(e).__name__}: {e}",
            "peer_error": isinstance(e, PeerError),
            "cause": None if cause is None else [c.__name__ for c in type(cause).__mro__],
            "elapsed": time.monotonic() - start,
        }


def _run_peer_suite(rank: int, world: int) -> dict[str, dict]:
    """Every PEER_CASES case, then a correct call (the group still works), then a late call after rank 0 gave up."""
    results: dict[str, dict] = {}
    for name, opts in PEER_CASES.items():
        odd = rank == opts["odd"]
        dtype = getattr(torch, opts["dtype"]) if odd and "dtype" in opts else torch.float32
        x = torch.randn(opts["shape"] if odd and "shape" in opts else PEER_SHAPE, dtype=dtype)
        x.requires_grad_(odd and opts.get("grad", False))
        k = torch.randn(opts["k_shape"]) if odd and "k_shape" in opts else x
        v = torch.randn(opts["v_shape"]) if odd and "v_shape" in opts else x
        method = opts["other"] if odd and "other" in opts else opts["fn"]
        fn = ring_attention if method == "ring" else ulysses_attention
        results[name] = timed_call(fn, x, k, v, **(opts.get("kw", {}) if odd else {}))
    # One rank rejects its own arguments: it raises its ValueError, its peers learn it at once.
    x = torch.randn(PEER_SHAPE)
    results["rejected"] = timed_call(ring_attention, x, x, x, seq_len=0 if rank == 1 else None)

    # After all that, agreeing ranks compute the right answer on the same group.
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 3, 4 * world, 8, generator=gen) for _ in range(3))
    want = shard(attnkit.attention(q, k, v, causal=True), rank, world, layout="zigzag")
    got = ulysses_attention(*(shard(x, rank, world, layout="zigzag") for x in (q, k, v)), causal=True, layout="zigzag")
    results["agreeing"] = {"error": (got - want).abs().max().item()}

    # Rank 0 gives up (its process ends, as after an uncaught error); the others arrive late.
    if rank == 0:
        return results
    time.sleep(1.0)
    results["late"] = timed_call(ring_attention, x, x, x)
    return results


def _worker(args: argparse.Namespace) -> int:
    out_path = Path(args.out) / f"rank{args.rank}.json"
    try:
        _init(args.rank, args.world, args.port, args.group_timeout)
    except Exception as e:
        out_path.write_text(json.dumps({"init_error": repr(e)}))
        return 1
    results: dict = {}
    if args.suite == "equal":
        for name, opts in CASES.items():
            try:
                results[name] = _run_case(opts, args.rank, args.world)
            except Exception as e:
                results[name] = {"error": f"{type(e).__name__}: {e}"}
        for name, opts in MODEL_CASES.items():
            try:
                results[name] = _run_model_case(opts, args.rank, args.world)
            except Exception as e:
                results[name] = {"error": f"{type(e).__name__}: {e}"}
        results["sharding"] = _run_sharding(args.rank, args.world)
    elif args.suite == "peers":
        results = _run_peer_suite(args.rank, args.world)
    else:  # faults: two pairs {0, 1} and {2, 3}; ranks 1 and 3 misbehave, ranks 0 and 2 must raise PeerError
        import torch.distributed as dist

        # Only the pairs, where the faults happen, get the short timeout: the default group's also bounds the
        # rendezvous, i.e. how far apart the 4 processes finish importing torch, which a loaded machine stretches.
        timeout = datetime.timedelta(seconds=FAULT_TIMEOUT_S)  # a new group does not inherit the default's
        pairs = [dist.new_group(pair, timeout=timeout) for pair in ([0, 1], [2, 3])]  # every rank creates both
        pair = args.rank // 2
        fault, method = FAULT_SUITES[args.suite][pair]
        if args.rank % 2 == 1:
            if fault == "dies":
                os._exit(3)
            time.sleep(WORKER_TIMEOUT_S)  # hangs (the test kills it)
        x = torch.randn(1, 2, 4, 8)
        fn = ring_attention if method == "ring" else ulysses_attention
        results["fault"] = timed_call(fn, x, x, x, group=pairs[pair])
    out_path.write_text(json.dumps(results))
    return 0


# ------------------------------------------------------------- the spawning
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(world: int, suite: str, tmp: Path, group_timeout: float) -> list[subprocess.Popen]:
    """Start ``world`` workers (this file as a script) on a free loopback port."""
    src = str(Path(attnkit.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--world", str(world), "--port", str(_free_port()), "--suite", suite]
    cmd += ["--out", str(tmp), "--group-timeout", str(group_timeout)]
    return [subprocess.Popen([*cmd, "--rank", str(r)], env=env, stderr=subprocess.DEVNULL) for r in range(world)]


def _spawn(world: int, suite: str, tmp: Path, group_timeout: float) -> dict[int, dict]:
    """Run ``world`` workers to the end; return each rank's results (ranks that wrote none are absent)."""
    procs = _start(world, suite, tmp, group_timeout)
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    for p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return {
        r: json.loads((tmp / f"rank{r}.json").read_text()) for r in range(world) if (tmp / f"rank{r}.json").exists()
    }


@pytest.fixture(scope="module")
def equal_results(tmp_path_factory) -> dict[int, dict[int, dict]]:
    out = {}
    for world in WORLDS:
        tmp = tmp_path_factory.mktemp(f"world{world}")
        out[world] = _spawn(world, "equal", tmp, GROUP_TIMEOUT_S)
    return out


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_single_process(equal_results, world, case):
    check_matches(equal_results[world], world, case)


def check_matches(ranks: dict[int, dict], world: int, case: str) -> None:
    """Every rank's ``_run_case`` errors within the case's tolerance of the float64 single-process result."""
    assert sorted(ranks) == list(range(world)), f"workers that wrote no results: {set(range(world)) - set(ranks)}"
    for rank, res in ranks.items():
        assert "init_error" not in res, res
        errs = res[case]
        assert "error" not in errs, f"rank {rank}: {errs['error']}"
        for name in ("out", "dq", "dk", "dv"):
            # fp32: within TOL of float64. Low precision: FlashAttention's rule, at most twice the error of
            # single-process attnkit.attention in the same dtype.
            tol = TOL if "dtype" not in CASES[case] else 2 * errs[f"base_{name}"]
            if "logits" in CASES[case]:
                # fp32 rounds a score of magnitude S by up to S * 2**-24, which moves each weight by that
                # fraction, so each result by that times its own size (x4 for the sums): rounding that no
                # order of summation avoids. (A block without its row maximum gives inf/NaN.)
                top = min(CASES[case]["logits"], CASES[case].get("softcap", math.inf))
                tol = max(TOL, 2 * errs[f"base_{name}"], top * 2**-22 * max(1.0, errs[f"size_{name}"]))
            assert errs[name] <= tol, f"rank {rank} of {world}: {name} differs by {errs[name]:.2e} (> {tol:.2e})"


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", [c for c in CASES if "padded" not in c and "-dv" not in c])
def test_bytes_sent_match_the_formula(equal_results, world, case):
    """What the benchmark and docs/distributed.md compute is what the ranks actually send."""
    check_bytes(equal_results[world], world, case)


def check_bytes(ranks: dict[int, dict], world: int, case: str) -> None:
    from attnkit.apps.bench.distributed import computed_bytes

    B, Hq, Hk, L, D, _ = ranks[0][case]["shape"]
    itemsize = ranks[0][case]["itemsize"]
    want = computed_bytes(
        CASES[case]["fn"], world, batch=B, heads=Hq, kv_heads=Hk, length=L, head_dim=D, itemsize=itemsize
    )
    for rank, res in ranks.items():
        assert res[case]["sent_bytes"] == want, f"rank {rank}: sent {res[case]['sent_bytes']} bytes, formula {want}"


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", WORLDS)
def test_shard_sequence_and_unshard_sequence_across_ranks(equal_results, world):
    for rank, res in equal_results[world].items():
        assert res["sharding"] == {f"{layout}-{step}": True for layout in ("contiguous", "zigzag")
                                   for step in ("shard", "unshard")}, f"rank {rank} of {world}"  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_context_parallel_model_matches_single_process(equal_results, world, case):
    for rank, res in equal_results[world].items():
        errs = res[case]
        assert "error" not in errs, f"rank {rank}: {errs['error']}"
        assert errs["out"] <= MODEL_TOL, f"rank {rank} of {world}: logits differ by {errs['out']:.2e}"
        assert errs["grads"] <= MODEL_TOL, f"rank {rank} of {world}: parameter gradients differ by {errs['grads']:.2e}"


@pytest.mark.timeout(WORKER_TIMEOUT_S + 60)
@pytest.mark.parametrize("suite", list(FAULT_SUITES))
def test_dead_or_hung_peer_fails_fast(tmp_path, suite):
    """Failing fast is timed inside the workers, from the call; the wall clock here only guards against a hang.

    Starting 4 processes that import torch takes about 5 s on a quiet 2-core machine and 30 s at a
    load of 13, so a wall-clock bound on the whole test measures the machine, not the library.
    """
    results = _spawn_until(4, suite, tmp_path, ranks=(0, 2), limit=WORKER_TIMEOUT_S)
    for rank, (fault, method) in zip((0, 2), FAULT_SUITES[suite]):
        check_fault(results[rank]["fault"], fault, method, FAULT_TIMEOUT_S)


def check_fault(got: dict, fault: str, method: str, timeout_s: float) -> None:
    """The survivor of a peer that died or hangs raised PeerError naming the group's timeout, and in time."""
    assert got["error"] is not None, f"{method} returned although its peer {fault}"
    assert got["error"].startswith(f"PeerError: {method}_attention"), got
    assert f"Process-group timeout: {timeout_s:g} s" in got["error"], got
    assert got["elapsed"] <= timeout_s + 5, f"{method}, peer {fault}: failed after {got['elapsed']:.1f} s"
    if fault == "dies":  # a closed connection is noticed at once, not at the timeout
        assert got["elapsed"] < timeout_s, got


def _spawn_until(world: int, suite: str, tmp: Path, *, ranks: tuple[int, ...], limit: float) -> dict[int, dict]:
    """Like `_spawn`, but return once ``ranks`` have finished (at most ``limit`` s); kill the others."""
    procs = _start(world, suite, tmp, GROUP_TIMEOUT_S)
    deadline = time.monotonic() + limit
    try:
        for r in ranks:
            procs[r].wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    missing = [r for r in ranks if not (tmp / f"rank{r}.json").exists()]
    assert not missing, f"ranks {missing} wrote no result within {limit} s"
    return {r: json.loads((tmp / f"rank{r}.json").read_text()) for r in ranks}


@pytest.fixture(scope="module")
def peer_results(tmp_path_factory) -> dict[int, dict]:
    return _spawn(PEER_WORLD, "peers", tmp_path_factory.mktemp("peers"), GROUP_TIMEOUT_S)


def _holders(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", list(PEER_CASES))
def test_mismatched_peers_all_raise_peer_error(peer_results, case):
    check_mismatched_peers(peer_results, case)


@pytest.mark.timeout(120)
def test_a_rank_that_rejects_its_arguments_fails_its_peers_at_once(peer_results):
    check_rejected(peer_results)


@pytest.mark.timeout(120)
def test_agreeing_peers_still_compute_after_peer_errors(peer_results):
    check_agreeing(peer_results)


@pytest.mark.timeout(120)
def test_a_late_rank_after_its_peer_gave_up_gets_peer_error(peer_results):
    check_late(peer_results)


def check_mismatched_peers(peer_results: dict[int, dict], case: str) -> None:
    """Every rank raises PeerError naming the field, which ranks hold which value; none hangs, aborts or computes."""
    opts = PEER_CASES[case]
    assert sorted(peer_results) == list(range(PEER_WORLD)), f"ranks without results: {peer_results.keys()}"
    same = [r for r in range(PEER_WORLD) if r != opts["odd"]]
    want = f"\n  {opts['field']}: {_holders(same)}: {opts['values'][0]}; rank {opts['odd']}: {opts['values'][1]}"
    for rank, res in peer_results.items():
        assert "init_error" not in res, res
        err = res[case]["error"]
        assert err is not None, f"rank {rank} computed although rank {opts['odd']} passed another {opts['field']}"
        assert err.startswith("PeerError: ") and res[case]["peer_error"], f"rank {rank}: {err}"
        head = (
            f"PeerError: {opts['fn']}_attention: rank {rank} of {PEER_WORLD}: the ranks of the group disagree, so no "
            "rank computes (every rank must pass q, k and v shards of the same shapes and dtypes, and the same "
            "options):"
        )
        if case == "function" and rank == opts["odd"]:
            head = head.replace(opts["fn"], opts["other"], 1)
        assert err.startswith(head), f"rank {rank}: {err!r} does not start with {head!r}"
        assert want in err, f"rank {rank}: {err!r} lacks {want!r}"


def check_rejected(peer_results: dict[int, dict]) -> None:
    assert peer_results[1]["rejected"]["error"].startswith("ValueError: ring_attention: seq_len must be"), peer_results
    for rank in (0, 2):
        err = peer_results[rank]["rejected"]["error"]
        assert err.startswith(f"PeerError: ring_attention: rank {rank} of 3: rank 1 rejected its own arguments "), err
        assert "(ValueError, raised there)" in err, err


def check_agreeing(peer_results: dict[int, dict]) -> None:
    for rank, res in peer_results.items():
        assert res["agreeing"]["error"] <= TOL, f"rank {rank}: {res['agreeing']}"


def check_late(peer_results: dict[int, dict]) -> None:
    """Rank 0 is gone when ranks 1 and 2 call: PeerError chained to gloo's RuntimeError, at once (no timeout)."""
    for rank in (1, 2):
        got = peer_results[rank]["late"]
        assert got["error"] is not None and got["error"].startswith("PeerError: ring_attention"), got
        assert "a peer likely failed or mismatched" in got["error"], got
        assert got["cause"] is not None and "RuntimeError" in got["cause"] and "PeerError" not in got["cause"], got
        assert got["elapsed"] < GROUP_TIMEOUT_S, got


# --------------------------------------------------------- in one process
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("L", [1, 7, 24, 25])
def test_shard_and_merge_round_trip(layout, world, L):
    x = torch.randn(2, 3, L, 5)
    shards = [shard(x, r, world, layout=layout) for r in range(world)]
    assert len({s.shape for s in shards}) == 1
    assert shards[0].shape[2] * world == padded_length(L, world, layout)
    assert torch.equal(merge_shards(shards, layout=layout, seq_len=L), x)
    held = sorted(
        p
        for r in range(world)
        for g in segments(r, world, layout, shards[0].shape[2])
        for p in range(g.start, g.start + g.length)
    )
    assert held == list(range(padded_length(L, world, layout)))  # every position exactly once


def test_zigzag_holds_an_early_and_a_late_chunk():
    assert segments(0, 2, "zigzag", 6) == [(0, 0, 3), (3, 9, 3)]
    assert segments(1, 2, "zigzag", 6) == [(0, 3, 3), (3, 6, 3)]
    assert segments(2, 3, "contiguous", 4) == [(0, 8, 4)]


def test_one_rank_is_plain_attention(tmp_path):
    """A group of one: no peers, no messages, the same result and gradients as attnkit.attention."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a default process group already exists in this process")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=20))
    try:
        q, k, v = torch.randn(2, 4, 10, 8), torch.randn(2, 2, 10, 8), torch.randn(2, 2, 10, 8)
        ref = [x.clone().requires_grad_() for x in (q, k, v)]
        attnkit.attention(*ref, causal=True, alibi=True).sum().backward()
        for fn, layout in ((ring_attention, "zigzag"), (ulysses_attention, "contiguous")):
            got = [x.clone().requires_grad_() for x in (q, k, v)]
            out = fn(*got, causal=True, alibi=True, layout=layout)
            out.sum().backward()
            torch.testing.assert_close(out, attnkit.attention(q, k, v, causal=True, alibi=True), atol=1e-5, rtol=0)
            for g, r in zip(got, ref):
                torch.testing.assert_close(g.grad, r.grad, atol=1e-5, rtol=0)
    finally:
        dist.destroy_process_group()


def test_context_parallel_swaps_the_models_calls_through_one_hook_and_undoes_it(tmp_path, monkeypatch):
    """context_parallel installs one attnkit hook for the model's attention modules; restore removes it."""
    import torch.distributed as dist

    from attnkit.distributed import context_parallel, parallel
    from attnkit.nn import LanguageModel, SelfAttention

    if dist.is_initialized():
        pytest.skip("a default process group already exists in this process")
    parallel_calls = []
    ring = parallel.ring_attention

    def spy(q, k, v, **kwargs):
        parallel_calls.append(q.shape)
        return ring(q, k, v, **kwargs)

    monkeypatch.setattr(parallel, "ring_attention", spy)
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=20))
    try:
        torch.manual_seed(0)
        model = LanguageModel(16, 8, 2, 2, positions="rope", max_len=32).double().eval()
        other = SelfAttention(8, 2).double()
        tokens, x = torch.randint(0, 16, (1, 6)), torch.randn(1, 6, 8, dtype=torch.float64)
        want = model(tokens)
        with context_parallel(model) as cp:
            assert attnkit.hooks.active() and len(cp.modules) == 2 and len(cp.position_modules) == 2
            assert all("forward" in vars(m) for m in cp.position_modules)  # RoPE at global positions
            torch.testing.assert_close(model(tokens), want)  # a group of one: the same result
            assert len(parallel_calls) == 2
            other(x)  # not the model's: computed as usual
            assert len(parallel_calls) == 2
            with pytest.raises(ValueError, match=r"context_parallel .*cannot be split"):
                model.layers[0].attn(x, mask=torch.ones(6, 6, dtype=torch.bool))
        assert not attnkit.hooks.active()
        assert all("forward" not in vars(layer.attn.rope) for layer in model.layers)
        model(tokens)
        assert len(parallel_calls) == 2  # undone
        with pytest.raises(ValueError, match="no attnkit self-attention module"):
            context_parallel(torch.nn.Sequential(torch.nn.Linear(2, 2)))
        assert not attnkit.hooks.active()
    finally:
        dist.destroy_process_group()


def test_errors_name_the_argument():
    x = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match="zigzag shard"):
        ring_attention(x, x, x, layout="zigzag")
    with pytest.raises(ValueError, match="layout"):
        ring_attention(x, x, x, layout="striped")
    with pytest.raises(RuntimeError, match="not initialised"):
        ring_attention(x, x, x)
    with pytest.raises(ValueError, match="multiple of 2"):
        segments(0, 2, "zigzag", 5)


def test_descriptor_fields_in_one_process():
    """The descriptor in one process: equal arguments agree, each option is its own field, versions stop early."""
    from attnkit.distributed import ring as peers
    from attnkit.functional import build_spec
    from attnkit.masks import alibi_slopes

    x = torch.randn(1, 4, 6, 8)

    def words(layout="contiguous", seq_len=12, error=None, **options):
        spec = None if error else build_spec(x, x, x, **options)
        return peers._describe("ring_attention", x, x, x, spec, layout, seq_len, error)

    a = words(causal=True, alibi=True)
    assert len(a) == peers.DESCRIPTOR_WORDS and a[0] == peers._PROTOCOL  # the version leads
    assert peers._disagreements([a, words(causal=True, alibi=alibi_slopes(4), scale=1 / math.sqrt(8))]) == []
    assert peers._disagreements([a, a, words(causal=True, alibi=True, window=(3, None), softcap=2.0)]) == [
        "window: ranks 0, 1: None; rank 2: (3, None)",
        "softcap: ranks 0, 1: None; rank 2: 2.0",
    ]
    assert words(error=ValueError())[peers._ARGUMENTS] == 2 and words(error=TypeError())[peers._ARGUMENTS] == 1
    other_version = [a[0] + 1, *[w + 1 for w in a[1:]]]
    assert peers._disagreements([a, other_version]) == [f"protocol: rank 0: {a[0]}; rank 1: {a[0] + 1}"]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backward", [False, True])
def test_overlap_model_balances_compute_and_transfer(causal, backward):
    """At n*, one block's compute time equals one hop's transfer time (the docs' formulas, checked)."""
    F, BW, H, Hk, D, B, e = 400e12, 50e9, 32, 8, 128, 2, 2
    n = overlap_block_length(BW, F, heads=H, kv_heads=Hk, itemsize=e, causal=causal, backward=backward)
    c = 0.5 if causal else 1.0
    compute = (2.5 if backward else 1.0) * 4 * B * H * n * n * D * c / F
    transfer = 2 * B * Hk * n * D * (e + (4 if backward else 0)) / BW
    assert compute == pytest.approx(transfer, rel=1e-12)
    assert overlap_block_length(450e9, 400e12) == pytest.approx(400e12 / 450e9)  # MHA, bf16, forward: F / BW
    assert overlap_block_length(450e9, 400e12, kv_heads=1) == pytest.approx(400e12 / 450e9)  # heads defaults to 1
    # without a latency the batch, heads and head size cancel; with one they do not
    assert overlap_block_length(BW, F, batch_heads_dim=B * H * D) == pytest.approx(overlap_block_length(BW, F))
    assert overlap_block_length(BW, F, latency_s=1.0, batch_heads_dim=B * H * D) > 10 * overlap_block_length(BW, F)
    # A per-hop latency raises the threshold, and then compute = latency + transfer exactly.
    alpha = 10e-6
    m = overlap_block_length(BW, F, heads=H, kv_heads=Hk, causal=causal, backward=backward, latency_s=alpha,
                             batch_heads_dim=B * H * D)  # fmt: skip
    assert m > n
    compute = (2.5 if backward else 1.0) * 4 * B * H * m * m * D * c / F
    transfer = alpha + 2 * B * Hk * m * D * (e + (4 if backward else 0)) / BW
    assert compute == pytest.approx(transfer, rel=1e-9)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="one worker of tests/test_distributed.py")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--suite", choices=["equal", "peers", *FAULT_SUITES], required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--group-timeout", type=float, default=GROUP_TIMEOUT_S)
    sys.exit(_worker(parser.parse_args()))
