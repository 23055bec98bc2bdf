"""One evaluator for every model: vectorised full ranking (batched scores + history mask + ranks / top-k)
and CTR scoring of (user/history, target) pairs for AUC / UAUC.

An `EvalSet` is a list of cases (user, history, target[, label]). `leave_one_out_sets` builds the CF
protocol (last interaction by time = test, second to last = valid, history = everything before the
target); `EvalSet.from_samples` takes any sample frame (user, item, history[, label]).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from recalign.cf.base import CFModel, Query, TrainData, make_query
from recalign.errors import InputError
from recalign.eval.metrics import ctr_metrics, ranking_metrics, target_ranks


@dataclass
class EvalSet:
    users: np.ndarray  # [N]
    histories: list[np.ndarray]  # per case, items before the target (oldest first); masked in ranking
    targets: np.ndarray  # [N]
    labels: np.ndarray | None = None  # [N] bool, for CTR metrics

    def __len__(self) -> int:
        return len(self.targets)

    @classmethod
    def from_samples(cls, frame: pd.DataFrame) -> "EvalSet":
        for column in ("user", "item", "history"):
            if column not in frame:
                raise InputError(f"evaluation samples: missing column '{column}'")
        labels = frame["label"].to_numpy(bool) if "label" in frame else None
        return cls(frame["user"].to_numpy(np.int64), [np.asarray(h, np.int64) for h in frame["history"]],
                   frame["item"].to_numpy(np.int64), labels)

    def query(self, rows: np.ndarray, n_items: int, max_len: int | None) -> Query:
        return make_query(self.users[rows], [self.histories[r] for r in rows], n_items, max_len)


def leave_one_out_sets(interactions: pd.DataFrame, n_users: int, n_items: int,
                       min_interactions: int = 3) -> tuple[TrainData, EvalSet, EvalSet]:
    """Train data, valid and test cases of the leave-one-out-by-time protocol.

    `interactions` must be sorted by (user, time) (a Dataset's are). Users with fewer than
    `min_interactions` interactions keep them all in training and are not evaluated."""
    users = interactions["user"].to_numpy(np.int64)
    items = interactions["item"].to_numpy(np.int64)
    labels = interactions["label"].to_numpy(bool) if "label" in interactions else np.ones(len(users), bool)
    bounds = np.flatnonzero(np.diff(users)) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [len(users)]])
    train_rows, valid, test = [], ([], [], [], []), ([], [], [], [])
    for start, end in zip(starts, ends):
        n = end - start
        if n < min_interactions:
            train_rows.append(np.arange(start, end))
            continue
        train_rows.append(np.arange(start, end - 2))
        for case, pos in ((valid, end - 2), (test, end - 1)):
            case[0].append(users[start])
            case[1].append(items[start:pos])
            case[2].append(items[pos])
            case[3].append(labels[pos])
    train = interactions.iloc[np.concatenate(train_rows)]
    data = TrainData.from_interactions(train, n_users, n_items)
    make = lambda c: EvalSet(np.asarray(c[0], np.int64), c[1], np.asarray(c[2], np.int64),  # noqa: E731
                             np.asarray(c[3], bool))
    return data, make(valid), make(test)


@torch.no_grad()
def score_cases(model: CFModel, cases: EvalSet, batch_size: int = 1024):
    """Yield (rows, scores [B, n_items], history mask [B, n_items]) over the cases, in order."""
    model.eval()
    for start in range(0, len(cases), batch_size):
        rows = np.arange(start, min(start + batch_size, len(cases)))
        query = cases.query(rows, model.n_items, model.max_len)
        scores = model.score(query)
        mask = _mask(cases, rows, model.n_items)
        yield rows, scores, mask


def _mask(cases: EvalSet, rows: np.ndarray, n_items: int) -> torch.Tensor:
    lengths = [len(cases.histories[r]) for r in rows]
    flat = np.concatenate([cases.histories[r] for r in rows]) if sum(lengths) else np.zeros(0, np.int64)
    row_ids = np.repeat(np.arange(len(rows)), lengths)
    mask = torch.zeros(len(rows), n_items, dtype=torch.bool)
    mask[torch.from_numpy(row_ids), torch.from_numpy(flat)] = True
    return mask


def evaluate_ranking(model: CFModel, cases: EvalSet, ks=(10, 20), batch_size: int = 1024,
                     mask_history: bool = True) -> dict:
    """Full-ranking metrics over the whole catalogue, the case's history masked (target never masked)."""
    ranks = []
    for rows, scores, mask in score_cases(model, cases, batch_size):
        targets = torch.from_numpy(cases.targets[rows])
        ranks.append(target_ranks(scores, targets, mask if mask_history else None))
    return ranking_metrics(torch.cat(ranks), ks)


@torch.no_grad()
def recommend(model: CFModel, query: Query, k: int = 10, exclude_history: bool = True,
              full_histories: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (scores [B, k], items [B, k]) for a query; the history (or `full_histories`) is excluded."""
    model.eval()
    scores = model.score(query).float()
    if exclude_history:
        if full_histories is not None:
            cases = EvalSet(query.users.numpy(), [np.asarray(h, np.int64) for h in full_histories],
                            np.zeros(len(query), np.int64))
            mask = _mask(cases, np.arange(len(query)), model.n_items)
        else:
            mask = torch.zeros(len(query), model.n_items + 1, dtype=torch.bool)
            mask.scatter_(1, query.history, True)
            mask = mask[:, :model.n_items]
        scores = scores.masked_fill(mask, float("-inf"))
    return scores.topk(min(k, model.n_items), dim=1)


@torch.no_grad()
def score_pairs(model: CFModel, cases: EvalSet, batch_size: int = 4096) -> np.ndarray:
    """CTR mode: one score per (user/history, target) case."""
    model.eval()
    out = []
    for start in range(0, len(cases), batch_size):
        rows = np.arange(start, min(start + batch_size, len(cases)))
        query = cases.query(rows, model.n_items, model.max_len)
        out.append(model.score_pairs(query, torch.from_numpy(cases.targets[rows])).float().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def evaluate_ctr(model: CFModel, cases: EvalSet, batch_size: int = 4096) -> dict:
    """auc, uauc, uauc_skipped_users of the model's pair scores against the cases' labels."""
    if cases.labels is None:
        raise InputError("CTR evaluation needs labelled cases (a `label` column)")
    scores = score_pairs(model, cases, batch_size)
    return ctr_metrics(cases.users, cases.labels, scores)


def evaluate(model: CFModel, cases: EvalSet, metric: str, ks=(10, 20), batch_size: int = 1024) -> dict:
    """Ranking metrics, or CTR metrics when `metric` is auc/uauc."""
    if metric.split("@")[0] in ("auc", "uauc"):
        return evaluate_ctr(model, cases)
    k = int(metric.split("@")[1]) if "@" in metric else 10
    return evaluate_ranking(model, cases, tuple(sorted(set(ks) | {k})), batch_size)
