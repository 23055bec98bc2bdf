"""Bootstrap intervals: they hold the point estimate, shrink with more cases, are reproducible, resample users
for UAUC, pair the cases for differences, and skip one-class resamples."""

import numpy as np
import pytest

from recalign.eval.intervals import (auc_interval, mean_interval, paired_auc_difference, paired_ranking_difference,
                                     per_user_auc, ranking_intervals, uauc_interval)
from recalign.eval.metrics import auc, ranking_metrics, uauc


def separable(n, noise, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.5
    return labels, labels + rng.normal(0, noise, n)


def test_auc_interval_holds_the_estimate_and_shrinks_with_more_cases():
    small, large = separable(200, 1.0), separable(5000, 1.0)
    lo_s, hi_s = auc_interval(*small)
    lo_l, hi_l = auc_interval(*large)
    assert lo_s < auc(*small) < hi_s and lo_l < auc(*large) < hi_l
    assert (hi_l - lo_l) < 0.5 * (hi_s - lo_s)  # ~ 1/sqrt(n): 5x narrower for 25x the cases
    assert auc_interval(*small) == auc_interval(*small)  # fixed seed
    assert 0.70 < lo_l and hi_l < 0.80  # true AUC of N(1,1) vs N(0,1) is Phi(1/sqrt 2) = 0.760


def test_one_class_data_has_no_interval():
    assert auc_interval(np.ones(50, bool), np.arange(50.0)) is None
    assert mean_interval([]) is None


def test_uauc_interval_resamples_users():
    rng = np.random.default_rng(1)
    users = np.repeat(np.arange(40), 10)
    labels = rng.random(400) < 0.5
    scores = labels + rng.normal(0, 1.0, 400)
    value, skipped = uauc(users, labels, scores)
    assert np.isclose(per_user_auc(users, labels, scores).mean(), value)
    lo, hi = uauc_interval(users, labels, scores)
    assert lo < value < hi


def test_paired_difference_of_a_method_with_itself_is_zero_and_a_real_gain_excludes_zero():
    labels, good = separable(2000, 0.8)
    rng = np.random.default_rng(2)
    same = paired_auc_difference(labels, good, good)
    assert same["difference"] == 0 and same["ci"] == [0.0, 0.0]
    worse = good + rng.normal(0, 2.0, 2000)
    gain = paired_auc_difference(labels, good, worse)
    assert gain["difference"] > 0 and gain["ci"][0] > 0


def test_ranking_intervals_hold_the_ranking_metrics():
    ranks = np.random.default_rng(3).integers(0, 100, 500).astype(float)
    point = ranking_metrics(ranks, (10,))
    out = ranking_intervals(ranks, (10,))
    for name in ("ndcg@10", "hr@10"):
        lo, hi = out[f"{name}_ci"]
        assert lo <= point[name] <= hi
    assert out["hr@10_ci"][0] == pytest.approx(0.1, abs=0.04)


def test_paired_ranking_difference_is_the_ndcg_gap_on_the_same_cases():
    ranks = np.random.default_rng(4).integers(0, 40, 600).astype(float)
    same = paired_ranking_difference(ranks, ranks)
    assert same["ndcg@10"] == 0 and same["ci"] == [0.0, 0.0] and same["cases"] == 600
    better = np.maximum(ranks - 5, 0)  # every target moved up by 5 places
    gain = paired_ranking_difference(better, ranks)
    expected = ranking_metrics(better, (10,))["ndcg@10"] - ranking_metrics(ranks, (10,))["ndcg@10"]
    assert gain["ndcg@10"] == pytest.approx(expected) and gain["ci"][0] > 0


def test_paired_predictions_pairs_the_same_samples_and_refuses_others():
    from recalign.errors import InputError
    from recalign.eval.intervals import paired_predictions

    rng = np.random.default_rng(3)
    n = 600
    users, labels = rng.integers(0, 40, n), rng.random(n) < 0.5
    good, weak = labels + rng.normal(0, 0.7, n), labels + rng.normal(0, 3.0, n)
    record = lambda s: {"user": users.tolist(), "item": list(range(n)), "label": labels.astype(int).tolist(),
                        "score": s.tolist()}
    out = paired_predictions(record(good), record(weak), rounds=300)
    assert out["n"] == n and out["users"] == len(set(users.tolist()))
    assert out["auc"]["difference"] == pytest.approx(auc(labels, good) - auc(labels, weak))
    lo, hi = out["auc"]["ci"]
    assert 0 < lo < out["auc"]["difference"] < hi  # a clear gap: the interval excludes zero
    assert out["uauc"]["difference"] == pytest.approx(uauc(users, labels, good)[0] - uauc(users, labels, weak)[0])
    assert out["uauc"]["ci"][0] > 0
    shifted = {**record(weak), "item": list(range(1, n + 1))}
    with pytest.raises(InputError, match="different samples"):
        paired_predictions(record(good), shifted)


def test_reproduce_report_shows_intervals_and_the_quick_noise_statement(tmp_path):
    from recalign.methods.api import Experiment
    from recalign.report.summary import QUICK_NOISE, write_reproduce_report

    metrics = {"test": {"auc": 0.7, "auc_ci": [0.68, 0.72], "uauc": 0.6, "n": 2000}, "seconds": {"total": 1.0}}
    for profile, noted in (("quick", True), ("full", False)):
        text = write_reproduce_report(tmp_path / profile, profile, [(Experiment("x", "icl", table="t"), metrics)]) \
            .read_text()
        assert "0.7000 [0.680, 0.720]" in text and "| 0.6000 |" in text
        assert (QUICK_NOISE in text) is noted
    # counting baselines that runs report on the same test samples: one row each beside the models
    floor = {"history_like_ratio": {"test": {"auc": 0.71, "auc_ci": [0.69, 0.73], "n": 2000}, "counting": True},
             "cf": {"test": {"auc": 0.8, "n": 2000}}}
    runs = [(Experiment(name, "tallrec", table="t"), {**metrics, "baselines": floor}) for name in ("a", "b")]
    text = write_reproduce_report(tmp_path / "floor", "full", runs).read_text()
    assert text.count("history_like_ratio (counting baseline, no model) | 0.7100 [0.690, 0.730]") == 1
    assert "| cf" not in text  # only counting baselines are added


def test_run_report_lists_the_test_intervals_with_the_sample_count():
    from recalign.report.markdown import interval_lines

    lines = interval_lines({"auc": 0.7, "auc_ci": [0.68, 0.72], "uauc": 0.6, "uauc_ci": None, "n": 2000})
    assert lines[0] == "95% bootstrap intervals on 2000 test samples: auc 0.7000 [0.6800, 0.7200]"
    assert interval_lines({"auc": 0.7, "n": 5}) == []  # a multi-seed aggregate keeps intervals per seed only


def test_reproduce_report_tables_of_fairness_audits_show_their_metrics(tmp_path):
    from recalign.methods.api import Experiment
    from recalign.report.summary import write_reproduce_report

    audit = {"test": {"jaccard@10": 0.41, "serp@10": 0.52, "prag@10": 0.63, "jaccard@10_snsr_gender": 0.05,
                      "jaccard@10_snsv_gender": 0.02, "serp@10_snsr_gender": 0.07}, "seconds": {"total": 1.0}}
    groups = {"test": {"ndcg@10": 0.1, "hr@10": 0.2, "ndcg@10_snsr_age": 0.03, "hr@10_snsr_age": 0.04},
              "seconds": {"total": 1.0}}
    text = write_reproduce_report(tmp_path, "full", [(Experiment("fair", "fairllm", table="a"), audit),
                                                     (Experiment("groups", "fairness-groups", table="g"), groups)]
                                  ).read_text()
    assert "| | jaccard@10 | serp@10 | prag@10 | jaccard@10_snsr_gender |" in text  # was a table without columns
    assert "ndcg@10_snsr_age" in text and "hr@10_snsr_age" not in text and "snsv" not in text
