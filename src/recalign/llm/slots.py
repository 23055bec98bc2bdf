"""Slot modules: the small trainable modules whose outputs fill placeholder slots in a prompt
(`Backbone` replaces the placeholder's input embeddings with them; gradients flow back to the module).

- `CIE` (CoLLM's collaborative information encoder): Linear(d, m·d) → ReLU → Linear(m·d, hidden·k), mapping a
  CF user/item embedding to k input-token embeddings of the LLM.
- `SoftPrompt`: k free vectors (prompt tuning), the same for every prompt.
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
