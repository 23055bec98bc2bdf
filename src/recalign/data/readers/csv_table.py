"""Your own data as plain CSV/TSV tables with a header line: `interactions.csv` (+ `items.csv`, `users.csv`).

Columns are found by name (case-insensitive), so a file exported from a database or a notebook reads as it
is: the separator is told by the header line (tab, then ';', '|', else ','), cells may be double-quoted, and
extra columns are ignored (interactions) or kept as user features (users). The side tables are read whole, so
there a quoted cell may span lines (its line breaks read as spaces); an item or user listed twice with other
values is an error (an identical repeated row is read once)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from recalign.data.dataset import BLANKS, Dataset, Origin, build_dataset
from recalign.data.readers._common import (
    IdColumn, _blocks, _fast_block, _slow_block, iter_lines, numeric_column, only_interacted, present, require_file,
    split_title_year,
)
from recalign.errors import InputError

IMPLICIT_RATING = 5.0  # no rating column: every interaction is a positive
SUFFIXES = (".csv", ".tsv", ".csv.gz", ".tsv.gz")
COLUMNS = {  # role -> accepted header names, lower case
    "user": ("user_id", "userid", "user"),
    "item": ("item_id", "itemid", "item"),
    "rating": ("rating", "score"),
    "timestamp": ("timestamp", "time", "date", "datetime"),
    "title": ("title", "name"),
    "year": ("year",),
    "categories": ("categories", "genres", "category", "genre"),
}


def read_csv_tables(path: str | Path, name: str | None = None, like_threshold: float | None = None,
                    domain: str = "item") -> Dataset:
    """Plain tables: DIR with interactions.csv|tsv (+ items.csv|tsv, users.csv|tsv), or the interactions file.

    interactions: user_id, item_id (or userId/user, itemId/item), optional rating (else 5: all positives),
    optional timestamp (Unix seconds or an ISO date such as 2024-01-31 or 2024-01-31T12:00:00; else file
    order). items: item_id, title (or name), optional year, categories or genres ('|'-separated). users:
    user_id and any feature columns. The dataset is named after the directory, or after a file given by
    path that is not called interactions.*."""
    path = Path(path)
    directory = path.parent if path.is_file() else path
    inter_path = path if path.is_file() else _table(directory, "interactions", required=True)
    like_threshold = 3.0 if like_threshold is None else like_threshold
    stem = Path(inter_path.name.removesuffix(".gz")).stem
    name = name or (stem if path.is_file() and stem != "interactions" else directory.name)

    names, sep = table_header(inter_path)
    found = _roles(names, inter_path, ("user", "item"), ("rating", "timestamp"))
    user_ids, item_ids, ratings, stamps, lines, time_kinds = IdColumn(), IdColumn(), [], [], [], {}
    for columns, line_nos in table_blocks(inter_path, names, sep):
        user_ids.extend(columns[found["user"]])
        item_ids.extend(columns[found["item"]])
        if "rating" in found:
            ratings.append(numeric_column(columns[found["rating"]], names[found["rating"]], inter_path, line_nos))
        if "timestamp" in found:
            stamps.append(_times(columns[found["timestamp"]], names[found["timestamp"]], inter_path, line_nos,
                                 time_kinds))
        lines.append(line_nos)
    line_nos = np.concatenate(lines)
    interactions = pd.DataFrame({
        "user_id": user_ids.categorical(), "item_id": item_ids.categorical(),
        "rating": np.concatenate(ratings) if ratings else np.full(len(line_nos), IMPLICIT_RATING),
        "timestamp": np.concatenate(stamps) if stamps else np.arange(len(line_nos), dtype=np.int64),
        "line": line_nos})

    items = None
    item_path = _table(directory, "items")
    if item_path is not None:
        header, columns, line_nos = read_table(item_path)
        role = _roles(header, item_path, ("item",), ("title", "year", "categories"))
        columns, line_nos = _one_row_per_id(columns, line_nos, role["item"], "item", item_path)
        count = len(line_nos)
        titles = columns[role["title"]] if "title" in role else np.full(count, "", dtype=object)
        split = [split_title_year(t) for t in titles]
        years = (numeric_column(columns[role["year"]], header[role["year"]], item_path, line_nos)
                 if "year" in role else np.array([year for _, year in split], dtype=np.float64))
        categories = (columns[role["categories"]] if "categories" in role else np.full(count, "", dtype=object))
        items = only_interacted(pd.DataFrame({
            "item_id": columns[role["item"]],
            "title": [title for title, _ in split] if "year" not in role else list(titles),
            "year": years,
            "categories": [[c.strip() for c in cell.split("|") if c.strip()] for cell in categories],
        }), interactions)

    users = None
    user_path = _table(directory, "users")
    if user_path is not None:
        header, columns, line_nos = read_table(user_path)
        role = _roles(header, user_path, ("user",), ())
        columns, _ = _one_row_per_id(columns, line_nos, role["user"], "user", user_path)
        users = pd.DataFrame({"user_id": columns[role["user"]]})
        for index, column in enumerate(header):
            if index != role["user"] and column not in users:
                numbers = pd.to_numeric(pd.Series(columns[index]), errors="coerce")
                users[column] = numbers if numbers.notna().all() else columns[index]  # ages as numbers

    return build_dataset(name, interactions, items, users, like_threshold, domain,
                         str(directory), Origin(str(inter_path), "user", "item"))


def _one_row_per_id(columns: list[np.ndarray], line_nos: np.ndarray, key: int, what: str,
                    path: Path) -> tuple[list[np.ndarray], np.ndarray]:
    """A side table's rows with identical repeats read once; an id on two rows that differ is an error."""
    frame = pd.DataFrame(dict(enumerate(columns)))
    keep = ~frame.duplicated().to_numpy()
    ids = frame[key][keep]
    repeated = ids.duplicated().to_numpy()
    if repeated.any():
        row = int(np.argmax(repeated))
        first = int(np.argmax((ids == ids.iloc[row]).to_numpy()))
        lines = line_nos[keep]
        raise InputError(f"{path}:{lines[row]}: {what} {ids.iloc[row]!r} already listed on line {lines[first]} "
                         f"with other values; keep one row per {what}")
    return [column[keep] for column in columns], line_nos[keep]


def _table(directory: Path, stem: str, required: bool = False) -> Path | None:
    found = [directory / f"{stem}{suffix}" for suffix in SUFFIXES if present(directory / f"{stem}{suffix}")]
    if len(found) > 1:
        raise InputError(f"{directory}: several {stem} tables ({', '.join(p.name for p in found)}); keep one")
    if not found and required:
        raise InputError(f"{directory}: no interactions.csv or interactions.tsv (the csv format's main table)")
    return found[0] if found else None


def separator_of(header: str) -> str:
    for sep in ("\t", ";", "|"):
        if sep in header:
            return sep
    return ","


def table_header(path: Path) -> tuple[list[str], str]:
    """(column names, separator) from the table's first non-blank line; names must be distinct and non-empty."""
    line_no, text = next(iter_lines(require_file(path, "CSV table")))  # raises first on a file without data
    sep = separator_of(text)
    names = [name.strip(BLANKS) for name in quoted_fields(text, sep, path, line_no)]
    lowered = [name.lower() for name in names]
    if "" in names or len(set(lowered)) != len(lowered):
        raise InputError(f"{path}:{line_no}: the header needs distinct, non-empty column names, found "
                         f"{text.strip()[:80]!r}")
    return names, sep


def table_blocks(path: Path, names: list[str], sep: str,
                 multiline: bool = False) -> Iterator[tuple[list[np.ndarray], np.ndarray]]:
    """The rows after the header in blocks of (one array of stripped strings per column, line numbers), so a
    table of any size streams: blocks without a double quote go through pandas' C parser (`_common`), the
    others through the csv module. Every row has the header's width; a repeated header is an error.
    `multiline`: the table is read as one block, and a quoted cell may span lines (see `_quoted_block`)."""
    expected, lowered = len(names), [name.lower() for name in names]
    any_rows = False
    blocks = _blocks(path, header=True)
    if multiline:
        parts = list(blocks)
        blocks = [(parts[0][0], b"".join(data for _, data in parts))] if parts else []
    for first_line, data in blocks:
        if b'"' in data:
            block = _quoted_block(path, data, sep, expected, first_line, multiline)
        else:
            block = (_fast_block(data, sep, expected, "utf-8", first_line)
                     or _slow_block(path, data, sep, expected, "utf-8", first_line))
        columns, line_nos = block
        if not len(line_nos):
            continue
        repeated = np.logical_and.reduce([pd.Series(c).str.lower().to_numpy() == n for c, n in zip(columns, lowered)])
        if repeated.any():
            raise InputError(f"{path}:{line_nos[int(np.argmax(repeated))]}: header line repeated inside the data")
        any_rows = True
        yield columns, line_nos
    if not any_rows:
        raise InputError(f"{path}: a header but no data")


def read_table(path: Path) -> tuple[list[str], list[np.ndarray], np.ndarray]:
    """A small table (items, users) whole: (names, columns, line numbers); a quoted cell may span lines."""
    names, sep = table_header(path)
    blocks = list(table_blocks(path, names, sep, multiline=True))
    columns = [np.concatenate([b[0][c] for b in blocks]) for c in range(len(names))]
    return names, columns, np.concatenate([b[1] for b in blocks])


def _quoted_block(path: Path, data: bytes, sep: str, expected: int, first_line: int, multiline: bool):
    """A block holding a double quote, through the csv module; each row has the number of its first line.
    A quoted cell that spans lines is an error unless `multiline` (its line breaks then read as spaces)."""
    def lines():
        for offset, raw in enumerate(data.split(b"\n")):
            try:
                yield raw.decode("utf-8").rstrip("\r") + "\n"
            except UnicodeDecodeError as exc:
                raise InputError(f"{path}:{first_line + offset}: not valid utf-8 text (byte {exc.start} of the "
                                 f"line)") from None

    rows, line_nos = [], []
    reader, line_no = csv.reader(lines(), delimiter=sep, strict=True), first_line
    try:
        for fields in reader:
            start, line_no = line_no, first_line + reader.line_num
            if line_no - start > 1 and not multiline:
                raise InputError(f"{path}:{start}: a quoted cell runs on to line {line_no - 1}; newlines inside "
                                 f"cells are read only in items and users tables (or is a quote left open?)")
            if len(fields) <= 1 and not "".join(fields).strip():
                continue  # a blank line
            if len(fields) != expected:
                raise InputError(f"{path}:{start}: expected {expected} fields separated by {sep!r}, "
                                 f"found {len(fields)}")
            rows.append([_one_line(f) if "\n" in f else f.strip(BLANKS) for f in fields])
            line_nos.append(start)
    except csv.Error as exc:
        kind = "CSV" if sep == "," else "delimited"
        raise InputError(f"{path}:{line_no}: not a valid {kind} line ({exc})") from None
    columns = [np.array(column, dtype=object) for column in zip(*rows)] or [np.array([], dtype=object)] * expected
    return columns, np.asarray(line_nos, dtype=np.int64)


def _one_line(cell: str) -> str:
    return " ".join(part for part in (line.strip(BLANKS) for line in cell.split("\n")) if part)


def quoted_fields(line: str, sep: str, path: Path, line_no: int) -> list[str]:
    if '"' not in line:
        return line.split(sep)
    try:
        return next(csv.reader([line], delimiter=sep, strict=True))
    except csv.Error as exc:
        raise InputError(f"{path}:{line_no}: not a valid {'CSV' if sep == ',' else 'delimited'} line ({exc})") from None


def _roles(header: list[str], path: Path, required: tuple[str, ...], optional: tuple[str, ...]) -> dict[str, int]:
    """role -> column index, by the accepted names; a required role without a column is an error."""
    lowered = [name.lower() for name in header]
    found = {}
    for role in required + optional:
        matches = [i for i, name in enumerate(lowered) if name in COLUMNS[role]]
        if len(matches) > 1:
            raise InputError(f"{path}: columns {', '.join(header[i] for i in matches)} all name the {role}; keep one")
        if matches:
            found[role] = matches[0]
        elif role in required:
            raise InputError(f"{path}: no {role} column (one of {', '.join(COLUMNS[role])}; the header has "
                             f"{', '.join(header)})")
    return found


def _times(values: np.ndarray, column: str, path: Path, line_nos: np.ndarray, kinds: dict[str, int]) -> np.ndarray:
    """Unix seconds as numbers, or ISO dates/times (UTC unless they say otherwise) as Unix seconds; one of the
    two in a file. `kinds`: the line each kind was first seen on, kept across a file's blocks."""
    numeric = pd.to_numeric(pd.Series(values), errors="coerce").notna().to_numpy()
    dates = pd.Series(values[~numeric])
    try:
        parsed = pd.to_datetime(dates, format="ISO8601", utc=True, errors="coerce")
    except (ValueError, OverflowError):
        parsed = pd.Series(pd.NaT, index=dates.index)
    bad = parsed.isna().to_numpy()
    if bad.any():
        row = int(np.flatnonzero(~numeric)[np.argmax(bad)])
        raise InputError(f"{path}:{line_nos[row]}: column '{column}' is neither Unix seconds nor an ISO date "
                         f"(2024-01-31 or 2024-01-31T12:00:00): {values[row]!r}")
    for kind, rows in (("Unix seconds", numeric), ("ISO dates", ~numeric)):
        if rows.any():
            kinds.setdefault(kind, int(line_nos[np.argmax(rows)]))
    if len(kinds) == 2:
        seconds, iso = kinds["Unix seconds"], kinds["ISO dates"]
        raise InputError(f"{path}:{max(seconds, iso)}: column '{column}' mixes Unix seconds (line {seconds}) and "
                         f"ISO dates (line {iso}); use one")
    if numeric.all():
        return numeric_column(values, column, path, line_nos)
    return ((parsed - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)).to_numpy(np.int64)
