"""Collaborative-filtering models behind one interface (see `base.CFModel`), one trainer, one evaluator.

Library entry points:
    model = train_cf_model("sasrec", train_frame, {"model": {...}, "train": {...}}, catalog=ds, valid=cases)
    scores = model.score(make_query(users, histories, model.n_items))       # [B, n_items]
    model = load_model(path_or_checkpoint)
"""

from __future__ import annotations

from pathlib import Path

import torch

from recalign.cf.base import CFModel, Query, TrainData, history_mask, make_query
from recalign.cf.evaluate import (EvalSet, evaluate, evaluate_ctr, evaluate_ranking, leave_one_out_sets,
                                  recommend, score_pairs)
from recalign.cf.trainer import TRAIN_DEFAULTS, Trainer
from recalign.errors import InputError

# model name -> "module:Class" (imported on first use)
MODELS: dict[str, str] = {
    "pop": "pop:Pop",
    "usercf": "knn:UserCF",
    "itemcf": "knn:ItemCF",
    "mf": "mf:MF",
    "fism": "fism:FISM",
    "lightgcn": "lightgcn:LightGCN",
    "gru4rec": "gru4rec:GRU4Rec",
    "caser": "caser:Caser",
    "sasrec": "sasrec:SASRec",
}


def model_class(name: str) -> type[CFModel]:
    import importlib

    if name not in MODELS:
        raise InputError(f"unknown CF model '{name}'; known: {', '.join(MODELS)}")
    module, cls = MODELS[name].split(":")
    return getattr(importlib.import_module(f"recalign.cf.{module}"), cls)


def create_model(name: str, n_users: int, n_items: int, **params) -> CFModel:
    return model_class(name)(n_users, n_items, **params)


def load_model(source) -> CFModel:
    """A model from `CFModel.save(path)` output, a checkpoint dict, or a trainer checkpoint file."""
    checkpoint = source
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise InputError(f"{path}: model checkpoint not found")
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, dict) or "name" not in checkpoint or "state" not in checkpoint:
        raise InputError(f"{source}: not a recalign CF model checkpoint")
    model = create_model(checkpoint["name"], checkpoint["n_users"], checkpoint["n_items"], **checkpoint["params"])
    model.load_state_dict(checkpoint["state"])
    model.eval()
    return model


def train_cf_model(name: str, data, config: dict | None = None, *, n_users: int | None = None,
                   n_items: int | None = None, catalog=None, valid=None, run=None, checkpoint: str | None = None,
                   seed: int = 0, log=None, on_epoch_end=None) -> CFModel:
    """Train model `name` on any interaction set and return it (best validation epoch, eval mode).

    data:    a Dataset (its whole log), a DataFrame of interactions (user, item[, timestamp, label]),
             a DataFrame of samples (user, item, history[, label]: target given history), or TrainData.
    config:  {"model": {hyper-parameters}, "train": {TRAIN_DEFAULTS keys}}; missing keys take defaults.
    catalog: a Dataset that gives n_users / n_items (or pass them directly).
    valid:   an EvalSet (or a sample DataFrame) for early stopping on train.valid_metric; None = fixed epochs.
    run:     a RunDir or directory for per-epoch checkpoints; an existing checkpoint is resumed.
    The trainer's summary (epochs, seconds per epoch, best epoch) is left in `model.train_summary`."""
    config = config or {}
    unknown = sorted(set(config) - {"model", "train"})
    if unknown:
        raise InputError(f"train_cf_model config: unknown section(s) {', '.join(unknown)}; use 'model' and 'train'")
    if catalog is not None:
        n_users, n_items = n_users or catalog.n_users, n_items or catalog.n_items
    train_data = TrainData.from_any(data, n_users, n_items)
    if valid is not None and not isinstance(valid, EvalSet):
        valid = EvalSet.from_samples(valid)
    torch.manual_seed(seed)
    model = create_model(name, train_data.n_users, train_data.n_items, **config.get("model", {}))
    trainer = Trainer(config.get("train"), seed=seed, run=run, checkpoint=checkpoint or name, log=log,
                      on_epoch_end=on_epoch_end)
    trainer.fit(model, train_data, valid)
    model.train_summary = trainer.summary()
    model.eval()
    return model


__all__ = [
    "CFModel", "EvalSet", "MODELS", "Query", "TRAIN_DEFAULTS", "TrainData", "Trainer", "create_model", "evaluate",
    "evaluate_ctr", "evaluate_ranking", "history_mask", "leave_one_out_sets", "load_model", "make_query",
    "model_class", "recommend", "score_pairs", "train_cf_model",
]
