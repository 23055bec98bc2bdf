"""Data-parallel runs on this CPU: two processes on the gloo backend, started by torchrun, against one process.

- `torchrun --nproc_per_node 2 -m recalign run tallrec` ends with the metrics of the one-process run (within
  a stated tolerance) and only the main process writes the run directory;
- `Backbone.score_yes_no` shared over two processes returns exactly the one-process scores (uneven sizes);
- a LoRA step interrupted on two processes continues on one and ends where an uninterrupted run ends;
- bad input (`--processes`, an accelerate config asking for what recalign does not do) is one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from cli_helpers import invoke
from recalign import distributed
from recalign.errors import InputError
from recalign.io import Checkpoints
from recalign.llm import Backbone, LORA_CONFIG, train_section
from recalign.llm.steps import answer_loss, data_parallel, lora_step
from recalign.llm.train import TrainConfig

TINY = ["--set", "model.name=tiny-random", "--set", "model.dtype=float32", "--set", "samples.valid_size=16",
        "--set", "samples.test_size=24", "--set", "train.epochs=2", "--set", "train.shots=16"]
# two processes see the same examples per optimizer step; what differs is LoRA dropout's random masks (each
# process draws its own) and the order of float sums
METRIC_TOLERANCE = 0.05  # AUC on 24 test samples
LOSS_TOLERANCE = 1e-3
ADAPTER_TOLERANCE = 1e-5  # no dropout: only the order of float sums differs


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "RECALIGN_QUIET": "1"}
    env.pop("WORLD_SIZE", None)
    return env


def _torchrun(*args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    # a hang guard, not a speed check: on a loaded 2-core machine the two-process run took over 300 s
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=timeout)


def _why(done: subprocess.CompletedProcess) -> str:
    """What a failed torchrun printed that tells why: the end of stderr (torchrun's summary, which only names
    the signal), then each process's error lines, last so that a log's tail shows them."""
    telling = [line for line in done.stderr.splitlines()
               if any(mark in line for mark in ("Error", "error", "what()", "terminate", "Abort", "Exception"))]
    return done.stderr[-1500:] + "\n--- error lines:\n" + "\n".join(telling[:30])


SCRIPT = """
import json, sys
import torch
from recalign import cli, distributed
from recalign.io import Checkpoints
from recalign.llm import Backbone, LORA_CONFIG, train_section
from recalign.llm.steps import answer_loss, lora_step

out, run_args = sys.argv[1], sys.argv[2:]
sys.argv = ["recalign", *run_args]  # the command line `torchrun -m recalign` would run
try:
    cli.main()
except SystemExit as exc:
    assert not exc.code, exc.code
processes = distributed.current()
assert processes.size == 2, processes.size
backbone = Backbone.load("tiny-random", dtype="float32", batch_size=4)
prompts = [f"User {i} liked movie {i * 7 % 11}{' and more' * (i % 5)}. Will they like movie {i % 3}?" for i in range(13)]
result = {"rank": processes.rank}
for n in (13, 3):  # 4 batches of 4, 4, 4, 1 over two processes; one batch (the second process idle)
    result[f"shared{n}"] = backbone.score_yes_no(prompts[:n]).tolist()
    mine = distributed._CURRENT
    distributed._CURRENT = distributed.Processes()  # this process alone: the one-process scores
    result[f"alone{n}"] = backbone.score_yes_no(prompts[:n]).tolist()
    distributed._CURRENT = mine

examples = [(p, "Yes." if i % 2 else "No.") for i, p in enumerate(prompts + prompts[:3])]
valid = answer_loss(backbone, examples[:6], batch_size=4)
calls = []

class Interrupted(Exception):
    pass

def evaluate():
    calls.append(1)
    if len(calls) == 2:
        raise Interrupted  # after the checkpoint of step 2
    return valid()

train = train_section(batch_size=2, grad_accum=2, epochs=2, eval_every=2, patience=0, lr=1e-3)
try:
    lora_step(Checkpoints(out + "/checkpoints"), backbone, examples, {**LORA_CONFIG, "dropout": 0.0}, train, 0,
              "train", out + "/adapter", evaluate=evaluate)
except Interrupted:
    result["interrupted"] = True
if processes.main:
    with open(out + "/result.json", "w") as handle:
        json.dump(result, handle)
"""


@pytest.fixture(scope="module")
def two_process_script(tmp_path_factory):
    out = tmp_path_factory.mktemp("two")
    script = out / "script.py"
    script.write_text(textwrap.dedent(SCRIPT))
    done = _torchrun(str(script), str(out), "run", "tallrec", "--out", str(out / "two"), *TINY)
    assert done.returncode == 0, _why(done)
    return out, json.loads((out / "result.json").read_text()), done.stdout


def test_tallrec_on_two_processes_matches_one_and_only_the_main_process_writes(two_process_script, tmp_path,
                                                                              monkeypatch, capsys):
    out, _, stdout = two_process_script
    assert len(stdout.strip().splitlines()) == 1  # the result line, printed by the main process only
    monkeypatch.setenv("RECALIGN_QUIET", "1")
    code, _, err = invoke(monkeypatch, capsys, "run", "tallrec", "--out", str(tmp_path / "one"), *TINY)
    assert code == 0, err
    one, two = (json.loads((path / "metrics.json").read_text()) for path in (tmp_path / "one", out / "two"))
    assert two["test"]["n"] == one["test"]["n"] == 24 and two["valid"]["n"] == 16
    assert abs(two["test"]["auc"] - one["test"]["auc"]) <= METRIC_TOLERANCE
    assert abs(two["valid"]["auc"] - one["valid"]["auc"]) <= METRIC_TOLERANCE
    history_one, history_two = one["per_seed"][0]["history"], two["per_seed"][0]["history"]
    assert [h["step"] for h in history_two] == [h["step"] for h in history_one] == [4, 8]  # same effective batch
    for a, b in zip(history_one, history_two):
        assert abs(a["loss"] - b["loss"]) <= LOSS_TOLERANCE * abs(a["loss"])
    files = sorted(p.relative_to(out / "two").as_posix() for p in (out / "two").rglob("*"))
    assert files == sorted(p.relative_to(tmp_path / "one").as_posix() for p in (tmp_path / "one").rglob("*"))
    log = (out / "two" / "run.log").read_text()
    assert log.count("done in") == 1 and log.count("run tallrec on ml-100k") == 1  # one writer


def test_scoring_on_two_processes_gives_the_one_process_scores(two_process_script):
    _, result, _ = two_process_script
    for n in (13, 3):
        assert len(result[f"shared{n}"]) == n
        assert result[f"shared{n}"] == result[f"alone{n}"]  # exactly: every row scored once, in its own batch


def test_lora_step_interrupted_on_two_processes_continues_on_one(two_process_script, tmp_path, monkeypatch):
    out, result, _ = two_process_script
    assert result["interrupted"]
    monkeypatch.setenv("RECALIGN_QUIET", "1")
    torch.set_num_threads(1)
    backbone = Backbone.load("tiny-random", dtype="float32", batch_size=4)
    prompts = [f"User {i} liked movie {i * 7 % 11}{' and more' * (i % 5)}. Will they like movie {i % 3}?"
               for i in range(13)]
    examples = [(p, "Yes." if i % 2 else "No.") for i, p in enumerate(prompts + prompts[:3])]
    valid = answer_loss(backbone, examples[:6], batch_size=4)
    train = train_section(batch_size=2, grad_accum=2, epochs=2, eval_every=2, patience=0, lr=1e-3)
    lora = {**LORA_CONFIG, "dropout": 0.0}
    saved = Checkpoints(out / "checkpoints").load_checkpoint("train")
    assert saved["result"]["steps"] == 2 and saved["micro"] == 4  # counted in micro-batches of train.batch_size
    resumed = lora_step(Checkpoints(out / "checkpoints"), backbone, examples, lora, train, 0, "train",
                        tmp_path / "resumed", evaluate=valid)
    resumed_state = {k: v.clone() for k, v in backbone.adapter_state().items()}
    fresh = lora_step(Checkpoints(tmp_path / "fresh"), backbone, examples, lora, train, 0, "train",
                      tmp_path / "fresh-adapter", evaluate=valid)
    assert resumed["steps"] == fresh["steps"] == 8
    assert [h["step"] for h in resumed["history"]] == [h["step"] for h in fresh["history"]] == [2, 4, 6, 8]
    for name, value in backbone.adapter_state().items():
        torch.testing.assert_close(resumed_state[name], value, atol=ADAPTER_TOLERANCE, rtol=ADAPTER_TOLERANCE)


class _Two(distributed.Processes):
    """Two processes' arithmetic without a process group (for the config and checkpoint rules)."""

    def __init__(self):
        super().__init__()
        self.size = 2


class _Store:
    resume = True

    def __init__(self):
        self.saved = {}

    def save_checkpoint(self, name, state):
        self.saved[name] = state

    def load_checkpoint(self, name):
        return self.saved.get(name)


def test_effective_batch_and_checkpoint_position_do_not_depend_on_the_process_count():
    base = TrainConfig(batch_size=4, grad_accum=2)
    config, store = data_parallel(base, _Store(), _Two())
    assert (config.batch_size, config.grad_accum) == (8, 1)  # whole micro-batches per process
    store.save_checkpoint("train", {"micro": 3})
    assert store.store.saved["train"]["micro"] == 6 and store.load_checkpoint("train")["micro"] == 3
    store.store.saved["train"] = {"micro": 5}  # one process stopped where two cannot start
    with pytest.raises(InputError, match="continue it with one process"):
        store.load_checkpoint("train")
    config, plain = data_parallel(TrainConfig(batch_size=4, grad_accum=3), _Store(), _Two())
    assert (config.batch_size, config.grad_accum) == (4, 3) and isinstance(plain, _Store)  # parts of micro-batches
    assert data_parallel(base, plain, distributed.Processes())[0] is base


def test_processes_option_bad_input_is_one_line(tmp_path, monkeypatch, capsys):
    cores, _ = distributed.available_devices()
    for value, message in ((0, "--processes must be >= 1"), (cores + 1, "at most one process each")):
        code, _, err = invoke(monkeypatch, capsys, "run", "tallrec", "--out", str(tmp_path / "x"), *TINY,
                              "--processes", str(value))
        assert code == 2 and err.count("\n") == 1 and message in err, err
    monkeypatch.setenv("WORLD_SIZE", "3")
    code, _, err = invoke(monkeypatch, capsys, "run", "tallrec", "--out", str(tmp_path / "x"), *TINY,
                          "--processes", "2")
    assert code == 2 and "the launcher started 3 processes" in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("variable,value,message", [
    ("ACCELERATE_USE_FSDP", "true", "asks for FSDP"),
    ("ACCELERATE_USE_DEEPSPEED", "true", "asks for DeepSpeed"),
    ("ACCELERATE_MIXED_PRECISION", "bf16", "mixed_precision bf16"),
])
def test_an_accelerate_config_recalign_cannot_follow_is_one_line(monkeypatch, variable, value, message):
    monkeypatch.setenv(variable, value)
    with pytest.raises(InputError, match=message):
        distributed.check_launch_config(2, 0)


def test_accelerate_launch_cpu_with_several_processes_that_started_one_is_one_line(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # what accelerate's simple launcher sets for --num_processes > 1
    with pytest.raises(InputError, match="starts one process here"):
        distributed.check_launch_config(1, 0)


def test_one_process_per_gpu():
    with pytest.raises(InputError, match="4 processes but 2 GPU"):
        distributed.check_launch_config(4, 2)


# `model.name` takes any local model directory (tests/test_llm.py: a saved tiny Llama) or a .gguf file: the
# embedded GGUF given as a path loads the same weights as the embedded name (read from its converted copy).
@pytest.mark.slow
def test_model_name_accepts_a_gguf_file_path():
    from recalign.assets import fetch
    from recalign.llm.loading import EMBEDDED

    path = fetch("smollm2-135m-instruct") / EMBEDDED["smollm2-135m-instruct"]
    texts = ['Is the sky blue? Answer "Yes" or "No".', 'Is fire cold? Answer "Yes" or "No".']
    from_file = Backbone.load(str(path), dtype="float32")
    embedded = Backbone.load("smollm2-135m-instruct", dtype="float32")
    assert from_file.hidden_size == embedded.hidden_size == 576
    torch.testing.assert_close(from_file.score_yes_no(texts), embedded.score_yes_no(texts), atol=1e-4, rtol=1e-4)
