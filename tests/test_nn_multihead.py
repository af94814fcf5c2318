"""attnkit.nn.MultiheadAttention against torch.nn.MultiheadAttention on the same parameters."""

from __future__ import annotations

import random

import pytest
import torch

import attnkit
from attnkit import AttentionOptions, attention_hook
from attnkit.nn import MultiheadAttention

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def _pair(dtype=torch.float64, **kwargs):
    theirs = torch.nn.MultiheadAttention(**kwargs, dtype=dtype)
    ours = MultiheadAttention(**kwargs, dtype=dtype)
    ours.load_state_dict(theirs.state_dict())
    if kwargs.get("bias", True):  # torch zero-initialises biases: make them matter
        with torch.no_grad():
            for m in (theirs, ours):
                torch.manual_seed(1)
                m.in_proj_bias.normal_()
                m.out_proj.bias.normal_()
    return theirs, ours


def _random_case(rng: random.Random, dtype: torch.dtype):
    H = rng.choice([1, 2, 4])
    E = H * rng.choice([2, 4, 8])
    cross = rng.random() < 0.5
    kdim = rng.choice([None, 6, E]) if cross else None
    vdim = rng.choice([None, 5, E]) if cross else None
    kwargs = {
        "embed_dim": E,
        "num_heads": H,
        "bias": rng.random() < 0.8,
        "add_bias_kv": rng.random() < 0.3,
        "add_zero_attn": rng.random() < 0.3,
        "kdim": kdim,
        "vdim": vdim,
        "batch_first": rng.random() < 0.5,
    }
    N, L = rng.randint(1, 3), rng.randint(1, 7)
    S = rng.randint(1, 8) if cross else L
    x = torch.randn(N, L, E, dtype=dtype)
    key = torch.randn(N, S, kdim or E, dtype=dtype) if cross else x
    value = torch.randn(N, S, vdim or E, dtype=dtype) if cross else x
    if not kwargs["batch_first"]:
        x, key, value = x.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    kpm = attn_mask = None
    kind = rng.choice(["none", "bool", "float"])
    if rng.random() < 0.6:
        lengths = torch.randint(1, S + 1, (N,))  # every query keeps at least one key: torch gives no NaN
        pad = torch.arange(S)[None, :] >= lengths[:, None]  # (N, S) True = ignore
        kpm = pad if kind != "float" else torch.zeros(N, S, dtype=dtype).masked_fill(pad, float("-inf"))
    if rng.random() < 0.6:
        shape = (L, S) if rng.random() < 0.5 else (N * H, L, S)
        if kind == "float":
            attn_mask = torch.randn(shape, dtype=dtype)
        else:
            attn_mask = torch.rand(shape) < 0.3
            attn_mask[..., 0] = False  # keep column 0 open so that no row is fully masked
            if kpm is not None:
                kpm = kpm.clone()
                kpm[:, 0] = False if kind == "bool" else 0.0
    fwd = {
        "key_padding_mask": kpm,
        "attn_mask": attn_mask,
        "need_weights": rng.random() < 0.6,
        "average_attn_weights": rng.random() < 0.5,
    }
    return kwargs, (x, key, value), fwd


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_torch_over_random_configurations(dtype):
    rng = random.Random(1234 if dtype == torch.float64 else 99)
    seen = set()
    for _ in range(40):
        kwargs, inputs, fwd = _random_case(rng, dtype)
        theirs, ours = _pair(dtype, **kwargs)
        out_t, w_t = theirs(*inputs, **fwd)
        out_o, w_o = ours(*inputs, **fwd)
        assert out_o.shape == out_t.shape
        torch.testing.assert_close(out_o, out_t, atol=TOL[dtype], rtol=0)
        if fwd["need_weights"]:
            assert w_o.shape == w_t.shape and w_o.dtype == w_t.dtype
            torch.testing.assert_close(w_o, w_t, atol=TOL[dtype], rtol=0)
        else:
            assert w_o is None and w_t is None
        seen.add((kwargs["add_bias_kv"], kwargs["add_zero_attn"], kwargs["batch_first"], fwd["need_weights"]))
    assert len(seen) >= 10  # the random cases really cover the switches


def test_gradients_match_torch():
    theirs, ours = _pair(embed_dim=8, num_heads=2, batch_first=True, add_bias_kv=True)
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    kpm = torch.tensor([[False] * 5, [False, False, False, True, True]])
    for need in (True, False):
        grads = []
        for m in (theirs, ours):
            x.grad = None
            m.zero_grad()
            out, _ = m(x, x, x, key_padding_mask=kpm, need_weights=need)
            out.square().sum().backward()
            grads.append([x.grad.clone(), *(p.grad.clone() for p in m.parameters())])
        for a, b in zip(*grads, strict=True):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_unbatched_inputs():
    theirs, ours = _pair(embed_dim=8, num_heads=2)
    q, k = torch.randn(4, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64)
    kpm = torch.tensor([False, False, False, False, True, True])
    for avg in (True, False):
        (ot, wt), (oo, wo) = (m(q, k, k, key_padding_mask=kpm, average_attn_weights=avg) for m in (theirs, ours))
        torch.testing.assert_close(oo, ot, atol=1e-10, rtol=0)
        torch.testing.assert_close(wo, wt, atol=1e-10, rtol=0)


def test_is_causal_matches_the_causal_mask():
    theirs, ours = _pair(embed_dim=8, num_heads=2, batch_first=True)
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(6, dtype=torch.float64) == float("-inf")
    ref, _ = theirs(x, x, x, attn_mask=causal)
    out, _ = ours(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    with pytest.raises(RuntimeError, match="attn_mask"):
        ours(x, x, x, is_causal=True)


def test_fully_masked_rows_give_zeros_not_nan():
    _, ours = _pair(embed_dim=8, num_heads=2, batch_first=True, bias=False)
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    attn_mask = torch.zeros(4, 4, dtype=torch.bool)
    attn_mask[2] = True  # query 2 may attend to nothing
    kpm = torch.zeros(2, 4, dtype=torch.bool)
    kpm[1] = True  # every key of sequence 1 is padding
    for need in (True, False):
        out, w = ours(x, x, x, attn_mask=attn_mask, key_padding_mask=kpm, need_weights=need)
        assert torch.isfinite(out).all()
        assert out[0, 2].abs().max() == 0 and out[1].abs().max() == 0  # no bias: zero in, zero out
        if need:
            assert w[0, 2].abs().max() == 0 and w[1].abs().max() == 0
            torch.testing.assert_close(w[0, [0, 1, 3]].sum(-1), torch.ones(3, dtype=torch.float64))


def test_fully_masked_rows_have_finite_gradients():
    _, ours = _pair(embed_dim=8, num_heads=2, batch_first=True)
    x = torch.randn(1, 3, 8, dtype=torch.float64, requires_grad=True)
    attn_mask = torch.zeros(3, 3, dtype=torch.float64)
    attn_mask[1] = float("-inf")  # a float mask that closes a whole row
    for need in (True, False):
        x.grad = None
        out, _ = ours(x, x, x, attn_mask=attn_mask, need_weights=need)
        out.sum().backward()
        assert torch.isfinite(x.grad).all(), need


def test_weights_fast_path_equals_attention_weights():
    _, ours = _pair(embed_dim=8, num_heads=2, batch_first=True)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    kpm = torch.tensor([[False] * 5, [True] * 5])  # the second sequence has no key at all
    q = k = torch.randn(2, 2, 5, 4, dtype=torch.float64)
    options = AttentionOptions(mask=~kpm.view(2, 1, 1, 5), dropout_p=0.5)  # the weights are before dropout
    from attnkit.nn.multihead import _weights

    torch.testing.assert_close(_weights(q, k, options), attnkit.attention_weights(q, k, mask=options.mask))
    torch.testing.assert_close(_weights(q, k, options.replace(mask=None)), attnkit.attention_weights(q, k))
    _, w = ours(x, x, x, key_padding_mask=kpm, average_attn_weights=False)
    assert torch.isfinite(w).all() and w[1].abs().max() == 0


def test_state_dict_round_trip_both_ways():
    for kdim in (None, 6):
        t = torch.nn.MultiheadAttention(8, 2, kdim=kdim, vdim=kdim, add_bias_kv=True)
        o = MultiheadAttention(8, 2, kdim=kdim, vdim=kdim, add_bias_kv=True)
        assert set(t.state_dict()) == set(o.state_dict())
        t.load_state_dict(o.state_dict())
        for name, value in o.state_dict().items():
            assert torch.equal(t.state_dict()[name], value), name


def test_key_padding_mask_is_not_expanded_and_hooks_see_the_call():
    _, ours = _pair(embed_dim=8, num_heads=2, batch_first=True)
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    kpm = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])
    seen = []

    def watch(call, proceed):
        seen.append(call)
        return proceed(call)

    with attention_hook(watch):
        ours(x, x, x, key_padding_mask=kpm, need_weights=False)
    (call,) = seen
    assert call.caller is ours and call.q.shape == (3, 2, 5, 4)
    options = call.options
    assert isinstance(options, AttentionOptions)
    assert options.mask.shape == (3, 1, 1, 5) and options.mask.dtype == torch.bool
    assert torch.equal(options.mask, ~kpm.view(3, 1, 1, 5))  # attnkit's convention: True = may attend
    assert not options.causal and options.window is None and options.dropout_p == 0.0


def test_hooks_see_and_may_swap_the_output_with_and_without_weights():
    _, ours = _pair(embed_dim=8, num_heads=2, batch_first=True)
    calls = []

    def spy(call, proceed):
        calls.append(call.options)
        return proceed(call.replace(backend="reference"))

    x = torch.randn(1, 3, 8, dtype=torch.float64)
    ref = torch.nn.MultiheadAttention(8, 2, batch_first=True, dtype=torch.float64)
    ref.load_state_dict(ours.state_dict())
    want, want_w = ref(x, x, x)
    with attention_hook(spy):
        out, w = ours(x, x, x, need_weights=False)
        assert len(calls) == 1 and calls[0].dropout_p == 0.0 and w is None
        out, w = ours(x, x, x)  # with weights too, the output goes through the hooks
        assert len(calls) == 2
    torch.testing.assert_close(out, want, atol=1e-10, rtol=0)
    torch.testing.assert_close(w, want_w, atol=1e-10, rtol=0)

    def zeros(call, proceed):
        return torch.zeros_like(call.q)  # (N, H, L, D): a swapped computation

    for need_weights in (False, True):
        with attention_hook(zeros):
            out, _ = ours(x, x, x, need_weights=need_weights)
        torch.testing.assert_close(out, ours.out_proj(torch.zeros(1, 3, 8, dtype=torch.float64)))


def test_dropout_trains_and_evaluates():
    m = MultiheadAttention(8, 2, dropout=0.5, batch_first=True)
    x = torch.randn(2, 6, 8)
    torch.manual_seed(0)
    a, _ = m(x, x, x, need_weights=False)
    torch.manual_seed(0)
    b, _ = m(x, x, x, need_weights=False)
    torch.testing.assert_close(a, b)  # reproducible under the seed
    m.eval()
    c, _ = m(x, x, x, need_weights=False)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize(
    ("kwargs", "call", "match"),
    [
        ({"embed_dim": 10, "num_heads": 4}, None, "divisible"),
        (
            {"embed_dim": 8, "num_heads": 2},
            lambda m: m(torch.randn(3, 8), torch.randn(2, 3, 8), torch.randn(2, 3, 8)),
            "3-D",
        ),
        (
            {"embed_dim": 8, "num_heads": 2},
            lambda m: m(torch.randn(2, 3, 7), torch.randn(2, 3, 7), torch.randn(2, 3, 7)),
            "last dim 8",
        ),
        (
            {"embed_dim": 8, "num_heads": 2},
            lambda m: m(torch.randn(3, 2, 8), torch.randn(3, 1, 8), torch.randn(3, 1, 8)),
            "batch",
        ),
        (
            {"embed_dim": 8, "num_heads": 2},
            lambda m: m(*[torch.randn(3, 2, 8)] * 3, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool)),
            "key_padding_mask",
        ),
        (
            {"embed_dim": 8, "num_heads": 2},
            lambda m: m(*[torch.randn(3, 2, 8)] * 3, attn_mask=torch.zeros(3, 3, 3, dtype=torch.bool)),
            "attn_mask",
        ),
    ],
)
def test_bad_input_raises_clear_errors(kwargs, call, match):
    with pytest.raises(ValueError, match=match):
        m = MultiheadAttention(**kwargs)
        call(m)


@pytest.mark.parametrize("batch_first", [False, True])
def test_self_attention_projects_with_one_matmul(monkeypatch, batch_first):
    _, ours = _pair(embed_dim=8, num_heads=2, batch_first=batch_first)
    calls = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, w, b=None: calls.append(w.shape) or linear(x, w, b))
    x, y = torch.randn(3, 2, 8, dtype=torch.float64), torch.randn(4, 2, 8, dtype=torch.float64)
    if batch_first:
        x, y = x.transpose(0, 1), y.transpose(0, 1)
    ours(x, x, x)
    assert calls == [(24, 8), (8, 8)]  # packed q, k, v; then out_proj
    calls.clear()
    ours(x, y, y)
    assert calls == [(8, 8), (16, 8), (8, 8)]  # q; packed k, v; out_proj


def test_bench_case_and_verdicts_on_a_tiny_configuration():
    from attnkit.apps.bench import mha

    for impl in ("torch", "attnkit"):
        for backward in (False, True):
            r = mha.case(impl=impl, length=16, need_weights=True, backward=backward, dim=16, heads=2, batch=1, repeat=1)
            assert r["time_s"] > 0 and r["peak_mib"] >= 0 and r["runs"] == 1
    row = {"L": 8192, "pass": "forward", "torch_s": 2.0, "attnkit_s": 1.0, "speedup": 2.0}
    rows = [
        {**row, "mode": "default", "torch_mib": 1000.0, "attnkit_mib": 1000.0},
        {**row, "mode": "need_weights=False", "speedup": 0.9, "torch_mib": 10.0, "attnkit_mib": 300.0},
    ]
    notes = mha._verdicts(rows, 8192)
    assert "NOT met in L=8192 need_weights=False forward (0.90x)" in notes[0]
    assert "0.300 of it, NOT met" in notes[1]


def test_need_weights_false_never_allocates_an_l_by_l_tensor():
    from torch.profiler import profile

    m = MultiheadAttention(16, 2, batch_first=True)
    L = 2048
    x = torch.randn(2, L, 16, requires_grad=True)
    kpm = torch.zeros(2, L, dtype=torch.bool)
    kpm[1, 500:] = True
    one_map = L * L * 4  # one fp32 L x L matrix, for a single head of a single sequence
    with profile(profile_memory=True) as prof:
        out, _ = m(x, x, x, key_padding_mask=kpm, need_weights=False)
        out.sum().backward()
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert 0 < largest < one_map / 4, largest  # (the CPU flash backward keeps a fixed 2 MiB buffer)
    with profile(profile_memory=True) as prof:  # the check can fail: with weights the maps do exist
        m(x, x, x, key_padding_mask=kpm, need_weights=True)
    assert max(e.cpu_memory_usage for e in prof.events()) >= 2 * 2 * one_map


def test_drops_into_torch_transformer_encoder_layer():
    layer = torch.nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True, dtype=torch.float64)
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    pad = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)  # True = masked out
    want = layer(x, src_mask=causal, src_key_padding_mask=pad, is_causal=True)
    ours = MultiheadAttention(16, 4, batch_first=True, dtype=torch.float64)
    ours.load_state_dict(layer.self_attn.state_dict())
    layer.self_attn = ours
    got = layer(x, src_mask=causal, src_key_padding_mask=pad, is_causal=True)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


@pytest.mark.parametrize("padding", [False, True])
def test_drop_in_inside_torchs_encoder_layer_in_eval_mode(padding):
    """Issue 12 item 7: torch's own layers take their fused fast path in eval mode without grad."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(64, 4, 128, batch_first=True).eval()
    x = torch.randn(2, 10, 64)
    pad = torch.zeros(2, 10, dtype=torch.bool)
    pad[1, 7:] = True  # torch's convention: True = ignore
    kwargs = {"src_key_padding_mask": pad} if padding else {}
    with torch.no_grad():
        want = layer(x, **kwargs)  # torch's fused path
        ours = attnkit.nn.MultiheadAttention(64, 4, batch_first=True)
        ours.load_state_dict(layer.self_attn.state_dict())
        layer.self_attn = ours
        seen = []

        def hook(call, proceed):
            seen.append(call.caller)
            return proceed(call)

        with attnkit.attention_hook(hook):
            got = layer(x, **kwargs)
    assert seen == [ours]  # attnkit computed the attention, not torch's fused kernel
    if padding:  # torch's fused path leaves padded query rows unspecified (nested tensors)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1, :7], want[1, :7], rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_nested_tensors_get_a_clear_error():
    mha = attnkit.nn.MultiheadAttention(16, 2, batch_first=True)
    x = torch.nested.nested_tensor([torch.randn(3, 16), torch.randn(5, 16)])
    with pytest.raises(TypeError, match="enable_nested_tensor=False"):
        mha(x, x, x)
