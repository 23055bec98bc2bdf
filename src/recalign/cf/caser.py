"""Caser (Tang & Wang 2018): the last L items' embeddings form an L x d "image"; horizontal convolutions
(heights 1..L, max-pooled) catch union-level patterns, vertical convolutions weight the positions; their
concatenation -> linear -> ReLU, joined with the user embedding -> linear -> ReLU is the sequence
representation. One output per window, so every target is its own window of L previous items.

`hidden_states` returns the window's item embeddings (what the convolutions read): Caser has no
per-position hidden states of its own."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recalign.cf.base import Query
from recalign.cf.sequential import SequentialModel


class Caser(SequentialModel):
    name = "caser"
    description = 'Caser: horizontal and vertical convolutions over the last L items plus a user embedding.'
    train_overrides = {"epochs": 200, "patience": 10}  # chosen on the validation split (docs/benchmarks-cf.md)
    last_position_only = True
    defaults = {"embedding_size": 64, "n_v": 4, "n_h": 16, "dropout": 0.4, "max_len": 5}

    def __init__(self, n_users: int, n_items: int, **params):
        super().__init__(n_users, n_items, **params)
        p = self.params
        d, length = p["embedding_size"], p["max_len"]
        self.item = nn.Embedding(n_items + 1, d, padding_idx=n_items)
        self.user = nn.Embedding(n_users + 1, d)  # last row: unknown user
        self.vertical = nn.Conv2d(1, p["n_v"], (length, 1))
        self.horizontal = nn.ModuleList(nn.Conv2d(1, p["n_h"], (h, d)) for h in range(1, length + 1))
        self.fc1 = nn.Linear(p["n_v"] * d + p["n_h"] * length, d)
        self.fc2 = nn.Linear(2 * d, d)
        self.dropout = nn.Dropout(p["dropout"])
        nn.init.normal_(self.item.weight, 0, 1.0 / d)
        nn.init.normal_(self.user.weight, 0, 1.0 / d)
        with torch.no_grad():
            self.item.weight[n_items].zero_()
            self.user.weight[n_users].zero_()

    def _window(self, query: Query) -> torch.Tensor:
        history = query.truncate(self.max_len).history
        if history.shape[1] < self.max_len:
            fill = torch.full((len(history), self.max_len - history.shape[1]), self.pad, dtype=history.dtype)
            history = torch.cat([fill, history], 1)
        return history

    def hidden_states(self, query: Query) -> torch.Tensor:
        return self.item(self._window(query))

    def sequence_representation(self, query: Query) -> torch.Tensor:
        image = self.item(self._window(query)).unsqueeze(1)  # [B, 1, L, d]
        vertical = self.vertical(image).flatten(1)
        horizontal = [F.relu(conv(image).squeeze(3)).amax(2) for conv in self.horizontal]
        z = F.relu(self.fc1(self.dropout(torch.cat([vertical, *horizontal], 1))))
        users = torch.where(query.users >= 0, query.users, torch.full_like(query.users, self.n_users))
        return F.relu(self.fc2(torch.cat([z, self.user(users)], 1)))
