"""LightGCN (He et al. 2020): user and item embeddings smoothed over the user-item graph.

E^(k+1) = D^-1/2 A D^-1/2 E^(k) on the bipartite adjacency A (sparse); the final embedding is the mean of
E^(0..L). Scored by dot product; BPR (default) or BCE on labels; L2 on the batch's layer-0 embeddings."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from recalign.cf.base import CFModel, Query, TrainData, bce_loss, bpr_loss, csr_tensor, dot_scores


class LightGCN(CFModel):
    name = "lightgcn"
    description = 'LightGCN: embeddings smoothed over the user-item graph (sparse normalised adjacency).'
    train_overrides = {"epochs": 300, "patience": 30}  # chosen on the validation split (docs/benchmarks-cf.md)
    kind = "embedding"
    objectives = ("bpr", "bce")
    defaults = {"embedding_size": 64, "n_layers": 2, "reg_weight": 1e-5}

    def __init__(self, n_users: int, n_items: int, **params):
        super().__init__(n_users, n_items, **params)
        d = self.params["embedding_size"]
        self.user = nn.Embedding(n_users, d)
        self.item = nn.Embedding(n_items, d)
        nn.init.xavier_uniform_(self.user.weight)
        nn.init.xavier_uniform_(self.item.weight)
        self.adjacency = None  # torch sparse CSR [(U+I), (U+I)], built in prepare()
        self._cache = None

    def prepare(self, data: TrainData) -> None:
        r = data.matrix.tocoo()
        n = self.n_users + self.n_items
        rows = np.concatenate([r.row, r.col + self.n_users])
        cols = np.concatenate([r.col + self.n_users, r.row])
        a = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n, n))
        degree = np.asarray(a.sum(1)).ravel()
        inv_sqrt = np.where(degree > 0, 1.0 / np.sqrt(np.maximum(degree, 1e-12)), 0.0).astype(np.float32)
        self._set_adjacency(sp.diags(inv_sqrt) @ a @ sp.diags(inv_sqrt))

    def _set_adjacency(self, a: sp.spmatrix) -> None:
        self.adjacency = csr_tensor(a)
        self._cache = None

    def get_extra_state(self):
        if self.adjacency is None:
            return {}
        a = self.adjacency
        return {"indptr": a.crow_indices(), "indices": a.col_indices(), "data": a.values(), "shape": tuple(a.shape)}

    def set_extra_state(self, state):
        if state:
            a = sp.csr_matrix((state["data"].numpy(), state["indices"].numpy(), state["indptr"].numpy()),
                              shape=state["shape"])
            self._set_adjacency(a)

    def propagate(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(user [U, d], item [I, d]) after L layers, averaged. Cached for scoring in eval mode without
        gradients; any call with gradients enabled (training, or tuning the model inside another
        method) recomputes and drops the cache."""
        cacheable = not self.training and not torch.is_grad_enabled()
        if cacheable and self._cache is not None:
            return self._cache
        self._cache = None
        if self.adjacency is None:
            raise RuntimeError("LightGCN has no graph yet: call prepare(train_data) (the trainer does) first")
        e = torch.cat([self.user.weight, self.item.weight])
        total = e
        for _ in range(self.params["n_layers"]):
            e = torch.sparse.mm(self.adjacency, e)
            total = total + e
        total = total / (self.params["n_layers"] + 1)
        out = (total[:self.n_users], total[self.n_users:])
        if cacheable:
            self._cache = out
        return out

    def train(self, mode: bool = True):
        self._cache = None
        return super().train(mode)

    def load_state_dict(self, *args, **kwargs):
        self._cache = None
        return super().load_state_dict(*args, **kwargs)

    def loss(self, batch: dict, objective: str) -> torch.Tensor:
        users_all, items_all = self.propagate()
        users, items = batch["users"], batch["items"]
        u, i = users_all[users], items_all[items]
        pos = (u * i).sum(1)
        ego = self.user(users).pow(2).sum() + self.item(items).pow(2).sum()
        if objective == "bce":
            return bce_loss(pos, batch["labels"]) + self.params["reg_weight"] * ego / len(users)
        negatives = batch["negatives"]
        neg = (u * items_all[negatives]).sum(1)
        ego = ego + self.item(negatives).pow(2).sum()
        return bpr_loss(pos, neg) + self.params["reg_weight"] * ego / len(users)

    def query_embedding(self, query: Query) -> torch.Tensor:
        users_all, _ = self.propagate()
        known = query.users >= 0
        return users_all[query.users.clamp(min=0)] * known.unsqueeze(1)

    def score(self, query: Query, items: torch.Tensor | None = None) -> torch.Tensor:
        return dot_scores(self.query_embedding(query), self.propagate()[1], items)

    def user_embeddings(self) -> torch.Tensor:
        return self.propagate()[0]

    def item_embeddings(self) -> torch.Tensor:
        return self.propagate()[1]
