"""Reader caches (data.cache) and streamed reading: a hit equals a fresh read; touched files, another reader
version and a corrupt entry are rebuilt with a log line; blocks give the same dataset as one read."""

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recalign.data import cache as cache_mod
from recalign.data import load_dataset
from recalign.data.cache import DatasetCache
from recalign.data.readers import READERS
from recalign.data.readers import _common
from recalign.errors import InputError


def _ml1m(directory, n_users=30, n_items=12, seed=0):
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    rows = [f"{u}::{i}::{rng.integers(1, 6)}::{978300000 + 7 * k}"
            for k, (u, i) in enumerate((u, i) for u in range(1, n_users + 1)
                                       for i in rng.choice(np.arange(1, n_items + 1), 5, replace=False))]
    (directory / "ratings.dat").write_text("\n".join(rows) + "\n", encoding="latin-1")
    (directory / "movies.dat").write_text("".join(f"{i}::Movie {i} (199{i % 10})::Drama|Comedy\n"
                                                  for i in range(1, n_items + 1)), encoding="latin-1")
    (directory / "users.dat").write_text("".join(f"{u}::{'MF'[u % 2]}::25::{u % 21}::0{u:04d}\n"
                                                 for u in range(1, n_users + 1)), encoding="latin-1")
    return directory


def _equal(a, b):
    for table in ("interactions", "items", "users"):
        pd.testing.assert_frame_equal(getattr(a, table), getattr(b, table))
    assert (a.name, a.like_threshold, a.domain, a.source) == (b.name, b.like_threshold, b.domain, b.source)


class Counting:
    def __init__(self, path):
        self.path, self.calls = path, 0

    def __call__(self):
        self.calls += 1
        return READERS["ml-1m"](self.path)


def test_hit_returns_an_equal_dataset_without_reading(tmp_path):
    data = _ml1m(tmp_path / "ml")
    logs = []
    cache = DatasetCache(tmp_path / "cache", logs.append)
    read = Counting(data)
    first = cache.get("ml-1m", data, {}, read)
    second = cache.get("ml-1m", data, {}, read)
    assert read.calls == 1 and not logs
    _equal(first, second)
    _equal(second, READERS["ml-1m"](data))
    assert second.items["categories"][0] == ["Drama", "Comedy"]  # lists come back as lists
    relative = Path(os.path.relpath(data))  # the same files spelt another way: the same entry, no rebuild
    cache.get("ml-1m", relative, {}, read)
    cache.get("ml-1m", Path(str(data) + "/"), {}, read)
    assert read.calls == 1 and not logs


def test_touched_or_edited_source_file_is_rebuilt(tmp_path):
    data = _ml1m(tmp_path / "ml")
    logs = []
    cache = DatasetCache(tmp_path / "cache", logs.append)
    read = Counting(data)
    cache.get("ml-1m", data, {}, read)
    stat = os.stat(data / "movies.dat")
    os.utime(data / "movies.dat", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))  # touched
    cache.get("ml-1m", data, {}, read)
    assert read.calls == 2 and "source files changed" in logs[-1]
    # same size and modification time, other content: the content hash tells
    text = (data / "movies.dat").read_text(encoding="latin-1").replace("Movie 1 ", "Film 1 ")
    stat = os.stat(data / "movies.dat")
    (data / "movies.dat").write_text(text, encoding="latin-1")
    os.utime(data / "movies.dat", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    fresh = cache.get("ml-1m", data, {}, read)
    assert read.calls == 3 and len(logs) == 2 and fresh.items["title"][0] == "Film 1"
    # a same-size edit past the hashed head and tail, its mtime set back (cp -p, rsync -a): ctime tells
    big = data / "ratings.dat"
    head = b"1::1::5::978300000\n"
    big.write_bytes(head + b"#" * (3 << 20) + b"\n" + head)  # hashed: the first and last MiB only
    cache.get("ml-1m", data, {}, lambda: fresh)  # stored as is (the bytes need not parse)
    stat = os.stat(big)
    raw = bytearray(big.read_bytes())
    raw[len(raw) // 2] = ord("$")
    big.write_bytes(bytes(raw))
    os.utime(big, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(big).st_size == stat.st_size and os.stat(big).st_ctime_ns != stat.st_ctime_ns
    calls = []
    cache.get("ml-1m", data, {}, lambda: calls.append(1) or fresh)
    assert calls == [1] and "source files changed" in logs[-1]


def test_other_reader_version_is_rebuilt(tmp_path, monkeypatch):
    data = _ml1m(tmp_path / "ml")
    logs = []
    cache = DatasetCache(tmp_path / "cache", logs.append)
    read = Counting(data)
    cache.get("ml-1m", data, {}, read)
    monkeypatch.setitem(cache_mod.READER_VERSIONS, "ml-1m", cache_mod.READER_VERSIONS["ml-1m"] + 1)
    cache.get("ml-1m", data, {}, read)
    assert read.calls == 2 and "reader version" in logs[-1]
    cache.get("ml-1m", data, {}, read)
    assert read.calls == 2  # the rebuilt entry is used


def test_corrupt_entry_is_rebuilt_with_a_log_line(tmp_path):
    data = _ml1m(tmp_path / "ml")
    logs = []
    cache = DatasetCache(tmp_path / "cache", logs.append)
    read = Counting(data)
    first = cache.get("ml-1m", data, {}, read)
    (entry,) = (tmp_path / "cache").iterdir()
    parquet = entry / "interactions.parquet"
    parquet.write_bytes(parquet.read_bytes()[: parquet.stat().st_size // 2])  # truncated
    again = cache.get("ml-1m", data, {}, read)
    assert read.calls == 2 and len(logs) == 1 and "unreadable entry" in logs[0]
    _equal(first, again)
    (entry / "entry.json").write_text("{not json")
    cache.get("ml-1m", data, {}, read)
    assert read.calls == 3 and "unreadable entry" in logs[-1]


def test_load_dataset_uses_the_cache_and_env_turns_it_off(tmp_path, monkeypatch):
    data = _ml1m(tmp_path / "ml")
    monkeypatch.setenv("RECALIGN_DATA_CACHE", str(tmp_path / "cache"))
    a = load_dataset(str(data))
    assert len(list((tmp_path / "cache").iterdir())) == 1
    _equal(a, load_dataset(str(data)))
    monkeypatch.setenv("RECALIGN_DATA_CACHE", "off")
    load_dataset(str(data), like_threshold=4.0)  # another key, but the cache is off: nothing written
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_blocks_give_the_same_dataset_and_errors_keep_their_line(tmp_path, monkeypatch):
    data = _ml1m(tmp_path / "ml", n_users=40)
    whole = READERS["ml-1m"](data)
    monkeypatch.setattr(_common, "BLOCK_BYTES", 100)  # ~5 lines per block
    _equal(whole, READERS["ml-1m"](data))
    lines = (data / "ratings.dat").read_text(encoding="latin-1").splitlines()
    lines[136] = lines[136].replace("::", ":: ::", 1)  # a 5-field line deep in the file
    lines[60] = ""  # a blank line in an earlier block: skipped, numbering kept
    (data / "ratings.dat").write_text("\n".join(lines) + "\n", encoding="latin-1")
    with pytest.raises(InputError, match=r"ratings.dat:137: expected 4 fields"):
        READERS["ml-1m"](data)
