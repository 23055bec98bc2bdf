"""FISM (Kabbur et al. 2013): an item-based latent model. A history is the normalised sum of its items'
history embeddings P; score(h, j) = b_j + |h|^-alpha * sum_{i in h} p_i . q_j. In training the target is
left out of its own user's history (the FISM rule), so the model cannot score an item by itself."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from recalign.cf.base import CFModel, Query, TrainData, bce_loss, bpr_loss, csr_tensor, dot_scores, history_csr
from recalign.cf.batches import has_pair, pair_keys


class FISM(CFModel):
    name = "fism"
    description = "FISM: factored item similarity; a user is the normalised sum of their items' embeddings."
    train_overrides = {"epochs": 200, "patience": 15}  # chosen on the validation split (docs/benchmarks-cf.md)
    kind = "embedding"
    objectives = ("bpr", "bce")
    defaults = {"embedding_size": 64, "alpha": 0.5, "reg_weight": 0.0}

    def __init__(self, n_users: int, n_items: int, **params):
        super().__init__(n_users, n_items, **params)
        d = self.params["embedding_size"]
        self.history_item = nn.Embedding(n_items, d)
        self.item = nn.Embedding(n_items, d)
        self.item_bias = nn.Parameter(torch.zeros(n_items))
        nn.init.xavier_normal_(self.history_item.weight)
        nn.init.xavier_normal_(self.item.weight)
        self._data = None

    def prepare(self, data: TrainData) -> None:
        self._data = data
        self._counts = torch.from_numpy(np.diff(data.matrix.indptr).astype(np.float32))

    def _aggregate(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """counts^-alpha * (sparse rows @ P); an empty history gives the zero vector."""
        summed = torch.sparse.mm(rows, self.history_item.weight)
        return summed * counts.clamp(min=1).pow(-self.params["alpha"]).unsqueeze(1)

    def loss(self, batch: dict, objective: str) -> torch.Tensor:
        users, items = batch["users"], batch["items"]
        # each distinct user of the batch summed once (users repeat within a batch)
        distinct, inverse = users.unique(return_inverse=True)
        summed = torch.sparse.mm(csr_tensor(self._data.matrix[distinct.numpy()]), self.history_item.weight)[inverse]
        counts = self._counts[users]
        q = self.item(items)
        # leave the target out of its own history
        keys = users.numpy() * self.n_items + items.numpy()
        in_history = torch.from_numpy(has_pair(pair_keys(self._data), keys))
        own = self.history_item(items) * in_history.unsqueeze(1)
        n_own = (counts - in_history.float()).clamp(min=1)
        pos = self.item_bias[items] + ((summed - own) * q).sum(1) * n_own.pow(-self.params["alpha"])
        reg = self.params["reg_weight"] * q.pow(2).sum() / len(items)
        if objective == "bce":
            return bce_loss(pos, batch["labels"]) + reg
        negatives = batch["negatives"]
        neg = self.item_bias[negatives] + (summed * self.item(negatives)).sum(1) * counts.clamp(min=1).pow(
            -self.params["alpha"])
        return bpr_loss(pos, neg) + reg

    def query_embedding(self, query: Query) -> torch.Tensor:
        history = history_csr(query, self.n_items)
        counts = torch.from_numpy(np.diff(history.indptr).astype(np.float32))
        return self._aggregate(csr_tensor(history), counts)

    def score(self, query: Query, items: torch.Tensor | None = None) -> torch.Tensor:
        return dot_scores(self.query_embedding(query), self.item.weight, items, self.item_bias)

    def item_embeddings(self) -> torch.Tensor:
        return self.item.weight
