"""Collaborative-filtering models run as methods: `recalign run sasrec --dataset ml-100k --out DIR`.

Two protocols (`protocol` key):
- loo (default): leave-one-out by time (last interaction = test, second to last = valid), the whole
  catalogue ranked with the user's earlier interactions masked; NDCG/HR/Recall/MRR@K.
- ctr: TALLRec/CoLLM-style samples (history of `ctr.history_len` items -> target, label = liked), split by
  the target's global time 80/10/10; the model scores each (user/history, target) pair; AUC and UAUC on
  all, warm and cold test samples (warm = user and item seen in training). Trainable models default to
  point-wise BCE on the labels here (`train.objective` overrides).
"""

from __future__ import annotations

import copy
import time

from recalign.cf import MODELS as CF_MODELS
from recalign.cf.checks import check_model_settings, check_train_settings
from recalign.errors import InputError
from recalign.methods.api import Experiment, Method, RunContext
from recalign.eval.metrics import check_metric_name
from recalign.tasks.ctr import check_split, ctr_report, tallrec_protocol
from recalign.tasks.next_item import few_candidates_warnings

PROTOCOL_DEFAULTS = {
    "protocol": "loo",  # loo | ctr
    "eval": {"ks": [10, 20], "batch_size": 1024},
    "ctr": {"history_len": 10, "liked_history_only": False, "split": [0.8, 0.1, 0.1]},
}


def model_config(name: str) -> dict:
    """{"model": the model's hyper-parameters, "train": trainer settings} as `train_cf_model` takes them."""
    from recalign.cf import TRAIN_DEFAULTS, model_class

    cls = model_class(name)
    return {"model": copy.deepcopy(cls.defaults), "train": {**TRAIN_DEFAULTS, **cls.train_overrides}}


def _defaults(name: str) -> dict:
    from recalign.cf import model_class

    config = model_config(name)
    if not config["model"]:
        config.pop("model")
    if model_class(name).kind == "memory":  # nothing to train
        config.pop("train")
    return {**config, **copy.deepcopy(PROTOCOL_DEFAULTS)}


def _validate(name: str):
    def validate(config: dict) -> None:
        from recalign.cf import model_class
        from recalign.eval import check_ks

        check_ks(config["eval"]["ks"])
        if config["protocol"] not in ("loo", "ctr"):
            raise InputError(f"protocol: expected 'loo' or 'ctr', got {config['protocol']!r}")
        cls = model_class(name)
        train = config.get("train")
        if train is not None:
            objective = train["objective"]
            if objective and objective not in cls.objectives:
                raise InputError(f"train.objective: {name} supports {', '.join(cls.objectives)}, got {objective!r}")
            check_train_settings(train)
            check_metric_name(train["valid_metric"], "train.valid_metric")
        check_split(config["ctr"]["split"], "ctr.split")
        if config["ctr"]["history_len"] < 1:
            raise InputError(f"ctr.history_len: must be >= 1, got {config['ctr']['history_len']}")
        if config["eval"]["batch_size"] < 1:
            raise InputError(f"eval.batch_size: must be >= 1, got {config['eval']['batch_size']}")
        check_model_settings(config.get("model", {}))
    return validate


def run(ctx: RunContext) -> dict:
    from recalign.cf import EvalSet, evaluate_ranking, leave_one_out_sets, score_pairs, train_cf_model

    cfg, ds, name = ctx.config, ctx.dataset, ctx.method
    train_cfg = dict(cfg.get("train", {}))
    warnings = []
    if cfg["protocol"] == "ctr":
        samples = tallrec_protocol(ds, {**cfg["ctr"], "valid_size": 0, "test_size": 0},
                                   liked_history_only=cfg["ctr"]["liked_history_only"])
        data, valid, test = samples.train, EvalSet.from_samples(samples.valid), EvalSet.from_samples(samples.test)
        if train_cfg:
            train_cfg["objective"] = train_cfg["objective"] or "bce"
            train_cfg["valid_metric"] = "auc"
        ctx.log(f"ctr samples: train {len(data)}, valid {len(valid)}, test {len(test)}")
    else:
        data, valid, test = leave_one_out_sets(ds.interactions, ds.n_users, ds.n_items)
        ctx.log(f"leave-one-out: {data.n_pairs} training interactions, {len(valid)} valid, {len(test)} test users")
        if len(test) < ds.n_users:
            warnings.append(f"{ds.n_users - len(test)} of {ds.n_users} users have fewer than 3 interactions: they are "
                            f"not evaluated (leave-one-out keeps all of theirs in training); test users: {len(test)}")
    started = time.perf_counter()
    model = train_cf_model(name, data, {"model": cfg.get("model", {}), "train": train_cfg}, catalog=ds,
                           valid=valid, run=ctx.run, checkpoint="train", seed=ctx.seed, log=ctx.log)
    train_seconds = time.perf_counter() - started
    ctx.run.save_checkpoint("model", model.checkpoint())
    started = time.perf_counter()
    out = {}
    if cfg["protocol"] == "ctr":
        out["valid"] = ctr_report(samples.valid, score_pairs(model, valid))
        out["test"] = ctr_report(samples.test, score_pairs(model, test))
        out["test"]["warm_fraction"] = float(samples.test["warm"].mean())
    else:
        ks = tuple(cfg["eval"]["ks"])
        warnings += few_candidates_warnings(test.histories, test.targets, ds.n_items, ks)
        out["valid"] = {**evaluate_ranking(model, valid, ks, cfg["eval"]["batch_size"]), "n": len(valid)}
        out["test"] = evaluate_ranking(model, test, ks, cfg["eval"]["batch_size"], intervals=True)  # with n
    summary = model.train_summary
    return {**out, "warnings": warnings, "seconds": {"train": train_seconds, "eval": time.perf_counter() - started},
            "training": {**{k: summary[k] for k in ("epochs", "best_epoch", "seconds_per_epoch", "stopped")},
                         "objective": getattr(model, "objective", None)},  # train.objective '' resolved
            "epoch_history": summary["history"]}


def _make(name: str) -> Method:
    from recalign.cf import model_class

    cls = model_class(name)
    smoke = {"train.epochs": 1} if cls.kind != "memory" else {}
    return Method(name, cls.description, _defaults(name), run, validate=_validate(name), smoke=smoke, needs=_needs)


def _needs(config: dict):
    from recalign.data import Needs

    if config["protocol"] == "ctr":
        return Needs.ctr(config["ctr"]["history_len"], liked_history=config["ctr"]["liked_history_only"])
    return Needs.leave_one_out(top_k=max(config["eval"]["ks"]))


METHODS = [_make(name) for name in CF_MODELS]

_TABLE = "CF baselines (leave-one-out, full ranking)"
DROS_CHOSEN = {"model.alpha": 1.0, "model.beta": 1.0}  # bench/cf.py --dros-grid (8 epochs per point)
EXPERIMENTS = [
    Experiment("pop", "pop", table=_TABLE),
    Experiment("itemcf", "itemcf", table=_TABLE),
    # quick: few epochs, and a wall-clock cap so a loaded machine cannot stretch the profile
    Experiment("mf", "mf", table=_TABLE, quick={"train.epochs": 40, "train.max_minutes": 0.5}),
    Experiment("sasrec", "sasrec", table=_TABLE, quick={"train.epochs": 6, "train.max_minutes": 1.5}),
    Experiment("usercf", "usercf", table=_TABLE, profiles=("full",)),
    Experiment("fism", "fism", table=_TABLE, profiles=("full",)),
    Experiment("lightgcn", "lightgcn", table=_TABLE, profiles=("full",)),
    Experiment("gru4rec", "gru4rec", table=_TABLE, profiles=("full",)),
    Experiment("caser", "caser", table=_TABLE, profiles=("full",)),
    # the seed's sequential baselines (docs/benchmarks-cf.md): DROS's alpha/beta and DreamRec's guidance weight
    # are the values chosen on the valid split by bench/cf.py (--dros-grid, --guidance-grid), never on test
    Experiment("dros", "dros", table=_TABLE, profiles=("full",), full=DROS_CHOSEN),
    Experiment("acvae", "acvae", table=_TABLE, profiles=("full",)),
    Experiment("dreamrec", "dreamrec", table=_TABLE, profiles=("full",), full={"model.guidance": 0.5}),
    Experiment("mf-ctr", "mf", table="CF baselines as CTR models (AUC/UAUC)",
               quick={"protocol": "ctr", "train.epochs": 20, "train.max_minutes": 0.5}, full={"protocol": "ctr"}),
]
