"""The CTR task: will the user like this item? One sample = (user, history, target item, label = liked).

One sample type (`CTRSamples`), two named protocols that build it, one seeded bounded draw of the
evaluation sets, one warm/cold marking and one place that turns scores into AUC / UAUC on all, warm and
cold samples (`ctr_report`). Methods (ICL, TALLRec, CoLLM, Soft-Prompt, the CF baselines in CTR mode)
differ only in how they score a sample.

Protocols
- `tallrec_protocol` (TALLRec, Bao et al. 2023): sliding windows over each user's time-sorted
  interactions — the sample at position i has the previous L interactions (liked or not) as history;
  targets from position L on. Split by the target's global time, by count: the earliest 80% of samples
  train, the next 10% valid, the last 10% test. Valid and test are cut to a random subset of
  `valid_size` / `test_size` samples drawn with the FIXED `subset_seed`, so every method and every
  training seed is scored on the same samples. Warm = the user has a training sample and the item is a
  training target or in a training history.
- `collm_protocol` (CoLLM, Zhang et al. 2023; reference zyang1580/CoLLM, processing_ood.ipynb): every
  interaction is a sample, also those with an empty history; history = the user's earlier LIKED items,
  the last L of them; split on the calendar time axis (80/10/10 of the span between the first and last
  interaction; `split_by: count` as an option). Warm = user and item both occur as training samples
  (reference: `not_cold`). The evaluation sets can be bounded: warm and cold cases are drawn
  separately (whole users in random order, at most `max_per_user` cases each) with `eval_seed`, so both
  groups keep enough cases and users for AUC and UAUC. `max_train` draws a seeded few-shot training set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from recalign.data import Dataset, few_shot, history_samples, mark_warm_cold, temporal_split
from recalign.config import check_seed
from recalign.errors import InputError
from recalign.eval.intervals import auc_interval, paired_auc_difference, paired_uauc_difference, uauc_interval
from recalign.eval.metrics import auc, ctr_metrics

# the `prompt:` section of the TALLRec protocol (TALLRec and ICL): fields from `tasks.text.text_fields`
TALLREC_PROMPT = {
    "wrapper": "auto",  # auto | chat | alpaca | plain
    "system": "",  # chat wrapper's system message ("" = empty, null = the chat template's default)
    "instruction": ("Given the user's preference and unpreference, identify whether the user will like the "
                    'target {noun} by answering "Yes." or "No.".'),
    "input": ("User Preference: {liked}\nUser Unpreference: {disliked}\n"
              "Whether the user will like the target {noun} {target}?"),
    "yes": "Yes.",
    "no": "No.",
    "max_tokens": 512,  # longer prompts drop their oldest history items (never the target)
}

# the `samples:` section of the TALLRec protocol
TALLREC_SAMPLES = {
    "history_len": 10,
    "split": [0.8, 0.1, 0.1],
    "valid_size": 128,  # valid samples used for early stopping / reporting (0 = all)
    "test_size": 1000,  # test samples scored (0 = all)
    "subset_seed": 0,  # fixed: every method and seed sees the same valid/test subsets
}

# the `data_protocol:` section of the CoLLM protocol
COLLM_PROTOCOL = {
    "history_len": 10,  # last L liked items in the prompt
    "min_history": 0,  # the reference keeps samples with an empty history
    "split": [0.8, 0.1, 0.1],
    "split_by": "time",  # "time" (cut the time axis, as the reference) or "count"
    "max_train": None,  # int: few-shot sample of the training samples (seeded); None = all
    "max_valid": 200,  # valid cases, a uniform random draw of the valid period (warm and cold together); None = all
    "max_test_warm": None,  # bounded test set: warm cases / cold cases / per user; None = all
    "max_test_cold": None,
    "max_per_user": None,
    "eval_seed": 0,  # the draw of the bounded valid/test sets (fixed across methods and training seeds)
}
COLLM_NULLABLE = {f"data_protocol.{k}": 0 for k in ("max_train", "max_valid", "max_test_warm", "max_test_cold",
                                                      "max_per_user")}


@dataclass
class CTRSamples:
    """Samples of one CTR protocol. Frames have columns user, item, label, timestamp, history (tuple of
    item ids, oldest first), history_labels; valid/test also warm, warm_user, warm_item.

    `train_all` holds every training-period sample (what a CF model is pre-trained on, the pool that
    few-shot draws come from); `train` is the part an LLM is tuned on (= train_all unless the protocol
    draws a few-shot set); valid/test are the bounded draws that are scored, *_full the whole periods."""

    train_all: pd.DataFrame
    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame
    valid_full: pd.DataFrame
    test_full: pd.DataFrame
    history_len: int = 10

    def sizes(self) -> dict:
        return {"train": len(self.train_all), "valid": len(self.valid_full), "test": len(self.test_full)}

    def summary(self) -> dict:
        def part(frame):
            warm = int(frame["warm"].sum()) if "warm" in frame else None
            return {"samples": len(frame), "users": int(frame["user"].nunique()),
                    "positives": int(frame["label"].sum()), "warm": warm,
                    "cold": None if warm is None else len(frame) - warm}

        return {name: part(getattr(self, name)) for name in ("train_all", "train", "valid", "test", "valid_full",
                                                             "test_full")}


# ------------------------------------------------------------------------------------------ protocols
def tallrec_protocol(ds: Dataset, cfg: Mapping, liked_history_only: bool = False) -> CTRSamples:
    history_len = int(cfg.get("history_len", 10))
    samples = history_samples(ds, history_len, liked_history_only=liked_history_only)
    if samples.empty:
        raise InputError(f"{ds.name}: no user has more than samples.history_len={history_len} interactions; "
                         "nothing to build samples from")
    fractions = list(cfg.get("split", [0.8, 0.1, 0.1]))
    split = temporal_split(samples, tuple(fractions), by="count").require_parts(f"samples.split {fractions}")
    seed = int(cfg.get("subset_seed", 0))
    valid = mark_warm_cold(draw(split.valid, int(cfg.get("valid_size", 0)), seed), split.train)
    test = mark_warm_cold(draw(split.test, int(cfg.get("test_size", 0)), seed), split.train)
    return CTRSamples(split.train, split.train, valid, test, split.valid, split.test, history_len)


def collm_protocol(ds: Dataset, cfg: Mapping, seed: int) -> CTRSamples:
    """`seed` draws the few-shot training set (`max_train`); the evaluation draw uses `eval_seed`."""
    check_collm_protocol(cfg)
    samples = history_samples(ds, cfg["history_len"], min_history=cfg["min_history"], liked_history_only=True)
    if samples.empty:
        raise InputError(f"{ds.name}: no samples with at least {cfg['min_history']} liked earlier items")
    split = temporal_split(samples, tuple(cfg["split"]), by=cfg["split_by"]).require_parts(
        f"data_protocol.split {cfg['split']}")
    valid = mark_warm_cold(split.valid, split.train, include_history=False)
    test = mark_warm_cold(split.test, split.train, include_history=False)
    eval_seed = int(cfg["eval_seed"])
    # uniform, not by user like the test cases: a small by-user draw came from one or two heavy users (64
    # samples of 2 users in a CoLLM run), so early stopping and the checkpoint choice followed noise
    valid_small = draw(valid, cfg["max_valid"] or 0, eval_seed)
    test_small = bounded(test, cfg["max_test_warm"], cfg["max_test_cold"], cfg["max_per_user"], eval_seed + 1)
    train = few_shot(split.train, cfg["max_train"], seed)
    return CTRSamples(split.train, train, valid_small, test_small, valid, test, cfg["history_len"])


# ---------------------------------------------------------------------------------- item domains
def domain_datasets(ds: Dataset, specs: Sequence[str], config_data: Mapping) -> list[tuple[str, Dataset]]:
    """Item domains for the cross-domain protocol.

    "genre:A|B|C": the run's dataset restricted to items with any of these categories; items that fall in
    more than one listed genre domain are dropped from all of them (domains are disjoint).
    Anything else: a dataset name or path, loaded like --dataset (same data.* options)."""
    from recalign.data import load_dataset

    genre_sets = {}
    for spec in specs:
        if spec.startswith("genre:"):
            wanted = {g.strip() for g in spec[len("genre:"):].split("|") if g.strip()}
            known = {g for cats in ds.items["categories"] for g in cats}
            unknown = sorted(wanted - known)
            if unknown or not wanted:
                raise InputError(f"cross.domains: {spec!r} names unknown genre(s) {', '.join(unknown) or '(none)'}; "
                                 f"known: {', '.join(sorted(known))}")
            genre_sets[spec] = {i for i, cats in enumerate(ds.items["categories"]) if wanted & set(cats)}
    counts: dict[int, int] = {}
    for items in genre_sets.values():
        for i in items:
            counts[i] = counts.get(i, 0) + 1
    out = []
    for spec in specs:
        if spec in genre_sets:
            items = np.array(sorted(i for i in genre_sets[spec] if counts[i] == 1))
            out.append((spec, ds.subset_items(items, name=f"{ds.name}[{spec}]")))
        else:
            out.append((spec, load_dataset(spec, fmt=config_data.get("format"),
                                           like_threshold=config_data.get("like_threshold"),
                                           k_core_users=config_data.get("k_core_users", 0),
                                           k_core_items=config_data.get("k_core_items", 0),
                                           domain=config_data.get("domain"))))
    return out


# ------------------------------------------------------------------------------------ bounded draws
def draw(frame: pd.DataFrame, size: int, seed: int) -> pd.DataFrame:
    """A random subset of `size` rows drawn with `seed`, kept in their original order (all when size <= 0)."""
    if size <= 0 or size >= len(frame):
        return frame.reset_index(drop=True)
    rng = np.random.default_rng(seed)
    return frame.iloc[np.sort(rng.choice(len(frame), size=size, replace=False))].reset_index(drop=True)


def fewer_than_asked(config: dict, shots: int, valid: int, test: int) -> list[str]:
    """Warnings when the data hold fewer training samples (`train.shots`) or valid / test cases
    (`samples.valid_size` / `test_size`) than the config asks for (0 asks for all)."""
    asked = [("train.shots", config.get("train", {}).get("shots", 0), shots, "the training period", "samples"),
             ("samples.valid_size", config["samples"].get("valid_size", 0), valid, "the valid period", "cases"),
             ("samples.test_size", config["samples"].get("test_size", 0), test, "the test period", "cases")]
    return [f"{key}={want} but {where} holds {got} {what}; all of them were used"
            for key, want, got, where, what in asked if 0 < want and got < want]


def bounded(frame: pd.DataFrame, max_warm: int | None, max_cold: int | None, max_per_user: int | None,
            seed: int) -> pd.DataFrame:
    """Warm and cold cases drawn separately (max_cold None with max_warm set: one cap for both together)."""
    if max_warm is None and max_cold is None and max_per_user is None:
        return frame.reset_index(drop=True)
    rng = np.random.default_rng(seed)
    if max_cold is None and max_warm is not None:
        parts = [draw_by_user(frame, max_warm, max_per_user, rng)]
    else:
        parts = [draw_by_user(frame[frame["warm"]], max_warm, max_per_user, rng),
                 draw_by_user(frame[~frame["warm"]], max_cold, max_per_user, rng)]
    out = pd.concat(parts)
    return out.sort_values(["timestamp", "user"], kind="stable").reset_index(drop=True)


def draw_by_user(frame: pd.DataFrame, max_samples: int | None, max_per_user: int | None,
                 rng: np.random.Generator) -> pd.DataFrame:
    """Users in random order; from each, up to `max_per_user` random cases; stop at `max_samples`."""
    chosen = []
    total = 0
    groups = dict(tuple(frame.groupby("user", sort=True)))
    for user in rng.permutation(sorted(groups)):
        rows = groups[user].index.to_numpy()
        if max_per_user is not None and len(rows) > max_per_user:
            rows = np.sort(rng.choice(rows, size=max_per_user, replace=False))
        if max_samples is not None and total + len(rows) > max_samples:
            rows = rows[: max_samples - total]
        chosen.append(rows)
        total += len(rows)
        if max_samples is not None and total >= max_samples:
            break
    index = np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)
    return frame.loc[index]


# ------------------------------------------------------------------------------------------- metrics
def ctr_report(frame: pd.DataFrame, scores, intervals: bool = True) -> dict:
    """auc, uauc (+ skipped users) on all samples and the `_warm` / `_cold` variants, with the counts, and
    (`intervals`) 95% bootstrap intervals `auc_ci`, `uauc_ci` (`eval.intervals`: cases / users resampled)."""
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) != len(frame):
        raise InputError(f"ctr_report: {len(scores)} scores for {len(frame)} samples")
    users, labels = frame["user"].to_numpy(), frame["label"].to_numpy(bool)

    def metrics(mask, suffix: str = "") -> dict:
        out = ctr_metrics(users[mask], labels[mask], scores[mask], suffix)
        if intervals:
            out[f"auc{suffix}_ci"] = auc_interval(labels[mask], scores[mask])
            out[f"uauc{suffix}_ci"] = uauc_interval(users[mask], labels[mask], scores[mask])
        return out

    out = metrics(np.ones(len(frame), dtype=bool))
    if "warm" in frame:
        warm = frame["warm"].to_numpy(bool)
        for suffix, mask in (("_warm", warm), ("_cold", ~warm)):
            if mask.any():
                out.update(metrics(mask, suffix))
            else:
                out.update({f"auc{suffix}": float("nan"), f"uauc{suffix}": float("nan"),
                            f"uauc_skipped_users{suffix}": 0})
                if intervals:  # undefined, said as null like any other undefined interval
                    out.update({f"auc{suffix}_ci": None, f"uauc{suffix}_ci": None})
        out["n_warm"], out["n_cold"] = int(warm.sum()), int((~warm).sum())
    out["n"] = len(frame)
    return out


def paired_ctr_report(frame: pd.DataFrame, scores_a, scores_b) -> dict:
    """a - b on the same samples: AUC and UAUC differences with paired 95% intervals (`eval.intervals`: the
    same resamples for both models), on all samples and on the warm / cold slices when the frame has them."""
    users, labels = frame["user"].to_numpy(), frame["label"].to_numpy(bool)
    a, b = np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)
    slices = {"": np.ones(len(frame), dtype=bool)}
    if "warm" in frame:
        warm = frame["warm"].to_numpy(bool)
        slices.update({"_warm": warm, "_cold": ~warm})
    out = {}
    for suffix, mask in slices.items():
        if mask.any():
            out[f"auc{suffix}"] = paired_auc_difference(labels[mask], a[mask], b[mask])
            out[f"uauc{suffix}"] = paired_uauc_difference(users[mask], labels[mask], a[mask], b[mask])
    return out


def counting_baselines(train: pd.DataFrame, frame: pd.DataFrame, prior_weight: float = 5.0) -> dict[str, np.ndarray]:
    """Scores that learn nothing but counts: the floor a Yes/No LLM should clear on the same samples.

    - `history_like_ratio`: the share of liked items in the sample's history, Laplace-smoothed (the user's
      leniency; TALLRec's prompt states it as the liked and disliked lists). Needs `history_labels`; left
      out for liked-only histories (CoLLM's), where it is constant.
    - `item_like_rate`: the item's share of likes among the `train` samples, shrunk toward the overall rate
      by `prior_weight` pseudo-samples (an item never seen in training gets the overall rate).
    - `ratio_plus_rate`: the sum of the two log-odds."""
    overall = float(train["label"].mean()) if len(train) else 0.5
    counts = train.groupby("item")["label"].agg(["sum", "count"])
    rate = ((counts["sum"] + prior_weight * overall) / (counts["count"] + prior_weight))
    item_rate = rate.reindex(frame["item"].to_numpy()).fillna(overall).to_numpy(np.float64)
    out = {"item_like_rate": item_rate}
    if "history_labels" in frame and frame["history_labels"].map(lambda h: not all(h)).any():  # dislikes shown
        liked = frame["history_labels"].map(lambda h: sum(bool(x) for x in h)).to_numpy(np.float64)
        total = frame["history_labels"].map(len).to_numpy(np.float64)
        ratio = (liked + 1.0) / (total + 2.0)
        out["history_like_ratio"] = ratio
        item_clipped = np.clip(item_rate, 1e-6, 1 - 1e-6)
        out["ratio_plus_rate"] = np.log(ratio / (1 - ratio)) + np.log(item_clipped / (1 - item_clipped))
    return out


def counting_rows(floor: dict[str, np.ndarray], frame: pd.DataFrame) -> dict:
    """A run's `baselines` entries for `counting_baselines` scores: their test metrics, marked `counting` (the
    reproduce report lists them once per table)."""
    return {name: {"test": ctr_report(frame, scores), "counting": True} for name, scores in floor.items()}


def paired_with_counting(name: str, frame: pd.DataFrame, scores, floor: dict[str, np.ndarray]) -> dict:
    """`name - <baseline>` for each counting baseline: AUC / UAUC differences on the same samples, paired."""
    return {f"{name} - {ref}": paired_ctr_report(frame, scores, other) for ref, other in floor.items()}


def summary_line(metrics: dict) -> str:
    """auc / uauc (and the warm / cold AUCs) of a `ctr_report`, for a log line."""
    return (f"auc {metrics['auc']:.4f} uauc {metrics['uauc']:.4f}"
            + (f" | warm auc {metrics['auc_warm']:.4f} cold auc {metrics['auc_cold']:.4f}"
               if "auc_warm" in metrics else ""))


def valid_auc(frame: pd.DataFrame, scores) -> float:
    """AUC for early stopping: a one-class valid set gives no signal and scores 0 (the first state is kept)."""
    value = auc(frame["label"].to_numpy(bool), scores)
    return 0.0 if value != value else value


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std over training seeds (NaN entries ignored)."""
    arr = np.asarray([v for v in values if v is not None and not np.isnan(v)], dtype=np.float64)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


# -------------------------------------------------------------------------------------- validation
def check_split(split, where: str) -> None:
    if (not isinstance(split, list) or len(split) != 3
            or any(isinstance(f, bool) or not isinstance(f, (int, float)) or f <= 0 for f in split)
            or abs(sum(split) - 1) > 1e-6):
        raise InputError(f"{where}: expected three positive fractions (train, valid, test) summing to 1, got {split!r}")


def check_tallrec_samples(samples: Mapping, where: str = "samples") -> None:
    if samples["history_len"] < 1:
        raise InputError(f"{where}.history_len must be >= 1, got {samples['history_len']}")
    for key in ("valid_size", "test_size"):
        if samples[key] < 0:
            raise InputError(f"{where}.{key} must be >= 0 (0 = all), got {samples[key]}")
    check_split(samples["split"], f"{where}.split")


def check_collm_protocol(cfg: Mapping, where: str = "data_protocol") -> None:
    if not isinstance(cfg["history_len"], int) or cfg["history_len"] < 1:
        raise InputError(f"{where}.history_len: expected an integer >= 1, got {cfg['history_len']!r}")
    if not isinstance(cfg["min_history"], int) or cfg["min_history"] < 0:
        raise InputError(f"{where}.min_history: expected an integer >= 0, got {cfg['min_history']!r}")
    for key in ("max_train", "max_valid", "max_test_warm", "max_test_cold", "max_per_user"):
        value = cfg[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InputError(f"{where}.{key}: expected a positive integer or null, got {value!r}")
    if cfg["split_by"] not in ("time", "count"):
        raise InputError(f"{where}.split_by: expected 'time' or 'count', got {cfg['split_by']!r}")
    check_seed(cfg["eval_seed"], f"{where}.eval_seed", top=2**32 - 2)  # the warm/cold draw uses eval_seed + 1
    check_split(cfg["split"], f"{where}.split")
