import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from recalign.errors import InputError
from recalign.eval import auc, ctr_metrics, ranking_metrics, target_ranks, uauc


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(500) < 0.4
    scores = rng.integers(0, 7, size=500).astype(float)  # heavy ties
    assert abs(auc(labels, scores) - roc_auc_score(labels, scores)) < 1e-9
    scores = rng.normal(size=500)
    assert abs(auc(labels, scores) - roc_auc_score(labels, scores)) < 1e-9


def test_auc_hand_cases():
    assert auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    assert auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    # one tie between a positive and a negative counts one half: pairs (p1>n1, p1=n2, p2>n1, p2>n2) -> 3.5/4
    assert auc([1, 1, 0, 0], [0.5, 0.9, 0.1, 0.5]) == 0.875
    assert math.isnan(auc([1, 1], [0.2, 0.3]))


def test_auc_shape_mismatch_is_input_error():
    with pytest.raises(InputError, match="shape"):
        auc([1, 0, 1], [0.1, 0.2])


def test_uauc_skips_single_class_users_and_matches_per_user_sklearn():
    rng = np.random.default_rng(7)
    users = rng.integers(0, 30, size=600)
    labels = rng.random(600) < 0.5
    labels[users == 3] = True  # user 3: one class only
    labels[users == 4] = False
    scores = rng.integers(0, 5, size=600).astype(float)
    value, skipped = uauc(users, labels, scores)
    expected, expected_skipped = [], 0
    for u in np.unique(users):
        m = users == u
        if labels[m].all() or not labels[m].any():
            expected_skipped += 1
            continue
        expected.append(roc_auc_score(labels[m], scores[m]))
    assert skipped == expected_skipped >= 2
    assert abs(value - np.mean(expected)) < 1e-9


def test_ctr_metrics_names_with_suffix():
    out = ctr_metrics([0, 0, 1, 1], [1, 0, 1, 0], [0.9, 0.1, 0.8, 0.2], prefix="_warm")
    assert out == {"auc_warm": 1.0, "uauc_warm": 1.0, "uauc_skipped_users_warm": 0}


def test_ranking_metrics_hand_computed():
    ranks = np.array([0, 1, 4, 10, 25])
    out = ranking_metrics(ranks, ks=(1, 5, 10))
    assert out["hr@1"] == pytest.approx(1 / 5)
    assert out["hr@5"] == pytest.approx(3 / 5)
    assert out["hr@10"] == pytest.approx(3 / 5)  # rank 10 is the 11th item: a miss at K=10
    assert out["ndcg@5"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6)) / 5)
    assert out["mrr@5"] == pytest.approx((1 + 1 / 2 + 1 / 5) / 5)
    assert out["recall@10"] == out["hr@10"]


def test_every_case_counts_in_denominator():
    # a case the model cannot rank (rank beyond the catalogue cut) still counts as a miss
    assert ranking_metrics([0, 1000], ks=(10,))["hr@10"] == 0.5


def test_negative_k_is_input_error():
    with pytest.raises(InputError, match="K must be a positive"):
        ranking_metrics([0, 1], ks=(-5,))


def test_target_ranks_with_history_mask_and_ties():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.1], [0.5, 0.5, 0.5, 0.9]])
    targets = torch.tensor([2, 1])
    assert target_ranks(scores, targets).tolist() == [2.0, 2.0]  # row 2: one higher + two ties / 2
    mask = torch.tensor([[True, False, False, False], [False, False, False, True]])
    assert target_ranks(scores, targets, mask).tolist() == [1.0, 1.0]
    # the target itself is never masked out
    mask_target = torch.tensor([[False, False, True, False], [False, True, False, False]])
    assert target_ranks(scores, targets, mask_target).tolist() == [2.0, 2.0]


def test_target_ranks_agree_with_argsort_without_ties():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(64, 200, generator=g)
    targets = torch.randint(0, 200, (64,), generator=g)
    order = scores.argsort(dim=1, descending=True)
    expected = (order == targets[:, None]).float().argmax(dim=1).float()
    assert torch.equal(target_ranks(scores, targets), expected)


def test_ndcg_per_case_is_what_ranking_metrics_averages():
    import numpy as np

    from recalign.eval.metrics import ndcg_per_case, ranking_metrics

    ranks = np.array([0.0, 1.0, 9.0, 10.0, 2.5])
    expected = [1.0, 1 / np.log2(3), 1 / np.log2(11), 0.0, 1 / np.log2(4.5)]
    assert np.allclose(ndcg_per_case(ranks, 10), expected)
    assert np.isclose(ndcg_per_case(ranks, 10).mean(), ranking_metrics(torch.tensor(ranks), [10])["ndcg@10"])
