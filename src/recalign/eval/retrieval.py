"""Lexical retrieval over item texts (GPT4Rec's search engine) and the merge of several queries' results.

- `BM25Index(texts, k1, b, method, stopwords)`: Okapi BM25 over one text per item through the `bm25s` package
  (sparse matrices; its tokenizer: lower case, words of two or more word characters, English stop words
  dropped by default, no stemming). `scores(query)` is every item's BM25 score for one query (zeros for a
  query with no indexed word); `search(query, k, exclude)` the top-k items with a positive score, best
  first, ties by item index, `exclude` never returned.
- Merging m ranked result lists (one per generated query, best query first) into one list of K items:
  `merge_split` is GPT4Rec's: the top K/m items of each query in query order (the first K mod m queries take
  one more), an item already taken skipped for that query's next one; slots a query cannot fill (its list
  ran out) go to the following queries, one item per query per round. `merge_round_robin` interleaves the
  lists rank by rank (the first item of every query, then the second...). Both depend on K, so a method
  evaluates each K with its own list (`merged_ranks`).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from recalign.errors import InputError

MERGES = ("split", "round_robin")


class BM25Index:
    def __init__(self, texts: Sequence[str], k1: float = 1.2, b: float = 0.75, method: str = "lucene",
                 stopwords: str | None = "en"):
        import bm25s

        if not texts:
            raise InputError("BM25 index: no item texts to index")
        if k1 < 0 or not 0 <= b <= 1:
            raise InputError(f"BM25 index: need k1 >= 0 and 0 <= b <= 1, got k1={k1}, b={b}")
        self.n_items = len(texts)
        self.stopwords = stopwords or None
        self._bm25s = bm25s
        self.model = bm25s.BM25(k1=float(k1), b=float(b), method=method)
        tokens = self.tokenize(list(texts))
        if not any(tokens):
            raise InputError("BM25 index: no item text holds a word to index (empty texts, or stop words only); "
                             "check retrieval.item_text and the item titles")
        self.model.index(tokens, show_progress=False)

    def tokenize(self, texts: list[str]) -> list[list[str]]:
        return self._bm25s.tokenize(texts, stopwords=self.stopwords, return_ids=False, show_progress=False)

    def scores(self, query: str) -> np.ndarray:
        """float32 [n_items]: each item's BM25 score for `query`."""
        words = self.tokenize([query])[0]
        if not words:
            return np.zeros(self.n_items, dtype=np.float32)
        return np.asarray(self.model.get_scores(words), dtype=np.float32)

    def search(self, query: str, k: int, exclude: Iterable[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """(items, scores) of the top-k items with a positive score, best first (ties: lower index first)."""
        scores = self.scores(query)
        excluded = np.fromiter(exclude, dtype=np.int64)
        if excluded.size:
            scores = scores.copy()
            scores[excluded] = 0.0
        hits = np.flatnonzero(scores > 0)
        order = hits[np.lexsort((hits, -scores[hits]))][:k]
        return order, scores[order]


def merge_split(ranked: Sequence[Sequence[int]], k: int) -> list[int]:
    """GPT4Rec's merge of m ranked lists into K items (see the module doc)."""
    m = len(ranked)
    if k < 1 or m == 0:
        return []
    out: list[int] = []
    taken: set[int] = set()
    pointers = [0] * m

    def take(i: int) -> bool:
        lst = ranked[i]
        while pointers[i] < len(lst):
            item = int(lst[pointers[i]])
            pointers[i] += 1
            if item not in taken:
                taken.add(item)
                out.append(item)
                return True
        return False

    for i in range(m):
        quota = k // m + (1 if i < k % m else 0)
        for _ in range(quota):
            if len(out) >= k or not take(i):
                break
    while len(out) < k:  # redistribute what exhausted lists could not fill
        progressed = False
        for i in range(m):
            if len(out) >= k:
                break
            progressed = take(i) or progressed
        if not progressed:
            break
    return out


def merge_round_robin(ranked: Sequence[Sequence[int]], k: int) -> list[int]:
    """The first item of every list (in list order), then the second..., each item once, K at most."""
    out: list[int] = []
    taken: set[int] = set()
    depth = max((len(lst) for lst in ranked), default=0)
    for r in range(depth):
        for lst in ranked:
            if r < len(lst) and int(lst[r]) not in taken and len(out) < k:
                taken.add(int(lst[r]))
                out.append(int(lst[r]))
    return out


def merge(ranked: Sequence[Sequence[int]], k: int, how: str = "split") -> list[int]:
    if how == "split":
        return merge_split(ranked, k)
    if how == "round_robin":
        return merge_round_robin(ranked, k)
    raise InputError(f"merge: expected one of {', '.join(MERGES)}, got {how!r}")


def merged_ranks(ranked: Sequence[Sequence[Sequence[int]]], targets: Sequence[int], ks: Sequence[int],
                 how: str = "split") -> dict[int, np.ndarray]:
    """Per K, each case's 0-based position of its target in the merged K-list (inf when absent): what
    `eval.metrics.ranking_metrics(ranks, [K])` takes. `ranked[c]` are case c's per-query lists."""
    out = {}
    for k in ks:
        ranks = np.full(len(targets), np.inf)
        for c, (lists, target) in enumerate(zip(ranked, targets)):
            merged = merge(lists, int(k), how)
            if int(target) in merged:
                ranks[c] = merged.index(int(target))
        out[int(k)] = ranks
    return out
