"""attnkit's Transformer parts against ``torch.nn``'s with the same weights, and FeedForward against formulas.

Pre- and post-norm, padding masks on both sides, attention masks and the causal decoder, in
float64 to 1e-10. One documented difference: `torch.nn.Transformer` ends each stack with a
LayerNorm whatever ``norm_first``; attnkit's stacks end with one only when pre-norm (a post-norm
stack's last layer already ends in a norm), so the post-norm comparison drops torch's.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from attnkit.nn import FeedForward, Transformer, TransformerDecoder, TransformerDecoderLayer, TransformerEncoderLayer

f64 = torch.float64
DIM, HEADS, FF = 16, 4, 24


def randomise(module: nn.Module) -> None:
    """Non-trivial LayerNorm weights and biases (torch initialises them to 1 and 0)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
            elif isinstance(m, nn.MultiheadAttention):
                m.in_proj_bias.normal_()


def copy_attention(ours: nn.Module, theirs: nn.MultiheadAttention) -> None:
    """torch's packed ``in_proj`` into attnkit's separate q/k/v projections."""
    for proj, w, b in zip((ours.q_proj, ours.k_proj, ours.v_proj), theirs.in_proj_weight.chunk(3),
                          theirs.in_proj_bias.chunk(3)):  # fmt: skip
        proj.weight.copy_(w)
        proj.bias.copy_(b)
    ours.out_proj.load_state_dict(theirs.out_proj.state_dict())


def copy_layer(ours: nn.Module, theirs: nn.Module) -> None:
    """A torch encoder or decoder layer's weights into the attnkit layer."""
    with torch.no_grad():
        if isinstance(ours, TransformerDecoderLayer):
            copy_attention(ours.self_attn, theirs.self_attn)
            copy_attention(ours.cross_attn, theirs.multihead_attn)
            ours.norm3.load_state_dict(theirs.norm3.state_dict())
        else:
            copy_attention(ours.attn, theirs.self_attn)
        ours.ff.up.load_state_dict(theirs.linear1.state_dict())
        ours.ff.down.load_state_dict(theirs.linear2.state_dict())
        ours.norm1.load_state_dict(theirs.norm1.state_dict())
        ours.norm2.load_state_dict(theirs.norm2.state_dict())


def torch_layer(kind, norm: str, activation: str = "gelu"):
    layer = kind(DIM, HEADS, dim_feedforward=FF, dropout=0.0, activation=activation, batch_first=True,
                 norm_first=norm == "pre").double()  # fmt: skip
    randomise(layer)
    return layer


def padding(B: int, L: int, real: list[int]) -> torch.Tensor:
    """torch's key padding mask ``(B, L)``: True = padding (attnkit's is its negation)."""
    return torch.arange(L)[None, :] >= torch.tensor(real)[:, None]


def future(L: int) -> torch.Tensor:
    """torch's causal ``tgt_mask`` ``(L, L)`` bool: True above the diagonal (may NOT attend)."""
    return torch.ones(L, L, dtype=torch.bool).triu(1)


@pytest.mark.parametrize("norm", ["pre", "post"])
@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_encoder_layer_with_an_attention_mask_matches_torch(norm, activation):
    theirs = torch_layer(nn.TransformerEncoderLayer, norm, activation)
    ours = TransformerEncoderLayer(DIM, HEADS, ff_dim=FF, norm=norm, activation=activation).double()
    copy_layer(ours, theirs)
    x = torch.randn(2, 7, DIM, dtype=f64)
    allowed = torch.rand(7, 7) < 0.6
    allowed.fill_diagonal_(True)  # every query keeps a key
    pad = padding(2, 7, [7, 5])
    want = theirs(x, src_mask=~allowed, src_key_padding_mask=pad)  # torch: True = may NOT attend
    got = ours(x, mask=allowed, padding_mask=~pad)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_decoder_layer_matches_torch(norm):
    theirs = torch_layer(nn.TransformerDecoderLayer, norm)
    ours = TransformerDecoderLayer(DIM, HEADS, ff_dim=FF, norm=norm).double()
    copy_layer(ours, theirs)
    tgt, memory = torch.randn(3, 6, DIM, dtype=f64), torch.randn(3, 5, DIM, dtype=f64)
    tgt_pad, mem_pad = padding(3, 6, [6, 4, 1]), padding(3, 5, [5, 2, 3])
    causal = future(6)
    want = theirs(tgt, memory, tgt_mask=causal, tgt_is_causal=True, tgt_key_padding_mask=tgt_pad,
                  memory_key_padding_mask=mem_pad)  # fmt: skip
    got = ours(tgt, memory, padding_mask=~tgt_pad, context_mask=~mem_pad)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    # without a context padding mask the padded memory rows are read, as torch reads them
    torch.testing.assert_close(ours(tgt, memory), theirs(tgt, memory, tgt_mask=causal), atol=1e-10, rtol=0)


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_encoder_decoder_transformer_matches_torch(norm):
    theirs = nn.Transformer(DIM, HEADS, num_encoder_layers=2, num_decoder_layers=3, dim_feedforward=FF, dropout=0.0,
                            activation="gelu", batch_first=True, norm_first=norm == "pre").double()  # fmt: skip
    theirs.encoder.enable_nested_tensor = False  # the fast path that returns zeros at padding
    randomise(theirs)
    ours = Transformer(DIM, HEADS, encoder_depth=2, decoder_depth=3, ff_dim=FF, norm=norm).double()
    for a, b in zip(ours.encoder.layers, theirs.encoder.layers, strict=True):
        copy_layer(a, b)
    for a, b in zip(ours.decoder.layers, theirs.decoder.layers, strict=True):
        copy_layer(a, b)
    if norm == "pre":
        with torch.no_grad():
            ours.encoder.norm.load_state_dict(theirs.encoder.norm.state_dict())
            ours.decoder.norm.load_state_dict(theirs.decoder.norm.state_dict())
    else:  # see the module docstring
        assert ours.encoder.norm is None and ours.decoder.norm is None
        theirs.encoder.norm = theirs.decoder.norm = None
    src, tgt = torch.randn(2, 7, DIM, dtype=f64), torch.randn(2, 5, DIM, dtype=f64)
    src_pad, tgt_pad = padding(2, 7, [7, 4]), padding(2, 5, [5, 3])
    want = theirs(src, tgt, tgt_mask=future(5), tgt_is_causal=True, src_key_padding_mask=src_pad,
                  tgt_key_padding_mask=tgt_pad, memory_key_padding_mask=src_pad)  # fmt: skip
    got = ours(src, tgt, src_padding_mask=~src_pad, tgt_padding_mask=~tgt_pad)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


def test_decoder_stack_is_its_layers_then_a_norm():
    dec = TransformerDecoder(DIM, HEADS, 2, ff_dim=FF).double()
    randomise(dec)
    x, ctx = torch.randn(2, 4, DIM, dtype=f64), torch.randn(2, 3, DIM, dtype=f64)
    want = dec.norm(dec.layers[1](dec.layers[0](x, ctx), ctx))
    torch.testing.assert_close(dec(x, ctx), want, atol=0, rtol=0)


# The activations, written out (Hendrycks and Gimpel 2016 for GELU and its tanh form; SiLU: Elfwing et
# al. 2018; SwiGLU: Shazeer 2020, "GLU Variants Improve Transformer": down(silu(x W_gate) * (x W_up))).
FORMULAS = {
    "gelu": lambda h: 0.5 * h * (1 + torch.erf(h / math.sqrt(2))),
    "gelu_tanh": lambda h: 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3))),
    "relu": lambda h: torch.where(h > 0, h, torch.zeros_like(h)),
    "silu": lambda h: h / (1 + torch.exp(-h)),
}


@pytest.mark.parametrize("activation", [*FORMULAS, "swiglu"])
@pytest.mark.parametrize("bias", [True, False])
def test_feed_forward_is_its_formula(activation, bias):
    torch.manual_seed(0)
    ff = FeedForward(8, 12, activation=activation, bias=bias).double()
    x = torch.randn(3, 5, 8, dtype=f64) * 2

    def linear(layer, t):
        return t @ layer.weight.T + (layer.bias if bias else 0)

    up = linear(ff.up, x)  # (3, 5, 12)
    if activation == "swiglu":
        gate = linear(ff.gate, x)
        hidden = gate / (1 + torch.exp(-gate)) * up
    else:
        assert ff.gate is None
        hidden = FORMULAS[activation](up)
    torch.testing.assert_close(ff(x), linear(ff.down, hidden), atol=1e-12, rtol=0)
    assert (ff.up.bias is None) == (not bias)
