"""Offline compiler report: the Triton kernels compiled for an H100/H200 (sm_90a) without a GPU.

Run by `tests/test_triton_kernels.py` in a fresh process (the kernels must be decorated
without ``TRITON_INTERPRET``). Triton compiles to a cubin with its bundled ``ptxas`` and
needs no driver. Each kernel is bound to the arguments a real launch passes (on ``meta``
tensors, through Triton's own binder), so it gets the launch-time specialisations a GPU
run gets: 16-byte aligned pointers, integers divisible by 16 marked so, integers equal to
1 folded into constants. For every autotune configuration of every kernel at D = 64 and
D = 128 (bf16) it records:

* registers, spill stores and spill loads, from ``ptxas -v`` (Triton runs it; its log is kept);
* shared memory, from the compiled kernel's metadata;
* the SASS instruction count of the forward's (and the statistics pass's) bulk loop: the smallest loop of the
  disassembly (``nvdisasm``) that holds a tensor-core MMA, i.e. the steady state of the
  software-pipelined loop over key tiles that no mask cuts.

The same count is taken on `tutorial_forward`, a minimal forward in the form of Triton's
fused-attention tutorial (written here from its description, not copied), compiled the
same way: the yardstick the issue sets (within 10%).

The backward's ``_prep_kernel`` and the statistics kernel (not autotuned) are compiled with
the tiles their launches use. ``python tests/triton_compile_check.py [--json PATH] [--markdown]``
prints the report;
``--smoke`` compiles the feature variants (every flag, varlen, fp16, fp32, D = 32..256) and
checks only that they compile and fit in shared memory.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from attnkit.functional import build_spec
from attnkit.kernels.triton import backward, forward, stats

TARGET = GPUTarget("cuda", 90, 32)  # sm_90a: Triton compiles arch 90 with the Hopper extensions
H100_SHARED_BYTES = 232448  # 227 KiB of dynamic shared memory per block on sm_90
ROW_FORMAT = 2  # bump when a report row is computed differently: cached rows of another format are not reused
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


# ----------------------------------------------------------------- tutorial-form forward
@triton.jit
def tutorial_forward(
    Q, K, V, O, LSE, sm_scale,
    stride_qz, stride_qh, stride_qm, stride_kz, stride_kh, stride_kn, stride_vz, stride_vh, stride_vn,
    stride_oz, stride_oh, stride_om, n_heads, n_ctx,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The plainest FlashAttention-2 forward: no masks, ``n_ctx`` a multiple of both tiles, unit inner strides.

    Scores go to base 2 with one multiply-add per element (``qk * (scale * log2 e) - m``)
    and the row maximum is taken on the raw ``q k^T``, as the tutorial does.
    """
    start_m = tl.program_id(0)
    off_hz = tl.program_id(1)
    z = off_hz // n_heads
    h = off_hz % n_heads
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + z * stride_qz + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :])
    k_ptrs = K + z * stride_kz + h * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None]  # (HEAD_DIM, BLOCK_N)
    v_ptrs = V + z * stride_vz + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :]  # (BLOCK_N, HEAD_DIM)
    qk_scale = sm_scale * 1.4426950408889634  # log2(e): exp(x) = exp2(x log2 e)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, n_ctx, BLOCK_N):
        k = tl.load(k_ptrs + start_n * stride_kn)
        qk = tl.dot(q, k)
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.exp2(qk * qk_scale - m_ij[:, None])
        alpha = tl.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptrs + start_n * stride_vn)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_ij
    tl.store(LSE + off_hz * n_ctx + offs_m, (m_i + tl.log2(l_i)) * 0.6931471805599453)
    out = acc / l_i[:, None]
    tl.store(O + z * stride_oz + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :], out.to(q.dtype))


def tutorial_call(q: torch.Tensor) -> tuple[tuple, dict]:
    """`tutorial_forward`'s arguments for ``q = k = v (B, H, N, D)``."""
    B, H, N, D = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    s = q.stride()
    return (q, q, q, out, lse, D**-0.5, *s[:3], *s[:3], *s[:3], *out.stride()[:3], H, N), dict(HEAD_DIM=D)


# ----------------------------------------------------------------- binding and compiling
def bind(fn, args: tuple, constexprs: dict, *, num_warps: int, num_stages: int) -> tuple[ASTSource, dict]:
    """``fn`` bound as ``fn[grid](*args, **constexprs)`` would be on a GPU: its source and compile options.

    Triton's binder computes the specialisation of each argument (dtype, 16-byte alignment,
    divisibility by 16, ``== 1``) exactly as at launch; ``meta`` tensors have data pointer 0,
    i.e. aligned, as the caching allocator's blocks are.
    """
    backend = make_backend(TARGET)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(constexprs, num_warps=num_warps, num_stages=num_stages)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, consts, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(fn, signature, consts, attrs), options.__dict__


def compile_bound(fn, args: tuple, constexprs: dict, *, num_warps: int, num_stages: int, ptxas_log: bool = True):
    """Compile ``fn`` for sm_90a as a launch would (`bind`); returns the kernel and the ``ptxas -v`` log.

    Without ``ptxas_log`` Triton's on-disk cache may serve the kernel (and the log is empty).
    """
    src, options = bind(fn, args, constexprs, num_warps=num_warps, num_stages=num_stages)
    log = io.StringIO()
    triton.knobs.nvidia.dump_ptxas_log = ptxas_log  # Triton prints ptxas -v's log: keep it
    triton.knobs.compilation.always_compile = ptxas_log  # a cached kernel would not run ptxas again
    with contextlib.redirect_stdout(log):
        kernel = triton.compile(src, target=TARGET, options=options)
    return kernel, log.getvalue()


def ptxas_usage(log: str) -> dict:
    """``registers``, ``spill_stores``, ``spill_loads`` (bytes) from a ``ptxas -v`` log."""
    regs = re.findall(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not regs or not spills:
        raise RuntimeError(f"no register/spill line in the ptxas log:\n{log[-2000:]}")
    return {"registers": int(regs[-1]), "spill_stores": int(spills[-1][0]), "spill_loads": int(spills[-1][1])}


_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
_BRANCH = re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)")
_LABEL = re.compile(r"^(\.L_x_\d+):")


def sass_loops(cubin: bytes) -> list[dict]:
    """The loops of a cubin's SASS: ``{"start", "end", "own", "mma", "inner"}`` per loop.

    A loop is a backward branch; its body runs from the branch target to the branch. ``own``
    counts the instructions of the body outside the loops nested in it (NOPs, alignment
    padding, not counted); ``mma``: a tensor-core MMA among them; ``inner``: the ``own`` counts
    of the loops nested in it.
    """
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        sass = subprocess.run(
            [os.path.join(BIN, "nvdisasm"), "-c", f.name], check=True, capture_output=True, text=True
        ).stdout
    finally:
        os.unlink(f.name)
    labels, code, pending = {}, [], []
    for line in sass.splitlines():
        line = line.strip()
        label = _LABEL.match(line)
        if label:
            pending.append(label.group(1))
            continue
        ins = _INSTRUCTION.search(line)
        if ins:
            addr = int(ins.group(1), 16)
            for name in pending:
                labels[name] = addr
            pending = []
            code.append((addr, ins.group(2)))
    spans = []
    for addr, text in code:
        branch = _BRANCH.search(text)
        if branch and labels.get(branch.group(1), addr + 1) <= addr:
            spans.append((labels[branch.group(1)], addr))
    loops = []
    for start, end in spans:
        nested = [(s, e) for s, e in spans if (s, e) != (start, end) and start <= s and e <= end]
        own = [t for a, t in code if start <= a <= end and not t.startswith("NOP")
               and not any(s <= a <= e for s, e in nested)]  # fmt: skip
        loops.append({"start": start, "end": end, "own": len(own), "nested": nested,
                      "mma": any(re.search(r"\b(HGMMA|HMMA)\b", t) for t in own)})  # fmt: skip
    for lp in loops:
        nested = lp.pop("nested")
        lp["inner"] = [o["own"] for o in loops if (o["start"], o["end"]) in nested]
    return loops


def bulk_loop(cubin: bytes) -> dict:
    """The smallest loop that runs a tensor-core MMA (the unmasked key-tile loop): its own instructions
    and those of the loops nested in it (the statistics pass's top-k rounds)."""
    loops = [lp for lp in sass_loops(cubin) if lp["mma"]]
    if not loops:
        raise RuntimeError("no loop with an MMA in the SASS")
    return min(loops, key=lambda lp: lp["own"])


def bulk_loop_instructions(cubin: bytes) -> int:
    """Instructions of one iteration of the bulk loop, outside any nested loop (see `bulk_loop`)."""
    return bulk_loop(cubin)["own"]


# ----------------------------------------------------------------- the launches compiled
SHAPES = {64: (4, 32, 4096), 128: (2, 16, 8192)}  # D: (B, H, N), the benchmark's D=64 N=4K and D=128 N=8K


def _qkv(D: int):
    B, H, N = SHAPES[D]
    q = torch.empty(B, H, N, D, device="meta", dtype=torch.bfloat16)  # (B, H, N, D)
    return q, q.clone(), q.clone()


def forward_launch(D: int, **opts):
    q, k, v = _qkv(D)
    args, meta, *_ = forward.forward_call(q, k, v, build_spec(q, k, v, **opts))
    return args, meta


def backward_launches(D: int, **opts):
    q, k, v = _qkv(D)
    spec = build_spec(q, k, v, **opts)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device="meta")
    _, dkdv_args, dq_args, meta, _ = backward.backward_calls(out, q, k, v, out, lse, spec)
    return (dkdv_args, meta), (dq_args, meta)


def configs(tuned) -> list[tuple[int, int, int, int]]:
    """``(BLOCK_M, BLOCK_N, warps, stages)`` of every config an autotuned kernel may pick."""
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in tuned.configs]


def report_jobs() -> list[tuple]:
    """``(kernel, variant, D, config)`` for every autotune config of every kernel at D = 64 and 128."""
    jobs = []
    for D in (64, 128):
        for cfg in configs(forward._fwd_tuned):
            jobs.append(("forward", "plain", D, cfg))
            jobs.append(("tutorial", "plain", D, cfg))
        for cfg in configs(backward._dkdv_tuned):
            jobs.append(("dkdv", "plain", D, cfg))
        for cfg in configs(backward._dq_tuned):
            jobs.append(("dq", "plain", D, cfg))
        jobs.append(("forward", "causal", D, (128, 64, 8, 3)))
        # Not autotuned: the launches' own tiles and Triton's default warps/stages (4, 3).
        jobs.append(("prep", "plain", D, (backward.PREP_ROWS, 0, 4, 3)))
        jobs.append(("stats", "top-8, pool 64", D, (64, 64, 4, 3)))
    return jobs


def _launch(kernel: str, variant: str, D: int):
    opts = {"causal": True} if variant == "causal" else {}
    if kernel == "stats":
        q, k, v = _qkv(D)
        return stats._stats_kernel, *stats.stats_call(q, k, build_spec(q, k, v), topk=8, pool_k=64)
    if kernel == "prep":
        q, k, v = _qkv(D)
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device="meta")
        (prep_args, prep_meta), *_ = backward.backward_calls(q, q, k, v, q, lse, build_spec(q, k, v))
        return backward._prep_kernel, prep_args, prep_meta
    if kernel == "forward":
        return forward._fwd_kernel, *forward_launch(D, **opts)
    if kernel == "tutorial":
        return tutorial_forward, *tutorial_call(_qkv(D)[0])
    dkdv, dq = backward_launches(D, **opts)
    return (backward._dkdv_kernel, *dkdv) if kernel == "dkdv" else (backward._dq_kernel, *dq)


def _cached_row(fn, args, constexprs, warps, stages, job) -> tuple[Path, dict | None]:
    """The report row of an identical earlier compile (same kernel sources, binding, options, Triton), if any.

    Kept beside Triton's own cache (``triton.knobs.cache.dir``), so a second run of the report
    costs seconds; any change to a kernel's source or its dependencies changes the key.
    """
    src, options = bind(fn, args, constexprs, num_warps=warps, num_stages=stages)
    key = f"{src.hash()}-{sorted(options.items())}-{TARGET}-{triton.__version__}-{job}-{ROW_FORMAT}"
    path = Path(triton.knobs.cache.dir) / "attnkit-compiler-report" / f"{hashlib.sha256(key.encode()).hexdigest()}.json"
    return path, json.loads(path.read_text()) if path.exists() else None


def run_job(job: tuple) -> dict:
    kernel, variant, D, (bm, bn, warps, stages) = job
    fn, args, meta = _launch(kernel, variant, D)
    tiles = {"BLOCK_M": bm} if kernel == "prep" else {"BLOCK_M": bm, "BLOCK_N": bn}
    cache, row = _cached_row(fn, args, dict(meta, **tiles), warps, stages, job)
    if row is not None:
        return row
    compiled, log = compile_bound(fn, args, dict(meta, **tiles), num_warps=warps, num_stages=stages)
    row = {"kernel": kernel, "variant": variant, "D": D, "BLOCK_M": bm, "BLOCK_N": bn, "warps": warps,
           "stages": stages, "shared": compiled.metadata.shared, **ptxas_usage(log)}  # fmt: skip
    if kernel in ("forward", "tutorial", "stats"):
        loop = bulk_loop(compiled.asm["cubin"])
        row["bulk_loop"] = loop["own"]
        if loop["inner"]:
            row["inner_loops"] = loop["inner"]
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(row))
    return row


def report(workers: int | None = None) -> list[dict]:
    jobs = report_jobs()
    workers = workers or max(1, min(len(jobs), os.cpu_count() or 1))
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(run_job, jobs))


def markdown(rows: list[dict]) -> str:
    """The report as a Markdown table (forward rows carry the tutorial's bulk-loop count beside theirs)."""
    tutorial = {(r["D"], r["BLOCK_M"], r["BLOCK_N"], r["warps"], r["stages"]): r for r in rows
                if r["kernel"] == "tutorial"}  # fmt: skip
    lines = [
        "| kernel | D | BLOCK_M x BLOCK_N | warps | stages | registers | spills (B) | shared (B) "
        "| bulk loop | tutorial |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["kernel"] == "tutorial":
            continue
        t = tutorial.get((r["D"], r["BLOCK_M"], r["BLOCK_N"], r["warps"], r["stages"]))
        loop = r.get("bulk_loop", "")
        if r.get("inner_loops"):
            loop = f"{loop} (+ {', '.join(map(str, r['inner_loops']))} per top-k round)"
        ref = t["bulk_loop"] if t and r["kernel"] == "forward" and r["variant"] == "plain" else ""
        name = r["kernel"] if r["variant"] == "plain" else f"{r['kernel']} ({r['variant']})"
        lines.append(
            f"| {name} | {r['D']} | {r['BLOCK_M']} x {r['BLOCK_N']} | {r['warps']} | {r['stages']} | "
            f"{r['registers']} | {r['spill_stores']} | {r['shared']} | {loop} | {ref} |".replace(" x 0 |", " |")
        )
    return "\n".join(lines)


# ----------------------------------------------------------------- smoke: feature variants compile
ALL = dict(causal=True, window=(100, None), alibi=True, softcap=30.0, dropout_p=0.1)


def smoke_jobs() -> list[tuple]:
    """Every feature at once, varlen, fp16/fp32 and head dims 32..256: they compile and fit."""
    return [
        ("forward", "everything", 128, (128, 64, 8, 3)),
        ("dkdv", "everything", 128, (64, 128, 8, 2)),
        ("dq", "everything", 128, (128, 64, 8, 2)),
        ("forward", "varlen", 128, (128, 64, 8, 3)),
        ("forward", "fp32 float mask", 32, (64, 32, 4, 2)),
        ("forward", "fp16", 256, (64, 32, 4, 2)),
        ("dkdv", "fp16", 256, (32, 64, 4, 2)),
        ("stats", "everything", 128, (64, 64, 4, 2)),
    ]


def run_smoke(job: tuple) -> str:
    kernel, variant, D, (bm, bn, warps, stages) = job
    dtype = {"fp16": torch.float16, "fp32 float mask": torch.float32}.get(variant, torch.bfloat16)
    q = torch.empty(2, 4, 1024, D, device="meta", dtype=dtype)
    k, v = q.clone(), q.clone()
    opts = dict(ALL) if variant == "everything" else {}
    if variant == "everything":
        opts["mask"] = torch.empty(2, 1, 1024, 1024, device="meta", dtype=torch.bool)
    if variant == "fp32 float mask":
        opts["mask"] = torch.empty(1, 4, 1, 1024, device="meta", dtype=torch.float32)
    extra = {}
    if variant == "varlen":
        opts = dict(ALL)
        cu = torch.empty(3, device="meta", dtype=torch.int32)
        packed = torch.empty(2048, 4, D, device="meta", dtype=dtype)  # (total, H, D)
        spec = build_spec(q, k, v, **opts)
        args, meta, *_ = forward.forward_call(packed, packed, packed, spec, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                              max_seqlen_q=1024)  # fmt: skip
        fn = forward._fwd_kernel
    elif kernel == "stats":
        fn, (args, meta) = stats._stats_kernel, stats.stats_call(q, k, build_spec(q, k, v, **opts), topk=8, pool_k=64)
    else:
        spec = build_spec(q, k, v, **opts)
        if kernel == "forward":
            fn, (args, meta, *_) = forward._fwd_kernel, forward.forward_call(q, k, v, spec)
        else:
            lse = torch.empty(q.shape[:3], dtype=torch.float32, device="meta")
            _, dkdv_args, dq_args, meta, _ = backward.backward_calls(q, q, k, v, q, lse, spec)
            fn, args = (backward._dkdv_kernel, dkdv_args) if kernel == "dkdv" else (backward._dq_kernel, dq_args)
    extra = dict(meta, BLOCK_M=bm, BLOCK_N=bn)
    compiled, _ = compile_bound(fn, args, extra, num_warps=warps, num_stages=stages, ptxas_log=False)
    shared = compiled.metadata.shared
    if shared > H100_SHARED_BYTES:
        raise RuntimeError(f"{kernel} {variant} D={D}: {shared} B of shared memory, an H100 has {H100_SHARED_BYTES}")
    return f"ok {kernel}, {variant}, D={D}: {shared} B of shared memory"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the report rows here")
    parser.add_argument("--markdown", action="store_true", help="print the report as a Markdown table")
    parser.add_argument("--smoke", action="store_true", help="compile the feature variants only")
    parser.add_argument("--workers", type=int, default=None)
    opts = parser.parse_args()
    if opts.smoke:
        with ProcessPoolExecutor(opts.workers or os.cpu_count() or 1) as pool:
            for line in pool.map(run_smoke, smoke_jobs()):
                print(line)
        return 0
    rows = report(opts.workers)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(markdown(rows) if opts.markdown else json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
