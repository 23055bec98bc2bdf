"""CF models: each learns a planted structure far above random; one interface for all; save -> load exact."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from recalign.cf import (MODELS, EvalSet, case_query, TrainData, create_model, evaluate_ctr, evaluate_ranking, leave_one_out_sets,
                         load_model, make_query, recommend, train_cf_model)
from recalign.errors import InputError

SEQUENTIAL = ["gru4rec", "caser", "sasrec"]
NON_SEQUENTIAL = ["usercf", "itemcf", "mf", "fism", "lightgcn"]
FAST = {"train": {"epochs": 40, "batch_size": 256, "lr": 0.01, "patience": 0}}
SEQ_FAST = {"train": {"epochs": 30, "batch_size": 256, "lr": 0.01, "patience": 0}}
SMALL_MODEL = {"mf": {"embedding_size": 16}, "fism": {"embedding_size": 16}, "lightgcn": {"embedding_size": 16},
               "usercf": {"k": 10}, "itemcf": {"k": 20},
               "gru4rec": {"embedding_size": 32, "hidden_size": 32, "dropout": 0.1, "max_len": 10},
               "caser": {"embedding_size": 32, "dropout": 0.1, "max_len": 3},
               "sasrec": {"embedding_size": 32, "dropout": 0.1, "max_len": 10, "inner_size": 64}}


def block_log(n_blocks=8, users_per_block=10, items_per_block=12, seen=8, seed=0) -> tuple[pd.DataFrame, int, int]:
    """Users of block b interact only with items of block b (`seen` of them, random order)."""
    rng = np.random.default_rng(seed)
    rows = []
    for b in range(n_blocks):
        for k in range(users_per_block):
            user = b * users_per_block + k
            items = b * items_per_block + rng.permutation(items_per_block)[:seen]
            rows += [(user, int(i), t) for t, i in enumerate(items)]
    frame = pd.DataFrame(rows, columns=["user", "item", "timestamp"])
    return frame, n_blocks * users_per_block, n_blocks * items_per_block


def cycle_log(n_users=80, n_items=100, length=14, seed=0) -> tuple[pd.DataFrame, int, int]:
    """Each user walks a fixed random cycle over the items: the next item is a function of the last one."""
    rng = np.random.default_rng(seed)
    successor = np.roll(rng.permutation(n_items), 1)
    order = np.empty(n_items, np.int64)
    order[successor[:-1]] = successor[1:]
    order[successor[-1]] = successor[0]
    rows = []
    for user in range(n_users):
        item = int(rng.integers(n_items))
        for t in range(length):
            rows.append((user, item, t))
            item = int(order[item])
    return pd.DataFrame(rows, columns=["user", "item", "timestamp"]), n_users, n_items


def _config(name: str, base: dict) -> dict:
    return {"model": SMALL_MODEL.get(name, {}), "train": dict(base["train"])}


@pytest.fixture(scope="module")
def blocks():
    frame, n_users, n_items = block_log()
    return leave_one_out_sets(frame, n_users, n_items), n_users, n_items


@pytest.fixture(scope="module")
def cycles():
    frame, n_users, n_items = cycle_log()
    return leave_one_out_sets(frame, n_users, n_items), n_users, n_items


@pytest.fixture(scope="module")
def trained(blocks, cycles):
    """Every model trained once on its planted data (shared by the tests below)."""
    out = {}
    for name in MODELS:
        sets = cycles if name in SEQUENTIAL else blocks
        (data, valid, _), _, _ = sets
        out[name] = train_cf_model(name, data, _config(name, SEQ_FAST if name in SEQUENTIAL else FAST), seed=0)
    return out


@pytest.mark.parametrize("name", NON_SEQUENTIAL)
def test_learns_block_structure(trained, blocks, name):
    (_, _, test), _, n_items = blocks
    metrics = evaluate_ranking(trained[name], test, ks=(10,))
    # random HR@10 among the 88 unseen items is ~0.11; the 4 unseen items of the user's block are the answer
    assert metrics["hr@10"] >= 0.8, metrics


@pytest.mark.parametrize("name", SEQUENTIAL)
def test_learns_sequence_pattern(trained, cycles, name):
    (_, _, test), _, n_items = cycles
    metrics = evaluate_ranking(trained[name], test, ks=(10,))
    assert metrics["hr@10"] >= 0.9, metrics  # random: 10 / 87 ~ 0.11
    assert metrics["ndcg@10"] >= 0.6, metrics


def test_pop_ranks_by_training_count():
    frame = pd.DataFrame({"user": [0, 1, 2, 0, 1, 0], "item": [3, 3, 3, 1, 1, 0]})
    model = train_cf_model("pop", frame, n_users=3, n_items=5)
    scores = model.score(make_query([0, 1], [[], [2]], 5))
    assert scores[0].tolist() == [1, 2, 0, 3, 0]
    _, top = recommend(model, make_query([1], [[3]], 5), k=2)
    assert top[0].tolist() == [1, 0]  # item 3 is in the history: masked
    tied = train_cf_model("pop", pd.DataFrame({"user": [0] * 6, "item": [7, 7, 2, 5, 9, 4]}), n_users=1, n_items=40)
    query = make_query([0], [[]], 40)
    tops = [recommend(tied, query, k=k, exclude_history=False)[1][0].tolist() for k in range(1, 12)]
    assert tops[-1][:5] == [7, 2, 4, 5, 9]  # ties in item order
    assert all(tops[k - 1] == tops[-1][:k] for k in range(1, 12))  # each top k a prefix of the next


@pytest.mark.parametrize("name", list(MODELS))
def test_interface_conformance(trained, blocks, cycles, name):
    model = trained[name]
    (_, _, test), _, n_items = cycles if name in SEQUENTIAL else blocks
    rows = np.arange(6)
    query = case_query(test, rows, model.n_items, model.max_len)
    with torch.no_grad():
        full = model.score(query)
        assert full.shape == (6, n_items) and torch.isfinite(full).all()
        items = torch.tensor([5, 0, 7])
        assert torch.allclose(model.score(query, items), full[:, items], atol=1e-5)
        per_row = torch.randint(0, n_items, (6, 4))
        assert torch.allclose(model.score(query, per_row), full.gather(1, per_row), atol=1e-5)
        targets = torch.from_numpy(test.targets[rows])
        assert torch.allclose(model.score_pairs(query, targets), full.gather(1, targets[:, None])[:, 0], atol=1e-5)
        # an unknown user with a history still gets finite scores
        unknown = make_query([-1], [test.histories[0]], n_items, model.max_len)
        assert torch.isfinite(model.score(unknown)).all()
        if model.kind != "memory":
            q = model.query_embedding(query)
            e = model.item_embeddings()
            assert e.shape[0] == n_items and q.shape == (6, e.shape[1])
            bias = getattr(model, "item_bias", None)
            expected = q @ e.T + (bias if bias is not None else 0)
            assert torch.allclose(expected, full, atol=1e-4)
        if model.kind == "embedding" and name != "fism":
            assert model.user_embeddings().shape[0] == model.n_users
        if model.sequential:
            states = model.hidden_states(query)
            assert states.dim() == 3 and states.shape[0] == 6
            assert model.sequence_representation(query).shape == (6, model.item_embeddings().shape[1])
        else:
            with pytest.raises(NotImplementedError):
                model.hidden_states(query)


@pytest.mark.parametrize("name", list(MODELS))
def test_save_load_gives_identical_scores(trained, blocks, cycles, tmp_path, name):
    model = trained[name]
    (_, _, test), _, _ = cycles if name in SEQUENTIAL else blocks
    query = case_query(test, np.arange(len(test)), model.n_items, model.max_len)
    path = tmp_path / f"{name}.pt"
    model.save(path)
    loaded = load_model(path)
    with torch.no_grad():
        assert torch.equal(model.eval().score(query), loaded.score(query))


def test_sequential_model_trains_on_a_sample_set(cycles):
    """BIGRec's use: SASRec trained on (history -> target) samples only, scoring the catalogue."""
    frame, n_users, n_items = cycle_log(n_users=60, seed=1)
    samples = []
    for user, group in frame.groupby("user"):
        items = group["item"].tolist()
        samples += [{"user": user, "item": items[t], "history": tuple(items[t - 5:t])} for t in range(5, len(items))]
    samples = pd.DataFrame(samples)
    model = train_cf_model("sasrec", samples.iloc[:400], _config("sasrec", SEQ_FAST), n_users=n_users, n_items=n_items)
    cases = EvalSet.from_samples(samples.iloc[400:])
    assert evaluate_ranking(model, cases, ks=(10,))["hr@10"] >= 0.9


def test_ctr_mode_bce_learns_labels():
    """MF trained point-wise on explicit likes/dislikes ranks liked pairs above disliked ones (AUC)."""
    rng = np.random.default_rng(0)
    n_users, n_items = 60, 40
    taste = rng.integers(0, 2, n_users)  # users like even (0) or odd (1) items
    users = rng.integers(0, n_users, 3000)
    items = rng.integers(0, n_items, 3000)
    frame = pd.DataFrame({"user": users, "item": items, "label": items % 2 == taste[users]})
    train, test = frame.iloc[:2500], frame.iloc[2500:]
    model = train_cf_model("mf", train, {"model": {"embedding_size": 8, "bias": True},
                                         "train": {"objective": "bce", "epochs": 60, "lr": 0.02,
                                                   "batch_size": 256}},
                           n_users=n_users, n_items=n_items)
    cases = EvalSet(test["user"].to_numpy(), [np.zeros(0, np.int64)] * len(test), test["item"].to_numpy(),
                    test["label"].to_numpy())
    metrics = evaluate_ctr(model, cases)
    assert metrics["auc"] > 0.9 and metrics["uauc"] > 0.9, metrics


def test_bad_inputs_raise_input_error(blocks):
    (data, _, _), n_users, n_items = blocks
    with pytest.raises(InputError, match="unknown CF model 'nope'"):
        create_model("nope", 3, 3)
    with pytest.raises(InputError, match="unknown model parameter"):
        create_model("mf", 3, 3, embeding_size=8)
    with pytest.raises(InputError, match="objective 'ce'"):
        train_cf_model("mf", data, {"train": {"objective": "ce", "epochs": 1}})
    with pytest.raises(InputError, match="item id 9 is outside"):
        TrainData.from_interactions(pd.DataFrame({"user": [0], "item": [9]}), 2, 5)
    with pytest.raises(InputError, match="missing column"):
        TrainData.from_interactions(pd.DataFrame({"user": [0]}), 2, 5)
    with pytest.raises(InputError, match="unknown train key"):
        train_cf_model("mf", data, {"train": {"epoch": 1}})
