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
from recalign.cf.evaluate import (EvalSet, case_query, evaluate, evaluate_ctr, evaluate_ranking, leave_one_out_sets,
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
    "dros": "dros:DROS",
    "acvae": "acvae:ACVAE",
    "dreamrec": "dreamrec:DreamRec",
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
    """A model from `CFModel.save(path)` output or a `model.checkpoint()` dict (e.g. a run's checkpoint
    `RunDir(out).load_checkpoint("model")`). The file is a safetensors state (never a pickle), and what it
    holds is checked against the model its name, sizes and params build: a mismatch is an InputError that
    names the file."""
    checkpoint, where = source, "model checkpoint"
    if isinstance(source, (str, Path)):
        from recalign.io import load_state

        where = Path(source)
        if not where.is_file():
            raise InputError(f"{where}: model checkpoint not found")
        checkpoint = load_state(where)
    keys = ("name", "n_users", "n_items", "params", "state")
    if not isinstance(checkpoint, dict) or not set(keys) <= set(checkpoint):
        raise InputError(f"{where}: not a recalign CF model checkpoint (needs {', '.join(keys)})")
    name, n_users, n_items, params, state = (checkpoint[k] for k in keys)
    if not (isinstance(name, str) and isinstance(params, dict) and isinstance(state, dict)
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (n_users, n_items))):
        raise InputError(f"{where}: malformed CF model checkpoint (name, sizes, params or state of the wrong type)")
    try:
        model = create_model(name, n_users, n_items, **params)
    except (InputError, TypeError, ValueError) as exc:
        raise InputError(f"{where}: {exc}") from None
    expected = model.state_dict()
    if set(state) != set(expected):
        odd = sorted(set(state) ^ set(expected))
        raise InputError(f"{where}: weights do not match a {name} model (missing or unexpected: {', '.join(odd[:5])})")
    for key, value in expected.items():
        if torch.is_tensor(value) and (not torch.is_tensor(state[key]) or state[key].shape != value.shape):
            got = tuple(state[key].shape) if torch.is_tensor(state[key]) else type(state[key]).__name__
            raise InputError(f"{where}: {key} is {got}, but a {name} with {n_users} users, {n_items} items "
                             f"and its params needs {tuple(value.shape)}")
    try:
        model.load_state_dict(state)
        model.eval()
        if n_items:  # one query: catches saved graphs / similarity matrices that do not fit the sizes
            with torch.no_grad():
                scores = model.score(make_query([0 if n_users else -1], [[0]], n_items, model.max_len))
            if tuple(scores.shape) != (1, n_items):
                raise ValueError(f"scores of shape {tuple(scores.shape)}")
    except Exception as exc:
        raise InputError(f"{where}: the saved {name} model does not fit its own config "
                         f"({type(exc).__name__}: {exc})") from None
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
    "CFModel", "EvalSet", "MODELS", "case_query", "Query", "TRAIN_DEFAULTS", "TrainData", "Trainer", "create_model", "evaluate",
    "evaluate_ctr", "evaluate_ranking", "history_mask", "leave_one_out_sets", "load_model", "make_query",
    "model_class", "recommend", "score_pairs", "train_cf_model",
]
