"""Splits and sample builders on hand-made data (and one leakage check on ML-100K)."""

import numpy as np
import pandas as pd
import pytest

from recalign.data import (
    Needs, build_dataset, check_dataset, degeneracy, few_shot, history_samples, leave_one_out, load_dataset,
    mark_warm_cold, temporal_split,
)
from recalign.errors import InputError


def make(rows, like_threshold=3.0):
    """rows: (user, item, rating, timestamp) with string ids, in input order."""
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])
    return build_dataset("hand", frame, like_threshold=like_threshold)


ROWS = [
    # user a: a tie at t=20 (q before r in input order)
    ("a", "p", 5, 10), ("a", "q", 2, 20), ("a", "r", 4, 20), ("a", "s", 1, 30), ("a", "t", 5, 40),
    ("b", "p", 4, 15), ("b", "r", 2, 25),  # two interactions only
    # user d: the last two tie at t=90, y is written first
    ("d", "x", 3, 5), ("d", "y", 5, 90), ("d", "z", 1, 90),
]


def named(ds, frame, column="item"):
    return ds.items["raw_id"].to_numpy()[frame[column].to_numpy()].tolist()


def per_user(ds, frame):
    users = ds.users["raw_id"].to_numpy()
    items = ds.items["raw_id"].to_numpy()
    out = {}
    for u, i in zip(frame["user"], frame["item"]):
        out.setdefault(users[u], []).append(items[i])
    return out


def test_dataset_order_is_user_then_time_with_stable_ties():
    ds = make(list(reversed(ROWS[:5])) + ROWS[5:])  # user a written newest first: ties now r before q
    assert per_user(ds, ds.interactions)["a"] == ["p", "r", "q", "s", "t"]
    ds = make(ROWS)
    assert per_user(ds, ds.interactions) == {"a": ["p", "q", "r", "s", "t"], "b": ["p", "r"], "d": ["x", "y", "z"]}


def test_leave_one_out_by_time():
    ds = make(ROWS)
    split = leave_one_out(ds)
    assert per_user(ds, split.test) == {"a": ["t"], "d": ["z"]}  # tie at the end: the later line is last
    assert per_user(ds, split.valid) == {"a": ["s"], "d": ["y"]}
    assert per_user(ds, split.train) == {"a": ["p", "q", "r"], "b": ["p", "r"], "d": ["x"]}  # b is too short
    assert split.sizes() == {"train": 6, "valid": 2, "test": 2}
    assert list(split.test.columns) == ["user", "item", "rating", "timestamp", "label"]
    # ties follow input order: write z before y and the roles swap
    swapped = make(ROWS[:8] + [ROWS[9], ROWS[8]])
    split = leave_one_out(swapped)
    assert per_user(swapped, split.test)["d"] == ["y"] and per_user(swapped, split.valid)["d"] == ["z"]
    # with min_interactions=2 user b gets a valid and a test item and no training item
    split = leave_one_out(ds, min_interactions=2)
    assert per_user(ds, split.test)["b"] == ["r"] and per_user(ds, split.valid)["b"] == ["p"]
    assert "b" not in per_user(ds, split.train)


def test_history_samples_sliding_window():
    ds = make(ROWS[:5])  # user a: p5 q2 r4 s1 t5
    samples = history_samples(ds, history_len=2)
    assert list(samples.columns) == ["user", "item", "rating", "label", "timestamp", "position", "history",
                                     "history_ratings", "history_labels"]
    items = ds.items["raw_id"].to_numpy()
    assert named(ds, samples) == ["r", "s", "t"]
    assert samples["position"].tolist() == [2, 3, 4]
    assert [tuple(items[list(h)]) for h in samples["history"]] == [("p", "q"), ("q", "r"), ("r", "s")]
    assert samples["history_ratings"].tolist() == [(5.0, 2.0), (2.0, 4.0), (4.0, 1.0)]
    assert samples["history_labels"].tolist() == [(True, False), (False, True), (True, False)]
    assert samples["label"].tolist() == [True, False, True]
    assert samples["timestamp"].tolist() == [20, 30, 40]
    # shorter histories allowed with min_history; the window never exceeds L
    samples = history_samples(ds, history_len=2, min_history=1)
    assert named(ds, samples) == ["q", "r", "s", "t"] and samples["history"].map(len).tolist() == [1, 2, 2, 2]
    with pytest.raises(InputError, match="history_len"):
        history_samples(ds, history_len=0)


def test_history_never_crosses_users():
    ds = make(ROWS)
    samples = history_samples(ds, history_len=3, min_history=1)
    users = ds.users["raw_id"].to_numpy()
    items = ds.items["raw_id"].to_numpy()
    got = {(users[u], items[i]): tuple(items[list(h)]) for u, i, h in
           zip(samples["user"], samples["item"], samples["history"])}
    assert got == {("a", "q"): ("p",), ("a", "r"): ("p", "q"), ("a", "s"): ("p", "q", "r"),
                   ("a", "t"): ("q", "r", "s"), ("b", "r"): ("p",), ("d", "y"): ("x",), ("d", "z"): ("x", "y")}


def test_history_samples_liked_history_only():
    ds = make(ROWS[:5])  # liked (> 3): p, r, t
    samples = history_samples(ds, history_len=2, liked_history_only=True)
    items = ds.items["raw_id"].to_numpy()
    assert named(ds, samples) == ["s", "t"]  # r has only one liked item before it
    assert [tuple(items[list(h)]) for h in samples["history"]] == [("p", "r"), ("p", "r")]
    assert all(all(labels) for labels in samples["history_labels"])
    samples = history_samples(ds, history_len=2, min_history=1, liked_history_only=True)
    assert named(ds, samples) == ["q", "r", "s", "t"]
    assert [tuple(items[list(h)]) for h in samples["history"]] == [("p",), ("p",), ("p", "r"), ("p", "r")]


def _timed(stamps):
    return pd.DataFrame({"id": np.arange(len(stamps)), "user": 0, "item": 0, "timestamp": stamps})


def test_temporal_split_by_count():
    split = temporal_split(_timed([5, 1, 3, 2, 4, 6, 7, 8, 9, 10]))
    assert split.train["timestamp"].tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    assert split.valid["timestamp"].tolist() == [9] and split.test["timestamp"].tolist() == [10]
    # equal times keep input order
    split = temporal_split(_timed([1] * 10))
    assert split.train["id"].tolist() == list(range(8))
    assert split.valid["id"].tolist() == [8] and split.test["id"].tolist() == [9]
    split = temporal_split(_timed(list(range(8))), fractions=(0.5, 0.25, 0.25))
    assert split.sizes() == {"train": 4, "valid": 2, "test": 2}


def test_temporal_split_by_time():
    stamps = [100, 0, 10, 50, 79, 80, 81, 85, 90, 91]
    split = temporal_split(_timed(stamps), by="time")  # cut points at 80 and 90
    assert split.train["timestamp"].tolist() == [0, 10, 50, 79, 80]
    assert split.valid["timestamp"].tolist() == [81, 85, 90]
    assert split.test["timestamp"].tolist() == [91, 100]
    assert sum(split.sizes().values()) == len(stamps)


@pytest.mark.parametrize("kwargs,match", [
    ({"fractions": (0.8, 0.1)}, "three non-negative numbers"),
    ({"fractions": (0.8, 0.3, -0.1)}, "three non-negative numbers"),
    ({"fractions": (0.5, 0.1, 0.1)}, "summing to 1"),
    ({"by": "user"}, "'count' or 'time'"),
])
def test_temporal_split_rejects_bad_arguments(kwargs, match):
    with pytest.raises(InputError, match=match):
        temporal_split(_timed([1, 2, 3]), **kwargs)
    with pytest.raises(InputError, match="empty"):
        temporal_split(_timed([]))


def test_temporal_split_of_ml100k_has_no_future_in_train():
    samples = history_samples(load_dataset("ml-100k"), history_len=10)
    split = temporal_split(samples)
    assert split.sizes() == {"train": 72456, "valid": 9057, "test": 9057}
    assert split.train["timestamp"].max() <= split.valid["timestamp"].min()
    assert split.valid["timestamp"].max() <= split.test["timestamp"].min()


def test_few_shot_is_seeded_nested_and_ordered():
    samples = _timed(list(range(100)))
    a, b = few_shot(samples, 16, seed=0), few_shot(samples, 16, seed=0)
    pd.testing.assert_frame_equal(a, b)
    assert len(a) == 16 and a["id"].is_monotonic_increasing and a["id"].is_unique
    assert set(few_shot(samples, 16, seed=1)["id"]) != set(a["id"])
    assert set(a["id"]) <= set(few_shot(samples, 64, seed=0)["id"])  # same seed: 16 within 64
    assert len(few_shot(samples, None, seed=0)) == 100 and len(few_shot(samples, 500, seed=3)) == 100
    assert few_shot(samples, 16, seed=0).index.tolist() == list(range(16))
    with pytest.raises(InputError, match=">= 1"):
        few_shot(samples, 0, seed=0)


def test_mark_warm_cold():
    train = pd.DataFrame({"user": [0, 0, 1], "item": [10, 11, 10], "history": [(12,), (10,), ()]})
    test = pd.DataFrame({"user": [0, 0, 2, 1, 3], "item": [10, 12, 10, 13, 14]})
    marked = mark_warm_cold(test, train)
    assert marked["warm_user"].tolist() == [True, True, False, True, False]
    assert marked["warm_item"].tolist() == [True, True, True, False, False]
    assert marked["warm"].tolist() == [True, True, False, False, False]
    assert "warm" not in test  # the input frame is not modified
    # items seen only inside training histories are cold when histories do not count
    assert mark_warm_cold(test, train, include_history=False)["warm"].tolist() == [True, False, False, False, False]


def test_warm_cold_on_a_temporal_split():
    # a user and an item that appear only at the end; item y is also rated by a in the training period
    ds = make(ROWS + [("a", "y", 4, 35), ("e", "new", 5, 100)])
    samples = history_samples(ds, history_len=1, min_history=0)
    split = temporal_split(samples, fractions=(0.7, 0.0, 0.3))  # 12 samples: the earliest 8 train
    assert split.train["timestamp"].max() == 35
    marked = mark_warm_cold(split.test, split.train)
    users, items = ds.users["raw_id"].to_numpy(), ds.items["raw_id"].to_numpy()
    assert list(zip(users[marked["user"]], items[marked["item"]])) == [("a", "t"), ("d", "y"), ("d", "z"),
                                                                       ("e", "new")]
    assert marked["warm_user"].tolist() == [True, True, True, False]
    assert marked["warm_item"].tolist() == [False, True, False, False]
    assert marked["warm"].tolist() == [False, True, False, False]


# ------------------------------------------------------------------------------------------ degeneracy
NO_POSITIVES = [("a", "p", 1, 1), ("a", "q", 3, 2), ("a", "r", 2, 3), ("b", "p", 3, 4), ("b", "q", 2, 5)]
SINGLES = [("a", "p", 5, 1), ("b", "q", 2, 2), ("c", "p", 4, 3)]  # every user has one interaction
ONE_ITEM = [("a", "p", 5, 1), ("a", "p", 2, 2), ("a", "p", 4, 3), ("b", "p", 1, 4)]


def test_no_positives_is_named_where_samples_need_them():
    ds = make(NO_POSITIVES)
    with pytest.raises(InputError, match=r"^hand: no positives \(rating > 3\): liked-item histories need liked"):
        history_samples(ds, history_len=1, liked_history_only=True)
    with pytest.raises(InputError, match=r"^hand: no positives \(rating > 3\) among 5 interactions \(ratings 1..3\)"):
        check_dataset(ds, Needs.ctr(history_len=1))
    assert len(history_samples(ds, history_len=1)) == 3  # plain histories exist; CTR would have one label only


def test_all_positives_fail_ctr_for_want_of_negatives():
    ds = make(NO_POSITIVES, like_threshold=0)
    with pytest.raises(InputError, match=r"no negatives \(rating <= 0\) among 5 interactions .*AUC is undefined"):
        check_dataset(ds, Needs.ctr(history_len=1))


def test_users_with_one_interaction_each():
    ds = make(SINGLES)
    with pytest.raises(InputError, match=r"^hand: no user has 3 or more interactions \(most: 1\): leave-one-out"):
        leave_one_out(ds)
    with pytest.raises(InputError, match=r"^hand: no interaction has 2 earlier interactions of its user"):
        history_samples(ds, history_len=2)
    with pytest.raises(InputError, match="no user has 3 or more"):
        check_dataset(ds, Needs.leave_one_out())


def test_one_item_cannot_be_ranked():
    ds = make(ONE_ITEM)
    report = degeneracy(ds, Needs.leave_one_out())
    assert report.problems == ["1 item(s), at least 2 needed to rank or compare items"]
    assert report.warnings == ["1 user with 3 or more interactions: test metrics rest on a single user"]
    assert report  # truthy when there are problems
    with pytest.raises(InputError, match=r"^hand: 1 item\(s\), at least 2 needed"):
        check_dataset(ds, Needs.leave_one_out())


def test_every_problem_is_listed_on_one_line():
    with pytest.raises(InputError) as info:
        check_dataset(make(SINGLES[:1]), Needs(min_items=2, positives=False, negatives=True, min_user_interactions=3))
    message = str(info.value)
    assert "\n" not in message and message.count("; ") == 2
    assert "1 item(s)" in message and "no negatives" in message and "no user has 3" in message


def test_thin_but_valid_data_gives_warnings():
    ds = make(ROWS)  # 3 users, 2 with >= 3 interactions, 8 items
    assert check_dataset(ds, Needs.leave_one_out()) == [
        "8 items, not more than k=10: every top-K list with K >= 8 holds the whole catalogue, so hr@K (recall@K) is "
        "1 by construction for those K"]
    assert check_dataset(ds, Needs.leave_one_out(top_k=5)) == []
    assert check_dataset(make(ROWS[:5]), Needs.ctr(history_len=2)) == ["1 user: metrics rest on a single user"]
    assert check_dataset(load_dataset("ml-100k"), Needs.leave_one_out()) == []
    assert check_dataset(load_dataset("ml-100k"), Needs.ctr(liked_history=True)) == []


def test_liked_history_needs_enough_liked_items():
    ds = make(ROWS[:5])  # user a: p5 q2 r4 s1 t5 -> at most 2 liked earlier items
    assert degeneracy(ds, Needs.ctr(history_len=2, liked_history=True)).problems == []
    assert degeneracy(ds, Needs.ctr(history_len=3, liked_history=True)).problems == [
        "no interaction has 3 earlier liked interactions of its user (longest: 2): lower the method's history "
        "length (samples.history_len, or data_protocol.min_history for CoLLM and Soft-Prompt) or use a denser dataset"]
    with pytest.raises(InputError, match="longest: 2"):
        history_samples(ds, history_len=3, liked_history_only=True)


def test_cases_whose_masked_history_leaves_k_or_fewer_candidates_are_warned_about():
    from recalign.tasks.next_item import few_candidates_warnings

    histories = [np.array([0, 1, 2, 3]), np.array([0, 1]), np.array([5, 5, 4])]  # 10 items
    targets = [3, 2, 0]  # the target is never masked (case 0: 7 left), repeats count once (case 2: 8 left)
    assert few_candidates_warnings(histories, targets, 10, [5, 7, 8, 10, 20]) == [
        "masking each user's earlier items leaves K or fewer candidates for some test cases, so their hr@K is 1 by "
        "construction: 1 of 3 cases at K=7, 3 of 3 cases at K=8"]  # K >= 10: the catalogue-wide warning's
    assert few_candidates_warnings(histories, targets, 10, [5]) == []


def test_fewer_samples_than_the_config_asks_for_are_warned_about():
    from recalign.tasks.ctr import fewer_than_asked

    config = {"train": {"shots": 1000}, "samples": {"valid_size": 0, "test_size": 500}}
    assert fewer_than_asked(config, 181, 40, 23) == [
        "train.shots=1000 but the training period holds 181 samples; all of them were used",
        "samples.test_size=500 but the test period holds 23 cases; all of them were used"]  # valid_size 0: all
    assert fewer_than_asked(config, 1000, 40, 500) == []
