"""The one in-memory dataset every method reads.

Readers (one per source format, in `readers/`) produce raw tables with string ids; `build_dataset`
turns them into a `Dataset` with dense integer ids. Ids are assigned by sorting the raw ids, never from
set or hash order, so the same files give the same ids on every run.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from recalign.errors import InputError

INTERACTION_COLUMNS = ["user", "item", "rating", "timestamp"]


@dataclass
class Dataset:
    """Interactions plus item and user side tables.

    interactions: columns user, item (dense ints), rating (float), timestamp (int64), label (bool,
        rating > like_threshold); sorted by (user, timestamp), ties kept in input order. No two rows are
        exact duplicates (`build_dataset` reads them once); a user may interact with an item more than once.
    items: indexed by dense item id; columns raw_id (str), title (str), year (float, NaN if unknown),
        categories (list[str]), plus any extra metadata a reader provides (author, publisher, brand,
        developer). Readers put only items with at least one interaction in the catalogue.
    users: indexed by dense user id; column raw_id plus whatever features the source has
        (e.g. age, gender, occupation).
    """

    name: str
    interactions: pd.DataFrame
    items: pd.DataFrame
    users: pd.DataFrame
    like_threshold: float = 3.0
    domain: str = "movie"
    source: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_items(self) -> int:
        return len(self.items)

    def title(self, item: int) -> str:
        """Display title: "Title (year)" when the year is known and not already in the title."""
        return self.titles()[item]

    def titles(self) -> list[str]:
        cached = self.meta.get("_titles")
        if cached is None:
            cached = [_display_title(t, y) for t, y in zip(self.items["title"], self.items["year"])]
            self.meta["_titles"] = cached
        return cached

    def stats(self) -> dict:
        inter = self.interactions
        n = len(inter)
        pairs = int((~inter.duplicated(["user", "item"])).sum())
        return {
            "name": self.name,
            "users": int(self.n_users),
            "items": int(self.n_items),
            "interactions": int(n),
            "positives": int(inter["label"].sum()),
            "like_threshold": float(self.like_threshold),
            "domain": self.domain,
            "density": float(pairs / max(1, self.n_users * self.n_items)),  # distinct (user, item) pairs
            "duplicates_dropped": int(self.meta.get("duplicates_dropped", 0)),
            "rating_min": float(inter["rating"].min()) if n else None,
            "rating_max": float(inter["rating"].max()) if n else None,
            "first_timestamp": int(inter["timestamp"].min()) if n else None,
            "last_timestamp": int(inter["timestamp"].max()) if n else None,
            "user_features": [c for c in self.users.columns if c != "raw_id"],
        }

    def fingerprint(self) -> str:
        """sha256 of what ids, labels and prompts are made of: the users' and items' raw ids, the titles and
        every interaction (dense ids, rating, time, label). A run records it (`dataset.json`, `metrics.json`)
        so that continuing or serving it on data that changed since -- even with the same sizes, which
        would silently map ids to other users and items -- is refused instead."""
        cached = self.meta.get("_fingerprint")
        if cached is None:
            digest = hashlib.sha256(f"{self.like_threshold!r}".encode())
            parts = (self.users["raw_id"], self.items["raw_id"], self.items["title"],
                     self.interactions[INTERACTION_COLUMNS + ["label"]])
            for part in parts:
                digest.update(pd.util.hash_pandas_object(part, index=False).to_numpy().tobytes())
            cached = self.meta["_fingerprint"] = digest.hexdigest()
        return cached

    def with_threshold(self, threshold: float) -> "Dataset":
        inter = self.interactions.copy()
        inter["label"] = inter["rating"] > threshold
        return Dataset(self.name, inter, self.items, self.users, threshold, self.domain, self.source, {})

    def subset_items(self, items: np.ndarray, name: str | None = None) -> "Dataset":
        """Keep only interactions with the given items; ids are NOT remapped (catalogue unchanged)."""
        keep = self.interactions["item"].isin(items)
        inter = self.interactions[keep].reset_index(drop=True)
        return Dataset(name or self.name, inter, self.items, self.users, self.like_threshold,
                       self.domain, self.source, {})


def _display_title(title: str, year) -> str:
    title = str(title).strip()
    if year is None or (isinstance(year, float) and np.isnan(year)):
        return title
    year_text = str(int(year))
    if title.endswith(f"({year_text})"):
        return title
    return f"{title} ({year_text})"


@dataclass(frozen=True)
class Origin:
    """Where a reader's interactions come from, for error messages: the file, and the names the format
    gives the user and item ids. With an Origin, `interactions` may carry a `line` column."""

    file: str
    user: str = "user_id"
    item: str = "item_id"


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # C0 controls and DEL: never part of a real id
BLANKS = " \t\r\n"  # what readers strip from ids: str.strip() would also eat \x1c-\x1f unseen
_INT64_LIMIT = 2.0 ** 63


def build_dataset(
    name: str,
    interactions: pd.DataFrame,
    items: pd.DataFrame | None = None,
    users: pd.DataFrame | None = None,
    like_threshold: float = 3.0,
    domain: str = "movie",
    source: str = "",
    origin: Origin | None = None,
) -> Dataset:
    """Remap raw string ids to dense ints and assemble a `Dataset`.

    interactions: columns user_id, item_id (str), rating (float), timestamp (number; whole seconds are
    kept), optionally line (each row's line number in `origin.file`).
    items (optional): column item_id plus title, year, categories (any may be missing) and extra columns.
    users (optional): column user_id plus features.
    Items that appear in the item table but never in interactions stay in the catalogue.

    Every reader goes through here, so this is where values are validated: ids are stripped and must be
    non-empty without control characters (a NUL would make a phantom item), ratings finite, timestamps
    integers within int64. A bad value is an `InputError` naming `file:line` (with `origin`) or the row.
    Exact duplicate interactions (same user, item, rating and timestamp) are read once, the first kept; their
    count is `meta["duplicates_dropped"]` (in `stats()`) and a log line.
    """
    where = origin.file if origin else (source or name)
    if interactions.empty:
        raise InputError(f"{where}: no interactions")
    lines = interactions["line"].to_numpy() if origin and "line" in interactions else None

    def at(row: int) -> str:
        return f"{where}:{lines[row]}" if lines is not None else f"{where}: row {row + 1}"

    item_table = _normalise_items(items)
    user_ids, user_dense = _dense_ids(interactions["user_id"], origin.user if origin else "user_id", at)
    item_ids, item_dense = _dense_ids(interactions["item_id"], origin.item if origin else "item_id", at,
                                      extra=item_table["item_id"].unique().tolist())
    ratings = interactions["rating"].to_numpy(np.float64)
    bad = ~np.isfinite(ratings)
    if bad.any():
        raise InputError(f"{at(int(np.argmax(bad)))}: rating is not a finite number: {ratings[bad][0]}")
    out = pd.DataFrame({
        "user": user_dense,
        "item": item_dense,
        "rating": ratings,
        "timestamp": _timestamps(interactions["timestamp"], at),
    })
    duplicate = out.duplicated().to_numpy()
    if duplicate.any():
        from recalign.progress import log

        log(f"{where}: {int(duplicate.sum())} exact duplicate interactions (same user, item, rating and time) "
            f"read once")
    out = _sort_user_time(out[~duplicate])
    out["label"] = out["rating"] > like_threshold

    # first row wins for duplicated ids; reindex keeps the sorted id order
    item_table = item_table.drop_duplicates("item_id", keep="first").set_index("item_id").reindex(item_ids)
    items_df = pd.DataFrame({"raw_id": item_ids})
    items_df["title"] = [t.strip() if isinstance(t, str) and t.strip() else f"item {raw}"
                         for t, raw in zip(item_table["title"], item_ids)]
    items_df["year"] = item_table["year"].to_numpy(np.float64)
    items_df["categories"] = [list(c) if isinstance(c, (list, tuple)) else [] for c in item_table["categories"]]
    for column in item_table.columns:  # extra metadata a reader provides (author, publisher, ...)
        if column not in items_df:
            items_df[column] = item_table[column].to_numpy()

    user_table = users.copy() if users is not None else pd.DataFrame({"user_id": []})
    user_table["user_id"] = user_table["user_id"].astype(str).str.strip()
    user_table = user_table.drop_duplicates("user_id", keep="first").set_index("user_id").reindex(user_ids)
    users_df = pd.DataFrame({"raw_id": user_ids})
    for column in user_table.columns:
        values = user_table[column]
        users_df[column] = values.to_numpy() if values.dtype != object else values.where(values.notna(), None).to_numpy()

    meta = {"duplicates_dropped": int(duplicate.sum())} if duplicate.any() else {}
    return Dataset(name, out, items_df, users_df, like_threshold, domain, source, meta)


def _dense_ids(values: pd.Series, column: str, at, extra=()) -> tuple[list[str], np.ndarray]:
    """(sorted distinct ids, dense id per row). Checked on the distinct values only, so a million rows
    cost a few thousand checks; `extra` ids (an item table's) join the sorted list unchecked."""
    if isinstance(values.dtype, pd.CategoricalDtype):  # a streamed reader's ids: codes, no string per row
        codes, used = pd.factorize(values.cat.codes.to_numpy())
        missing = used < 0
        if missing.any():
            raise InputError(f"{at(int(np.argmax(codes == int(np.argmax(missing)))))}: missing {column}")
        uniques = values.cat.categories.to_numpy(dtype=object)[used]
    else:
        raw = values.to_numpy(dtype=object)
        missing = pd.isna(raw)
        if missing.any():
            raise InputError(f"{at(int(np.argmax(missing)))}: missing {column}")
        codes, uniques = pd.factorize(raw)
    cleaned = []
    for k, value in enumerate(uniques.tolist()):
        text = str(value).strip(BLANKS)
        if control := _CONTROL.search(text):
            problem = f"{column} {text!r} contains the control character {control.group()!r}"
        elif not text.strip():
            problem = f"empty {column}"
        else:
            cleaned.append(text.strip())
            continue
        raise InputError(f"{at(int(np.argmax(codes == k)))}: {problem}")
    ids = sorted(set(cleaned) | set(extra), key=_natural_key)
    rank = {raw_id: k for k, raw_id in enumerate(ids)}
    return ids, np.fromiter((rank[text] for text in cleaned), np.int64, len(cleaned))[codes]


def _timestamps(values: pd.Series, at) -> np.ndarray:
    """int64 seconds; fractions are dropped, NaN, infinity and values beyond int64 are errors."""
    if values.dtype.kind == "i":
        return values.to_numpy(np.int64)
    try:
        stamps = values.to_numpy(np.float64)
    except (TypeError, ValueError, OverflowError):
        stamps = pd.to_numeric(values, errors="coerce").to_numpy(np.float64)
    bad = ~np.isfinite(stamps) | (np.abs(stamps) >= _INT64_LIMIT)
    if bad.any():
        row = int(np.argmax(bad))
        raise InputError(f"{at(row)}: timestamp is not an integer within 64 bits: {values.iloc[row]}")
    return stamps.astype(np.int64)


def _sort_user_time(frame: pd.DataFrame) -> pd.DataFrame:
    """Sort by (user, timestamp); np.lexsort is stable, so ties keep their input order."""
    order = np.lexsort((frame["timestamp"].to_numpy(), frame["user"].to_numpy()))
    return frame.iloc[order].reset_index(drop=True)


def _normalise_items(items: pd.DataFrame | None) -> pd.DataFrame:
    if items is None or items.empty:
        return pd.DataFrame({"item_id": pd.Series([], dtype=str), "title": [], "year": [], "categories": []})
    table = items.copy()
    table["item_id"] = table["item_id"].astype(str).str.strip()
    if "title" not in table:
        table["title"] = None
    if "year" not in table:
        table["year"] = np.nan
    table["year"] = pd.to_numeric(table["year"], errors="coerce")
    if "categories" not in table:
        table["categories"] = [[] for _ in range(len(table))]
    table["categories"] = [list(c) if isinstance(c, (list, tuple)) else [] for c in table["categories"]]
    extra = [c for c in table.columns if c not in ("item_id", "title", "year", "categories", "raw_id")]
    return table[["item_id", "title", "year", "categories", *extra]]


def _natural_key(raw: str):
    """Numeric ids sort numerically, others lexicographically after them; deterministic either way
    ("007" and "7" are distinct ids: the raw string breaks the tie)."""
    return (0, int(raw), raw) if raw.isascii() and raw.isdigit() else (1, 0, raw)


def k_core(ds: Dataset, k_user: int = 0, k_item: int = 0) -> Dataset:
    """Iteratively drop users with < k_user and items with < k_item interactions.

    Ids are remapped densely again (sorted by the old dense id, so the order is stable)."""
    for key, value in (("k_core_users", k_user), ("k_core_items", k_item)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise InputError(f"{key} must be an integer >= 0, got {value!r}")
    if k_user <= 1 and k_item <= 1:
        return ds
    inter = ds.interactions
    while True:
        user_counts = inter["user"].map(inter["user"].value_counts())
        item_counts = inter["item"].map(inter["item"].value_counts())
        keep = (user_counts >= k_user) & (item_counts >= k_item)
        if keep.all():
            break
        inter = inter[keep]
    if inter.empty:
        raise InputError(f"{ds.name}: k-core filter (users >= {k_user}, items >= {k_item}) removed every interaction")
    users = np.sort(inter["user"].unique())
    items = np.sort(inter["item"].unique())
    user_map = pd.Series(np.arange(len(users)), index=users)
    item_map = pd.Series(np.arange(len(items)), index=items)
    out = inter.copy()
    out["user"] = user_map.loc[out["user"]].to_numpy()
    out["item"] = item_map.loc[out["item"]].to_numpy()
    out = _sort_user_time(out)
    return Dataset(ds.name, out, ds.items.loc[items].reset_index(drop=True),
                   ds.users.loc[users].reset_index(drop=True), ds.like_threshold, ds.domain, ds.source,
                   {**{k: v for k, v in ds.meta.items() if not k.startswith("_")}, "k_core": [k_user, k_item]})
