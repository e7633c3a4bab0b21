"""Progress reporting for long stages: rich bars on a terminal, nothing in tests.

A stage asks `progress.task(description, total)` for a context manager that yields
`advance(n)`; `total=None` shows a spinner with elapsed time (trtllm-build gives no fraction).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress

Advance = Callable[[int], None]


class Progress:
    """Reports nothing; the base for `RichProgressReporter` and what tests pass."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console

    def line(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text, highlight=False)

    @contextlib.contextmanager
    def task(
        self, description: str, total: int | None, unit_bytes: bool = False
    ) -> Iterator[Advance]:
        yield lambda _n: None


class RichProgressReporter(Progress):
    def __init__(self, console: Console) -> None:
        super().__init__(console)

    @contextlib.contextmanager
    def task(
        self, description: str, total: int | None, unit_bytes: bool = False
    ) -> Iterator[Advance]:
        counter = DownloadColumn() if unit_bytes else MofNCompleteColumn()
        columns = (
            [SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn()]
            if total is None
            else [
                TextColumn("  {task.description}"),
                BarColumn(),
                counter,
                TimeElapsedColumn(),
                TimeRemainingColumn(),
            ]
        )
        with RichProgress(*columns, console=self.console, transient=True) as bar:
            task_id = bar.add_task(description, total=total)
            yield lambda n: bar.advance(task_id, n)
