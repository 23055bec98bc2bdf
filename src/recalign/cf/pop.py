"""Pop: every user gets the items ranked by their number of training interactions (non-personalised)."""

from __future__ import annotations

import numpy as np
import torch

from recalign.cf.base import CFModel, Query, TrainData, select_items


class Pop(CFModel):
    name = "pop"
    description = 'Pop: items ranked by their number of training interactions (non-personalised).'
    kind = "memory"
    objectives = ("count",)
    defaults = {"positives_only": False}  # count only rows labelled positive (CTR setting)

    def __init__(self, n_users: int, n_items: int, **params):
        super().__init__(n_users, n_items, **params)
        self.register_buffer("counts", torch.zeros(n_items))

    def prepare(self, data: TrainData) -> None:
        items = data.items[data.labels] if self.params["positives_only"] else data.items
        self.counts = torch.from_numpy(np.bincount(items, minlength=self.n_items).astype(np.float32))

    def score(self, query: Query, items: torch.Tensor | None = None) -> torch.Tensor:
        return select_items(self.counts.expand(len(query), -1), items)
