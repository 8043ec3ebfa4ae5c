"""The question a real provider's run asks on a terminal before its first topup: what will be
paid, from which wallet, approved by whom. `--yes` skips it; without a terminal (cron, CI)
and with the sandbox it is never asked."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from runner.config import Settings, target_of
from runner.errors import GuardRefused
from runner.money import format_amount
from runner.preflight import PreflightReport

YES = ("y", "yes")


def asks(settings: Settings, stdin: TextIO | None = None, stderr: TextIO | None = None) -> bool:
    """Whether this run asks: a real provider, no --yes, and a person at a terminal."""
    stdin, stderr = stdin or sys.stdin, stderr or sys.stderr
    if settings.is_sandbox or settings.yes:
        return False
    try:
        return stdin.isatty() and stderr.isatty()
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


def summary_lines(
    settings: Settings, rows: int, report: PreflightReport, run_key: str, approved: list[str]
) -> list[str]:
    total = report.total_amount
    fees = report.estimated_fees
    lines = [
        f"provider: {settings.provider} at {target_of(settings.provider, settings.base_url)}",
        f"run key: {run_key}",
        f"rows: {rows}, total {format_amount(total)}, estimated fees "
        + (format_amount(fees) if fees is not None else "unknown"),
    ]
    if report.wallet_balance is None:
        lines.append("wallet: not readable from this provider")
    else:
        after = report.wallet_balance - total - (fees or 0)
        lines.append(
            f"wallet: {format_amount(report.wallet_balance)} now, about "
            f"{format_amount(after)} after the run"
        )
    lines += approved or ["approvals: none"]
    if report.set_aside:
        lines.append(f"set aside by preflight: {len(report.set_aside)} rows")
    return lines


def confirm(
    lines: list[str],
    rows: int,
    *,
    progress: Any = None,
    ask: Callable[[str], str] | None = None,
    out: TextIO | None = None,
) -> None:
    """Show `lines` and ask; GuardRefused (exit 3) unless the answer is yes."""
    out = out or sys.stderr
    with _paused(progress):
        for line in lines:
            print(line, file=out)
        out.flush()
        try:
            answer = (ask or _read)(f"Send these {rows} topups? [y/N] ")
        except EOFError:
            answer = ""
    if answer.strip().lower() not in YES:
        raise GuardRefused(["not confirmed at the terminal"])


def _read(prompt: str) -> str:
    sys.stderr.write(prompt)
    sys.stderr.flush()
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line


@contextlib.contextmanager
def _paused(progress: Any) -> Iterator[None]:
    """A progress display stopped while the question is on the terminal."""
    pause = getattr(progress, "paused", None)
    if pause is None:
        yield
    else:
        with pause():
            yield
