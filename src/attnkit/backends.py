"""The backend registry: what each backend supports, and how ``auto`` chooses.

A backend is a name, a ``refusal(q, spec, return_lse)`` that returns why it cannot
run a request (None if it can), and a ``run(q, k, v, spec, return_lse)`` that returns
``(out, lse)`` with autograd. Users add their own with `register_backend`, as
Hugging Face's ``AttentionInterface`` lets them, without patching attnkit.

``auto`` walks the backends in ``priority`` order (lowest first) and takes the first
one that accepts the request, skipping any that would materialise a score matrix
above `MATERIALIZE_LIMIT_BYTES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from attnkit.kernels import reference, sdpa, tiled
from attnkit.kernels import triton as triton_kernels  # light: imports Triton only when a kernel runs
from attnkit.spec import AttentionSpec

# Above this, a backend that holds the (B, Hq, Lq, Lk) scores is never chosen by auto.
MATERIALIZE_LIMIT_BYTES = 256 * 2**20

Run = Callable[[Tensor, Tensor, Tensor, AttentionSpec, bool], tuple[Tensor, Tensor | None]]
Refusal = Callable[[Tensor, AttentionSpec, bool], "str | None"]


@dataclass(frozen=True)
class Backend:
    """A registered attention backend."""

    name: str
    run: Run
    refusal: Refusal
    priority: int  # auto tries lower first
    materializes: bool = False  # holds the (B, Hq, Lq, Lk) scores
    auto: bool = True  # may auto choose it at all
    description: str = ""


_REGISTRY: dict[str, Backend] = {}


def register_backend(backend: Backend, *, replace: bool = False) -> None:
    """Add a backend under ``backend.name`` (``replace=True`` to override one)."""
    if backend.name == "auto":
        raise ValueError("register_backend: 'auto' is reserved for automatic selection")
    if backend.name in _REGISTRY and not replace:
        raise ValueError(f"register_backend: a backend named {backend.name!r} exists; pass replace=True")
    _REGISTRY[backend.name] = backend


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


def choose(q: Tensor, spec: AttentionSpec, return_lse: bool, requested: str) -> BackendChoice:
    """Pick a backend for a validated request; see the module docstring for the rule."""
    if requested != "auto":
        backend = get_backend(requested)
        why = backend.refusal(q, spec, return_lse)
        return BackendChoice(None if why else backend.name, requested, {backend.name: why} if why else {})
    choice = BackendChoice(None, requested)
    for backend in sorted(_REGISTRY.values(), key=lambda b: b.priority):
        why = backend.refusal(q, spec, return_lse)
        if why is None and not backend.auto:
            why = "never chosen automatically (request it by name)"
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
def _run_reference(q, k, v, spec, return_lse):
    return reference.forward(q, k, v, spec)


def _run_tiled(q, k, v, spec, return_lse):
    return tiled.attention(q, k, v, spec)


def _run_sdpa(q, k, v, spec, return_lse):
    return sdpa.attention(q, k, v, spec, return_lse=return_lse)


def _run_triton(q, k, v, spec, return_lse):
    from attnkit.kernels import triton_backend  # imports Triton: only once a CUDA request reaches it

    return triton_backend.attention(q, k, v, spec)


def _never(q, spec, return_lse):
    return None


register_backend(
    Backend(
        "triton", _run_triton, triton_kernels.refusal, priority=10,
        description="Triton flash-attention kernels on CUDA; every feature, O(L) memory",
    )
)  # fmt: skip
register_backend(
    Backend(
        "sdpa", _run_sdpa, sdpa.refusal, priority=20,
        description="PyTorch scaled_dot_product_attention, where the request maps onto it exactly",
    )
)  # fmt: skip
register_backend(
    Backend(
        "tiled", _run_tiled, _never, priority=30,
        description="blockwise online softmax in PyTorch; every feature, O(L) memory, CPU and GPU",
    )
)  # fmt: skip
register_backend(
    Backend(
        "reference", _run_reference, _never, priority=90, materializes=True, auto=False,
        description="the definition: materialises the weights; small inputs and tests",
    )
)  # fmt: skip
