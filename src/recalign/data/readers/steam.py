"""UCSD Steam (Kang & McAuley 2018): reviews and games files with one Python literal (dict) per line."""

from __future__ import annotations

import ast
import calendar
import re
from datetime import datetime
from pathlib import Path

from array import array

import numpy as np
import pandas as pd

from recalign.data.dataset import Dataset, Origin, build_dataset
from recalign.data.readers._common import IdColumn, iter_lines, only_interacted, present, record_id, require_file, shown
from recalign.errors import InputError

IMPLICIT_RATING = 5.0  # no ratings in Steam: a review is a positive at every like threshold below 5
REVIEW_KEYS = ("username", "product_id", "date")
_SUFFIXES = (".json", ".json.gz", ".txt", ".txt.gz")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def locate(path: Path) -> tuple[Path, Path | None]:
    """(reviews file, games file or None): a directory holding `*review*` and `*game*` files
    (.json/.json.gz/.txt[.gz]), or the reviews file with `steam_games.*` beside it."""
    def pick(files: list[Path], word: str, required: bool) -> Path | None:
        found = [p for p in files if word in p.name.lower()]
        if len(found) > 1:
            raise InputError(f"{path}: several {word} files ({', '.join(p.name for p in found)})")
        if not found and required:
            raise InputError(f"{path}: no Steam reviews file (a name containing 'review', .json or .json.gz)")
        return found[0] if found else None

    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.name.endswith(_SUFFIXES))
        return pick(files, "review", True), pick(files, "game", False)
    siblings = [path.parent / f"steam_games{suffix}" for suffix in _SUFFIXES]
    return path, next((p for p in siblings if present(p)), None)


def _literals(path: Path, required: tuple[str, ...]):
    for line_no, line in iter_lines(require_file(path, "Steam"), "utf-8"):
        try:
            record = ast.literal_eval(line.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError) as exc:
            reason = exc.msg if isinstance(exc, SyntaxError) else "not a Python literal"
            raise InputError(f"{path}:{line_no}: invalid Python literal ({reason})") from None
        if not isinstance(record, dict):
            raise InputError(f"{path}:{line_no}: expected a dict literal, got {type(record).__name__}")
        missing = [key for key in required if key not in record]
        if missing:
            raise InputError(f"{path}:{line_no}: missing key(s) {', '.join(missing)}")
        if any(line.count(f"'{key}'") > 1 for key in required):  # cheap pre-test; a dict keeps the last key
            keys = [k.value for k in ast.parse(line.strip(), mode="eval").body.keys if isinstance(k, ast.Constant)]
            repeated = [key for key in required if keys.count(key) > 1]
            if repeated:
                raise InputError(f"{path}:{line_no}: duplicate key '{repeated[0]}' (which value is meant?)")
        yield line_no, record


def _day(value, path: Path, line_no: int) -> int:
    try:
        text = str(value).strip()  # ValueError too for an int of over 4300 digits
        if not _DATE.match(text):
            raise ValueError
        return calendar.timegm(datetime.strptime(text, "%Y-%m-%d").timetuple())
    except ValueError:
        raise InputError(f"{path}:{line_no}: 'date' must be YYYY-MM-DD, got {shown(value)}") from None


def read_steam(path: str | Path, name: str | None = None, like_threshold: float | None = None,
               domain: str = "video game") -> Dataset:
    """UCSD Steam: DIR with *review*.json[.gz] (+ *game*.json[.gz]), one Python literal per line.

    Reviews: {'username', 'product_id', 'date': 'YYYY-MM-DD', ...}; games (optional): {'id', 'app_name'
    or 'title', 'genres' (else 'tags'), 'release_date', 'developer', ...}.

    No ratings: every review is an implicit positive (rating 5.0). Timestamp = the review day (UTC
    midnight); reviews of one user on one day keep file order. Games lines without an 'id' (or None) are
    skipped."""
    path = Path(path)
    reviews_path, games_path = locate(path)
    like_threshold = 3.0 if like_threshold is None else like_threshold

    users, items, stamps, lines = IdColumn(), IdColumn(), array("q"), array("q")
    for line_no, record in _literals(reviews_path, REVIEW_KEYS):
        users.append(record_id(record, "username", reviews_path, line_no, null="None"))
        items.append(record_id(record, "product_id", reviews_path, line_no, null="None"))
        stamps.append(_day(record["date"], reviews_path, line_no))
        lines.append(line_no)
    interactions = pd.DataFrame({"user_id": users.categorical(), "item_id": items.categorical(),
                                 "rating": IMPLICIT_RATING, "timestamp": np.frombuffer(stamps, dtype=np.int64),
                                 "line": np.frombuffer(lines, dtype=np.int64)})

    item_table = None
    if games_path is not None:
        records = []
        for line_no, record in _literals(games_path, ()):
            if record.get("id") is None:
                continue
            genres = record.get("genres") or record.get("tags") or []
            if not isinstance(genres, list):
                raise InputError(f"{games_path}:{line_no}: 'genres' must be a list, got {shown(genres)}")
            release = str(record.get("release_date", ""))
            records.append({
                "item_id": record_id(record, "id", games_path, line_no, null="None").strip(),
                "title": str(record.get("app_name") or record.get("title") or "").strip(),
                "year": float(release[:4]) if re.match(r"^\d{4}-", release) else float("nan"),
                "categories": [str(g) for g in genres],
                "developer": str(record.get("developer") or ""),
            })
        item_table = only_interacted(pd.DataFrame(records, columns=["item_id", "title", "year", "categories",
                                                                    "developer"]), interactions)

    return build_dataset(name or (path.name if path.is_dir() else reviews_path.name.split(".")[0]),
                         interactions, item_table, None, like_threshold, domain, str(reviews_path),
                         Origin(str(reviews_path), "username", "product_id"))
