"""Small file helpers every layer may use: atomic writes (a reader never sees a half-written file) and a
directory of named checkpoints.

An atomic write goes to a temporary sibling first and is renamed over the target in one step; an
interrupted write leaves the old file (or none) and a hidden `.NAME.xxxxxxxx` temporary that
`Checkpoints.clean()` removes (a run directory runs it whenever it is restarted).

Training states are safetensors files (`save_state` / `load_state`): loading one never unpickles anything.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from recalign.errors import InputError, MachineError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temporary_sibling(path: Path) -> tuple[int, str]:
    """(fd, name) of a new hidden file beside `path`, with the permissions a plain new file would get
    (0666 minus the umask): mkstemp's own 0600 would make every run unreadable to anyone but its owner."""
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}." if len(os.fsencode(path.name)) <= 244 else ".tmp."  # name + 10 bytes <= 255
    fd, tmp = tempfile.mkstemp(prefix=prefix, dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())
    return fd, tmp


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = temporary_sibling(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        _say_if_disk_full(exc, path)
        raise


def _say_if_disk_full(exc: BaseException, path: Path) -> None:
    """A full disk (or quota) is the machine's state, not a bug: one line naming the file (the run stays
    unfinished and continues once there is room)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise MachineError(f"{path}: no space left on the device ({os.strerror(exc.errno)}); free some and run "
                           "the same command again") from None


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def json_safe(value: Any) -> Any:
    """Strict-JSON form: NaN / inf -> null (an undefined metric), numpy / torch scalars -> Python numbers."""
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return json_safe(value.item())
    return value


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(json_safe(data), indent=2, sort_keys=False) + "\n")


def _plain_permissions(directory: Path) -> None:
    mask = _umask()
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


STALE_TEMPORARY_S = 3600  # a cache's temporary older than this was left by an interrupted process


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path` in one rename. Temporaries of the
    same name that an interrupted process left (older than an hour: not a concurrent writer's) are removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*"):
        if is_temporary(stale.name) and not stale.name.endswith(".old") and \
                time.time() - stale.stat().st_mtime > STALE_TEMPORARY_S:
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())
    try:
        try:
            yield tmp
        except OSError as exc:
            _say_if_disk_full(exc, path)
            raise
        _plain_permissions(tmp)  # what libraries wrote inside (safetensors: 0600) as a plain new file gets
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


# ------------------------------------------------------------------------------------------- states
STATE_FORMAT = "recalign-state/1"
_TEMPORARY = re.compile(r"^\..+\.([a-z0-9_]{8}|old)$")  # `.NAME.xxxxxxxx` (mkstemp/mkdtemp) or `.NAME.old`


def save_state(path: str | Path, state: Any) -> Path:
    """Write a nested state atomically as one safetensors file: every tensor and numpy array is a tensor of
    the file; the rest (dicts, lists, tuples, str, int, float, bool, None) is JSON in its metadata, with
    `{"$tensor": key}`-style references to the tensors. `load_state` gives back exactly what was saved."""
    from safetensors.torch import save

    tensors: dict[str, Any] = {}
    skeleton = _encode(state, "", tensors)
    data = save(tensors, metadata={"format": STATE_FORMAT, "state": json.dumps(skeleton, allow_nan=False)})
    path = Path(path)
    atomic_write_bytes(path, data)
    return path


def load_state(path: str | Path) -> Any:
    """What `save_state` wrote. Anything else (a pickle, a truncated or corrupt file, a foreign safetensors
    file) is an InputError naming the file; nothing is ever unpickled."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key).clone() for key in handle.keys()}  # not tied to the mmap
    except Exception as exc:  # SafetensorError, OSError: unreadable, truncated, not safetensors
        if _is_pickle(path):
            raise InputError(f"{path}: a pickle file (torch.save, written by recalign before states were "
                             f"safetensors); it is not loaded because unpickling can run code. Regenerate it: "
                             f"rerun with --overwrite (see README, 'Run directories')") from None
        raise InputError(f"{path}: not a readable recalign state file ({' '.join(str(exc).split())})") from None
    if metadata.get("format") != STATE_FORMAT or "state" not in metadata:
        raise InputError(f"{path}: a safetensors file without a recalign state (format "
                         f"{metadata.get('format')!r}, expected {STATE_FORMAT!r})")
    try:
        return _decode(json.loads(metadata["state"]), tensors)
    except (ValueError, TypeError, KeyError, IndexError, RecursionError) as exc:
        raise InputError(f"{path}: malformed recalign state ({' '.join(str(exc).split())})") from None


def _is_pickle(path: Path) -> bool:
    """torch.save writes a zip archive (or, with its legacy format, a bare pickle stream). Only asked after
    safetensors refused the file (a safetensors header length may start with any byte)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError:
        return False
    return head == b"PK\x03\x04" or head[:1] == b"\x80"


def _encode(value: Any, where: str, tensors: dict) -> Any:
    import numpy as np
    import torch

    def add(tensor, tag: str) -> dict:
        key = where or "root"
        if key in tensors:
            key = f"{key}~{len(tensors)}"
        tensors[key] = tensor.detach().cpu().contiguous().clone()  # clone: no tensors sharing memory
        return {tag: key}

    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided:
            raise TypeError(f"cannot store a {value.layout} tensor at '{where}'; store its components")
        return add(value, "$tensor")
    if isinstance(value, (np.ndarray, np.generic)):
        array = np.asarray(value)
        if array.dtype.kind not in "biufc":
            raise TypeError(f"cannot store a numpy array of dtype {array.dtype} at '{where}'")
        array = array.astype(array.dtype.newbyteorder("="), order="C")  # native order, C layout, 0-d kept
        return add(torch.from_numpy(array), "$ndarray" if isinstance(value, np.ndarray) else "$numpy")
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"$float": repr(value)}
    if isinstance(value, (list, tuple)):
        items = [_encode(v, f"{where}.{i}".lstrip("."), tensors) for i, v in enumerate(value)]
        return {"$tuple": items} if isinstance(value, tuple) else items
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: _encode(v, f"{where}.{k}".lstrip("."), tensors) for k, v in value.items()}
        return {"$items": [[_encode(k, f"{where}.key", tensors), _encode(v, f"{where}.{k}".lstrip("."), tensors)]
                           for k, v in value.items()]}  # int keys (optimizer state), tuple keys, "$..." keys
    raise TypeError(f"cannot store {type(value).__name__} at '{where}' in a state file")


def _decode(node: Any, tensors: dict) -> Any:
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    if not isinstance(node, dict):
        raise TypeError(f"unexpected {type(node).__name__}")
    tags = [k for k in node if k.startswith("$")]
    if not tags:
        return {k: _decode(v, tensors) for k, v in node.items()}
    if len(node) != 1:
        raise ValueError(f"unexpected keys {', '.join(sorted(node))}")
    tag, arg = tags[0], node[tags[0]]
    if tag in ("$tensor", "$ndarray", "$numpy"):
        if not isinstance(arg, str) or arg not in tensors:
            raise KeyError(f"tensor {arg!r} is not in the file")
        tensor = tensors[arg]
        return tensor if tag == "$tensor" else tensor.numpy() if tag == "$ndarray" else tensor.numpy()[()]
    if tag == "$float" and arg in ("nan", "inf", "-inf"):
        return float(arg)
    if tag == "$tuple" and isinstance(arg, list):
        return tuple(_decode(v, tensors) for v in arg)
    if tag == "$items" and isinstance(arg, list) and all(isinstance(p, list) and len(p) == 2 for p in arg):
        return {_decode(k, tensors): _decode(v, tensors) for k, v in arg}
    raise ValueError(f"bad {tag} entry")


class Checkpoints:
    """A directory of named training states (`NAME.safetensors`, see `save_state`), each written atomically.

    Components that train (the CF trainer, the LLM training loop, generation steps) take any object with
    `save_checkpoint(name, state)` / `load_checkpoint(name)`; a run directory offers the same two methods.
    A `NAME.pt` left by an older recalign (a pickle) is refused, never unpickled."""

    def __init__(self, directory: str | Path, resume: bool = True):
        self.path = Path(directory)
        self.resume = resume

    def file(self, name: str) -> Path:
        return self.path / f"{name}.safetensors"

    def save_checkpoint(self, name: str, state: Any) -> Path:
        """Written by the main process of a multi-process run; the others wait until it is there."""
        from recalign import distributed

        processes = distributed.current()
        path = save_state(self.file(name), state) if processes.main else self.file(name)
        processes.barrier()
        return path

    def load_checkpoint(self, name: str) -> Any | None:
        """The saved state, or None when there is none."""
        path = self.file(name)
        if path.exists():
            return load_state(path)
        legacy = self.path / f"{name}.pt"
        if legacy.exists():
            return load_state(legacy)  # refused with the message that says how to regenerate the run
        return None

    def clean(self) -> list[Path]:
        return clean_temporaries(self.path)


# a finished run's per-case test results: Yes/No scores (ICL, TALLRec per seed, CoLLM, Soft-Prompt) or ranks
PER_CASE_FILES = ("predictions.json", "predictions*-test.json", "cases-test.json")


def only_match(root: Path, patterns: tuple[str, ...], missing: str, several: str) -> Path:
    """The one path under `root` that a glob of `patterns` finds: InputError(`missing`) when none, and
    InputError(`several` with the names found) when more than one."""
    found = sorted({path for pattern in patterns for path in Path(root).glob(pattern)})
    if not found:
        raise InputError(missing)
    if len(found) > 1:
        raise InputError(f"{several} ({', '.join(str(p.relative_to(root)) for p in found)}); name one of them")
    return found[0]


def per_case_file(run: str | Path) -> Path:
    """A finished run's per-case test results file (`PER_CASE_FILES`). `run`: the run directory, or one of
    those files when the run holds several (a TALLRec run over seeds)."""
    given = Path(run)
    root = given.parent if given.is_file() else given
    if not (root / "metrics.json").is_file():
        raise InputError(f"{run}: not a finished run directory (no metrics.json)")
    if given.is_file():
        return given
    return only_match(root, PER_CASE_FILES, f"{run}: the run kept no per-case test results (predictions*.json or "
                      "cases-test.json)", f"{run} holds several per-case result files")


def read_per_case(path: Path) -> tuple[str, dict]:
    """A per-case results file, checked: ("scores", {"user", "item", "label", "score"}) from a Yes/No run's
    predictions (ICL `predictions.json`, TALLRec `predictions-seedN-test.json`, CoLLM `predictions-test.json`
    (its CoLLM row), Soft-Prompt `predictions-test.json`) or ("ranks", {"user", "target", "rank"}) from a
    next-item run's `cases-test.json` (BIGRec, P5, TransRec, GPT4Rec; a null rank: never found, inf)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a readable JSON file ({exc})") from None
    if isinstance(data, list):  # cases-test.json
        if not data or not all(isinstance(row, dict) and "rank" in row and "user" in row for row in data):
            raise InputError(f"{path}: expected a list of test cases with 'user' and 'rank' (runs that rank items "
                             "write one: BIGRec, P5, TransRec, GPT4Rec)")
        for i, row in enumerate(data):
            rank = row["rank"]
            if rank is not None and not (_is_number(rank) and rank >= 0):
                raise InputError(f"{path}: case {i}: rank is {json.dumps(rank)[:20]}, not a rank >= 0 (or null)")
        ranks = [float("inf") if row["rank"] is None else float(row["rank"]) for row in data]
        return "ranks", {"user": [row["user"] for row in data], "target": [row.get("target") for row in data],
                         "rank": ranks}
    if isinstance(data, dict) and isinstance(data.get("scores"), dict) and "collm" in data["scores"]:
        data = {**data, "score": data["scores"]["collm"]}
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("user", "item", "label", "score")) \
            or len({len(data[k]) for k in ("user", "item", "label", "score")}) != 1:
        raise InputError(f"{path}: expected per-sample lists 'user', 'item', 'label', 'score' of one length")
    for i, (score, label) in enumerate(zip(data["score"], data["label"])):
        if not _is_number(score):
            raise InputError(f"{path}: score[{i}] is {json.dumps(score)[:20]}, not a number")
        if isinstance(label, str) or label not in (0, 1):
            raise InputError(f"{path}: label[{i}] is {json.dumps(label)[:20]}, not 0/1 or false/true")
    return "scores", data


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def is_temporary(name: str) -> bool:
    """A name `atomic_write_bytes` / `atomic_dir` use for their temporaries."""
    return bool(_TEMPORARY.match(name))


def clean_temporaries(directory: str | Path) -> list[Path]:
    """Remove the temporaries interrupted atomic writes left in `directory` (`.NAME.xxxxxxxx`); a folder that
    `atomic_dir` had moved aside (`.NAME.old`) is put back when NAME itself is missing. Returns the removed."""
    directory, removed = Path(directory), []
    if not directory.is_dir():
        return removed
    for entry in sorted(directory.iterdir()):
        if not is_temporary(entry.name):
            continue
        original = directory / entry.name[1:].rsplit(".", 1)[0]
        if entry.name.endswith(".old") and entry.is_dir() and not original.exists():
            os.replace(entry, original)
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed
