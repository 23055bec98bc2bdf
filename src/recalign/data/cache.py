"""Readers' parsed results cached as parquet, so a second load of a large dataset takes seconds.

An entry lives in `$RECALIGN_HOME/datasets/<key>/` (`RECALIGN_DATA_CACHE` overrides the directory; `off`
turns the cache off), with key = sha256(format, resolved path, reader arguments). It holds
`interactions.parquet`, `items.parquet`, `users.parquet` and `entry.json`, written last: the reader
version, the cache format, the dtypes of every column and each source file's size, mtime, ctime and a hash
of its first and last 1 MiB (a same-size edit in the middle of a file shows in its ctime, whatever mtime says). An entry is used only when all of these match the files now on disk and the
reader version in `READER_VERSIONS`; anything else (a touched or replaced file, a new reader version, an
unreadable or corrupt entry) is rebuilt with a log line, never reused. Entries are written atomically (a
temporary directory renamed into place). No pickle: parquet and JSON only.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from recalign.data.dataset import Dataset

# bump a reader's version whenever its output for the same files changes: old entries are then rebuilt
READER_VERSIONS = {"recbole": 3, "ml-100k-raw": 3, "ml-1m": 3, "amazon": 4, "book-crossing": 2, "steam": 3,
                   "movielens-csv": 2, "csv": 2}
CACHE_FORMAT = "recalign-dataset-cache/1"
_SAMPLE = 1 << 20
_TABLES = ("interactions", "items", "users")


def cache_root() -> Path | None:
    """Where entries live, or None when `RECALIGN_DATA_CACHE=off`."""
    from recalign import assets

    override = os.environ.get("RECALIGN_DATA_CACHE", "")
    if override.lower() in ("off", "0", "no", "false"):
        return None
    return Path(override) if override else assets.home() / "datasets"


def source_files(path: Path) -> list[Path]:
    """Every regular file a reader of `path` may open: the path itself and the files in its directory
    (metadata, user and item tables sit beside the interactions; a RecBole prefix names no file)."""
    directory = path if path.is_dir() else path.parent
    files = {p for p in directory.iterdir() if p.is_file()}
    if path.is_file():
        files.add(path)
    return sorted(files)


def file_identity(path: Path) -> dict:
    stat = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        digest.update(handle.read(_SAMPLE))
        if stat.st_size > 2 * _SAMPLE:
            handle.seek(-_SAMPLE, os.SEEK_END)
        digest.update(handle.read(_SAMPLE))
    # the resolved name: the same files however the dataset path was spelt; ctime as well as mtime: a copy that
    # keeps the modification time (cp -p, rsync -a, tar) still changes ctime, which no tool sets back
    return {"name": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "ctime_ns": stat.st_ctime_ns, "sample_sha256": digest.hexdigest()}


def entry_key(fmt: str, path: Path, arguments: dict) -> str:
    text = json.dumps({"format": fmt, "path": str(path.resolve()), "arguments": arguments}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _dtypes(frame: pd.DataFrame) -> dict:
    return {column: str(dtype) for column, dtype in frame.dtypes.items()}


def _read_table(path: Path, dtypes: dict) -> pd.DataFrame:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if list(table.column_names) != list(dtypes):
        raise ValueError(f"{path.name}: columns {table.column_names} differ from the entry's {list(dtypes)}")
    columns = {}
    for name, dtype in dtypes.items():
        column = table.column(name)
        if dtype == "object":  # lists stay lists, nulls stay None
            values = np.empty(len(column), dtype=object)
            values[:] = column.to_pylist()
            columns[name] = values
        else:
            columns[name] = column.to_pandas().astype(dtype)
    return pd.DataFrame(columns, columns=list(dtypes))


def _write_table(frame: pd.DataFrame, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path)


class DatasetCache:
    """`get(fmt, path, arguments, read)`: the cached Dataset for these files, or `read()` stored."""

    def __init__(self, root: Path | None = None, log: Callable[[str], None] | None = None):
        from recalign.progress import log as default_log

        self.root = root if root is not None else cache_root()
        self.log = log or default_log

    def get(self, fmt: str, path: Path, arguments: dict, read: Callable[[], Dataset]) -> Dataset:
        if self.root is None:
            return read()
        path = Path(path)
        entry = self.root / entry_key(fmt, path, arguments)
        sources = [file_identity(p) for p in source_files(path)]
        expected = {"format": CACHE_FORMAT, "reader": fmt, "reader_version": READER_VERSIONS.get(fmt, 0),
                    "sources": sources}
        if (entry / "entry.json").exists():
            dataset, problem = self._load(entry, expected)
            if dataset is not None:
                return dataset
            self.log(f"dataset cache: rebuilding {path} ({fmt}): {problem}")
        dataset = read()
        self._store(entry, expected, dataset)
        return dataset

    def _load(self, entry: Path, expected: dict) -> tuple[Dataset | None, str]:
        try:
            saved = json.loads((entry / "entry.json").read_text())
            for field, what in (("format", "cache format"), ("reader_version", "reader version")):
                if saved.get(field) != expected[field]:
                    return None, f"written with {what} {saved.get(field)!r}, now {expected[field]!r}"
            if saved.get("sources") != expected["sources"]:
                return None, "the source files changed (size, modification or change time, or content)"
            frames = {name: _read_table(entry / f"{name}.parquet", saved["dtypes"][name]) for name in _TABLES}
            ds = saved["dataset"]
            return Dataset(ds["name"], frames["interactions"], frames["items"], frames["users"],
                           ds["like_threshold"], ds["domain"], ds["source"], ds["meta"]), ""
        except Exception as exc:  # noqa: BLE001  any unreadable entry (truncated parquet, bad JSON) is rebuilt
            first = str(exc).splitlines()[0] if str(exc) else ""
            return None, f"unreadable entry ({type(exc).__name__}: {first[:120]})"

    def _store(self, entry: Path, expected: dict, dataset: Dataset) -> None:
        from recalign.io import atomic_dir

        frames = {"interactions": dataset.interactions, "items": dataset.items, "users": dataset.users}
        meta = {k: v for k, v in dataset.meta.items() if not k.startswith("_")}
        try:
            json.dumps(meta)
            if any(not isinstance(f.index, pd.RangeIndex) or f.index.start != 0 for f in frames.values()):
                raise ValueError("a table is not indexed 0..n-1")
            with atomic_dir(entry) as tmp:
                for name, frame in frames.items():
                    _write_table(frame, tmp / f"{name}.parquet")
                record = {**expected, "dtypes": {n: _dtypes(f) for n, f in frames.items()},
                          "dataset": {"name": dataset.name, "like_threshold": dataset.like_threshold,
                                      "domain": dataset.domain, "source": dataset.source, "meta": meta}}
                (tmp / "entry.json").write_text(json.dumps(record, indent=1))
        except Exception as exc:  # noqa: BLE001  a table parquet cannot hold (mixed types): served uncached
            self.log(f"dataset cache: not caching {dataset.name} ({type(exc).__name__}: {str(exc)[:120]})")
