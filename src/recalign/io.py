"""Small file helpers every layer may use: atomic writes (a reader never sees a half-written file) and a
directory of named checkpoints.

An atomic write goes to a temporary sibling first and is renamed over the target in one step; an
interrupted write leaves the old file (or none) and a hidden `.NAME.*` temporary that the next write of the
same name, or `Checkpoints.clean()`, removes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


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


class Checkpoints:
    """A directory of named training states (`NAME.pt`), each written atomically.

    Components that train (the CF trainer, the LLM training loop, generation steps) take any object with
    `save_checkpoint(name, state)` / `load_checkpoint(name)`; a run directory offers the same two methods."""

    def __init__(self, directory: str | Path, resume: bool = True):
        self.path = Path(directory)
        self.resume = resume

    def file(self, name: str) -> Path:
        return self.path / f"{name}.pt"

    def save_checkpoint(self, name: str, state: Any) -> Path:
        import io

        import torch

        buffer = io.BytesIO()
        torch.save(state, buffer)
        path = self.file(name)
        atomic_write_bytes(path, buffer.getvalue())
        return path

    def load_checkpoint(self, name: str) -> Any | None:
        """The saved state, or None when there is none."""
        import torch

        path = self.file(name)
        if not path.exists():
            return None
        return torch.load(path, map_location="cpu", weights_only=False)
