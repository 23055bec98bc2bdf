"""CoLLM's CTR protocol: samples, temporal split by interaction time, warm/cold marking, bounded sets,
and AUC/UAUC on all / warm / cold.

Follows the CoLLM reference (zyang1580/CoLLM, dataset/ml-1m/processing_ood.ipynb):
- every interaction of a user is a sample (also those with an empty history); label = rating > threshold;
- history = the user's earlier *liked* items, the last `history_len` of them (the reference keeps all
  and truncates to 10 when it renders the prompt);
- split on the calendar time axis (the reference cuts ML-1M's last 20 months into 10/5/5 months), here
  `temporal_split(..., by="time")` with 80/10/10 of the span between the first and last interaction;
- warm = the user and the item both occur in the training samples (reference: `not_cold`); cold = otherwise.

Running an LLM over every test sample is too slow on a CPU, so the evaluation sets can be bounded:
warm and cold cases are drawn separately (whole users in random order, at most `max_per_user` cases each)
so both groups keep enough cases and users for AUC and UAUC. Every method of a comparison sees the same
cases (the draw depends only on the protocol config and the seed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from recalign.data import Dataset, Split, few_shot, history_samples, mark_warm_cold, temporal_split
from recalign.errors import InputError
from recalign.eval import ctr_metrics

PROTOCOL_DEFAULTS = {
    "history_len": 10,  # last L liked items in the prompt
    "min_history": 0,  # the reference keeps samples with an empty history
    "split": [0.8, 0.1, 0.1],
    "split_by": "time",  # "time" (cut the time axis, as the reference) or "count"
    "max_train": None,  # int: few-shot sample of the training samples (seeded); None = all
    "max_valid": 200,  # valid cases (drawn like the test cases, warm and cold together); None = all
    "max_test_warm": None,  # bounded test set: warm cases / cold cases / per user; None = all
    "max_test_cold": None,
    "max_per_user": None,
    "eval_seed": 0,  # the draw of the bounded valid/test sets (fixed across methods and training seeds)
}


@dataclass
class CTRData:
    """Training, validation and test samples of the CTR protocol.

    `train_all` holds every training sample (what a CF model is pre-trained on); `train` is the
    (optionally few-shot) part the LLM is tuned on. valid/test carry `warm`, `warm_user`, `warm_item`."""

    train_all: pd.DataFrame
    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame
    valid_full: pd.DataFrame
    test_full: pd.DataFrame
    history_len: int = 10

    def summary(self) -> dict:
        def part(frame):
            warm = int(frame["warm"].sum()) if "warm" in frame else None
            return {"samples": len(frame), "users": int(frame["user"].nunique()),
                    "positives": int(frame["label"].sum()), "warm": warm,
                    "cold": None if warm is None else len(frame) - warm}

        return {"train_all": part(self.train_all), "train": part(self.train), "valid": part(self.valid),
                "test": part(self.test), "valid_full": part(self.valid_full), "test_full": part(self.test_full)}


def check_protocol(cfg: dict, where: str = "data_protocol") -> None:
    for key in ("history_len",):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise InputError(f"{where}.{key}: expected an integer >= 1, got {cfg[key]!r}")
    if not isinstance(cfg["min_history"], int) or cfg["min_history"] < 0:
        raise InputError(f"{where}.min_history: expected an integer >= 0, got {cfg['min_history']!r}")
    for key in ("max_train", "max_valid", "max_test_warm", "max_test_cold", "max_per_user"):
        value = cfg[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InputError(f"{where}.{key}: expected a positive integer or null, got {value!r}")
    if cfg["split_by"] not in ("time", "count"):
        raise InputError(f"{where}.split_by: expected 'time' or 'count', got {cfg['split_by']!r}")
    split = cfg["split"]
    if (not isinstance(split, list) or len(split) != 3
            or any(isinstance(f, bool) or not isinstance(f, (int, float)) or f < 0 for f in split)
            or abs(sum(split) - 1) > 1e-6):
        raise InputError(f"{where}.split: expected three non-negative fractions summing to 1, got {split!r}")


def build_ctr_data(ds: Dataset, cfg: dict, seed: int) -> CTRData:
    """Samples -> temporal split -> warm/cold marks -> bounded sets. `seed` draws the few-shot train set."""
    check_protocol(cfg)
    samples = history_samples(ds, cfg["history_len"], min_history=cfg["min_history"], liked_history_only=True)
    if samples.empty:
        raise InputError(f"{ds.name}: no samples with at least {cfg['min_history']} liked earlier items")
    split: Split = temporal_split(samples, tuple(cfg["split"]), by=cfg["split_by"])
    for name in ("train", "valid", "test"):
        if getattr(split, name).empty:
            raise InputError(f"{ds.name}: the {name} part of the temporal split {cfg['split']} is empty")
    valid = mark_warm_cold(split.valid, split.train, include_history=False)
    test = mark_warm_cold(split.test, split.train, include_history=False)
    rng_seed = int(cfg["eval_seed"])
    valid_small = bounded(valid, cfg["max_valid"], None, cfg["max_per_user"], rng_seed)
    test_small = bounded(test, cfg["max_test_warm"], cfg["max_test_cold"], cfg["max_per_user"], rng_seed + 1)
    train = few_shot(split.train, cfg["max_train"], seed)
    return CTRData(split.train, train, valid_small, test_small, valid, test, cfg["history_len"])


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


def warm_cold_metrics(frame: pd.DataFrame, scores) -> dict:
    """auc, uauc (+ skipped users) on all cases, and the `_warm` / `_cold` variants."""
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) != len(frame):
        raise InputError(f"warm_cold_metrics: {len(scores)} scores for {len(frame)} cases")
    users, labels = frame["user"].to_numpy(), frame["label"].to_numpy(bool)
    out = ctr_metrics(users, labels, scores)
    if "warm" in frame:
        warm = frame["warm"].to_numpy(bool)
        for suffix, mask in (("_warm", warm), ("_cold", ~warm)):
            if mask.any():
                out.update(ctr_metrics(users[mask], labels[mask], scores[mask], suffix))
            else:
                out.update({f"auc{suffix}": float("nan"), f"uauc{suffix}": float("nan"),
                            f"uauc_skipped_users{suffix}": 0})
        out["n_warm"] = int(warm.sum())
        out["n_cold"] = int((~warm).sum())
    out["n"] = len(frame)
    return out
