"""A progress bar for long loops (rich), silent when disabled or when output is not a terminal."""

from __future__ import annotations

import sys
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def track(items: Iterable[T], *, description: str = "", enabled: bool = True, total: int | None = None) -> Iterator[T]:
    if not enabled:
        yield from items
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with Progress(*columns, transient=not sys.stderr.isatty()) as bar:
        task = bar.add_task(description, total=total if total is not None else _len(items))
        for item in items:
            yield item
            bar.advance(task)


def _len(items) -> int | None:
    try:
        return len(items)  # type: ignore[arg-type]
    except TypeError:
        return None
