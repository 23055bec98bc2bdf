"""The one in-memory dataset every method reads.

Readers (one per source format, in `readers/`) produce raw tables with string ids; `build_dataset`
turns them into a `Dataset` with dense integer ids. Ids are assigned by sorting the raw ids, never from
set or hash order, so the same files give the same ids on every run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from recalign.errors import InputError

INTERACTION_COLUMNS = ["user", "item", "rating", "timestamp"]


@dataclass
class Dataset:
    """Interactions plus item and user side tables.

    interactions: columns user, item (dense ints), rating (float), timestamp (int64), label (bool,
        rating > like_threshold); sorted by (user, timestamp), ties kept in input order.
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
        return {
            "name": self.name,
            "users": int(self.n_users),
            "items": int(self.n_items),
            "interactions": int(n),
            "positives": int(inter["label"].sum()),
            "like_threshold": float(self.like_threshold),
            "domain": self.domain,
            "density": float(n / max(1, self.n_users * self.n_items)),
            "rating_min": float(inter["rating"].min()) if n else None,
            "rating_max": float(inter["rating"].max()) if n else None,
            "first_timestamp": int(inter["timestamp"].min()) if n else None,
            "last_timestamp": int(inter["timestamp"].max()) if n else None,
            "user_features": [c for c in self.users.columns if c != "raw_id"],
        }

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


def build_dataset(
    name: str,
    interactions: pd.DataFrame,
    items: pd.DataFrame | None = None,
    users: pd.DataFrame | None = None,
    like_threshold: float = 3.0,
    domain: str = "movie",
    source: str = "",
) -> Dataset:
    """Remap raw string ids to dense ints and assemble a `Dataset`.

    interactions: columns user_id, item_id (str), rating (float), timestamp (int).
    items (optional): column item_id plus title, year, categories (any may be missing) and extra columns.
    users (optional): column user_id plus features.
    Items that appear in the item table but never in interactions stay in the catalogue.
    """
    if interactions.empty:
        raise InputError(f"{source or name}: no interactions")
    inter = interactions[["user_id", "item_id", "rating", "timestamp"]].copy()
    inter["user_id"] = inter["user_id"].astype(str)
    inter["item_id"] = inter["item_id"].astype(str)

    item_table = _normalise_items(items)
    # factorize once (hash), then rank the distinct raw ids in their sorted order
    user_codes, user_uniques = pd.factorize(inter["user_id"].to_numpy(dtype=object))
    item_codes, item_uniques = pd.factorize(inter["item_id"].to_numpy(dtype=object))
    user_ids = sorted(user_uniques.tolist(), key=_natural_key)
    item_ids = sorted(set(item_uniques.tolist()) | set(item_table["item_id"].unique().tolist()), key=_natural_key)
    user_table = users.copy() if users is not None else pd.DataFrame({"user_id": []})
    user_table["user_id"] = user_table["user_id"].astype(str)
    user_rank = {raw: k for k, raw in enumerate(user_ids)}
    item_rank = {raw: k for k, raw in enumerate(item_ids)}
    user_dense = np.fromiter((user_rank[raw] for raw in user_uniques), np.int64, len(user_uniques))[user_codes]
    item_dense = np.fromiter((item_rank[raw] for raw in item_uniques), np.int64, len(item_uniques))[item_codes]

    out = pd.DataFrame({
        "user": user_dense,
        "item": item_dense,
        "rating": inter["rating"].to_numpy(np.float64),
        "timestamp": inter["timestamp"].to_numpy(np.int64),
    })
    out = _sort_user_time(out)
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

    user_table = user_table.drop_duplicates("user_id", keep="first").set_index("user_id").reindex(user_ids)
    users_df = pd.DataFrame({"raw_id": user_ids})
    for column in user_table.columns:
        values = user_table[column]
        users_df[column] = values.to_numpy() if values.dtype != object else values.where(values.notna(), None).to_numpy()

    return Dataset(name, out, items_df, users_df, like_threshold, domain, source)


def _sort_user_time(frame: pd.DataFrame) -> pd.DataFrame:
    """Sort by (user, timestamp); np.lexsort is stable, so ties keep their input order."""
    order = np.lexsort((frame["timestamp"].to_numpy(), frame["user"].to_numpy()))
    return frame.iloc[order].reset_index(drop=True)


def _normalise_items(items: pd.DataFrame | None) -> pd.DataFrame:
    if items is None or items.empty:
        return pd.DataFrame({"item_id": pd.Series([], dtype=str), "title": [], "year": [], "categories": []})
    table = items.copy()
    table["item_id"] = table["item_id"].astype(str)
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
                   {"k_core": [k_user, k_item]})
