"""Approximate nearest-neighbour grounding (FAISS) beside the exact search, for large catalogues.

`grounding.search` picks the search: `exact` (`eval.grounding.l2_topk` / `l2_distances`, the default),
`hnsw` (FAISS IndexHNSWFlat) or `ivf` (FAISS IndexIVFFlat, or IndexIVFScalarQuantizer with
`ann.codec: sq8`, a quarter of the memory). The approximate indexes propose `ann.k` candidates per query;
when the catalogue embeddings are at hand the candidates are re-scored exactly as ||q - c|| and sorted by
(distance, index), as `l2_topk` does, so the answer equals the exact one whenever the true neighbours are
among the candidates.

A built index is saved with `faiss.write_index` (FAISS's own format, no pickle) beside a JSON sidecar that
holds the sha256 of the embeddings it was built on; loading checks the fingerprint, the shape and the
parameters, and anything that does not match is rebuilt, with a log line, never reused.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from recalign.errors import InputError
from recalign.eval.grounding import l2_topk
from recalign.io import temporary_sibling

SEARCHES = ("exact", "hnsw", "ivf")
CODECS = ("flat", "sq8")

# grounding.search + grounding.ann: the defaults every method with a grounding section can splice in
ANN_CONFIG = {
    "search": "exact",  # exact | hnsw | ivf (FAISS; for catalogues of ~100k items and more)
    "ann": {
        "k": 100,  # candidates per query from the approximate index; the others rank after them
        "hnsw_m": 16,  # HNSW graph degree
        "ef_construction": 40,
        "ef_search": 128,  # HNSW breadth at query time (higher = better recall, slower)
        "nlist": 0,  # IVF cells (0 = 4 * sqrt(items))
        "nprobe": 16,  # IVF cells visited per query
        "codec": "flat",  # IVF vectors stored as float32 (flat) or 8-bit scalars (sq8)
        "index_dir": "",  # where built indexes are kept ("" = the grounding cache directory)
    },
}

_POSITIVE = ("k", "hnsw_m", "ef_construction", "ef_search", "nprobe")


def check_search(section: dict, where: str = "grounding") -> None:
    """Validate `search` and `ann` of a grounding section; a bad value is a one-line InputError."""
    search = section.get("search", "exact")
    if search not in SEARCHES:
        raise InputError(f"{where}.search: expected one of {', '.join(SEARCHES)}, got {search!r}")
    ann = section.get("ann", {})
    if not isinstance(ann, dict):
        raise InputError(f"{where}.ann: expected a mapping of ANN parameters, got {ann!r}")
    unknown = sorted(set(ann) - set(ANN_CONFIG["ann"]))
    if unknown:
        raise InputError(f"{where}.ann: unknown key {unknown[0]!r}; known: {', '.join(ANN_CONFIG['ann'])}")
    for key in _POSITIVE:
        value = ann.get(key, ANN_CONFIG["ann"][key])
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{where}.ann.{key}: expected an integer >= 1, got {value!r}")
    nlist = ann.get("nlist", 0)
    if isinstance(nlist, bool) or not isinstance(nlist, int) or nlist < 0:
        raise InputError(f"{where}.ann.nlist: expected an integer >= 0 (0 = 4 * sqrt(items)), got {nlist!r}")
    if ann.get("codec", "flat") not in CODECS:
        raise InputError(f"{where}.ann.codec: expected one of {', '.join(CODECS)}, got {ann.get('codec')!r}")
    if not isinstance(ann.get("index_dir", ""), str):
        raise InputError(f"{where}.ann.index_dir: expected a directory path or \"\", got {ann.get('index_dir')!r}")


def index_params(search: str, ann: dict, n_items: int) -> dict:
    """The build parameters of an index for `n_items` items (`ann` over the defaults; nlist 0 = 4 sqrt(N))."""
    merged = {**ANN_CONFIG["ann"], **ann}
    if search == "hnsw":
        return {"search": "hnsw", "m": int(merged["hnsw_m"]), "ef_construction": int(merged["ef_construction"])}
    nlist = int(merged["nlist"]) or max(1, int(4 * np.sqrt(n_items)))
    return {"search": "ivf", "nlist": min(nlist, n_items), "codec": merged["codec"]}


def fingerprint(embeddings: np.ndarray, chunk_rows: int = 65536) -> str:
    """sha256 of the shape and every float32 value (chunked: no copy of a large catalogue)."""
    digest = hashlib.sha256(f"{embeddings.shape}".encode())
    for start in range(0, embeddings.shape[0], chunk_rows):
        digest.update(np.ascontiguousarray(embeddings[start:start + chunk_rows], dtype=np.float32).data)
    return digest.hexdigest()


def build_index(embeddings: np.ndarray, params: dict, train_rows: int = 0, seed: int = 0):
    """A FAISS index over `embeddings` [N, d] float32 (added in chunks)."""
    import faiss

    n, d = embeddings.shape
    if params["search"] == "hnsw":
        index = faiss.IndexHNSWFlat(d, params["m"])
        index.hnsw.efConstruction = params["ef_construction"]
    else:
        quantizer = faiss.IndexFlatL2(d)
        if params["codec"] == "sq8":
            index = faiss.IndexIVFScalarQuantizer(quantizer, d, params["nlist"], faiss.ScalarQuantizer.QT_8bit)
        else:
            index = faiss.IndexIVFFlat(quantizer, d, params["nlist"])
        index.cp.seed = seed
        index.cp.niter = 10  # k-means iterations: 10 instead of FAISS's 25 (build time; recall measured)
        rows = min(n, train_rows or max(32 * params["nlist"], 50_000))
        pick = np.sort(np.random.default_rng(seed).choice(n, rows, replace=False)) if rows < n else slice(None)
        index.train(np.ascontiguousarray(embeddings[pick], dtype=np.float32))
    for start in range(0, n, 65536):
        index.add(np.ascontiguousarray(embeddings[start:start + 65536], dtype=np.float32))
    return index


def _write_index(index, path: Path) -> None:
    import faiss

    fd, tmp = temporary_sibling(path)
    os.close(fd)
    try:
        faiss.write_index(index, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@dataclass
class AnnSearcher:
    """An approximate index plus (optionally) the catalogue its candidates are re-scored against."""

    index: object
    params: dict
    catalogue: np.ndarray | None = None

    def set_query_params(self, ann: dict) -> None:
        merged = {**ANN_CONFIG["ann"], **ann}
        if self.params["search"] == "hnsw":
            self.index.hnsw.efSearch = int(merged["ef_search"])
        else:
            self.index.nprobe = min(int(merged["nprobe"]), self.params["nlist"])

    def search(self, queries, k: int, candidates: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(L2 distances [Q, k] float32 ascending, item indices [Q, k] int64); -1 where fewer were found.

        With the catalogue, max(k, candidates) items are fetched and re-scored as exact ||q - c||, ties by
        the lower index, and the k nearest kept (quantised distances cannot swap the last ones)."""
        q = np.ascontiguousarray(torch.as_tensor(queries).float().numpy())
        k = min(int(k), self.index.ntotal)
        fetch = min(max(k, int(candidates)), self.index.ntotal) if self.catalogue is not None else k
        sq, idx = self.index.search(q, fetch)
        if self.catalogue is None:
            return np.sqrt(np.maximum(sq, 0)).astype(np.float32), idx.astype(np.int64)
        found = idx >= 0
        safe = np.where(found, idx, 0)
        exact = np.empty(idx.shape, dtype=np.float32)
        for row in range(len(q)):  # row by row: no [Q, k, d] temporary
            exact[row] = np.sqrt(((self.catalogue[safe[row]] - q[row]) ** 2).sum(1))
        exact[~found] = np.inf
        order = np.lexsort((np.where(found, idx, np.iinfo(np.int64).max), exact), axis=1)[:, :k]
        return np.take_along_axis(exact, order, 1), np.take_along_axis(idx.astype(np.int64), order, 1)


def load_or_build(embeddings, section: dict, path: Path | None, log: Callable[[str], None] | None = None,
                  known_fingerprint: str | None = None) -> AnnSearcher:
    """The index `section` (`search`, `ann`) asks for over `embeddings`: read from `path` when its sidecar
    matches the embeddings' fingerprint, the shape and the parameters; else built (and saved to `path`)."""
    import faiss

    from recalign.io import atomic_write_json
    from recalign.progress import log as default_log

    log = log or default_log
    emb = np.ascontiguousarray(torch.as_tensor(embeddings).float().numpy())
    n, d = emb.shape
    if n == 0:
        raise InputError("grounding: the catalogue is empty")
    params = index_params(section["search"], section.get("ann", {}), n)
    expected = {"fingerprint": known_fingerprint or fingerprint(emb), "n": n, "d": d, "params": params}
    if path is not None and path.exists():
        problem = None
        try:
            saved = json.loads(path.with_suffix(".json").read_text())
            if saved.get("fingerprint") != expected["fingerprint"]:
                problem = "it was built on other embeddings (fingerprint differs)"
            elif saved.get("n") != n or saved.get("d") != d or saved.get("params") != params:
                problem = "its shape or parameters differ"
            else:
                index = faiss.read_index(str(path))
                if index.ntotal != n or index.d != d:
                    problem = f"it holds {index.ntotal} x {index.d} vectors, the catalogue {n} x {d}"
        except (OSError, ValueError, RuntimeError) as exc:  # missing/corrupt sidecar or index file
            problem = f"it cannot be read ({type(exc).__name__})"
        if problem is None:
            searcher = AnnSearcher(index, params, emb)
            searcher.set_query_params(section.get("ann", {}))
            return searcher
        log(f"grounding: rebuilding the {params['search']} index {path.name}: {problem}")
    index = build_index(emb, params)
    if path is not None:
        _write_index(index, path)
        atomic_write_json(path.with_suffix(".json"), {**expected, "faiss": faiss.__version__})
    searcher = AnnSearcher(index, params, emb)
    searcher.set_query_params(section.get("ann", {}))
    return searcher


# one searcher per catalogue tensor in this process (grounding runs once per split / serving batch)
_SEARCHERS: dict = {}


def _index_path(section: dict, default_dir: Path | None, params: dict, n: int, d: int) -> Path | None:
    directory = section.get("ann", {}).get("index_dir") or default_dir
    if not directory:
        return None
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    return Path(directory) / f"ann-{params['search']}-{n}x{d}-{key}.faiss"


def nearest(queries, catalogue: torch.Tensor, section: dict, k: int, default_dir: Path | None = None,
            log: Callable[[str], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (distances, indices) by the search `section["search"]` names."""
    if section.get("search", "exact") == "exact":
        d, i = l2_topk(queries, catalogue, k)
        return d.numpy(), i.numpy()
    cat = torch.as_tensor(catalogue)
    params = index_params(section["search"], section.get("ann", {}), cat.shape[0])
    memo = (cat.data_ptr(), tuple(cat.shape), cat._version, json.dumps(params, sort_keys=True))
    searcher = _SEARCHERS.get(memo)
    if searcher is None:
        _SEARCHERS.clear()  # keep one catalogue's index in memory, not every one seen
        searcher = load_or_build(cat, section, _index_path(section, default_dir, params, *cat.shape), log)
        _SEARCHERS[memo] = searcher
    ann = {**ANN_CONFIG["ann"], **section.get("ann", {})}
    searcher.set_query_params(ann)
    return searcher.search(queries, k, candidates=int(ann["k"]))


def dense_distances(queries, catalogue: torch.Tensor, section: dict, default_dir: Path | None = None,
                    log: Callable[[str], None] | None = None) -> torch.Tensor:
    """[Q, N] distances as `l2_distances` gives them, from the approximate search: the `ann.k` items found
    carry their exact distance, every other item a distance just beyond the farthest found (ranked after
    them, tied with each other)."""
    k = int({**ANN_CONFIG["ann"], **section.get("ann", {})}["k"])
    dist, idx = nearest(queries, catalogue, section, k, default_dir, log)
    found = idx >= 0
    farthest = np.where(found, dist, -np.inf).max(1, keepdims=True)
    beyond = np.nextafter(np.maximum(farthest, 0).astype(np.float32), np.float32(np.inf))
    out = np.repeat(beyond, catalogue.shape[0], axis=1)
    rows = np.nonzero(found)
    out[rows[0], idx[rows]] = dist[rows]
    return torch.from_numpy(out)
