"""Logging: structlog with stable dotted event names; console on a terminal, JSON lines else.

Every event carries `provider`, so that a sandbox run can never be mistaken for a real one
in a log file, and secrets are scrubbed from every event before it is rendered.
Events about one row going well (`topup.applied`) are `info` on a console and `debug` in JSON
mode, where a million rows would make a million lines and most of a fast run's work; the run
sums them up in a periodic `run.progress` event instead, and `TOPUP_LOG_LEVEL=debug` brings
them back. Warnings (refusals, unknown outcomes) are logged for every row in both modes.
"""

from __future__ import annotations

import logging
import os
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
) -> str:
    """Set up structlog for this process; returns the format chosen.

    `level` defaults to `TOPUP_LOG_LEVEL` (debug, info or warning), else info.
    """
    global _row_level
    stream = stream or sys.stderr
    if fmt is None:
        fmt = "console" if stream.isatty() else "json"
    if level is None:
        level = _LEVELS.get(os.environ.get("TOPUP_LOG_LEVEL", "").strip().lower(), logging.INFO)
    _row_level = logging.DEBUG if fmt == "json" else logging.INFO
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
    processors: Iterable[Any] = (
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
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
