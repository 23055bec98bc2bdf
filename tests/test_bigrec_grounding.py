"""Grounding (exact L2 top-K, full distances), injections, gamma selection and the catalogue cache."""

import math

import pytest
import torch

from recalign.errors import InputError
from recalign.eval.grounding import (
    CatalogueCache,
    aggregate_beams,
    inject,
    l2_distances,
    l2_topk,
    minmax,
    model_fingerprint,
    normalise_title,
    rank_metrics,
    select_gamma,
)


def _brute(queries, catalogue, k):
    dist = torch.cdist(queries.double(), catalogue.double())
    values, index = torch.sort(dist, dim=1, stable=True)
    return values[:, :k], index[:, :k]


@pytest.mark.parametrize("chunk", [None, 1, 97, 1000, 5000])
@pytest.mark.parametrize("dim", [3, 64])
def test_l2_topk_matches_brute_force(chunk, dim):
    gen = torch.Generator().manual_seed(dim)
    queries, catalogue = torch.randn(301, dim, generator=gen), torch.randn(2000, dim, generator=gen)
    dist, index = l2_topk(queries, catalogue, 20, chunk_size=chunk)
    ref_d, ref_i = _brute(queries, catalogue, 20)
    assert torch.equal(index, ref_i)
    assert torch.allclose(dist.double(), ref_d, atol=1e-5)
    assert (dist[:, 1:] >= dist[:, :-1]).all()


def test_l2_topk_ties_keep_lower_index_and_k_larger_than_catalogue():
    catalogue = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [5.0, 5.0]])
    dist, index = l2_topk(torch.zeros(1, 2), catalogue, 10)
    assert index.tolist() == [[0, 1, 2, 3]]
    assert dist[0, :3].tolist() == [1.0, 1.0, 1.0]
    assert math.isclose(dist[0, 3].item(), math.sqrt(50), rel_tol=1e-6)


def test_l2_topk_is_exact_where_the_float32_expansion_is_not():
    # large common offset: ||c||^2 - 2q.c loses the small differences in float32; re-scoring restores them
    gen = torch.Generator().manual_seed(1)
    base = torch.full((1, 16), 1000.0)
    catalogue = base + 1e-2 * torch.randn(500, 16, generator=gen)
    queries = base + 1e-2 * torch.randn(5, 16, generator=gen)
    dist, index = l2_topk(queries, catalogue, 5, margin=500)
    ref_d, ref_i = _brute(queries, catalogue, 5)
    assert torch.equal(index, ref_i)
    assert torch.allclose(dist.double(), ref_d, rtol=1e-4)


def test_l2_distances_matches_cdist():
    gen = torch.Generator().manual_seed(2)
    queries, catalogue = torch.randn(70, 32, generator=gen), torch.randn(3001, 32, generator=gen)
    full = l2_distances(queries, catalogue, chunk_size=700)
    assert full.shape == (70, 3001)
    assert torch.allclose(full.double(), torch.cdist(queries.double(), catalogue.double()), atol=1e-4)


def test_dimension_mismatch_is_input_error():
    with pytest.raises(InputError, match="dimension"):
        l2_topk(torch.zeros(2, 3), torch.zeros(4, 5), 1)


def test_minmax_and_constant_rows():
    x = torch.tensor([[2.0, 4.0, 6.0], [3.0, 3.0, 3.0]])
    assert minmax(x).tolist() == [[0.0, 0.5, 1.0], [0.0, 0.0, 0.0]]


def test_popularity_injection_hand_made():
    distances = torch.tensor([[1.0, 2.0, 3.0, 5.0]])  # D~ = 0, .25, .5, 1
    popularity = torch.tensor([0.0, 10.0, 5.0, 0.0])  # P~ = 0, 1, .5, 0
    scores = inject(distances, popularity, gamma=1.0)
    expected = [0.0, 0.25 / 2.0, 0.5 / 1.5, 1.0]
    assert torch.allclose(scores, torch.tensor([expected], dtype=torch.float64))


def test_gamma_zero_leaves_ranking_unchanged():
    gen = torch.Generator().manual_seed(3)
    distances = torch.rand(8, 50, generator=gen) * 10
    popularity = torch.rand(50, generator=gen) * 100
    scores = inject(distances, popularity, gamma=0.0)
    assert torch.equal(torch.argsort(scores, dim=1, stable=True), torch.argsort(distances, dim=1, stable=True))


def test_large_gamma_orders_near_ties_by_popularity():
    # items 1..4 are near-tied in distance; with a large gamma the most popular comes first among them
    distances = torch.tensor([[0.0, 5.0, 5.001, 5.002, 5.003, 10.0]])
    popularity = torch.tensor([0.0, 1.0, 40.0, 10.0, 30.0, 0.0])
    plain = torch.argsort(inject(distances, popularity, 0.0), dim=1).tolist()[0]
    assert plain == [0, 1, 2, 3, 4, 5]
    boosted = torch.argsort(inject(distances, popularity, 50.0), dim=1).tolist()[0]
    assert boosted[0] == 0  # D~ = 0 stays first whatever the popularity
    assert boosted[1:5] == [2, 4, 3, 1]


def test_collaborative_injection_is_per_sample():
    distances = torch.tensor([[1.0, 2.0, 2.0], [1.0, 2.0, 2.0]])
    cf_scores = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # each sample prefers another item
    order = torch.argsort(inject(distances, cf_scores, 5.0), dim=1).tolist()
    assert order[0][:2] == [0, 1] and order[1][:2] == [0, 2]


def test_rank_metrics_every_case_counts():
    scores = torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])  # lower = better
    metrics = rank_metrics(scores, torch.tensor([0, 0]), [1, 3])
    assert metrics["hr@1"] == 0.5 and metrics["hr@3"] == 1.0
    assert math.isclose(metrics["ndcg@3"], (1.0 + 1.0 / math.log2(4)) / 2)


def test_select_gamma_per_metric_hr_chosen_on_hr():
    # Case A (x4): target item 1 at rank 1; gamma=1 lifts the popular item 2 above it (rank 2, still a hit@3).
    # Case B (x1): target item 3 (popular) at rank 3 (a miss@3); gamma=1 lifts it to rank 2.
    # NDCG@3 prefers gamma=0 (4*0.631/5 = 0.505 > 0.5) while HR@3 prefers gamma=1 (1.0 > 0.8): selecting
    # HR's gamma by NDCG (the reference's defect) would report HR@3 = 0.8.
    a = [0.0, 1.0, 1.01, 3.0, 4.0]
    b = [0.0, 1.0, 1.01, 1.02, 3.0]
    distances = torch.tensor([a, a, a, a, b])
    targets = torch.tensor([1, 1, 1, 1, 3])
    popularity = torch.tensor([0.0, 0.0, 10.0, 10.0, 0.0])
    out = select_gamma(distances, targets, popularity, distances, targets, popularity, gammas=[0.0, 1.0], ks=[3, 5])
    assert out["gamma"]["ndcg@3"] == 0.0 and out["gamma"]["hr@3"] == 1.0
    assert out["test"]["hr@3"] == 1.0
    assert math.isclose(out["test"]["ndcg@3"], 4 / math.log2(3) / 5)
    assert out["gamma"]["hr@5"] == 0.0  # every gamma ties on HR@5 -> the smallest
    assert out["grid"][0.0]["valid"]["hr@3"] == pytest.approx(0.8)


def test_aggregate_beams():
    d = torch.tensor([[[1.0, 3.0, 2.0], [3.0, 0.5, 2.0]]])
    assert aggregate_beams(d, None, "top").tolist() == [[1.0, 3.0, 2.0]]
    assert aggregate_beams(d, None, "min").tolist() == [[1.0, 0.5, 2.0]]
    weighted = aggregate_beams(d, torch.tensor([[0.0, -100.0]]), "weighted")
    assert torch.allclose(weighted, torch.tensor([[0.0, 1.0, 0.5]]), atol=1e-6)
    with pytest.raises(InputError, match="grounding.beams"):
        aggregate_beams(d, None, "sum")


def test_catalogue_cache_invalidates_on_titles_and_model(tmp_path):
    calls = []

    def embed(titles):
        calls.append(list(titles))
        return torch.tensor([[float(len(t)), 1.0] for t in titles])

    cache = CatalogueCache(tmp_path)
    titles = ["Toy Story (1995)", "Heat (1995)"]
    first, hit = cache.get(titles, embed, "model-a")
    assert not hit and len(calls) == 1
    again, hit = cache.get(list(titles), embed, "model-a")
    assert hit and len(calls) == 1 and torch.equal(first, again)
    _, hit = cache.get(["Toy Story (1995)", "Heat (1996)"], embed, "model-a")  # one title changed
    assert not hit and len(calls) == 2
    _, hit = cache.get(titles, embed, "model-b")  # model changed
    assert not hit and len(calls) == 3
    _, hit = cache.get(titles, embed, "model-a", extra="pooling=mean")  # pooling changed
    assert not hit and len(calls) == 4
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind
    # a corrupt entry is recomputed, not an error
    cache.path("model-a", titles).write_bytes(b"garbage")
    _, hit = cache.get(titles, embed, "model-a")
    assert not hit and len(calls) == 5


def test_model_fingerprint_changes_with_weights():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    before = model_fingerprint(model, "m")
    assert model_fingerprint(model, "m") == before
    with torch.no_grad():
        model[1].weight[0, 0] += 1.0
    assert model_fingerprint(model, "m") != before
    assert model_fingerprint(model, "other") != model_fingerprint(model, "m")


def test_normalise_title():
    assert normalise_title(' "Toy Story (1995)"\nmore text') == "toy story (1995)"
    assert normalise_title("Heat  (1995)") == "heat (1995)"
