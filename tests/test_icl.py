"""ICL (zero-shot) end to end through `recalign run` on a tiny random Llama."""

from __future__ import annotations

import json

import numpy as np

from cli_helpers import invoke
from recalign.eval.metrics import auc


def test_icl_scores_test_samples_and_is_deterministic(tmp_path, monkeypatch, capsys):
    args = ["--dataset", "ml-100k", "--set", "model.name=tiny-random", "--set", "samples.valid_size=16",
            "--set", "samples.test_size=30"]
    code, _, err = invoke(monkeypatch, capsys, "run", "icl", "--out", str(tmp_path / "a"), *args)
    assert code == 0, err
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["method"] == "icl" and metrics["test"]["n"] == 30 and metrics["valid"]["n"] == 16
    predictions = json.loads((tmp_path / "a" / "predictions.json").read_text())
    assert len(predictions["score"]) == 30 and len(set(predictions["score"])) > 1
    assert abs(auc(np.array(predictions["label"]), np.array(predictions["score"])) - metrics["test"]["auc"]) < 1e-12
    floor = metrics["baselines"]["ratio_plus_rate"]["test"]["auc"]  # the counting floor, paired with ICL
    assert abs(metrics["paired"]["icl - ratio_plus_rate"]["auc"]["difference"] - (metrics["test"]["auc"] - floor)) < 1e-9
    # the alpaca wrapper and no prefix cache give a different prompt / the same scores respectively
    code, _, err = invoke(monkeypatch, capsys, "run", "icl", "--out", str(tmp_path / "b"), *args,
                          "--set", "model.prefix_cache=false")
    assert code == 0, err
    again = json.loads((tmp_path / "b" / "predictions.json").read_text())
    assert np.allclose(again["score"], predictions["score"], atol=1e-5)
    code, _, err = invoke(monkeypatch, capsys, "run", "icl", "--out", str(tmp_path / "c"), *args,
                          "--set", "prompt.wrapper=alpaca")
    assert code == 0, err
    alpaca = json.loads((tmp_path / "c" / "predictions.json").read_text())
    assert not np.allclose(alpaca["score"], predictions["score"])


def test_icl_rejects_bad_template(tmp_path, monkeypatch, capsys):
    code, _, err = invoke(monkeypatch, capsys, "run", "icl", "--out", str(tmp_path / "x"),
                          "--set", "model.name=tiny-random", "--set", "prompt.yes=No.")
    assert code == 2 and "prompt.yes" in err
