"""The bad-input corpus (tests/bad_inputs/<case>/case.yaml) through the real CLI.

Each case gives the CLI arguments (files relative to the case folder, `{out}` = a fresh run directory)
and a substring the error must contain. Every case must: exit with code 2, print exactly one non-empty
line on stderr that names the problem and where, print nothing on stdout, show no traceback, and write
nothing (no run directory, no file in the case folder). Cases marked `subprocess: true` also run through
the installed console script, the way a user meets them."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from recalign import cli

CORPUS = Path(__file__).parent / "bad_inputs"
CASES = sorted(p.name for p in CORPUS.iterdir() if (p / "case.yaml").is_file())
KEYS = {"description", "args", "error", "subprocess"}


def load_case(name):
    spec = yaml.safe_load((CORPUS / name / "case.yaml").read_text())
    assert set(spec) <= KEYS and {"args", "error"} <= set(spec), f"{name}: malformed case.yaml"
    return spec


def snapshot(folder: Path):
    # lstat: some cases hold symbolic link loops and dead links on purpose
    return sorted((str(p.relative_to(folder)), p.lstat().st_mtime_ns) for p in folder.rglob("*"))


def check(name, code, stdout, stderr, out: Path, before):
    spec = load_case(name)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, f"{name}: exit code {code}, stderr {stderr!r}"
    assert len(lines) == 1, f"{name}: expected one stderr line, got {lines!r}"
    assert "Traceback" not in stderr
    assert lines[0].startswith("error: ")
    assert spec["error"] in lines[0], f"{name}: {spec['error']!r} not in {lines[0]!r}"
    assert stdout == "", f"{name}: partial output on stdout {stdout!r}"
    assert not out.exists(), f"{name}: wrote {out}"
    assert snapshot(CORPUS / name) == before, f"{name}: the case folder changed"


def test_corpus_is_large_enough():
    assert len(CASES) >= 25
    for name in CASES:
        load_case(name)


@pytest.mark.parametrize("name", CASES)
def test_bad_input_in_process(name, tmp_path, monkeypatch, capsys):
    spec = load_case(name)
    out = tmp_path / "run"
    args = [a.replace("{out}", str(out)) for a in spec["args"]]
    before = snapshot(CORPUS / name)
    monkeypatch.chdir(CORPUS / name)
    monkeypatch.delenv("RECALIGN_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["recalign", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    check(name, code, captured.out, captured.err, out, before)


@pytest.mark.parametrize("name", [n for n in CASES if load_case(n).get("subprocess")])
def test_bad_input_console_script(name, tmp_path):
    spec = load_case(name)
    out = tmp_path / "run"
    script = Path(sys.executable).parent / "recalign"
    command = [str(script)] if script.exists() else [sys.executable, "-c", "from recalign.cli import main; main()"]
    before = snapshot(CORPUS / name)
    env = {k: v for k, v in os.environ.items() if k != "RECALIGN_DEBUG"}
    result = subprocess.run(command + [a.replace("{out}", str(out)) for a in spec["args"]], cwd=CORPUS / name,
                            capture_output=True, text=True, env=env, timeout=120)
    check(name, result.returncode, result.stdout, result.stderr, out, before)
