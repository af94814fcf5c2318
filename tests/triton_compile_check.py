"""Compile the Triton kernels for an H100 (sm_90) on a machine without a GPU.

Run by `tests/test_triton_kernels.py` in a fresh process (the kernels must be decorated
without ``TRITON_INTERPRET``). Triton compiles to a cubin with its bundled ``ptxas`` and
needs no driver, so this catches what the interpreter cannot: type errors of the
compiler front end, unsupported constructs, and tiles that do not fit in shared memory.
Prints one line per kernel and exits non-zero on the first failure.
"""

from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from attnkit.kernels.triton import backward, forward, stats

H100_SHARED_BYTES = 232448  # 227 KiB of dynamic shared memory per block on sm_90

POINTERS = {
    "LSE": "*fp32", "DELTA": "*fp32", "Slopes": "*fp32", "Mask": "*u8", "CuQ": "*i32", "CuK": "*i32",
    "ENT": "*fp32", "DIST": "*fp32", "RECV": "*fp32", "TOPW": "*fp32", "TOPI": "*i32", "ROWPOOL": "*fp32",
    "KSeg": "*i32",
}  # fmt: skip
TENSORS = ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")


def compile_kernel(fn, constexprs: dict, dtype: str, *, num_warps: int, num_stages: int):
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in TENSORS:
            signature[name] = "*" + dtype
        elif name in POINTERS:
            signature[name] = POINTERS[name]
        elif name in ("scale", "softcap", "drop_scale"):
            signature[name] = "fp32"
        elif name in ("seed", "threshold"):
            signature[name] = "i64"
        else:
            signature[name] = "i32"
    options = {"num_warps": num_warps, "num_stages": num_stages}
    return triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32), options=options)


ALL = dict(HAS_SOFTCAP=True, HAS_ALIBI=True, HAS_LEFT=True, HAS_RIGHT=True, MASK_KIND=1, DROPOUT=True)
NONE = dict(HAS_SOFTCAP=False, HAS_ALIBI=False, HAS_LEFT=False, HAS_RIGHT=False, MASK_KIND=0, DROPOUT=False)


def cases():
    head = lambda d: dict(BLOCK_D=d, BLOCK_DV=d)
    yield (
        "forward, every feature, varlen, bf16, D=128",
        forward._fwd_kernel,
        "bf16",
        (8, 3),
        dict(BLOCK_M=128, BLOCK_N=64, VARLEN=True, DOT_PRECISION="tf32", **head(128), **ALL),
    )
    yield (
        "forward, plain, fp16, D=64",
        forward._fwd_kernel,
        "fp16",
        (4, 3),
        dict(BLOCK_M=128, BLOCK_N=64, VARLEN=False, DOT_PRECISION="tf32", **head(64), **NONE),
    )
    yield (
        "forward, float mask, fp32 (ieee), D=32",
        forward._fwd_kernel,
        "fp32",
        (4, 2),
        dict(BLOCK_M=64, BLOCK_N=32, VARLEN=False, DOT_PRECISION="ieee", **head(32), **{**NONE, "MASK_KIND": 2}),
    )
    yield (
        "forward, smallest config, bf16, D=256",
        forward._fwd_kernel,
        "bf16",
        (4, 2),
        dict(BLOCK_M=64, BLOCK_N=32, VARLEN=False, DOT_PRECISION="tf32", **head(256), **NONE),
    )
    yield (
        "dK/dV, every feature, varlen, bf16, D=128",
        backward._dkdv_kernel,
        "bf16",
        (8, 2),
        dict(BLOCK_M=64, BLOCK_N=128, VARLEN=True, DOT_PRECISION="tf32", **head(128), **ALL),
    )
    yield (
        "dK/dV, smallest config, bf16, D=256",
        backward._dkdv_kernel,
        "bf16",
        (4, 2),
        dict(BLOCK_M=32, BLOCK_N=64, VARLEN=False, DOT_PRECISION="tf32", **head(256), **NONE),
    )
    yield (
        "dQ, every feature, bf16, D=128",
        backward._dq_kernel,
        "bf16",
        (8, 2),
        dict(BLOCK_M=128, BLOCK_N=64, VARLEN=False, DOT_PRECISION="tf32", **head(128), **ALL),
    )
    yield "statistics, every feature, bf16, D=128, top-8, pool 64", stats._stats_kernel, "bf16", (4, 2), dict(
        BLOCK_M=64, BLOCK_N=64, BLOCK_D=128, TOPK=8, BLOCK_K=8, BLOCK_P=64, DOT_PRECISION="tf32",
        POOL_PRECISION="tf32x3", **{**ALL, "DROPOUT": False},
    )  # fmt: skip


def main() -> int:
    for label, fn, dtype, (warps, stages), constexprs in cases():
        try:
            kernel = compile_kernel(fn, constexprs, dtype, num_warps=warps, num_stages=stages)
        except Exception as exc:
            print(f"FAILED {label}: {type(exc).__name__}: {exc}")
            return 1
        shared = kernel.metadata.shared
        if shared > H100_SHARED_BYTES:
            print(f"FAILED {label}: needs {shared} bytes of shared memory, an H100 block has {H100_SHARED_BYTES}")
            return 1
        print(f"ok {label}: {shared} bytes of shared memory")
    return 0


if __name__ == "__main__":
    sys.exit(main())
