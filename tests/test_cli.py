"""The CLI end to end (in-process): run directories, resume, reproduce, report, errors."""

import json

import numpy as np
import pytest

from cli_helpers import invoke


def test_run_writes_contract_files(tmp_path, monkeypatch, capsys):
    out = tmp_path / "pop"
    code, stdout, _ = invoke(monkeypatch, capsys, "run", "pop", "--dataset", "ml-100k", "--out", str(out))
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "pop" and metrics["dataset"] == "ml-100k"
    assert set(metrics["seconds"]) >= {"train", "eval"}
    for split in ("test", "valid"):
        assert 0 < metrics[split]["ndcg@10"] < metrics[split]["hr@10"] <= 1
    assert (out / "config.yaml").read_text().startswith("seed: 0")
    assert "# pop on ml-100k" in (out / "report.md").read_text()
    assert (out / "run.log").exists()
    assert json.loads(stdout)["test"] == metrics["test"]
    # same seed, same metrics
    code, _, _ = invoke(monkeypatch, capsys, "run", "pop", "--out", str(tmp_path / "again"))
    assert json.loads((tmp_path / "again" / "metrics.json").read_text())["test"] == metrics["test"]
    # a finished run is kept on --resume, refused without it
    code, _, err = invoke(monkeypatch, capsys, "run", "pop", "--out", str(out))
    assert code == 2 and "already holds a run" in err
    code, _, _ = invoke(monkeypatch, capsys, "run", "pop", "--out", str(out), "--resume")
    assert code == 0


def test_report_compares_runs(tmp_path, monkeypatch, capsys):
    invoke(monkeypatch, capsys, "run", "pop", "--out", str(tmp_path / "a"))
    code, stdout, _ = invoke(monkeypatch, capsys, "report", str(tmp_path / "a"), "--out", str(tmp_path / "t.md"))
    assert code == 0 and "pop (a)" in stdout and "ndcg@10" in stdout
    assert (tmp_path / "t.md").read_text() == stdout


def _yes_no_run(path, scores, users=(0, 0, 1, 1, 2, 2), labels=(1, 0, 1, 0, 0, 1), name="predictions.json"):
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.json").write_text(json.dumps({"method": "icl", "test": {"auc": 0.5, "auc_ci": [0.4, 0.6]}}))
    (path / name).write_text(json.dumps({"user": list(users), "item": list(range(len(users))),
                                         "label": list(labels), "score": list(scores)}))
    return path


def test_report_paired_differences_on_the_same_samples(tmp_path, monkeypatch, capsys):
    from recalign.eval.intervals import paired_predictions

    rng = np.random.default_rng(0)
    users, labels = rng.integers(0, 30, 400), rng.integers(0, 2, 400)
    good, noise = labels + rng.normal(0, 0.8, 400), rng.normal(0, 1, 400)
    a = _yes_no_run(tmp_path / "a", noise.tolist(), users.tolist(), labels.tolist())
    b = _yes_no_run(tmp_path / "b", good.tolist(), users.tolist(), labels.tolist(), "predictions-seed0-test.json")
    code, stdout, _ = invoke(monkeypatch, capsys, "report", str(a), str(b), "--paired")
    assert code == 0 and "0.5000 [0.400, 0.600]" in stdout  # each run's metric with its interval
    expected = paired_predictions(json.loads((b / "predictions-seed0-test.json").read_text()),
                                  json.loads((a / "predictions.json").read_text()))
    line = next(row for row in stdout.splitlines() if row.startswith(f"| {b} |"))
    assert f"| 400 | {expected['auc']['difference']:+.4f} [{expected['auc']['ci'][0]:+.4f}," in line
    assert expected["auc"]["ci"][0] > 0  # the informative scores beat noise, and the interval says so

    # other samples, several result files, a run without any: one line naming the run
    _yes_no_run(tmp_path / "c", [0.1] * 5, users=(0, 0, 1, 1, 2), labels=(1, 0, 1, 0, 0))
    code, _, err = invoke(monkeypatch, capsys, "report", str(a), str(tmp_path / "c"), "--paired")
    assert code == 2 and str(tmp_path / "c") in err and "different samples" in err and len(err.strip().splitlines()) == 1
    _yes_no_run(b, [0.0] * 6, name="predictions-seed1-test.json")
    code, _, err = invoke(monkeypatch, capsys, "report", str(a), str(b), "--paired")
    assert code == 2 and "several per-case result files" in err
    code, _, _ = invoke(monkeypatch, capsys, "report", str(a), str(b / "predictions-seed0-test.json"), "--paired")
    assert code == 0
    invoke(monkeypatch, capsys, "run", "pop", "--out", str(tmp_path / "pop"))
    code, _, err = invoke(monkeypatch, capsys, "report", str(a), str(tmp_path / "pop"), "--paired")
    assert code == 2 and "kept no per-case test results" in err


def test_report_paired_ranks_of_next_item_runs(tmp_path, monkeypatch, capsys):
    def ranked(name, ranks):
        path = tmp_path / name
        path.mkdir()
        (path / "metrics.json").write_text(json.dumps({"method": "bigrec", "test": {"ndcg@10": 0.1}}))
        (path / "cases-test.json").write_text(json.dumps([{"user": i, "target": f"t{i}", "rank": r}
                                                          for i, r in enumerate(ranks)]))
        return path

    a, b = ranked("a", [0, 5, 20, None]), ranked("b", [0, 0, 0, 0])
    code, stdout, _ = invoke(monkeypatch, capsys, "report", str(a), str(b), "--paired")
    gain = (4 - (1 + 1 / np.log2(7))) / 4  # b finds every target first; a: ranks 0 and 5, misses two
    assert code == 0 and f"| {b} | 4 | {gain:+.4f} [" in stdout


def test_reproduce_only_pop(tmp_path, monkeypatch, capsys):
    code, stdout, _ = invoke(monkeypatch, capsys, "reproduce", "--out", str(tmp_path / "rep"), "--only", "pop")
    assert code == 0 and "report:" in stdout
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| pop |" in md
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "<table>" in html and "data:image/png;base64," in html


@pytest.mark.parametrize("args, needle", [
    (["run", "nosuchmethod", "--out", "X"], "unknown method 'nosuchmethod'"),
    (["run", "pop", "--set", "eval.kz=[1]", "--out", "X"], "unknown config key 'eval.kz'"),
    (["run", "pop", "--set", "eval.ks=[-3]", "--out", "X"], "K must be a positive integer"),
    (["run", "pop", "--dataset", "nope", "--out", "X"], "unknown dataset 'nope'"),
    (["reproduce", "--profile", "medium", "--out", "X"], "--profile must be"),
    (["run", "pop", "--bogus-flag"], "No such option"),
])
def test_bad_input_one_line_exit_2(tmp_path, monkeypatch, capsys, args, needle):
    monkeypatch.chdir(tmp_path)
    code, _, err = invoke(monkeypatch, capsys, *args)
    assert code == 2
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "X" / "metrics.json").exists()


def test_config_command_prints_every_key(monkeypatch, capsys):
    code, stdout, _ = invoke(monkeypatch, capsys, "config", "pop")
    assert code == 0 and "like_threshold: null" in stdout and "ks:" in stdout


def test_unexpected_error_is_one_line_exit_1(tmp_path, monkeypatch, capsys):
    import recalign.runner

    def boom(*args, **kwargs):
        raise RuntimeError("something broke\ninside")

    monkeypatch.setattr(recalign.runner, "run_method", boom)
    code, _, err = invoke(monkeypatch, capsys, "run", "pop", "--out", str(tmp_path / "x"))
    assert code == 1 and err.strip() == (
        "internal error: RuntimeError: something broke inside (set RECALIGN_DEBUG=1 for a traceback)")


def test_no_arguments_prints_help_and_exits_2(monkeypatch, capsys):
    code, stdout, err = invoke(monkeypatch, capsys)
    assert code == 2 and "Usage" in stdout + err and "error:" not in err


def test_reproduce_overwrite_reruns_only_experiments_whose_settings_changed(tmp_path, monkeypatch, capsys):
    import recalign.methods as methods

    original = methods.all_experiments
    out = tmp_path / "repro"
    code, _, err = invoke(monkeypatch, capsys, "reproduce", "--only", "pop", "--out", str(out))
    assert code == 0, err
    changed = [e for e in original() if e.name == "pop"]
    changed[0].quick = {"model.positives_only": True}
    monkeypatch.setattr(methods, "all_experiments", lambda: changed)
    monkeypatch.setattr("recalign.runner.all_experiments", lambda: changed)
    code, _, err = invoke(monkeypatch, capsys, "reproduce", "--only", "pop", "--out", str(out))
    assert code == 2 and "--overwrite" in err
    code, _, err = invoke(monkeypatch, capsys, "reproduce", "--only", "pop", "--out", str(out), "--overwrite")
    assert code == 0, err
    assert "positives_only: true" in (out / "pop" / "config.yaml").read_text()
    again = (out / "pop" / "metrics.json").read_text()
    code, _, err = invoke(monkeypatch, capsys, "reproduce", "--only", "pop", "--out", str(out), "--overwrite")
    assert code == 0 and (out / "pop" / "metrics.json").read_text() == again  # same settings: kept
