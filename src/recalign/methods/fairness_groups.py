"""Group fairness audit for any recommender: does recommendation quality differ between real user groups?

FaiRLLM's SNSR / SNSV taken from prompted attributes to the users a dataset records (ML-100K `u.user`:
gender, age band, occupation) and to one group every dataset has: `activity` (users in thirds by their
number of interactions). Two sources of per-user results:
- `source.recommender`: any CF model of the registry (`recalign methods`), trained here under the
  leave-one-out protocol of the CF methods (last interaction = test, second to last = valid, full ranking,
  history masked); per test user NDCG@K, HR@K and the mean training popularity (log(1 + count)) of the K
  items recommended — whether some groups get more mainstream lists.
- `source.run`: a finished run directory of this dataset with per-case results: ICL's `predictions.json`
  (user, label, score -> per-user AUC, grouped = group UAUC) or BIGRec's `cases-test.json` (user, rank ->
  NDCG@K, HR@K). TALLRec, CoLLM and Soft-Prompt runs do not write per-case files yet.

Per attribute and metric: per group n, mean and a percentile bootstrap interval; SNSR (max - min of the
group means) and SNSV (their std) over groups with at least `groups.min_size` users; and a permutation
test (group labels shuffled, sizes kept) giving p and the SNSR that noise alone produces, so that a gap is
not called unfair when it is noise. Reported (`test`): the overall metrics, `METRIC_snsr_ATTRIBUTE`,
`METRIC_snsv_ATTRIBUTE`, `METRIC_p_ATTRIBUTE`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from recalign.data import canonical_dataset
from recalign.errors import InputError
from recalign.eval.fairness import group_means, permutation_spread
from recalign.eval.intervals import mean_interval
from recalign.eval.metrics import auc, ndcg_per_case, target_ranks
from recalign.io import per_case_file, read_per_case
from recalign.methods.api import Experiment, Method, RunContext
from recalign.report.fairness import group_audit_markdown
from recalign.tasks.fairness import AGE_BANDS, activity_groups, age_labels, check_age_bands, user_groups

DEFAULTS = {
    "source": {
        "recommender": "mf",  # a CF model name, trained here (leave-one-out); "" when `run` is given
        "run": "",  # a finished run directory with predictions.json (ICL) or cases-test.json (BIGRec)
    },
    "groups": {
        "attributes": ["gender", "age", "occupation", "activity"],  # user-table columns, or activity
        "age_bands": list(AGE_BANDS),  # band starts: <18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+
        "min_size": 20,  # groups with fewer users are reported but left out of SNSR / SNSV / p
        "bootstrap": 1000,
        "permutations": 1000,
    },
    "eval": {"k": 10, "batch_size": 1024},
    # the CF trainer's keys for `source.recommender` (0 = the model's default / no time limit)
    "cf_train": {"epochs": 0, "max_minutes": 0.0},
}


def validate(cfg: dict) -> None:
    src, groups = cfg["source"], cfg["groups"]
    if bool(src["recommender"]) == bool(src["run"]):
        raise InputError("source: give exactly one of source.recommender (a CF model) and source.run (a run "
                         f"directory); got recommender={src['recommender']!r}, run={src['run']!r}")
    if src["recommender"]:
        from recalign.cf import MODELS

        if src["recommender"] not in MODELS:
            raise InputError(f"source.recommender: unknown CF model {src['recommender']!r}; known: "
                             f"{', '.join(MODELS)}")
    else:
        source_file(src["run"])
    attributes = groups["attributes"]
    if not isinstance(attributes, list) or not attributes or not all(isinstance(a, str) and a for a in attributes):
        raise InputError(f"groups.attributes: expected a non-empty list of user attributes, got {attributes!r}")
    check_age_bands(groups["age_bands"])
    for key in ("min_size", "bootstrap", "permutations"):
        if groups[key] < 0:
            raise InputError(f"groups.{key}: expected an integer >= 0, got {groups[key]}")
    if cfg["eval"]["k"] < 1 or cfg["eval"]["batch_size"] < 1:
        raise InputError(f"eval.k and eval.batch_size must be >= 1, got {cfg['eval']['k']}, {cfg['eval']['batch_size']}")


def source_file(run: str) -> Path:
    """`source.run`'s per-case results file (`io.per_case_file`)."""
    try:
        return per_case_file(run)
    except InputError as exc:
        raise InputError(f"source.run: {exc}") from None


# --------------------------------------------------------------------------------- per-user results
def from_recommender(ctx: RunContext) -> tuple[np.ndarray, dict[str, np.ndarray], str]:
    """Leave-one-out with a CF model: (users, {metric: per-user values}, a note on the source)."""
    import torch

    from recalign.cf import leave_one_out_sets, train_cf_model
    from recalign.cf.evaluate import score_cases

    cfg, ds = ctx.config, ctx.dataset
    name, k = cfg["source"]["recommender"], int(cfg["eval"]["k"])
    data, valid, test = leave_one_out_sets(ds.interactions, ds.n_users, ds.n_items)
    train_cfg = {key: value for key, value in cfg["cf_train"].items() if value}
    model = train_cf_model(name, data, {"train": train_cfg}, catalog=ds, valid=valid, run=ctx.run,
                           checkpoint=f"cf-{name}", seed=ctx.seed, log=lambda m: ctx.log(f"{name}: {m}"))
    ranks, tops = [], []
    for rows, scores, mask in score_cases(model, test, int(cfg["eval"]["batch_size"])):
        ranks.append(target_ranks(scores, torch.from_numpy(test.targets[rows]), mask).numpy())
        tops.append(scores.float().masked_fill(mask, float("-inf")).topk(min(k, ds.n_items), dim=1).indices.numpy())
    ranks, tops = np.concatenate(ranks), np.concatenate(tops)
    counts = np.bincount(data.items, minlength=ds.n_items)  # training popularity of each item
    popularity = np.log1p(counts)[tops].mean(axis=1)
    per_user = {f"ndcg@{k}": ndcg_per_case(ranks, k),
                f"hr@{k}": (ranks < k).astype(np.float64), f"popularity@{k}": popularity}
    return test.users, per_user, f"{name} trained here (leave-one-out, {len(test)} test users)"


def from_run(ctx: RunContext) -> tuple[np.ndarray, dict[str, np.ndarray], str]:
    ds, k = ctx.dataset, int(ctx.config["eval"]["k"])
    path = source_file(ctx.config["source"]["run"])
    origin = (path.parent / "config.yaml").read_text().rstrip().splitlines()[-1] if (path.parent / "config.yaml").is_file() else ""
    recorded = origin[len("# run: "):].partition(" on ")[2]
    if origin.startswith("# run: ") and canonical_dataset(recorded) != canonical_dataset(ctx.dataset_name):
        raise InputError(f"source.run: {path.parent} is a run on another dataset ({origin[7:]}); "
                         f"this audit is on {ctx.dataset_name}")
    kind, data = read_per_case(path)
    method = json.loads((path.parent / "metrics.json").read_text()).get("method", "?")
    if kind == "scores":
        users = np.asarray(data["user"], dtype=np.int64)
        labels, scores = np.asarray(data["label"], dtype=bool), np.asarray(data["score"], dtype=np.float64)
        _check_users(users, ds, path)
        unique = np.unique(users)
        values = np.array([auc(labels[users == u], scores[users == u]) if 0 < labels[users == u].sum() < (users == u).sum()
                           else np.nan for u in unique])
        # the mean of per-user AUCs is the run's UAUC (users with both labels), not its AUC
        return unique, {"uauc": values}, f"{method} run {path.parent} (per-user AUC)"
    users, ranks = np.asarray(data["user"], dtype=np.int64), np.asarray(data["rank"], dtype=np.float64)
    _check_users(users, ds, path)
    per_case = {f"ndcg@{k}": np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0),
                f"hr@{k}": (ranks < k).astype(np.float64)}
    return users, per_case, f"{method} run {path.parent} ({len(users)} test cases)"


def _check_users(users: np.ndarray, ds, path: Path) -> None:
    if users.size == 0:
        raise InputError(f"{path}: no cases")
    if users.min() < 0 or users.max() >= ds.n_users:
        raise InputError(f"{path}: user ids outside this dataset's {ds.n_users} users (a run on another dataset?)")


# ---------------------------------------------------------------------------------------------- run
def run(ctx: RunContext) -> dict:
    cfg, ds = ctx.config, ctx.dataset
    g = cfg["groups"]
    labels = {a: user_groups(ds, a, g["age_bands"]) for a in g["attributes"] if a != "activity"}  # checks names
    started = time.perf_counter()
    users, per_user, note = from_recommender(ctx) if cfg["source"]["recommender"] else from_run(ctx)
    ctx.log(f"group audit of {note}")
    activity = np.bincount(ds.interactions["user"].to_numpy(), minlength=ds.n_users)[users].astype(np.float64)
    out_groups, test, warnings = {}, {name: float(np.nanmean(v)) for name, v in per_user.items()}, []
    test.update({f"{name}_ci": mean_interval(v[~np.isnan(v)], seed=ctx.seed) for name, v in per_user.items()})
    for attribute in g["attributes"]:
        group_of = activity_groups(activity) if attribute == "activity" else labels[attribute][users]
        out_groups[attribute] = {}
        for metric, values in per_user.items():
            order = age_labels(g["age_bands"]) if attribute == "age" else ["low", "mid", "high"]
            table = group_means(values, group_of, int(g["bootstrap"]), ctx.seed, order=order)
            big = {name for name, entry in table.items() if entry["n"] >= int(g["min_size"])}
            keep = np.array([x in big for x in group_of], dtype=bool)
            spread = permutation_spread(values[keep], group_of[keep], int(g["permutations"]), ctx.seed)
            spread["groups_compared"] = len(big)
            if len(big) < 2 and metric == next(iter(per_user)):  # once per attribute
                sizes = ", ".join(f"{name} {entry['n']}" for name, entry in table.items())
                warnings.append(f"{attribute}: fewer than two groups have groups.min_size={g['min_size']} users ({sizes}): "
                                f"its SNSR/SNSV are undefined; lower groups.min_size or audit more users")
            out_groups[attribute][metric] = {"groups": table, "spread": spread}
            test[f"{metric}_snsr_{attribute}"] = spread["snsr"]
            test[f"{metric}_snsv_{attribute}"] = spread["snsv"]
            test[f"{metric}_p_{attribute}"] = spread.get("p_snsr", float("nan"))
    defined = int(np.sum(~np.isnan(next(iter(per_user.values())))))  # users with a value (UAUC: both labels)
    return {"test": {**test, "n": defined}, "valid": {}, "warnings": warnings, "groups": out_groups,
            "source_note": note, "users": int(len(users)), "seconds": {"train": 0.0, "eval": time.perf_counter() - started}}


def _report(metrics: dict) -> str:
    return f"Source: {metrics.get('source_note', '?')}.\n\n" + group_audit_markdown(metrics)


METHODS = [Method("fairness-groups", "Group fairness audit of any recommender: per user group (gender, age, occupation, "
                                     "activity) NDCG/HR or AUC with intervals, SNSR/SNSV and a permutation test.",
                  DEFAULTS, run, report=_report, validate=validate, nullable={"source.recommender": ""},
                  smoke={"groups.attributes": ["activity"], "cf_train.epochs": 1, "groups.bootstrap": 50,
                         "groups.permutations": 50, "groups.min_size": 5})]

_TABLE = "Fairness over ML-100K user groups (leave-one-out, NDCG@10 spread; p = permutation test)"
EXPERIMENTS = [
    Experiment("fairness-groups-pop", "fairness-groups", table=_TABLE, quick={"source.recommender": "pop"},
               full={"source.recommender": "pop"}),
    Experiment("fairness-groups-mf", "fairness-groups", table=_TABLE, profiles=("full",),
               full={"source.recommender": "mf"}),
    Experiment("fairness-groups-sasrec", "fairness-groups", table=_TABLE, profiles=("full",),
               full={"source.recommender": "sasrec"}),
]
