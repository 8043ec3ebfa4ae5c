"""The live progress bar on a terminal: rows done, failed, pending, rate and ETA.

Only drawn when stderr is a terminal (or asked for); cron mail and log files get the JSON
lines alone, with no ANSI codes.
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from runner.domain import RowStatus


class LazyStderr:
    """Writes to whatever `sys.stderr` is now, so log lines go above a live progress bar."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


class NoProgress:
    """What a run reports to when nobody is watching."""

    def start(self, total: int, done: int) -> None:
        return None

    def row_final(self, status: RowStatus) -> None:
        return None

    def __enter__(self) -> NoProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class RichProgress:
    """A rich progress bar on stderr, counting rows as they reach a final status."""

    def __init__(self, label: str) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("ok {task.fields[ok]}  failed {task.fields[failed]}"),
            TextColumn("review {task.fields[review]}  pending {task.fields[pending]}"),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            redirect_stderr=True,
            redirect_stdout=False,
        )
        self._label = label
        self._task: TaskID | None = None
        self._counts: dict[str, int] = {"ok": 0, "failed": 0, "review": 0, "pending": 0}

    def __enter__(self) -> RichProgress:
        self._progress.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.__exit__(exc_type, exc, tb)

    def start(self, total: int, done: int) -> None:
        fields: dict[str, Any] = {"rate": "", **self._counts}
        self._task = self._progress.add_task(self._label, total=total, completed=done, **fields)

    def row_final(self, status: RowStatus) -> None:
        if self._task is None:
            return
        key = {
            RowStatus.SUCCEEDED: "ok",
            RowStatus.FAILED: "failed",
            RowStatus.NEEDS_REVIEW: "review",
            RowStatus.PENDING: "pending",
        }.get(status)
        if key is not None:
            self._counts[key] += 1
        fields: dict[str, Any] = dict(self._counts)
        self._progress.update(self._task, advance=1, **fields)
        speed = self._progress.tasks[self._task].speed
        self._progress.update(self._task, rate=f"{speed:.1f} rows/s" if speed else "")
