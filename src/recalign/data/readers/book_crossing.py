"""Book-Crossing (Ziegler et al. 2005): `BX-Book-Ratings.csv`, `BX-Books.csv`, `BX-Users.csv`;
';'-separated, every field double-quoted, latin-1."""

from __future__ import annotations

import csv
import html
from pathlib import Path

import numpy as np
import pandas as pd

from recalign.data.dataset import Dataset, build_dataset
from recalign.data.readers._common import iter_lines, require_file
from recalign.errors import InputError

RATINGS, BOOKS, USERS = "BX-Book-Ratings.csv", "BX-Books.csv", "BX-Users.csv"
DEFAULT_LIKE_THRESHOLD = 5.0  # ratings are 1..10; > 5 is a like (TALLRec's and CoLLM's convention)


def _read_csv(path: Path, required: list[str]) -> tuple[list[str], list[list[str]], list[int]]:
    """Header, rows (stripped strings) and each row's line number; every row has the header's width.

    Not strict about quotes on purpose: BX-Books.csv has titles ending in a backslash before the
    closing quote (`...Readers)\\";"Author"`); read without an escape character they parse cleanly."""
    lines = iter_lines(require_file(path, "Book-Crossing CSV"), "latin-1")
    numbers: list[int] = []

    def text():
        for line_no, line in lines:
            numbers.append(line_no)
            yield line

    reader = csv.reader(text(), delimiter=";", quotechar='"')
    try:
        header = [h.strip() for h in next(reader)]
        missing = [c for c in required if c not in header]
        if missing:
            hint = " (is the file ';'-separated?)" if len(header) == 1 else ""
            raise InputError(f"{path}:{numbers[-1]}: missing column(s) {', '.join(missing)}{hint}")
        if len(set(header)) != len(header):
            raise InputError(f"{path}:{numbers[-1]}: duplicate column in header {header}")
        rows, line_nos = [], []
        for fields in reader:
            line_no = numbers[-1]
            if [f.strip() for f in fields] == header:
                raise InputError(f"{path}:{line_no}: header line repeated inside the data")
            if len(fields) != len(header):
                raise InputError(f"{path}:{line_no}: expected {len(header)} fields separated by ';', "
                                 f"found {len(fields)}")
            rows.append([f.strip() for f in fields])
            line_nos.append(line_no)
    except csv.Error as exc:
        raise InputError(f"{path}:{numbers[-1] if numbers else 1}: malformed CSV ({exc})") from None
    if not rows:
        raise InputError(f"{path}: header only, no rows")
    return header, rows, line_nos


def _isbn(value: str) -> str:
    return value.strip().upper()


def read_book_crossing(path: str | Path, name: str | None = None, like_threshold: float | None = None,
                       domain: str = "book", implicit: bool = False) -> Dataset:
    """Book-Crossing: DIR with BX-Book-Ratings.csv (+ BX-Books.csv, BX-Users.csv); ';'-separated, latin-1.

    Ratings: "User-ID";"ISBN";"Book-Rating"; books: ISBN, Book-Title, Book-Author, Year-Of-Publication,
    Publisher, ...; users: User-ID, Location, Age ("NULL" = unknown). Every field double-quoted.

    Rating 0 means "implicit" (no rating given): such rows are dropped unless `implicit=True`.
    No timestamps: `timestamp` is the row's line number, so time order = file order. With BX-Books.csv,
    ratings of ISBNs it lacks (no title) are dropped. Default like threshold 5 (rating > 5 of 10)."""
    path = Path(path)
    directory = path.parent if path.is_file() else path
    ratings_path = path if path.is_file() else directory / RATINGS
    like_threshold = DEFAULT_LIKE_THRESHOLD if like_threshold is None else like_threshold

    header, rows, line_nos = _read_csv(ratings_path, ["User-ID", "ISBN", "Book-Rating"])
    u, i, r = header.index("User-ID"), header.index("ISBN"), header.index("Book-Rating")
    users, items, ratings, stamps = [], [], [], []
    for fields, line_no in zip(rows, line_nos):
        try:
            rating = float(fields[r])
        except ValueError:
            raise InputError(f"{ratings_path}:{line_no}: column 'Book-Rating' is not a number: {fields[r]!r}") from None
        if not 0 <= rating <= 10:
            raise InputError(f"{ratings_path}:{line_no}: column 'Book-Rating' must be in 0..10, got {fields[r]!r}")
        if not fields[u] or not fields[i]:
            raise InputError(f"{ratings_path}:{line_no}: empty User-ID or ISBN")
        if rating == 0 and not implicit:
            continue
        users.append(fields[u])
        items.append(_isbn(fields[i]))
        ratings.append(rating)
        stamps.append(line_no)
    interactions = pd.DataFrame({"user_id": users, "item_id": items, "rating": ratings, "timestamp": stamps})
    if interactions.empty:
        raise InputError(f"{ratings_path}: no explicit ratings (1..10); implicit 0 ratings are dropped")

    item_table = None
    books_path = directory / BOOKS
    if books_path.exists():
        header, rows, line_nos = _read_csv(books_path, ["ISBN", "Book-Title"])
        col = {c: header.index(c) if c in header else None
               for c in ("ISBN", "Book-Title", "Book-Author", "Year-Of-Publication", "Publisher")}
        get = lambda fields, c: fields[col[c]] if col[c] is not None else ""  # noqa: E731
        years = pd.to_numeric(pd.Series([get(f, "Year-Of-Publication") for f in rows]), errors="coerce")
        years = years.where((years >= 1000) & (years <= 2100))  # 0 and typos mean unknown
        item_table = pd.DataFrame({
            "item_id": [_isbn(get(f, "ISBN")) for f in rows],
            "title": [html.unescape(get(f, "Book-Title")).rstrip("\\").strip() for f in rows],
            "year": years.to_numpy(np.float64),
            "author": [html.unescape(get(f, "Book-Author")) for f in rows],
            "publisher": [html.unescape(get(f, "Publisher")) for f in rows],
        })
        known = set(item_table["item_id"])
        interactions = interactions[interactions["item_id"].isin(known)].reset_index(drop=True)
        if interactions.empty:
            raise InputError(f"{ratings_path}: no rated ISBN is listed in {books_path.name}")
        item_table = item_table[item_table["item_id"].isin(set(interactions["item_id"]))]

    user_table = None
    users_path = directory / USERS
    if users_path.exists():
        header, rows, _ = _read_csv(users_path, ["User-ID"])
        user_table = pd.DataFrame(rows, columns=header).rename(columns={"User-ID": "user_id", "Location": "location",
                                                                        "Age": "age"})
        if "age" in user_table:
            age = pd.to_numeric(user_table["age"], errors="coerce")  # "NULL" -> NaN
            user_table["age"] = age.where((age >= 1) & (age <= 110))

    return build_dataset(name or directory.name, interactions, item_table, user_table, like_threshold, domain,
                         str(directory))
