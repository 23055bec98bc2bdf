"""RecBole atomic files: `NAME.inter`, `NAME.item`, `NAME.user`, tab-separated with typed headers
(`user_id:token`, `rating:float`, `movie_title:token_seq`, ...)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from recalign.data.dataset import Dataset, build_dataset
from recalign.data.readers._common import numeric_column, read_lines, require_file
from recalign.errors import InputError

_TYPES = {"token", "token_seq", "float", "float_seq"}


def _read_atomic(path: Path, required: list[str]) -> pd.DataFrame:
    lines = read_lines(require_file(path, "RecBole atomic"))
    header = lines[0].split("\t")
    names = []
    for position, field in enumerate(header, start=1):
        name, _, kind = field.partition(":")
        if not name or kind not in _TYPES:
            raise InputError(
                f"{path}:1: header field {position} {field!r} is not 'name:type' with type in {sorted(_TYPES)}"
            )
        if name in names:
            raise InputError(f"{path}:1: duplicate column '{name}' in header")
        names.append(name)
    missing = [c for c in required if c not in names]
    if missing:
        raise InputError(f"{path}:1: missing column(s) {', '.join(missing)} (header has {', '.join(names)})")
    rows = []
    for line_no, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(names):
            raise InputError(f"{path}:{line_no}: expected {len(names)} tab-separated fields, found {len(fields)}")
        rows.append(fields)
    if not rows:
        raise InputError(f"{path}: header only, no rows")
    return pd.DataFrame(rows, columns=names)


def read_recbole(prefix: str | Path, name: str | None = None, like_threshold: float = 3.0,
                 domain: str = "movie") -> Dataset:
    """Read `PREFIX.inter` (+ optional `.item`, `.user`). PREFIX may be a directory `DIR` holding
    `DIR/<basename>.inter`."""
    prefix = Path(prefix)
    if prefix.is_dir():
        candidates = sorted(prefix.glob("*.inter"))
        if not candidates:
            raise InputError(f"{prefix}: no .inter file in this directory")
        prefix = candidates[0].with_suffix("")
    inter_path = prefix.with_suffix(".inter")
    raw = _read_atomic(inter_path, ["user_id", "item_id"])
    has_rating = "rating" in raw
    has_time = "timestamp" in raw
    empty = (raw["user_id"].str.strip() == "") | (raw["item_id"].str.strip() == "")
    if empty.any():
        raise InputError(f"{inter_path}:{int(np.argmax(empty.to_numpy())) + 2}: empty user_id or item_id")
    ratings = numeric_column(raw, "rating", inter_path) if "rating" in raw else np.full(len(raw), 5.0)
    stamps = (numeric_column(raw, "timestamp", inter_path).astype(np.int64) if "timestamp" in raw
              else np.arange(len(raw), dtype=np.int64))
    user_col, item_col = raw["user_id"].to_numpy(), raw["item_id"].to_numpy()
    interactions = pd.DataFrame({"user_id": user_col, "item_id": item_col, "rating": ratings, "timestamp": stamps})

    items = None
    item_path = prefix.with_suffix(".item")
    if item_path.exists():
        table = _read_atomic(item_path, ["item_id"])
        title_col = next((c for c in ("movie_title", "title", "book_title", "name") if c in table), None)
        year_col = next((c for c in ("release_year", "year", "publication_year") if c in table), None)
        cat_col = next((c for c in ("class", "genre", "categories", "category") if c in table), None)
        items = pd.DataFrame({"item_id": table["item_id"]})
        items["title"] = table[title_col] if title_col else None
        items["year"] = pd.to_numeric(table[year_col], errors="coerce") if year_col else np.nan
        items["categories"] = [v.split() for v in table[cat_col]] if cat_col else [[] for _ in range(len(table))]

    users = None
    user_path = prefix.with_suffix(".user")
    if user_path.exists():
        table = _read_atomic(user_path, ["user_id"])
        users = table.copy()
        if "age" in users:
            users["age"] = pd.to_numeric(users["age"], errors="coerce")

    return build_dataset(name or prefix.name, interactions, items, users, like_threshold, domain, str(prefix))
