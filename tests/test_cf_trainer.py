"""The CF trainer: early stopping keeps the best epoch, checkpoints every epoch, resume continues (not
restarts) and ends exactly where an uninterrupted run ends; the CF methods run end to end."""

from __future__ import annotations

import json

import pytest
import torch

from recalign.cf import evaluate_ranking, leave_one_out_sets, train_cf_model
from recalign.errors import InputError
from recalign.runs import LOCK_NAME, RunDir

from test_cf import cycle_log

CONFIG = {"model": {"embedding_size": 16, "dropout": 0.2, "max_len": 8, "inner_size": 32},
          "train": {"epochs": 6, "batch_size": 128, "lr": 0.01, "patience": 0}}


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def cycles():
    frame, n_users, n_items = cycle_log(n_users=40, n_items=60, length=10)
    return leave_one_out_sets(frame, n_users, n_items)


def _params(model):
    return {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}


def test_resume_continues_and_matches_uninterrupted_run(cycles, tmp_path):
    data, valid, _ = cycles
    full = train_cf_model("sasrec", data, CONFIG, valid=valid, run=tmp_path / "full", seed=3)

    def stop_after_three(epoch, record):
        if epoch == 3:
            raise Interrupt()

    with pytest.raises(Interrupt):
        train_cf_model("sasrec", data, CONFIG, valid=valid, run=tmp_path / "cut", seed=3, on_epoch_end=stop_after_three)
    saved = RunDir(tmp_path / "cut").load_checkpoint("sasrec")
    assert saved["state"]["epoch"] == 3 and not saved["state"]["done"]

    seen = []
    resumed = train_cf_model("sasrec", data, CONFIG, valid=valid, run=tmp_path / "cut", seed=3,
                             on_epoch_end=lambda epoch, record: seen.append(epoch))
    assert seen == [4, 5, 6]  # continued, did not restart
    assert [r["epoch"] for r in resumed.train_summary["history"]] == [1, 2, 3, 4, 5, 6]
    a, b = _params(full), _params(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.train_summary["history"][-1]["valid"] == full.train_summary["history"][-1]["valid"]

    # a finished run is loaded, not retrained
    again = []
    loaded = train_cf_model("sasrec", data, CONFIG, valid=valid, run=tmp_path / "cut", seed=3,
                            on_epoch_end=lambda epoch, record: again.append(epoch))
    assert again == []
    for key in ("epochs", "best_epoch", "stopped"):  # the summary of the run that finished, not None
        assert loaded.train_summary[key] == full.train_summary[key] is not None, key


def test_early_stopping_keeps_best_epoch(cycles):
    data, valid, _ = cycles
    config = {"model": {"embedding_size": 8}, "train": {"epochs": 40, "lr": 0.05, "patience": 2, "batch_size": 64}}
    model = train_cf_model("mf", data, config, valid=valid, seed=0)
    history = model.train_summary["history"]
    best = max(history, key=lambda r: r["valid"])
    assert model.train_summary["best_epoch"] == best["epoch"]
    assert len(history) == best["epoch"] + 2 or len(history) == 40
    assert evaluate_ranking(model, valid, ks=(10,))["ndcg@10"] == pytest.approx(best["valid"])


def test_checkpoint_for_another_model_is_refused(cycles, tmp_path):
    data, valid, _ = cycles
    train_cf_model("mf", data, {"train": {"epochs": 1}}, run=tmp_path, checkpoint="cf")
    with pytest.raises(InputError, match="is for mf"):
        train_cf_model("fism", data, {"train": {"epochs": 1}}, run=tmp_path, checkpoint="cf")


def test_methods_run_end_to_end(tmp_path):
    from recalign.runner import run_method

    metrics = run_method("itemcf", "ml-100k", tmp_path / "itemcf")
    assert set(metrics["test"]) >= {"ndcg@10", "hr@10", "ndcg@20", "hr@20"}
    assert metrics["test"]["hr@10"] > 0.08  # leave-one-out, full ranking of 1682 items (random ~0.006)
    metrics = run_method("mf", "ml-100k", tmp_path / "mf-ctr", sets=["protocol=ctr", "train.epochs=2"])
    assert {"auc", "uauc", "auc_warm", "auc_cold"} <= set(metrics["test"])
    saved = json.loads((tmp_path / "mf-ctr" / "metrics.json").read_text())
    assert saved["training"]["epochs"] == 2
    from recalign.cf import load_model

    model = load_model(RunDir(tmp_path / "mf-ctr").load_checkpoint("model"))
    assert model.name == "mf"
    with pytest.raises(InputError, match="train.objective"):
        run_method("mf", "ml-100k", tmp_path / "bad", sets=["train.objective=ce"])
    assert not (tmp_path / "bad").exists()


def test_a_trainer_checkpoint_that_does_not_fit_is_one_line(cycles, tmp_path):
    from recalign.io import Checkpoints

    data, valid, _ = cycles
    train_cf_model("mf", data, {"model": {"embedding_size": 8}, "train": {"epochs": 1}}, run=tmp_path, checkpoint="cf")
    with pytest.raises(InputError, match=r"cf.safetensors: does not fit this mf model \(RuntimeError: .*size mismatch"):
        train_cf_model("mf", data, {"model": {"embedding_size": 16}, "train": {"epochs": 2}}, run=tmp_path, checkpoint="cf")
    Checkpoints(tmp_path / "checkpoints").save_checkpoint("cf", {"model": "mf"})
    with pytest.raises(InputError, match="cf.safetensors: not a CF trainer checkpoint"):
        train_cf_model("mf", data, {"train": {"epochs": 1}}, run=tmp_path, checkpoint="cf")
    (tmp_path / "checkpoints" / "cf.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(InputError, match="cf.safetensors: not a readable recalign state file"):
        train_cf_model("mf", data, {"train": {"epochs": 1}}, run=tmp_path, checkpoint="cf")


def test_kill_9_then_the_same_command_gives_bit_identical_metrics(tmp_path):
    """A real SIGKILL (mid-epoch or mid-write) of `recalign run`, then the same command: it continues from
    the checkpoints, cleans the temporaries, and ends with exactly the metrics of an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from recalign.runner import run_method

    sets = ["train.epochs=6", "train.batch_size=4096", "model.embedding_size=8", "train.patience=0"]
    reference = run_method("mf", "ml-100k", tmp_path / "ref", sets=sets)
    out = tmp_path / "killed"
    command = [sys.executable, "-c", "from recalign.cli import main; main()", "run", "mf", "--out", str(out)]
    for s in sets:
        command += ["--set", s]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "RECALIGN_QUIET": "1"})
    checkpoint = out / "checkpoints" / "train.safetensors"
    deadline = time.time() + 120
    while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert checkpoint.exists() and not (out / "metrics.json").exists(), "the run ended before it was killed"
    resumed = run_method("mf", "ml-100k", out, sets=sets)  # the same command, no --resume
    assert resumed["test"] == reference["test"] and resumed["valid"] == reference["valid"]
    assert "mf: resuming after epoch" in (out / "run.log").read_text()  # continued, not restarted
    assert not [p for p in out.rglob(".*") if p.name != LOCK_NAME]  # no temporaries left (the lock is the run's)
