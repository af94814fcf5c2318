"""Transformer layers against torch.nn's, KV-cache decoding against one full causal pass, PatchEmbedding."""

from __future__ import annotations

import pytest
import torch

from attnkit.nn import (
    KVCache,
    LanguageModel,
    PatchEmbedding,
    Transformer,
    TransformerDecoder,
    TransformerEncoder,
    TransformerEncoderLayer,
)


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_encoder_layer_matches_torch(norm):
    torch_layer = torch.nn.TransformerEncoderLayer(
        16, 4, dim_feedforward=24, dropout=0.0, activation="gelu", batch_first=True, norm_first=norm == "pre"
    ).double()
    ours = TransformerEncoderLayer(16, 4, ff_dim=24, norm=norm).double()
    with torch.no_grad():
        wq, wk, wv = torch_layer.self_attn.in_proj_weight.chunk(3)
        bq, bk, bv = torch_layer.self_attn.in_proj_bias.normal_().chunk(3)
        for proj, w, b in ((ours.attn.q_proj, wq, bq), (ours.attn.k_proj, wk, bk), (ours.attn.v_proj, wv, bv)):
            proj.weight.copy_(w)
            proj.bias.copy_(b)
        ours.attn.out_proj.load_state_dict(torch_layer.self_attn.out_proj.state_dict())
        ours.ff.up.load_state_dict(torch_layer.linear1.state_dict())
        ours.ff.down.load_state_dict(torch_layer.linear2.state_dict())
        for a, b in ((ours.norm1, torch_layer.norm1), (ours.norm2, torch_layer.norm2)):
            b.weight.uniform_(0.5, 1.5)
            b.bias.normal_()
            a.load_state_dict(b.state_dict())
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    pad = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])  # torch: True = padding
    expected = torch_layer(x, src_key_padding_mask=pad)
    got = ours(x, padding_mask=~pad)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)


LM_CASES = {
    "rope": {"positions": "rope"},
    "rope-gqa-window": {"positions": "rope", "kv_heads": 2, "window": 4},
    "alibi-mqa-window": {"positions": "alibi", "kv_heads": 1, "window": (3, 0)},
    "learned": {"positions": "learned", "max_len": 32},
    "sinusoidal-swiglu": {"positions": "sinusoidal", "activation": "swiglu", "qk_norm": True},
}


@pytest.mark.parametrize("case", LM_CASES, ids=list(LM_CASES))
def test_kv_cache_decoding_equals_one_full_causal_pass(case):
    model = LanguageModel(61, 32, 4, 2, **LM_CASES[case]).eval()
    tokens = torch.randint(0, 61, (2, 19))
    with torch.no_grad():
        full = model(tokens)  # (B, L, V)
        windowed = "window" in LM_CASES[case]
        # windowed layers keep only what the window needs: a cache shorter than the sequence suffices
        cache = model.new_cache(8 if windowed else 19)
        steps = [model(tokens[:, :5], cache=cache)]  # a prefill chunk, then token by token
        steps += [model(tokens[:, i : i + 1], cache=cache) for i in range(5, 17)]
        steps.append(model(tokens[:, 17:], cache=cache))  # and a last chunk of two
    incremental = torch.cat(steps, dim=1)
    torch.testing.assert_close(incremental, full, atol=1e-5, rtol=0)
    assert cache[0].position == 19
    assert cache[0].length == (min(19, 8) if windowed else 19)


@pytest.mark.parametrize("positions", ["rope", "alibi"])
def test_left_padded_batch_with_cache_equals_each_sequence_alone(positions):
    model = LanguageModel(37, 32, 4, 2, positions=positions, kv_heads=2, window=5).eval()
    short, long = torch.randint(1, 37, (1, 3)), torch.randint(1, 37, (1, 7))
    prompt = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])  # (2, 7), left-padded
    padding = torch.tensor([[False] * 4 + [True] * 3, [True] * 7])
    steps = torch.randint(1, 37, (2, 4))
    with torch.no_grad():
        cache = model.new_cache(9)  # shorter than 7 + 4: the window lets the cache drop old keys
        logits = [model(prompt, padding_mask=padding, cache=cache)]
        logits += [model(steps[:, i : i + 1], cache=cache) for i in range(4)]
        batched = torch.cat(logits, 1)  # (2, 11, V)
        alone_short = model(torch.cat([short, steps[:1]], 1))  # (1, 7, V)
        alone_long = model(torch.cat([long, steps[1:]], 1))  # (1, 11, V)
    assert torch.isfinite(batched).all()  # padded queries see no key: zeros, not NaN
    torch.testing.assert_close(batched[0, 4:], alone_short[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(batched[1], alone_long[0], atol=1e-5, rtol=0)
    out = model.generate(prompt, 3, padding_mask=padding)
    assert torch.equal(out[0, 4:], model.generate(short, 3)[0])


def test_cache_fed_past_its_length_raises():
    model = LanguageModel(11, 16, 2, 1).eval()
    cache = model.new_cache(4)
    model(torch.randint(0, 11, (1, 3)), cache=cache)
    with pytest.raises(ValueError, match=r"fed past its length: holds 3 of max_len=4 keys, got 2 more"):
        model(torch.randint(0, 11, (1, 2)), cache=cache)
    windowed = KVCache(4, window=3)
    windowed.update(torch.randn(1, 1, 3, 2), torch.randn(1, 1, 3, 2))
    with pytest.raises(ValueError, match="feed shorter chunks"):
        windowed.update(torch.randn(1, 1, 2, 2), torch.randn(1, 1, 2, 2))
    with pytest.raises(ValueError, match="window"):
        KVCache(4, window=4)
    assert LanguageModel(11, 16, 2, 1, window=10).new_cache(4)[0].window is None  # the window spans the cache
    with pytest.raises(ValueError, match="reset"):
        cache[0].update(torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8))


def test_generate_greedy_equals_repeated_full_passes():
    model = LanguageModel(23, 16, 2, 2, kv_heads=1, window=5).eval()
    prompt = torch.randint(0, 23, (2, 4))
    out = model.generate(prompt, 6)
    seq = prompt
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_decoder_cache_equals_full_pass_and_decoder_is_causal():
    dec = TransformerDecoder(16, 4, 2, context_dim=12, kv_heads=2, positions="rope").eval()
    tgt = torch.randn(2, 7, 16)
    ctx = torch.randn(2, 5, 12)
    cmask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    with torch.no_grad():
        full = dec(tgt, ctx, context_mask=cmask)
        cache = dec.new_cache(7, context_len=5)
        steps = [dec(tgt[:, :1], ctx, context_mask=cmask, cache=cache)]
        steps += [dec(tgt[:, i : i + 1], None, context_mask=cmask, cache=cache) for i in range(1, 7)]
        changed = tgt.clone()
        changed[:, 4:] = torch.randn(2, 3, 16)
        partial = dec(changed, ctx, context_mask=cmask)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
    torch.testing.assert_close(partial[:, :4], full[:, :4])  # the future does not leak back
    assert not torch.allclose(partial[:, 4:], full[:, 4:])


def test_encoder_decoder_transformer_shapes_and_padding():
    model = Transformer(16, 4, encoder_depth=2, decoder_depth=2, norm="post").eval()
    src, tgt = torch.randn(2, 6, 16), torch.randn(2, 4, 16)
    src_pad = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    with torch.no_grad():
        out = model(src, tgt, src_padding_mask=src_pad)
        # padded source tokens do not matter
        src2 = src.clone()
        src2[1, 3:] = 100.0
        out2 = model(src2, tgt, src_padding_mask=src_pad)
    assert out.shape == (2, 4, 16)
    torch.testing.assert_close(out, out2)


def test_patch_embedding_is_a_linear_map_of_flattened_patches():
    emb = PatchEmbedding(4, 3, 8).double()
    images = torch.randn(2, 3, 8, 12, dtype=torch.float64)
    tokens = emb(images)
    assert tokens.shape == (2, 6, 8)
    patches = images.unfold(2, 4, 4).unfold(3, 4, 4)  # (B, C, 2, 3, 4, 4)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(2, 6, 3 * 16)  # (B, N, C * p * p), row-major patches
    expected = patches @ emb.proj.weight.reshape(8, -1).T + emb.proj.bias
    torch.testing.assert_close(tokens, expected)


def test_vision_encoder_on_patches():
    emb = PatchEmbedding(4, 3, 16, image_size=8, cls_token=True)
    encoder = TransformerEncoder(16, 4, 2)
    images = torch.randn(2, 3, 8, 8)
    tokens = emb(images)
    assert tokens.shape == (2, 5, 16)
    out, weights = encoder(tokens, return_weights=True)
    assert out.shape == (2, 5, 16) and len(weights) == 2 and weights[0].shape == (2, 4, 5, 5)
    out.sum().backward()
    assert emb.cls.grad is not None and emb.positions.grad is not None
    with pytest.raises(ValueError, match="divisible by patch=4"):
        PatchEmbedding(4, 3, 16)(torch.randn(1, 3, 6, 8))
    with pytest.raises(ValueError, match="built for images"):
        emb(torch.randn(1, 3, 12, 12))


def test_constructor_errors():
    with pytest.raises(ValueError, match="norm must be 'pre' or 'post'"):
        TransformerEncoderLayer(16, 4, norm="sandwich")
    with pytest.raises(ValueError, match="always causal"):
        LanguageModel(10, 16, 4, 1, causal=False)
    with pytest.raises(ValueError, match="max_len"):
        LanguageModel(10, 16, 4, 1, positions="learned")
    with pytest.raises(ValueError, match="activation"):
        TransformerEncoderLayer(16, 4, activation="tanh")
