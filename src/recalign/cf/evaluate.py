"""One evaluator for every model: vectorised full ranking (batched scores + history mask + ranks / top-k)
and CTR scoring of (user/history, target) pairs for AUC / UAUC.

Cases and protocols come from the next-item task (`recalign.tasks.next_item`): an `EvalSet` (= `Cases`)
is a list of cases (user, history, target[, label]); `leave_one_out_sets` builds the CF protocol;
`EvalSet.from_samples` takes any sample frame (user, item, history[, label]).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from recalign.cf.base import CFModel, Query, TrainData, make_query
from recalign.cf.base import history_mask as query_history_mask
from recalign.errors import InputError
from recalign.eval.intervals import ranking_with_intervals
from recalign.eval.metrics import ctr_metrics, ranking_metrics, target_ranks
from recalign.tasks.next_item import Cases, history_mask, leave_one_out


EvalSet = Cases  # the CF layer's historical name for the next-item task's evaluation cases


def case_query(cases: Cases, rows: np.ndarray, n_items: int, max_len: int | None) -> Query:
    """The model input (users, left-padded recent history) of some cases."""
    return make_query(cases.users[rows], [cases.histories[r] for r in rows], n_items, max_len)


def leave_one_out_sets(interactions: pd.DataFrame, n_users: int, n_items: int,
                       min_interactions: int = 3) -> tuple[TrainData, Cases, Cases]:
    """Training data, valid and test cases of the leave-one-out-by-time protocol (`tasks.next_item`)."""
    train, valid, test = leave_one_out(interactions, min_interactions)
    return TrainData.from_interactions(train, n_users, n_items), valid, test


@torch.no_grad()
def score_cases(model: CFModel, cases: EvalSet, batch_size: int = 1024):
    """Yield (rows, scores [B, n_items], history mask [B, n_items]) over the cases, in order."""
    model.eval()
    for start in range(0, len(cases), batch_size):
        rows = np.arange(start, min(start + batch_size, len(cases)))
        query = case_query(cases, rows, model.n_items, model.max_len)
        scores = model.score(query)
        mask = history_mask([cases.histories[r] for r in rows], model.n_items)
        yield rows, scores, mask


def case_ranks(model: CFModel, cases: EvalSet, batch_size: int = 1024, mask_history: bool = True) -> torch.Tensor:
    """Each case's 0-based target rank in the full catalogue (expected rank on ties), its history masked."""
    ranks = []
    for rows, scores, mask in score_cases(model, cases, batch_size):
        targets = torch.from_numpy(cases.targets[rows])
        ranks.append(target_ranks(scores, targets, mask if mask_history else None))
    return torch.cat(ranks)


def evaluate_ranking(model: CFModel, cases: EvalSet, ks=(10, 20), batch_size: int = 1024,
                     mask_history: bool = True, intervals: bool = False) -> dict:
    """Full-ranking metrics over the whole catalogue, the case's history masked (target never masked);
    `intervals` adds 95% bootstrap intervals (`ndcg@K_ci`, `hr@K_ci`)."""
    ranks = case_ranks(model, cases, batch_size, mask_history)
    return ranking_with_intervals(ranks, ks) if intervals else ranking_metrics(ranks, ks)


@torch.no_grad()
def recommend(model: CFModel, query: Query, k: int = 10, exclude_history: bool = True,
              full_histories: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (scores [B, k], items [B, k]) for a query; the history (or `full_histories`) is excluded. Ties
    go to the lower item index, so the top k is a prefix of the top k + 1 (topk's tie order is not)."""
    model.eval()
    scores = model.score(query).float()
    if exclude_history:
        mask = (history_mask(full_histories, model.n_items) if full_histories is not None
                else query_history_mask(query, model.n_items))
        scores = scores.masked_fill(mask, float("-inf"))
    ordered, items = scores.sort(dim=1, descending=True, stable=True)
    k = min(k, model.n_items)
    return ordered[:, :k], items[:, :k]


@torch.no_grad()
def score_pairs(model: CFModel, cases: EvalSet, batch_size: int = 4096) -> np.ndarray:
    """CTR mode: one score per (user/history, target) case."""
    model.eval()
    out = []
    for start in range(0, len(cases), batch_size):
        rows = np.arange(start, min(start + batch_size, len(cases)))
        query = case_query(cases, rows, model.n_items, model.max_len)
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
