"""Training batches for the three kinds of model, all drawn from a `TrainData` with a given generator.

- pairs (BPR):  users, positive items, one uniformly sampled negative per positive that the user has
                not interacted with (rejection sampling, vectorised).
- labelled (BCE): users, items, labels; optionally `negatives` sampled items labelled 0 per row.
- windows (sequential): fixed-length, left-padded windows over each sequence: inputs [W, L], next-item
  targets [W, L], target labels [W, L], a mask of the positions that are training targets, users [W].
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from recalign.cf.base import TrainData


def sample_negatives(data: TrainData, users: np.ndarray, rng: np.random.Generator, tries: int = 20) -> np.ndarray:
    """One item per user, uniform over the items the user has no interaction with in `data.matrix`."""
    keys = pair_keys(data)
    negatives = rng.integers(0, data.n_items, size=len(users))
    todo = np.arange(len(users))
    for _ in range(tries):
        clash = has_pair(keys, users[todo] * data.n_items + negatives[todo])
        todo = todo[clash]
        if not len(todo):
            break
        negatives[todo] = rng.integers(0, data.n_items, size=len(todo))
    return negatives


def pair_keys(data: TrainData) -> np.ndarray:
    """Sorted user * n_items + item keys of the positive pairs (cached on the TrainData)."""
    keys = getattr(data, "_pair_keys", None)
    if keys is None:
        matrix = data.matrix.tocsr()
        matrix.sort_indices()
        rows = np.repeat(np.arange(data.n_users, dtype=np.int64), np.diff(matrix.indptr))
        keys = rows * data.n_items + matrix.indices.astype(np.int64)
        data._pair_keys = keys
    return keys


def has_pair(keys: np.ndarray, query: np.ndarray) -> np.ndarray:
    j = np.searchsorted(keys, query)
    j = np.minimum(j, len(keys) - 1)
    return keys[j] == query if len(keys) else np.zeros(len(query), bool)


def pair_batches(data: TrainData, batch_size: int, rng: np.random.Generator) -> Iterator[dict]:
    order = rng.permutation(data.n_pairs)
    negatives = sample_negatives(data, data.users[order], rng)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        yield {"users": torch.from_numpy(data.users[rows]), "items": torch.from_numpy(data.items[rows]),
               "negatives": torch.from_numpy(negatives[start:start + batch_size])}


def labelled_batches(data: TrainData, batch_size: int, rng: np.random.Generator, negatives: int = 0) -> Iterator[dict]:
    users, items, labels = data.users, data.items, data.labels
    if negatives:
        extra_users = np.repeat(users, negatives)
        users = np.concatenate([users, extra_users])
        items = np.concatenate([items, sample_negatives(data, extra_users, rng)])
        labels = np.concatenate([labels, np.zeros(len(extra_users), bool)])
    order = rng.permutation(len(users))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        yield {"users": torch.from_numpy(users[rows]), "items": torch.from_numpy(items[rows]),
               "labels": torch.from_numpy(labels[rows])}


def build_windows(data: TrainData, max_len: int, stride: int) -> dict[str, np.ndarray]:
    """Windows of `max_len` inputs ending before target position e, for e = n-1, n-1-stride, ...

    Each window supervises the targets in (e - stride, e] that are at or after the sequence's
    `target_from`, so every target is trained exactly once per epoch, with at least max_len - stride
    items of context where the sequence has them. stride=1 gives one window per target (Caser);
    stride=max_len//2 is the cheap all-positions training of causal models (SASRec, GRU4Rec)."""
    # no wider than the longest sequence needs (sample sets have short histories)
    max_len = max(1, min(max_len, max((len(seq) - 1 for seq in data.seq_items), default=1)))
    stride = max(1, min(stride, max_len))
    rows_in, rows_tg, rows_lab, rows_mask, rows_user = [], [], [], [], []
    pad = data.n_items
    for seq, lab, user, first in zip(data.seq_items, data.seq_labels, data.seq_users, data.seq_target_from):
        n = len(seq)
        first = max(int(first), 1)
        if n <= first:
            continue
        padded = np.concatenate([np.full(max_len, pad, np.int64), seq])
        padded_lab = np.concatenate([np.zeros(max_len, bool), lab])
        end = n - 1
        while end >= first:
            # the earliest window takes every target left (they all fit in it)
            lo = first if end - max_len + 1 <= first else max(end - stride + 1, first)
            # window inputs are sequence positions end-max_len .. end-1, targets end-max_len+1 .. end;
            # sequence position p sits at padded[p + max_len]
            s = end
            rows_in.append(padded[s:s + max_len])
            rows_tg.append(padded[s + 1:s + max_len + 1])
            rows_lab.append(padded_lab[s + 1:s + max_len + 1])
            target_pos = np.arange(end - max_len + 1, end + 1)
            rows_mask.append((target_pos >= lo) & (target_pos <= end))
            rows_user.append(user)
            end = lo - 1
    if not rows_in:
        empty = np.zeros((0, max_len), np.int64)
        return {"inputs": empty, "targets": empty, "labels": empty.astype(bool), "mask": empty.astype(bool),
                "users": np.zeros(0, np.int64)}
    return {"inputs": np.stack(rows_in), "targets": np.stack(rows_tg), "labels": np.stack(rows_lab),
            "mask": np.stack(rows_mask), "users": np.asarray(rows_user, np.int64)}


def window_batches(windows: dict[str, np.ndarray], batch_size: int, rng: np.random.Generator) -> Iterator[dict]:
    """Shuffled windows grouped so that each batch holds about `batch_size` training targets (the batch
    size means the same for every model: positives per optimiser step)."""
    order = rng.permutation(len(windows["users"]))
    for rows in _split_by_targets(order, windows["mask"].sum(1), batch_size):
        yield {k: torch.from_numpy(v[rows]) for k, v in windows.items()}


def n_window_batches(windows: dict[str, np.ndarray], batch_size: int) -> int:
    return max(1, -(-int(windows["mask"].sum()) // batch_size)) if len(windows["users"]) else 0


def _split_by_targets(order: np.ndarray, targets_per_window: np.ndarray, batch_size: int) -> list[np.ndarray]:
    if not len(order):
        return []
    cumulative = np.cumsum(targets_per_window[order])
    cuts = np.searchsorted(cumulative, np.arange(batch_size, cumulative[-1], batch_size), side="left") + 1
    return [part for part in np.split(order, np.unique(cuts)) if len(part)]
