"""A suffix array over token-id documents that answers the queries of an FM-index (TransRec's identifier corpus).

`TokenIndex.build(docs, end)` writes every document followed by the `end` token (the LM's end-of-sequence id)
into one int32 text and sorts all its suffixes with libdivsufsort (`pydivsufsort`: integer tokens are sorted
as fixed-width big-endian bytes, which keeps the token order). Queries, all on token ids:

- `range(pattern)` -> [lo, hi): the suffix-array rows that start with `pattern` (binary search per token,
  O(m log N); the first token's rows follow from the token counts)
- `count(pattern)`: occurrences anywhere in the corpus (any position of any document: position-free)
- `next_tokens(pattern)` -> (distinct tokens that follow `pattern` somewhere, their counts), sorted by id;
  the end token among them means "a document ends here"; nothing follows the end token. Listing them costs
  one gather over the pattern's rows, so the wide patterns are done at build time: the empty pattern, every
  one-token pattern, and every longer pattern that occurs more than `wide_rows` times (level by level,
  vectorised). Any other pattern has at most `wide_rows` rows: a query is a binary search (extending the
  beam's cached prefix by one token) plus at most `wide_rows` reads.
- `occurrences(pattern)` -> corpus positions; `docs(pattern)` -> document ids (with repeats per occurrence);
  `doc_of(positions)`; `doc(i)` -> the tokens of document i.

An n-gram never spans two documents: documents are separated by `end`, and patterns never contain it.
`cached_index(docs, end, directory)` builds once per token content and keeps the index as a safetensors
state (`recalign.io`), so a catalogue is indexed once per (tokenizer, catalogue). `estimate_bytes` /
`check_memory` refuse a corpus whose build would not fit in the available memory, naming the estimate.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np

from recalign.errors import InputError

FORMAT = "recalign-token-index/2"
# patterns with more rows than this get their next tokens precomputed at build time
WIDE_ROWS = 4096
# rows gathered at once while precomputing (bounds the build's extra memory)
GATHER_CHUNK = 1 << 23


def estimate_bytes(n_tokens: int, max_token: int) -> int:
    """Peak memory of a build: the uint16/uint32 byte text and libdivsufsort's byte-level suffix array (int32,
    or int64 past 2^31 bytes), the filtered token suffix array, the int32 text, first column and bigram tables."""
    width = 2 if max_token < (1 << 16) else 4
    n_bytes = n_tokens * width
    sa_width = 4 if n_bytes <= np.iinfo(np.int32).max else 8
    return n_bytes + n_bytes * sa_width + n_tokens * (sa_width + 4 + 4 + 4 + 8 + 1)


def available_bytes() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(n_tokens: int, max_token: int, available: int | None = None) -> None:
    need = estimate_bytes(n_tokens, max_token)
    available = available_bytes() if available is None else available
    if available is not None and need > available:
        raise InputError(f"token index: {n_tokens:,} corpus tokens need about {need / 2**30:.1f} GiB to index, "
                         f"only {available / 2**30:.1f} GiB of memory is available; use a smaller catalogue "
                         f"or fewer facets")


class TokenIndex:
    def __init__(self, text: np.ndarray, sa: np.ndarray, starts: np.ndarray, end: int,
                 uni_tokens: np.ndarray, uni_counts: np.ndarray, bi_offsets: np.ndarray, bi_tokens: np.ndarray,
                 bi_counts: np.ndarray, wide: dict | None = None, wide_rows: int = WIDE_ROWS,
                 cache_size: int = 200_000):
        self.text = text  # int32 [N + 1]: documents, each followed by `end`, then a -1 sentinel
        self.sa = sa  # [N] suffix array of text[:N]
        self.starts = starts  # int64 [n_docs + 1]: first position of each document, then N
        self.end = int(end)
        self.uni_tokens, self.uni_counts = uni_tokens, uni_counts
        self.uni_lo = np.concatenate([[0], np.cumsum(uni_counts)[:-1]]).astype(np.int64)
        # next tokens after each one-token pattern: uni_tokens[i] -> bi_tokens[bi_offsets[i]:bi_offsets[i+1]]
        self.bi_offsets, self.bi_tokens, self.bi_counts = bi_offsets, bi_tokens, bi_counts
        # longer patterns with more than wide_rows rows -> (next tokens, counts)
        self.wide: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = wide if wide is not None else {}
        self.wide_rows = int(wide_rows)
        self._cache: OrderedDict[tuple, tuple[int, int, np.ndarray, np.ndarray]] = OrderedDict()
        self._cache_size = cache_size

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, docs: Sequence[Sequence[int]], end: int, check: bool = True,
              wide_rows: int = WIDE_ROWS) -> "TokenIndex":
        from pydivsufsort import divsufsort

        if not len(docs):
            raise InputError("token index: no documents to index")
        lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
        empty = np.flatnonzero(lengths == 0)
        if len(empty):
            raise InputError(f"token index: document {int(empty[0])} has no tokens")
        n = int(lengths.sum() + len(docs))
        flat = np.concatenate([np.asarray(d, dtype=np.int64) for d in docs])
        if flat.min() < 0 or flat.max() >= np.iinfo(np.int32).max:
            raise InputError(f"token index: token ids must be in [0, 2^31 - 1), got {int(flat.min())}.."
                             f"{int(flat.max())}")
        inside = np.flatnonzero(flat == end)
        if len(inside):
            doc = int(np.searchsorted(np.cumsum(lengths), inside[0], side="right"))
            raise InputError(f"token index: document {doc} contains the end token {end} (its text holds the "
                             f"tokenizer's end-of-sequence marker)")
        if check:
            check_memory(n, max(int(flat.max()), int(end)))
        starts = np.zeros(len(docs) + 1, dtype=np.int64)
        starts[1:] = np.cumsum(lengths + 1)
        text = np.empty(n + 1, dtype=np.int32)
        text[-1] = -1
        body = np.ones(n, dtype=bool)
        body[starts[1:] - 1] = False
        text[:n][body] = flat
        text[starts[1:] - 1] = end
        del flat, body
        sa = divsufsort(text[:n]).astype(np.int32 if n < np.iinfo(np.int32).max else np.int64, copy=False)
        tables = _unigrams_bigrams(text, sa, end)
        wide = _wide_patterns(text, sa, end, *tables, wide_rows=wide_rows)
        return cls(text, sa, starts, end, *tables, wide=wide, wide_rows=wide_rows)

    # ------------------------------------------------------------------ persistence
    def state(self) -> dict:
        patterns = list(self.wide)
        lengths = np.asarray([len(p) for p in patterns], dtype=np.int64)
        flat = np.asarray([t for p in patterns for t in p], dtype=np.int64)
        sizes = np.asarray([len(self.wide[p][0]) for p in patterns], dtype=np.int64)
        joined = [np.concatenate([self.wide[p][i] for p in patterns]) if patterns else _EMPTY for i in (0, 1)]
        return {"format": FORMAT, "text": self.text, "sa": self.sa, "starts": self.starts, "end": self.end,
                "uni_tokens": self.uni_tokens, "uni_counts": self.uni_counts, "bi_offsets": self.bi_offsets,
                "bi_tokens": self.bi_tokens, "bi_counts": self.bi_counts, "wide_rows": self.wide_rows,
                "wide_lengths": lengths, "wide_patterns": flat, "wide_sizes": sizes, "wide_tokens": joined[0],
                "wide_counts": joined[1]}

    @classmethod
    def from_state(cls, state: dict) -> "TokenIndex":
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise InputError(f"token index: not a {FORMAT} state")
        keys = ("text", "sa", "starts", "end", "uni_tokens", "uni_counts", "bi_offsets", "bi_tokens", "bi_counts")
        pattern_ends = np.cumsum(state["wide_lengths"])
        next_ends = np.cumsum(state["wide_sizes"])
        flat, tokens, counts = state["wide_patterns"].tolist(), state["wide_tokens"], state["wide_counts"]
        wide = {tuple(flat[pe - n:pe]): (tokens[ne - m:ne], counts[ne - m:ne])
                for pe, n, ne, m in zip(pattern_ends.tolist(), state["wide_lengths"].tolist(), next_ends.tolist(),
                                        state["wide_sizes"].tolist())}
        return cls(*(state[k] for k in keys), wide=wide, wide_rows=int(state["wide_rows"]))

    # ------------------------------------------------------------------ sizes
    @property
    def n_docs(self) -> int:
        return len(self.starts) - 1

    @property
    def n_tokens(self) -> int:
        """Corpus length: every document token plus one end token per document."""
        return len(self.sa)

    def doc(self, i: int) -> np.ndarray:
        return self.text[self.starts[i]:self.starts[i + 1] - 1]

    # ------------------------------------------------------------------ queries
    def range(self, pattern: Sequence[int]) -> tuple[int, int]:
        pattern = [int(t) for t in pattern]
        if not pattern:
            return 0, len(self.sa)
        if self.end in pattern[:-1]:  # nothing follows a document's end
            return 0, 0
        i = int(np.searchsorted(self.uni_tokens, pattern[0]))  # the first token's rows, from its count
        if i == len(self.uni_tokens) or self.uni_tokens[i] != pattern[0]:
            return 0, 0
        lo = int(self.uni_lo[i])
        hi = lo + int(self.uni_counts[i])
        for k in range(1, len(pattern)):
            if lo >= hi:
                break
            lo, hi = self._narrow(lo, hi, k, pattern[k])
        return lo, hi

    def _narrow(self, lo: int, hi: int, k: int, token: int) -> tuple[int, int]:
        """Rows of [lo, hi) (which share their first k tokens) whose token k is `token`. Within the range,
        token k is sorted (a suffix that ends there reads as the sentinel -1, which sorts first)."""
        text, sa = self.text, self.sa
        a, b = lo, hi
        while a < b:
            mid = (a + b) >> 1
            if text[sa[mid] + k] < token:
                a = mid + 1
            else:
                b = mid
        start, b = a, hi
        while a < b:
            mid = (a + b) >> 1
            if text[sa[mid] + k] <= token:
                a = mid + 1
            else:
                b = mid
        return start, a

    def count(self, pattern: Sequence[int]) -> int:
        lo, hi = self.range(pattern)
        return hi - lo

    def occurrences(self, pattern: Sequence[int]) -> np.ndarray:
        """Start positions of `pattern` in the corpus text (unsorted)."""
        lo, hi = self.range(pattern)
        return self.sa[lo:hi].astype(np.int64)

    def doc_of(self, positions: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.starts, positions, side="right") - 1

    def docs(self, pattern: Sequence[int]) -> np.ndarray:
        """Document id of every occurrence (a document that holds `pattern` twice is listed twice)."""
        return self.doc_of(self.occurrences(pattern))

    def next_tokens(self, pattern: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(distinct tokens that follow `pattern` anywhere in the corpus, their counts), ascending by token.
        Empty when `pattern` does not occur. The returned arrays are shared: do not modify them."""
        key = tuple(int(t) for t in pattern)
        if not key:
            return self.uni_tokens, self.uni_counts
        if self.end in key:
            return _EMPTY, _EMPTY
        if len(key) == 1:
            i = int(np.searchsorted(self.uni_tokens, key[0]))
            if i == len(self.uni_tokens) or self.uni_tokens[i] != key[0]:
                return _EMPTY, _EMPTY
            a, b = self.bi_offsets[i], self.bi_offsets[i + 1]
            return self.bi_tokens[a:b], self.bi_counts[a:b]
        wide = self.wide.get(key)
        if wide is not None:
            return wide
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit[2], hit[3]
        parent = self._cache.get(key[:-1])  # beams extend cached prefixes: one narrowing step
        if parent is not None and parent[1] - parent[0] <= self.wide_rows:
            lo, hi = self._narrow(parent[0], parent[1], len(key) - 1, key[-1]) if parent[1] > parent[0] else (0, 0)
        else:
            lo, hi = self.range(key)
        tokens, counts = self._distinct(lo, hi, len(key)) if hi > lo else (_EMPTY, _EMPTY)
        self._cache[key] = (lo, hi, tokens, counts)
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return tokens, counts

    def _distinct(self, lo: int, hi: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Distinct values (and run lengths) of the sorted column text[sa[lo:hi] + k] (at most `wide_rows`
        rows here: wider patterns are in the precomputed table)."""
        return _runs(self.text[self.sa[lo:hi].astype(np.int64) + k])


_EMPTY = np.zeros(0, dtype=np.int64)


def _runs(column: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values and run lengths of a sorted array, without the -1 sentinel (a suffix that ended)."""
    if not len(column):
        return _EMPTY, _EMPTY
    bounds = np.flatnonzero(column[1:] != column[:-1]) + 1
    first = np.concatenate([[0], bounds])
    counts = np.diff(np.concatenate([first, [len(column)]]))
    values = column[first].astype(np.int64)
    keep = values >= 0
    return values[keep], counts[keep].astype(np.int64)


def _unigrams_bigrams(text: np.ndarray, sa: np.ndarray, end: int):
    """Distinct tokens of the corpus with counts, and for each of them the distinct next tokens with counts
    (one pass over the first two columns of the suffix array)."""
    first = text[sa].astype(np.int64)
    second = text[sa.astype(np.int64) + 1].astype(np.int64)
    uni_tokens, uni_counts = _runs(first)
    change = np.flatnonzero((first[1:] != first[:-1]) | (second[1:] != second[:-1])) + 1
    pair_first = np.concatenate([[0], change])
    pair_counts = np.diff(np.concatenate([pair_first, [len(first)]]))
    pair_a, pair_b = first[pair_first], second[pair_first]
    keep = (pair_b >= 0) & (pair_a != end)  # nothing follows a document's end
    pair_a, pair_b, pair_counts = pair_a[keep], pair_b[keep], pair_counts[keep]
    offsets = np.searchsorted(pair_a, uni_tokens, side="left")
    offsets = np.concatenate([offsets, [len(pair_a)]]).astype(np.int64)
    return uni_tokens, uni_counts.astype(np.int64), offsets, pair_b.astype(np.int64), pair_counts.astype(np.int64)


def _wide_patterns(text: np.ndarray, sa: np.ndarray, end: int, uni_tokens, uni_counts, bi_offsets, bi_tokens,
                   bi_counts, wide_rows: int) -> dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]]:
    """Next tokens (with counts) of every pattern of two or more tokens that occurs more than `wide_rows`
    times. Level by level: a wide pattern's rows are one contiguous range of the suffix array, its children's
    ranges follow from the counts, and one vectorised gather per level lists every wide pattern's next column."""
    out: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = {}
    uni_lo = np.concatenate([[0], np.cumsum(uni_counts)[:-1]])
    frontier = []  # (pattern, lo, hi) of the current level
    for i, (token, lo) in enumerate(zip(uni_tokens.tolist(), uni_lo.tolist())):
        if token == end:
            continue
        a, b = int(bi_offsets[i]), int(bi_offsets[i + 1])
        child_lo = lo + np.concatenate([[0], np.cumsum(bi_counts[a:b])[:-1]])
        for nxt, c_lo, count in zip(bi_tokens[a:b].tolist(), child_lo.tolist(), bi_counts[a:b].tolist()):
            if count > wide_rows and nxt != end:
                frontier.append(((token, nxt), c_lo, c_lo + count))
    k = 2
    while frontier:
        next_frontier = []
        start = 0
        while start < len(frontier):  # chunks of at most GATHER_CHUNK rows
            stop, rows = start, 0
            while stop < len(frontier) and (stop == start or rows + frontier[stop][2] - frontier[stop][1] <= GATHER_CHUNK):
                rows += frontier[stop][2] - frontier[stop][1]
                stop += 1
            chunk = frontier[start:stop]
            lo = np.asarray([c[1] for c in chunk], dtype=np.int64)
            sizes = np.asarray([c[2] - c[1] for c in chunk], dtype=np.int64)
            offsets = np.concatenate([[0], np.cumsum(sizes)])
            rows_idx = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1] - lo, sizes)
            column = text[sa[rows_idx].astype(np.int64) + k]
            segment = np.repeat(np.arange(len(chunk)), sizes)
            first = np.flatnonzero(np.concatenate([[True], (column[1:] != column[:-1]) | (segment[1:] != segment[:-1])]))
            run_len = np.diff(np.concatenate([first, [len(column)]]))
            run_val, run_seg, run_row = column[first].astype(np.int64), segment[first], rows_idx[first]
            bounds = np.searchsorted(run_seg, np.arange(len(chunk) + 1))
            for j, (pattern, _, _) in enumerate(chunk):
                a, b = bounds[j], bounds[j + 1]
                out[pattern] = (run_val[a:b], run_len[a:b].astype(np.int64))
                for nxt, row, count in zip(run_val[a:b].tolist(), run_row[a:b].tolist(), run_len[a:b].tolist()):
                    if count > wide_rows and nxt != end:
                        next_frontier.append((pattern + (nxt,), row, row + count))
            start = stop
        frontier = next_frontier
        k += 1
    return out


def docs_hash(docs: Sequence[Sequence[int]], end: int, wide_rows: int = WIDE_ROWS) -> str:
    digest = hashlib.sha256(f"{FORMAT}\x00{end}\x00{wide_rows}\x00{len(docs)}".encode())
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    digest.update(lengths.tobytes())
    for start in range(0, len(docs), 65536):
        chunk = [np.asarray(d, dtype=np.int64) for d in docs[start:start + 65536]]
        if chunk:
            digest.update(np.concatenate(chunk).tobytes())
    return digest.hexdigest()[:32]


def cached_index(docs: Sequence[Sequence[int]], end: int, directory: str | Path,
                 wide_rows: int = WIDE_ROWS) -> tuple[TokenIndex, bool]:
    """(the index of `docs`, True when it was read from DIR/<hash of the tokens>.safetensors). A missing or
    unreadable entry is rebuilt and written atomically."""
    from recalign.io import load_state, save_state

    path = Path(directory) / f"{docs_hash(docs, end, wide_rows)}.safetensors"
    if path.exists():
        try:
            index = TokenIndex.from_state(load_state(path))
            if index.n_docs == len(docs) and index.end == end and index.wide_rows == wide_rows:
                return index, True
        except (InputError, KeyError, TypeError, ValueError):
            pass
    index = TokenIndex.build(docs, end, wide_rows=wide_rows)
    save_state(path, index.state())
    return index, False
