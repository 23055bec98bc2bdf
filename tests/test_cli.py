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
    assert metrics["test"]["n"] == metrics["valid"]["n"] == 943 and metrics["warnings"] == []  # every user has 20+
    assert metrics["training"]["objective"] == "count"  # train.objective "" resolved: pop counts
    # same seed, same metrics
    code, _, _ = invoke(monkeypatch, capsys, "run", "pop", "--out", str(tmp_path / "again"))
    assert json.loads((tmp_path / "again" / "metrics.json").read_text())["test"] == metrics["test"]
    # a finished run is kept on --resume, refused without it
    code, _, err = invoke(monkeypatch, capsys, "run", "pop", "--out", str(out))
    assert code == 2 and "already holds a run" in err
    code, _, _ = invoke(monkeypatch, capsys, "run", "pop", "--out", str(out), "--resume")
    assert code == 0


def test_leave_one_out_states_its_test_users_and_warns_of_those_left_out(tmp_path, monkeypatch, capsys):
    rows = ["user_id,item_id,rating,timestamp"] + [f"u{u},i{(u + t) % 9},4,{t}" for u in range(6) for t in range(4)]
    rows += [f"once{u},i{u},5,{u}" for u in range(4)]  # four users with a single interaction
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "interactions.csv").write_text("\n".join(rows) + "\n")
    code, _, err = invoke(monkeypatch, capsys, "run", "pop", "--dataset", str(tmp_path / "d"), "--out", str(tmp_path / "p"))
    metrics = json.loads((tmp_path / "p" / "metrics.json").read_text())
    assert code == 0 and metrics["test"]["n"] == 6
    assert metrics["warnings"][1:] == ["4 of 10 users have fewer than 3 interactions: they are not evaluated (leave-one-out "
                                   "keeps all of theirs in training); test users: 6"]


def test_report_compares_runs(tmp_path, monkeypatch, capsys):
    invoke(monkeypatch, capsys, "run", "pop", "--out", str(tmp_path / "a"))
    code, stdout, _ = invoke(monkeypatch, capsys, "report", str(tmp_path / "a"), "--out", str(tmp_path / "t.md"))
    assert code == 0 and "pop (a)" in stdout and "ndcg@10" in stdout
    assert (tmp_path / "t.md").read_text() == stdout


def _one_line(code, stdout, err, *needles):
    assert code == 2 and stdout == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert all(needle in err for needle in needles), err


def test_report_and_route_never_write_into_a_run_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for name in ("a", "b"):
        invoke(monkeypatch, capsys, "run", "pop", "--out", name)
    kept = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for out in ("a/metrics.json", "a/config.yaml", "b/new.md", "a/checkpoints/x.md"):
        _one_line(*invoke(monkeypatch, capsys, "report", "a", "b", "--out", out), f"--out {out}: inside the run directory")
        _one_line(*invoke(monkeypatch, capsys, "route", "a", "b", "--out", out), f"--out {out}: inside the run directory")
    (tmp_path / "c").mkdir()  # not a run of recalign's, but one of the inputs: its files are not touched either
    (tmp_path / "c" / "metrics.json").write_text(json.dumps({"method": "pop", "dataset": "x", "test": {}}))
    _one_line(*invoke(monkeypatch, capsys, "report", "c", "--out", "c/t.md"), "inside the run directory")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.parent.name != "c"} == kept
    # elsewhere an existing file is replaced (one that is not a run's own, e.g. an earlier table)
    (tmp_path / "t.md").write_text("an earlier table")
    code, stdout, _ = invoke(monkeypatch, capsys, "report", "a", "b", "--out", "t.md")
    assert code == 0 and (tmp_path / "t.md").read_text() == stdout


@pytest.mark.parametrize("out, needle", [
    ("runs", "--out runs: is a directory; name a file"),
    ("", "--out: empty path; name the output file"),
    ("/proc/x.md", "--out /proc/x.md: under /proc"),
    ("file/t.md", "--out file/t.md: {tmp}/file is a file, not a directory"),
])
def test_report_and_route_refuse_a_bad_out_in_one_line(tmp_path, monkeypatch, capsys, out, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "file").write_text("x")
    _yes_no_run(tmp_path / "runs" / "a", [0.1] * 6)
    before = sorted(tmp_path.rglob("*"))
    needle = needle.format(tmp=tmp_path)
    _one_line(*invoke(monkeypatch, capsys, "report", "runs/a", "--out", out), needle)
    _one_line(*invoke(monkeypatch, capsys, "route", "runs/a", "runs/a", "--out", out), needle)  # before loading
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("text, needle", [
    ("[1, 2]", "not a recalign metrics.json (needs method and dataset)"),
    ('"str"', "not a recalign metrics.json (needs method and dataset)"),
    ("{}", "not a recalign metrics.json (needs method and dataset)"),
    ('{"method": ["pop"], "dataset": "x", "test": {}}', "not a recalign metrics.json (needs method and dataset)"),
    ('{"method": "pop", "dataset": "x", "test": [1]}', "'test' is not a mapping of metric names to values"),
    ('{"method": "pop", "dataset": "x", "test": {"ndcg@10": "abc"}}', 'test.ndcg@10 is "abc", not a number'),
    ('{"method": "pop"', ":1: invalid JSON"),
    ("\udcff", "unreadable"),
])
def test_report_refuses_a_metrics_json_that_is_not_one(tmp_path, monkeypatch, capsys, text, needle):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metrics.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    _one_line(*invoke(monkeypatch, capsys, "report", str(tmp_path / "r")), f"{tmp_path / 'r' / 'metrics.json'}", needle)


def test_report_shows_counts_only_as_the_test_size(tmp_path, monkeypatch, capsys):
    (tmp_path / "llm").mkdir()
    (tmp_path / "llm" / "metrics.json").write_text(json.dumps({"method": "tallrec", "dataset": "ml-100k", "test": {
        "auc": 0.61, "auc_ci": [0.55, 0.67], "uauc": 0.58, "uauc_skipped_users": 3, "auc_warm": 0.6, "n_warm": 40,
        "n_cold": 24, "uauc_skipped_users_warm": 1, "n": 64}}))
    code, stdout, _ = invoke(monkeypatch, capsys, "report", str(tmp_path / "llm"))
    header = stdout.splitlines()[0]
    assert code == 0 and header == "| | n | auc | uauc | auc_warm |", stdout
    assert "| tallrec (llm) | 64 | 0.6100 [0.550, 0.670] | 0.5800 | 0.6000 |" in stdout


def _yes_no_run(path, scores, users=(0, 0, 1, 1, 2, 2), labels=(1, 0, 1, 0, 0, 1), name="predictions.json"):
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.json").write_text(json.dumps({"method": "icl", "dataset": "ml-100k",
                                                   "test": {"auc": 0.5, "auc_ci": [0.4, 0.6]}}))
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
    # a run over seeds: a named seed's file is reported with that seed's metrics, not the mean over seeds
    metrics = json.loads((b / "metrics.json").read_text())
    metrics["per_seed"] = [{"seed": s, "test": {"auc": auc, "auc_ci": [auc - 0.1, auc + 0.1]}}
                           for s, auc in ((0, 0.8), (1, 0.6))]
    (b / "metrics.json").write_text(json.dumps(metrics))
    code, stdout, _ = invoke(monkeypatch, capsys, "report", str(a), str(b / "predictions-seed1-test.json"),
                             str(b / "predictions-seed0-test.json"))
    assert code == 0 and "| icl (b, seed 1) | 0.6000 [0.500, 0.700] |" in stdout
    assert "| icl (b, seed 0) | 0.8000 [0.700, 0.900] |" in stdout
    (b / "predictions-seed7-test.json").write_text("{}")
    code, _, err = invoke(monkeypatch, capsys, "report", str(b / "predictions-seed7-test.json"))
    assert code == 2 and "no per_seed entry for seed 7" in err
    invoke(monkeypatch, capsys, "run", "pop", "--out", str(tmp_path / "pop"))
    code, _, err = invoke(monkeypatch, capsys, "report", str(a), str(tmp_path / "pop"), "--paired")
    assert code == 2 and "kept no per-case test results" in err


def test_report_paired_ranks_of_next_item_runs(tmp_path, monkeypatch, capsys):
    def ranked(name, ranks):
        path = tmp_path / name
        path.mkdir()
        (path / "metrics.json").write_text(json.dumps({"method": "bigrec", "dataset": "ml-100k", "test": {"ndcg@10": 0.1}}))
        (path / "cases-test.json").write_text(json.dumps([{"user": i, "target": f"t{i}", "rank": r}
                                                          for i, r in enumerate(ranks)]))
        return path

    a, b = ranked("a", [0, 5, 20, None]), ranked("b", [0, 0, 0, 0])
    code, stdout, _ = invoke(monkeypatch, capsys, "report", str(a), str(b), "--paired")
    gain = (4 - (1 + 1 / np.log2(7))) / 4  # b finds every target first; a: ranks 0 and 5, misses two
    assert code == 0 and f"| {b} | 4 | {gain:+.4f} [" in stdout


def test_reproduce_only_pop(tmp_path, monkeypatch, capsys):
    code, stdout, _ = invoke(monkeypatch, capsys, "reproduce", "--out", str(tmp_path / "rep"), "--only", "pop,itemcf")
    assert code == 0 and "report:" in stdout
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| pop |" in md and "| itemcf |" in md
    code, _, err = invoke(monkeypatch, capsys, "reproduce", "--out", str(tmp_path / "rep"), "--only", ",")
    assert code == 2 and "--only: no experiment named" in err
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "<table>" in html and "data:image/png;base64," in html


def test_reproduce_never_writes_into_a_folder_of_other_files(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "report.md").write_text("my notes")
    _one_line(*invoke(monkeypatch, capsys, "reproduce", "--only", "pop", "--out", "mine"),
              "--out mine: holds report.md, which reproduce did not write")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["report.md"]
    assert (tmp_path / "mine" / "report.md").read_text() == "my notes"
    (tmp_path / "afile").write_text("x")
    _one_line(*invoke(monkeypatch, capsys, "reproduce", "--only", "pop", "--out", "afile"),
              "--out afile: exists and is a file, not a directory")
    _one_line(*invoke(monkeypatch, capsys, "reproduce", "--only", "pop", "--out", ""), "--out: empty path")


def test_reproduce_recognises_its_own_earlier_output(tmp_path):
    from recalign.runner import check_reproduce_out
    from recalign.errors import InputError

    out = tmp_path / "rep"  # as reproduce left it: its reports, run directories, a temporary of a killed write
    (out / "pop").mkdir(parents=True)
    (out / "pop" / "config.yaml").write_text("seed: 0\n")
    (out / "renamed-experiment").mkdir()
    (out / "renamed-experiment" / "config.yaml").write_text("seed: 0\n")
    (out / "report.md").write_text("# recalign reproduce (quick profile)\n\nEach row is one run directory ...\n")
    (out / "report.html").write_text("<!doctype html><html><head><title>recalign report</title></head><body>"
                                     "<h1>recalign reproduce (quick profile)</h1></body></html>\n")
    (out / ".report.md.ab12cd34").write_text("half")
    check_reproduce_out(out)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="holds notes.txt, which reproduce did not write"):
        check_reproduce_out(out)


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


def test_report_refuses_per_case_values_that_are_not_numbers_and_malformed_intervals(tmp_path, monkeypatch, capsys):
    a = _yes_no_run(tmp_path / "a", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    for i, (field, value, said) in enumerate((("score", None, "score[2] is null, not a number"),
                                               ("score", float("nan"), "score[2] is NaN, not a number"),
                                               ("score", "0.5", 'score[2] is "0.5", not a number'),
                                               ("label", 2, "label[2] is 2, not 0/1"))):
        run = _yes_no_run(tmp_path / f"b{i}", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
        data = json.loads((run / "predictions.json").read_text())
        data[field][2] = value
        (run / "predictions.json").write_text(json.dumps(data))
        code, _, err = invoke(monkeypatch, capsys, "report", str(a), str(run), "--paired")
        assert code == 2 and said in err and err.count("\n") == 1, err
    for interval, said in (([0.05, None], "| 0.1000 [undefined] |"), ([0.1], "not an interval")):
        (a / "metrics.json").write_text(json.dumps({"method": "pop", "dataset": "ml-100k",
                                                    "test": {"ndcg@10": 0.1, "ndcg@10_ci": interval}}))
        code, out, err = invoke(monkeypatch, capsys, "report", str(a))
        assert said in out + err and (code == 0) == (None in interval), (out, err)


def test_report_of_a_path_that_does_not_exist_says_so(tmp_path, monkeypatch, capsys):
    code, _, err = invoke(monkeypatch, capsys, "report", str(tmp_path / "nowhere"))
    assert code == 2 and err.strip() == f"error: {tmp_path / 'nowhere'}: no such file or directory"


def test_paths_that_are_not_utf8_are_one_line_errors_and_create_nothing(tmp_path, monkeypatch, capsys):
    import os

    out = os.fsdecode(os.fsencode(str(tmp_path)) + b"/bad\xffname")
    code, _, err = invoke(monkeypatch, capsys, "run", "pop", "--out", out)
    assert code == 2 and "bad\\xffname: the path is not valid UTF-8" in err and err.count("\n") == 1, err
    dataset = os.fsdecode(os.fsencode(str(tmp_path)) + b"/data\xff")
    os.mkdir(dataset)
    code, _, err = invoke(monkeypatch, capsys, "run", "pop", "--dataset", dataset, "--out", str(tmp_path / "r"))
    assert code == 2 and "data\\xff: the path is not valid UTF-8" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [os.path.basename(dataset)]


def test_report_never_replaces_a_reproduce_directorys_report(tmp_path, monkeypatch, capsys):
    invoke(monkeypatch, capsys, "run", "pop", "--out", str(tmp_path / "pop"))
    (tmp_path / "rep").mkdir()
    (tmp_path / "rep" / "report.md").write_text("# recalign reproduce (quick profile)\n")
    code, _, err = invoke(monkeypatch, capsys, "report", str(tmp_path / "pop"), "--out", str(tmp_path / "rep" / "report.md"))
    assert code == 2 and "is the report of a reproduce directory" in err
    assert (tmp_path / "rep" / "report.md").read_text() == "# recalign reproduce (quick profile)\n"


def test_on_off_environment_variables_read_false_and_no_as_off(monkeypatch):
    from recalign.progress import env_flag

    for value, on in (("", False), ("0", False), ("false", False), ("No", False), (" off ", False), ("1", True),
                      ("true", True), ("yes", True)):
        monkeypatch.setenv("RECALIGN_DEBUG", value)
        assert env_flag("RECALIGN_DEBUG") is on, value


def test_an_unfinished_run_with_an_empty_config_says_so(tmp_path, monkeypatch, capsys):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.yaml").write_text("")
    (tmp_path / "r" / "run.log").write_text("")
    code, _, err = invoke(monkeypatch, capsys, "run", "pop", "--out", str(tmp_path / "r"))
    assert code == 2 and "its config.yaml is empty or not a mapping" in err, err
