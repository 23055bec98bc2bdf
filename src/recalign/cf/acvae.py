"""ACVAE (Xie et al., WWW 2021, "Adversarial and Contrastive Variational Autoencoder for Sequential
Recommendation"). Per position t of the history:

- encoder: item embedding -> GRU (GRU4Rec's) -> an implicit posterior q(z_t | x_<=t): noise is injected
  inside a causal convolutional network, so z_t has no closed-form density;
- decoder: z_t -> linear -> tanh -> linear over all items, softmax likelihood of the next item;
- the Gaussian KL term is replaced by an adversary T(x_t, z_t) (adversarial variational Bayes): trained to
  tell posterior samples from N(0, I) samples, its logit estimates log q(z|x) - log p(z), and the model
  pays `kl_weight` * mean T(x, z);
- a contrastive term: a GRU critic over the (x, z) sequence separates matching pairs from z shuffled across
  the batch (a Jensen-Shannon mutual-information bound that model and critic both maximise), weighted by
  `contrast_weight`.

One optimiser serves the min-max game: the model's loss reads the adversary with detached parameters and
the adversary's loss reads detached (x, z), so one backward pass gives every parameter the gradient of its
own objective; the reference also steps the adversary on the (x, z) of the same batch. Scoring uses the
noise-free posterior (injected noise = 0), so scores are deterministic.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from recalign.cf.base import Query, dot_scores
from recalign.cf.gru4rec import GRU4Rec
from recalign.cf.sequential import SequentialModel
from recalign.errors import InputError


class NoiseInjection(nn.Module):
    """x + tanh(W eps + b), eps ~ N(0, I) while training, eps = 0 in eval mode."""

    def __init__(self, d: int):
        super().__init__()
        self.linear = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = torch.randn_like(x) if self.training else torch.zeros_like(x)
        return x + torch.tanh(self.linear(eps))


class Posterior(nn.Module):
    """The reference's convolutional implicit posterior, made causal (z_t reads positions <= t only)."""

    def __init__(self, d: int, latent: int, kernel: int = 5, dropout: float = 0.5):
        super().__init__()
        self.kernel = kernel
        self.noise1, self.noise2 = NoiseInjection(d), NoiseInjection(d)
        self.pointwise = nn.Conv1d(d, d, 1)
        self.conv = nn.Conv1d(d, 2 * d, kernel)
        self.mix = nn.Conv1d(2 * d, d, 1)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(d, latent)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # [B, L, d] -> [B, L, latent]
        y = F.softplus(self.pointwise(self.noise1(h).transpose(1, 2)))
        y = F.pad(self.noise2(y.transpose(1, 2)).transpose(1, 2), (self.kernel - 1, 0))
        y = F.softplus(self.mix(F.softplus(self.conv(y)))).transpose(1, 2)
        return self.out(self.dropout(h + y))


class PriorAdversary(nn.Module):
    """T(x, z) per latent dimension; its logit estimates log q(z|x) - log p(z) (the reference's residual MLP)."""

    def __init__(self, d: int, latent: int, width: int = 128, dropout: float = 0.2):
        super().__init__()
        self.inp = nn.Linear(d + latent, width)
        self.inner = nn.ModuleList(nn.Linear(width, width) for _ in range(4))
        self.out = nn.Linear(width, latent)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        net = self.dropout(self.inp(torch.cat([x, z], -1)))
        for a, b in zip(self.inner[::2], self.inner[1::2]):
            net = F.elu(net + b(a(net)))
        return self.dropout(self.out(net)) + 0.5 * z ** 2  # + the log N(0, I) term up to a constant


def right_aligned_gru(gru: nn.GRU, inputs: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """Run `gru` over left-padded inputs [B, L, k] (pad [B, L] bool) as if the padding were not there."""
    length = inputs.shape[1]
    shift = pad.sum(1, keepdim=True)
    steps = torch.arange(length).unsqueeze(0)
    moved = inputs.gather(1, ((steps + shift) % length).unsqueeze(-1).expand_as(inputs))
    out, _ = gru(moved)
    return out.gather(1, ((steps - shift) % length).unsqueeze(-1).expand(-1, -1, out.shape[-1]))


class ACVAE(SequentialModel):
    name = "acvae"
    description = ("ACVAE: sequential VAE with an adversarially estimated KL, a contrastive mutual-information "
                   "term and a softmax decoder over items.")
    train_overrides = {"epochs": 200, "patience": 10}
    defaults = {"embedding_size": 64, "hidden_size": 128, "latent_size": 64, "dropout": 0.5, "max_len": 50,
                "kl_weight": 0.05, "contrast_weight": 0.1}

    def __init__(self, n_users: int, n_items: int, **params):
        super().__init__(n_users, n_items, **params)
        p = self.params
        for key in ("kl_weight", "contrast_weight"):
            value = p[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise InputError(f"model.{key}: expected a finite number >= 0, got {value!r}")
        for key in ("embedding_size", "hidden_size", "latent_size", "max_len"):
            if isinstance(p[key], bool) or not isinstance(p[key], int) or p[key] < 1:
                raise InputError(f"model.{key}: expected an integer >= 1, got {p[key]!r}")
        d, latent = p["embedding_size"], p["latent_size"]
        self.encoder = GRU4Rec(n_users, n_items, embedding_size=d, hidden_size=p["hidden_size"], n_layers=1,
                               dropout=p["dropout"], max_len=p["max_len"])
        self.posterior = Posterior(d, latent, dropout=p["dropout"])
        self.decoder_hidden = nn.Linear(latent, d)
        self.decoder_out = nn.Linear(d, n_items)
        self.adversary = PriorAdversary(d, latent)
        self.critic = nn.GRU(d + latent, d, batch_first=True)  # the reference's is 128 wide: the slowest part
        self.critic_out = nn.Linear(d, 1)
        nn.init.xavier_normal_(self.decoder_hidden.weight)
        nn.init.xavier_normal_(self.decoder_out.weight)

    # ----- scoring: tanh(W z + b) against the decoder's output rows (+ bias)
    @property
    def item_bias(self) -> torch.Tensor:
        return self.decoder_out.bias

    def item_table(self) -> torch.Tensor:
        return self.decoder_out.weight

    def _latent(self, query: Query) -> tuple[torch.Tensor, torch.Tensor]:
        """(z [B, L, latent], input item embeddings [B, L, d]) of the truncated history."""
        query = query.truncate(self.max_len)
        return self.posterior(self.encoder.hidden_states(query)), self.encoder.item(query.history)

    def hidden_states(self, query: Query) -> torch.Tensor:
        z, _ = self._latent(query)
        return torch.tanh(self.decoder_hidden(z))

    def score(self, query: Query, items: torch.Tensor | None = None) -> torch.Tensor:
        return dot_scores(self.sequence_representation(query), self.item_table(), items, self.item_bias)

    # ----- training
    def loss(self, batch: dict, objective: str) -> torch.Tensor:
        history = batch["inputs"]
        z, x = self._latent(Query(batch["users"], history))
        mask, targets = batch["mask"], batch["targets"][batch["mask"]]
        logits = torch.tanh(self.decoder_hidden(z[mask])) @ self.item_table().T + self.item_bias
        if objective == "bce":
            likelihood = F.binary_cross_entropy_with_logits(
                logits.gather(1, targets[:, None])[:, 0], batch["labels"][mask].float())
        else:
            likelihood = F.cross_entropy(logits, targets)
        loss = likelihood
        if self.params["kl_weight"]:
            frozen = {k: v.detach() for k, v in self.adversary.named_parameters()}
            kl = functional_call(self.adversary, frozen, (x[mask], z[mask])).mean()
            loss = loss + self.params["kl_weight"] * kl + self._adversary_loss(x[mask], z[mask])
        if self.params["contrast_weight"]:
            loss = loss + self.params["contrast_weight"] * self._contrast(x, z, history == self.pad, mask)
        return loss

    def _contrast(self, x, z, pad, mask) -> torch.Tensor:
        """Jensen-Shannon MI bound: matching (x, z) sequences vs. z rolled by one row of the batch."""
        pairs = torch.cat([torch.cat([x, z], -1), torch.cat([x, torch.cat([z[1:], z[:1]])], -1)])  # one GRU pass
        joint, marginal = self.critic_out(right_aligned_gru(self.critic, pairs, pad.repeat(2, 1)))[..., 0].chunk(2)
        return (F.softplus(-joint[mask]) + F.softplus(marginal[mask])).mean()

    def _adversary_loss(self, x, z) -> torch.Tensor:
        """The adversary's own objective on detached inputs: posterior samples -> 1, prior samples -> 0."""
        x, z = x.detach(), z.detach()
        posterior = self.adversary(x, z)
        prior = self.adversary(x, torch.randn_like(z))
        return (F.softplus(-posterior) + F.softplus(prior)).mean()
