"""Logging: structlog with stable dotted event names; console on a terminal, JSON lines else.

Every event carries `provider`, so that a sandbox run can never be mistaken for a real one
in a log file, and secrets are scrubbed from every event before it is rendered.
Events about one row going well (`topup.applied`) are `info` on a console and `debug` in JSON
mode, where a million rows would make a million lines and most of a fast run's work; the run
sums them up in a periodic `run.progress` event instead, and `TOPUP_LOG_LEVEL=debug` brings
them back. Warnings (refusals, unknown outcomes) are logged for every row in both modes.
On a console each event is a compact line that fits the terminal (`ConsoleLines`); with a
progress bar, the rows going well are the bar's to count and are not logged one by one.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Callable, Iterable, MutableMapping
from typing import Any, Protocol, TextIO, cast

import structlog

_secrets: list[str] = []
_REDACTED = "[redacted]"
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_row_level = logging.INFO


def register_secret(value: str | None) -> None:
    """Never let `value` reach a log line, whatever event field carries it."""
    if value and len(value) >= 4 and value not in _secrets:
        _secrets.append(value)


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        for secret in _secrets:
            if secret in value:
                value = value.replace(secret, _REDACTED)
        return value
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_scrub(v) for v in value)
    return value


def scrub_secrets(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: replace any registered secret in any field."""
    if _secrets:
        for key in list(event_dict):
            event_dict[key] = _scrub(event_dict[key])
    return event_dict


class Stream(Protocol):
    """Where log lines go: a text file, or something that forwards to one."""

    def write(self, text: str, /) -> int: ...

    def flush(self) -> None: ...

    def isatty(self) -> bool: ...


def configure_logging(
    *,
    provider: str,
    fmt: str | None = None,
    stream: Stream | None = None,
    level: int | None = None,
    rows_on_bar: bool = False,
) -> str:
    """Set up structlog for this process; returns the format chosen.

    `level` defaults to `TOPUP_LOG_LEVEL` (debug, info or warning), else info.
    `rows_on_bar`: a progress bar counts the rows going well, so they are `debug` events.
    """
    global _row_level
    stream = stream or sys.stderr
    if fmt is None:
        fmt = "console" if stream.isatty() else "json"
    if level is None:
        level = _LEVELS.get(os.environ.get("TOPUP_LOG_LEVEL", "").strip().lower(), logging.INFO)
    _row_level = logging.DEBUG if fmt == "json" or rows_on_bar else logging.INFO
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
        stamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    else:
        renderer = ConsoleLines(colors=stream.isatty())
        stamper = structlog.processors.TimeStamper(fmt="%H:%M:%S", utc=False)
    processors: Iterable[Any] = (
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        stamper,
        scrub_secrets,
        structlog.processors.format_exc_info,
        renderer,
    )
    structlog.configure(
        processors=list(processors),
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=cast(TextIO, stream)),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(provider=provider)
    return fmt


def row_logger(logger: Any) -> tuple[Callable[..., Any], bool]:
    """The method for events about one row going well (`info` on a console, `debug` in JSON),
    and whether its events are written at all (if not, callers need not format them).

    Bound once, so that a filtered-out event costs a no-op call, not a logger per row.
    """
    bound = logger.bind()
    method: Callable[..., Any] = bound.debug if _row_level == logging.DEBUG else bound.info
    enabled = getattr(bound, "is_enabled_for", None)
    return method, True if enabled is None else bool(enabled(_row_level))


# ---------------------------------------------------------------------------------------------
# Console lines

# Fields every event carries (bound once a run): shown where they say something new.
_CONTEXT = ("provider", "run_key")
_INDENT = "   "  # and the space between tokens: continued lines start at column 4
_ANSI = {"time": "2", "event": "1", "warning": "33", "error": "31", "key": "36", "sandbox": "35"}
_PLAIN = ("value",)


class ConsoleLines:
    """Renders an event as `13:05:09 sandbox topup.applied row=14 amount=250.00 ...`, in lines
    no wider than the terminal (COLUMNS), continued with an indent; nothing is cut.

    Time of day in local time (the JSON log keeps ISO UTC); the level only when it is not
    info; `provider` only when it is the sandbox (which must never pass for a real run), on
    every line but those of one row going well, which are kept to one line: their card id
    cut to its first 8 characters (warnings show it whole), a first attempt not said;
    `run_key` only on `run.*` events; fields with no value left out.
    A traceback (TOPUP_DEBUG) is printed as it is, below the event.
    """

    def __init__(self, *, colors: bool, width: int | None = None) -> None:
        self._colors = colors
        self._width = width

    def _paint(self, text: str, kind: str) -> str:
        return f"\x1b[{_ANSI[kind]}m{text}\x1b[0m" if self._colors else text

    def __call__(self, _logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> str:
        fields = dict(event_dict)
        event = str(fields.pop("event", ""))
        level = str(fields.pop("level", method))
        head = [(str(fields.pop("timestamp", "")), "time")]
        if level not in ("info", "debug"):
            head.append((level, "error" if level in ("error", "critical") else "warning"))
        one_row = level in ("info", "debug") and "row" in fields
        if fields.pop("provider", None) == "sandbox" and not one_row:
            head.append(("sandbox", "sandbox"))
        if not event.startswith("run."):
            fields.pop("run_key", None)
        head.append((event, "event"))
        exc = fields.pop("exception", None)
        tokens: list[tuple[str, str]] = [(text, kind) for text, kind in head if text]
        for key, value in fields.items():
            if value is None or value == "" or (one_row and value is False):
                continue
            shown = str(value)
            if one_row and key == "card_id" and len(shown) > 12:
                shown = shown[:8] + "…"
            if one_row and key == "attempt" and value == 1:
                continue
            # A sentence wraps between its words; a word too long for a line, anywhere.
            first, *words = f"{key}={shown}".split(" ")
            tokens += [(first, "key"), *((word, "value") for word in words if word)]
        text = self._lay_out(tokens)
        return text if exc is None else f"{text}\n{exc}"

    def _lay_out(self, tokens: list[tuple[str, str]]) -> str:
        width = self._width or shutil.get_terminal_size(fallback=(80, 24)).columns
        width = max(width, 40)
        lines: list[str] = []
        line, used = "", 0
        for text, kind in tokens:
            while text:
                room = width - used - (1 if used else 0)
                if len(text) <= room:
                    part, text = text, ""
                elif used > len(_INDENT):
                    lines.append(line)
                    line, used = _INDENT, len(_INDENT)
                    continue
                else:
                    part, text = text[:room], text[room:]
                painted = self._paint_token(part, kind)
                line += (" " if used else "") + painted
                used += (1 if used else 0) + len(part)
                kind = "value" if kind == "key" else kind  # the rest of a cut key=value
                if text:
                    lines.append(line)
                    line, used = _INDENT, len(_INDENT)
        lines.append(line)
        return "\n".join(lines)

    def _paint_token(self, text: str, kind: str) -> str:
        if kind in _PLAIN:
            return text
        if kind != "key" or "=" not in text:
            return self._paint(text, kind)
        key, _, value = text.partition("=")
        return f"{self._paint(key, 'key')}={value}"
