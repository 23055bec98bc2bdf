"""The next-item task: given a user's history, rank the whole catalogue (or generate the next item).

- `leave_one_out`: the CF protocol — per user, the last interaction by time is the test case, the second
  to last the valid case, history = everything before the target.
- `generative_samples`: BIGRec's protocol — windows of L interactions -> the next item, split by the
  target's global time (80/10/10 by count); valid/test cut to seeded random subsets.
- `Cases`: evaluation cases (user, full history, target[, label]); `history_mask` marks each case's
  earlier items so they are not candidates. The metrics (NDCG/HR/Recall/MRR@K, every case counts) are
  `recalign.eval.metrics.target_ranks` + `ranking_metrics`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from recalign.data import Dataset, Split, history_samples, temporal_split
from recalign.errors import InputError
from recalign.tasks.ctr import check_split, draw, fewer_than_asked

# the `samples:` section of the generative protocol (BIGRec, TransRec)
GENERATIVE_SAMPLES = {
    "history_len": 10,
    "split": [0.8, 0.1, 0.1],  # by the target's timestamp
    "targets": "all",  # all: every next watched item is a target | liked: only liked targets
    "valid_size": 200,  # valid cases generated (0 = all)
    "test_size": 1000,  # test cases generated and ranked (0 = all)
    "subset_seed": 0,  # fixed, so every method sees the same valid/test cases
}


@dataclass
class Cases:
    """Evaluation cases: users [N], per case the items before the target (oldest first), targets [N],
    optional labels [N] (bool, for CTR metrics)."""

    users: np.ndarray
    histories: list[np.ndarray]
    targets: np.ndarray
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.targets)

    @classmethod
    def from_samples(cls, frame: pd.DataFrame, histories: Sequence[np.ndarray] | None = None) -> "Cases":
        """From a sample frame (user, item, history[, label]); `histories` replaces the frame's windows
        (e.g. the full histories from `full_histories`)."""
        for column in ("user", "item") + (("history",) if histories is None else ()):
            if column not in frame:
                raise InputError(f"evaluation samples: missing column '{column}'")
        labels = frame["label"].to_numpy(bool) if "label" in frame else None
        if histories is None:
            histories = frame["history"]
        return cls(frame["user"].to_numpy(np.int64), [np.asarray(h, np.int64) for h in histories],
                   frame["item"].to_numpy(np.int64), labels)

    def subset(self, rows: np.ndarray) -> "Cases":
        rows = np.flatnonzero(rows) if np.asarray(rows).dtype == bool else np.asarray(rows)
        return Cases(self.users[rows], [self.histories[r] for r in rows], self.targets[rows],
                     None if self.labels is None else self.labels[rows])


def leave_one_out(interactions: pd.DataFrame, min_interactions: int = 3) -> tuple[pd.DataFrame, Cases, Cases]:
    """(training interactions, valid cases, test cases). `interactions` must be sorted by (user, time) (a
    Dataset's are). Users with fewer than `min_interactions` interactions keep them all in training and are
    not evaluated."""
    users = interactions["user"].to_numpy(np.int64)
    items = interactions["item"].to_numpy(np.int64)
    labels = interactions["label"].to_numpy(bool) if "label" in interactions else np.ones(len(users), bool)
    bounds = np.flatnonzero(np.diff(users)) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [len(users)]])
    train_rows, valid, test = [], ([], [], [], []), ([], [], [], [])
    for start, end in zip(starts, ends):
        if end - start < min_interactions:
            train_rows.append(np.arange(start, end))
            continue
        train_rows.append(np.arange(start, end - 2))
        for case, pos in ((valid, end - 2), (test, end - 1)):
            case[0].append(users[start])
            case[1].append(items[start:pos])
            case[2].append(items[pos])
            case[3].append(labels[pos])

    def make(c) -> Cases:
        return Cases(np.asarray(c[0], np.int64), c[1], np.asarray(c[2], np.int64), np.asarray(c[3], bool))

    return interactions.iloc[np.concatenate(train_rows)], make(valid), make(test)


def generative_samples(ds: Dataset, cfg: Mapping) -> tuple[Split, pd.DataFrame, pd.DataFrame]:
    """(split, valid cases, test cases): windows of L interactions -> next item, split by target time."""
    samples = history_samples(ds, int(cfg["history_len"]))
    if cfg["targets"] == "liked":
        samples = samples[samples["label"]].reset_index(drop=True)
    elif cfg["targets"] != "all":
        raise InputError(f"samples.targets: expected 'all' or 'liked', got {cfg['targets']!r}")
    if samples.empty:
        raise InputError(f"{ds.name}: no user has more than samples.history_len={cfg['history_len']} "
                         "interactions; nothing to build next-item samples from")
    split = temporal_split(samples, tuple(cfg["split"]), by="count").require_parts(f"samples.split {cfg['split']}")
    seed = int(cfg["subset_seed"])
    return split, draw(split.valid, int(cfg["valid_size"]), seed), draw(split.test, int(cfg["test_size"]), seed)


def check_generative_samples(cfg: Mapping, where: str = "samples") -> None:
    if cfg["history_len"] < 1:
        raise InputError(f"{where}.history_len must be >= 1, got {cfg['history_len']}")
    if cfg["targets"] not in ("all", "liked"):
        raise InputError(f"{where}.targets: expected 'all' or 'liked', got {cfg['targets']!r}")
    for key in ("valid_size", "test_size"):
        if cfg[key] < 0:
            raise InputError(f"{where}.{key} must be >= 0 (0 = all), got {cfg[key]}")
    check_split(cfg["split"], f"{where}.split")


def full_histories(ds: Dataset, frame: pd.DataFrame) -> list[np.ndarray]:
    """Every item the user interacted with before each sample's target (the ranking mask, CF queries)."""
    inter = ds.interactions
    users = inter["user"].to_numpy()
    items = inter["item"].to_numpy()
    starts = np.searchsorted(users, np.arange(ds.n_users), side="left")
    return [items[starts[u]:starts[u] + p] for u, p in zip(frame["user"], frame["position"])]


def history_mask(histories: Sequence[np.ndarray], n_items: int) -> torch.Tensor:
    """[N, n_items] bool: True where the item is in the case's history (not a candidate)."""
    lengths = [len(h) for h in histories]
    flat = np.concatenate([np.asarray(h, np.int64) for h in histories]) if sum(lengths) else np.zeros(0, np.int64)
    rows = np.repeat(np.arange(len(histories)), lengths)
    mask = torch.zeros(len(histories), n_items, dtype=torch.bool)
    mask[torch.from_numpy(rows), torch.from_numpy(flat)] = True
    return mask


def few_candidates_warnings(histories: Sequence[np.ndarray], targets, n_items: int, ks) -> list[str]:
    """A warning when masking a case's history (the target never) leaves K or fewer candidates: that case's
    hr@K is 1 by construction. Counted per K below the catalogue size (a catalogue of K or fewer items is
    `data.Needs.top_k`'s warning)."""
    left = np.array([n_items - len(set(np.asarray(h, np.int64).tolist()) - {int(t)})
                     for h, t in zip(histories, np.asarray(targets).tolist())], dtype=np.int64)
    parts = [f"{int((left <= k).sum())} of {len(left)} cases at K={k}" for k in sorted(set(ks))
             if k < n_items and (left <= k).any()]
    if not parts:
        return []
    return ["masking each user's earlier items leaves K or fewer candidates for some test cases, so their hr@K is 1 "
            "by construction: " + ", ".join(parts)]


def next_item_warnings(cfg: Mapping, shots: int, valid: int, test: int, histories: Sequence[np.ndarray], targets,
                       n_items: int, ks) -> list[str]:
    """A generative next-item run's thin-data warnings: fewer samples or cases than asked
    (`tasks.ctr.fewer_than_asked`) and, when the evaluation masks histories, cases left K or fewer candidates."""
    masked = few_candidates_warnings(histories, targets, n_items, ks) if cfg["eval"]["mask_history"] else []
    return fewer_than_asked(cfg, shots, valid, test) + masked


def period_popularity(ds: Dataset, cutoff) -> np.ndarray:
    """Interactions per item up to `cutoff` (the training period's last timestamp)."""
    items = ds.interactions.loc[ds.interactions["timestamp"] <= cutoff, "item"].to_numpy()
    return np.bincount(items, minlength=ds.n_items)


def popularity_percentiles(counts) -> np.ndarray:
    """Per item, the share of items less popular than it (ties count half): 0 = least, ~1 = most popular."""
    counts = np.asarray(counts, dtype=np.float64)
    order = np.sort(counts)
    below = np.searchsorted(order, counts, side="left")
    equal = np.searchsorted(order, counts, side="right") - below
    return (below + 0.5 * equal) / max(1, len(counts))


def item_diagnostics(top_items, targets, titles: Sequence[str], popularity=None, histories=None) -> dict:
    """Collapse diagnostics of a generative method's first item per case (-1 = the case returned none):
    distinct items, the five most returned titles with counts, the top item's share, the entropy (bits) of
    the returned items; with `popularity` (training-period counts per item) the mean popularity percentile and
    decile shares of the returned items and of the targets; with `histories` the share of returned items the
    user had already seen."""
    from collections import Counter

    top = np.asarray(top_items, dtype=np.int64).reshape(-1)
    target_ids = np.asarray(targets, dtype=np.int64).reshape(-1)
    n = max(1, len(top))
    found = top >= 0
    counts = Counter(top[found].tolist())
    out = {"cases": len(top), "returned": float(found.mean()) if len(top) else 0.0,
           "distinct_items": len(counts),
           "top_share": (counts.most_common(1)[0][1] / n) if counts else 0.0,
           "top_titles": [[titles[i], c] for i, c in counts.most_common(5)],
           "entropy_bits": float(sum(c / n * np.log2(n / c) for c in counts.values()))}
    if popularity is not None and found.any():
        pct = popularity_percentiles(popularity)
        deciles = lambda p: (np.bincount(np.minimum((p * 10).astype(np.int64), 9), minlength=10) / len(p)).tolist()
        out.update(popularity_generated=float(pct[top[found]].mean()), popularity_target=float(pct[target_ids].mean()),
                   popularity_deciles_generated=deciles(pct[top[found]]), popularity_deciles_target=deciles(pct[target_ids]))
    if histories is not None and found.any():
        out["in_history"] = float(np.mean([int(i) in set(np.asarray(h).tolist())
                                           for i, h, f in zip(top, histories, found) if f]))
    return out


def diagnostics_lines(gen: Mapping, noun: str = "items") -> list[str]:
    """The report lines of `item_diagnostics` (markdown)."""
    most = ", ".join(f"{t!r} x{c}" for t, c in gen["top_titles"][:3]) or "none"
    lines = [f"Collapse diagnostics (test, first {noun[:-1]} per case): {gen['distinct_items']} distinct {noun} over "
             f"{gen['cases']} cases ({gen['returned']:.3f} of the cases returned one); most returned {most} (top "
             f"share {gen['top_share']:.3f}); entropy {gen['entropy_bits']:.2f} bits (all different: "
             f"{np.log2(max(1, gen['cases'])):.2f})."]
    if "popularity_generated" in gen:
        lines.append(f"Mean popularity percentile (training period): returned {gen['popularity_generated']:.3f}, "
                     f"targets {gen['popularity_target']:.3f}; deciles returned "
                     + " ".join(f"{x:.2f}" for x in gen["popularity_deciles_generated"]) + ", targets "
                     + " ".join(f"{x:.2f}" for x in gen["popularity_deciles_target"])
                     + f"; returned item already in the user's history: {gen.get('in_history', float('nan')):.3f}.")
    return lines
