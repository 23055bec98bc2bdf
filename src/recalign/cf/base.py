"""The one interface every collaborative model implements, and the data it trains and is queried on.

Conventions
- Items are dense ids 0..n_items-1; `n_items` itself is the padding id (PAD) in history tensors.
- A `Query` is a batch of (user, history): `users` [B] (-1 = unknown user) and `history` [B, L], the
  items the user interacted with before the target, oldest first, LEFT-padded with PAD (so the most
  recent item is always in the last column). Non-sequential models read the user id (MF, LightGCN) or
  the history as a set (ItemCF, UserCF, FISM); sequential models read the (truncated) sequence.
- `score(query)` -> [B, n_items]; `score(query, items)` with items [K] or [B, K] -> [B, K];
  `score_pairs(query, targets[B])` -> [B] (CTR mode: one logit per (user/history, target) pair).
- `TrainData` is what `fit` consumes. It is built from an interaction log (any set of (user, item[,
  timestamp, label]) rows, e.g. a leave-one-out train part) or from a sample set (rows with a `history`
  tuple and a target `item`, e.g. 1024 few-shot samples).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch import nn
import torch.nn.functional as F

from recalign.errors import InputError


# ----------------------------------------------------------------------------------------------- data
@dataclass
class TrainData:
    """Training material for every kind of model.

    pairs:     users/items/labels [N] — one row per (user, item) interaction or sample target.
    sequences: per sequence the item ids in time order, the labels aligned with them, the owning user,
               and `target_from`: the first position whose item is a training target (1 for a log: every
               item after the first is predicted from the ones before it; len-1 for a sample: only the
               target is predicted from its history).
    matrix:    user x item CSR of the positive interactions (history items included for samples): kNN
               similarities, FISM's item sets, LightGCN's graph and negative sampling read it.
    """

    n_users: int
    n_items: int
    users: np.ndarray
    items: np.ndarray
    labels: np.ndarray
    seq_items: list[np.ndarray]
    seq_labels: list[np.ndarray]
    seq_users: np.ndarray
    seq_target_from: np.ndarray
    matrix: sp.csr_matrix = field(repr=False)

    @property
    def n_pairs(self) -> int:
        return len(self.users)

    @classmethod
    def from_interactions(cls, frame: pd.DataFrame, n_users: int, n_items: int) -> "TrainData":
        """An interaction log: columns user, item and optionally timestamp (order within a user; input order
        otherwise) and label (bool; default all True). Every row counts as an implicit positive for
        BPR / CE / kNN; BCE reads `label`."""
        _check_columns(frame, ("user", "item"), "interactions")
        frame = frame.reset_index(drop=True)
        if "timestamp" in frame:
            frame = frame.sort_values(["user", "timestamp"], kind="stable")
        else:
            frame = frame.sort_values("user", kind="stable")
        users = frame["user"].to_numpy(np.int64)
        items = frame["item"].to_numpy(np.int64)
        labels = frame["label"].to_numpy(bool) if "label" in frame else np.ones(len(frame), bool)
        _check_ids(users, n_users, "user")
        _check_ids(items, n_items, "item")
        bounds = np.flatnonzero(np.diff(users)) + 1
        starts = np.concatenate([[0], bounds]) if len(users) else np.zeros(0, np.int64)
        seq_items = np.split(items, bounds) if len(users) else []
        seq_labels = np.split(labels, bounds) if len(users) else []
        matrix = _csr(users, items, n_users, n_items)
        return cls(n_users, n_items, users, items, labels, seq_items, seq_labels, users[starts].copy(),
                   np.ones(len(seq_items), np.int64), matrix)

    @classmethod
    def from_samples(cls, frame: pd.DataFrame, n_users: int, n_items: int) -> "TrainData":
        """A sample set: columns user, item (the target), history (tuple of earlier items, oldest first)
        and optionally label. Sequential models learn target-given-history; the others learn the
        (user, target) pairs; the matrix holds targets and history items per user."""
        _check_columns(frame, ("user", "item", "history"), "samples")
        frame = frame.reset_index(drop=True)
        users = frame["user"].to_numpy(np.int64)
        items = frame["item"].to_numpy(np.int64)
        labels = frame["label"].to_numpy(bool) if "label" in frame else np.ones(len(frame), bool)
        _check_ids(users, n_users, "user")
        _check_ids(items, n_items, "item")
        seq_items, seq_labels, hist_users, hist_items = [], [], [], []
        for user, item, label, history in zip(users, items, labels, frame["history"]):
            history = np.asarray(history, dtype=np.int64)
            _check_ids(history, n_items, "history item")
            seq_items.append(np.concatenate([history, [item]]))
            seq_labels.append(np.concatenate([np.ones(len(history), bool), [label]]))
            hist_users.append(np.full(len(history), user))
            hist_items.append(history)
        lengths = np.array([len(s) for s in seq_items], dtype=np.int64)
        all_users = np.concatenate([users, *hist_users]) if hist_users else users
        all_items = np.concatenate([items, *hist_items]) if hist_items else items
        matrix = _csr(all_users, all_items, n_users, n_items)
        return cls(n_users, n_items, users, items, labels, seq_items, seq_labels, users.copy(),
                   np.maximum(lengths - 1, 0), matrix)

    @classmethod
    def from_any(cls, data, n_users: int | None = None, n_items: int | None = None) -> "TrainData":
        """TrainData, a Dataset (its whole log), or a DataFrame (a sample set if it has `history`)."""
        if isinstance(data, TrainData):
            return data
        if hasattr(data, "interactions") and hasattr(data, "n_items"):  # recalign.data.Dataset
            return cls.from_interactions(data.interactions, n_users or data.n_users, n_items or data.n_items)
        if isinstance(data, pd.DataFrame):
            if n_users is None or n_items is None:
                raise InputError("train_cf_model: pass n_users and n_items (or catalog=Dataset) with a DataFrame")
            if "history" in data:
                return cls.from_samples(data, n_users, n_items)
            return cls.from_interactions(data, n_users, n_items)
        raise InputError(f"cannot train a CF model on {type(data).__name__}; expected a Dataset, a DataFrame "
                         "of interactions/samples, or TrainData")


def _check_columns(frame: pd.DataFrame, columns, what: str) -> None:
    missing = [c for c in columns if c not in frame]
    if missing:
        raise InputError(f"{what}: missing column(s) {', '.join(missing)}; have {', '.join(map(str, frame.columns))}")


def _check_ids(ids: np.ndarray, n: int, what: str) -> None:
    if len(ids) and (ids.min() < 0 or ids.max() >= n):
        bad = ids[(ids < 0) | (ids >= n)][0]
        raise InputError(f"{what} id {int(bad)} is outside 0..{n - 1}")


def _csr(users, items, n_users, n_items) -> sp.csr_matrix:
    matrix = sp.csr_matrix((np.ones(len(users), np.float32), (users, items)), shape=(n_users, n_items))
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    return matrix


@dataclass
class Query:
    """A batch of (user, history) to score. See the module docstring for the layout."""

    users: torch.Tensor  # [B] long, -1 = unknown user
    history: torch.Tensor  # [B, L] long, left-padded with PAD = n_items

    def __len__(self) -> int:
        return len(self.users)

    def lengths(self, pad: int) -> torch.Tensor:
        return (self.history != pad).sum(1)

    def truncate(self, max_len: int) -> "Query":
        return Query(self.users, self.history[:, -max_len:]) if self.history.shape[1] > max_len else self


def make_query(users, histories, n_items: int, max_len: int | None = None) -> Query:
    """Build a Query from user ids and a list of histories (sequences of item ids, oldest first).

    `max_len` keeps only the most recent items (None: all)."""
    users = torch.as_tensor(np.array(users, dtype=np.int64))  # a copy: the input may be read-only
    histories = [np.asarray(h, dtype=np.int64)[-max_len:] if max_len else np.asarray(h, dtype=np.int64)
                 for h in histories]
    width = max([len(h) for h in histories] + [1])
    out = np.full((len(histories), width), n_items, dtype=np.int64)
    for row, h in enumerate(histories):
        if len(h):
            out[row, width - len(h):] = h
    return Query(users, torch.from_numpy(out))


def history_mask(query: Query, n_items: int) -> torch.Tensor:
    """[B, n_items] bool: True where the item is in the query's history."""
    mask = torch.zeros(len(query), n_items + 1, dtype=torch.bool)
    mask.scatter_(1, query.history, True)
    return mask[:, :n_items]


def history_csr(query: Query, n_items: int) -> sp.csr_matrix:
    """[B, n_items] scipy CSR binary matrix of the histories (duplicates counted once)."""
    history = query.history.numpy()
    rows, cols = np.nonzero(history != n_items)
    matrix = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, history[rows, cols])),
                           shape=(len(history), n_items))
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    return matrix


def csr_tensor(matrix: sp.spmatrix) -> torch.Tensor:
    """A scipy matrix as a torch sparse CSR tensor (float32)."""
    import warnings

    matrix = matrix.tocsr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(torch.from_numpy(matrix.indptr.astype(np.int64)),
                                       torch.from_numpy(matrix.indices.astype(np.int64)),
                                       torch.from_numpy(matrix.data.astype(np.float32)), size=matrix.shape)


# --------------------------------------------------------------------------------------------- losses
def bpr_loss(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    return -F.logsigmoid(pos - neg).mean()


def bce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, labels.float())


# ---------------------------------------------------------------------------------------------- model
class CFModel(nn.Module):
    """Base class. Subclasses set `name`, `defaults` (hyper-parameters) and the class flags, and implement
    `score`. Trainable models also implement `loss(batch, objective)`.

    kind: "memory" (statistics computed in `prepare`, no epochs), "embedding" (user/item embeddings,
          pair batches) or "sequential" (sequence batches).
    objectives: the training objectives the model supports; the first is its default.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""  # one line for `recalign methods`
    train_overrides: ClassVar[dict] = {}  # trainer settings that differ from cf.TRAIN_DEFAULTS for this model
    kind: ClassVar[str] = "embedding"
    objectives: ClassVar[tuple[str, ...]] = ("bpr", "bce")
    defaults: ClassVar[dict] = {}

    def __init__(self, n_users: int, n_items: int, **params):
        super().__init__()
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise InputError(f"{self.name}: unknown model parameter(s) {', '.join(unknown)}; "
                             f"valid: {', '.join(sorted(self.defaults)) or 'none'}")
        self.n_users, self.n_items = int(n_users), int(n_items)
        self.params = {**self.defaults, **params}
        self.pad = self.n_items

    @property
    def sequential(self) -> bool:
        return self.kind == "sequential"

    @property
    def trainable(self) -> bool:
        return self.kind != "memory"

    @property
    def max_len(self) -> int | None:
        """How many recent history items the model reads (None: all)."""
        return self.params.get("max_len")

    # ----- training
    def prepare(self, data: TrainData) -> None:
        """Called once by the trainer before the first epoch (and on load for memory models)."""

    def loss(self, batch: dict, objective: str) -> torch.Tensor:
        raise NotImplementedError(f"{self.name} is not trained by gradient descent")

    # ----- scoring
    def score(self, query: Query, items: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def score_pairs(self, query: Query, targets: torch.Tensor) -> torch.Tensor:
        """One score per (user/history, target) pair: [B] (CTR mode; logits for BCE-trained models)."""
        return self.score(query, targets.view(-1, 1)).squeeze(1)

    # ----- representations (for CoLLM, BIGRec, RecInterpreter)
    def item_embeddings(self) -> torch.Tensor:
        """[n_items, d] the item vectors the model scores against."""
        raise NotImplementedError(f"{self.name} has no item embeddings")

    def user_embeddings(self) -> torch.Tensor:
        """[n_users, d] (embedding models only; sequential models represent a user by the history)."""
        raise NotImplementedError(f"{self.name} has no user embeddings; use query_embedding(query)")

    def query_embedding(self, query: Query) -> torch.Tensor:
        """[B, d] the vector that is dotted with `item_embeddings()` to score (user / history / sequence)."""
        raise NotImplementedError(f"{self.name} has no query embedding")

    def hidden_states(self, query: Query) -> torch.Tensor:
        """[B, L, d] per-position hidden states of the (truncated, left-padded) history (sequential)."""
        raise NotImplementedError(f"{self.name} is not a sequential model")

    def sequence_representation(self, query: Query) -> torch.Tensor:
        """[B, d] the representation of the whole history (sequential models)."""
        raise NotImplementedError(f"{self.name} is not a sequential model")

    # ----- persistence
    def checkpoint(self) -> dict:
        return {"name": self.name, "n_users": self.n_users, "n_items": self.n_items, "params": self.params,
                "state": {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in self.state_dict().items()}}

    def save(self, path) -> None:
        """`checkpoint()` as one safetensors state file (`recalign.io.save_state`, atomic; no pickle);
        `cf.load_model(path)` reads it back."""
        from recalign.io import save_state

        save_state(path, self.checkpoint())


def select_items(scores: torch.Tensor, items: torch.Tensor | None) -> torch.Tensor:
    """Pick columns out of full-catalogue scores [B, n]: items None -> all; [K] -> [B, K]; [B, K] -> [B, K]."""
    if items is None:
        return scores
    if items.dim() == 1:
        return scores[:, items]
    return scores.gather(1, items)


def dot_scores(query_vectors: torch.Tensor, item_vectors: torch.Tensor, items: torch.Tensor | None,
               item_bias: torch.Tensor | None = None) -> torch.Tensor:
    """query [B, d] against all items (matmul) or against given items [K] / [B, K]."""
    if items is None:
        out = query_vectors @ item_vectors.T
        return out + item_bias if item_bias is not None else out
    if items.dim() == 1:
        out = query_vectors @ item_vectors[items].T
        return out + item_bias[items] if item_bias is not None else out
    out = torch.einsum("bd,bkd->bk", query_vectors, item_vectors[items])
    return out + item_bias[items] if item_bias is not None else out
