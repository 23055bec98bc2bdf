import json
import os
import time

import pytest
import torch

from recalign.errors import InputError
from recalign.io import atomic_dir, atomic_write_json, atomic_write_text
from recalign.runs import RunDir


def test_atomic_write_leaves_no_partial_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    atomic_write_json(target, {"a": 1})

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_text(target, "half")
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_atomic_writes_get_the_umask_permissions_of_a_plain_new_file(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "report.md", "x")
        with atomic_dir(tmp_path / "adapter") as tmp:
            (tmp / "a.txt").write_text("1")
            (tmp / "weights.safetensors").write_text("2")
            os.chmod(tmp / "weights.safetensors", 0o600)  # what safetensors' save_file makes
        os.umask(0o077)
        atomic_write_text(tmp_path / "private.md", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "report.md").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    assert (tmp_path / "adapter").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "adapter" / "weights.safetensors").stat().st_mode & 0o777 == 0o644  # readable by a server
    assert (tmp_path / "private.md").stat().st_mode & 0o777 == 0o600


def test_nan_becomes_null():
    import math

    from recalign.io import json_safe

    assert json_safe({"x": math.nan, "y": [1.0, math.inf]}) == {"x": None, "y": [1.0, None]}


def test_atomic_dir_replaces_whole(tmp_path):
    target = tmp_path / "adapter"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "b.txt").write_text("2")
            raise RuntimeError("crash mid-write")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_checkpoint_round_trip(tmp_path):
    run = RunDir(tmp_path / "r")
    assert run.load_checkpoint("model") is None
    state = {"w": torch.arange(5.0), "epoch": 3}
    run.save_checkpoint("model", state)
    back = run.load_checkpoint("model")
    assert back["epoch"] == 3 and torch.equal(back["w"], state["w"])


# ----------------------------------------------------------------------------------------- --out rules
def _unfinished(path, config="seed: 0\n"):
    run = RunDir(path)
    run.prepare(config)
    run.save_checkpoint("train", {"epoch": 1})
    return run


def test_an_unfinished_run_is_continued_by_the_same_command(tmp_path):
    _unfinished(tmp_path / "r")
    again = RunDir(tmp_path / "r")  # no --resume needed
    again.prepare("seed: 0\n")
    assert again.resume and not again.new and again.load_checkpoint("train") == {"epoch": 1}


def test_an_unfinished_run_with_another_config_names_overwrite(tmp_path):
    _unfinished(tmp_path / "r", "seed: 0\ntrain:\n  lr: 0.1\n")
    for resume in (False, True):
        with pytest.raises(InputError, match=r"another config \(changed: train.lr\).*--overwrite"):
            RunDir(tmp_path / "r", resume=resume).prepare("seed: 0\ntrain:\n  lr: 0.2\n")
    fresh = RunDir(tmp_path / "r", overwrite=True)
    fresh.prepare("seed: 0\ntrain:\n  lr: 0.2\n")
    assert fresh.new and fresh.load_checkpoint("train") is None
    assert (tmp_path / "r" / "config.yaml").read_text() == "seed: 0\ntrain:\n  lr: 0.2\n"


def test_a_finished_run_is_kept_unless_overwrite(tmp_path):
    run = _unfinished(tmp_path / "r")
    run.write_metrics({"test": {}})
    with pytest.raises(InputError, match="already holds a run.*--resume keeps it, --overwrite replaces it"):
        RunDir(tmp_path / "r").prepare("seed: 0\n")
    kept = RunDir(tmp_path / "r", resume=True)
    kept.prepare("seed: 0\n")
    assert kept.finished() and not kept.new
    with pytest.raises(InputError, match="finished run with another config"):
        RunDir(tmp_path / "r", resume=True).prepare("seed: 1\n")
    with pytest.raises(InputError, match="exclude each other"):
        RunDir(tmp_path / "r", resume=True, overwrite=True).prepare("seed: 0\n")
    RunDir(tmp_path / "r", overwrite=True).prepare("seed: 1\n")
    assert not (tmp_path / "r" / "metrics.json").exists()


def test_a_directory_that_is_not_a_run_is_never_overwritten(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(InputError, match="not a run directory"):
            RunDir(tmp_path, overwrite=overwrite).prepare("seed: 0\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".config.yaml.abcd1234").write_text("half")  # a temporary of a write interrupted by a kill
    RunDir(empty).prepare("seed: 0\n")
    assert sorted(p.name for p in empty.iterdir()) == [".recalign.lock", "config.yaml"]


@pytest.mark.parametrize("out, needle", [
    ("", "empty path"),
    ("{file}/run", "is a file, not a directory"),
    ("{file}", "exists and is a file"),
    ("/proc/recalign-run", "under /proc"),
    ("/sys/run", "under /sys"),
    ("{dir}/" + "x" * 300, "longer than 255 bytes"),
])
def test_an_out_that_cannot_hold_a_run_is_refused_before_anything_is_written(tmp_path, out, needle):
    (tmp_path / "file").write_text("x")
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(InputError, match=needle):
        RunDir(out.format(file=tmp_path / "file", dir=tmp_path)).prepare("seed: 0\n")
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_out_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(InputError, match="not writable"):
        RunDir(locked / "run").prepare("seed: 0\n")
    assert not list(locked.iterdir())


def test_restarting_cleans_interrupted_atomic_writes(tmp_path):
    run = _unfinished(tmp_path / "r")
    leftovers = [run.checkpoints / ".train.safetensors.k3j_x9q2", run.path / ".metrics.json.a1b2c3d4"]
    for path in leftovers:
        path.write_bytes(b"half")
    (run.checkpoints / ".adapter.x1y2z3w4").mkdir()  # an atomic_dir cut short
    (run.checkpoints / ".adapter-seed0.old").mkdir()  # moved aside, the new one not yet in place
    (run.checkpoints / ".adapter-seed0.old" / "adapter_config.json").write_text("{}")
    RunDir(tmp_path / "r").prepare("seed: 0\n")
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["adapter-seed0", "train.safetensors"]
    assert sorted(p.name for p in run.path.iterdir()) == [".recalign.lock", "checkpoints", "config.yaml"]


# ----------------------------------------------------------------------------------- through the CLI
def test_out_errors_through_the_cli_write_nothing(tmp_path, monkeypatch, capsys):
    from cli_helpers import invoke

    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("x")
    for out in ("", "file/run", "/proc/run"):
        code, stdout, err = invoke(monkeypatch, capsys, "run", "pop", "--out", out)
        assert code == 2 and stdout == "" and len(err.strip().splitlines()) == 1 and "--out" in err, (out, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_crash_then_retry_report_repair(tmp_path, monkeypatch, capsys):
    """A kill between report.md and metrics.json leaves an unfinished run that the same command finishes;
    a finished run whose report.md is lost gets it back on --resume; a changed config needs --overwrite."""
    from cli_helpers import invoke

    out = str(tmp_path / "pop")
    original = RunDir.write_metrics

    def killed(self, metrics):
        raise KeyboardInterrupt

    monkeypatch.setattr(RunDir, "write_metrics", killed)
    code, _, _ = invoke(monkeypatch, capsys, "run", "pop", "--out", out)
    assert code == 130 and (tmp_path / "pop" / "report.md").exists()
    assert not (tmp_path / "pop" / "metrics.json").exists()  # report.md first, metrics.json last
    monkeypatch.setattr(RunDir, "write_metrics", original)
    code, stdout, _ = invoke(monkeypatch, capsys, "run", "pop", "--out", out)  # the same command
    assert code == 0
    metrics = json.loads((tmp_path / "pop" / "metrics.json").read_text())
    assert json.loads(stdout)["test"] == metrics["test"]

    (tmp_path / "pop" / "report.md").unlink()
    code, _, _ = invoke(monkeypatch, capsys, "run", "pop", "--out", out, "--resume")
    assert code == 0 and "# pop on ml-100k" in (tmp_path / "pop" / "report.md").read_text()
    assert json.loads((tmp_path / "pop" / "metrics.json").read_text()) == metrics

    code, _, err = invoke(monkeypatch, capsys, "run", "pop", "--out", out, "--set", "seed=1", "--resume")
    assert code == 2 and "--overwrite" in err and "changed: seed" in err
    code, _, _ = invoke(monkeypatch, capsys, "run", "pop", "--out", out, "--set", "seed=1", "--overwrite")
    assert code == 0 and "seed: 1" in (tmp_path / "pop" / "config.yaml").read_text()


def test_a_run_of_another_dataset_is_never_continued(tmp_path):
    run = RunDir(tmp_path / "r")
    run.prepare("seed: 0\n", origin="mf on ml-100k")
    assert (tmp_path / "r" / "config.yaml").read_text() == "seed: 0\n# run: mf on ml-100k\n"
    RunDir(tmp_path / "r").prepare("seed: 0\n", origin="mf on ml-100k")  # continued
    with pytest.raises(InputError, match="holds an unfinished run of mf on ml-100k, not of mf on ./ml-1m; --overwrite"):
        RunDir(tmp_path / "r").prepare("seed: 0\n", origin="mf on ./ml-1m")
    with pytest.raises(InputError, match=r"changed: seed"):
        RunDir(tmp_path / "r").prepare("seed: 1\n", origin="mf on ml-100k")


def test_an_unfinished_run_is_not_continued_on_data_that_changed(tmp_path, monkeypatch, capsys):
    """The same sizes but one rating changed: the checkpoints hold ids and labels of the old data, so the same
    command refuses to continue (one line naming --overwrite), and --overwrite starts afresh."""
    import shutil
    from pathlib import Path

    from cli_helpers import invoke

    data = tmp_path / "ml-1m"
    shutil.copytree(Path(__file__).parent / "fixtures" / "ml-1m", data)
    out = str(tmp_path / "run")

    def killed(self, metrics):
        raise KeyboardInterrupt

    original = RunDir.write_metrics
    monkeypatch.setattr(RunDir, "write_metrics", killed)
    assert invoke(monkeypatch, capsys, "run", "pop", "--dataset", str(data), "--out", out)[0] == 130
    monkeypatch.setattr(RunDir, "write_metrics", original)
    recorded = json.loads((tmp_path / "run" / "dataset.json").read_text())
    assert (recorded["users"], recorded["items"], recorded["interactions"]) == (4, 5, 12)

    ratings = data / "ratings.dat"
    ratings.write_text(ratings.read_text().replace("1::1::5::100", "1::1::4::100"))
    code, _, err = invoke(monkeypatch, capsys, "run", "pop", "--dataset", str(data), "--out", out)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "changed since this run started" in err and "--overwrite" in err and "4 users, 5 items" in err
    assert not (tmp_path / "run" / "metrics.json").exists()

    code, _, _ = invoke(monkeypatch, capsys, "run", "pop", "--dataset", str(data), "--out", out, "--overwrite")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert code == 0 and metrics["dataset_fingerprint"] != recorded["fingerprint"]
    assert metrics["dataset_fingerprint"] == json.loads((tmp_path / "run" / "dataset.json").read_text())["fingerprint"]


def test_a_local_dataset_is_recorded_absolute_so_any_spelling_or_cwd_continues_the_run(tmp_path, monkeypatch, capsys):
    import shutil
    from pathlib import Path

    from cli_helpers import invoke

    shutil.copytree(Path(__file__).parent / "fixtures" / "ml-1m", tmp_path / "data" / "ml-1m")
    monkeypatch.chdir(tmp_path)

    def killed(self, metrics):
        raise KeyboardInterrupt

    original = RunDir.write_metrics
    monkeypatch.setattr(RunDir, "write_metrics", killed)
    assert invoke(monkeypatch, capsys, "run", "pop", "--dataset", "data/ml-1m", "--out", "run")[0] == 130
    monkeypatch.setattr(RunDir, "write_metrics", original)
    absolute = str((tmp_path / "data" / "ml-1m").resolve())
    assert (tmp_path / "run" / "config.yaml").read_text().endswith(f"# run: pop on {absolute}\n")
    assert json.loads((tmp_path / "run" / "dataset.json").read_text())["dataset"] == absolute

    monkeypatch.chdir(tmp_path / "data")  # another cwd, another spelling: the same files, the same run
    code, _, err = invoke(monkeypatch, capsys, "run", "pop", "--dataset", "./ml-1m/", "--out", str(tmp_path / "run"))
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["dataset"] == absolute
    # a run recorded before paths were made absolute is still continued from its own cwd
    run = RunDir(tmp_path / "old")
    run.prepare("seed: 0\n", origin="pop on ml-1m")
    RunDir(tmp_path / "old").prepare("seed: 0\n", origin=f"pop on {absolute}")


def test_the_dataset_fingerprint_follows_content_not_files():
    from recalign.data import load_dataset

    ds = load_dataset("ml-100k")
    assert ds.fingerprint() == load_dataset("ml-100k").fingerprint()
    assert ds.with_threshold(4).fingerprint() != ds.fingerprint()  # other labels
    retitled = ds.subset_items(ds.items.index.to_numpy())
    retitled.items = ds.items.assign(title=ds.items["title"].str.upper())
    assert retitled.fingerprint() != ds.fingerprint()


def test_record_dataset_meets_the_same_barriers_whether_or_not_the_main_process_wrote_first(tmp_path, monkeypatch):
    """A slower process of a multi-process run may read dataset.json after the main process wrote it; it must
    still wait at the same barriers, or the processes wait at different ones forever."""
    from types import SimpleNamespace

    from recalign import distributed
    from recalign.data import load_dataset

    barriers = []
    other = SimpleNamespace(main=False, barrier=lambda: barriers.append(1))
    monkeypatch.setattr(distributed, "current", lambda: other)
    ds = load_dataset("ml-100k")
    counts = []
    for written_already in (False, True):
        run = RunDir(tmp_path / f"run-{written_already}")
        run.path.mkdir()
        if written_already:  # what the main process wrote before this one looked
            main = RunDir(tmp_path / "main")
            main.path.mkdir()
            monkeypatch.setattr(distributed, "current", lambda: SimpleNamespace(main=True, barrier=lambda: None))
            main.record_dataset("ml-100k", ds)
            monkeypatch.setattr(distributed, "current", lambda: other)
            (run.path / "dataset.json").write_text((main.path / "dataset.json").read_text())
        barriers.clear()
        run.record_dataset("ml-100k", ds)
        counts.append(len(barriers))
    assert counts[0] == counts[1] >= 1


# ------------------------------------------------------------------------------ --out of report and route
def test_an_out_file_is_refused_inside_a_run_directory_only(tmp_path):
    from recalign.runs import check_out_file

    project = tmp_path / "project"  # a user's folder with a config.yaml of its own is not a run directory
    project.mkdir()
    (project / "config.yaml").write_text("mine: 1\n")
    assert check_out_file(project / "table.md") == (project / "table.md").resolve()
    (project / "run.log").write_text("")  # a run's config.yaml beside its log: a run directory
    with pytest.raises(InputError, match=r"inside the run directory .*project, which is never written into"):
        check_out_file(project / "table.md")
    with pytest.raises(InputError, match="inside the run directory"):
        check_out_file(tmp_path / "in" / "deep" / "t.md", inputs=[tmp_path / "in"])  # one of the inputs
    (tmp_path / "link").symlink_to(project)
    with pytest.raises(InputError, match="inside the run directory"):
        check_out_file(tmp_path / "link" / "t.md")


def test_a_failed_out_write_is_one_line_naming_out(tmp_path):
    from recalign.runs import write_out

    def full(path, data):
        raise OSError(28, "No space left on device")

    with pytest.raises(InputError, match=r"^--out t.md: cannot write there \(No space left on device\)$"):
        write_out("t.md", full, "text")


def test_an_undefined_metric_is_said_with_its_reason():
    from recalign.runner import undefined_metrics

    assert undefined_metrics({"auc": 0.7, "n": 9, "auc_warm": None, "n_warm": 0, "auc_cold": float("nan"),
                              "n_cold": 9, "auc_ci": None}) == [
        "test auc_warm is undefined (no warm test samples)",
        "test auc_cold is undefined (one label only among the 9 samples it is computed on)"]


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    import errno

    from recalign.errors import MachineError

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(MachineError, match=r"metrics.json: no space left on the device"):
        atomic_write_text(tmp_path / "metrics.json", "{}")
    assert list(tmp_path.iterdir()) == []


def test_one_process_writes_a_run_directory_at_a_time(tmp_path):
    import subprocess
    import sys
    import textwrap

    holder = textwrap.dedent(f"""
        import sys, time
        from recalign.runs import RunDir
        RunDir({str(tmp_path / 'r')!r}).prepare("seed: 0\\n")
        print("locked", flush=True)
        time.sleep(60)
    """)
    other = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "locked"
        with pytest.raises(InputError, match="another recalign process is writing this run now"):
            RunDir(tmp_path / "r").prepare("seed: 0\n")
        with pytest.raises(InputError, match="another recalign process"):  # --overwrite cannot delete it either
            RunDir(tmp_path / "r", overwrite=True).prepare("seed: 1\n")
        assert (tmp_path / "r" / "config.yaml").read_text().startswith("seed: 0")
    finally:
        other.kill()
        other.wait()
    RunDir(tmp_path / "r").prepare("seed: 0\n")  # the lock ended with its process
    run = RunDir(tmp_path / "r")
    run.prepare("seed: 0\n")  # the same process may prepare it again
    run.release()


def test_an_atomic_directory_removes_what_interrupted_writers_of_its_name_left(tmp_path):
    stale, fresh = tmp_path / ".model.abcd1234", tmp_path / ".model.efgh5678"
    for leftover in (stale, fresh):
        leftover.mkdir()
        (leftover / "model.safetensors").write_bytes(b"half")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))  # two hours old: its writer is gone
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "config.json").write_text("{}")
    assert not stale.exists() and fresh.exists()  # a recent one may be another process's, still writing
    assert (tmp_path / "model" / "config.json").is_file()


def test_a_finished_run_refused_for_another_config_names_what_changed(tmp_path):
    run = _unfinished(tmp_path / "r")
    run.write_metrics({"test": {}})
    with pytest.raises(InputError, match=r"already holds a run \(finished, with another config: changed: seed\)"):
        RunDir(tmp_path / "r").prepare("seed: 1\n")


def test_a_file_name_of_up_to_255_bytes_is_written_atomically(tmp_path):
    name = "r" * 252 + ".md"  # 255 bytes: the usual .NAME.xxxxxxxx temporary would not fit
    atomic_write_text(tmp_path / name, "x")
    assert [p.name for p in tmp_path.iterdir()] == [name]
