"""Console output and progress bars (rich), all on stderr so stdout stays machine-readable."""

from __future__ import annotations

import os
from typing import Iterable, Iterator, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)
T = TypeVar("T")


def env_flag(name: str) -> bool:
    """An on/off environment variable: off when unset, empty, 0, false, no or off (any case)."""
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def quiet() -> bool:
    """RECALIGN_QUIET: no log lines or progress bars."""
    return env_flag("RECALIGN_QUIET")



def log(message: str) -> None:
    if not quiet():
        console.log(message)


def track(iterable: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """A progress bar over `iterable` (hidden when RECALIGN_QUIET=1)."""
    if quiet():
        yield from iterable
        return
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=total)
        for item in iterable:
            yield item
            progress.advance(task)
