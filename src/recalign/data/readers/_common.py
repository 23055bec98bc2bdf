"""Helpers shared by the readers: strict line-oriented parsing with file:line errors."""

from __future__ import annotations

from pathlib import Path

from recalign.errors import InputError


def require_file(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {what} file not found")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: {what} file is empty")
    return path


def read_lines(path: Path, encoding: str = "utf-8") -> list[str]:
    try:
        text = Path(path).read_text(encoding=encoding)
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not valid {encoding} text (byte {exc.start})") from None
    lines = text.splitlines()
    if not any(line.strip() for line in lines):
        raise InputError(f"{path}: file has no data")
    return lines


def to_float(value: str, path: Path, line_no: int, column: str) -> float:
    try:
        out = float(value)
    except ValueError:
        raise InputError(f"{path}:{line_no}: column '{column}' is not a number: {value!r}") from None
    if out != out:  # NaN
        raise InputError(f"{path}:{line_no}: column '{column}' is NaN")
    return out


def to_int(value: str, path: Path, line_no: int, column: str) -> int:
    number = to_float(value, path, line_no, column)
    return int(number)


def split_fields(line: str, sep: str, expected: int, path: Path, line_no: int) -> list[str]:
    fields = line.split(sep)
    if len(fields) != expected:
        raise InputError(
            f"{path}:{line_no}: expected {expected} fields separated by {sep!r}, found {len(fields)}"
        )
    return fields


def numeric_column(table, column: str, path: Path, first_line: int = 2):
    """Parse a whole string column as float; the first bad cell is reported as file:line."""
    import numpy as np
    import pandas as pd

    values = pd.to_numeric(table[column], errors="coerce").to_numpy(np.float64)
    bad = np.isnan(values)
    if bad.any():
        row = int(np.argmax(bad))
        raise InputError(
            f"{path}:{row + first_line}: column '{column}' is not a number: {table[column].iloc[row]!r}"
        )
    return values
