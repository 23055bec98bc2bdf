"""RecBole atomic files: `NAME.inter`, `NAME.item`, `NAME.user`, tab-separated with typed headers
(`user_id:token`, `rating:float`, `movie_title:token_seq`, ...)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from recalign.data.dataset import Dataset, Origin, build_dataset
from recalign.data.readers._common import (
    iter_lines, numeric_column, only_interacted, present, require_file, split_title_year,
)
from recalign.errors import InputError

_TYPES = {"token", "token_seq", "float", "float_seq"}
IMPLICIT_RATING = 5.0  # an .inter file without a rating column: every interaction is a positive


def _read_atomic(path: Path, required: list[str]) -> tuple[pd.DataFrame, np.ndarray]:
    """The table (all strings) and each row's line number; the file is streamed line by line."""
    lines = iter_lines(require_file(path, "RecBole atomic"))
    header_no, header_text = next(lines)  # iter_lines skips blank lines and raises on a file without data
    header = header_text.split("\t")
    names = []
    for position, field in enumerate(header, start=1):
        name, _, kind = field.strip().partition(":")
        if not name or kind not in _TYPES:
            raise InputError(
                f"{path}:{header_no}: header field {position} {field!r} is not 'name:type' with type in "
                f"{sorted(_TYPES)} (is the file tab-separated?)"
            )
        if name in names:
            raise InputError(f"{path}:{header_no}: duplicate column '{name}' in header")
        names.append(name)
    missing = [c for c in required if c not in names]
    if missing:
        raise InputError(f"{path}:{header_no}: missing column(s) {', '.join(missing)} "
                         f"(header has {', '.join(names)})")
    columns: list[list[str]] = [[] for _ in names]
    line_nos = []
    for line_no, line in lines:
        if line == header_text:
            raise InputError(f"{path}:{line_no}: header line repeated inside the data")
        fields = line.split("\t")
        if len(fields) != len(names):
            raise InputError(f"{path}:{line_no}: expected {len(names)} tab-separated fields, found {len(fields)}")
        for column, value in zip(columns, fields):
            column.append(value)
        line_nos.append(line_no)
    if not line_nos:
        raise InputError(f"{path}: header only, no rows")
    return pd.DataFrame(dict(zip(names, columns)), columns=names), np.asarray(line_nos)


def _resolve_prefix(path: Path) -> Path:
    """DIR (holding one NAME.inter, or DIR/<DIR name>.inter), DIR/NAME.inter, or the prefix DIR/NAME."""
    if path.is_dir() and not path.name.endswith(".inter"):  # a directory named X.inter is no .inter file
        candidates = sorted(path.glob("*.inter"))
        if not candidates:
            raise InputError(f"{path}: no .inter file in this directory")
        own = path / f"{path.name}.inter"
        if own in candidates:
            chosen = own
        elif len(candidates) == 1:
            chosen = candidates[0]
        else:
            raise InputError(f"{path}: several .inter files ({', '.join(c.name for c in candidates)}); "
                             f"pass the one to read")
        return chosen.parent / chosen.name[: -len(".inter")]
    if path.name.endswith(".inter"):
        return path.parent / path.name[: -len(".inter")]
    return path


def read_recbole(prefix: str | Path, name: str | None = None, like_threshold: float | None = None,
                 domain: str = "movie") -> Dataset:
    """RecBole atomic files: NAME.inter (+ NAME.item, NAME.user), tab-separated with a typed header.

    `prefix` is DIR (holding NAME.inter), DIR/NAME.inter or DIR/NAME. Columns used: user_id, item_id,
    rating (optional: 5.0 when absent), timestamp (optional: file order when absent); item title from
    movie_title/title/book_title/name, year from release_year/year/publication_year, categories from
    class/genre/categories/category (space-separated token_seq); every user column is a feature."""
    prefix = _resolve_prefix(Path(prefix))
    like_threshold = 3.0 if like_threshold is None else like_threshold
    sibling = lambda suffix: prefix.parent / f"{prefix.name}{suffix}"  # noqa: E731  (names may hold dots)
    inter_path = sibling(".inter")
    raw, line_nos = _read_atomic(inter_path, ["user_id", "item_id"])
    ratings = (numeric_column(raw["rating"], "rating", inter_path, line_nos) if "rating" in raw
               else np.full(len(raw), IMPLICIT_RATING))
    stamps = (numeric_column(raw["timestamp"], "timestamp", inter_path, line_nos)
              if "timestamp" in raw else np.arange(len(raw), dtype=np.int64))
    interactions = pd.DataFrame({"user_id": raw["user_id"].to_numpy(), "item_id": raw["item_id"].to_numpy(),
                                 "rating": ratings, "timestamp": stamps, "line": line_nos})

    items = None
    item_path = sibling(".item")
    if present(item_path):
        table, _ = _read_atomic(item_path, ["item_id"])
        title_col = next((c for c in ("movie_title", "title", "book_title", "name") if c in table), None)
        year_col = next((c for c in ("release_year", "year", "publication_year") if c in table), None)
        cat_col = next((c for c in ("class", "genre", "categories", "category") if c in table), None)
        items = pd.DataFrame({"item_id": table["item_id"].str.strip()})
        titles = table[title_col].tolist() if title_col else [None] * len(table)
        years = (pd.to_numeric(table[year_col], errors="coerce").to_numpy(np.float64, copy=True) if year_col
                 else np.full(len(table), np.nan))
        # a title that still carries "(YYYY)" while the year cell is unusable (ML-100K item 1412: year "V")
        for i, title in enumerate(titles):
            if isinstance(title, str) and np.isnan(years[i]):
                titles[i], years[i] = split_title_year(title)
        items["title"] = titles
        items["year"] = years
        items["categories"] = [v.split() for v in table[cat_col]] if cat_col else [[] for _ in range(len(table))]
        items = only_interacted(items, interactions)

    users = None
    user_path = sibling(".user")
    if present(user_path):
        users, _ = _read_atomic(user_path, ["user_id"])
        users["user_id"] = users["user_id"].str.strip()
        if "age" in users:
            users["age"] = pd.to_numeric(users["age"], errors="coerce")

    return build_dataset(name or prefix.name, interactions, items, users, like_threshold, domain, str(prefix),
                         Origin(str(inter_path)))
