"""Dataset names -> readers. `ml-100k` resolves to the embedded asset; a path uses a reader by format."""

from __future__ import annotations

import math
import os
from pathlib import Path

from recalign import assets
from recalign.data.cache import DatasetCache
from recalign.data.dataset import Dataset, k_core
from recalign.data.readers import READERS
from recalign.data.readers._common import first_line_of, present, require_usable
from recalign.errors import InputError

EMBEDDED = {"ml-100k": ("ml-100k", "ml-100k", "movie")}  # name -> (asset, file prefix, domain)

# file names that identify a format (checked in this order, in a directory or as the path itself)
_MARKERS = [("u.data", "ml-100k-raw"), ("ratings.dat", "ml-1m"), ("BX-Book-Ratings.csv", "book-crossing"),
            ("ratings.csv", "movielens-csv"), *((f"interactions{s}", "csv") for s in (".csv", ".tsv", ".csv.gz", ".tsv.gz"))]
_JSON_SUFFIXES = (".json", ".json.gz", ".jsonl", ".jsonl.gz")


def detect_format(path: Path) -> str:
    """Guess the reader from file names: *.inter -> recbole, u.data -> ml-100k-raw, ratings.dat -> ml-1m,
    BX-Book-Ratings.csv -> book-crossing, ratings.csv -> movielens-csv, interactions.csv|tsv -> csv, JSON lines -> amazon ('{"') or steam ("{'")."""
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    names = {p.name for p in files}
    if any(name.endswith(".inter") for name in names | {path.name}) or present(Path(f"{path}.inter")):
        return "recbole"
    for marker, fmt in _MARKERS:
        if marker in names:
            return fmt
    for candidate in files:
        if candidate.name.endswith(_JSON_SUFFIXES + (".txt", ".txt.gz")) and not candidate.name.startswith("meta_"):
            head = first_line_of(candidate).lstrip()
            if head.startswith("{'"):
                return "steam"
            if head.startswith('{"'):
                return "amazon"
    raise InputError(f"{path}: cannot tell the dataset format; pass --format (data.format) with one of "
                     f"{', '.join(READERS)}")


def canonical_dataset(name_or_path: str) -> str:
    """How a run records its dataset: an embedded name as given, a local path made absolute, so that the run
    is continued and served from any working directory however the path was spelt (./d, d/, /abs/d)."""
    if name_or_path in EMBEDDED:
        return name_or_path
    path = Path(name_or_path).expanduser()
    if present(path) or present(Path(f"{path}.inter")):
        return str(path.resolve())
    return name_or_path


def load_dataset(
    name_or_path: str,
    fmt: str | None = None,
    like_threshold: float | None = None,
    k_core_users: int = 0,
    k_core_items: int = 0,
    domain: str | None = None,
) -> Dataset:
    """Load a dataset by embedded name (`ml-100k`) or by path with a reader `fmt`.

    A path without `fmt` has its format detected from its file names (`detect_format`). The reader's
    result is cached as parquet (`data.cache`: rebuilt when the files or the reader version change).
    `like_threshold=None` uses the format's own default (Book-Crossing: 5 on its 1-10 scale, else 3)."""
    if fmt is not None and fmt not in READERS:
        raise InputError(f"unknown dataset format '{fmt}'; known formats: {', '.join(READERS)}")
    try:
        str(name_or_path).encode("utf-8")
    except UnicodeEncodeError:  # run records, logs and caches name the dataset in UTF-8 text
        shown = os.fsencode(str(name_or_path)).decode("utf-8", "backslashreplace")
        raise InputError(f"dataset {shown}: the path is not valid UTF-8; rename it") from None
    if like_threshold is not None and (isinstance(like_threshold, bool) or not isinstance(like_threshold, (int, float))
                                       or not math.isfinite(like_threshold)):
        raise InputError(f"like_threshold must be a number, got {like_threshold!r}")
    for key, value in (("k_core_users", k_core_users), ("k_core_items", k_core_items)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InputError(f"{key} must be an integer >= 0, got {value!r}")
    if domain is not None and (not isinstance(domain, str) or not domain.strip()):
        raise InputError(f"domain must be a non-empty string such as 'movie' or 'book', got {domain!r}")
    path = Path(name_or_path)
    # the bare name always means the embedded asset; write ./ml-100k for a local folder of that name
    if name_or_path in EMBEDDED and fmt in (None, "recbole"):
        asset, prefix, default_domain = EMBEDDED[name_or_path]
        directory = assets.fetch(asset)
        kwargs = {"name": name_or_path, "like_threshold": like_threshold, "domain": domain or default_domain}
        ds = DatasetCache().get("recbole", directory / prefix, kwargs,
                                lambda: READERS["recbole"](directory / prefix, **kwargs))
    else:
        if not present(path) and not present(Path(f"{path}.inter")):
            if name_or_path in EMBEDDED:
                raise InputError(f"'{name_or_path}' is an embedded dataset in RecBole format; --format {fmt} "
                                 f"(data.format) needs a path")
            known = ", ".join(sorted(EMBEDDED))
            raise InputError(f"unknown dataset '{name_or_path}': not an embedded name ({known}) and no such path")
        if present(path):
            require_usable(path)
        fmt = fmt or detect_format(path)
        kwargs = {"like_threshold": like_threshold}
        if domain:
            kwargs["domain"] = domain
        ds = DatasetCache().get(fmt, path, kwargs, lambda: READERS[fmt](path, **kwargs))
    return k_core(ds, k_core_users, k_core_items)
