"""Amazon reviews 2018 (Ni et al.) and 2023 (Hou et al.): JSON-lines reviews + JSON-lines metadata, plain or gzip.

The two releases name their fields differently; each file's schema is told by its first record."""

from __future__ import annotations

import html
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from array import array

import numpy as np
import pandas as pd

from recalign.data.dataset import Dataset, Origin, build_dataset
from recalign.data.readers._common import (
    IdColumn, first_line_of, iter_lines, only_interacted, present, record_id, require_file, shown,
)
from recalign.errors import InputError

_SUFFIXES = (".json", ".json.gz", ".jsonl", ".jsonl.gz")
_DATE_YEAR = re.compile(r"^[A-Z][a-z]+ \d{1,2}, (\d{4})$")  # meta "date": "September 13, 2016"
_TAG = re.compile(r"<[^>]+>")
_ANY_YEAR = re.compile(r"\b(1[89]\d\d|20\d\d)\b")  # 2023 meta details["Date First Available"]: "March 10, 2015"


@dataclass(frozen=True)
class Schema:
    release: str
    user: str
    item: str  # 2023: parent_asin, the id its metadata and benchmark splits use (asin is one variant)
    rating: str
    time: str
    units_per_second: int  # 2023 timestamps are milliseconds (fractions of a second are dropped)
    meta_item: str
    meta_categories: str
    meta_brand: str


REVIEWS_2018 = Schema("2018", "reviewerID", "asin", "overall", "unixReviewTime", 1, "asin", "category", "brand")
REVIEWS_2023 = Schema("2023", "user_id", "parent_asin", "rating", "timestamp", 1000, "parent_asin", "categories",
                      "store")


def schema_of(path: Path) -> Schema:
    """2023 when the first record has the 2023 keys (`user_id`; metadata: `parent_asin` without `asin`), else 2018
    (whose key checks then name what is missing)."""
    try:
        first = json.loads(first_line_of(path))
    except (ValueError, RecursionError):
        return REVIEWS_2018
    if isinstance(first, dict) and ("user_id" in first or ("parent_asin" in first and "asin" not in first)):
        return REVIEWS_2023
    return REVIEWS_2018


def _is_json_file(path: Path) -> bool:
    return path.name.endswith(_SUFFIXES)  # by name only: a directory or dead link so named is reported


def _stem(path: Path) -> str:
    name = path.name
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def locate(path: Path) -> tuple[Path, Path | None]:
    """(reviews file, metadata file or None).

    A directory must hold exactly one reviews file (`*.json[l][.gz]` not starting with `meta_`) and at
    most one `meta_*.json[l][.gz]`. A reviews file `Books_5.json.gz` finds its metadata beside it as
    `meta_Books_5.*` or `meta_Books.*`."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if _is_json_file(p))
        reviews = [p for p in files if not p.name.startswith("meta_")]
        metas = [p for p in files if p.name.startswith("meta_")]
        if len(reviews) != 1:
            found = ", ".join(p.name for p in reviews) or "none"
            raise InputError(f"{path}: expected one Amazon reviews file (*.json, *.json.gz), found {found}")
        if len(metas) > 1:
            raise InputError(f"{path}: several metadata files ({', '.join(p.name for p in metas)})")
        return reviews[0], (metas[0] if metas else None)
    stem = _stem(path)
    for base in dict.fromkeys([stem, stem.removesuffix("_5")]):
        for suffix in _SUFFIXES:
            candidate = path.parent / f"meta_{base}{suffix}"
            if present(candidate):
                return path, candidate
    return path, None


def _records(path: Path, required: tuple[str, ...]):
    for line_no, line in iter_lines(require_file(path, "Amazon JSON lines"), "utf-8"):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{line_no}: invalid JSON (column {exc.colno}: {exc.msg})") from None
        except (ValueError, RecursionError) as exc:  # an integer of over 4300 digits, nesting too deep
            raise InputError(f"{path}:{line_no}: invalid JSON ({type(exc).__name__}: {exc})") from None
        if not isinstance(record, dict):
            raise InputError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
        missing = [key for key in required if key not in record]
        if missing:
            raise InputError(f"{path}:{line_no}: missing key(s) {', '.join(missing)}")
        if any(line.count(f'"{key}"') > 1 for key in required):  # cheap pre-test; json keeps the last silently
            json.loads(line, object_pairs_hook=lambda pairs: _unique_keys(pairs, required, path, line_no))
        yield line_no, record


def _unique_keys(pairs: list, keys: tuple[str, ...], path: Path, line_no: int) -> dict:
    seen = [key for key, _ in pairs]
    repeated = [key for key in keys if seen.count(key) > 1]
    if repeated:
        raise InputError(f"{path}:{line_no}: duplicate key '{repeated[0]}' (which value is meant?)")
    return dict(pairs)


def _number(record: dict, key: str, path: Path, line_no: int) -> float:
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InputError(f"{path}:{line_no}: '{key}' is not a number: {shown(value)}")
    try:
        number = float(value)
    except (ValueError, OverflowError):
        number = float("nan")
    if not math.isfinite(number):
        raise InputError(f"{path}:{line_no}: '{key}' is not a number: {shown(value)}")
    return number


def _clean(text) -> str:
    return " ".join(_TAG.sub(" ", html.unescape(str(text))).split())


def read_amazon(path: str | Path, name: str | None = None, like_threshold: float | None = None,
                domain: str = "product") -> Dataset:
    """Amazon reviews 2018 or 2023: DIR with X.json[l][.gz] (+ meta_X.json[l][.gz]) JSON lines, or the reviews file.

    2018 reviews: reviewerID, asin, overall, unixReviewTime; metadata (optional): asin, title, category
    (list), date ("September 13, 2016" gives the year), brand. 2023 reviews: user_id, parent_asin (the item),
    rating, timestamp (milliseconds, read as seconds); metadata: parent_asin, title, categories (list),
    store (as brand), details["Date First Available"] (the year).

    `path` is a directory holding `X.json[.gz]` and `meta_X.json[.gz]`, or the reviews file (metadata
    found beside it as `meta_X.*`, with a `_5` suffix dropped). Exact duplicate reviews (same user,
    item, rating and time) are read once, as in every reader (`build_dataset`)."""
    path = Path(path)
    reviews_path, meta_path = locate(path)
    like_threshold = 3.0 if like_threshold is None else like_threshold

    schema = schema_of(require_file(reviews_path, "Amazon JSON lines"))
    users, items, ratings, stamps, lines = IdColumn(), IdColumn(), array("d"), array("d"), array("q")
    for line_no, record in _records(reviews_path, (schema.user, schema.item, schema.rating, schema.time)):
        users.append(record_id(record, schema.user, reviews_path, line_no))
        items.append(record_id(record, schema.item, reviews_path, line_no))
        ratings.append(_number(record, schema.rating, reviews_path, line_no))
        stamps.append(_number(record, schema.time, reviews_path, line_no))
        lines.append(line_no)
    interactions = pd.DataFrame({"user_id": users.categorical(), "item_id": items.categorical(),
                                 "rating": np.frombuffer(ratings),
                                 "timestamp": np.frombuffer(stamps) / schema.units_per_second,
                                 "line": np.frombuffer(lines, dtype=np.int64)})

    item_table = None
    if meta_path is not None:
        wanted = set(interactions["item_id"].cat.categories)
        meta = schema_of(require_file(meta_path, "Amazon metadata"))
        if meta.release != schema.release:
            raise InputError(f"{meta_path}: metadata of the Amazon {meta.release} release beside reviews of the "
                             f"{schema.release} release ({reviews_path.name}); their item ids differ")
        records = []
        for line_no, record in _records(meta_path, (meta.meta_item,)):
            asin = record_id(record, meta.meta_item, meta_path, line_no).strip()
            if asin not in wanted:
                continue
            categories = record.get(meta.meta_categories) or []
            if not isinstance(categories, list):
                raise InputError(f"{meta_path}:{line_no}: '{meta.meta_categories}' must be a list, got "
                                 f"{shown(categories)}")
            records.append({
                "item_id": asin,
                "title": _clean(record.get("title") or ""),
                "year": _year(record, meta),
                "categories": list(dict.fromkeys(_clean(c) for c in categories if _clean(c))),
                "brand": _clean(record.get(meta.meta_brand) or ""),
            })
        item_table = only_interacted(pd.DataFrame(records, columns=["item_id", "title", "year", "categories",
                                                                    "brand"]), interactions)

    return build_dataset(name or _stem(reviews_path), interactions, item_table, None, like_threshold, domain,
                         str(reviews_path), Origin(str(reviews_path), schema.user, schema.item))


def _year(record: dict, meta: Schema) -> float:
    if meta.release == "2018":
        match = _DATE_YEAR.match(str(record.get("date", "")).strip())
    else:
        details = record.get("details")
        match = _ANY_YEAR.search(str(details.get("Date First Available", ""))) if isinstance(details, dict) else None
    return float(match.group(1)) if match else float("nan")
