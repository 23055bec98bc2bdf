"""Loading a run directory never executes code (issue #21): every state is a safetensors file whose
non-tensor part is JSON; a pickle, planted or left by an older recalign, is refused with one line, never
unpickled; states round-trip exactly."""

from __future__ import annotations

import io
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from recalign.errors import InputError
from recalign.io import Checkpoints, load_state, save_state

SRC = Path(__file__).resolve().parents[1] / "src"


class Planted:
    """Unpickling this creates the marker file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def payloads(marker: Path) -> dict[str, bytes]:
    buffer = io.BytesIO()
    torch.save({"model": "mf", "state": Planted(marker)}, buffer)  # torch's zip format
    return {"torch": buffer.getvalue(), "pickle": pickle.dumps(Planted(marker))}


def test_the_payload_is_live(tmp_path):
    """The planted files below really would run code if unpickled (so their tests prove something)."""
    for kind, data in payloads(tmp_path / "proof").items():
        (tmp_path / "proof").unlink(missing_ok=True)
        if kind == "torch":
            torch.load(io.BytesIO(data), weights_only=False)
        else:
            pickle.loads(data)
        assert (tmp_path / "proof").exists()


def test_no_unpickling_anywhere_in_src():
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        assert "weights_only=False" not in text and "torch.load(" not in text, path
        assert "import pickle" not in text and "pickle.load" not in text, path


# ------------------------------------------------------------------------------------------ the format
def test_states_round_trip_exactly(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
    for _ in range(2):
        model(torch.randn(5, 3)).sum().backward()
        optimizer.step()
        scheduler.step()
    state = {
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(),
        "weights": model.state_dict(), "scores": np.linspace(0, 1, 7, dtype=np.float32).reshape(7, 1),
        "flags": np.array([True, False]), "np_scalars": [np.float32(0.25), np.int64(-3), np.float64(0.1)],
        "zero_d": np.array(2.5), "half": torch.ones(2, 2, dtype=torch.bfloat16), "empty": torch.zeros(0, 3),
        "shape": (3, 4), "nested": ((1, [2, (3,)]), {}), "floats": [math.nan, math.inf, -math.inf, -0.0, 0.1],
        "odd_keys": {1: "int", (2, 3): "tuple", "$dollar": "str", "x": None}, "text": "ü\x00\n", "big": 2 ** 70,
        "history": [{"epoch": 1, "loss": 0.5, "valid": None, "stopped": False}],
    }
    path = save_state(tmp_path / "state.safetensors", state)
    back = load_state(path)

    def same(a, b):
        assert type(a) is type(b), (a, b)
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        elif isinstance(a, np.ndarray):
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
        elif isinstance(a, np.generic):
            assert a.dtype == b.dtype and a == b
        elif isinstance(a, dict):
            assert list(a) == list(b)
            for key in a:
                same(a[key], b[key])
        elif isinstance(a, (list, tuple)):
            assert len(a) == len(b)
            for x, y in zip(a, b):
                same(x, y)
        elif isinstance(a, float) and math.isnan(a):
            assert math.isnan(b)
        else:
            assert a == b and (not isinstance(a, float) or math.copysign(1, a) == math.copysign(1, b))

    def rest(d):
        return {k: v for k, v in d.items() if k != "weights"}

    same(rest(state), rest(back))
    same(dict(state["weights"]), back["weights"])  # an OrderedDict comes back as a dict
    assert list(back["optimizer"]["state"]) == [0, 1, 2, 3]  # int parameter ids as keys
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)  # a tuple
    # what resume does with them works, and continues exactly
    rng_after = torch.rand(4)
    torch.set_rng_state(back["rng"])
    assert torch.equal(torch.rand(4), rng_after)
    optimizer.load_state_dict(back["optimizer"])
    scheduler.load_state_dict(back["scheduler"])


@pytest.mark.parametrize("bad", [
    b"",  # empty
    b"garbage that is not safetensors",
    "truncated",
    "foreign",  # a valid safetensors file that is not a recalign state
    "dangling",  # its JSON names a tensor the file lacks
])
def test_an_unreadable_state_file_is_one_line_naming_it(tmp_path, bad):
    from safetensors.torch import save

    path = tmp_path / "train.safetensors"
    good = save({"w": torch.ones(4)}, metadata={"format": "recalign-state/1", "state": json.dumps({"w": {"$tensor": "w"}})})
    data = {"truncated": good[:-3], "foreign": save({"w": torch.ones(2)}),
            "dangling": save({}, metadata={"format": "recalign-state/1", "state": '{"w": {"$tensor": "w"}}'})}
    path.write_bytes(data.get(bad, bad) if isinstance(bad, str) else bad)
    with pytest.raises(InputError) as info:
        Checkpoints(tmp_path).load_checkpoint("train")
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_saving_what_the_format_cannot_hold_fails_loudly(tmp_path):
    with pytest.raises(TypeError, match="cannot store set at 'a.b'"):
        save_state(tmp_path / "x.safetensors", {"a": {"b": {1, 2}}})
    with pytest.raises(TypeError, match="dtype object"):
        save_state(tmp_path / "x.safetensors", {"a": np.array(["x", None], dtype=object)})
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------ planted in a run directory
@pytest.fixture(scope="module")
def finished_mf_run(tmp_path_factory):
    from recalign.runner import run_method

    out = tmp_path_factory.mktemp("runs") / "mf"
    run_method("mf", "ml-100k", out, sets=["train.epochs=1", "model.embedding_size=8"])
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / run.name
    shutil.copytree(run, target)
    return target


@pytest.mark.parametrize("kind", ["torch", "pickle"])
@pytest.mark.parametrize("as_name", ["train.pt", "train.safetensors"])
def test_a_planted_pickle_is_refused_by_resume_report_and_load_model(finished_mf_run, tmp_path, monkeypatch,
                                                                     capsys, kind, as_name):
    from cli_helpers import invoke

    from recalign.cf import load_model

    marker = tmp_path / "marker"
    run = _copy(finished_mf_run, tmp_path)
    (run / "metrics.json").unlink()  # as if killed before it finished: the next run reads the checkpoint
    (run / "checkpoints" / "train.safetensors").unlink()
    (run / "checkpoints" / as_name).write_bytes(payloads(marker)[kind])
    (run / "checkpoints" / "model.safetensors").write_bytes(payloads(marker)[kind])

    for extra in ([], ["--resume"]):
        code, stdout, err = invoke(monkeypatch, capsys, "run", "mf", "--out", str(run),
                                   "--set", "train.epochs=1", "--set", "model.embedding_size=8", *extra)
        lines = err.strip().splitlines()
        assert code == 2 and stdout == "" and len(lines) == 1, err
        assert str(run / "checkpoints" / as_name) in lines[0] and "pickle" in lines[0] and "--overwrite" in lines[0]
    code, _, err = invoke(monkeypatch, capsys, "report", str(run))
    assert code == 2 and "no metrics.json" in err
    with pytest.raises(InputError, match="pickle"):
        load_model(run / "checkpoints" / "model.safetensors")
    with pytest.raises(InputError, match="pickle"):
        load_model(run / "checkpoints" / as_name)
    assert not marker.exists()
    # a finished run with planted checkpoints: report reads only metrics.json
    (run / "metrics.json").write_text((finished_mf_run / "metrics.json").read_text())
    code, stdout, _ = invoke(monkeypatch, capsys, "report", str(run))
    assert code == 0 and "mf (mf)" in stdout
    code, _, _ = invoke(monkeypatch, capsys, "run", "mf", "--out", str(run), "--resume",
                        "--set", "train.epochs=1", "--set", "model.embedding_size=8")
    assert code == 0
    assert not marker.exists()


def test_load_model_checks_the_file_against_its_config(finished_mf_run, tmp_path):
    from recalign.cf import load_model

    run = Checkpoints(finished_mf_run / "checkpoints")
    model = load_model(run.file("model"))
    assert model.name == "mf" and not model.training
    checkpoint = run.load_checkpoint("model")
    wrong = tmp_path / "wrong.safetensors"
    save_state(wrong, {**checkpoint, "n_items": checkpoint["n_items"] + 1})
    with pytest.raises(InputError, match=r"wrong.safetensors: .*item.* is \(1682, 8\), but a mf with 943 users, "
                                         r"1683 items"):
        load_model(wrong)
    save_state(wrong, {**checkpoint, "params": {"embedding_size": 8, "nope": 1}})
    with pytest.raises(InputError, match="wrong.safetensors: mf: unknown model parameter"):
        load_model(wrong)
    save_state(wrong, {"weights": torch.ones(2)})
    with pytest.raises(InputError, match="wrong.safetensors: not a recalign CF model checkpoint"):
        load_model(wrong)


def test_a_legacy_run_is_refused_with_how_to_regenerate(tmp_path):
    from recalign.cf import create_model, load_model

    legacy = tmp_path / "model.pt"
    torch.save(create_model("mf", 5, 7, embedding_size=4).checkpoint(), legacy)  # what recalign wrote before
    with pytest.raises(InputError, match=r"model.pt: a pickle file .* not loaded because unpickling can run code.*--overwrite"):
        load_model(legacy)
    with pytest.raises(InputError, match="model.pt: a pickle file"):
        Checkpoints(tmp_path).load_checkpoint("model")


def test_cf_models_round_trip_through_the_format(tmp_path):
    """Memory models keep scipy matrices (numpy arrays + a shape tuple) in their extra state."""
    import pandas as pd

    from recalign.cf import load_model, make_query, train_cf_model

    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"user": rng.integers(0, 20, 300), "item": rng.integers(0, 30, 300)})
    query = make_query([0, 3], [[1, 2], [5]], 30)
    for name in ("itemcf", "usercf", "pop", "lightgcn"):
        model = train_cf_model(name, frame, {"train": {"epochs": 1}}, n_users=20, n_items=30)
        model.save(tmp_path / name)
        loaded = load_model(tmp_path / name)
        with torch.no_grad():
            assert torch.equal(model.score(query), loaded.score(query)), name


def test_llm_train_loop_resumes_bit_identically(tmp_path):
    """Optimizer, scheduler, RNG (dropout) and the best state go through the format; kill + resume = same."""
    from recalign.llm.train import Checkpointer, TrainConfig, train_loop
    from recalign.runs import RunDir

    torch.manual_seed(0)
    data = [(torch.randn(4), torch.randn(1)) for _ in range(12)]
    config = TrainConfig(epochs=3, batch_size=3, grad_accum=2, lr=1e-2, eval_every=1, patience=0, seed=3,
                         schedule="cosine", warmup_steps=2)

    def train(model, run=None, crash_at=None):
        calls = {"n": 0}

        def evaluate():
            calls["n"] += 1
            if calls["n"] == crash_at:
                raise KeyboardInterrupt
            with torch.no_grad():
                return float(-sum(p.sum() for p in model.parameters()))

        def loss(batch):
            return ((model(torch.stack([x for x, _ in batch])) - torch.stack([y for _, y in batch])) ** 2).mean()

        return train_loop(list(model.parameters()), data, loss, config, evaluate=evaluate,
                          get_state=lambda: {k: v.clone() for k, v in model.state_dict().items()},
                          set_state=model.load_state_dict, set_train_mode=model.train,
                          checkpointer=Checkpointer(run, "lora") if run else None)

    def make():
        torch.manual_seed(1)
        return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1))

    reference = make()
    expected = train(reference)
    run = RunDir(tmp_path / "run", resume=True)
    with pytest.raises(KeyboardInterrupt):
        train(make(), run, crash_at=3)
    assert (tmp_path / "run" / "checkpoints" / "lora.safetensors").is_file()
    torch.manual_seed(123)  # a new process: another global RNG state, restored from the checkpoint
    resumed_model = make()
    resumed = train(resumed_model, run)
    for a, b in zip(reference.state_dict().values(), resumed_model.state_dict().values()):
        assert torch.equal(a, b)
    assert resumed.steps == expected.steps and resumed.best_step == expected.best_step
    assert [h["valid"] for h in resumed.history] == [h["valid"] for h in expected.history]
