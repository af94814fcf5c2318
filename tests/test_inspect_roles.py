"""Head roles on synthetic heads built to have each role, from statistics alone and from maps."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

import attnkit
from attnkit.inspect import SECTION_ROLE_DESCRIPTIONS, THRESHOLDS, section_roles
from attnkit.inspect.roles import (
    ROLE_DESCRIPTIONS,
    SECTION_THRESHOLDS,
    HeadRoles,
    classify,
    head_roles,
    rare_by_counts,
    rare_by_rank,
)

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
    # From the top-8 keys, a query misses at most the mass outside its top 8: a two-sided bound.
    missed = 1 - p[0].topk(8, dim=-1).values.sum(-1).amin(-1)  # (H,) the largest mass outside any row's top 8
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
            # from statistics: exact, or a lower bound within the mass outside the top 8
            got = from_stats.rows[h][key]
            if key in {"entropy", "mean_distance", "first_token", "rare_token"}:  # exact passes, from every key
                assert got == pytest.approx(float(value), abs=1e-6), (h, key)
            else:
                assert float(value) - float(missed[h]) - 1e-6 <= got <= float(value) + 1e-6, (h, key, got)
        own = {0: "previous_token", 1: "locality", 5: "induction", 7: "duplicate_token"}.get(h)
        if own is not None:  # the score that gives the head its role is exact: its mass is in the top 8
            assert from_stats.rows[h][own] == pytest.approx(from_maps.rows[h][own], abs=1e-6), (h, own)
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


# ------------------------------------------------------------------ the rules at their thresholds
def test_thresholds_are_the_documented_ones():
    """Pinned: moving a threshold changes every role reported, so it must be a deliberate edit here too."""
    assert THRESHOLDS == {
        "induction": 0.4, "previous_token": 0.5, "sink": 0.5, "rare_token": 0.5, "rare_ratio": 2.0, "local": 0.7,
        "broad": 0.75,
    }  # fmt: skip
    assert SECTION_THRESHOLDS == {"cross_section": 0.4, "within_section": 0.7}
    assert set(SECTION_ROLE_DESCRIPTIONS) == {"within-section", "cross-section", "neighbour-section"}
    assert attnkit.inspect.THRESHOLDS is THRESHOLDS
    rules = HeadRoles([], 2).rules()
    for line in ("induction >= 0.4", "previous_token >= 0.5", "sink >= 0.5", "rare_token >= 0.5 and rare_token >= 2.0",
                 "locality >= 0.7", "entropy_norm >= 0.75"):  # fmt: skip
        assert line in rules, rules


def below(x: float) -> float:
    """The largest float under ``x``."""
    return math.nextafter(x, -math.inf)


# (scores, role): each rule exactly at its threshold fires, one float below it does not.
BOUNDARY_TABLE = [
    ({"induction": 0.4}, "induction"),
    ({"induction": below(0.4)}, "mixed"),
    ({"previous_token": 0.5}, "previous-token"),
    ({"previous_token": below(0.5)}, "mixed"),
    ({"sink": 0.5}, "sink"),
    ({"sink": below(0.5)}, "mixed"),
    ({"rare_token": 0.5, "rare_share": 0.25}, "rare-token"),  # 0.5 >= 2.0 x 0.25: both halves hold, exactly
    ({"rare_token": below(0.5), "rare_share": 0.1}, "mixed"),  # the mass half fails
    ({"rare_token": 0.5, "rare_share": math.nextafter(0.25, 1.0)}, "mixed"),  # the ratio half fails
    ({"rare_token": 0.9, "rare_share": 0.45}, "rare-token"),
    ({"locality": 0.7}, "local"),
    ({"locality": below(0.7)}, "mixed"),
    ({"entropy_norm": 0.75}, "broad"),
    ({"entropy_norm": below(0.75)}, "mixed"),
    ({"locality": below(0.7), "entropy_norm": 0.75}, "broad"),
    ({}, "mixed"),
]


@pytest.mark.parametrize(("scores", "role"), BOUNDARY_TABLE)
def test_each_rule_fires_at_its_threshold_and_not_below(scores, role):
    full = dict.fromkeys(HeadRoles.SCORE_KEYS, 0.0) | {"rare_share": 0.0} | scores
    assert classify(full) == role, scores
    # and the rules read the thresholds given, not constants: moving the threshold above the score flips it
    if role != "mixed":
        key = {"induction": "induction", "previous-token": "previous_token", "sink": "sink",
               "rare-token": "rare_token", "local": "local", "broad": "broad"}[role]  # fmt: skip
        score = {"local": "locality", "broad": "entropy_norm"}.get(key, key)
        assert classify(full, {key: math.nextafter(full[score], 2.0)}) == "mixed", scores


# Every rule holds; turning them off one at a time, in order, walks down the precedence.
PRECEDENCE = [
    ("induction", "induction"), ("previous_token", "previous-token"), ("sink", "sink"),
    ("rare_token", "rare-token"), ("locality", "local"), ("entropy_norm", "broad"),
]  # fmt: skip


def test_rules_apply_in_the_documented_order():
    scores = {"induction": 1.0, "previous_token": 1.0, "sink": 1.0, "rare_token": 1.0, "rare_share": 0.1,
              "locality": 1.0, "entropy_norm": 1.0}  # fmt: skip
    for key, role in PRECEDENCE:
        assert classify(scores) == role, scores
        scores[key] = 0.0
    assert classify(scores) == "mixed"


@pytest.mark.parametrize(("key", "role"), PRECEDENCE)
def test_a_nan_score_never_fires_its_rule(key, role):
    scores = {"induction": 0.0, "previous_token": 0.0, "sink": 0.0, "rare_token": 0.0, "rare_share": 0.0,
              "locality": 0.0, "entropy_norm": 0.0}  # fmt: skip
    scores[key] = 1.0
    assert classify(scores) == role
    scores[key] = float("nan")
    assert classify(scores) == "mixed"


def flow(within: float, neighbour: float, far: float) -> torch.Tensor:
    """``(1, 1, 3, 3)`` section flow whose middle section has those shares and the outer sections none."""
    f = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    f[0, 0, 0, 0], f[0, 0, 0, 1], f[0, 0, 0, 2] = within, neighbour, far  # section 0 reads 0, 1 and 2
    return f


# (within, neighbour, far, thresholds, section role), with dyadic shares so that the sums are exact
SECTION_TABLE = [
    (0.5, 0.125, 0.375, {"cross_section": 0.375}, "cross-section"),  # far at its threshold
    (0.5, 0.125, 0.375, {"cross_section": 0.5}, "neighbour-section"),  # far below, within below 0.7
    (0.75, 0.0, 0.25, {"cross_section": 0.5, "within_section": 0.75}, "within-section"),  # within at its threshold
    (0.75, 0.0, 0.25, {"cross_section": 0.5, "within_section": 0.875}, "neighbour-section"),
    (0.625, 0.0, 0.375, {"cross_section": 0.375, "within_section": 0.5}, "cross-section"),  # both hold: cross first
    # the default thresholds, a hair each side
    (0.5, 0.1, 0.4 + 1e-9, None, "cross-section"),
    (0.5, 0.1, 0.4 - 1e-9, None, "neighbour-section"),
    (0.7 + 1e-9, 0.3, 0.0, None, "within-section"),
    (0.7 - 1e-9, 0.3, 0.0, None, "neighbour-section"),
]


@pytest.mark.parametrize(("within", "neighbour", "far", "thresholds", "role"), SECTION_TABLE)
def test_section_rules_at_their_thresholds(within, neighbour, far, thresholds, role):
    sizes = torch.tensor([1.0, 0.0, 0.0])  # only section 0's readers count
    (row,) = section_roles(flow(within, neighbour, far) / (within + neighbour + far), sizes, thresholds)
    assert row["section_role"] == role and role in SECTION_ROLE_DESCRIPTIONS, row
    assert row["within"] == pytest.approx(within / (within + neighbour + far), abs=1e-12)
    assert row["far"] == pytest.approx(far / (within + neighbour + far), abs=1e-12)


@pytest.mark.parametrize("weighted", [False, True])
def test_section_shares_equal_their_definition(weighted):
    """within / neighbour / far of random flows, recomputed with explicit loops over the sections."""
    g = torch.Generator().manual_seed(3)
    N, H, S = 2, 3, 5
    content = torch.rand(N, H, S, S, generator=g, dtype=torch.float64)
    sizes = torch.tensor([3.0, 1.0, 4.0, 1.0, 5.0]) if weighted else None
    rows = section_roles(content, sizes)
    assert [(r["layer"], r["head"]) for r in rows] == [(n, h) for n in range(N) for h in range(H)]
    for r in rows:
        f = content[r["layer"], r["head"]]
        w = [1.0] * S if sizes is None else sizes.tolist()
        share = {"within": 0.0, "neighbour": 0.0, "far": 0.0}
        for a in range(S):
            for b in range(S):
                share["within" if a == b else "neighbour" if abs(a - b) == 1 else "far"] += w[a] * float(f[a, b])
        total = sum(share.values())
        for key, value in share.items():
            assert r[key] == pytest.approx(value / total, rel=1e-12), (r, key)
        want = ("cross-section" if r["far"] >= 0.4 else "within-section" if r["within"] >= 0.7
                else "neighbour-section")  # fmt: skip
        assert r["section_role"] == want


def test_two_sections_are_never_cross_section():
    """With two sections nothing lies two sections away, whatever the thresholds."""
    content = torch.tensor([[[[0.5, 0.5], [0.5, 0.5]]]], dtype=torch.float64)
    (row,) = section_roles(content, thresholds={"cross_section": 0.0})
    assert row["far"] == 0.0 and row["section_role"] == "neighbour-section"


def test_rare_by_counts_and_rank_at_their_limits():
    counts = {"the": 900, "five": 5, "six": 6, "one": 1}
    assert rare_by_counts(["the", "five", "six", "one", "unseen"], counts).tolist() == [False, True, False, True, True]
    assert rare_by_counts(["six", "five"], counts, max_count=6).tolist() == [True, True]
    batch = rare_by_counts([["the", "one"], ["six", "five"]], counts)  # (B, L)
    assert batch.dtype == torch.bool and batch.tolist() == [[False, True], [False, True]]
    assert rare_by_counts([["six"], ["the"]], counts, max_count=6).tolist() == [[True], [False]]  # reaches each row
    assert rare_by_counts(["unseen", "one"], counts, max_count=0).tolist() == [True, False]  # unseen: count 0
    ids = torch.tensor([[0, 49, 50, 99]])
    assert rare_by_rank(ids, 100).tolist() == [[False, False, True, True]]  # the top half of the ids
    assert rare_by_rank(ids, 100, rarest=0.01).tolist() == [[False, False, False, True]]


def test_markdown_table_exactly():
    row = {"layer": "h.0", "head": 1, "role": "local", "entropy": 1.234, "mean_distance": 0.5, "locality": 0.875,
           "previous_token": float("nan"), "sink": 0.0, "duplicate_token": float("nan"), "induction": 0.1,
           "rare_token": 2.0}  # fmt: skip
    assert HeadRoles([row], 2).to_markdown().splitlines() == [
        "| layer | head | role | entropy | mean_distance | locality | previous_token | sink | duplicate_token | "
        "induction | rare_token |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        "| h.0 | 1 | local | 1.23 | 0.50 | 0.88 | - | 0.00 | - | 0.10 | 2.00 |",
    ]


def test_punctuation_after_the_tokenizers_space_marks():
    from attnkit.inspect.roles import is_punctuation

    assert all(is_punctuation(t) for t in (",", "##.", "Ġ!", "▁?", "Ċ;", "...", "—"))
    assert not any(is_punctuation(t) for t in ("a", "##a", "Ġ", "", "1", ",a"))


def test_json_counts_and_grid_of_two_layers():
    heads = (("a", 0, "sink", 0.5), ("a", 1, "sink", float("nan")), ("b", 0, "local", 1.0))
    rows = [{"layer": name, "head": h, "role": role, "entropy": value} for name, h, role, value in heads]
    roles = HeadRoles(rows, 3, {"local": 0.9})
    payload = json.loads(roles.to_json())
    assert payload["local_window"] == 3 and payload["thresholds"] == {"local": 0.9}
    assert [r["entropy"] for r in payload["rows"]] == [0.5, None, 1.0]  # only NaN becomes null
    assert roles.to_json(indent=2).count("\n") > 10  # keyword arguments reach json.dumps
    assert roles.counts() == {**dict.fromkeys(ROLE_DESCRIPTIONS, 0), "sink": 2, "local": 1}
    assert roles.grid() == [["sink", "sink"], ["local"]]


@pytest.mark.parametrize("batched", [False, True])
def test_token_ids_as_a_tensor_give_the_same_scores_as_strings(batched):
    p, tokens, ids, rare = synthetic_layer()
    p2 = torch.cat([p, p.flip(1)])  # (2, H, L, L): a batch of two, the heads in another order in the second
    q = torch.zeros(2, p.shape[1], L, 4, dtype=torch.float64)
    st = attnkit.attention_stats(q, q, q, mask=torch.log(p2), topk=8, pool=16)
    strings = head_roles(st, tokens=tokens, rare=rare)
    tensor_ids = ids.expand(2, L) if batched else ids  # (B, L) or (L,)
    from_ids = head_roles(st, tokens=tensor_ids, rare=rare)
    for a, b in zip(strings.rows, from_ids.rows, strict=True):
        for key in ("induction", "duplicate_token"):
            assert a[key] == pytest.approx(b[key], abs=1e-12) and not math.isnan(a[key]), (key, a, b)
    with pytest.raises(ValueError, match=r"tokens must cover the 64 keys of each of the 2 sequences, got \(2, 63\)"):
        head_roles(st, tokens=ids[None, :63].expand(2, 63))


def test_a_batch_of_token_lists_scores_each_sequence_with_its_own_tokens():
    """``tokens`` as one list per sequence: the second sequence's tokens are another (shifted) sequence."""
    p, tokens, _, rare = synthetic_layer()
    q = torch.zeros(2, p.shape[1], L, 4, dtype=torch.float64)
    st = attnkit.attention_stats(q, q, q, mask=torch.log(torch.cat([p, p])), topk=8, pool=16)
    other = [f"u{n}" for n in range(L)]  # no repeats: no query has an earlier occurrence
    other[0], other[5] = "[CLS]", ","
    both = head_roles(st, tokens=[tokens, other], rare=rare)
    first = head_roles(st, tokens=[tokens, tokens], rare=rare)
    ind = both.rows[5]  # induction: only the first sequence has repeats, so its score is the first's alone
    assert ind["induction"] == pytest.approx(first.rows[5]["induction"], abs=1e-12) == pytest.approx(1.0)
    assert both.rows[3]["punctuation"] > 0 and first.rows[3]["punctuation"] == 0  # "," only in the second


def stats_from(p: torch.Tensor, topk: int = 3):
    """Statistics of attention whose weights are exactly ``p (1, H, Lq, Lk)`` (zero scores + the mask log p)."""
    _, H, Lq, Lk = p.shape
    q, k = torch.zeros(1, H, Lq, 4, dtype=torch.float64), torch.zeros(1, H, Lk, 4, dtype=torch.float64)
    return attnkit.attention_stats(q, k, k, mask=torch.log(p), topk=topk, pool=1)


def test_scores_of_one_query_over_five_keys():
    """Lq = 1 < Lk = 5: the query sits at position 4 (bottom-right aligned), the only valid row."""
    p = torch.tensor([[0.1, 0.1, 0.1, 0.6, 0.1], [0.6, 0.1, 0.1, 0.1, 0.1]], dtype=torch.float64).view(1, 2, 1, 5)
    rows = head_roles(stats_from(p)).rows
    assert [r["source"] for r in rows] == ["top-3", "top-3"]
    assert rows[0]["previous_token"] == pytest.approx(0.6) and rows[0]["first_token"] == pytest.approx(0.1)
    assert rows[1]["first_token"] == pytest.approx(0.6) and rows[1]["sink"] == pytest.approx(0.6)
    assert rows[0]["locality"] == pytest.approx(0.8)  # keys 2..4 of the top 3 (0.6, 0.1, 0.1) within +-2 of 4
    assert rows[0]["mean_distance"] == pytest.approx(0.4 + 0.3 + 0.2 + 0.6)
    assert rows[0]["role"] == "previous-token" and rows[1]["role"] == "sink"


def test_scores_of_tiny_maps_and_the_rows_they_average():
    one = head_roles(stats_from(torch.ones(1, 1, 1, 1, dtype=torch.float64), topk=1)).rows[0]
    assert math.isnan(one["previous_token"])  # no query has a previous token: undefined, not 0
    assert one["first_token"] == 1.0 and one["locality"] == 1.0 and one["entropy_norm"] == 0.0
    two = torch.tensor([[[[1.0, 0.0], [0.25, 0.75]]]], dtype=torch.float64)
    row = head_roles(stats_from(two, topk=2), tokens=["a", "b"]).rows[0]
    assert row["previous_token"] == pytest.approx(0.25)  # one valid query: its own mass
    assert math.isnan(row["induction"]) and math.isnan(row["duplicate_token"])  # no token repeats
    uniform = torch.full((1, 1, 2, 2), 0.5, dtype=torch.float64)
    assert head_roles(stats_from(uniform, topk=2)).rows[0]["entropy_norm"] == pytest.approx(1.0)  # log 2 < 1


def test_without_tokens_every_token_score_is_present_and_nan():
    p, *_ = synthetic_layer()
    for row in head_roles(stats_of(p)).rows:
        assert set(HeadRoles.SCORE_KEYS) <= set(row)
        for key in ("cls", "sep", "punctuation", "duplicate_token", "induction", "rare_token", "rare_share"):
            assert math.isnan(row[key]), key


def test_induction_may_point_at_the_query_itself():
    """ "x x": query 1's token occurred at 0, so the induction key is 0 + 1 = 1, the query's own position."""
    p = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]], dtype=torch.float64)
    row = head_roles(stats_from(p, topk=2), tokens=["x", "x"]).rows[0]
    assert row["induction"] == pytest.approx(1.0) and row["duplicate_token"] == pytest.approx(0.0)


def test_rare_keys_that_are_sinks_count_as_sinks_only_with_tokens():
    """A rare [CLS] or punctuation key is a sink key: with tokens it leaves the rare mass; without, it stays."""
    p = torch.tensor([[[[0.7, 0.1, 0.1, 0.1]] * 4]], dtype=torch.float64)  # (1, 1, 4, 4): 0.7 on key 0
    rare = torch.tensor([True, True, False, False])
    with_tokens = head_roles(stats_from(p, topk=2), tokens=["[CLS]", "w", "x", "y"], rare=rare).rows[0]
    without = head_roles(stats_from(p, topk=2), rare=rare).rows[0]
    assert with_tokens["rare_token"] == pytest.approx(0.1) and with_tokens["rare_share"] == pytest.approx(0.25)
    assert without["rare_token"] == pytest.approx(0.8) and without["rare_share"] == pytest.approx(0.5)


def test_token_and_rare_shapes_are_checked():
    p, tokens, _, rare = synthetic_layer()
    st = stats_of(p)
    with pytest.raises(ValueError, match=r"tokens must have one entry per key \(Lk = 64\)"):
        head_roles(st, tokens=tokens[:-1])
    with pytest.raises(ValueError, match=r"rare must be \(Lk,\) or \(B, Lk\) = \(1, 64\), got \(1, 63\)"):
        head_roles(st, rare=rare[None, :63])


class Recorded(list):
    """A recording's shape: a list of layers and the tokens of the run."""

    tokens = ("x", "y", "x", "y")


def test_sources_layer_names_thresholds_and_the_recordings_tokens():
    p = torch.tensor([[[[1.0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]]], dtype=torch.float64)
    st = stats_from(p.clamp(min=1e-9) / p.clamp(min=1e-9).sum(-1, keepdim=True), topk=2)  # (1, 1, 4, 4)
    assert [r["layer"] for r in head_roles(st).rows] == ["0"]
    assert [r["layer"] for r in head_roles([st, st]).rows] == ["0", "1"]
    bare = SimpleNamespace(name="enc.0", stats=st, maps=None)  # no tokens attribute at all
    roles = head_roles(Recorded([bare]), local_window=3, thresholds={"induction": 0.99})
    assert roles.local_window == 3 and roles.thresholds == {**THRESHOLDS, "induction": 0.99}
    row = roles.rows[0]
    assert row["layer"] == "enc.0" and row["induction"] == pytest.approx(1.0)  # from the recording's tokens
    assert row["role"] == "induction"  # 1.0 >= 0.99: the given threshold is the one applied ...
    assert head_roles(Recorded([bare]), thresholds={"induction": 1.5}).rows[0]["role"] != "induction"  # ... always
    with pytest.raises(ValueError, match=r"layer 'enc\.1' was recorded without statistics"):
        head_roles([SimpleNamespace(name="enc.1", stats=None, maps=None)])


def test_rare_share_is_the_exact_fraction():
    p = torch.full((1, 1, 3, 3), 1 / 3, dtype=torch.float64)
    row = head_roles(stats_from(p, topk=1), rare=torch.tensor([True, False, False])).rows[0]
    assert row["rare_share"] == 1 / 3  # float64, not a float32 rounding of it
