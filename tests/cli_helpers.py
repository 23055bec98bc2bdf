"""Run the real CLI in-process (faster than a subprocess) and capture exit code, stdout and stderr."""

import sys

from recalign import cli


def invoke(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["recalign", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err
