"""What a method needs from a dataset, checked once before anything is trained or written.

    warnings = check_dataset(ds, Needs.leave_one_out())   # raises InputError naming every unmet need

`degeneracy(ds, needs)` returns the report without raising: `problems` (the method cannot give a
meaningful result: no positives for AUC, one item to rank, no user long enough to hold out) and
`warnings` (valid but thin: one evaluable user, a catalogue no bigger than k) for metrics.json/report.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from recalign.data.dataset import Dataset
from recalign.errors import InputError


@dataclass(frozen=True)
class Needs:
    """The least a method needs; the defaults ask for nothing beyond one interaction."""

    min_users: int = 1
    min_items: int = 1
    positives: bool = False  # at least one interaction with rating > like_threshold
    negatives: bool = False  # at least one with rating <= like_threshold (with positives: both labels)
    min_user_interactions: int = 0  # at least one user with this many (leave-one-out: 3)
    min_history: int = 0  # at least one interaction with this many earlier ones of its user
    liked_history: bool = False  # ...counting liked earlier interactions only (CoLLM)
    top_k: int = 0  # ranking metrics @k: warn when the catalogue is not larger than k

    @classmethod
    def leave_one_out(cls, min_interactions: int = 3, top_k: int = 10) -> "Needs":
        """Full ranking on the last interaction of each user with >= `min_interactions` (CF protocol)."""
        return cls(min_items=2, min_user_interactions=min_interactions, top_k=top_k)

    @classmethod
    def ctr(cls, history_len: int = 10, min_history: int | None = None, liked_history: bool = False) -> "Needs":
        """AUC/UAUC on history samples (TALLRec, CoLLM, CF with protocol=ctr): both labels present."""
        return cls(min_items=2, positives=True, negatives=True,
                   min_history=history_len if min_history is None else min_history, liked_history=liked_history)

    @classmethod
    def next_item(cls, history_len: int = 10, liked_targets: bool = False, top_k: int = 10) -> "Needs":
        """Next-item ranking on history samples (BIGRec); `liked_targets` when only liked targets count."""
        return cls(min_items=2, positives=liked_targets, min_history=history_len, top_k=top_k)


@dataclass
class Degeneracy:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.problems)


def degeneracy(ds: Dataset, needs: Needs = Needs()) -> Degeneracy:
    """Every unmet need (problems) and every thin-but-valid property (warnings) of `ds` for `needs`."""
    inter = ds.interactions
    report = Degeneracy()
    n_pos = int(inter["label"].sum())
    n_neg = len(inter) - n_pos
    threshold = f"{ds.like_threshold:g}"
    ratings = f"ratings {inter['rating'].min():g}..{inter['rating'].max():g}" if len(inter) else "no ratings"
    if ds.n_users < needs.min_users:
        report.problems.append(f"{ds.n_users} user(s), at least {needs.min_users} needed")
    if ds.n_items < needs.min_items:
        report.problems.append(f"{ds.n_items} item(s), at least {needs.min_items} needed to rank or compare items")
    if (needs.positives or needs.liked_history) and n_pos == 0:
        report.problems.append(f"no positives (rating > {threshold}) among {len(inter)} interactions ({ratings}): "
                               f"lower data.like_threshold")
    if needs.negatives and n_neg == 0:
        report.problems.append(f"no negatives (rating <= {threshold}) among {len(inter)} interactions ({ratings}): "
                               f"with one label AUC is undefined, raise data.like_threshold")
    if needs.min_user_interactions:
        counts = inter.groupby("user").size()
        eligible = int((counts >= needs.min_user_interactions).sum())
        if eligible == 0:
            report.problems.append(f"no user has {needs.min_user_interactions} or more interactions (most: "
                                   f"{int(counts.max()) if len(counts) else 0}): leave-one-out needs "
                                   f"{needs.min_user_interactions} (train, valid, test)")
        elif eligible == 1:
            report.warnings.append(f"1 user with {needs.min_user_interactions} or more interactions: "
                                   f"test metrics rest on a single user")
    if needs.min_history and not (needs.liked_history and n_pos == 0):
        problem = samples_problem(ds, needs.min_history, needs.liked_history)
        if problem:
            report.problems.append(problem)
    if needs.top_k and 1 < ds.n_items <= needs.top_k:
        report.warnings.append(f"{ds.n_items} items, not more than k={needs.top_k}: every top-K list with K >= "
                               f"{ds.n_items} holds the whole catalogue, so hr@K (recall@K) is 1 by construction for those K")
    if ds.n_users == 1 and not needs.min_user_interactions:
        report.warnings.append("1 user: metrics rest on a single user")
    return report


def check_dataset(ds: Dataset, needs: Needs = Needs()) -> list[str]:
    """Raise one InputError listing every unmet need of `needs`; return the warnings (possibly empty)."""
    report = degeneracy(ds, needs)
    if report.problems:
        raise InputError(f"{describe(ds)}: " + "; ".join(report.problems))
    return report.warnings


def describe(ds: Dataset) -> str:
    """The dataset as the user named it: `ml-100k`, or `tiny (data/tiny)` for one read from a path."""
    from recalign.data.registry import EMBEDDED

    return ds.name if ds.name in EMBEDDED or not ds.source or ds.source == ds.name else f"{ds.name} ({ds.source})"


def samples_problem(ds: Dataset, min_history: int, liked_history: bool = False) -> str | None:
    """Why no interaction has `min_history` earlier (liked) interactions of its user; None when one has."""
    inter = ds.interactions
    if liked_history:
        labels = inter["label"].astype(np.int64)
        earlier = labels.groupby(inter["user"]).cumsum() - labels
        if int(labels.sum()) == 0:
            return (f"no positives (rating > {ds.like_threshold:g}): liked-item histories need liked items, "
                    f"lower data.like_threshold")
    else:
        earlier = inter.groupby("user").cumcount()
    longest = int(earlier.max()) if len(earlier) else 0
    if longest >= min_history:
        return None
    kind = "liked " if liked_history else ""
    return (f"no interaction has {min_history} earlier {kind}interactions of its user (longest: {longest}): "
            f"lower the method's history length (samples.history_len, or data_protocol.min_history for CoLLM and "
            f"Soft-Prompt) or use a denser dataset")
