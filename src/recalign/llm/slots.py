"""Slot modules: the small trainable modules whose outputs fill placeholder slots in a prompt
(`Backbone` replaces the placeholder's input embeddings with them; gradients flow back to the module).

- `CIE` (CoLLM's collaborative information encoder): Linear(d, m·d) → ReLU → Linear(m·d, hidden·k), mapping a
  CF user/item embedding to k input-token embeddings of the LLM.
- `SoftPrompt`: k free vectors (prompt tuning), the same for every prompt.
- `SeqProjector` (RecInterpreter): a sequential recommender's per-position hidden states [B, L, d] -> k tokens:
  pooling over the L positions (the reference's Conv2d with an (L, 1) kernel, one output channel per token;
  or mean / last position), then Linear(d, hidden).
"""

from __future__ import annotations

import torch
from torch import nn

from recalign.errors import InputError


class CIE(nn.Module):
    def __init__(self, cf_dim: int, hidden_size: int, tokens: int = 1, hidden_mult: int = 10):
        super().__init__()
        if tokens < 1 or hidden_mult < 1:
            raise InputError(f"cie.tokens and cie.hidden_mult must be >= 1, got {tokens} and {hidden_mult}")
        self.tokens, self.hidden_size = tokens, hidden_size
        self.net = nn.Sequential(nn.Linear(cf_dim, hidden_mult * cf_dim), nn.ReLU(),
                                 nn.Linear(hidden_mult * cf_dim, hidden_size * tokens))

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        """[B, d] -> [B, k, hidden]"""
        return self.net(vectors).view(vectors.shape[0], self.tokens, self.hidden_size)


class SeqProjector(nn.Module):
    POOLINGS = ("conv", "mean", "last")

    def __init__(self, positions: int, state_dim: int, hidden_size: int, tokens: int = 1, pooling: str = "conv"):
        super().__init__()
        if tokens < 1 or positions < 1:
            raise InputError(f"projector.tokens and the number of positions must be >= 1, got {tokens} and {positions}")
        if pooling not in self.POOLINGS:
            raise InputError(f"projector.pooling: expected one of {', '.join(self.POOLINGS)}, got {pooling!r}")
        self.positions, self.tokens, self.hidden_size, self.pooling = positions, tokens, hidden_size, pooling
        if pooling == "conv":
            self.conv = nn.Conv2d(1, tokens, (positions, 1))
            self.linear = nn.Linear(state_dim, hidden_size)
        else:
            self.linear = nn.Linear(state_dim, hidden_size * tokens)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """[B, L, d] -> [B, k, hidden]"""
        if states.dim() != 3 or states.shape[1] != self.positions:
            raise InputError(f"projector: expected hidden states [B, {self.positions}, d], got {tuple(states.shape)}")
        if self.pooling == "conv":
            pooled = self.conv(states.unsqueeze(1)).squeeze(2)  # [B, k, d]
            return self.linear(pooled)
        pooled = states.mean(1) if self.pooling == "mean" else states[:, -1]
        return self.linear(pooled).view(states.shape[0], self.tokens, self.hidden_size)


class SoftPrompt(nn.Module):
    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.vectors = nn.Parameter(init.detach().clone().float())

    @property
    def tokens(self) -> int:
        return self.vectors.shape[0]

    def forward(self, batch_size: int) -> torch.Tensor:
        """[B, k, hidden] (the same k vectors for every row)."""
        return self.vectors.unsqueeze(0).expand(batch_size, -1, -1)


def soft_prompt_init(embedding: nn.Embedding, token_ids: list[int], tokens: int, seed: int) -> torch.Tensor:
    """Lester et al.'s initialisation: the embeddings of a text's tokens (repeated to k), or of random
    vocabulary tokens when there is no text."""
    weight = embedding.weight.detach().float().cpu()
    if token_ids:
        ids = [token_ids[i % len(token_ids)] for i in range(tokens)]
    else:
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, min(weight.shape[0], 5000), (tokens,), generator=generator).tolist()
    return weight[torch.tensor(ids)].clone()
