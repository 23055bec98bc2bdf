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
import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from recalign.errors import InputError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _json_safe(value.item())
    return value


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(_json_safe(data), indent=2, sort_keys=False) + "\n")


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class RunDir:
    def __init__(self, path: str | Path, resume: bool = False):
        self.path = Path(path)
        self.resume = resume
        self.checkpoints = self.path / "checkpoints"

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

    # ----- checkpoints (torch objects)
    def checkpoint_path(self, name: str) -> Path:
        return self.checkpoints / f"{name}.pt"

    def save_checkpoint(self, name: str, state: Any) -> Path:
        import io

        import torch

        buffer = io.BytesIO()
        torch.save(state, buffer)
        path = self.checkpoint_path(name)
        atomic_write_bytes(path, buffer.getvalue())
        return path

    def load_checkpoint(self, name: str) -> Any | None:
        """The saved state, or None when there is none (or when not resuming)."""
        import torch

        path = self.checkpoint_path(name)
        if not path.exists():
            return None
        return torch.load(path, map_location="cpu", weights_only=False)
