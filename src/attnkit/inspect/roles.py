"""Head roles: what each attention head does, scored and labelled from its statistics.

Every score is an average over batch elements and over the queries it applies to (rows
with no allowed key are left out). Scores that need the attention of each query on a set
of keys (locality, previous-token, duplicate-token, induction) are computed from the full
map when one was recorded, else from the top-k keys of each query (`AttentionStats.topk_*`):
then they are lower bounds, exact whenever the head puts the relevant mass in its top-k,
which is the case for the heads they are meant to find. Scores on a fixed set of keys
(first token, [CLS], [SEP], punctuation, rare tokens) are exact from ``received`` alone.
So roles need no ``Lq x Lk`` map and run at any length.

Scores (per head):

* ``entropy``: mean row entropy in nats; ``entropy_norm``: divided by ``log(Lk)`` (1 = uniform).
* ``mean_distance``: mean of ``sum_j p_ij |i' - j|``.
* ``locality``: mass within ``+-local_window`` positions of the aligned query position.
* ``previous_token``: mass on key ``i' - 1`` (TransformerLens's previous-token pattern).
* ``first_token``, ``cls``, ``sep``, ``punctuation``: mass on position 0, on [CLS]-like
  tokens, on [SEP]-like tokens, on punctuation; ``sink``: mass on the union of those.
* ``duplicate_token``: mass on earlier occurrences of the query's own token, over queries
  whose token occurred before; ``induction``: mass on the tokens that FOLLOWED earlier
  occurrences of the query's token, over queries that have one. These are the
  duplicate-token and induction patterns of TransformerLens's ``head_detector``
  (Nanda and Bloom, 2022; induction heads: Olsson et al., 2022, "In-context Learning and
  Induction Heads"): on a random sequence repeated twice, they are the mass on ``i - n``
  and ``i - n + 1``.
* ``rare_token``: mass on rare tokens; ``rare_share``: the fraction of keys that are rare
  (what a head that ignores rarity would put there). Rarity comes from the tokenizer's
  frequency rank (`rare_by_rank`) or from counts in a reference corpus (`rare_by_counts`).
"""

from __future__ import annotations

import json
import math
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from attnkit.stats import AttentionStats

__all__ = [
    "ROLE_DESCRIPTIONS",
    "SECTION_ROLE_DESCRIPTIONS",
    "SECTION_THRESHOLDS",
    "THRESHOLDS",
    "HeadRoles",
    "classify",
    "head_roles",
    "rare_by_counts",
    "rare_by_rank",
    "section_roles",
]

ROLE_DESCRIPTIONS: dict[str, str] = {
    "induction": "attends to the token that followed an earlier occurrence of the current token (copies patterns)",
    "previous-token": "attends to the token just before the current one",
    "sink": "parks its attention on the first token, [CLS]/[SEP] or punctuation (a 'no-op' or sink head)",
    "rare-token": "locks onto rare tokens (by tokenizer frequency rank or a reference corpus)",
    "local": "sticks to nearby tokens, within a few positions",
    "broad": "spreads its attention widely and evenly over the context",
    "mixed": "none of the above dominates",
}
"""Each head role in one sentence, as the report and `HeadRoles.to_markdown` show it."""

# Documented thresholds; a head gets the first role whose rule holds, in this order.
THRESHOLDS: dict[str, float] = {
    "induction": 0.4,  # induction >= 0.4 (needs tokens, and some query with an earlier occurrence)
    "previous_token": 0.5,  # previous_token >= 0.5
    "sink": 0.5,  # sink >= 0.5
    "rare_token": 0.5,  # rare_token >= 0.5 and rare_token >= rare_ratio * rare_share
    "rare_ratio": 2.0,
    "local": 0.7,  # locality >= 0.7
    "broad": 0.75,  # entropy_norm >= 0.75
}
"""The classifier's thresholds (editable); a head gets the first role whose rule holds, in this order."""

RULES = """A head gets the first role whose rule holds:
  induction       induction >= {induction}
  previous-token  previous_token >= {previous_token}
  sink            sink >= {sink}   (mass on first token, [CLS], [SEP], punctuation)
  rare-token      rare_token >= {rare_token} and rare_token >= {rare_ratio} x rare_share
  local           locality >= {local}   (mass within +-local_window positions)
  broad           entropy_norm >= {broad}   (entropy / log Lk)
  mixed           otherwise"""

CLS_TOKENS = frozenset({"[CLS]", "<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>"})
SEP_TOKENS = frozenset({"[SEP]", "</s>", "<eos>", "<|endoftext|>", "<|end_of_text|>", "<|eot_id|>"})
_WORD_MARKS = ("##", "Ġ", "▁", "Ċ")  # WordPiece continuation, byte-level BPE and SentencePiece space marks


def is_punctuation(token: str) -> bool:
    """True for a token made only of punctuation (after the tokenizer's space/continuation marks)."""
    t = token
    for mark in _WORD_MARKS:
        t = t.replace(mark, "")
    t = t.strip()
    return bool(t) and all(unicodedata.category(c).startswith("P") for c in t)


def rare_by_rank(token_ids: Tensor, vocab_size: int, *, rarest: float = 0.5) -> Tensor:
    """Rare tokens by the tokenizer's frequency rank: ids in the top ``rarest`` fraction of the vocabulary.

    Byte-pair vocabularies (GPT-2, Llama) assign ids in merge order, which follows corpus
    frequency (Sennrich et al., 2016), so a high id is a rare token; WordPiece vocabularies
    (BERT) are ordered likewise after their reserved entries.

    Args:
        token_ids: ``(B, L)`` or ``(L,)`` int token ids.

    Returns:
        bool tensor of the same shape, True for rare tokens.
    """
    return token_ids >= math.ceil((1.0 - rarest) * vocab_size)


def rare_by_counts(tokens: Sequence[str] | Sequence[Sequence[str]], counts: dict[str, int], *, max_count: int = 5):
    """Rare tokens by a reference corpus: tokens seen at most ``max_count`` times in ``counts``.

    Returns:
        bool tensor ``(L,)`` or ``(B, L)``, True for rare tokens.
    """
    if tokens and not isinstance(tokens[0], str):
        return torch.stack([rare_by_counts(t, counts, max_count=max_count) for t in tokens])
    return torch.tensor([counts.get(t, 0) <= max_count for t in tokens], dtype=torch.bool)


@dataclass
class HeadRoles:
    """Scores and role of every head. ``rows``: one dict per head (``layer``, ``head``, ``role``, every score)."""

    rows: list[dict]
    local_window: int
    thresholds: dict[str, float] = field(default_factory=lambda: dict(THRESHOLDS))

    SCORE_KEYS = (
        "entropy", "entropy_norm", "mean_distance", "locality", "previous_token", "first_token", "cls", "sep",
        "punctuation", "sink", "duplicate_token", "induction", "rare_token", "rare_share",
    )  # fmt: skip

    def to_json(self, **kwargs) -> str:
        """The rows, the thresholds and the role descriptions as JSON (NaN becomes null)."""

        def clean(v):
            return None if isinstance(v, float) and math.isnan(v) else v

        rows = [{k: clean(v) for k, v in r.items()} for r in self.rows]
        payload = {
            "rows": rows,
            "local_window": self.local_window,
            "thresholds": self.thresholds,
            "roles": ROLE_DESCRIPTIONS,
        }
        return json.dumps(payload, **kwargs)

    def to_markdown(self) -> str:
        """A table with one line per head (scores to 2 decimals; '-' where a score does not apply)."""
        cols = ["layer", "head", "role", "entropy", "mean_distance", "locality", "previous_token", "sink",
                "duplicate_token", "induction", "rare_token"]  # fmt: skip
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in self.rows:
            cells = []
            for c in cols:
                v = r[c]
                cells.append(
                    "-" if isinstance(v, float) and math.isnan(v) else f"{v:.2f}" if isinstance(v, float) else str(v)
                )
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def counts(self) -> dict[str, int]:
        """How many heads have each role."""
        out = dict.fromkeys(ROLE_DESCRIPTIONS, 0)
        for r in self.rows:
            out[r["role"]] += 1
        return out

    def grid(self) -> list[list[str]]:
        """Roles as ``[layer][head]`` (layers in recording order)."""
        layers: dict[str, list[str]] = {}
        for r in self.rows:
            layers.setdefault(r["layer"], []).append(r["role"])
        return list(layers.values())

    def rules(self) -> str:
        return RULES.format(**self.thresholds)


def classify(scores: dict[str, float], thresholds: dict[str, float] | None = None) -> str:
    """The role of one head from its scores (rules in `RULES`; NaN scores never fire a rule)."""
    t = {**THRESHOLDS, **(thresholds or {})}

    def at_least(key: str, limit: float) -> bool:
        v = scores.get(key, float("nan"))
        return not math.isnan(v) and v >= limit

    if at_least("induction", t["induction"]):
        return "induction"
    if at_least("previous_token", t["previous_token"]):
        return "previous-token"
    if at_least("sink", t["sink"]):
        return "sink"
    if at_least("rare_token", t["rare_token"]) and scores["rare_token"] >= t["rare_ratio"] * scores["rare_share"]:
        return "rare-token"
    if at_least("locality", t["local"]):
        return "local"
    if at_least("entropy_norm", t["broad"]):
        return "broad"
    return "mixed"


# ------------------------------------------------------------------------- scoring
def _token_ids(tokens, B: int, L: int) -> Tensor | None:
    """``(B, L)`` int ids standing for the tokens (equal tokens get equal ids), or None."""
    if tokens is None:
        return None
    if isinstance(tokens, Tensor):
        ids = tokens.long()
        ids = ids.expand(B, -1) if ids.dim() == 1 else ids
    else:
        seqs = [tokens] * B if tokens and isinstance(tokens[0], str | int) else list(tokens)
        vocab: dict = {}
        ids = torch.tensor([[vocab.setdefault(t, len(vocab)) for t in seq] for seq in seqs])
    if tuple(ids.shape) != (B, L):
        raise ValueError(
            f"head_roles: tokens must cover the {L} keys of each of the {B} sequences, got {tuple(ids.shape)}"
        )
    return ids


def _strings(tokens, B: int) -> list[list[str]] | None:
    if tokens is None or isinstance(tokens, Tensor) or not tokens:
        return None
    seqs = [tokens] * B if isinstance(tokens[0], str | int) else list(tokens)
    return [[str(t) for t in seq] for seq in seqs]


def _mass_per_query(p_or_w: Tensor, j: Tensor, select) -> Tensor:
    """``(B, H, Lq)`` mass on the keys ``select(b, i, j)`` picks; ``j`` indexes the last axis of ``p_or_w``."""
    B, _, Lq = p_or_w.shape[:3]
    b = torch.arange(B).view(B, 1, 1, 1)
    i = torch.arange(Lq).view(1, 1, Lq, 1)
    return (p_or_w * select(b, i, j)).sum(-1)


def _mean(x: Tensor, valid: Tensor) -> Tensor:
    """``(H,)`` mean of ``x (B, H, Lq)`` over batch and queries where ``valid`` (broadcastable)."""
    valid = valid.expand_as(x).to(x.dtype)
    n = valid.sum((0, 2))
    return torch.where(n > 0, (x * valid).sum((0, 2)) / n.clamp(min=1), torch.full_like(n, float("nan")))


def _layer_scores(
    stats: AttentionStats, maps: Tensor | None, tokens, rare: Tensor | None, local_window: int
) -> tuple[list[dict], str]:
    B, H, Lq, Lk = stats.shape
    offset = Lk - Lq
    valid = torch.isfinite(stats.lse).float()  # (B, H, Lq): rows with at least one key
    n_valid = valid.sum(-1).clamp(min=1)  # (B, H)
    if maps is not None:
        weights, j = maps.double(), torch.arange(Lk).view(1, 1, 1, Lk)
        source = "maps"
    else:
        weights, j = stats.topk_weight.double(), stats.topk_index
        source = f"top-{stats.topk_index.shape[-1]}"
    pos = lambda i: i + offset
    scores: dict[str, Tensor] = {
        "entropy": _mean(stats.entropy.double(), valid),
        "entropy_norm": _mean(stats.entropy.double(), valid) / max(math.log(Lk), 1e-12),
        "mean_distance": _mean(stats.mean_distance.double(), valid),
        "locality": _mean(_mass_per_query(weights, j, lambda b, i, j: (pos(i) - j).abs() <= local_window), valid),
        "previous_token": _mean(
            _mass_per_query(weights, j, lambda b, i, j: j == pos(i) - 1), valid * (torch.arange(Lq) + offset >= 1)
        ),
    }
    received = stats.received.double()  # (B, H, Lk)

    def key_mass(keys: Tensor) -> Tensor:
        """``(H,)`` mean over batch of the per-query mass on the keys ``keys (B, Lk)`` bool."""
        return ((received * keys[:, None, :].double()).sum(-1) / n_valid).mean(0)

    first = torch.zeros(B, Lk, dtype=torch.bool)
    first[:, 0] = True
    scores["first_token"] = key_mass(first)
    nan = torch.full((H,), float("nan"), dtype=torch.float64)
    strings = _strings(tokens, B)
    sink_keys = first.clone()
    if strings is not None:
        if any(len(s) != Lk for s in strings):
            raise ValueError(f"head_roles: tokens must have one entry per key (Lk = {Lk})")
        cls = torch.tensor([[t in CLS_TOKENS for t in s] for s in strings])
        sep = torch.tensor([[t in SEP_TOKENS for t in s] for s in strings])
        punct = torch.tensor([[is_punctuation(t) for t in s] for s in strings])
        scores["cls"], scores["sep"], scores["punctuation"] = key_mass(cls), key_mass(sep), key_mass(punct)
        sink_keys = sink_keys | cls | sep | punct
    else:
        scores["cls"] = scores["sep"] = scores["punctuation"] = nan
    scores["sink"] = key_mass(sink_keys)
    ids = _token_ids(tokens, B, Lk) if tokens is not None else None
    if ids is not None and Lq == Lk:
        # a query "has a duplicate" when its token occurred before it: O(L) via first occurrences
        first_seen = torch.full((B, int(ids.max()) + 1), Lk, dtype=torch.long)
        first_seen.scatter_reduce_(1, ids, torch.arange(Lk).expand(B, Lk), reduce="amin")
        has_dup = (torch.gather(first_seen, 1, ids) < torch.arange(Lq)).view(B, 1, Lq)  # (B, 1, Lq)
        has_ind = has_dup  # an earlier occurrence at m < i is followed by key m + 1 <= i

        def at(b, jj):  # token at key jj (any shape broadcasting with b), -1 outside [0, Lk)
            bb, jj = torch.broadcast_tensors(b, jj)
            inside = (jj >= 0) & (jj < Lk)
            return torch.where(inside, ids[bb, jj.clamp(0, Lk - 1)], torch.full_like(jj, -1))

        dup = _mass_per_query(weights, j, lambda b, i, jj: (at(b, jj) == ids[b, i]) & (jj < i))
        ind = _mass_per_query(weights, j, lambda b, i, jj: (at(b, jj - 1) == ids[b, i]) & (jj >= 1) & (jj <= i))
        scores["duplicate_token"] = _mean(dup, valid * has_dup)
        scores["induction"] = _mean(ind, valid * has_ind)
    else:
        scores["duplicate_token"] = scores["induction"] = nan
    if rare is not None:
        rare = rare.bool()
        rare = rare.expand(B, -1) if rare.dim() == 1 else rare
        if tuple(rare.shape) != (B, Lk):
            raise ValueError(f"head_roles: rare must be (Lk,) or (B, Lk) = ({B}, {Lk}), got {tuple(rare.shape)}")
        rare = rare & ~sink_keys if strings is not None else rare
        scores["rare_token"] = key_mass(rare)
        scores["rare_share"] = torch.full((H,), rare.double().mean().item(), dtype=torch.float64)
    else:
        scores["rare_token"] = scores["rare_share"] = nan
    rows = [{k: float(v[h]) for k, v in scores.items()} for h in range(H)]
    return rows, source


def _layers(source) -> Iterable[tuple[str, AttentionStats, Tensor | None, object]]:
    if isinstance(source, AttentionStats):
        yield "0", source, None, None
        return
    for n, item in enumerate(source):
        if isinstance(item, AttentionStats):
            yield str(n), item, None, None
        else:  # a LayerRecord (or anything with name / stats / maps / tokens)
            if item.stats is None:
                raise ValueError(f"head_roles: layer {item.name!r} was recorded without statistics (stats=False)")
            yield item.name, item.stats, item.maps, getattr(item, "tokens", None)


def head_roles(
    source,
    *,
    tokens=None,
    rare: Tensor | None = None,
    local_window: int = 2,
    thresholds: dict[str, float] | None = None,
) -> HeadRoles:
    """Score and label every head of a recording.

    Args:
        source: a `attnkit.inspect.Recording`, a list of its layers, an `AttentionStats` or a
            list of them (self-attention: ``Lq == Lk`` for the token-based scores).
        tokens: the key tokens, ``(L,)`` / ``(B, L)`` strings or ids (default: the recording's
            tokens). Needed for [CLS]/[SEP]/punctuation, duplicate-token and induction scores.
        rare: bool ``(Lk,)`` or ``(B, Lk)``, True for rare tokens (`rare_by_rank`, `rare_by_counts`).
        local_window: ``k`` of the locality score (mass within ``+-k`` positions).
        thresholds: overrides of `THRESHOLDS`.

    Returns:
        `HeadRoles`; ``rows`` hold ``layer``, ``head``, ``role``, ``source`` ("maps" or "top-K")
        and every score in `HeadRoles.SCORE_KEYS` (NaN where a score needs what was not given).
    """
    merged = {**THRESHOLDS, **(thresholds or {})}
    rows = []
    for name, stats, maps, layer_tokens in _layers(source):
        toks = tokens if tokens is not None else layer_tokens
        if toks is None and getattr(source, "tokens", None) is not None:
            toks = source.tokens
        scored, src = _layer_scores(stats.to("cpu"), None if maps is None else maps.cpu(), toks, rare, local_window)
        for h, sc in enumerate(scored):
            rows.append({"layer": name, "head": h, "role": classify(sc, merged), "source": src, **sc})
    return HeadRoles(rows, local_window, merged)


# ------------------------------------------------------------------------- section roles
SECTION_ROLE_DESCRIPTIONS: dict[str, str] = {
    "within-section": "keeps its attention inside the reader's own section (clause, message, article, domain)",
    "cross-section": "reaches across the document: much of its attention goes two or more sections away",
    "neighbour-section": "reads its own section and the ones beside it, little further",
}
"""Each section role (`section_roles`) in one sentence."""

# A head's section role: the first rule that holds, in this order.
SECTION_THRESHOLDS: dict[str, float] = {
    "cross_section": 0.4,  # far >= 0.4: share of attention two or more sections away
    "within_section": 0.7,  # within >= 0.7: share of attention inside the query's own section
}


def section_roles(content: Tensor, sizes: Tensor | None = None, thresholds: dict[str, float] | None = None) -> list:
    """The section-level view of every head: does it stay within its section or reach across sections?

    Args:
        content: ``(N, H, S, S)`` section flow: ``content[n, h, a, b]`` is the mean attention a token of
            section ``a`` pays to section ``b`` (`attnkit.AttentionStats.segment_flow` over the sections;
            `attnkit show` leaves special tokens out, so a sink head is not mistaken for a reader of
            section 0).
        sizes: ``(S,)`` tokens (queries) per section, to weight each section's row (default: equal).
        thresholds: overrides of `SECTION_THRESHOLDS`.

    Returns:
        one dict per head, layer-major: ``layer`` (int), ``head``, ``section_role``, ``within`` (share
        of its attention inside the query's own section, the flow's diagonal), ``neighbour`` (one
        section away), ``far`` (two or more away), each a share of the head's attention that lands on
        the sections, the rows weighted by ``sizes``. Rules: ``cross-section`` if ``far >=
        cross_section``, else ``within-section`` if ``within >= within_section``, else ``neighbour-section``.
    """
    t = {**SECTION_THRESHOLDS, **(thresholds or {})}
    flow = content.double()
    N, H, S, _ = flow.shape
    w = torch.ones(S, dtype=torch.float64) if sizes is None else sizes.double().reshape(S)
    gap = (torch.arange(S)[:, None] - torch.arange(S)[None, :]).abs()  # (S, S)
    rows = []
    for n in range(N):
        for h in range(H):
            f = flow[n, h]  # (S, S)
            mass = (f.sum(-1) * w).sum().clamp(min=1e-12)  # attention landing on any section, rows weighted
            within = float((f.diagonal() * w).sum() / mass)
            neighbour = float(((f * (gap == 1)).sum(-1) * w).sum() / mass)
            far = float(((f * (gap >= 2)).sum(-1) * w).sum() / mass)
            if S > 2 and far >= t["cross_section"]:
                role = "cross-section"
            elif within >= t["within_section"]:
                role = "within-section"
            else:
                role = "neighbour-section"
            rows.append({"layer": n, "head": h, "section_role": role, "within": within, "neighbour": neighbour,
                         "far": far})  # fmt: skip
    return rows
