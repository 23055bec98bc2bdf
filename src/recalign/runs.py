"""Run directories: resolved config, metrics.json, report, log, checkpoints; atomic writes; resume.

Layout of DIR:
  config.yaml     the fully resolved config and a last line `# run: METHOD on DATASET` (written first: it
                  marks DIR as a run directory)
  report.md       a short human-readable summary
  metrics.json    {"method", "dataset", "test": {...}, "valid": {...}, "seconds": {"train", "eval"}, ...};
                  written last: it marks the run finished
  run.log         timestamped log lines
  checkpoints/    `NAME.safetensors` states (`recalign.io.save_state`) and adapter folders, written
                  atomically, read back when the run is continued

What `prepare` does with DIR (the README's "What happens to a run directory after a crash, a kill, a bad
input" says the same for users):
  missing or empty            a new run
  unfinished (config.yaml,    the same config: continued from its checkpoints (with or without --resume);
  no metrics.json)            another config: refused, naming --overwrite
  finished (metrics.json)     refused; --resume keeps it (and rewrites a missing report.md), with the same
                              config only
  anything else (files, no    refused, even with --overwrite: it is not a run directory
  config.yaml)
  --overwrite deletes an unfinished or finished run and starts a new one. Temporaries of interrupted atomic
  writes are removed whenever a run is continued.
One process writes DIR at a time: it holds an exclusive lock on DIR/.recalign.lock (flock, released when the
process ends, however it ends); a second command on the same DIR is refused in one line.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from recalign import distributed
from recalign.errors import InputError
from recalign.io import (Checkpoints, atomic_write_json, atomic_write_text, clean_temporaries, is_temporary,
                         per_case_file, read_per_case)

_VIRTUAL = (Path("/proc"), Path("/sys"), Path("/dev"))
LOCK_NAME = ".recalign.lock"
_HELD: dict[Path, Any] = {}  # run directories whose lock this process holds (a process may prepare one twice)


class RunDir:
    def __init__(self, path: str | Path, resume: bool = False, overwrite: bool = False):
        if str(path).strip() == "":
            raise InputError("--out: empty path; name the run directory")
        self.path = Path(path)
        self.resume = resume
        self.overwrite = overwrite
        self.new = False  # prepare() started a new run (so a bad input mid-run may discard it)
        self.created = False  # prepare() created the directory itself
        self.checkpoints = self.path / "checkpoints"
        self._checkpoints = Checkpoints(self.checkpoints)

    # ----- lifecycle
    def check(self) -> None:
        """Refuse an --out that cannot hold a run, writing nothing: under a file, under /proc, /sys or /dev,
        in a place that is not writable, or a name the file system cannot hold."""
        if self.resume and self.overwrite:
            raise InputError("--resume and --overwrite exclude each other: --resume continues or keeps a run, "
                             "--overwrite deletes it")
        check_out(self.path)

    def state(self) -> str:
        """'new' (missing or empty), 'finished', 'unfinished' or 'other' (files, but not a run directory)."""
        if not self.path.is_dir():
            return "new"
        if (self.path / "metrics.json").exists():
            return "finished"
        if (self.path / "config.yaml").exists():
            return "unfinished"
        return "other" if any(not is_temporary(p.name) and p.name != LOCK_NAME for p in self.path.iterdir()) else "new"

    def prepare(self, config_text: str, origin: str | None = None) -> None:
        """Check --out, then create, continue, keep or replace the run (see the module docstring).

        origin ("METHOD on DATASET") is kept as a last comment line of config.yaml; a run of another origin
        is never continued."""
        if origin:
            config_text += f"{_ORIGIN}{' '.join(origin.split())}\n"
        self.check()
        where = f"--out {self.path}"
        other = InputError(f"{where}: holds files but no config.yaml, so it is not a run directory (and is never "
                           "overwritten); choose a new or empty directory")
        if self.state() == "other":
            raise other  # before the lock: nothing is written into a folder that is not a run's
        processes = distributed.current()
        self.created = not self.path.exists()
        if processes.main:
            self._lock()  # then look: another process's run is never read half-written, nor deleted
        state = self.state()
        if state == "other":
            raise other
        if state != "new" and self.overwrite:
            self._remove_tree()
            self.release()
            self._lock()
            state = "new"
        elif state == "finished":
            if not self.resume:
                change = self._config_change(config_text)
                other = f", with another config: {change}" if change else ""
                raise InputError(f"{where}: already holds a run (finished{other}); --resume keeps it, --overwrite "
                                 "replaces it, or choose another --out")
            self._same_config(config_text, "a finished run")
        elif state == "unfinished":
            self._same_config(config_text, "an unfinished run")
            self.resume = True  # the same command continues from the checkpoints
        self.new = state == "new"
        processes.barrier()  # every process has read the state before the main process changes it
        if processes.main:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                clean_temporaries(self.path)
                clean_temporaries(self.checkpoints)
                if state == "new":
                    atomic_write_text(self.path / "config.yaml", config_text)
            except OSError as exc:
                raise InputError(f"{where}: cannot write there ({exc.strerror or exc})") from None
        processes.barrier()

    def _lock(self) -> None:
        """Hold DIR/.recalign.lock exclusively (creating DIR), or refuse: another process writes this run."""
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            key = self.path.resolve()
            if key in _HELD and os.path.exists(key / LOCK_NAME):
                return
            handle = open(key / LOCK_NAME, "a+")
        except OSError as exc:
            raise InputError(f"--out {self.path}: cannot write there ({exc.strerror or exc})") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise InputError(f"--out {self.path}: another recalign process is writing this run now; wait for it "
                             "to end, or choose another --out") from None
        _HELD[key] = handle

    def release(self) -> None:
        """Let another process write this run (the lock also ends with the process)."""
        handle = _HELD.pop(self.path.resolve(), None)
        if handle is not None:
            handle.close()

    def discard(self) -> None:
        """Remove what this run wrote (a bad input found mid-run of a new run)."""
        if not distributed.current().main:
            return
        if self.created:
            shutil.rmtree(self.path, ignore_errors=True)
        elif self.path.is_dir():
            for entry in self.path.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)

    def finished(self) -> bool:
        return (self.path / "metrics.json").exists()

    def _same_config(self, config_text: str, what: str) -> None:
        old = _split_origin(self._saved_config())[1]
        new = _split_origin(config_text)[1]
        if old and new and _canonical_origin(old) != _canonical_origin(new):
            raise InputError(f"--out {self.path}: holds {what} of {old}, not of {new}; --overwrite deletes it and "
                             "starts afresh, or choose another --out")
        change = self._config_change(config_text)
        if change:
            raise InputError(f"--out {self.path}: holds {what} with another config ({change}); "
                             "--overwrite deletes it and starts afresh, or choose another --out")

    def _saved_config(self) -> str:
        return (self.path / "config.yaml").read_text(encoding="utf-8", errors="replace")

    def _config_change(self, config_text: str) -> str:
        """'' when DIR's config.yaml holds `config_text` (its origin line aside), else what changed."""
        saved, wanted = _split_origin(self._saved_config())[0], _split_origin(config_text)[0]
        return "" if saved == wanted else _changed_keys(saved, wanted)

    def _remove_tree(self) -> None:
        try:
            shutil.rmtree(self.path)
        except OSError as exc:
            raise InputError(f"--out {self.path}: --overwrite could not delete the old run ({exc.strerror or exc})") from None

    def record_dataset(self, name: str, ds) -> None:
        """`dataset.json`: the dataset a run started on (its fingerprint and sizes). Continuing the run on data
        that changed since is refused: its checkpoints hold ids of the old data."""
        path = self.path / "dataset.json"
        now = {"dataset": name, "fingerprint": ds.fingerprint(), "users": int(ds.n_users), "items": int(ds.n_items),
               "interactions": int(len(ds.interactions))}
        try:
            saved = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            saved = None  # unreadable (a run from before this file existed cannot be checked either)
        if isinstance(saved, dict) and saved.get("fingerprint") not in (None, now["fingerprint"]):
            def sizes(d):
                return f"{d.get('users')} users, {d.get('items')} items, {d.get('interactions')} interactions"

            raise InputError(f"--out {self.path}: the dataset {name!r} changed since this run started (then "
                             f"{sizes(saved)}, now {sizes(now)}; the fingerprint differs); restore its files, or "
                             "--overwrite to start afresh")
        # written (the same content again on a resume) by every process's call: a condition on what a process
        # read would let a slower one, reading the main process's new file, skip the write's barrier, and the
        # processes would then wait at different barriers forever
        self.write_json("dataset.json", now)

    # ----- outputs
    # Only the main process of a multi-process run writes (`recalign.distributed`); every process runs the
    # same code, so the barriers after a write line up.
    def write_metrics(self, metrics: dict) -> None:
        self._main_writes(atomic_write_json, self.path / "metrics.json", metrics)

    @staticmethod
    def _main_writes(write, *args) -> None:
        processes = distributed.current()
        if processes.main:
            write(*args)
        processes.barrier()

    def read_metrics(self) -> dict:
        path = self.path / "metrics.json"
        try:
            metrics = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{path}: unreadable ({exc}); --overwrite runs it again") from None
        if not isinstance(metrics, dict):
            raise InputError(f"{path}: not a JSON object; --overwrite runs it again")
        return metrics

    def write_text(self, name: str, text: str) -> None:
        self._main_writes(atomic_write_text, self.path / name, text)

    def write_json(self, name: str, data: Any) -> None:
        self._main_writes(atomic_write_json, self.path / name, data)

    def log(self, message: str) -> None:
        if not distributed.current().main:
            return
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


# ------------------------------------------------------------------------------------------- --out checks
def check_out(path: str | Path, file: bool = False) -> Path:
    """Refuse an --out that cannot be written, writing nothing: an empty path, a path under a file, under
    /proc, /sys or /dev, a name the file system cannot hold, a place that is not writable; for a file
    (`file`), also a directory or anything but a regular file at the path. The absolute path otherwise."""
    if str(path).strip() == "":
        raise InputError(f"--out: empty path; name the output {'file' if file else 'directory'}")
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8 (run.log, config.yaml and reports are UTF-8 text)
        shown = os.fsencode(str(path)).decode("utf-8", "backslashreplace")
        raise InputError(f"--out {shown}: the path is not valid UTF-8; choose a UTF-8 name") from None
    target = Path(os.path.abspath(path))
    for root in _VIRTUAL:
        if target == root or root in target.parents:
            raise InputError(f"--out {path}: under {root}, a virtual file system; choose a normal "
                             f"{'file' if file else 'directory'}")
    for part in target.parts:
        if len(os.fsencode(part)) > 255:
            raise InputError(f"--out {path}: the name {part[:20]}... is longer than 255 bytes")
    if file and (target.is_dir() or target.exists() and not target.is_file()):
        raise InputError(f"--out {path}: is {'a directory' if target.is_dir() else 'not a regular file'}; "
                         "name a file")
    existing = target.parent if file else target
    try:
        while not existing.exists() and not existing.is_symlink():
            existing = existing.parent
    except OSError as exc:
        raise InputError(f"--out {path}: {exc.strerror or exc}") from None
    if not existing.is_dir():
        kind = "a file" if existing.is_file() else "a broken symbolic link" if existing.is_symlink() else "no directory"
        where = "exists and is" if existing == target else f"{existing} is"
        raise InputError(f"--out {path}: {where} {kind}, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"--out {path}: {existing} is not writable")
    return target


def is_run_dir(path: Path) -> bool:
    """A run directory: its config.yaml beside a file only a run writes (a user's folder that merely holds
    a config.yaml is not one)."""
    return os.path.isfile(path / "config.yaml") and any(os.path.exists(path / name)
                                                        for name in ("metrics.json", "dataset.json", "run.log"))


def check_out_file(path: str | Path, inputs: list[Path] = ()) -> Path:
    """--out of `report` and `route`: a writable file (`check_out`) that is none of a run's own files: not
    inside one of the input runs nor inside any run directory, nor a reproduce directory's report. An existing
    file elsewhere is replaced."""
    from recalign.report.summary import written_by_reproduce

    target = check_out(path, file=True).resolve()
    runs = [Path(run).resolve() for run in inputs]
    for folder in target.parents:
        if folder in runs or is_run_dir(folder):
            raise InputError(f"--out {path}: inside the run directory {folder}, which is never written into; "
                             "choose a path outside it")
    if written_by_reproduce(target):
        raise InputError(f"--out {path}: is the report of a reproduce directory (reproduce rewrites it); choose "
                         "another path")
    return target


def write_out(path: str | Path, write, data) -> None:
    """`write(path, data)` (an atomic write) for an --out file, a failure as one line naming --out."""
    try:
        write(Path(path), data)
    except OSError as exc:
        raise InputError(f"--out {path}: cannot write there ({exc.strerror or exc})") from None


# ------------------------------------------------------------------------------------------ metrics.json
def read_metrics_file(path: Path) -> dict:
    """A finished run's metrics.json, checked: a JSON object with the method and dataset, `test` and `valid`
    mappings whose metrics are numbers (or null, or lists and mappings: intervals, breakdowns)."""
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{exc.lineno}: invalid JSON") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InputError(f"{path}: unreadable ({' '.join(str(exc).split())[:200]})") from None
    if not isinstance(metrics, dict) or not isinstance(metrics.get("method"), str) \
            or not isinstance(metrics.get("dataset"), str):
        raise InputError(f"{path}: not a recalign metrics.json (needs method and dataset)")
    for split in ("test", "valid"):
        part = metrics.get(split, {})
        if not isinstance(part, dict):
            raise InputError(f"{path}: {split!r} is not a mapping of metric names to values")
        for key, value in part.items():
            if isinstance(value, (str, bool)):
                raise InputError(f"{path}: {split}.{key} is {json.dumps(value)[:40]}, not a number")
            if key.endswith("_ci") and value is not None and not (
                    isinstance(value, list) and len(value) == 2
                    and all(v is None or isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
                raise InputError(f"{path}: {split}.{key} is {json.dumps(value)[:40]}, not an interval [low, high]")
    return metrics


_ORIGIN = "# run: "


def _split_origin(text: str) -> tuple[str, str | None]:
    """(the YAML, the origin of its `# run: METHOD on DATASET` last line, or None)."""
    head, _, last = text.rstrip("\n").rpartition("\n")
    if last.startswith(_ORIGIN):
        return head + "\n", last[len(_ORIGIN):]
    return text, None


def _canonical_origin(origin: str) -> str:
    """`METHOD on DATASET` with a local dataset path made absolute (a run recorded before paths were, or
    spelt another way, is the same run when it names the same files)."""
    from recalign.data import canonical_dataset

    method, _, dataset = origin.partition(" on ")
    return f"{method} on {canonical_dataset(dataset)}"


def _changed_keys(saved: str, new: str) -> str:
    """'changed: train.lr, seed' — the dotted keys whose values differ (or 'config.yaml unreadable')."""
    import yaml

    def flat(node, prefix=""):
        if isinstance(node, dict) and node:
            return {k: v for key, value in node.items() for k, v in flat(value, f"{prefix}{key}.").items()}
        return {prefix.rstrip("."): node}

    try:
        old, cur = yaml.safe_load(saved), yaml.safe_load(new)
    except yaml.YAMLError:
        return "its config.yaml is unreadable"
    if not isinstance(old, dict):
        return "its config.yaml is empty or not a mapping"
    old, cur = flat(old), flat(cur)
    keys = sorted(k for k in set(old) | set(cur) if old.get(k, object) != cur.get(k, object))
    return "changed: " + (", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "") if keys else "formatting")


# ------------------------------------------------------------------------------ paired comparisons
def per_case_results(path: Path) -> tuple[str, dict]:
    """The per-case test results a finished run kept, for comparing runs on the same test cases
    (`io.per_case_file`, `io.read_per_case`). `path`: a run directory, or one of its per-case files."""
    return read_per_case(per_case_file(path))


def paired_differences(paths: list[Path]) -> list[dict]:
    """Each run minus the first on the same test cases, with paired 95% bootstrap intervals: AUC and UAUC
    for Yes/No runs, NDCG@10 for next-item runs. Runs on other cases (or of the other kind) are an error."""
    from recalign.eval.intervals import paired_predictions, paired_ranking_difference

    kind, first = per_case_results(paths[0])
    out = []
    for path in paths[1:]:
        other_kind, other = per_case_results(path)
        if other_kind != kind:
            raise InputError(f"{path}: {other_kind} cannot be paired with {paths[0]}'s {kind}")
        row = {"run": str(path), "reference": str(paths[0])}
        if kind == "scores":
            try:
                row.update(paired_predictions(other, first))
            except InputError as exc:
                raise InputError(f"{path} vs {paths[0]}: {exc}") from None
        else:
            for key in ("user", "target"):
                if other[key] != first[key]:
                    raise InputError(f"{path}: other test cases than {paths[0]} ({key} differs; "
                                     f"{len(other[key])} vs {len(first[key])} cases); not paired")
            row.update({"n": len(first["rank"]), "ndcg@10": paired_ranking_difference(other["rank"], first["rank"])})
        out.append(row)
    return out
