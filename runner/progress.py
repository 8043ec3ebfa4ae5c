"""The live progress bar on a terminal: rows done, failed, pending, rate and ETA.

Only drawn when stderr is a terminal (or asked for); cron mail and log files get the JSON
lines alone, with no ANSI codes.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from types import TracebackType

from rich.console import Console, RenderableType
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


# What the bar needs besides its figures: the smallest bar worth drawing, and the width of
# each of its times (h:mm:ss, up to 99 hours) with the spaces between columns.
_MIN_BAR = 10
_TIME = 8


class RichProgress:
    """A rich progress bar on stderr, counting rows as they reach a final status.

    Made to fit an 80-column terminal whole: the bar takes the room the other columns leave,
    and the figures (ok, then failed, review and pending once there are any, and the rate)
    are shortened to fit before anything else would be cut, so the elapsed and remaining times
    are always whole. `console` and `get_time` are for tests.
    """

    def __init__(
        self,
        label: str,
        *,
        console: Console | None = None,
        get_time: Callable[[], float] | None = None,
    ) -> None:
        self._console = console or Console(stderr=True)
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=None),
            MofNCompleteColumn(),
            TextColumn("{task.fields[figures]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self._console,
            redirect_stderr=True,
            redirect_stdout=False,
            get_time=get_time,
            expand=True,
        )
        self._label = label
        self._task: TaskID | None = None
        self._total = 0
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

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The display stopped meanwhile: a question asked at the terminal stays readable."""
        self._progress.stop()
        try:
            yield
        finally:
            self._progress.start()

    def __rich__(self) -> RenderableType:
        """The bar as it is now, for any rich console to print."""
        return self._progress.get_renderable()

    def _figures(self, speed: float | None) -> str:
        """The counts and the rate, as long as the terminal leaves room for."""
        shown = [(name, n) for name, n in self._counts.items() if n or name == "ok"]
        long = " ".join(f"{name} {n}" for name, n in shown)
        short = " ".join(f"{name if name == 'ok' else name[0]} {n}" for name, n in shown)
        rate = f" {speed:.1f}/s" if speed else ""
        columns = 2 * len(str(self._total)) + 1
        room = self._console.width - len(self._label) - columns - 2 * _TIME - _MIN_BAR - 5
        for text in (long + rate, long, short + rate):
            if len(text) <= room:
                return text
        return short

    def start(self, total: int, done: int) -> None:
        self._total = total
        self._task = self._progress.add_task(
            self._label, total=total, completed=done, figures=self._figures(None)
        )

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
        self._progress.update(self._task, advance=1)
        speed = self._progress.tasks[self._task].speed
        self._progress.update(self._task, figures=self._figures(speed))
