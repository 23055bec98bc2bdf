"""SASRec (Kang & McAuley 2018): a causal Transformer encoder over the item sequence; the state at the last
position is the sequence representation, scored against the (tied) item embeddings. Trained on every
position of each window at once (next-item cross-entropy over all items by default)."""

from __future__ import annotations

import torch
from torch import nn

from recalign.cf.base import Query
from recalign.cf.sequential import SequentialModel
from recalign.errors import InputError


class SASRec(SequentialModel):
    name = "sasrec"
    description = 'SASRec: causal self-attention over the item sequence, next-item cross-entropy over all items.'
    train_overrides = {"epochs": 200, "patience": 10}  # chosen on the validation split (docs/benchmarks-cf.md)
    defaults = {"embedding_size": 64, "n_layers": 2, "n_heads": 2, "inner_size": 256, "dropout": 0.5,
                "max_len": 50}

    def __init__(self, n_users: int, n_items: int, **params):
        super().__init__(n_users, n_items, **params)
        p = self.params
        d = p["embedding_size"]
        if d % p["n_heads"]:  # config checks catch this when both sizes are set together
            raise InputError(f"SASRec: n_heads must divide embedding_size ({d}), got {p['n_heads']}")
        self.item = nn.Embedding(n_items + 1, d, padding_idx=n_items)
        self.position = nn.Embedding(p["max_len"], d)
        self.norm = nn.LayerNorm(d, eps=1e-12)
        self.dropout = nn.Dropout(p["dropout"])
        layer = nn.TransformerEncoderLayer(d, p["n_heads"], p["inner_size"], p["dropout"], activation="gelu",
                                           batch_first=True, layer_norm_eps=1e-12)
        self.encoder = nn.TransformerEncoder(layer, p["n_layers"], enable_nested_tensor=False)
        self.apply(self._init)

    @staticmethod
    def _init(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, 0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()

    def hidden_states(self, query: Query) -> torch.Tensor:
        history = query.truncate(self.max_len).history
        b, length = history.shape
        # left padding: the most recent item always sits at the last position embedding
        positions = torch.arange(self.max_len - length, self.max_len)
        x = self.dropout(self.norm(self.item(history) + self.position(positions)))
        pad = history == self.pad
        causal = torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)
        blocked = causal.unsqueeze(0) | pad.unsqueeze(1)  # [B, L(query), L(key)]
        blocked = blocked & ~torch.eye(length, dtype=torch.bool)  # every position may see itself (no empty rows)
        mask = blocked.repeat_interleave(self.params["n_heads"], dim=0)
        return self.encoder(x, mask=mask)
