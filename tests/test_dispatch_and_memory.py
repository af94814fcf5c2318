"""Backend choice (auto, explain_backend, the registry) and the O(L) memory of the tiled kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnkit
from attnkit.apps.harness import peak_memory, run_case
from attnkit.backends import Backend, register_backend
from tests.conftest import make_qkv

# One batch element, four query heads of 64 tokens, fp32.
SMALL = dict(B=1, Hq=4, Hk=4, Lq=64, Lk=64, D=16, Dv=16, dtype=torch.float32)


@pytest.mark.parametrize(
    ("options", "shape", "backend", "why"),
    [
        ({}, {}, "sdpa", None),
        ({"causal": True}, {}, "sdpa", None),
        ({"causal": True}, {"Lq": 1}, "sdpa", None),
        ({"causal": True}, {"Lq": 32}, "tiled", "aligns causal top-left"),
        ({"alibi": True}, {}, "tiled", "ALiBi"),
        ({"window": 8}, {}, "tiled", "window"),
        ({"softcap": 5.0}, {}, "tiled", "softcap"),
        ({}, {"Dv": 8}, "tiled", "Dv == D"),
        ({}, {"Hk": 2}, "sdpa", None),
    ],
)
def test_auto_choice_and_reasons(options, shape, backend, why):
    q, k, v = make_qkv(**{**SMALL, **shape})
    choice = attnkit.explain_backend(q, k, v, **options)
    assert choice.backend == backend
    if why:
        assert why in choice.reasons["sdpa"]
    assert "never chosen automatically" in choice.reasons["reference"]
    assert f"backend: {backend}" in str(choice)


def test_sdpa_lse_rules():
    q, k, v = make_qkv(**SMALL)
    assert attnkit.explain_backend(q, k, v, return_lse=True).backend == "sdpa"
    q, k, v = make_qkv(**SMALL, grad=True)
    choice = attnkit.explain_backend(q, k, v, return_lse=True)
    assert choice.backend == "tiled" and "no gradient" in choice.reasons["sdpa"]


def test_sdpa_gets_the_padding_mask_unexpanded(monkeypatch):
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        seen.append(tuple(attn_mask.shape))
        return real(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    q, k, v = (torch.randn(3, 4, 50, 16) for _ in range(3))
    mask = attnkit.key_padding_mask(torch.tensor([50, 20, 1]), 50)
    out = attnkit.attention(q, k, v, mask=mask, backend="sdpa")
    assert seen == [(3, 1, 1, 50)]
    torch.testing.assert_close(out, attnkit.attention(q, k, v, mask=mask, backend="reference"))


def test_auto_skips_a_materialising_backend_above_the_limit():
    def run(q, k, v, spec, return_lse):
        return attnkit.kernels.reference.forward(q, k, v, spec)

    register_backend(Backend("eager", run, lambda q, spec, lse: None, priority=1, materializes=True), replace=True)
    try:
        small = torch.empty(1, 8, 1024, 64, device="meta")
        assert attnkit.explain_backend(small, small, small).backend == "eager"
        big = torch.empty(1, 8, 16384, 64, device="meta")  # 8 GiB of fp32 scores
        choice = attnkit.explain_backend(big, big, big)
        assert choice.backend == "sdpa"
        assert "would materialise 8192 MiB of scores (limit 256 MiB)" in choice.reasons["eager"]
    finally:
        attnkit.backends.unregister_backend("eager")


def test_registry_lets_users_add_a_backend():
    calls = []

    def run(q, k, v, spec, return_lse):
        calls.append(spec.causal)
        return attnkit.kernels.reference.forward(q, k, v, spec)

    register_backend(Backend("mine", run, lambda q, spec, lse: None, priority=5, auto=False), replace=True)
    try:
        q, k, v = make_qkv(**SMALL)
        out = attnkit.attention(q, k, v, causal=True, backend="mine")
        assert calls == [True] and out.shape == (1, 4, 64, 16)
        assert attnkit.explain_backend(q, k, v).backend == "sdpa"  # auto=False: only by name
        with pytest.raises(ValueError, match="exists; pass replace=True"):
            register_backend(Backend("mine", run, lambda q, spec, lse: None, priority=5))
        with pytest.raises(ValueError, match="reserved"):
            register_backend(Backend("auto", run, lambda q, spec, lse: None, priority=5))
    finally:
        attnkit.backends.unregister_backend("mine")


# ------------------------------------------------------------------------ memory
def tiled_fwd_bwd_peak(L: int, softcap: float | None) -> dict:
    """Case run in a fresh process: peak memory of a tiled forward + backward."""
    torch.manual_seed(0)

    def step(L):
        q, k, v = (torch.randn(1, 1, L, 16, requires_grad=True) for _ in range(3))
        out = attnkit.attention(q, k, v, causal=True, softcap=softcap, backend="tiled")
        out.sum().backward()

    step(256)  # one-time allocations (thread pools, kernel set-up) are not the kernel's memory
    return peak_memory(lambda: step(L))


@pytest.mark.parametrize(("L", "softcap"), [(16384, None), (8192, 5.0)])
def test_tiled_forward_backward_never_holds_the_score_matrix(L, softcap):
    scores_bytes = L * L * 4  # one fp32 score matrix: 1 GiB at 16K, 256 MiB at 8K
    result = run_case("tests.test_dispatch_and_memory:tiled_fwd_bwd_peak", {"L": L, "softcap": softcap}, timeout=240)
    assert "error" not in result, result
    assert result["peak_reset"], "this kernel cannot reset the peak RSS; the measurement would be meaningless"
    # Inputs, gradients and one tile at a time: a small fraction of a single score matrix.
    assert result["peak_bytes"] < scores_bytes / 8, result


def test_custom_alignment_is_refused_by_kernels_that_align_themselves():
    import dataclasses

    from attnkit.kernels import sdpa
    from attnkit.kernels import triton as triton_kernels

    q, k, v = make_qkv(**SMALL)
    spec = dataclasses.replace(attnkit.functional.build_spec(q, k, v, causal=True), align=7)
    assert "spec.align" in sdpa.refusal(q, spec, False)
    assert "spec.align" in triton_kernels.refusal(q, spec, False)
