"""How a command talks and ends: one line per message (a JSON object when no one reads a
terminal), the runner's errors as the contract's exit codes, and a run's exit told to its
metrics file and notification targets, whatever the exit.

Only `RunnerError` is an expected failure. Anything else is a bug, reported as one line too
(set TOPUP_DEBUG=1 for the traceback).
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click

from runner.errors import GuardRefused, JobInvalid, RunnerError, leaves, most_telling
from runner.metrics import RunEnd, write_metrics

F = TypeVar("F", bound=Callable[..., Any])


def json_mode() -> bool:
    """Whether output is for machines: --log-format/TOPUP_LOG_FORMAT, else no terminal.

    Then every line the command prints is a JSON object, so that cron mail or a log
    collector gets JSON lines only; each still carries the human sentence as `message`.
    """
    context = click.get_current_context(silent=True)
    chosen = context.params.get("log_format") if context is not None else None
    chosen = chosen or os.environ.get("TOPUP_LOG_FORMAT", "").strip().lower() or None
    if chosen in ("json", "console"):
        return chosen == "json"
    return not sys.stderr.isatty()


def say(message: str, *, event: str, err: bool = False, **fields: Any) -> None:
    """One line of output: the sentence, or a JSON object carrying it."""
    if json_mode():
        record = {"event": event, "level": "error" if err else "info", **fields}
        click.echo(json.dumps({**record, "message": message}, default=str), err=err)
    else:
        click.echo(message, err=err)


def fail(exc: RunnerError) -> NoReturn:
    code = exc.exit_code
    if isinstance(exc, JobInvalid):
        for p in exc.problems:
            say(f"topup-runner: error: {p}", event="job.problem", err=True,
                file=p.file, row=p.row, column=p.column)  # fmt: skip
        if exc.truncated:
            say(f"topup-runner: error: … and {exc.truncated} more problems",
                event="job.problem", err=True)  # fmt: skip
        say("topup-runner: the job is invalid: nothing was sent",
            event="job.invalid", err=True, exit_code=code)  # fmt: skip
        _note_error(f"the job is invalid: {_without_secrets(str(exc))}: nothing was sent")
    elif isinstance(exc, GuardRefused):
        for problem in exc.problems:
            say(f"topup-runner: refused: {_without_secrets(problem)}", event="guard.refused",
                err=True)  # fmt: skip
        say("topup-runner: the job was refused: nothing was sent", event="run.error",
            err=True, error_type="GuardRefused", exit_code=code)  # fmt: skip
        _note_error(_without_secrets(str(exc)))
    else:
        say(f"topup-runner: error: {_without_secrets(str(exc))}", event="run.error", err=True,
            error_type=type(exc).__name__, exit_code=code)  # fmt: skip
        _note_error(_without_secrets(str(exc)))
    sys.exit(code)


# Environment variables whose values are secrets: never printed, whatever carries them.
_SECRET_VARIABLES = (
    "UNCASH_API_TOKEN",
    "ALIX_PARTNER_CODE",
    "ALIX_SECRET_KEY",
    "ALIX_USER_EMAIL",
    "TOPUP_LEDGER_KEY",
)
_USERINFO = re.compile(r"(?<=://)[^/@\s]*@")
_INTERNAL_MESSAGE_LIMIT = 300


def _without_secrets(text: str) -> str:
    """`text` with registered and environment secrets and URL user info taken out."""
    from runner.logs import scrub_secrets

    text = str(scrub_secrets(None, "", {"text": text})["text"])
    for name in _SECRET_VARIABLES:
        value = os.environ.get(name, "").strip()
        if len(value) >= 4:
            text = text.replace(value, "[redacted]")
    return _USERINFO.sub("[redacted]@", text)


def _internal_error(exc: BaseException) -> NoReturn:
    detail = " ".join(_without_secrets(str(exc)).split())
    if len(detail) > _INTERNAL_MESSAGE_LIMIT:
        detail = detail[:_INTERNAL_MESSAGE_LIMIT] + "..."
    say(
        f"topup-runner: internal error: {type(exc).__name__}: {detail} "
        "(set TOPUP_DEBUG=1 for a traceback)",
        event="run.internal_error",
        err=True,
    )
    _note_error(f"internal error: {type(exc).__name__}: {detail}")
    sys.exit(1)


def interrupted() -> NoReturn:
    say("topup-runner: interrupted", event="run.interrupted", err=True)
    _note_error("interrupted")
    sys.exit(130)


# The run whose every exit is told to monitoring and to people (see `watch_exit`).
_WATCHED: list[RunEnd] = []


def watch_exit(end: RunEnd) -> None:
    """Make the running command's exit, whatever its code, rewrite `end`'s metrics file and
    send its notifications (`guarded` does it as the command exits)."""
    _WATCHED[:] = [end]


def _note_error(message: str) -> None:
    if _WATCHED:
        _WATCHED[0].error = message


def _tell_exit(code: int | str | None) -> None:
    """Rewrite the watched run's metrics and notify: neither changes the exit code."""
    if not _WATCHED:
        return
    end = _WATCHED.pop()
    exit_code = code if isinstance(code, int) else 0 if code is None else 1
    if end.metrics_file is not None:
        try:
            write_metrics(end.metrics_file, end.metrics(exit_code))
        except OSError as exc:
            say(f"topup-runner: warning: metrics file {end.metrics_file} was not written: "
                f"{exc.strerror or exc}", event="metrics.unwritable", err=True)  # fmt: skip
    if end.notify:
        from runner.notify import notice_of, send_notice

        try:
            problems = send_notice(end.notify, notice_of(end, exit_code))
        except KeyboardInterrupt:  # Ctrl-C while waiting for receivers: let them go
            problems = ["interrupted"]
        for problem in problems:
            say(f"topup-runner: warning: notification not delivered: {problem}",
                event="notify.failed", err=True)  # fmt: skip


def guarded(func: F) -> F:
    """Turn the runner's errors into one-line messages and the contract's exit codes.

    Errors raised in a task group arrive wrapped in an ExceptionGroup: an interrupt among
    them is an interrupt (130), runner errors among them are reported as one (see
    runner.errors.EXIT_CODE_RANK), and only a group of nothing else is an internal error.
    Whatever the exit, a run given to `watch_exit` is then told to monitoring and people.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _WATCHED.clear()
        try:
            result = _exits(*args, **kwargs)
        except SystemExit as done:
            _tell_exit(done.code)
            raise
        except BaseException:  # TOPUP_DEBUG's traceback: still an exit 1
            _tell_exit(1)
            raise
        _tell_exit(0)
        return result

    def _exits(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except RunnerError as exc:
            fail(exc)
        except KeyboardInterrupt:
            interrupted()
        except BaseExceptionGroup as group:
            found = leaves(group)
            if any(isinstance(exc, KeyboardInterrupt) for exc in found):
                interrupted()
            errors = [exc for exc in found if isinstance(exc, RunnerError)]
            if errors:
                fail(most_telling(errors))
            exits = [exc for exc in found if isinstance(exc, SystemExit)]
            if exits:
                raise exits[0] from None
            if os.environ.get("TOPUP_DEBUG"):
                raise
            _internal_error(group)
        except Exception as exc:
            if os.environ.get("TOPUP_DEBUG"):
                raise
            _internal_error(exc)
        return None

    return wrapper  # type: ignore[return-value]
