"""The backend registry: what each backend can run, why not, and how ``auto`` chooses.

A backend runs up to three kinds of work, each with its own refusal (``None`` = it can):

* ``attention``: dense ``(B, H, L, D)`` attention, ``run(q, k, v, spec, return_lse) -> (out, lse)``
  with autograd; every backend has it.
* ``varlen``: packed variable-length sequences (FlashAttention's layout),
  ``run_varlen(q, k, v, cu_q, cu_k, max_q, max_k, spec, return_lse) -> (out, lse)``.
  A backend without it still runs a packed batch when asked by name: sequence by sequence
  through its dense ``run`` (`attnkit.kernels.packed`).
* ``statistics``: the statistics pass of `attnkit.attention_stats`,
  ``run_stats(q, k, v, spec, lse, *, topk, pool) -> dict``.

Every kernel module exposes the same entry points (``refusal``/``attention``, and where it has
them ``varlen_refusal``/``attention_varlen`` and ``stats_refusal``/``statistics``), so the
built-ins below register them as they are. Users add their own with `register_backend`, as
Hugging Face's ``AttentionInterface`` lets them, without patching attnkit.

``auto`` walks the backends that have the kind of work in ``priority`` order (lowest first) and
takes the first that accepts the request, skipping any that would materialise a score matrix
above `MATERIALIZE_LIMIT_BYTES`. `choose` returns the choice with every other backend's reason,
which `attnkit.explain_backend` prints.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from attnkit.kernels import ops, reference, sdpa, tiled
from attnkit.kernels import triton as triton_kernels  # light: imports Triton only when a kernel runs
from attnkit.spec import AttentionSpec

# Above this, a backend that holds the (B, Hq, Lq, Lk) scores is never chosen by auto.
MATERIALIZE_LIMIT_BYTES = 256 * 2**20

Task = Literal["attention", "varlen", "statistics"]
TASKS: tuple[Task, ...] = ("attention", "varlen", "statistics")

Run = Callable[[Tensor, Tensor, Tensor, AttentionSpec, bool], tuple[Tensor, Tensor | None]]
RunVarlen = Callable[
    [Tensor, Tensor, Tensor, Tensor, Tensor, int, int, AttentionSpec, bool], tuple[Tensor, Tensor | None]
]
RunStats = Callable[..., dict[str, Tensor]]  # (q, k, v, spec, lse, *, topk, pool)
Refusal = Callable[[Tensor, AttentionSpec, bool], "str | None"]


@dataclass(frozen=True)
class Backend:
    """A registered attention backend: its kernels for each kind of work and their refusals.

    ``refusal(q, spec, return_lse)`` says why the backend cannot run a request (None if it can);
    for varlen work ``q`` is the packed queries viewed as ``(1, Hq, total_q, D)`` and ``spec`` the
    packed spec (``batch`` = number of sequences, ``q_len``/``kv_len`` the longest ones); for
    statistics ``return_lse`` is False.
    """

    name: str
    run: Run
    refusal: Refusal
    priority: int  # auto tries lower first
    materializes: bool = False  # holds the (B, Hq, Lq, Lk) scores
    auto: bool = True  # may auto choose it at all
    description: str = ""
    run_varlen: RunVarlen | None = None
    varlen_refusal: Refusal | None = None
    run_stats: RunStats | None = None
    stats_refusal: Refusal | None = None
    # Why auto should pass a dense request it could run on to later backends (None: take it); by name it still runs.
    deferral: Refusal | None = None

    def can(self, task: Task) -> bool:
        """Whether the backend has its own kernel for ``task``."""
        return task == "attention" or (self.run_varlen if task == "varlen" else self.run_stats) is not None

    def refusal_for(self, task: Task, q: Tensor, spec: AttentionSpec, return_lse: bool) -> str | None:
        """Why the backend cannot run ``task`` for this request, or None."""
        if task == "attention" or (task == "varlen" and self.run_varlen is None):
            return self.refusal(q, spec, return_lse)  # without a packed kernel: dense, per sequence
        if not self.can(task):
            return f"has no {task} kernel"
        refusal = self.varlen_refusal if task == "varlen" else self.stats_refusal
        return None if refusal is None else refusal(q, spec, return_lse)


_REGISTRY: dict[str, Backend] = {}


def register_backend(backend: Backend, *, replace: bool = False) -> None:
    """Add a backend under ``backend.name`` (``replace=True`` to override one)."""
    if backend.name == "auto":
        raise ValueError("register_backend: 'auto' is reserved for automatic selection")
    if backend.name in _REGISTRY and not replace:
        raise ValueError(f"register_backend: a backend named {backend.name!r} exists; pass replace=True")
    _REGISTRY[backend.name] = backend


def unregister_backend(name: str) -> Backend:
    """Remove the backend registered under ``name`` and return it."""
    get_backend(name)  # the error for an unknown name
    return _REGISTRY.pop(name)


def get_backend(name: str) -> Backend:
    """The backend registered under ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"backend must be 'auto' or one of {sorted(_REGISTRY)}, got {name!r}") from None


def available_backends() -> list[str]:
    """Names of the registered backends, in auto's order."""
    return [b.name for b in sorted(_REGISTRY.values(), key=lambda b: b.priority)]


def scores_bytes(spec: AttentionSpec) -> int:
    """Bytes of one materialised ``(B, Hq, Lq, Lk)`` score matrix in the accumulation dtype."""
    itemsize = torch.empty((), dtype=spec.acc_dtype).element_size()
    return spec.batch * spec.q_heads * spec.q_len * spec.kv_len * itemsize


@dataclass
class BackendChoice:
    """Which backend a call uses and why the others were passed over."""

    backend: str | None
    requested: str
    reasons: dict[str, str] = field(default_factory=dict)  # name -> why refused (or skipped)

    def __str__(self) -> str:
        lines = [f"backend: {self.backend} (requested {self.requested!r})"]
        for name, why in self.reasons.items():
            lines.append(f"  {name}: {why}")
        return "\n".join(lines)


def choose(q: Tensor, spec: AttentionSpec, return_lse: bool, requested: str, task: Task = "attention") -> BackendChoice:
    """Pick a backend for a validated request; see the module docstring for the rule."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if requested != "auto":
        backend = get_backend(requested)
        why = backend.refusal_for(task, q, spec, return_lse)
        return BackendChoice(None if why else backend.name, requested, {backend.name: why} if why else {})
    choice = BackendChoice(None, requested)
    for backend in sorted(_REGISTRY.values(), key=lambda b: b.priority):
        why = backend.refusal_for(task, q, spec, return_lse) if backend.can(task) else f"has no {task} kernel"
        if why is None and not backend.auto:
            why = "never chosen automatically (request it by name)"
        if why is None and backend.deferral is not None and task == "attention":
            why = backend.deferral(q, spec, return_lse)
        if why is None and backend.materializes and scores_bytes(spec) > MATERIALIZE_LIMIT_BYTES:
            limit = MATERIALIZE_LIMIT_BYTES // 2**20
            why = f"would materialise {scores_bytes(spec) / 2**20:.0f} MiB of scores (limit {limit} MiB)"
        if why is None and choice.backend is None:
            choice.backend = backend.name
        elif why is not None:
            choice.reasons[backend.name] = why
        else:
            choice.reasons[backend.name] = f"supports it, but {choice.backend} comes first"
    return choice


# ------------------------------------------------------------------ built-ins
register_backend(
    Backend(
        "triton", triton_kernels.attention, triton_kernels.refusal, priority=10,
        run_varlen=triton_kernels.attention_varlen, varlen_refusal=triton_kernels.refusal,
        run_stats=triton_kernels.statistics, stats_refusal=triton_kernels.stats_refusal,
        deferral=triton_kernels.auto_deferral,
        description="Triton flash-attention kernels on CUDA; every feature, O(L) memory",
    )
)  # fmt: skip
register_backend(
    Backend(
        "sdpa", sdpa.attention, sdpa.refusal, priority=20,
        description="PyTorch scaled_dot_product_attention, where the request maps onto it exactly",
    )
)  # fmt: skip
register_backend(
    Backend(
        "tiled", ops.tiled_attention, tiled.refusal, priority=30,
        run_varlen=ops.tiled_varlen, run_stats=ops.tiled_statistics,
        description="blockwise online softmax in PyTorch; every feature, O(L) memory, CPU and GPU",
    )
)  # fmt: skip
register_backend(
    Backend(
        "reference", reference.attention, reference.refusal, priority=90, materializes=True, auto=False,
        description="the definition: materialises the weights; small inputs and tests",
    )
)  # fmt: skip
