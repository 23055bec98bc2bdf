"""MF: user and item embeddings scored by a dot product; BPR (pair-wise, implicit) or BCE (point-wise on
explicit like/dislike labels, the CTR setting CoLLM uses)."""

from __future__ import annotations

import torch
from torch import nn

from recalign.cf.base import CFModel, Query, bce_loss, bpr_loss, dot_scores


class MF(CFModel):
    name = "mf"
    description = 'MF: matrix factorisation with BPR (or point-wise BCE on explicit labels).'
    train_overrides = {"epochs": 300, "patience": 30}  # chosen on the validation split (docs/benchmarks-cf.md)
    kind = "embedding"
    objectives = ("bpr", "bce")
    defaults = {"embedding_size": 64, "reg_weight": 0.0, "bias": False}

    def __init__(self, n_users: int, n_items: int, **params):
        super().__init__(n_users, n_items, **params)
        d = self.params["embedding_size"]
        self.user = nn.Embedding(n_users, d)
        self.item = nn.Embedding(n_items, d)
        nn.init.xavier_normal_(self.user.weight)
        nn.init.xavier_normal_(self.item.weight)
        self.item_bias = nn.Parameter(torch.zeros(n_items)) if self.params["bias"] else None

    def _users(self, users: torch.Tensor) -> torch.Tensor:
        """Embeddings of user ids; an unknown user (-1) gets the zero vector (scores = item bias)."""
        known = users >= 0
        vectors = self.user(users.clamp(min=0))
        return vectors * known.unsqueeze(1)

    def loss(self, batch: dict, objective: str) -> torch.Tensor:
        u = self.user(batch["users"])
        i = self.item(batch["items"])
        bias = self.item_bias
        pos = (u * i).sum(1) + (bias[batch["items"]] if bias is not None else 0)
        if objective == "bce":
            reg = u.pow(2).sum() + i.pow(2).sum()
            return bce_loss(pos, batch["labels"]) + self.params["reg_weight"] * reg / len(u)
        n = self.item(batch["negatives"])
        neg = (u * n).sum(1) + (bias[batch["negatives"]] if bias is not None else 0)
        reg = u.pow(2).sum() + i.pow(2).sum() + n.pow(2).sum()
        return bpr_loss(pos, neg) + self.params["reg_weight"] * reg / len(u)

    def score(self, query: Query, items: torch.Tensor | None = None) -> torch.Tensor:
        return dot_scores(self._users(query.users), self.item.weight, items, self.item_bias)

    def user_embeddings(self) -> torch.Tensor:
        return self.user.weight

    def item_embeddings(self) -> torch.Tensor:
        return self.item.weight

    def query_embedding(self, query: Query) -> torch.Tensor:
        return self._users(query.users)
