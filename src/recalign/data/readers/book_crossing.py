"""Book-Crossing (Ziegler et al. 2005): `BX-Book-Ratings.csv`, `BX-Books.csv`, `BX-Users.csv`;
';'-separated, every field double-quoted, latin-1."""

from __future__ import annotations

import csv
import html
import io
from pathlib import Path

import numpy as np
import pandas as pd

from recalign.data.dataset import BLANKS, Dataset, Origin, build_dataset
from recalign.data.readers._common import (
    _raw_lines, iter_lines, numeric_column, only_interacted, present, require_file,
)
from recalign.errors import InputError

RATINGS, BOOKS, USERS = "BX-Book-Ratings.csv", "BX-Books.csv", "BX-Users.csv"
DEFAULT_LIKE_THRESHOLD = 5.0  # ratings are 1..10; > 5 is a like (TALLRec's and CoLLM's convention)


def _read_csv(path: Path, required: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Columns by header name (stripped strings) and each row's line number; every row has the
    header's width.

    Not strict about quotes on purpose: BX-Books.csv has titles ending in a backslash before the
    closing quote (`...Readers)\\";"Author"`); read without an escape character they parse cleanly."""
    require_file(path, "Book-Crossing CSV")
    fast = _fast_read(path)
    if fast is not None and all(c in fast[0] for c in required):
        return fast
    header, rows, line_nos = _slow_read(path, required)
    return {name: np.array([row[k] for row in rows], dtype=object) for k, name in enumerate(header)}, line_nos


def _fast_read(path: Path):
    """pandas' C parser when every line is `"a";"b";...` with the header's width and no blank line."""
    data = b"".join(_raw_lines(path))
    lines = data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
    first = data.split(b"\n", 1)[0]
    width = first.count(b'";"') + 1
    if (data.count(b'";"') != (width - 1) * lines or data.count(b'"') != 2 * width * lines
            or b"\n\n" in data or b"\n\r\n" in data or not data.strip()):
        return None  # unquoted cells (NULL), blank lines, ragged rows: the csv module decides
    try:
        header = [h.strip() for h in next(csv.reader([first.decode("latin-1")], delimiter=";"))]
    except csv.Error:
        return None  # e.g. a carriage return inside the header line: the slow path names file:line
    if len(set(header)) != len(header):
        return None
    try:
        frame = pd.read_csv(io.BytesIO(data), sep=";", quotechar='"', dtype=str, encoding="latin-1",
                            na_filter=False, engine="c")
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError):
        return None
    frame.columns = [str(c).strip() for c in frame.columns]
    if frame.shape != (lines - 1, width) or len(set(frame.columns)) != width:
        return None
    if (frame.iloc[:, 0] == frame.columns[0]).any():
        return None  # a repeated header line
    padded = any(pattern in data for pattern in (b'" ', b' "', b'"\t', b'\t"'))  # spaces inside the quotes
    columns = {c: (frame[c].str.strip(BLANKS) if padded else frame[c]).to_numpy(dtype=object) for c in frame.columns}
    return columns, np.arange(2, lines + 1, dtype=np.int64)


def _slow_read(path: Path, required: list[str]) -> tuple[list[str], list[list[str]], np.ndarray]:
    lines = iter_lines(path, "latin-1")
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
            fields = [f.strip(BLANKS) for f in fields]
            if fields == header:
                raise InputError(f"{path}:{line_no}: header line repeated inside the data")
            if len(fields) != len(header):
                raise InputError(f"{path}:{line_no}: expected {len(header)} fields separated by ';', "
                                 f"found {len(fields)}")
            rows.append(fields)
            line_nos.append(line_no)
    except csv.Error as exc:
        raise InputError(f"{path}:{numbers[-1] if numbers else 1}: malformed CSV ({exc})") from None
    if not rows:
        raise InputError(f"{path}: header only, no rows")
    return header, rows, np.asarray(line_nos, dtype=np.int64)


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

    columns, line_nos = _read_csv(ratings_path, ["User-ID", "ISBN", "Book-Rating"])
    ratings = numeric_column(columns["Book-Rating"], "Book-Rating", ratings_path, line_nos)
    bad = (ratings < 0) | (ratings > 10)
    if bad.any():
        row = int(np.argmax(bad))
        raise InputError(f"{ratings_path}:{line_nos[row]}: column 'Book-Rating' must be in 0..10, "
                         f"got {columns['Book-Rating'][row]!r}")
    keep = ratings > 0 if not implicit else np.ones(len(ratings), dtype=bool)
    interactions = pd.DataFrame({
        "user_id": columns["User-ID"][keep],
        "item_id": pd.Series(columns["ISBN"][keep], dtype=object).str.upper().to_numpy(dtype=object),
        "rating": ratings[keep],
        "timestamp": line_nos[keep],
        "line": line_nos[keep],
    })
    if interactions.empty:
        raise InputError(f"{ratings_path}: no explicit ratings (1..10); implicit 0 ratings are dropped")

    item_table = None
    books_path = directory / BOOKS
    if present(books_path):
        columns, _ = _read_csv(books_path, ["ISBN", "Book-Title"])
        get = lambda c: columns.get(c, np.full(len(columns["ISBN"]), "", dtype=object))  # noqa: E731
        unescape = lambda values: [html.unescape(v) if "&" in v else v for v in values]  # noqa: E731
        years = pd.to_numeric(pd.Series(get("Year-Of-Publication")), errors="coerce")
        years = years.where((years >= 1000) & (years <= 2100))  # 0 and typos mean unknown
        item_table = pd.DataFrame({
            "item_id": pd.Series(get("ISBN"), dtype=object).str.upper().to_numpy(dtype=object),
            "title": [t.rstrip("\\").strip() for t in unescape(get("Book-Title"))],
            "year": years.to_numpy(np.float64),
            "author": unescape(get("Book-Author")),
            "publisher": unescape(get("Publisher")),
        })
        interactions = interactions[interactions["item_id"].isin(item_table["item_id"].unique())]
        interactions = interactions.reset_index(drop=True)
        if interactions.empty:
            raise InputError(f"{ratings_path}: no rated ISBN is listed in {books_path.name}")
        item_table = only_interacted(item_table, interactions)

    user_table = None
    users_path = directory / USERS
    if present(users_path):
        columns, _ = _read_csv(users_path, ["User-ID"])
        user_table = pd.DataFrame(columns).rename(columns={"User-ID": "user_id", "Location": "location", "Age": "age"})
        if "age" in user_table:
            age = pd.to_numeric(user_table["age"], errors="coerce")  # "NULL" -> NaN
            user_table["age"] = age.where((age >= 1) & (age <= 110))

    return build_dataset(name or directory.name, interactions, item_table, user_table, like_threshold, domain,
                         str(directory), Origin(str(ratings_path), "User-ID", "ISBN"))
