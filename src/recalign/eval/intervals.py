"""95% bootstrap intervals for headline metrics, and paired intervals for differences between two methods
scored on the same cases.

Percentile bootstrap: resample the test cases with replacement (AUC, NDCG/HR/... per case) or the users
(UAUC: the mean of per-user AUCs), `rounds` times with a fixed seed, and take the 2.5th and 97.5th
percentiles of the statistic. Written out rather than through `scipy.stats.bootstrap` because an AUC
resample can hold a single class (AUC undefined): such rounds are skipped here instead of turning the whole
interval into NaN.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from recalign.eval.metrics import auc, ndcg_per_case, ranking_metrics

ROUNDS = 1000


def _percentiles(values: list[float]) -> list[float] | None:
    finite = np.asarray([v for v in values if v == v], dtype=np.float64)
    if finite.size < 10:
        return None
    return [float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5))]


def bootstrap(statistic: Callable[[np.ndarray], float], n: int, rounds: int = ROUNDS, seed: int = 0) -> list[float] | None:
    """[lo, hi] of `statistic(indices)` over `rounds` resamples of range(n); None when n is 0 or too few
    rounds give a defined value."""
    if n == 0:
        return None
    rng = np.random.default_rng(seed)
    return _percentiles([statistic(rng.integers(0, n, n)) for _ in range(rounds)])


def auc_interval(labels, scores, rounds: int = ROUNDS, seed: int = 0) -> list[float] | None:
    labels, scores = np.asarray(labels, dtype=bool), np.asarray(scores, dtype=np.float64)
    return bootstrap(lambda idx: auc(labels[idx], scores[idx]), len(labels), rounds, seed)


def per_user_auc(users, labels, scores) -> np.ndarray:
    """AUC of each user with both classes (the terms UAUC averages)."""
    users, labels = np.asarray(users), np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(users, kind="stable")
    users, labels, scores = users[order], labels[order], scores[order]
    bounds = np.flatnonzero(users[1:] != users[:-1]) + 1
    return np.asarray([auc(lab, sco) for lab, sco in zip(np.split(labels, bounds), np.split(scores, bounds))
                       if lab.any() and not lab.all()], dtype=np.float64)


def uauc_interval(users, labels, scores, rounds: int = ROUNDS, seed: int = 0) -> list[float] | None:
    """Resamples users (a user's cases stay together)."""
    return mean_interval(per_user_auc(users, labels, scores), rounds, seed)


def mean_interval(values, rounds: int = ROUNDS, seed: int = 0) -> list[float] | None:
    """Interval of the mean of per-case values (e.g. each case's NDCG@10)."""
    values = np.asarray(values, dtype=np.float64)
    return bootstrap(lambda idx: float(values[idx].mean()), len(values), rounds, seed)


def paired_auc_difference(labels, scores_a, scores_b, rounds: int = ROUNDS, seed: int = 0) -> dict:
    """AUC(a) - AUC(b) on the same cases, with the interval of the difference (same resamples for both)."""
    labels = np.asarray(labels, dtype=bool)
    a, b = np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)
    return {"difference": auc(labels, a) - auc(labels, b),
            "ci": bootstrap(lambda idx: auc(labels[idx], a[idx]) - auc(labels[idx], b[idx]), len(labels), rounds,
                            seed)}


def ranking_with_intervals(ranks, ks) -> dict:
    """`ranking_metrics` of 0-based target ranks plus their `ndcg@K_ci` / `hr@K_ci` and the case count `n`."""
    ranks = np.asarray(ranks, dtype=np.float64)
    return {**ranking_metrics(ranks, ks), **ranking_intervals(ranks, ks), "n": len(ranks)}


def ranking_intervals(ranks, ks) -> dict:
    """`ndcg@K_ci` and `hr@K_ci` from 0-based target ranks (every case counts)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    out = {}
    for k in ks:
        hit = ranks < k
        out[f"ndcg@{k}_ci"] = mean_interval(ndcg_per_case(ranks, k))
        out[f"hr@{k}_ci"] = mean_interval(hit.astype(np.float64))
    return out


def paired_ranking_difference(ranks_a, ranks_b, k: int = 10, rounds: int = ROUNDS, seed: int = 0) -> dict:
    """NDCG@k(a) - NDCG@k(b) from 0-based target ranks of the SAME cases: the mean per-case difference and
    its interval (cases resampled)."""
    difference = ndcg_per_case(np.asarray(ranks_a, dtype=np.float64), k) - \
        ndcg_per_case(np.asarray(ranks_b, dtype=np.float64), k)
    return {f"ndcg@{k}": float(difference.mean()) if difference.size else float("nan"),
            "ci": mean_interval(difference, rounds, seed), "cases": int(difference.size)}


def paired_uauc_difference(users, labels, scores_a, scores_b, rounds: int = ROUNDS, seed: int = 0) -> dict:
    """UAUC(a) - UAUC(b) on the same cases: the interval resamples users (each user's AUC difference)."""
    diffs = per_user_auc(users, labels, scores_a) - per_user_auc(users, labels, scores_b)
    return {"difference": float(diffs.mean()) if diffs.size else float("nan"),
            "ci": mean_interval(diffs, rounds, seed)}


def paired_predictions(a: dict, b: dict, rounds: int = ROUNDS) -> dict:
    """AUC and UAUC differences a - b with paired intervals, from two per-sample score records
    ({"user", "item", "label", "score"} lists, e.g. a run's predictions JSON) of the SAME samples in the same
    order. Different samples are an InputError: an unpaired difference has no paired interval."""
    from recalign.errors import InputError

    for key in ("user", "item", "label"):
        if list(a[key]) != list(b[key]):
            raise InputError(f"the two score records hold different samples ({key} differs; "
                             f"{len(a[key])} vs {len(b[key])} samples)")
    users, labels = np.asarray(a["user"]), np.asarray(a["label"], dtype=bool)
    return {"n": len(labels), "users": int(np.unique(users).size),
            "auc": paired_auc_difference(labels, a["score"], b["score"], rounds),
            "uauc": paired_uauc_difference(users, labels, a["score"], b["score"], rounds)}
