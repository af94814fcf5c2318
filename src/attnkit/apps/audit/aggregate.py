"""From measured documents to shares: per document, per category, per layer and head, over the corpus.

Definitions (``D`` documents, ``N`` layers, ``H`` heads, ``C`` categories; a document of ``L`` tokens):

* token share of category ``c`` in a document: ``T[c] = |{j : cat(j) = c}| / L``;
* attention share in layer ``l``, head ``h``: ``A[l, h, c] = sum_{j : cat(j) = c} received[l, h, j] / L``,
  where ``received[l, h, j] = sum_i p_ij``. Every query row sums to 1, so ``sum_c A[l, h, c] = 1``
  and ``sum_c T[c] = 1``: the shares are those of the attention the document's tokens pay out;
  a layer's share is the mean over its heads (each head counts the same);
* ratio ``A / T``: how much more (> 1) or less (< 1) attention a category draws than its size;
* corpus figures are means over documents (each document counts the same, whatever its length),
  with a percentile bootstrap confidence interval over documents (Efron and Tibshirani, *An
  Introduction to the Bootstrap*, 1993, ch. 13): resample the documents with replacement,
  recompute the mean, take the 2.5th and 97.5th percentiles of ``draws`` resamples (seeded).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Corpus", "DocResult", "bootstrap_mean", "doc_result", "focus_off"]


@dataclass
class DocResult:
    """What the audit keeps of one document (one line of the results file).

    Attributes:
        id: the document's id.
        tokens: ``L``, tokens read (special tokens of every window included).
        windows: windows it was read in.
        counts: ``{category: tokens}``.
        received: ``{category: (N, H) nested lists}``: attention received, summed over the category's tokens.
        sections: ``{section kind: {"tokens": n, "received": (N,) per layer, summed over tokens, mean over heads}}``.
        seconds: time taken.
    """

    id: str
    tokens: int
    windows: int
    counts: dict[str, int]
    received: dict[str, list[list[float]]]
    sections: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "status": "ok",
            "tokens": self.tokens,
            "windows": self.windows,
            "counts": self.counts,
            "received": self.received,
            "sections": self.sections,
            "seconds": round(self.seconds, 4),
        }

    @classmethod
    def from_json(cls, row: dict) -> DocResult:
        return cls(
            row["id"],
            int(row["tokens"]),
            int(row["windows"]),
            dict(row["counts"]),
            dict(row["received"]),
            dict(row.get("sections", {})),
            float(row.get("seconds", 0.0)),
        )

    def token_share(self, categories: tuple[str, ...]) -> np.ndarray:
        """``(C,)``: the share of the document's tokens in each category."""
        return np.array([self.counts.get(c, 0) for c in categories], dtype=np.float64) / self.tokens

    def attention_share(self, categories: tuple[str, ...], shape: tuple[int, int]) -> np.ndarray:
        """``(N, H, C)``: the share of the attention received that goes to each category, per layer and head."""
        zero = np.zeros(shape)
        per = [np.asarray(self.received[c], dtype=np.float64) if c in self.received else zero for c in categories]
        return np.stack(per, axis=-1) / self.tokens  # (N, H, C)


def doc_result(doc_id: str, measured, categories: tuple[str, ...], seconds: float = 0.0) -> DocResult:
    """`DocResult` from an `attnkit.apps.audit.measure.Measured` (its ``received (N, H, L)``, ``categories (L,)``)."""
    received, cats = measured.received, measured.categories
    C, L = len(categories), received.shape[-1]
    onehot = np.zeros((L, C))  # (L, C)
    onehot[np.arange(L), cats] = 1.0
    per = received @ onehot  # (N, H, C)
    counts = np.bincount(cats, minlength=C)
    kept = [c for c in range(C) if counts[c]]
    sections: dict[str, dict] = {}
    kinds = np.array(measured.sections)
    head_mean = received.mean(1)  # (N, L)
    for kind in dict.fromkeys(measured.sections):
        where = kinds == kind
        sections[kind] = {
            "tokens": int(where.sum()),
            "received": [round(float(x), 6) for x in head_mean[:, where].sum(1)],
        }
    return DocResult(
        doc_id,
        L,
        measured.windows,
        {categories[c]: int(counts[c]) for c in kept},
        {categories[c]: np.round(per[:, :, c], 6).tolist() for c in kept},
        sections,
        seconds,
    )


def bootstrap_mean(values: np.ndarray, *, draws: int = 2000, seed: int = 0, level: float = 0.95):
    """``(mean, low, high)`` of ``values`` ``(D, ...)`` over its first axis, with a percentile bootstrap CI.

    Resamples the ``D`` rows with replacement ``draws`` times (``numpy.random.default_rng(seed)``),
    as multinomial counts so memory is ``draws x D``, not ``draws x D x ...``. ``D = 1``: the interval is
    the value itself.
    """
    values = np.asarray(values, dtype=np.float64)
    D = values.shape[0]
    mean = values.mean(0)
    if D < 2:
        return mean, mean.copy(), mean.copy()
    rng = np.random.default_rng(seed)
    flat = values.reshape(D, -1)  # (D, K)
    means = []
    for lo in range(0, draws, 256):
        counts = rng.multinomial(D, np.full(D, 1.0 / D), size=min(256, draws - lo))  # (n, D)
        means.append(counts @ flat / D)  # (n, K)
    stacked = np.concatenate(means)  # (draws, K)
    alpha = (1 - level) / 2
    low, high = np.quantile(stacked, [alpha, 1 - alpha], axis=0)
    return mean, low.reshape(mean.shape), high.reshape(mean.shape)


def focus_off(token_share: np.ndarray, attention_share: np.ndarray) -> np.ndarray:
    """``(D,)`` total variation distance ``1/2 sum_c |A_c - T_c|`` between attention and token shares.

    0: attention spreads over the categories exactly as the tokens do; 1: it all goes to categories
    that hold no token. ``token_share (D, C)``, ``attention_share (D, C)``.
    """
    return 0.5 * np.abs(attention_share - token_share).sum(-1)


class Corpus:
    """The documents of one run (variant) as arrays.

    Args:
        docs: the `DocResult` of every document measured.
        categories: ``(C,)`` names, in the tagger's order.
        shape: ``(N, H)`` layers and heads of the model.
        exclude_special: leave the special tokens out: shares among the other tokens, ``T[c] / (1 - T[special])``
            and ``A[l, h, c] / (1 - A[l, h, special])`` (they still sum to 1). [CLS]/[SEP] draw much of the
            attention of many heads as a no-op target (Clark et al., "What Does BERT Look At?", 2019), which
            lowers every other category's share alike.

    Attributes:
        ids: ``(D,)``; tokens ``(D, C)`` token shares ``T``; attention ``(D, N, H, C)`` shares ``A``.
    """

    def __init__(
        self, docs: list[DocResult], categories: tuple[str, ...], shape: tuple[int, int], *, exclude_special=False
    ):
        self.docs = docs
        self.shape = shape
        self.ids = [d.id for d in docs]
        C = len(categories)
        tokens = np.array([d.token_share(categories) for d in docs]).reshape(len(docs), C)  # (D, C)
        attention = np.array([d.attention_share(categories, shape) for d in docs]).reshape(len(docs), *shape, C)
        self.special = None  # (D, N) mean share of the special tokens per layer, when they are left out
        if exclude_special and "special" in categories:
            s = categories.index("special")
            self.special = attention[..., s].mean(2)  # (D, N)
            keep = [c for c in range(C) if c != s]
            tokens = tokens[:, keep] / (1 - tokens[:, s : s + 1])
            attention = attention[..., keep] / (1 - attention[..., s : s + 1])
            categories = tuple(categories[c] for c in keep)
        self.categories = categories
        self.tokens = tokens  # (D, C)
        self.attention = attention  # (D, N, H, C)

    def __len__(self) -> int:
        return len(self.docs)

    def combined(self, names: tuple[str, ...]) -> tuple[float, float]:
        """``(token share, attention share)`` of several categories together (means over documents, all layers)."""
        index = [self.categories.index(n) for n in names]
        return float(self.tokens[:, index].sum(1).mean()), float(self.overall()[:, index].sum(1).mean())

    def per_layer(self) -> np.ndarray:
        """``(D, N, C)``: attention shares per layer (mean over heads)."""
        return self.attention.mean(2)

    def overall(self) -> np.ndarray:
        """``(D, C)``: attention shares over all layers and heads (mean)."""
        return self.attention.mean((1, 2))

    def category_rows(self, *, draws: int = 2000, seed: int = 0) -> list[dict]:
        """The corpus table: per layer (and ``"all"``) and category, mean token and attention shares, CI, ratio."""
        rows = []
        token_mean = self.tokens.mean(0)  # (C,)
        present = (self.tokens > 0).sum(0)  # (C,) documents holding the category
        layers = [(str(n), self.per_layer()[:, n]) for n in range(self.shape[0])] + [("all", self.overall())]
        for layer, shares in layers:
            mean, low, high = bootstrap_mean(shares, draws=draws, seed=seed)
            for c, name in enumerate(self.categories):
                rows.append(
                    {
                        "layer": layer,
                        "category": name,
                        "documents": int(present[c]),
                        "token_share": float(token_mean[c]),
                        "attention_share": float(mean[c]),
                        "ci_low": float(low[c]),
                        "ci_high": float(high[c]),
                        "ratio": float(mean[c] / token_mean[c]) if token_mean[c] > 0 else None,
                    }
                )
        return rows

    def head_rows(self) -> list[dict]:
        """Per layer, head and category: the corpus mean attention share and its ratio to the token share."""
        mean = self.attention.mean(0)  # (N, H, C)
        token_mean = self.tokens.mean(0)
        rows = []
        N, H = self.shape
        for n in range(N):
            for h in range(H):
                for c, name in enumerate(self.categories):
                    t = float(token_mean[c])
                    rows.append(
                        {
                            "layer": n,
                            "head": h,
                            "category": name,
                            "token_share": t,
                            "attention_share": float(mean[n, h, c]),
                            "ratio": float(mean[n, h, c] / t) if t > 0 else None,
                        }
                    )
        return rows

    def top_heads(self, category: str, count: int = 3) -> list[tuple[int, int, float, float]]:
        """``[(layer, head, attention share, ratio)]``: the heads that give ``category`` most attention."""
        c = self.categories.index(category)
        mean = self.attention.mean(0)[:, :, c]  # (N, H)
        t = float(self.tokens.mean(0)[c])
        order = np.argsort(-mean, axis=None, kind="stable")[:count]
        out = []
        for flat in order.tolist():
            n, h = divmod(flat, self.shape[1])
            out.append((n, h, float(mean[n, h]), float(mean[n, h] / t) if t > 0 else float("inf")))
        return out

    def document_rows(self) -> list[dict]:
        """The per-document table: a row per document and category, the attention share per layer too."""
        rows = []
        layer = self.per_layer()  # (D, N, C)
        overall = self.overall()  # (D, C)
        for d, doc in enumerate(self.docs):
            for c, name in enumerate(self.categories):
                t, a = float(self.tokens[d, c]), float(overall[d, c])
                row = {
                    "document": doc.id,
                    "category": name,
                    "tokens": doc.counts.get(name, 0),
                    "token_share": t,
                    "attention_share": a,
                    "ratio": a / t if t > 0 else None,
                }
                row.update({f"attention_share_layer{n}": float(layer[d, n, c]) for n in range(self.shape[0])})
                rows.append(row)
        return rows

    def section_rows(self) -> list[dict]:
        """Per document and section kind: tokens, token share and attention share (mean over layers and heads).

        With ``exclude_special``, the shares are of the non-special tokens and of the attention a layer (its
        heads averaged) pays them.
        """
        rows = []
        for d, doc in enumerate(self.docs):
            specials, paid = 0, doc.tokens  # paid: the attention received by the tokens counted, per layer
            if self.special is not None:
                specials = doc.sections.get("special", {"tokens": 0})["tokens"]
                paid = doc.tokens * (1 - self.special[d])  # (N,)
            for kind, part in doc.sections.items():
                if self.special is not None and kind == "special":
                    continue
                rows.append({
                    "document": doc.id,
                    "section_kind": kind,
                    "tokens": part["tokens"],
                    "token_share": part["tokens"] / (doc.tokens - specials),
                    "attention_share": float(np.mean(np.asarray(part["received"]) / paid)),
                })  # fmt: skip
        return rows

    def section_summary(self) -> list[dict]:
        """Per section kind, over the documents that hold it: mean token and attention shares, ratio."""
        by_kind: dict[str, list[tuple[float, float]]] = {}
        for row in self.section_rows():
            by_kind.setdefault(row["section_kind"], []).append((row["token_share"], row["attention_share"]))
        out = []
        for kind, pairs in by_kind.items():
            t, a = np.mean([p[0] for p in pairs]), np.mean([p[1] for p in pairs])
            out.append(
                {
                    "section_kind": kind,
                    "documents": len(pairs),
                    "token_share": float(t),
                    "attention_share": float(a),
                    "ratio": float(a / t) if t > 0 else None,
                }
            )
        return sorted(out, key=lambda r: (-r["documents"], -r["token_share"]))

    def focus_off(self) -> np.ndarray:
        """``(D,)``: `focus_off` of each document over all layers."""
        return focus_off(self.tokens, self.overall())
