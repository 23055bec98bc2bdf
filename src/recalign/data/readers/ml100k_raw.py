"""GroupLens MovieLens-100K raw files: `u.data`, `u.item`, `u.user` (as in ml-100k.zip)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from recalign.data.dataset import Dataset, Origin, build_dataset
from recalign.data.readers._common import (
    integer_column, only_interacted, present, read_columns, read_delimited, read_id_table, split_title_year,
)
from recalign.errors import InputError

# the 19 genre flags of u.item, in file order (u.genre)
GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
          "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
          "War", "Western"]
_RELEASE_YEAR = re.compile(r"^\d{1,2}-[A-Za-z]{3}-(\d{4})$")


def read_ml100k_raw(path: str | Path, name: str | None = None, like_threshold: float | None = None,
                    domain: str = "movie") -> Dataset:
    """GroupLens ML-100K raw: DIR with u.data (+ u.item, u.user), as in ml-100k.zip.

    u.data: user, item, rating, timestamp, tab-separated. u.item (latin-1, '|'-separated): id, "Title
    (year)", release date, video date, URL, 19 genre flags. u.user: id|age|gender|occupation|zip.

    `path` is the directory or its u.data file."""
    path = Path(path)
    directory = path.parent if path.is_file() else path
    data_path = path if path.is_file() else directory / "u.data"
    like_threshold = 3.0 if like_threshold is None else like_threshold

    interactions = read_id_table(data_path, "\t", 4, "latin-1", "u.data", {0: "user_id", 1: "item_id"},
                                 {2: ("rating", "rating"), 3: ("timestamp", "timestamp")})

    items = None
    item_path = directory / "u.item"
    if present(item_path):
        records = []
        for fields, line_no in zip(*read_delimited(item_path, "|", 5 + len(GENRES), "latin-1", "u.item")):
            flags = fields[5:]
            if any(flag not in ("0", "1") for flag in flags):
                raise InputError(f"{item_path}:{line_no}: genre flags must be 0 or 1, got {'|'.join(flags)}")
            title, year = split_title_year(fields[1])
            if np.isnan(year):  # fall back to the release date "01-Jan-1995"
                match = _RELEASE_YEAR.match(fields[2].strip())
                year = float(match.group(1)) if match else np.nan
            records.append({"item_id": fields[0].strip(), "title": title, "year": year,
                            "categories": [g for g, flag in zip(GENRES, flags) if flag == "1"]})
        items = only_interacted(pd.DataFrame(records), interactions)

    users = None
    user_path = directory / "u.user"
    if present(user_path):
        columns, line_nos = read_columns(user_path, "|", 5, "latin-1", "u.user")
        users = pd.DataFrame({
            "user_id": columns[0],
            "age": integer_column(columns[1], "age", user_path, line_nos, 0, 150),
            "gender": list(columns[2]),
            "occupation": list(columns[3]),
            "zip_code": list(columns[4]),
        })

    return build_dataset(name or directory.name, interactions, items, users, like_threshold, domain, str(directory),
                         Origin(str(data_path), "user id", "item id"))
