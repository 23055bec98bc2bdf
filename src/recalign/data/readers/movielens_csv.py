"""GroupLens MovieLens CSV releases (ml-latest-small, ml-latest, ml-20m, ml-25m, ml-32m): `ratings.csv` and
`movies.csv`, comma-separated with a header line, UTF-8; a title holding a comma is double-quoted."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from recalign.data.dataset import Dataset, Origin, build_dataset
from recalign.data.readers._common import (
    first_line_of, iter_lines, only_interacted, present, read_id_table, require_file, shown, split_title_year,
)
from recalign.data.readers.csv_table import quoted_fields
from recalign.errors import InputError

RATINGS_HEADER = ["userId", "movieId", "rating", "timestamp"]
MOVIES_HEADER = ["movieId", "title", "genres"]
NO_GENRES = "(no genres listed)"


def read_movielens_csv(path: str | Path, name: str | None = None, like_threshold: float | None = None,
                       domain: str = "movie") -> Dataset:
    """GroupLens MovieLens CSV: DIR with ratings.csv (+ movies.csv), as in ml-latest-small.zip or ml-25m.zip.

    ratings.csv: userId,movieId,rating,timestamp (half stars 0.5-5, Unix seconds); movies.csv:
    movieId,title,genres with "Title (Year)" and genres 'A|B'. `path` is the directory or its ratings.csv.
    tags.csv, links.csv and the genome files are not read."""
    path = Path(path)
    directory = path.parent if path.is_file() else path
    ratings_path = path if path.is_file() else directory / "ratings.csv"
    like_threshold = 3.0 if like_threshold is None else like_threshold

    _check_header(require_file(ratings_path, "ratings.csv"), RATINGS_HEADER)
    interactions = read_id_table(ratings_path, ",", 4, "utf-8", "ratings.csv", {0: "user_id", 1: "item_id"},
                                 {2: ("rating", "rating"), 3: ("timestamp", "timestamp")}, header=True)

    items = None
    movies_path = directory / "movies.csv"
    if present(movies_path):
        lines = iter_lines(require_file(movies_path, "movies.csv"))
        next(lines)  # iter_lines raises first when there is no line at all
        _check_header(movies_path, MOVIES_HEADER)
        records = []
        for line_no, line in lines:
            fields = quoted_fields(line, ",", movies_path, line_no)
            if len(fields) != 3:
                raise InputError(f"{movies_path}:{line_no}: expected 3 comma-separated fields (movieId,title,genres; "
                                 f"a title with a comma in double quotes), found {len(fields)}")
            title, year = split_title_year(fields[1])
            genres = [g for g in fields[2].strip().split("|") if g and g != NO_GENRES]
            records.append({"item_id": fields[0].strip(), "title": title, "year": year, "categories": genres})
        items = only_interacted(pd.DataFrame(records, columns=["item_id", "title", "year", "categories"]),
                                interactions)

    return build_dataset(name or directory.name, interactions, items, None, like_threshold, domain, str(directory),
                         Origin(str(ratings_path), "userId", "movieId"))


def _check_header(path: Path, expected: list[str]) -> None:
    found = [field.strip() for field in first_line_of(path).split(",")]
    if found != expected:
        raise InputError(f"{path}: the first line must be the header {','.join(expected)}, found "
                         f"{shown(','.join(found))}")
