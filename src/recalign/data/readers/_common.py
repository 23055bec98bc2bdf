"""Helpers shared by the readers: strict line-oriented parsing with file:line errors."""

from __future__ import annotations

import errno
import gzip
import os
import re
import stat
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from recalign.data.dataset import BLANKS
from recalign.errors import InputError

_GZIP_MAGIC = b"\x1f\x8b"
_ARCHIVE_MAGIC = re.compile(rb"^(?:(?P<zip>PK\x03\x04)|(?P<xz>\xfd7zXZ\x00)|(?P<zstd>\x28\xb5\x2f\xfd)"
                            rb"|(?P<bzip2>BZh[1-9]))")
_TITLE_YEAR = re.compile(r"^(?P<title>.*?)\s*\((?P<year>\d{4})\)\s*(?P<rest>\([^()]*\))?\s*$")


def path_problem(path: Path) -> str | None:
    """Why `path` cannot be opened at all (not found, a broken or looping symbolic link, permission
    denied), or None when it can be stat'ed."""
    try:
        os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            return f"broken symbolic link (to {os.readlink(path)})"
        return "not found"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop"
        if exc.errno == errno.ENOTDIR:
            return "not found (a part of the path is a file, not a directory)"
        return (exc.strerror or str(exc)).lower()
    except ValueError:  # an embedded NUL in the path
        return "not a valid path"
    return None


def present(path: Path) -> bool:
    """An optional file is there when its name is, even as a broken link or a directory: reading it
    then says what is wrong instead of silently skipping it."""
    return os.path.lexists(path)


def require_usable(path: Path) -> None:
    """A dataset path that exists must be a readable directory or a regular file; the error says which
    of a broken or looping link, a pipe or device, or an unreadable directory it is instead."""
    problem = path_problem(path)
    if problem:
        raise InputError(f"{path}: {problem}")
    mode = os.stat(path).st_mode
    if stat.S_ISDIR(mode):
        try:
            os.listdir(path)
        except OSError as exc:
            raise InputError(f"{path}: cannot list the directory ({(exc.strerror or str(exc)).lower()})") from None
    elif not stat.S_ISREG(mode):
        raise InputError(f"{path}: not a regular file or a directory (a pipe, socket or device)")


def require_file(path: Path, what: str) -> Path:
    """`path` is a readable, non-empty regular file; else an error saying exactly what it is instead."""
    path = Path(path)
    problem = path_problem(path)
    if problem == "not found":
        raise InputError(f"{path}: {what} file not found")
    if problem:
        raise InputError(f"{path}: {problem}, expected the {what} file")
    mode = os.stat(path).st_mode
    if stat.S_ISDIR(mode):
        raise InputError(f"{path}: is a directory, expected the {what} file")
    if not stat.S_ISREG(mode):
        raise InputError(f"{path}: not a regular file (a pipe, socket or device), expected the {what} file")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise InputError(f"{path}: cannot read the {what} file ({(exc.strerror or str(exc)).lower()})") from None
    if os.stat(path).st_size == 0:
        raise InputError(f"{path}: {what} file is empty")
    return path


def _open_binary(path: Path):
    with open(path, "rb") as handle:
        magic = handle.read(6)
    if magic.startswith(_GZIP_MAGIC):
        return gzip.open(path, "rb")
    if path.name.endswith(".gz"):
        raise InputError(f"{path}: not gzip (the name ends in .gz but the file does not start with the gzip "
                         f"magic bytes 1f 8b)")
    archive = _ARCHIVE_MAGIC.match(magic)
    if archive:
        raise InputError(f"{path}: {archive.lastgroup}-compressed, not text; decompress it first "
                         f"(only gzip is read directly)")
    return open(path, "rb")


def _raw_lines(path: Path) -> Iterator[bytes]:
    """Byte lines of a plain or gzip file (streamed, so large files need not fit in memory)."""
    try:
        with _open_binary(path) as handle:
            first = handle.readline()
            yield first.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark is not data
            yield from handle
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise InputError(f"{path}: truncated or corrupt gzip file ({exc})") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({(exc.strerror or str(exc)).lower()})") from None


def iter_lines(path: Path, encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
    """(line number, text) for every non-blank line; gzip is detected by its magic bytes.

    A line that does not decode is reported with its line number."""
    any_data = False
    for line_no, raw in enumerate(_raw_lines(path), start=1):
        try:
            line = raw.decode(encoding).rstrip("\r\n")
        except UnicodeDecodeError as exc:
            raise InputError(f"{path}:{line_no}: not valid {encoding} text (byte {exc.start} of the line)") from None
        if line.strip():
            any_data = True
            yield line_no, line
    if not any_data:
        raise InputError(f"{path}: file has no data")


def read_lines(path: Path, encoding: str = "utf-8") -> list[str]:
    """All lines (blank ones included, so list index + 1 is the line number)."""
    data = b"".join(_raw_lines(path))
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        line_no = data.count(b"\n", 0, exc.start) + 1
        raise InputError(f"{path}:{line_no}: not valid {encoding} text") from None
    # "\n" only, as iter_lines: str.splitlines() also breaks at \x0b, \x1c, \x85... and shifts line numbers
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    if lines[-1] == "":
        lines.pop()
    if not any(line.strip() for line in lines):
        raise InputError(f"{path}: file has no data")
    return lines


def read_delimited(path: Path, sep: str, expected: int, encoding: str = "utf-8",
                   what: str = "") -> tuple[list[list[str]], np.ndarray]:
    """Split every non-blank line on `sep`; each must have exactly `expected` fields.

    Returns the rows and their line numbers."""
    rows, line_nos = [], []
    for line_no, line in iter_lines(require_file(path, what or "data"), encoding):
        fields = line.split(sep)
        if len(fields) != expected:
            raise InputError(
                f"{path}:{line_no}: expected {expected} fields separated by {sep!r}, found {len(fields)}"
            )
        rows.append(fields)
        line_nos.append(line_no)
    return rows, np.asarray(line_nos, dtype=np.int64)


def read_columns(path: Path, sep: str, expected: int, encoding: str = "utf-8",
                 what: str = "") -> tuple[list[np.ndarray], np.ndarray]:
    """`read_delimited` column-wise: (one array of stripped strings per column, line numbers).

    The file is read in blocks (`stream_columns`); for a large interaction file use `read_id_table`,
    which keeps ids as codes instead of one Python string per cell."""
    blocks = list(stream_columns(path, sep, expected, encoding, what))
    columns = [np.concatenate([b[0][c] for b in blocks]) for c in range(expected)]
    return columns, np.concatenate([b[1] for b in blocks])


BLOCK_BYTES = 1 << 24  # a block of whole lines parsed at once: bounds memory whatever the file's size


def _blocks(path: Path, header: bool = False) -> Iterator[tuple[int, bytes]]:
    """(number of the block's first line, bytes of whole lines), streamed from a plain or gzip file.
    `header`: the first non-blank line (a header the caller reads itself) is left out."""
    for first_line, data in _raw_blocks(path):
        while header and data:
            line, _, data = data.partition(b"\n")
            first_line += 1
            header = not line.strip()
        yield first_line, data


def _raw_blocks(path: Path) -> Iterator[tuple[int, bytes]]:
    try:
        with _open_binary(path) as handle:
            line_no, first = 1, True
            while data := handle.read(BLOCK_BYTES):
                if not data.endswith(b"\n"):
                    data += handle.readline()
                if first:
                    data, first = data.removeprefix(b"\xef\xbb\xbf"), False  # a byte-order mark is not data
                yield line_no, data
                line_no += data.count(b"\n")
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise InputError(f"{path}: truncated or corrupt gzip file ({exc})") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({(exc.strerror or str(exc)).lower()})") from None


def stream_columns(path: Path, sep: str, expected: int, encoding: str = "utf-8",
                   what: str = "", header: bool = False) -> Iterator[tuple[list[np.ndarray], np.ndarray]]:
    """Blocks of (one array of stripped strings per column, line numbers) of a `sep`-separated file.

    Each block goes through pandas' C parser when it is clean (every line has exactly `expected` fields, no
    blank line, no quoting); any other block through the line-by-line parser, which names file:line.
    `header`: the first non-blank line is a header (the caller checks it) and is skipped."""
    require_file(path, what or "data")
    any_data = False
    for first_line, data in _blocks(path, header):
        block = _fast_block(data, sep, expected, encoding, first_line)
        if block is None:
            block = _slow_block(path, data, sep, expected, encoding, first_line)
        if len(block[1]):
            any_data = True
            yield block
    if not any_data:
        raise InputError(f"{path}: file has no data")


def _slow_block(path: Path, data: bytes, sep: str, expected: int, encoding: str, first_line: int):
    rows, line_nos = [], []
    for offset, raw in enumerate(data.split(b"\n")):
        line_no = first_line + offset
        try:
            line = raw.decode(encoding).rstrip("\r\n")
        except UnicodeDecodeError as exc:
            raise InputError(f"{path}:{line_no}: not valid {encoding} text (byte {exc.start} of the line)") from None
        if not line.strip():
            continue
        rows.append(split_fields(line, sep, expected, path, line_no))
        line_nos.append(line_no)
    columns = [np.array([f.strip(BLANKS) for f in column], dtype=object) for column in zip(*rows)]
    return columns or [np.array([], dtype=object)] * expected, np.asarray(line_nos, dtype=np.int64)


def _fast_block(data: bytes, sep: str, expected: int, encoding: str, first_line: int):
    import csv
    import io

    token = sep.encode(encoding)
    if b"\x00" in data:
        return None  # the C parser's handling of NUL is its own; the line parser keeps every byte
    if sep != "\t":
        if b"\t" in data:
            return None
        data = data.replace(token, b"\t")
    lines = data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
    if not data.strip() or data.count(b"\t") != (expected - 1) * lines:
        return None  # a blank line, a short or long row: let the slow path say where
    try:
        frame = pd.read_csv(io.BytesIO(data), sep="\t", header=None, dtype=object, encoding=encoding,
                            na_filter=False, skip_blank_lines=False, engine="c", quoting=csv.QUOTE_NONE)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError):
        return None
    if frame.shape != (lines, expected):
        return None
    needs_strip = any(ch in data for ch in (b" ", b"\r", b"\x0b", b"\x0c"))
    columns = [(frame[c].str.strip(BLANKS) if needs_strip else frame[c]).to_numpy(dtype=object) for c in frame.columns]
    return columns, np.arange(first_line, first_line + lines, dtype=np.int64)


class IdColumn:
    """Ids appended in blocks (or one by one) and kept as int32 codes into the distinct values seen, so a
    column of 20M ids costs 80 MB plus its distinct strings instead of 20M Python strings."""

    def __init__(self):
        self._codes: list[np.ndarray] = []
        self._lookup: dict[str, int] = {}
        self._pending: list[str] = []

    def extend(self, values) -> None:
        codes, uniques = pd.factorize(np.asarray(values, dtype=object))
        lookup = self._lookup
        mapping = np.fromiter((lookup.setdefault(u, len(lookup)) for u in uniques.tolist()), np.int64, len(uniques))
        self._codes.append(mapping[codes].astype(np.int32))

    def append(self, value: str) -> None:
        self._pending.append(value)
        if len(self._pending) >= 65536:
            self.extend(self._pending)
            self._pending = []

    def categorical(self) -> pd.Categorical:
        if self._pending:
            self.extend(self._pending)
            self._pending = []
        codes = np.concatenate(self._codes) if self._codes else np.empty(0, np.int32)
        return pd.Categorical.from_codes(codes, categories=pd.Index(list(self._lookup), dtype=object))


def read_id_table(path: Path, sep: str, expected: int, encoding: str, what: str, ids: dict[int, str],
                  numbers: dict[int, tuple[str, str]], header: bool = False) -> pd.DataFrame:
    """An interaction file read in blocks into compact columns: `ids` {field index: column name} as
    categoricals (`IdColumn`), `numbers` {field index: (column name, the format's name for errors)} as
    float64, plus `line` (each row's line number). `header`: skip the first line (see `stream_columns`)."""
    id_columns = {name: IdColumn() for name in ids.values()}
    parts: dict[str, list[np.ndarray]] = {name: [] for name, _ in numbers.values()}
    line_parts = []
    for columns, line_nos in stream_columns(path, sep, expected, encoding, what, header):
        for index, name in ids.items():
            id_columns[name].extend(columns[index])
        for index, (name, label) in numbers.items():
            parts[name].append(numeric_column(columns[index], label, path, line_nos))
        line_parts.append(line_nos)
    out = {name: column.categorical() for name, column in id_columns.items()}
    out.update({name: np.concatenate(chunks) for name, chunks in parts.items()})
    out["line"] = np.concatenate(line_parts)
    return pd.DataFrame(out)


def to_float(value: str, path: Path, line_no: int, column: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{path}:{line_no}: column '{column}' is not a number: {value!r}") from None
    if not np.isfinite(out):
        raise InputError(f"{path}:{line_no}: column '{column}' is not a finite number: {value!r}")
    return out


def to_int(value: str, path: Path, line_no: int, column: str) -> int:
    number = to_float(value, path, line_no, column)
    return int(number)


def shown(value, limit: int = 60) -> str:
    """repr() for an error message, cut short; an int too long to print (Python's 4300-digit limit) too."""
    try:
        text = repr(value)
    except ValueError:
        return "an integer of thousands of digits"
    return text if len(text) <= limit else text[:limit] + "..."


def record_id(record: dict, key: str, path: Path, line_no: int, null: str = "null") -> str:
    """An id in a JSON or Python-literal record: a string or an integer of up to 64 bits. null, true, 1.5
    or a list would otherwise become ids such as "None" or "True"."""
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (str, int)) or (
            isinstance(value, int) and not -2 ** 63 <= value < 2 ** 64):
        raise InputError(f"{path}:{line_no}: '{key}' must be a string or an integer, "
                         f"got {null if value is None else shown(value)}")
    return str(value)


def split_fields(line: str, sep: str, expected: int, path: Path, line_no: int) -> list[str]:
    fields = line.split(sep)
    if len(fields) != expected:
        raise InputError(
            f"{path}:{line_no}: expected {expected} fields separated by {sep!r}, found {len(fields)}"
        )
    return fields


def numeric_column(values, column: str, path: Path, line_nos=None, first_line: int = 2) -> np.ndarray:
    """Parse a column of strings as float; the first bad cell is reported as file:line.

    `values` is a sequence or a DataFrame (then `column` selects it); `line_nos` gives each row's line
    number (default: consecutive lines from `first_line`)."""
    if isinstance(values, pd.DataFrame):
        values = values[column]
    series = pd.Series(values, dtype=object).reset_index(drop=True)
    try:
        out = series.to_numpy(dtype=object).astype(np.float64)  # fast path: Python's float() in C
    except (TypeError, ValueError):
        out = pd.to_numeric(series, errors="coerce").to_numpy(np.float64)
    bad = ~np.isfinite(out)
    if bad.any():
        row = int(np.argmax(bad))
        line_no = int(line_nos[row]) if line_nos is not None else row + first_line
        raise InputError(f"{path}:{line_no}: column '{column}' is not a number: {series.iloc[row]!r}")
    return out


def integer_column(values, column: str, path: Path, line_nos, low: int, high: int) -> np.ndarray:
    """`numeric_column` for whole numbers in low..high (ages, codes): int64, no silent wrap-around."""
    numbers = numeric_column(values, column, path, line_nos)
    bad = (numbers < low) | (numbers > high) | (numbers != np.floor(numbers))
    if bad.any():
        row = int(np.argmax(bad))
        raise InputError(f"{path}:{line_nos[row]}: column '{column}' must be a whole number in {low}..{high}, "
                         f"got {values[row]!r}")
    return numbers.astype(np.int64)


def split_title_year(title: str) -> tuple[str, float]:
    """"Toy Story (1995)" -> ("Toy Story", 1995.0); "X (1995) (V)" -> ("X (V)", 1995.0); else (title, NaN)."""
    title = str(title).strip()
    match = _TITLE_YEAR.match(title)
    if not match or not match.group("title"):
        return title, float("nan")
    rest = match.group("rest")
    clean = match.group("title") + (f" {rest}" if rest else "")
    return clean, float(match.group("year"))


def only_interacted(items: pd.DataFrame | None, interactions: pd.DataFrame) -> pd.DataFrame | None:
    """The catalogue is the set of items with at least one interaction: drop metadata of the others."""
    if items is None:
        return None
    return items[items["item_id"].isin(interactions["item_id"].unique())].reset_index(drop=True)


def first_line_of(path: Path) -> str:
    """The first non-blank line as text (for format sniffing); '' when there is none. A file that cannot
    be read (not gzip though named .gz, a directory, a dead link) is an error: it is what the user must fix."""
    for raw in _raw_lines(require_file(path, "dataset")):
        if raw.strip():
            return raw.decode("utf-8", "replace").strip()
    return ""
