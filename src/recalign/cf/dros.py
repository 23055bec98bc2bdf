"""DROS (Yang et al., SIGIR 2023, "A Generic Learning Framework for Sequential Recommendation with Distribution
Shifts"): any sequential model of the registry (SASRec by default, `backbone` picks GRU4Rec or Caser) trained
with its base loss plus a distributionally robust term

    loss = base + alpha * mean over targets of  log sum_j exp(w_j * (s_j - y_j)^2 / beta)

over ALL items j (s_j the raw score, y_j = 1 for the target, else 0) with the popularity prior
w_j = ((count_j + 1) / sum_k (count_k + 1)) ** prior_exponent from the training interactions. That is the
released code's form (the weight inside the exponent, no beta factor, raw scores); the paper writes the dual
of a KL ball, beta * log E_prior[exp(loss / beta)]. alpha = 0 is exactly the base loss.

The base loss is `train.objective`: ce (softmax over all items, the registry's default), or the reference's
sampled forms with `negatives` uniform negatives per target: bce (the target's label vs. 0 for negatives),
bpr, mse (squared error on raw scores). The backbone's own hyper-parameters are under `model.<backbone>`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from recalign.cf.base import Query, TrainData, bce_loss
from recalign.cf.caser import Caser
from recalign.cf.gru4rec import GRU4Rec
from recalign.cf.sasrec import SASRec
from recalign.cf.sequential import SequentialModel
from recalign.errors import InputError

BACKBONES = {"sasrec": SASRec, "gru4rec": GRU4Rec, "caser": Caser}


def dro_term(scores: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
             beta: float) -> torch.Tensor:
    """[T] log sum_j exp(w_j (s_j - y_j)^2 / beta) for scores [T, n], targets/labels [T], weights [n]."""
    y = torch.zeros_like(scores)
    y[torch.arange(len(targets)), targets] = labels.to(scores.dtype)
    return torch.logsumexp(weights * (scores - y) ** 2 / beta, dim=1)


def _positive_number(params: dict, key: str, allow_zero: bool = False) -> None:
    value = params[key]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (
        value >= 0 if allow_zero else value > 0)
    if not ok:
        raise InputError(f"model.{key}: expected a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r}")


class DROS(SequentialModel):
    name = "dros"
    description = ("DROS: a sequential model (SASRec, GRU4Rec or Caser) trained with a distributionally robust "
                   "loss under a popularity prior.")
    train_overrides = {"epochs": 200, "patience": 10}
    objectives = ("ce", "bce", "bpr", "mse")
    defaults = {"backbone": "sasrec", "alpha": 0.1, "beta": 1.0, "prior_exponent": 0.05, "negatives": 1,
                **{name: dict(cls.defaults) for name, cls in BACKBONES.items()}}  # only model.<backbone> is read

    def __init__(self, n_users: int, n_items: int, **params):
        nested = {name: params.pop(name) for name in BACKBONES if name in params}
        super().__init__(n_users, n_items, **params)  # checks the top-level keys
        p = self.params
        if p["backbone"] not in BACKBONES:
            raise InputError(f"model.backbone: expected one of {', '.join(BACKBONES)}, got {p['backbone']!r}")
        _positive_number(p, "alpha", allow_zero=True)
        _positive_number(p, "beta")
        _positive_number(p, "prior_exponent", allow_zero=True)
        if isinstance(p["negatives"], bool) or not isinstance(p["negatives"], int) or p["negatives"] < 0:
            raise InputError(f"model.negatives: expected an integer >= 0, got {p['negatives']!r}")
        for name, cls in BACKBONES.items():
            given = nested.get(name) or {}
            if not isinstance(given, dict):
                raise InputError(f"model.{name}: expected a mapping of {name} hyper-parameters, got {given!r}")
            p[name] = {**cls.defaults, **given}
        self.backbone = BACKBONES[p["backbone"]](n_users, n_items, **p[p["backbone"]])
        self.last_position_only = self.backbone.last_position_only
        self.window_stride = self.backbone.window_stride
        self.register_buffer("prior", torch.ones(n_items))

    @property
    def max_len(self) -> int | None:
        return self.backbone.max_len

    def prepare(self, data: TrainData) -> None:
        counts = torch.from_numpy(np.bincount(data.items, minlength=self.n_items).astype(np.float32)) + 1.0
        self.prior.copy_((counts / counts.sum()) ** self.params["prior_exponent"])

    # ----- everything but the loss is the backbone's
    def item_table(self) -> torch.Tensor:
        return self.backbone.item_table()

    def hidden_states(self, query: Query) -> torch.Tensor:
        return self.backbone.hidden_states(query)

    def sequence_representation(self, query: Query) -> torch.Tensor:
        return self.backbone.sequence_representation(query)

    def target_states(self, batch: dict):
        return self.backbone.target_states(batch)

    def loss(self, batch: dict, objective: str) -> torch.Tensor:
        states, targets, labels = self.target_states(batch)
        items = self.item_table()
        alpha = self.params["alpha"]
        scores = states @ items.T if objective == "ce" or alpha else None
        if objective == "ce":
            base = F.cross_entropy(scores, targets)
        else:
            base = self._sampled_loss(states, items, targets, labels, objective)
        if not alpha:
            return base
        return base + alpha * dro_term(scores, targets, labels, self.prior, self.params["beta"]).mean()

    def _sampled_loss(self, states, items, targets, labels, objective: str) -> torch.Tensor:
        k = self.params["negatives"]
        positive = (states * items[targets]).sum(-1)
        if not k:
            if objective != "bce":
                raise InputError(f"dros: train.objective {objective} needs model.negatives >= 1")
            return bce_loss(positive, labels)
        # uniform over the items other than the target
        negatives = torch.randint(0, self.n_items - 1, (len(targets), k))
        negatives = negatives + (negatives >= targets[:, None]).long()
        negative = torch.einsum("td,tkd->tk", states, items[negatives])
        if objective == "bpr":
            return -F.logsigmoid(positive[:, None] - negative).mean()
        logits = torch.cat([positive[:, None], negative], 1)  # [T, 1 + k]
        y = torch.cat([labels.to(logits.dtype)[:, None], torch.zeros_like(negative)], 1)
        if objective == "mse":
            return ((logits - y) ** 2).mean()
        return F.binary_cross_entropy_with_logits(logits, y)
