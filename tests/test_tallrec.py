"""TALLRec end to end through `recalign run` on a tiny random Llama, plus its sample/prompt construction."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from cli_helpers import invoke
from recalign.data import build_dataset
from recalign.llm import Prompter, load_tokenizer
from recalign.tasks.ctr import TALLREC_PROMPT, tallrec_protocol
from recalign.tasks.text import frame_fields

TINY = ["--set", "model.name=tiny-random", "--set", "samples.valid_size=24", "--set", "samples.test_size=40",
        "--set", "train.epochs=2", "--set", "train.shots=16"]


def test_tallrec_runs_end_to_end_with_seeds_and_resume(tmp_path, monkeypatch, capsys):
    out = tmp_path / "tallrec"
    code, stdout, err = invoke(monkeypatch, capsys, "run", "tallrec", "--dataset", "ml-100k", "--out", str(out),
                               *TINY, "--set", "train.seeds=2")
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    test = metrics["test"]
    assert metrics["method"] == "tallrec" and 0 <= test["auc"] <= 1 and 0 <= test["uauc"] <= 1
    assert test["n"] == 40 and test["n_warm"] + test["n_cold"] == 40
    assert {"auc_std", "auc_warm", "auc_cold", "uauc_skipped_users"} <= set(test)
    assert [r["seed"] for r in metrics["per_seed"]] == [0, 1] and metrics["shots"] == 16
    assert all(r["steps"] == 8 for r in metrics["per_seed"])  # 16 shots / batch 4 x 2 epochs
    assert metrics["valid"]["n"] == 24
    for seed in (0, 1):
        assert (out / "checkpoints" / f"adapter-seed{seed}" / "adapter_model.safetensors").is_file()
    assert "| seed | shots |" in (out / "report.md").read_text()
    # per-sample scores, for pairing runs scored on the same samples: they give back the seed's test AUC
    from recalign.eval.metrics import auc

    scored = json.loads((out / "predictions-seed1-test.json").read_text())
    assert len(scored["score"]) == 40 and set(scored["label"]) <= {0, 1}
    assert auc(scored["label"], scored["score"]) == pytest.approx(metrics["per_seed"][1]["test"]["auc"])
    assert len(json.loads((out / "predictions-seed0-valid.json").read_text())["score"]) == 24
    # counting baselines on the same samples, each paired with every seed's scores
    assert set(metrics["baselines"]) == {"history_like_ratio", "item_like_rate", "ratio_plus_rate"}
    ratio = metrics["baselines"]["history_like_ratio"]["test"]
    paired = metrics["per_seed"][1]["paired"]["tallrec - history_like_ratio"]["auc"]
    assert paired["difference"] == pytest.approx(metrics["per_seed"][1]["test"]["auc"] - ratio["auc"])
    assert "Counting baselines" in (out / "report.md").read_text()
    # resume after losing metrics.json: finished seeds are read back, same numbers
    (out / "metrics.json").unlink()
    code, _, err = invoke(monkeypatch, capsys, "run", "tallrec", "--dataset", "ml-100k", "--out", str(out), *TINY,
                          "--set", "train.seeds=2", "--resume")
    assert code == 0, err
    again = json.loads((out / "metrics.json").read_text())
    assert again["test"] == test
    assert "read back from its checkpoint" in (out / "run.log").read_text()


def test_tallrec_cross_domain_matrix(tmp_path, monkeypatch, capsys):
    out = tmp_path / "cross"
    code, _, err = invoke(monkeypatch, capsys, "run", "tallrec", "--dataset", "ml-100k", "--out", str(out), *TINY,
                          "--set", "train.epochs=1", "--set", "train.loss=bce", "--set", "samples.test_size=20",
                          "--set", 'cross.domains=["genre:Action|Thriller", "genre:Comedy|Romance"]')
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    matrix = metrics["cross_domain"]["auc"]
    assert len(matrix) == 2 and all(len(row) == 2 and all(0 <= v <= 1 for v in row) for row in matrix)
    assert abs(metrics["test"]["auc"] - (matrix[0][1] + matrix[1][0]) / 2) < 1e-9
    # in-domain minus cross-domain on each test domain's samples, paired: the matrix's column differences
    paired = metrics["cross_domain"]["paired"]
    assert len(paired) == 2
    first = paired["test genre:Action|Thriller: trained on it - trained on genre:Comedy|Romance"]["auc"]
    assert first["difference"] == pytest.approx(matrix[0][0] - matrix[1][0])
    report = (out / "report.md").read_text()
    assert "Cross-domain AUC" in report
    row = next(line for line in report.splitlines() if line.startswith("| genre:Action"))
    assert len(row.replace("\\|", "").split("|")) == 5  # name + 2 AUCs: the genre pipes are escaped
    # every cell carries its interval, and each test domain its counting floor
    intervals = metrics["cross_domain"]["auc_ci"]
    assert all(ci[0] <= v <= ci[1] for r, c in zip(matrix, intervals) for v, ci in zip(r, c))
    assert " [" in row
    floors = metrics["cross_domain"]["baselines"]
    assert set(floors) == {"genre:Action|Thriller", "genre:Comedy|Romance"}
    assert all("item_like_rate" in rows and 0 <= rows["item_like_rate"]["test"]["auc"] <= 1 for rows in floors.values())
    assert "counting baselines on genre:Action, Thriller's test samples" in report


def test_a_run_interrupted_mid_training_reports_what_an_uninterrupted_one_does(tmp_path, monkeypatch, capsys):
    """The valid scores reported are the restored best adapter's, also when the best evaluation happened
    before the interruption (it used to report the best among the evaluations after the resume)."""
    from recalign.llm.train import Checkpointer

    # with these settings the best evaluation is the first (step 128 of 512), before the interruption
    sets = ["--set", "model.name=tiny-random", "--set", "samples.valid_size=16", "--set", "samples.test_size=32",
            "--set", "train.shots=256", "--set", "train.epochs=4", "--set", "train.batch_size=2",
            "--set", "train.patience=10"]
    code, _, err = invoke(monkeypatch, capsys, "run", "tallrec", "--out", str(tmp_path / "whole"), *sets)
    assert code == 0, err
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())

    original, saves = Checkpointer.save, []

    def save_then_stop(self, state):
        original(self, state)
        saves.append(state["result"]["steps"])
        if len(saves) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(Checkpointer, "save", save_then_stop)
    code, _, _ = invoke(monkeypatch, capsys, "run", "tallrec", "--out", str(tmp_path / "cut"), *sets)
    assert code == 130
    monkeypatch.setattr(Checkpointer, "save", original)
    code, _, err = invoke(monkeypatch, capsys, "run", "tallrec", "--out", str(tmp_path / "cut"), *sets)
    assert code == 0, err
    cut = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert cut["valid"] == whole["valid"] and cut["test"] == whole["test"]
    assert cut["per_seed"][0]["best_step"] == whole["per_seed"][0]["best_step"] == saves[0]


@pytest.mark.parametrize("setting, message", [
    ("prompt.wrapper=fancy", "prompt.wrapper"),
    ("prompt.input=Target {nope}", "prompt.input"),
    ("prompt.input=no placeholders", "uses {target}, so every sample would get the same prompt"),
    ("prompt.max_tokens=5", "prompt.max_tokens=5: a prompt without any history item already has"),
    ("train.loss=hinge", "train.loss"),
    ("lora.r=0", "lora"),
    ("model.name=/does/not/exist", "model.name"),
    ("samples.split=[0.5, 0.5]", "samples.split"),
    ("samples.split=[1, 0, 0]", "three positive fractions"),
    ("cross.domains=[\"genre:Nope\", \"genre:Drama\"]", "cross.domains"),
])
def test_bad_settings_are_one_line_errors(tmp_path, monkeypatch, capsys, setting, message):
    code, _, err = invoke(monkeypatch, capsys, "run", "tallrec", "--out", str(tmp_path / "bad"),
                          "--set", "model.name=tiny-random", "--set", setting)
    assert code == 2 and message in err and "Traceback" not in err
    if "cross" not in setting:  # caught before anything is written
        assert not (tmp_path / "bad" / "config.yaml").exists()


def toy_dataset():
    rows = []
    for i in range(6):  # user a: items 0..5, liked when even
        rows.append(("a", str(i), 5.0 if i % 2 == 0 else 1.0, 100 + i))
    for i in range(4):  # user b: later in time
        rows.append(("b", str(i), 4.0, 200 + i))
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])
    items = pd.DataFrame({"item_id": [str(i) for i in range(6)], "title": [f"Film {i}" for i in range(6)],
                          "year": [1990 + i for i in range(6)]})
    return build_dataset("toy", inter, items)


def test_counting_baselines_count_likes_of_the_history_and_of_the_item():
    from recalign.tasks.ctr import counting_baselines

    train = pd.DataFrame({"item": [1, 1, 1, 2], "label": [True, True, False, False]})
    frame = pd.DataFrame({"item": [1, 2, 3], "history_labels": [(True, True, True), (False,), ()]})
    out = counting_baselines(train, frame, prior_weight=2.0)
    overall = 0.5
    assert out["item_like_rate"] == pytest.approx([(2 + 2 * overall) / 5, (0 + 2 * overall) / 3, overall])
    assert out["history_like_ratio"] == pytest.approx([4 / 5, 1 / 3, 1 / 2])  # Laplace: (liked + 1) / (n + 2)
    assert out["ratio_plus_rate"][2] == pytest.approx(0.0)  # no history, unseen item: even odds
    liked_only = counting_baselines(train, frame.assign(history_labels=[(True,), (True, True), ()]))
    assert set(liked_only) == {"item_like_rate"}  # a liked-only history says nothing about leniency


def test_prompts_split_history_into_liked_and_disliked_and_truncate_oldest():
    ds = toy_dataset()
    tokenizer = load_tokenizer("tiny-random")
    data = tallrec_protocol(ds, {"history_len": 3, "split": [0.5, 0.25, 0.25], "valid_size": 0, "test_size": 0})
    train = data.train
    assert train["timestamp"].max() <= data.valid_full["timestamp"].min() <= data.test["timestamp"].min()
    row = train[(train["user"] == 0) & (train["item"] == 4)]
    prompt_cfg = {**TALLREC_PROMPT, "wrapper": "alpaca"}

    def render(cfg):
        return Prompter(cfg, tokenizer, cfg["wrapper"], max_tokens=cfg["max_tokens"]).render_all(
            frame_fields(row, ds.titles(), "movie"))

    (text,) = render(prompt_cfg)
    assert 'User Preference: "Film 2 (1992)"\nUser Unpreference: "Film 1 (1991)", "Film 3 (1993)"' in text
    assert 'target movie "Film 4 (1994)"?' in text and text.endswith("### Response:\n")
    full = len(tokenizer(text)["input_ids"])
    (short,) = render({**prompt_cfg, "max_tokens": full - 3})
    assert '"Film 1 (1991)"' not in short and '"Film 2 (1992)"' in short and '"Film 4 (1994)"' in short
