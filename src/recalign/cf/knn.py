"""Memory-based CF with cosine similarity and k nearest neighbours on scipy sparse matrices.

ItemCF: sim(i, j) = |U_i ∩ U_j| / sqrt(|U_i| |U_j|) (+ shrink in the denominator); each target item keeps
its k most similar items; score(h, j) = sum over history items i of sim(i, j).
UserCF: the query's history vector is compared with every training user's row by cosine; the k most
similar users (the query's own user excluded) vote: score(h, j) = sum_v sim(h, v) * R[v, j].
Both read the query's history (any set of items), so they score histories of unseen users too.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from recalign.cf.base import CFModel, Query, TrainData, history_csr, select_items


def _top_k_per_row(dense: np.ndarray, k: int) -> sp.csr_matrix:
    """Keep the k largest positive entries of each row."""
    k = min(k, dense.shape[1])
    cols = np.argpartition(-dense, k - 1, axis=1)[:, :k]
    rows = np.repeat(np.arange(dense.shape[0]), k)
    values = dense[rows, cols.ravel()]
    keep = values > 0
    return sp.csr_matrix((values[keep], (rows[keep], cols.ravel()[keep])), shape=dense.shape, dtype=np.float32)


class _SparseState:
    """Mixin: keep named scipy matrices in the state_dict (extra state), so save -> load is exact."""

    _sparse: tuple[str, ...] = ()

    def get_extra_state(self):
        out = {}
        for name in self._sparse:
            m = getattr(self, name, None)
            if m is not None:
                out[name] = {"data": m.data, "indices": m.indices, "indptr": m.indptr, "shape": m.shape}
        return out

    def set_extra_state(self, state):
        for name, m in state.items():
            setattr(self, name, sp.csr_matrix((m["data"], m["indices"], m["indptr"]), shape=m["shape"]))


class ItemCF(_SparseState, CFModel):
    name = "itemcf"
    description = 'ItemCF: cosine item-item similarity, k nearest neighbours of each item (scipy sparse).'
    kind = "memory"
    objectives = ("cosine",)
    defaults = {"k": 100, "shrink": 0.0, "positives_only": False}
    _sparse = ("similarity",)

    def __init__(self, n_users: int, n_items: int, **params):
        super().__init__(n_users, n_items, **params)
        self.similarity = sp.csr_matrix((n_items, n_items), dtype=np.float32)

    def prepare(self, data: TrainData) -> None:
        matrix = _train_matrix(data, self.params["positives_only"])
        co = (matrix.T @ matrix).toarray().astype(np.float32)  # item x item co-occurrence (dense: 1.7k^2)
        norms = np.sqrt(np.diag(co)).astype(np.float32)
        sim = co / (np.outer(norms, norms) + self.params["shrink"] + 1e-12)
        np.fill_diagonal(sim, 0.0)
        # column j holds the neighbours of target j: keep the top k of each column
        self.similarity = _top_k_per_row(sim.T, self.params["k"]).T.tocsr()

    def score(self, query: Query, items: torch.Tensor | None = None) -> torch.Tensor:
        history = history_csr(query, self.n_items)
        if items is not None and items.dim() == 1:
            return torch.from_numpy((history @ self.similarity[:, items.numpy()]).toarray())
        return select_items(torch.from_numpy((history @ self.similarity).toarray()), items)

    def item_embeddings(self) -> torch.Tensor:
        """Rows of the (sparse, top-k) item-item similarity matrix, densified."""
        return torch.from_numpy(self.similarity.T.toarray())


class UserCF(_SparseState, CFModel):
    name = "usercf"
    description = 'UserCF: cosine similarity between users, k nearest neighbours vote (scipy sparse).'
    kind = "memory"
    objectives = ("cosine",)
    defaults = {"k": 100, "shrink": 0.0, "positives_only": False}
    _sparse = ("matrix",)

    def __init__(self, n_users: int, n_items: int, **params):
        super().__init__(n_users, n_items, **params)
        self.matrix = sp.csr_matrix((n_users, n_items), dtype=np.float32)

    def prepare(self, data: TrainData) -> None:
        self.matrix = _train_matrix(data, self.params["positives_only"])

    def score(self, query: Query, items: torch.Tensor | None = None) -> torch.Tensor:
        history = history_csr(query, self.n_items)
        row_norm = np.sqrt(np.asarray(self.matrix.sum(1)).ravel()) + 1e-12
        query_norm = np.sqrt(np.asarray(history.sum(1)).ravel()) + 1e-12
        sim = (history @ self.matrix.T).toarray() / (np.outer(query_norm, row_norm) + self.params["shrink"])
        users = query.users.numpy()
        known = np.flatnonzero((users >= 0) & (users < self.n_users))
        sim[known, users[known]] = 0.0  # a user is not their own neighbour
        neighbours = _top_k_per_row(sim.astype(np.float32), self.params["k"])
        target = self.matrix if items is None or items.dim() == 2 else self.matrix[:, items.numpy()]
        out = torch.from_numpy((neighbours @ target).toarray())
        return out if items is None or items.dim() == 1 else select_items(out, items)


def _train_matrix(data: TrainData, positives_only: bool) -> sp.csr_matrix:
    if not positives_only:
        return data.matrix.astype(np.float32).tocsr()
    keep = data.labels
    m = sp.csr_matrix((np.ones(int(keep.sum()), np.float32), (data.users[keep], data.items[keep])),
                      shape=(data.n_users, data.n_items))
    m.sum_duplicates()
    m.data[:] = 1.0
    return m
