"""One trainer for every model: epochs of batches, Adam, early stopping on a validation metric, a checkpoint
after every epoch, and resume that continues from the last finished epoch.

Every epoch draws its batches (shuffling, negative samples, dropout) from generators seeded by
(seed, epoch), so an interrupted run resumed from its checkpoint ends with exactly the parameters an
uninterrupted run would have.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from recalign.cf.base import CFModel, TrainData
from recalign.cf.batches import build_windows, labelled_batches, n_window_batches, pair_batches, window_batches
from recalign.cf.evaluate import EvalSet, evaluate
from recalign.errors import InputError
from recalign.progress import track

TRAIN_DEFAULTS = {
    "epochs": 100,  # upper bound; early stopping usually ends sooner
    "batch_size": 2048,  # training targets (positive pairs / predicted positions) per optimiser step
    "lr": 0.001,
    "weight_decay": 0.0,
    "objective": "",  # "" = the model's default: bpr (MF, FISM, LightGCN) or ce (sequential); bce for CTR
    "bce_negatives": 0,  # with bce: sampled non-interacted items per row, labelled 0
    "patience": 10,  # evaluations without improvement before stopping (0 = never stop early)
    "eval_every": 1,  # epochs between validations
    "valid_metric": "ndcg@10",  # or hr@K, mrr@K, auc, uauc
    "max_minutes": 0.0,  # stop after this much training time (0 = no limit); the best epoch is kept
}


def train_config(overrides: dict | None = None) -> dict:
    config = dict(TRAIN_DEFAULTS)
    for key, value in (overrides or {}).items():
        if key not in config:
            raise InputError(f"unknown train key '{key}'; valid: {', '.join(sorted(config))}")
        config[key] = value
    return config


class Trainer:
    def __init__(self, config: dict | None = None, seed: int = 0, run=None, checkpoint: str = "cf",
                 log: Callable[[str], None] | None = None,
                 on_epoch_end: Callable[[int, dict], None] | None = None):
        """run: anything with save_checkpoint/load_checkpoint (a run directory, `recalign.io.Checkpoints`), a
        directory path (checkpoints under it), or None (no checkpoints). on_epoch_end(epoch, record) is called
        after each epoch's checkpoint is written."""
        self.config = train_config(config)
        self.seed = int(seed)
        if run is not None and not hasattr(run, "save_checkpoint"):
            from recalign.io import Checkpoints

            run = Checkpoints(Path(run) / "checkpoints")
        self.run = run
        self.checkpoint_name = checkpoint
        self.log = log or (lambda message: None)
        self.on_epoch_end = on_epoch_end
        self.history: list[dict] = []

    # ------------------------------------------------------------------------------------------ fit
    def fit(self, model: CFModel, data: TrainData, valid: EvalSet | None = None) -> CFModel:
        cfg = self.config
        objective = cfg["objective"] or model.objectives[0]
        if objective not in model.objectives:
            raise InputError(f"{model.name}: objective '{objective}' not supported; use one of "
                             f"{', '.join(model.objectives)}")
        model.objective = objective
        started = time.perf_counter()
        model.prepare(data)
        if not model.trainable:  # one pass over the data computes everything
            self.history = [{"epoch": 1, "loss": None, "train_seconds": time.perf_counter() - started}]
            self.stopped, self.best_epoch = "fitted", 1
            return model
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        state = self._resume(model, optimizer)
        if state.get("done"):
            model.load_state_dict(state["best_state"])
            self.stopped, self.best_epoch = state.get("stopped"), state.get("best_epoch")  # as the run that finished
            self.log(f"{model.name}: training already finished (best epoch {state['best_epoch']}); loaded")
            return model
        windows = None
        if model.sequential:
            windows = build_windows(data, model.max_len, model.stride)
        train_seconds = sum(r.get("train_seconds", 0.0) for r in self.history)
        epoch = state.get("epoch", 0)
        stopped = "epochs"
        while epoch < cfg["epochs"]:
            epoch += 1
            rng = np.random.default_rng([self.seed, epoch])
            torch.manual_seed(self.seed * 1_000_003 + epoch)
            model.train()
            started = time.perf_counter()
            batches = self._batches(model, data, windows, objective, rng)
            total_loss, n_batches = 0.0, 0
            for batch in track(batches, f"{model.name} epoch {epoch}", total=self._n_batches(data, windows, objective)):
                loss = model.loss(batch, objective)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total_loss += float(loss.detach())
                n_batches += 1
            seconds = time.perf_counter() - started
            train_seconds += seconds
            record = {"epoch": epoch, "loss": total_loss / max(1, n_batches), "train_seconds": seconds}
            validate = valid is not None and bool(cfg["valid_metric"])
            if validate and (epoch % cfg["eval_every"] == 0 or epoch == cfg["epochs"]):
                started = time.perf_counter()
                metrics = evaluate(model, valid, cfg["valid_metric"])
                record["eval_seconds"] = time.perf_counter() - started
                record["valid"] = metrics[cfg["valid_metric"]]
                if state.get("best") is None or record["valid"] > state["best"]:
                    state.update(best=record["valid"], best_epoch=epoch, bad=0,
                                 best_state=copy.deepcopy(model.state_dict()))
                else:
                    state["bad"] = state.get("bad", 0) + 1
            elif not validate:  # no validation: the last epoch is the result
                state.update(best_epoch=epoch, best_state=copy.deepcopy(model.state_dict()))
            self.history.append(record)
            self.log(f"{model.name} epoch {epoch}: loss {record['loss']:.4f}"
                     + (f", valid {cfg['valid_metric']} {record['valid']:.4f}" if "valid" in record else "")
                     + f" ({seconds:.1f}s)")
            state["epoch"] = epoch
            done = False
            if cfg["patience"] and state.get("bad", 0) >= cfg["patience"]:
                stopped, done = "early stopping", True
            elif cfg["max_minutes"] and train_seconds >= 60 * cfg["max_minutes"]:
                stopped, done = "time budget", True
            elif epoch >= cfg["epochs"]:
                done = True
            state["stopped"] = stopped
            self._save(model, optimizer, state, done)
            if self.on_epoch_end is not None:
                self.on_epoch_end(epoch, record)
            if done:
                break
        if state.get("best_state") is not None:
            model.load_state_dict(state["best_state"])
        self.stopped = stopped
        self.best_epoch = state.get("best_epoch")
        self.log(f"{model.name}: stopped by {stopped} after epoch {epoch}; best epoch {self.best_epoch}")
        return model

    # ------------------------------------------------------------------------------------- helpers
    def _batches(self, model, data, windows, objective, rng):
        size = self.config["batch_size"]
        if model.sequential:
            return window_batches(windows, size, rng)
        if objective == "bce":
            return labelled_batches(data, size, rng, self.config["bce_negatives"])
        return pair_batches(data, size, rng)

    def _n_batches(self, data, windows, objective) -> int:
        size = self.config["batch_size"]
        if windows is not None:
            return n_window_batches(windows, size)
        if objective == "bce":
            n = data.n_pairs * (1 + self.config["bce_negatives"])
        else:
            n = data.n_pairs
        return -(-n // size)

    def _resume(self, model, optimizer) -> dict:
        if self.run is None:
            return {}
        saved = self.run.load_checkpoint(self.checkpoint_name)  # a safetensors state; never unpickled
        if saved is None:
            return {}
        where = self._where()
        keys = ("model", "n_items", "model_state", "optimizer_state", "state", "history")
        if not isinstance(saved, dict) or not set(keys) <= set(saved) or not isinstance(saved["state"], dict):
            raise InputError(f"{where}: not a CF trainer checkpoint (needs {', '.join(keys)})")
        if saved.get("model") != model.name or saved.get("n_items") != model.n_items:
            raise InputError(f"checkpoint '{self.checkpoint_name}' in {self.run.path} is for "
                             f"{saved.get('model')} with {saved.get('n_items')} items, not {model.name} "
                             f"with {model.n_items}; use a new output directory")
        try:
            model.load_state_dict(saved["model_state"])
            optimizer.load_state_dict(saved["optimizer_state"])
            self.history = list(saved["history"])
            epoch = int(saved["state"]["epoch"])
        except Exception as exc:  # shapes of another config, a malformed state
            raise InputError(f"{where}: does not fit this {model.name} model ({type(exc).__name__}: "
                             f"{exc}); use a new output directory") from None
        self.log(f"{model.name}: resuming after epoch {epoch}")
        return dict(saved["state"])

    def _where(self) -> str:
        for method in ("checkpoint_path", "file"):  # RunDir / recalign.io.Checkpoints
            if hasattr(self.run, method):
                return str(getattr(self.run, method)(self.checkpoint_name))
        return f"checkpoint '{self.checkpoint_name}'"

    def _save(self, model, optimizer, state, done) -> None:
        if self.run is None:
            return
        state = dict(state, done=done)
        self.run.save_checkpoint(self.checkpoint_name, {
            "model": model.name, "n_items": model.n_items, "model_state": model.state_dict(),
            "optimizer_state": optimizer.state_dict(), "state": state, "history": self.history,
        })

    def summary(self) -> dict:
        """epochs run, best epoch, median seconds per epoch, why it stopped, and the per-epoch history."""
        seconds = [r["train_seconds"] for r in self.history if "loss" in r]
        evals = [r["eval_seconds"] for r in self.history if "eval_seconds" in r]
        return {"epochs": len(seconds), "best_epoch": getattr(self, "best_epoch", None),
                "seconds_per_epoch": float(np.median(seconds)) if seconds else 0.0,
                "train_seconds": float(sum(seconds)),
                "valid_eval_seconds": float(np.median(evals)) if evals else 0.0,
                "stopped": getattr(self, "stopped", None), "history": self.history}
