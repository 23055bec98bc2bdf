"""Grounding generated text to catalogue items (BIGRec step 2), and the statistical injections.

- `l2_topk`: exact L2 top-K of queries against a catalogue by batched matrix products, chunked over the
  catalogue with a running top-K, so a 1M-item catalogue never materialises a [queries, items] matrix.
  Candidates (K + margin) come from the expansion ||c||^2 - 2 q.c (float32 GEMM, where cancellation can
  cost precision when norms are large relative to distances); they are re-scored directly as ||q - c||
  (no cancellation) and sorted by (distance, index), so the result matches a float64 brute force unless
  two distances agree to float32 precision, or an item's expansion error exceeds the margin's gap.
- `l2_distances`: the full [queries, items] distance matrix, chunked (what evaluation on a modest
  catalogue needs: ranks of the target, min-max normalisation per sample).
- `CatalogueCache`: catalogue-title embeddings stored atomically on disk, keyed by the model's identity and
  a hash of the titles (and the pooling), so a change of either recomputes them.
- `inject`: score = (1 + X~)^(-gamma) * D~ (rank ascending), with D~ the per-sample min-max normalised
  distance and X~ a min-max normalised popularity (one vector) or CF score (per sample) — BIGRec's
  popularity and collaborative injection.
- `select_gamma`: gamma chosen on validation per metric (HR's gamma on HR), applied to test.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from recalign.errors import InputError
from recalign.eval.metrics import ranking_metrics, target_ranks

# Elements of one [query block, item chunk] distance tile (8 MB of float32): 256 queries x 8192 items.
TILE_ELEMENTS = 1 << 21


def _as_float(x) -> torch.Tensor:
    t = torch.as_tensor(x)
    return t if t.dtype == torch.float32 else t.float()


def _check_pair(queries: torch.Tensor, catalogue: torch.Tensor) -> None:
    if queries.dim() != 2 or catalogue.dim() != 2:
        raise InputError(f"grounding: expected 2-D query and catalogue embeddings, got {tuple(queries.shape)} "
                         f"and {tuple(catalogue.shape)}")
    if queries.shape[1] != catalogue.shape[1]:
        raise InputError(f"grounding: query dimension {queries.shape[1]} differs from catalogue dimension "
                         f"{catalogue.shape[1]} (embedded with different models?)")
    if catalogue.shape[0] == 0:
        raise InputError("grounding: the catalogue is empty")


def _blocks(n_queries: int, n_items: int, chunk_size: int | None, query_block: int = 256) -> tuple[int, int]:
    # queries in blocks (bounds the float64 re-scoring gather), items in chunks: tiles of a few MB stay in
    # cache, which measured ~1.5-2x faster than 64 MB tiles on a 2-core EPYC (bench/bigrec.py)
    q_block = max(1, min(n_queries, query_block))
    chunk = chunk_size or max(1024, min(n_items, TILE_ELEMENTS // q_block))
    return q_block, chunk


def sq_norms(catalogue: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """||c||^2 per row, chunked (no temporary the size of a large catalogue)."""
    return torch.cat([catalogue[c0:c0 + chunk].pow(2).sum(1) for c0 in range(0, catalogue.shape[0], chunk)])


@torch.no_grad()
def l2_topk(queries, catalogue, k: int, chunk_size: int | None = None, margin: int = 8,
            catalogue_sq_norms: torch.Tensor | None = None, query_block: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact K nearest catalogue rows of every query by L2 distance.

    Returns (distances [Q, k] float32, ascending; indices [Q, k] int64). Ties in distance keep the lower
    index first. `catalogue_sq_norms` may pass precomputed ||c||^2 (`sq_norms`, e.g. reused across calls)."""
    queries, catalogue = _as_float(queries), _as_float(catalogue)
    _check_pair(queries, catalogue)
    n_queries, n_items = queries.shape[0], catalogue.shape[0]
    if k < 1:
        raise InputError(f"grounding: K must be >= 1, got {k}")
    k = min(k, n_items)
    keep = min(n_items, k + margin)
    sq = catalogue_sq_norms if catalogue_sq_norms is not None else sq_norms(catalogue)
    q_block, chunk = _blocks(n_queries, n_items, chunk_size, query_block)
    out_d = torch.empty(n_queries, k)
    out_i = torch.empty(n_queries, k, dtype=torch.long)
    for q0 in range(0, n_queries, q_block):
        q = queries[q0:q0 + q_block]
        best_v = best_i = None
        for c0 in range(0, n_items, chunk):
            part = catalogue[c0:c0 + chunk]
            # ||q||^2 is constant per row: ranking needs only ||c||^2 - 2 q.c
            scores = torch.addmm(sq[c0:c0 + chunk].unsqueeze(0), q, part.T, beta=1.0, alpha=-2.0)
            v, i = torch.topk(scores, min(keep, scores.shape[1]), dim=1, largest=False, sorted=False)
            i = i + c0
            if best_v is not None:
                v, i = torch.cat([best_v, v], 1), torch.cat([best_i, i], 1)
                v, pos = torch.topk(v, min(keep, v.shape[1]), dim=1, largest=False, sorted=False)
                i = i.gather(1, pos)
            best_v, best_i = v, i
        # re-score the candidates directly as ||q - c|| (no cancellation), then a stable sort (distance, index)
        exact = (q.unsqueeze(1) - catalogue[best_i]).pow_(2).sum(-1).sqrt_()
        order = np.lexsort((best_i.numpy(), exact.numpy()), axis=1)[:, :k]
        order = torch.from_numpy(order)
        out_d[q0:q0 + q_block] = exact.gather(1, order)
        out_i[q0:q0 + q_block] = best_i.gather(1, order)
    return out_d, out_i


@torch.no_grad()
def l2_distances(queries, catalogue, chunk_size: int | None = None) -> torch.Tensor:
    """Full L2 distance matrix [Q, N] (float32), computed in tiles; exact up to float32 rounding of the
    expansion, clamped at 0."""
    queries, catalogue = _as_float(queries), _as_float(catalogue)
    _check_pair(queries, catalogue)
    n_queries, n_items = queries.shape[0], catalogue.shape[0]
    q_block, chunk = _blocks(n_queries, n_items, chunk_size)
    sq_c = (catalogue * catalogue).sum(1)
    out = torch.empty(n_queries, n_items)
    for q0 in range(0, n_queries, q_block):
        q = queries[q0:q0 + q_block]
        sq_q = (q * q).sum(1, keepdim=True)
        for c0 in range(0, n_items, chunk):
            part = catalogue[c0:c0 + chunk]
            tile = torch.addmm(sq_c[c0:c0 + chunk].unsqueeze(0), q, part.T, beta=1.0, alpha=-2.0)
            out[q0:q0 + q_block, c0:c0 + chunk] = (tile + sq_q).clamp_min_(0).sqrt_()
    return out


def aggregate_beams(distances: torch.Tensor, beam_scores: torch.Tensor | None, mode: str) -> torch.Tensor:
    """Combine per-beam distances [B, beams, N] into one [B, N] (lower = better).

    top: the first (highest-scoring) beam; min: the nearest any beam gets; weighted: per-beam min-max
    normalised distances averaged with softmax(beam sequence scores) weights."""
    if mode == "top":
        return distances[:, 0]
    if mode == "min":
        return distances.min(1).values
    if mode == "weighted":
        weights = (torch.softmax(beam_scores.float(), dim=1) if beam_scores is not None
                   else torch.full(distances.shape[:2], 1.0 / distances.shape[1]))
        return (minmax(distances, dim=-1) * weights.unsqueeze(-1)).sum(1)
    raise InputError(f"grounding.beams: expected one of top, min, weighted, got {mode!r}")


# ----------------------------------------------------------------------------------------- injection
def minmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """(x - min) / (max - min) along `dim`; a constant slice maps to 0."""
    x = x.double() if x.dtype == torch.float64 else x.float()
    lo = x.amin(dim, keepdim=True)
    span = x.amax(dim, keepdim=True) - lo
    return (x - lo) / torch.where(span > 0, span, torch.ones_like(span))


def inject(distances: torch.Tensor, signal: torch.Tensor | None, gamma: float) -> torch.Tensor:
    """BIGRec's injected grounding score (lower = better): (1 + S~)^(-gamma) * D~.

    distances: [B, N] raw L2 distances; signal: popularity counts [N] (normalised over the catalogue) or
    CF scores [B, N] (normalised per sample), higher = more popular / more preferred; None or gamma = 0
    gives D~ alone (same order as the raw distances)."""
    d = minmax(distances.double(), dim=-1)
    if signal is None or gamma == 0:
        return d
    s = minmax(torch.as_tensor(signal).double(), dim=-1)
    if s.dim() == 1:
        s = s.unsqueeze(0)
    return (1.0 + s).pow(-float(gamma)) * d


def popularity_counts(items: np.ndarray, n_items: int) -> torch.Tensor:
    """Interaction counts per item (pass only interactions from the training period)."""
    return torch.from_numpy(np.bincount(np.asarray(items, dtype=np.int64), minlength=n_items).astype(np.float64))


def select_gamma(valid_dist: torch.Tensor, valid_targets: torch.Tensor, valid_signal,
                 test_dist: torch.Tensor, test_targets: torch.Tensor, test_signal,
                 gammas: Sequence[float], ks: Sequence[int],
                 valid_exclude: torch.Tensor | None = None, test_exclude: torch.Tensor | None = None) -> dict:
    """For every metric (ndcg@K, hr@K, ...) pick the gamma with the best validation value (the smallest
    gamma on ties) and report test at that gamma.

    Returns {"valid": {metric: best valid value}, "test": {metric: test value at that gamma},
    "gamma": {metric: gamma}, "grid": {gamma: {"valid": {...}, "test": {...}}}}."""
    if not gammas:
        raise InputError("inject.gammas: the gamma grid is empty")
    grid = {}
    for gamma in gammas:
        grid[float(gamma)] = {
            "valid": rank_metrics(inject(valid_dist, valid_signal, gamma), valid_targets, ks, valid_exclude),
            "test": rank_metrics(inject(test_dist, test_signal, gamma), test_targets, ks, test_exclude),
        }
    out = {"valid": {}, "test": {}, "gamma": {}, "grid": grid}
    for metric in grid[float(gammas[0])]["valid"]:
        best = max(grid, key=lambda g: (grid[g]["valid"][metric], -g))
        out["gamma"][metric] = best
        out["valid"][metric] = grid[best]["valid"][metric]
        out["test"][metric] = grid[best]["test"][metric]
    return out


def rank_metrics(scores_low_better: torch.Tensor, targets: torch.Tensor, ks: Sequence[int],
                 exclude: torch.Tensor | None = None) -> dict:
    """NDCG@K / HR@K (and recall, mrr) from lower-is-better scores; every case counts."""
    ranks = target_ranks(-scores_low_better, torch.as_tensor(targets, dtype=torch.long), exclude)
    return ranking_metrics(ranks, ks)


# ------------------------------------------------------------------------------------------- cache
def titles_hash(titles: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for title in titles:
        digest.update(title.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()


def model_fingerprint(model: torch.nn.Module, name: str = "") -> str:
    """A cheap identity of a model's weights: name, config and a strided sample of every parameter.

    Any retraining or different checkpoint changes it; reading all weights is not needed."""
    digest = hashlib.sha256(name.encode())
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        digest.update(config.to_json_string(use_diff=False).encode())
    for pname, param in model.named_parameters():
        flat = param.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        digest.update(pname.encode())
        digest.update(str(tuple(param.shape)).encode())
        digest.update(flat[::step].float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


class CatalogueCache:
    """Catalogue embeddings on disk: DIR/<key>.safetensors (a `recalign.io` state file, never unpickled) with
    key = sha256(model identity, pooling, titles).

    `get(titles, embed, model_id)` returns the cached tensor or computes it with `embed(titles)` and stores
    it atomically (a crash mid-write leaves no partial file)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    @staticmethod
    def key(model_id: str, titles: Sequence[str], extra: str = "") -> str:
        return hashlib.sha256(f"{model_id}\x00{extra}\x00{titles_hash(titles)}".encode()).hexdigest()[:32]

    def path(self, model_id: str, titles: Sequence[str], extra: str = "") -> Path:
        return self.directory / f"{self.key(model_id, titles, extra)}.safetensors"

    def get(self, titles: Sequence[str], embed: Callable[[list[str]], torch.Tensor], model_id: str,
            extra: str = "") -> tuple[torch.Tensor, bool]:
        """(embeddings [N, d] float32, True when read from the cache)."""
        from recalign.io import atomic_write_bytes, load_state, save_state

        titles = list(titles)
        path = self.path(model_id, titles, extra)
        if path.exists():
            try:
                state = load_state(path)  # safetensors: never unpickled
                if (state["titles_hash"] == titles_hash(titles) and state["model_id"] == model_id
                        and tuple(state["embeddings"].shape[:1]) == (len(titles),)):
                    return state["embeddings"], True
            except (InputError, KeyError, TypeError, AttributeError):  # unreadable/corrupt entry: recomputed
                pass
        embeddings = _as_float(embed(titles)).detach().cpu().contiguous()
        if embeddings.shape[0] != len(titles):
            raise InputError(f"grounding cache: embed returned {embeddings.shape[0]} rows for {len(titles)} titles")
        save_state(path, {"embeddings": embeddings, "model_id": model_id, "titles_hash": titles_hash(titles),
                          "extra": extra, "n": len(titles)})
        atomic_write_bytes(path.with_suffix(".json"), json.dumps(
            {"model_id": model_id, "extra": extra, "n_titles": len(titles), "dim": int(embeddings.shape[1]),
             "titles_hash": titles_hash(titles)}, indent=2).encode())
        return embeddings, False


# ------------------------------------------------------------------------------------ text matching
def clean_generation(text: str) -> str:
    """Generated answer -> the title it names: first line, surrounding quotes and spaces removed."""
    text = text.strip().split("\n", 1)[0].strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1]
    return " ".join(text.strip().strip("\"").split())


def normalise_title(text: str) -> str:
    """A comparable form of a title or generated answer (cleaned, case folded)."""
    return clean_generation(text).casefold()
