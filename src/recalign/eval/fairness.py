"""Fairness metrics: how much a recommendation list moves when the user states a sensitive attribute
(FaiRLLM, Zhang et al. RecSys 2023), and how far recommendation quality differs between user groups.

List similarity of a sensitive list S to the neutral list N at K (S_K, N_K = the first K *distinct*
entries; a list is de-duplicated first, keeping first occurrences, so a title the model repeats counts once):
- `jaccard_at`: |S_K n N_K| / |S_K u N_K|.
- `serp_at` (SERP*@K): sum over v in S_K n N_K of (K - r_v + 1), r_v = 1-based rank of v in S_K, divided by
  K(K+1)/2. Identical lists of K entries give 1; K is the nominal K, so lists shorter than K score less.
- `serp_reference_at`: the reference code's version (jizhi-zhang/FaiRLLM `calc_serp_ms`): it weighs the
  0-based position i as len(S_K) - i + 1 and divides by 2|N_K|(|N_K|+1), so identical lists of K entries score
  ((K+1)(K+2)/2 - 1) / (2K(K+1)) (0.274 at K = 20), the scale of the paper's SERP* figures. Offered only to
  set results beside the paper's; `serp_at` is the definition.
- `prag_at` (PRAG*@K): over all pairs i < j of S_K, the share whose order N_K keeps: S_K[i] is in N_K and
  S_K[j] is either not in N_K or after it. Pairs whose first item is missing from N_K are not kept. A list of
  fewer than two entries (K = 1) scores 1 if S_K equals N_K, else 0.
Two empty lists have no defined similarity (NaN); an empty list against a non-empty one scores 0.

Per attribute (a set of values, e.g. gender: a boy, a female, a girl, a male) with Sim_v = the mean over
entities for value v: `snsr` = max_v Sim_v - min_v Sim_v (range), `snsv` = population std of Sim_v.
Lower is fairer. `bootstrap_spread` resamples entities (or users) for intervals; `permutation_spread`
shuffles group labels (`permutation_paired`: values within each entity) to show how large a spread noise
alone makes (a range over noisy means is never 0, and a bootstrap interval of it never holds 0).
"""

from __future__ import annotations

from typing import Callable, Hashable, Mapping, Sequence

import numpy as np

METRICS = ("jaccard", "serp", "prag")


def top_k(items: Sequence[Hashable], k: int) -> list:
    """The first k distinct entries of `items`, in order (later repeats dropped)."""
    seen, out = set(), []
    for item in items:
        if item not in seen:
            seen.add(item)
            out.append(item)
            if len(out) == k:
                break
    return out


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"K must be an integer >= 1, got {k!r}")


def jaccard_at(sensitive: Sequence, neutral: Sequence, k: int) -> float:
    _check_k(k)
    s, n = set(top_k(sensitive, k)), set(top_k(neutral, k))
    if not s and not n:
        return float("nan")
    return len(s & n) / len(s | n)


def serp_at(sensitive: Sequence, neutral: Sequence, k: int) -> float:
    _check_k(k)
    s, n = top_k(sensitive, k), set(top_k(neutral, k))
    if not s and not n:
        return float("nan")
    return sum(k - rank + 1 for rank, item in enumerate(s, start=1) if item in n) / (k * (k + 1) / 2)


def serp_reference_at(sensitive: Sequence, neutral: Sequence, k: int) -> float:
    """The reference code's SERP* scale (see the module docstring), on the same de-duplicated lists."""
    _check_k(k)
    s, n = top_k(sensitive, k), top_k(neutral, k)
    if not s and not n:
        return float("nan")
    if not n:
        return 0.0
    total = sum(len(s) - i + 1 for i, item in enumerate(s) if item in set(n))
    return total * 0.5 / ((len(n) + 1) * len(n))


def prag_at(sensitive: Sequence, neutral: Sequence, k: int) -> float:
    _check_k(k)
    s, n = top_k(sensitive, k), top_k(neutral, k)
    if not s and not n:
        return float("nan")
    if len(s) < 2:
        return 1.0 if s == n else 0.0
    position = {item: i for i, item in enumerate(n)}
    kept = 0
    for i in range(len(s)):
        first = position.get(s[i])
        if first is None:
            continue
        for j in range(i + 1, len(s)):
            second = position.get(s[j])
            kept += second is None or second > first
    return kept / (len(s) * (len(s) - 1) / 2)


SIMILARITIES: dict[str, Callable[[Sequence, Sequence, int], float]] = {
    "jaccard": jaccard_at, "serp": serp_at, "prag": prag_at}


def similarity_fn(metric: str, serp_scale: str = "spec") -> Callable[[Sequence, Sequence, int], float]:
    if metric == "serp" and serp_scale == "reference":
        return serp_reference_at
    if metric not in SIMILARITIES:
        raise ValueError(f"unknown similarity {metric!r}; known: {', '.join(SIMILARITIES)}")
    return SIMILARITIES[metric]


def similarity_curve(sensitive: Sequence, neutral: Sequence, k_max: int, metric: str,
                     serp_scale: str = "spec") -> np.ndarray:
    """[k_max] similarity at K = 1..k_max."""
    fn = similarity_fn(metric, serp_scale)
    return np.array([fn(sensitive, neutral, k) for k in range(1, k_max + 1)], dtype=np.float64)


# ------------------------------------------------------------------------------------- spreads
def snsr(means: Sequence[float]) -> float:
    """Range of the per-value (per-group) means; NaN means are ignored (NaN when fewer than two remain)."""
    arr = np.asarray([m for m in means if m == m], dtype=np.float64)
    return float(arr.max() - arr.min()) if arr.size >= 2 else float("nan")


def snsv(means: Sequence[float]) -> float:
    """Population standard deviation of the per-value (per-group) means (NaN entries ignored)."""
    arr = np.asarray([m for m in means if m == m], dtype=np.float64)
    return float(arr.std(ddof=0)) if arr.size >= 2 else float("nan")


def spread(means: Mapping[str, float] | Sequence[float]) -> dict:
    values = list(means.values()) if isinstance(means, Mapping) else list(means)
    return {"snsr": snsr(values), "snsv": snsv(values)}


def _nanmean_columns(table: np.ndarray) -> np.ndarray:
    counts = np.sum(~np.isnan(table), axis=0)
    sums = np.nansum(table, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def bootstrap_spread(table: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Percentile intervals of SNSR and SNSV for a paired table [units, values] (one row per entity: each
    entity is asked with every value), resampling rows with replacement. NaN cells are skipped in means."""
    table = np.asarray(table, dtype=np.float64)
    if table.ndim != 2 or table.shape[0] == 0 or n_boot < 1:
        return {"snsr_ci": [float("nan")] * 2, "snsv_ci": [float("nan")] * 2, "n_boot": 0}
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, table.shape[0], size=(n_boot, table.shape[0]))
    ranges, stds = np.empty(n_boot), np.empty(n_boot)
    for b in range(n_boot):
        means = _nanmean_columns(table[rows[b]])
        ranges[b], stds[b] = snsr(means), snsv(means)
    tail = (1 - level) / 2 * 100
    return {"snsr_ci": _percentiles(ranges, tail), "snsv_ci": _percentiles(stds, tail), "n_boot": int(n_boot)}


def permutation_paired(table: np.ndarray, n_perm: int = 1000, seed: int = 0) -> dict:
    """How large an SNSR / SNSV the values' means reach when the value does not matter: each row (entity) of
    a paired table [units, values] has its cells shuffled among the values, independently per row. Returns
    p (share of shufflings with a spread at least the observed one, counting the observed) and the null's
    mean and 95th percentile SNSR."""
    table = np.asarray(table, dtype=np.float64)
    nan = float("nan")
    if table.ndim != 2 or table.shape[0] == 0 or table.shape[1] < 2 or n_perm < 1:
        return {"p_snsr": nan, "p_snsv": nan, "null_snsr_mean": nan, "null_snsr_95": nan, "n_perm": 0}
    means = _nanmean_columns(table)
    observed = snsr(means), snsv(means)
    rng = np.random.default_rng(seed)
    null = np.empty((n_perm, 2))
    for b in range(n_perm):
        shuffled = np.take_along_axis(table, np.argsort(rng.random(table.shape), axis=1), axis=1)
        m = _nanmean_columns(shuffled)
        null[b] = snsr(m), snsv(m)
    return {"p_snsr": float((1 + np.sum(null[:, 0] >= observed[0] - 1e-12)) / (n_perm + 1)),
            "p_snsv": float((1 + np.sum(null[:, 1] >= observed[1] - 1e-12)) / (n_perm + 1)),
            "null_snsr_mean": float(np.nanmean(null[:, 0])), "null_snsr_95": float(np.nanpercentile(null[:, 0], 95)),
            "n_perm": int(n_perm)}


def _percentiles(values: np.ndarray, tail: float) -> list[float]:
    values = values[~np.isnan(values)]
    if values.size == 0:
        return [float("nan"), float("nan")]
    low, high = np.percentile(values, [tail, 100 - tail])
    return [float(low), float(high)]


# ---------------------------------------------------------------------------------- user groups
def group_means(values: np.ndarray, groups: np.ndarray, n_boot: int = 1000, seed: int = 0,
                level: float = 0.95, order: Sequence[str] | None = None) -> dict[str, dict]:
    """Per group: n, mean of `values` (one per user or test case) and a percentile bootstrap interval.
    Groups come in `order` (those it names first), then sorted by name."""
    values, groups = np.asarray(values, dtype=np.float64), np.asarray(groups, dtype=object)
    rng = np.random.default_rng(seed)
    tail = (1 - level) / 2 * 100
    out = {}
    present = {g for g in groups if g is not None}
    first = [g for g in (order or []) if g in present]
    for group in first + sorted(present - set(first), key=str):
        v = values[(groups == group) & ~np.isnan(values)]
        entry = {"n": int(v.size), "mean": float(v.mean()) if v.size else float("nan")}
        if v.size and n_boot > 0:
            boots = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
            entry["ci"] = _percentiles(boots, tail)
        else:
            entry["ci"] = [float("nan"), float("nan")]
        out[str(group)] = entry
    return out


def permutation_spread(values: np.ndarray, groups: np.ndarray, n_perm: int = 1000, seed: int = 0) -> dict:
    """SNSR / SNSV of the group means, and how often shuffled group labels (same group sizes) give a spread
    at least as large: a permutation p-value and the spread noise alone gives (the null mean and 95th
    percentile). A gap is only evidence of unfairness when p is small."""
    values, groups = np.asarray(values, dtype=np.float64), np.asarray(groups, dtype=object)
    keep = ~np.isnan(values) & np.array([g is not None for g in groups], dtype=bool)
    values, groups = values[keep], groups[keep]
    labels, codes = np.unique(groups.astype(str), return_inverse=True)
    if len(labels) < 2:
        return {"snsr": float("nan"), "snsv": float("nan"), "p_snsr": float("nan"), "p_snsv": float("nan"),
                "null_snsr_mean": float("nan"), "null_snsr_95": float("nan"), "n_perm": 0}

    def spreads(c: np.ndarray) -> tuple[float, float]:
        counts = np.bincount(c, minlength=len(labels))
        means = np.bincount(c, weights=values, minlength=len(labels)) / np.maximum(counts, 1)
        means = means[counts > 0]
        return float(means.max() - means.min()), float(means.std(ddof=0))

    observed = spreads(codes)
    rng = np.random.default_rng(seed)
    null = np.array([spreads(rng.permutation(codes)) for _ in range(n_perm)]) if n_perm > 0 else np.zeros((0, 2))
    out = {"snsr": observed[0], "snsv": observed[1], "n_perm": int(n_perm)}
    if n_perm > 0:
        out["p_snsr"] = float((1 + np.sum(null[:, 0] >= observed[0] - 1e-12)) / (n_perm + 1))
        out["p_snsv"] = float((1 + np.sum(null[:, 1] >= observed[1] - 1e-12)) / (n_perm + 1))
        out["null_snsr_mean"] = float(null[:, 0].mean())
        out["null_snsr_95"] = float(np.percentile(null[:, 0], 95))
    return out
