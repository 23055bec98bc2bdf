import json
import os

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


def test_nan_becomes_null():
    import math

    from recalign.io import _json_safe

    assert _json_safe({"x": math.nan, "y": [1.0, math.inf]}) == {"x": None, "y": [1.0, None]}


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


def test_prepare_refuses_overwrite_and_checks_config_on_resume(tmp_path):
    run = RunDir(tmp_path / "r")
    run.prepare("seed: 0\n")
    with pytest.raises(InputError, match="already holds a run"):
        RunDir(tmp_path / "r").prepare("seed: 0\n")
    RunDir(tmp_path / "r", resume=True).prepare("seed: 0\n")
    with pytest.raises(InputError, match="config differs"):
        RunDir(tmp_path / "r", resume=True).prepare("seed: 1\n")


def test_checkpoint_round_trip(tmp_path):
    run = RunDir(tmp_path / "r")
    assert run.load_checkpoint("model") is None
    state = {"w": torch.arange(5.0), "epoch": 3}
    run.save_checkpoint("model", state)
    back = run.load_checkpoint("model")
    assert back["epoch"] == 3 and torch.equal(back["w"], state["w"])
