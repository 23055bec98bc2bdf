"""Metrics: AUC / UAUC for Yes/No (CTR-style) scoring, and full-ranking top-K metrics.

AUC is rank-based with ties averaged (identical to scikit-learn's roc_auc_score). Ranking metrics take
the 0-based rank of the single relevant item per test case; every test case counts in the denominator.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import rankdata

from recalign.errors import InputError


def auc(labels, scores) -> float:
    """Area under the ROC curve via the Mann–Whitney U statistic (ties get average ranks).

    Returns NaN when only one class is present."""
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.shape != scores.shape:
        raise InputError(f"auc: labels {labels.shape} and scores {scores.shape} differ in shape")
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)  # average ranks for ties, 1-based
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def uauc(users, labels, scores) -> tuple[float, int]:
    """Unweighted mean of per-user AUC over users with both classes.

    Returns (uauc, number of users skipped because they had one class only)."""
    users = np.asarray(users)
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(users, kind="stable")
    users, labels, scores = users[order], labels[order], scores[order]
    boundaries = np.flatnonzero(users[1:] != users[:-1]) + 1
    values, skipped = [], 0
    for lab, sco in zip(np.split(labels, boundaries), np.split(scores, boundaries)):
        if lab.all() or not lab.any():
            skipped += 1
            continue
        values.append(auc(lab, sco))
    return (float(np.mean(values)) if values else float("nan")), skipped


def ctr_metrics(users, labels, scores, prefix: str = "") -> dict:
    """auc, uauc and uauc_skipped_users (suffixed names come from `prefix`, e.g. "_warm")."""
    value, skipped = uauc(users, labels, scores)
    return {f"auc{prefix}": auc(labels, scores), f"uauc{prefix}": value, f"uauc_skipped_users{prefix}": skipped}


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """0-based rank of each target among all items (higher score = better).

    scores: [B, n_items]; targets: [B]; exclude: optional bool mask [B, n_items] of items that are not
    candidates (e.g. the user's earlier interactions). The target itself is never excluded.
    Ties are broken pessimistically-neutral: items with an equal score count half (expected rank)."""
    scores = scores.float()
    target_scores = scores.gather(1, targets.view(-1, 1))
    if exclude is not None:
        exclude = exclude.clone()
        exclude[torch.arange(len(targets)), targets] = False
        scores = scores.masked_fill(exclude, float("-inf"))
    higher = (scores > target_scores).sum(1).float()
    ties = (scores == target_scores).sum(1).float() - 1.0
    return higher + ties / 2.0


def ndcg_per_case(ranks, k: int) -> np.ndarray:
    """Each case's NDCG@k from its 0-based target rank (one relevant item): 1 / log2(rank + 2) inside the top k."""
    ranks = np.asarray(ranks, dtype=np.float64)
    return np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)


def check_ks(ks, where: str = "eval.ks") -> list[int]:
    """Validate a list of cut-offs K (positive integers)."""
    if not isinstance(ks, (list, tuple)) or not ks:
        raise InputError(f"{where}: expected a non-empty list of positive integers, got {ks!r}")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InputError(f"{where}: K must be a positive integer, got {k!r}")
    return list(ks)


def ranking_metrics(ranks, ks=(10,)) -> dict:
    """NDCG@K, HR@K, Recall@K (= HR with one relevant item), MRR@K from 0-based ranks."""
    ranks = np.asarray(ranks.cpu() if isinstance(ranks, torch.Tensor) else ranks, dtype=np.float64)
    if ranks.size == 0:
        raise InputError("ranking metrics need at least one test case")
    out = {}
    for k in ks:
        if k < 1:
            raise InputError(f"K must be a positive integer, got {k}")
        hit = ranks < k
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean())
        out[f"hr@{k}"] = float(hit.mean())
        out[f"recall@{k}"] = float(hit.mean())
        out[f"mrr@{k}"] = float(np.where(hit, 1.0 / (ranks + 1.0), 0.0).mean())
    return out


RANKING_METRICS = ("ndcg", "hr", "recall", "mrr")


def check_metric_name(name: str, where: str) -> None:
    """A validation metric name: auc, uauc, or ndcg@K / hr@K / recall@K / mrr@K ("" = no validation)."""
    if name in ("", "auc", "uauc"):
        return
    base, _, k = str(name).partition("@")
    if base not in RANKING_METRICS or not k.isdigit() or int(k) < 1:
        raise InputError(f"{where}: unknown metric {name!r}; use auc, uauc or one of "
                         f"{', '.join(m + '@K' for m in RANKING_METRICS)} with K >= 1")
