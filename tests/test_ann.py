"""ANN grounding (eval.ann): exact answers on a small catalogue, index reuse and rebuild, config errors."""

import numpy as np
import pytest
import torch

from recalign.errors import InputError
from recalign.eval.ann import ANN_CONFIG, check_search, dense_distances, load_or_build, nearest
from recalign.eval.grounding import l2_distances, l2_topk


def _data(n=3000, d=24, q=40, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(30, d)).astype(np.float32) * 4
    catalogue = centres[rng.integers(0, 30, n)] + rng.normal(size=(n, d)).astype(np.float32)
    queries = catalogue[rng.integers(0, n, q)] + 0.3 * rng.normal(size=(q, d)).astype(np.float32)
    return torch.from_numpy(catalogue), torch.from_numpy(queries)


def _section(search, **ann):
    return {"search": search, "ann": {**ANN_CONFIG["ann"], **ann}}


@pytest.mark.parametrize("search, ann", [("hnsw", {"ef_search": 256, "hnsw_m": 16}),
                                         ("ivf", {"nlist": 16, "nprobe": 16}),
                                         ("ivf", {"nlist": 16, "nprobe": 16, "codec": "sq8"})])
def test_ann_equals_exact_at_high_recall_settings(search, ann):
    catalogue, queries = _data()
    exact_d, exact_i = l2_topk(queries, catalogue, 20)
    d, i = nearest(queries, catalogue, _section(search, **ann), 20, log=lambda m: None)
    assert np.array_equal(i, exact_i.numpy())  # every probe visited / wide graph search: identical top-20
    np.testing.assert_allclose(d, exact_d.numpy(), rtol=1e-5, atol=1e-5)  # re-scored exactly


def test_dense_distances_rank_found_items_first():
    catalogue, queries = _data(n=500)
    full = l2_distances(queries, catalogue)
    dense = dense_distances(queries, catalogue, _section("ivf", nlist=4, nprobe=4, k=10), log=lambda m: None)
    top = full.topk(10, largest=False).indices
    torch.testing.assert_close(dense.gather(1, top), full.gather(1, top), rtol=1e-4, atol=1e-4)  # exact
    others = torch.ones_like(dense, dtype=torch.bool).scatter_(1, top, False)
    assert (dense[others].view(len(queries), -1) > dense.gather(1, top).max(1, keepdim=True).values).all()


def test_saved_index_reused_and_mismatch_rebuilt(tmp_path):
    catalogue, queries = _data(n=800)
    path = tmp_path / "index.faiss"
    section = _section("hnsw", hnsw_m=8)
    logs = []
    load_or_build(catalogue, section, path, logs.append)
    assert path.exists() and path.with_suffix(".json").exists() and not logs
    load_or_build(catalogue, section, path, logs.append)
    assert not logs  # same embeddings: the saved index is read, no rebuild
    other = catalogue.clone()
    other[5] += 1.0  # one changed item: a different catalogue
    searcher = load_or_build(other, section, path, logs.append)
    assert len(logs) == 1 and "rebuilding" in logs[0] and "fingerprint" in logs[0]
    d, i = searcher.search(other[5:6], 1)
    assert i[0, 0] == 5 and d[0, 0] == 0  # built over the new catalogue
    path.write_bytes(b"not an index")  # corrupt file: rebuilt with a log line
    load_or_build(other, section, path, logs.append)
    assert len(logs) == 2 and "cannot be read" in logs[1]
    assert load_or_build(other, section, path, logs.append).index.ntotal == 800 and len(logs) == 2


def test_bad_search_config_is_one_line_error():
    with pytest.raises(InputError, match="grounding.search: expected one of exact, hnsw, ivf"):
        check_search({"search": "annoy"})
    with pytest.raises(InputError, match="grounding.ann.nprobe: expected an integer >= 1"):
        check_search(_section("ivf", nprobe=0))
    with pytest.raises(InputError, match="grounding.ann.codec"):
        check_search(_section("ivf", codec="pq"))
    with pytest.raises(InputError, match="unknown key 'efsearch'"):
        check_search({"search": "hnsw", "ann": {"efsearch": 3}})
    check_search(_section("hnsw"))


def test_bigrec_grounding_by_config(tmp_path):
    """BIGRec's ground(): search: ivf gives the exact search's nearest items; the index is saved under
    grounding.ann.index_dir; a bad search is rejected by the method's validate."""
    import copy

    from recalign.methods import bigrec

    catalogue, queries = _data(n=600, q=6)

    class Embedder:  # stands in for the backbone: the generated texts name their query rows
        def embed(self, texts, **kwargs):
            return queries[[int(t) for t in texts]]

    g = copy.deepcopy(bigrec.DEFAULTS["grounding"])
    texts = [[str(2 * r), str(2 * r + 1)] for r in range(3)]
    exact = bigrec.ground(Embedder(), texts, catalogue, g)
    g.update(search="ivf", ann={**g["ann"], "nlist": 8, "nprobe": 8, "index_dir": str(tmp_path)})
    approx = bigrec.ground(Embedder(), texts, catalogue, g)
    assert approx.shape == exact.shape == (3, 2, 600)
    assert torch.equal(approx.argmin(-1), exact.argmin(-1))
    assert list(tmp_path.glob("ann-ivf-600x24-*.faiss"))
    cfg = copy.deepcopy(bigrec.DEFAULTS)
    cfg["grounding"]["search"] = "faiss"
    with pytest.raises(InputError, match="grounding.search"):
        bigrec.validate(cfg)
