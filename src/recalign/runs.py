"""Run directories: resolved config, metrics.json, report, log, checkpoints; atomic writes; resume.

Layout of DIR:
  config.yaml     the fully resolved config
  metrics.json    {"method", "dataset", "test": {...}, "valid": {...}, "seconds": {"train", "eval"}, ...}
  report.md       a short human-readable summary
  run.log         timestamped log lines
  checkpoints/    `NAME.pt` (torch) or adapter folders; written atomically, read back on --resume
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from recalign.errors import InputError
from recalign.io import Checkpoints, atomic_write_json, atomic_write_text


class RunDir:
    def __init__(self, path: str | Path, resume: bool = False):
        self.path = Path(path)
        self.resume = resume
        self.checkpoints = self.path / "checkpoints"
        self._checkpoints = Checkpoints(self.checkpoints)

    # ----- lifecycle
    def prepare(self, config_text: str) -> None:
        """Create the directory; refuse to overwrite a finished run unless resuming."""
        if self.path.exists() and not self.path.is_dir():
            raise InputError(f"--out {self.path}: exists and is not a directory")
        config_path = self.path / "config.yaml"
        if self.resume:
            if config_path.exists() and config_path.read_text() != config_text:
                raise InputError(
                    f"--resume {self.path}: config differs from the saved config.yaml; use a new --out"
                )
        elif (self.path / "metrics.json").exists() or config_path.exists():
            raise InputError(f"--out {self.path}: already holds a run; pass --resume or choose another directory")
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(config_path, config_text)

    def finished(self) -> bool:
        return (self.path / "metrics.json").exists()

    # ----- outputs
    def write_metrics(self, metrics: dict) -> None:
        atomic_write_json(self.path / "metrics.json", metrics)

    def read_metrics(self) -> dict:
        return json.loads((self.path / "metrics.json").read_text())

    def write_text(self, name: str, text: str) -> None:
        atomic_write_text(self.path / name, text)

    def write_json(self, name: str, data: Any) -> None:
        atomic_write_json(self.path / name, data)

    def log(self, message: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / "run.log", "a", encoding="utf-8") as handle:
            handle.write(f"{stamp} {message}\n")

    # ----- checkpoints (see `recalign.io.Checkpoints`)
    def checkpoint_path(self, name: str) -> Path:
        return self._checkpoints.file(name)

    def save_checkpoint(self, name: str, state: Any) -> Path:
        return self._checkpoints.save_checkpoint(name, state)

    def load_checkpoint(self, name: str) -> Any | None:
        """The saved state, or None when there is none."""
        return self._checkpoints.load_checkpoint(name)
