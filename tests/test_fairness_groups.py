"""Group fairness audit: per-group means with intervals, the spread and its permutation test on hand-made
values, user groups (age bands, activity thirds), and the audit end to end on a CF model and on the
per-case file of a finished run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import invoke
from recalign.errors import InputError
from recalign.eval.fairness import group_means, permutation_spread


def test_group_means_and_intervals_on_hand_made_values():
    out = group_means(np.array([1.0, 0.0, 1.0, 1.0, np.nan]), np.array(["A", "A", "B", "B", "B"], dtype=object),
                      n_boot=200, seed=0)
    assert out["A"]["n"] == 2 and out["A"]["mean"] == 0.5
    assert out["B"]["n"] == 2 and out["B"]["mean"] == 1.0 and out["B"]["ci"] == [1.0, 1.0]  # NaN skipped
    assert 0.0 <= out["A"]["ci"][0] <= 0.5 <= out["A"]["ci"][1] <= 1.0
    ordered = group_means(np.ones(3), np.array(["<18", "18-24", "56+"], dtype=object), 0, order=["<18", "18-24", "56+"])
    assert list(ordered) == ["<18", "18-24", "56+"]


def test_permutation_spread_separates_a_real_gap_from_noise():
    groups = np.array(["A"] * 30 + ["B"] * 30, dtype=object)
    gap = permutation_spread(np.r_[np.zeros(30), np.ones(30)], groups, n_perm=200, seed=0)
    assert gap["snsr"] == 1.0 and gap["snsv"] == 0.5 and gap["p_snsr"] == pytest.approx(1 / 201)
    same = permutation_spread(np.ones(60), groups, n_perm=200, seed=0)
    assert same["snsr"] == 0.0 and same["p_snsr"] == 1.0
    noise = permutation_spread(np.random.default_rng(1).random(60), groups, n_perm=500, seed=0)
    assert noise["p_snsr"] > 0.05 and noise["null_snsr_mean"] > 0  # a range over noisy means is never 0
    one = permutation_spread(np.ones(4), np.array(["A"] * 4, dtype=object), 10, 0)
    assert np.isnan(one["snsr"])


def test_user_groups_age_bands_and_activity():
    from recalign.data import load_dataset
    from recalign.tasks.fairness import activity_groups, user_groups

    ds = load_dataset("ml-100k")
    ages = user_groups(ds, "age")
    assert ages[0] == "18-24" and ages[1] == "50-55"  # users 1 and 2 of u.user are 24 and 53
    assert set(ages) == {"<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+"}
    assert set(user_groups(ds, "gender")) == {"F", "M"}
    with pytest.raises(InputError, match="no user attribute 'income'.*age, gender, occupation"):
        user_groups(ds, "income")
    assert activity_groups(np.arange(1.0, 10.0)).tolist() == ["low"] * 3 + ["mid"] * 3 + ["high"] * 3


FAST = ["--set", "groups.bootstrap=50", "--set", "groups.permutations=50"]


def test_group_audit_of_a_cf_model(monkeypatch, capsys, tmp_path):
    out = tmp_path / "pop"
    code, _, stderr = invoke(monkeypatch, capsys, "run", "fairness-groups", "--dataset", "ml-100k", *FAST,
                             "--set", "source.recommender=pop", "--set", "groups.attributes=[gender, age]",
                             "--out", str(out))
    assert code == 0, stderr
    metrics = json.loads((out / "metrics.json").read_text())
    test = metrics["test"]
    # the same numbers as `recalign run pop` (leave-one-out, full ranking)
    assert test["ndcg@10"] == pytest.approx(0.0442, abs=1e-4) and test["hr@10"] == pytest.approx(0.0859, abs=1e-4)
    # the overall mean carries its interval (the same as `recalign run pop`'s: 0.0349-0.0546)
    low, high = test["ndcg@10_ci"]
    assert 0.030 < low < test["ndcg@10"] < high < 0.060
    gender = metrics["groups"]["gender"]["ndcg@10"]
    assert {g: e["n"] for g, e in gender["groups"].items()} == {"F": 273, "M": 670}
    means = [e["mean"] for e in gender["groups"].values()]
    assert test["ndcg@10_snsr_gender"] == pytest.approx(max(means) - min(means))
    assert 0 < test["ndcg@10_p_gender"] <= 1 and "ndcg@10_snsv_age" in test
    assert list(metrics["groups"]["age"]["hr@10"]["groups"])[0] == "<18"
    assert "p = " in (out / "report.md").read_text()
    assert metrics["warnings"] == [] and test["n"] == 943
    # no two groups large enough: the spread is undefined, and said
    code, _, stderr = invoke(monkeypatch, capsys, "run", "fairness-groups", "--dataset", "ml-100k", *FAST,
                             "--set", "source.recommender=pop", "--set", "groups.attributes=[gender]",
                             "--set", "groups.min_size=300", "--out", str(tmp_path / "big"))
    metrics = json.loads((tmp_path / "big" / "metrics.json").read_text())
    assert code == 0 and metrics["test"]["ndcg@10_snsr_gender"] is None
    assert metrics["warnings"] == ["gender: fewer than two groups have groups.min_size=300 users (F 273, M 670): its "
                                   "SNSR/SNSV are undefined; lower groups.min_size or audit more users"]


def test_group_audit_of_a_runs_per_case_file(monkeypatch, capsys, tmp_path):
    run = tmp_path / "icl-run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"method": "icl", "test": {}}))
    (run / "config.yaml").write_text("seed: 0\n# run: icl on ml-100k\n")
    # users 0 (M) and 1 (F) of ML-100K: user 0 ranks its positive first (AUC 1), user 1 last (AUC 0)
    (run / "predictions.json").write_text(json.dumps({
        "user": [0, 0, 0, 1, 1, 1], "item": [1, 2, 3, 1, 2, 3], "label": [1, 0, 0, 1, 0, 0],
        "score": [0.9, 0.1, 0.2, 0.1, 0.5, 0.6]}))
    out = tmp_path / "audit"
    code, _, stderr = invoke(monkeypatch, capsys, "run", "fairness-groups", "--dataset", "ml-100k", *FAST,
                             "--set", "source.recommender=", "--set", f"source.run={run}",
                             "--set", "groups.attributes=[gender]", "--set", "groups.min_size=1", "--out", str(out))
    assert code == 0, stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["uauc"] == 0.5 and metrics["test"]["n"] == 2  # per-user AUCs: the run's UAUC
    assert {g: e["mean"] for g, e in metrics["groups"]["gender"]["uauc"]["groups"].items()} == {"F": 0.0, "M": 1.0}
    assert metrics["test"]["uauc_snsr_gender"] == 1.0


def test_a_run_on_the_same_local_dataset_spelt_otherwise_is_audited(monkeypatch, capsys, tmp_path):
    import shutil

    shutil.copytree(Path(__file__).parent / "fixtures" / "ml-1m", tmp_path / "data" / "ml-1m")
    run = tmp_path / "icl-run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"method": "icl", "test": {}}))
    # runs record a local dataset's absolute path; the audit names it relative to its own cwd
    (run / "config.yaml").write_text(f"seed: 0\n# run: icl on {(tmp_path / 'data' / 'ml-1m').resolve()}\n")
    (run / "predictions.json").write_text(json.dumps({
        "user": [0, 0, 1, 1], "item": [1, 2, 1, 2], "label": [1, 0, 1, 0], "score": [0.9, 0.1, 0.1, 0.5]}))
    monkeypatch.chdir(tmp_path)
    code, _, stderr = invoke(monkeypatch, capsys, "run", "fairness-groups", "--dataset", "./data/ml-1m/", *FAST,
                             "--set", "source.recommender=", "--set", f"source.run={run}",
                             "--set", "groups.attributes=[activity]", "--set", "groups.min_size=1", "--out", "audit")
    assert code == 0, stderr
    assert json.loads((tmp_path / "audit" / "metrics.json").read_text())["test"]["uauc"] == 0.5


@pytest.mark.parametrize("sets, message", [
    (["source.run=/nowhere"], "exactly one of"),
    (["source.recommender=", "source.run=/nowhere"], "not a finished run directory"),
    (["source.recommender=nosuchmodel"], "unknown CF model"),
    (["groups.attributes=[income]"], "no user attribute 'income'"),
    (["groups.age_bands=[30, 20]"], "groups.age_bands"),
    (["eval.k=0"], "eval.k"),
])
def test_bad_input_is_one_line_exit_2(monkeypatch, capsys, tmp_path, sets, message):
    args = [a for s in sets for a in ("--set", s)]
    code, _, stderr = invoke(monkeypatch, capsys, "run", "fairness-groups", "--dataset", "ml-100k", *FAST, *args,
                             "--out", str(tmp_path / "run"))
    assert code == 2 and message in stderr and stderr.count("\n") == 1, stderr
    assert not (tmp_path / "run").exists()


def test_a_run_over_seeds_is_audited_through_one_seeds_file(monkeypatch, capsys, tmp_path):
    run = tmp_path / "tallrec-run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"method": "tallrec", "test": {}}))
    (run / "config.yaml").write_text("seed: 0\n# run: tallrec on ml-100k\n")
    for seed in (0, 1):
        (run / f"predictions-seed{seed}-test.json").write_text(json.dumps({
            "user": [0, 0, 1, 1], "item": [1, 2, 1, 2], "label": [1, 0, 1, 0], "score": [0.9, 0.1, 0.1, 0.5]}))
    common = ["run", "fairness-groups", "--dataset", "ml-100k", *FAST, "--set", "source.recommender=",
              "--set", "groups.attributes=[gender]", "--set", "groups.min_size=1"]
    code, _, err = invoke(monkeypatch, capsys, *common, "--set", f"source.run={run}", "--out", str(tmp_path / "a"))
    assert code == 2 and "holds several per-case result files" in err and "name one of them" in err
    code, _, err = invoke(monkeypatch, capsys, *common, "--set", f"source.run={run / 'predictions-seed1-test.json'}",
                          "--out", str(tmp_path / "b"))
    assert code == 0, err
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["test"]["uauc"] == 0.5
