"""Head roles on synthetic heads built to have each role, from statistics alone and from maps."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

import attnkit
from attnkit.inspect.roles import ROLE_DESCRIPTIONS, HeadRoles, classify, head_roles, rare_by_counts, rare_by_rank

L, HALF = 64, 32
ROLES = ["previous-token", "local", "broad", "sink", "rare-token", "induction", "mixed", "duplicate"]


def synthetic_layer():
    """Target weight matrices ``p (1, H, L, L)``, one per role, the tokens and the rare mask."""
    g = torch.Generator().manual_seed(0)
    first = torch.randperm(100, generator=g)[:HALF]  # no repeats inside a half
    ids = torch.cat([first, first])  # a random sequence repeated: TransformerLens's induction setting
    tokens = [f"t{int(t)}" for t in ids]
    rare = torch.zeros(L, dtype=torch.bool)
    rare[[5, 17, 29, 41, 50, 60]] = True
    i = torch.arange(L)[:, None]
    j = torch.arange(L)[None, :]
    causal_uniform = (j <= i).double() / (i + 1).double()
    p = torch.zeros(len(ROLES), L, L, dtype=torch.float64)
    p[0] = (j == (i - 1).clamp(min=0)).double()  # previous token
    p[1] = ((i - j).abs() <= 2).double()  # uniform within +-2
    p[2] = 1.0 / L  # uniform over everything
    p[3] = 0.95 * (j == 0).double() + 0.05 * causal_uniform  # sink on the first token
    p[4] = 0.9 * rare.double().expand(L, L) / rare.sum() + 0.1 / L  # rare tokens
    p[5] = torch.where(i >= HALF, (j == i - HALF + 1).double(), causal_uniform)  # induction
    p[6] = 0.4 * (j == 0).double() + 0.4 * (j == (i - 1).clamp(min=0)).double() + 0.2 * causal_uniform  # mixed
    p[7] = torch.where(i >= HALF, (j == i - HALF).double(), causal_uniform)  # duplicate token
    p = p / p.sum(-1, keepdim=True)
    return p.unsqueeze(0), tokens, ids, rare


def stats_of(p, topk=8):
    """Attention whose weights are exactly ``p``: zero scores plus the float mask ``log p``."""
    H = p.shape[1]
    q = torch.zeros(1, H, L, 4, dtype=torch.float64)
    st = attnkit.attention_stats(q, q, q, mask=torch.log(p), topk=topk, pool=16)
    return st


def test_each_synthetic_head_gets_its_role_from_statistics_alone():
    p, tokens, _, rare = synthetic_layer()
    roles = head_roles(stats_of(p), tokens=tokens, rare=rare)
    got = [r["role"] for r in roles.rows]
    want = [*ROLES[:7], "mixed"]
    assert got == want, roles.to_markdown()
    assert all(r["source"] == "top-8" for r in roles.rows)
    dup = roles.rows[7]
    assert dup["duplicate_token"] == pytest.approx(1.0) and dup["induction"] < 0.1
    ind = roles.rows[5]
    assert ind["induction"] == pytest.approx(1.0) and ind["duplicate_token"] < 0.1


def test_scores_equal_their_definitions_on_the_maps():
    p, tokens, _, rare = synthetic_layer()
    st = stats_of(p)
    layer = SimpleNamespace(name="L0", stats=st, maps=p.float(), tokens=tokens)
    from_maps = head_roles([layer], rare=rare)
    from_stats = head_roles(st, tokens=tokens, rare=rare)
    assert from_maps.rows[0]["source"] == "maps"
    i = torch.arange(L)
    for h in range(p.shape[1]):
        ph = p[0, h]
        want = {
            "first_token": ph[:, 0].mean(),
            "previous_token": ph[i[1:], i[1:] - 1].mean(),
            "locality": (ph * ((i[:, None] - i[None, :]).abs() <= 2)).sum(-1).mean(),
            "entropy": -torch.special.xlogy(ph, ph).sum(-1).mean(),
            "mean_distance": (ph * (i[:, None] - i[None, :]).abs()).sum(-1).mean(),
            "rare_token": ph[:, rare].sum(-1).mean(),
            "induction": ph[i[HALF:], i[HALF:] - HALF + 1].mean(),
            "duplicate_token": ph[i[HALF:], i[HALF:] - HALF].mean(),
        }
        for key, value in want.items():
            assert from_maps.rows[h][key] == pytest.approx(float(value), abs=1e-5), (h, key)
            # from statistics: exact or a lower bound (exact for the heads where the score is large)
            assert from_stats.rows[h][key] <= from_maps.rows[h][key] + 1e-5 or key in {"entropy", "mean_distance"}
        assert from_maps.rows[h]["role"] == from_stats.rows[h]["role"]


def test_special_tokens_and_punctuation_make_sink_heads():
    tokens = ["[CLS]", "the", "cat", ",", "sat", ".", "[SEP]"]
    n = len(tokens)
    p = torch.full((1, 2, n, n), 0.01, dtype=torch.float64)
    p[0, 0, :, 6] = 1.0  # everything on [SEP]
    p[0, 1, :, [3, 5]] = 1.0  # everything on punctuation
    p = p / p.sum(-1, keepdim=True)
    q = torch.zeros(1, 2, n, 4, dtype=torch.float64)
    roles = head_roles(attnkit.attention_stats(q, q, q, mask=p.log()), tokens=tokens)
    assert [r["role"] for r in roles.rows] == ["sink", "sink"]
    assert roles.rows[0]["sep"] > 0.9 and roles.rows[1]["punctuation"] > 0.9
    assert roles.rows[0]["cls"] == pytest.approx(float(p[0, 0, :, 0].mean()), abs=1e-6)


def test_without_tokens_token_scores_are_nan_and_never_fire():
    p, *_ = synthetic_layer()
    roles = head_roles(stats_of(p))
    assert math.isnan(roles.rows[5]["induction"]) and math.isnan(roles.rows[0]["rare_token"])
    assert roles.rows[5]["role"] != "induction"
    assert json.loads(roles.to_json())["rows"][5]["induction"] is None


def test_outputs_and_helpers():
    p, tokens, _, rare = synthetic_layer()
    roles = head_roles(stats_of(p), tokens=tokens, rare=rare)
    assert isinstance(roles, HeadRoles)
    payload = json.loads(roles.to_json())
    assert set(payload["roles"]) == set(ROLE_DESCRIPTIONS) and len(payload["rows"]) == p.shape[1]
    assert set(HeadRoles.SCORE_KEYS) <= set(payload["rows"][0])
    md = roles.to_markdown()
    assert md.count("\n") == p.shape[1] + 1 and "previous-token" in md
    assert roles.counts()["induction"] == 1 and roles.grid() == [[r["role"] for r in roles.rows]]
    assert "induction >= 0.4" in roles.rules()
    assert rare_by_rank(torch.tensor([1, 60, 99]), 100).tolist() == [False, True, True]
    assert rare_by_counts(["a", "b"], {"a": 100, "b": 1}).tolist() == [False, True]
    assert classify({"locality": 0.9, "entropy_norm": 0.2}) == "local"
    assert classify({"locality": 0.9}, {"local": 0.95}) == "mixed"


def test_roles_from_a_recorded_model():
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    cfg = transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)  # fmt: skip
    model = transformers.GPT2Model(cfg).eval()
    ids = torch.randint(0, 50, (1, 20))
    with torch.no_grad(), attnkit.inspect.record(model, tokens=[str(int(t)) for t in ids[0]]) as rec:
        model(input_ids=ids)
    roles = head_roles(rec, rare=rare_by_rank(ids[0], 50))
    assert len(roles.rows) == 8 and {r["layer"] for r in roles.rows} == {"h.0.attn", "h.1.attn"}
    assert all(r["role"] in ROLE_DESCRIPTIONS for r in roles.rows)
    assert not math.isnan(roles.rows[0]["induction"])
