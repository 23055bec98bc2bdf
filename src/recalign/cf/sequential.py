"""Shared pieces of the sequential models (GRU4Rec, Caser, SASRec).

Each subclass implements `hidden_states(query) -> [B, L, d]` over the left-padded history (the last
column is the most recent item). Scores are hidden states dotted with the (shared) item embedding table;
training uses next-item cross-entropy over all items (default) or BCE on the target's label.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from recalign.cf.base import CFModel, Query, bce_loss, dot_scores


class SequentialModel(CFModel):
    kind = "sequential"
    objectives = ("ce", "bce")
    window_stride = None  # windows of max_len, a new one every `stride` targets (None = max_len // 2)
    last_position_only = False  # True: the model has one output per window (Caser), trained on the last target

    @property
    def stride(self) -> int:
        return 1 if self.last_position_only else (self.window_stride or max(1, self.max_len // 2))

    def item_table(self) -> torch.Tensor:
        """[n_items, d] output item embeddings (without the padding row)."""
        return self.item.weight[:self.n_items]

    def item_embeddings(self) -> torch.Tensor:
        return self.item_table()

    def sequence_representation(self, query: Query) -> torch.Tensor:
        return self.hidden_states(query.truncate(self.max_len))[:, -1]

    def query_embedding(self, query: Query) -> torch.Tensor:
        return self.sequence_representation(query)

    def score(self, query: Query, items: torch.Tensor | None = None) -> torch.Tensor:
        return dot_scores(self.sequence_representation(query), self.item_table(), items)

    def target_states(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(states [T, d], targets [T], labels [T]) at the training targets of a window batch: every masked
        position, or the last one for a model with one output per window. Losses built on top of a
        model (DROS) read it."""
        query = Query(batch["users"], batch["inputs"])
        if self.last_position_only:
            return self.sequence_representation(query), batch["targets"][:, -1], batch["labels"][:, -1]
        mask = batch["mask"]
        return self.hidden_states(query)[mask], batch["targets"][mask], batch["labels"][mask]

    def loss(self, batch: dict, objective: str) -> torch.Tensor:
        states, targets, labels = self.target_states(batch)
        if objective == "bce":
            logits = (states * self.item_table()[targets]).sum(-1)
            return bce_loss(logits, labels)
        return F.cross_entropy(states @ self.item_table().T, targets)
