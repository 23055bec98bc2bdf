"""GroupLens MovieLens-1M: `ratings.dat`, `movies.dat`, `users.dat`, all '::'-separated."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from recalign.data.dataset import Dataset, Origin, build_dataset
from recalign.data.readers._common import (
    integer_column, iter_lines, only_interacted, present, read_columns, read_id_table, require_file,
    split_title_year,
)
from recalign.errors import InputError

SEP = "::"
# users.dat occupation codes (ML-1M README)
OCCUPATIONS = ["other", "academic/educator", "artist", "clerical/admin", "college/grad student",
               "customer service", "doctor/health care", "executive/managerial", "farmer", "homemaker",
               "K-12 student", "lawyer", "programmer", "retired", "sales/marketing", "scientist",
               "self-employed", "technician/engineer", "tradesman/craftsman", "unemployed", "writer"]


def read_ml1m(path: str | Path, name: str | None = None, like_threshold: float | None = None,
              domain: str = "movie") -> Dataset:
    """GroupLens ML-1M: DIR with ratings.dat (+ movies.dat, users.dat), '::'-separated.

    ratings.dat: UserID::MovieID::Rating::Timestamp; movies.dat (latin-1): MovieID::Title (Year)::A|B;
    users.dat: UserID::Gender::Age::Occupation::Zip-code.

    `path` is the directory or its ratings.dat. Age stays the README's bucket code (1, 18, 25, ...);
    occupation codes become their names."""
    path = Path(path)
    directory = path.parent if path.is_file() else path
    ratings_path = path if path.is_file() else directory / "ratings.dat"
    like_threshold = 3.0 if like_threshold is None else like_threshold

    interactions = read_id_table(ratings_path, SEP, 4, "latin-1", "ratings.dat", {0: "user_id", 1: "item_id"},
                                 {2: ("rating", "Rating"), 3: ("timestamp", "Timestamp")})

    items = None
    movies_path = directory / "movies.dat"
    if present(movies_path):
        records = []
        for line_no, line in iter_lines(require_file(movies_path, "movies.dat"), "latin-1"):
            fields = line.split(SEP)
            if len(fields) < 3:
                raise InputError(f"{movies_path}:{line_no}: expected 3 fields separated by '::' "
                                 f"(MovieID::Title::Genres), found {len(fields)}")
            # a title containing '::' would split further: id first, genres last, the rest is the title
            title, year = split_title_year(SEP.join(fields[1:-1]))
            genres = [g for g in fields[-1].strip().split("|") if g and g != "(no genres listed)"]
            records.append({"item_id": fields[0].strip(), "title": title, "year": year, "categories": genres})
        items = only_interacted(pd.DataFrame(records), interactions)

    users = None
    users_path = directory / "users.dat"
    if present(users_path):
        columns, line_nos = read_columns(users_path, SEP, 5, "latin-1", "users.dat")
        codes = integer_column(columns[3], "Occupation", users_path, line_nos, 0, len(OCCUPATIONS) - 1)
        users = pd.DataFrame({
            "user_id": columns[0],
            "gender": list(columns[1]),
            "age": integer_column(columns[2], "Age", users_path, line_nos, 0, 150),
            "occupation": [OCCUPATIONS[c] for c in codes],
            "zip_code": list(columns[4]),
        })

    return build_dataset(name or directory.name, interactions, items, users, like_threshold, domain, str(directory),
                         Origin(str(ratings_path), "UserID", "MovieID"))
