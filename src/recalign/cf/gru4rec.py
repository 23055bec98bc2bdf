"""GRU4Rec (Hidasi et al. 2016, in its cross-entropy form): embedding -> dropout -> GRU -> linear to the
embedding size; the last step's output is the sequence representation."""

from __future__ import annotations

import torch
from torch import nn

from recalign.cf.base import Query
from recalign.cf.sequential import SequentialModel


class GRU4Rec(SequentialModel):
    name = "gru4rec"
    description = 'GRU4Rec: GRU over the item sequence, next-item cross-entropy over all items.'
    train_overrides = {"epochs": 200, "patience": 10}  # chosen on the validation split (docs/benchmarks-cf.md)
    defaults = {"embedding_size": 64, "hidden_size": 128, "n_layers": 1, "dropout": 0.3, "max_len": 50}

    def __init__(self, n_users: int, n_items: int, **params):
        super().__init__(n_users, n_items, **params)
        p = self.params
        self.item = nn.Embedding(n_items + 1, p["embedding_size"], padding_idx=n_items)
        self.dropout = nn.Dropout(p["dropout"])
        self.gru = nn.GRU(p["embedding_size"], p["hidden_size"], p["n_layers"], bias=False, batch_first=True)
        self.dense = nn.Linear(p["hidden_size"], p["embedding_size"])
        nn.init.xavier_normal_(self.item.weight)
        for name, weight in self.gru.named_parameters():
            nn.init.xavier_uniform_(weight) if "weight_ih" in name else nn.init.orthogonal_(weight)

    def hidden_states(self, query: Query) -> torch.Tensor:
        history = query.truncate(self.max_len).history
        b, length = history.shape
        # the GRU must not run over padding before the first item: move pads to the end, run, move back
        shift = (history == self.pad).sum(1, keepdim=True)
        steps = torch.arange(length).unsqueeze(0)
        right = history.gather(1, (steps + shift) % length)
        out, _ = self.gru(self.dropout(self.item(right)))
        out = self.dense(out)
        back = ((steps - shift) % length).unsqueeze(-1).expand(-1, -1, out.shape[-1])
        return out.gather(1, back)
