"""TransRec's aggregated grounding: generated n-grams ("keys") score the items whose documents contain them.

A key is a token sequence that occurs in the identifier corpus (`eval.token_index`), generated from one facet
with log-probability log p(n|q) (the sum over its generated tokens). As in the TransRec / SEAL reference:

    s(n)    = min(log p(n|q) + bias[facet], max_log_prob)        facet bias; the cap keeps p < 1
    P_c(n)  = (count(n) + smoothing) / (N + smoothing)           smoothed corpus frequency, N corpus tokens
    w(n)    = max(0, [s + log(1 - P_c)] - [log P_c + log(1 - e^s)]) ** gamma

An item's score is the sum over the keys found in its document, taken in decreasing w: a key counts once per
document, only where one of its occurrences does not overlap an occurrence already taken by a higher-scored
key, and times the coverage factor  1 - beta + beta * |token types of n not yet covered| / |token types of n|
(coverage per document, over the keys already counted there). Items no key reaches score 0.

Not reproduced from the reference: its unigram scores (every token of the first step's distribution as an
extra key), the x100 on attribute keys' corpus frequency, and the two-stage scoring that fully scores only the
top documents (here every document a key reaches is scored exactly).

`evidence(keys, index)` does the index work once per case (counts, occurrence positions);
`item_scores(evidence, params)` is the cheap part, repeated per parameter setting (grids on valid).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from recalign.errors import InputError
from recalign.eval.token_index import TokenIndex


@dataclass(frozen=True)
class Key:
    tokens: tuple[int, ...]
    log_prob: float  # log p(n | q): sum of the generated tokens' log-probabilities
    facet: str


@dataclass
class GroundingParams:
    gamma: float = 2.0
    biases: Mapping[str, float] = field(default_factory=dict)  # facet -> bias on log p(n|q)
    smoothing: float = 5.0
    coverage: float = 0.8  # beta of the coverage factor (the reference's repetition_penalty)
    max_log_prob: float = -1.0

    def __post_init__(self):
        if self.gamma <= 0:
            raise InputError(f"grounding.gamma must be > 0, got {self.gamma}")
        if self.smoothing <= 0:
            raise InputError(f"grounding.smoothing must be > 0, got {self.smoothing}")
        if not 0 <= self.coverage <= 1:
            raise InputError(f"grounding.coverage must be in [0, 1], got {self.coverage}")
        if not self.max_log_prob < 0:
            raise InputError(f"grounding.max_log_prob must be < 0 (a probability below 1), got {self.max_log_prob}")


@dataclass
class Evidence:
    """The index lookups of one case's keys (deduplicated by tokens: the most probable generation kept)."""

    keys: list[Key]
    counts: np.ndarray  # [K] occurrences in the corpus
    positions: list[np.ndarray]  # per key: corpus start positions
    n_tokens: int
    n_docs: int
    index: TokenIndex

    def subset(self, facets: Sequence[str]) -> "Evidence":
        rows = [i for i, k in enumerate(self.keys) if k.facet in facets]
        return Evidence([self.keys[i] for i in rows], self.counts[rows], [self.positions[i] for i in rows],
                        self.n_tokens, self.n_docs, self.index)


def evidence(keys: Sequence[Key], index: TokenIndex) -> Evidence:
    best: dict[tuple[int, ...], Key] = {}
    for key in keys:
        if not key.tokens:
            continue
        kept = best.get(key.tokens)
        if kept is None or key.log_prob > kept.log_prob:
            best[key.tokens] = key
    chosen = sorted(best.values(), key=lambda k: k.tokens)  # a fixed order, whatever the beams' order
    positions = [index.occurrences(k.tokens) for k in chosen]
    counts = np.asarray([len(p) for p in positions], dtype=np.int64)
    return Evidence(chosen, counts, positions, index.n_tokens, index.n_docs, index)


def key_weights(log_probs: np.ndarray, counts: np.ndarray, facets: Sequence[str], n_tokens: int,
                params: GroundingParams) -> np.ndarray:
    """w(n) for every key (0 for keys that do not occur)."""
    log_probs = np.asarray(log_probs, dtype=np.float64)
    bias = np.asarray([float(params.biases.get(f, 0.0)) for f in facets], dtype=np.float64)
    s = np.minimum(log_probs + bias, params.max_log_prob)
    counts = np.asarray(counts, dtype=np.float64)
    p_corpus = (counts + params.smoothing) / (n_tokens + params.smoothing)
    with np.errstate(divide="ignore", invalid="ignore"):
        odds = (s + np.log1p(-p_corpus)) - (np.log(p_corpus) + np.log1p(-np.exp(s)))
    odds = np.where(np.isfinite(odds) & (counts > 0), odds, 0.0)
    return np.maximum(odds, 0.0) ** params.gamma


def item_scores(ev: Evidence, params: GroundingParams) -> np.ndarray:
    """float64 [n_docs]: the aggregated score of every document (item)."""
    scores = np.zeros(ev.n_docs, dtype=np.float64)
    if not ev.keys:
        return scores
    weights = key_weights([k.log_prob for k in ev.keys], ev.counts, [k.facet for k in ev.keys], ev.n_tokens,
                          params)
    order = sorted((i for i in range(len(ev.keys)) if weights[i] > 0), key=lambda i: (-weights[i], ev.keys[i].tokens))
    used = np.zeros(len(ev.index.text), dtype=bool)  # corpus positions taken by higher-scored keys
    covered: dict[int, np.ndarray] = {}  # token type -> per document: covered by a counted key
    beta = params.coverage
    for i in order:
        tokens = np.asarray(ev.keys[i].tokens, dtype=np.int64)
        span = ev.positions[i][:, None] + np.arange(len(tokens))
        free = ~used[span].any(1)
        if not free.any():
            continue
        used[span[free]] = True
        docs = np.unique(ev.index.doc_of(ev.positions[i][free]))
        types = np.unique(tokens)
        new = np.zeros(len(docs))
        for t in types.tolist():
            seen = covered.get(t)
            if seen is None:
                seen = covered[t] = np.zeros(ev.n_docs, dtype=bool)
            new += ~seen[docs]
            seen[docs] = True
        scores[docs] += weights[i] * (1.0 - beta + beta * new / len(types))
    return scores
