"""Collaborative-filtering baselines run as methods (leave-one-out by time, full ranking, history masked).

Placeholder holding Pop until the CF package (issue 3) registers every model here."""

from __future__ import annotations

import time

import numpy as np
import torch

from recalign.data import leave_one_out
from recalign.eval import check_ks, ranking_metrics, target_ranks
from recalign.methods import Experiment, Method, RunContext

DEFAULTS = {"eval": {"ks": [10, 20]}}


def _run_pop(ctx: RunContext) -> dict:
    ds = ctx.dataset
    split = leave_one_out(ds)
    started = time.perf_counter()
    counts = np.bincount(split.train["item"].to_numpy(), minlength=ds.n_items).astype(np.float32)
    train_seconds = time.perf_counter() - started
    started = time.perf_counter()
    out = {}
    for name, frame, seen in (("valid", split.valid, split.train),
                              ("test", split.test, _concat(split.train, split.valid))):
        users = frame["user"].to_numpy()
        scores = torch.from_numpy(np.tile(counts, (len(users), 1)))
        mask = torch.zeros(len(users), ds.n_items, dtype=torch.bool)
        row_of = {u: r for r, u in enumerate(users)}
        rows = [row_of[u] for u in seen["user"] if u in row_of]
        cols = [i for u, i in zip(seen["user"], seen["item"]) if u in row_of]
        mask[rows, cols] = True
        ranks = target_ranks(scores, torch.as_tensor(frame["item"].to_numpy().copy()), mask)
        out[name] = ranking_metrics(ranks, ctx.config["eval"]["ks"])
    return {**out, "seconds": {"train": train_seconds, "eval": time.perf_counter() - started}}


def _concat(a, b):
    import pandas as pd

    return pd.concat([a, b], ignore_index=True)


METHODS = {"pop": Method("pop", "Most popular items from the training period (non-personalised baseline).",
                         DEFAULTS, _run_pop, validate=lambda c: check_ks(c["eval"]["ks"]))}
EXPERIMENTS = [Experiment("pop", "pop", table="CF baselines (leave-one-out, full ranking)")]
