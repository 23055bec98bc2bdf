"""Splits and sample builders.

- `leave_one_out`: per user, last interaction by time = test, second to last = valid (CF protocol).
- `history_samples`: sliding windows; the sample at position i has the previous L interactions as history.
- `temporal_split`: samples split by their target's timestamp (global time), 80/10/10 by default.
- `few_shot`: N samples drawn with a seed.
- `mark_warm_cold`: warm = user and item both seen in the training data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from recalign.data.checks import Needs, check_dataset, describe, samples_problem
from recalign.data.dataset import Dataset
from recalign.errors import InputError


@dataclass
class Split:
    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame

    def sizes(self) -> dict:
        return {"train": len(self.train), "valid": len(self.valid), "test": len(self.test)}

    def require_parts(self, where: str) -> "Split":
        """The split itself, or an InputError naming `where` (the split setting) when a part is empty."""
        if self.train.empty or self.valid.empty or self.test.empty:
            raise InputError(f"{where}: gives an empty train, valid or test part ({self.sizes()})")
        return self


def leave_one_out(ds: Dataset, min_interactions: int = 3) -> Split:
    """Interactions are already sorted by (user, timestamp) with stable ties.

    Users with fewer than `min_interactions` interactions keep all of them in train; at least one user
    must have that many (else an InputError says so)."""
    check_dataset(ds, Needs(min_user_interactions=min_interactions))
    inter = ds.interactions
    counts = inter.groupby("user")["item"].transform("size").to_numpy()
    position_from_end = inter.groupby("user").cumcount(ascending=False).to_numpy()
    eligible = counts >= min_interactions
    test_mask = eligible & (position_from_end == 0)
    valid_mask = eligible & (position_from_end == 1)
    train = inter[~(test_mask | valid_mask)].reset_index(drop=True)
    return Split(train, inter[valid_mask].reset_index(drop=True), inter[test_mask].reset_index(drop=True))


def history_samples(
    ds: Dataset,
    history_len: int = 10,
    min_history: int | None = None,
    liked_history_only: bool = False,
) -> pd.DataFrame:
    """One sample per interaction that has at least `min_history` earlier interactions
    (default: `history_len`, i.e. targets from position L on, as TALLRec does).

    Columns: user, item, rating, label, timestamp, position, history (tuple of item ids, oldest first),
    history_ratings, history_labels (tuples aligned with history).
    With `liked_history_only` the history is the last L *liked* earlier items (CoLLM).
    No sample at all is an InputError naming the cause (no positives, no user with enough interactions)."""
    if history_len < 1:
        raise InputError(f"history_len must be >= 1, got {history_len}")
    min_history = history_len if min_history is None else min_history
    inter = ds.interactions
    users = inter["user"].to_numpy()
    items = inter["item"].to_numpy()
    ratings = inter["rating"].to_numpy()
    labels = inter["label"].to_numpy()
    stamps = inter["timestamp"].to_numpy()
    boundaries = np.flatnonzero(np.diff(users)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(users)]])
    rows = {k: [] for k in ("user", "item", "rating", "label", "timestamp", "position",
                            "history", "history_ratings", "history_labels")}
    for start, end in zip(starts, ends):
        u_items, u_ratings, u_labels = items[start:end], ratings[start:end], labels[start:end]
        liked_positions = np.flatnonzero(u_labels)
        for pos in range(end - start):
            if liked_history_only:
                earlier = liked_positions[liked_positions < pos][-history_len:]
            else:
                earlier = np.arange(max(0, pos - history_len), pos)
            if len(earlier) < min_history:
                continue
            rows["user"].append(int(users[start]))
            rows["item"].append(int(u_items[pos]))
            rows["rating"].append(float(u_ratings[pos]))
            rows["label"].append(bool(u_labels[pos]))
            rows["timestamp"].append(int(stamps[start + pos]))
            rows["position"].append(pos)
            rows["history"].append(tuple(int(i) for i in u_items[earlier]))
            rows["history_ratings"].append(tuple(float(r) for r in u_ratings[earlier]))
            rows["history_labels"].append(tuple(bool(b) for b in u_labels[earlier]))
    if not rows["user"]:
        problem = samples_problem(ds, min_history, liked_history_only)
        raise InputError(f"{describe(ds)}: {problem or f'no history samples (history_len={history_len})'}")
    return pd.DataFrame(rows)


def temporal_split(
    samples: pd.DataFrame,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    by: str = "count",
) -> Split:
    """Split samples by their target timestamp.

    by="count": the earliest 80% of samples (ties in time broken by input order) are train, etc.
    by="time": cut points at 80% / 90% of the time axis between the first and last timestamp."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise InputError(f"split fractions must be three non-negative numbers summing to 1, got {list(fractions)}")
    if samples.empty:
        raise InputError("no samples to split: the sample set is empty")
    ordered = samples.sort_values("timestamp", kind="stable").reset_index(drop=True)
    if by == "count":
        n = len(ordered)
        a = int(round(fractions[0] * n))
        b = int(round((fractions[0] + fractions[1]) * n))
        parts = ordered.iloc[:a], ordered.iloc[a:b], ordered.iloc[b:]
    elif by == "time":
        t0, t1 = ordered["timestamp"].min(), ordered["timestamp"].max()
        c1 = t0 + fractions[0] * (t1 - t0)
        c2 = t0 + (fractions[0] + fractions[1]) * (t1 - t0)
        ts = ordered["timestamp"]
        parts = ordered[ts <= c1], ordered[(ts > c1) & (ts <= c2)], ordered[ts > c2]
    else:
        raise InputError(f"split 'by' must be 'count' or 'time', got {by!r}")
    return Split(*(p.reset_index(drop=True) for p in parts))


def few_shot(samples: pd.DataFrame, n: int | None, seed: int) -> pd.DataFrame:
    """N samples drawn without replacement with `seed` (all of them when n is None or >= len), kept in
    their input order. The draw is a prefix of one seeded permutation, so with the same seed a smaller N
    is a subset of a larger N (few-shot curves differ only by the added samples)."""
    if n is not None and (isinstance(n, bool) or n < 1):
        raise InputError(f"few-shot sample count must be >= 1, got {n}")
    if n is None or n >= len(samples):
        return samples.reset_index(drop=True)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.permutation(len(samples))[:n])
    return samples.iloc[chosen].reset_index(drop=True)


def mark_warm_cold(frame: pd.DataFrame, train: pd.DataFrame, include_history: bool = True) -> pd.DataFrame:
    """Add `warm` (user and item both seen in training), `warm_user`, `warm_item`.

    "Seen" means the user has a training sample, and the item is a training target or (with
    `include_history`) in a training history."""
    seen_users = set(train["user"].tolist())
    seen_items = set(train["item"].tolist())
    if include_history and "history" in train:
        for history in train["history"]:
            seen_items.update(history)
    out = frame.copy()
    out["warm_user"] = out["user"].isin(seen_users)
    out["warm_item"] = out["item"].isin(seen_items)
    out["warm"] = out["warm_user"] & out["warm_item"]
    return out
