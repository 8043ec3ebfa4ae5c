"""aiohttp's own server logging, turned into structlog events while a sandbox serves.

Left alone, aiohttp logs a malformed request (a 10 MB URL, a header over its limit) as "Error
handling request" with a traceback, which Python prints to stderr as plain text: a stray
non-JSON block in a JSON log. While any sandbox serves, the records of aiohttp's server-side
loggers become one `sandbox.http_error` event (or a debug event below warning level) that names
the exception's type and HTTP status, never its text or traceback: the text quotes the request,
headers and tokens included.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Final

import structlog
from aiohttp.http_exceptions import HttpProcessingError

AIOHTTP_SERVER_LOGGERS: Final = (
    "aiohttp.server",
    "aiohttp.web",
    "aiohttp.access",
    "aiohttp.internal",
)
_MESSAGE_CHARS: Final = 200

log = structlog.get_logger("runner.sandbox")


class _ToStructlog(logging.Filter):
    """A logger filter that re-logs each record as a structlog event and drops the record, so
    that no handler (nor Python's last-resort stderr printer) ever sees it."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields: dict[str, object] = {"source": record.name}
        try:
            fields["message"] = record.getMessage()[:_MESSAGE_CHARS]
        except Exception:  # a record whose arguments do not fit its format
            fields["message"] = str(record.msg)[:_MESSAGE_CHARS]
        if record.exc_info is not None and record.exc_info[1] is not None:
            error = record.exc_info[1]
            fields["error"] = type(error).__name__
            if isinstance(error, HttpProcessingError) and error.code:
                fields["status"] = error.code
        if record.levelno >= logging.WARNING:
            log.warning("sandbox.http_error", **fields)
        else:
            log.debug("sandbox.http_debug", **fields)
        return False


_FILTER: Final = _ToStructlog()
_serving = 0


@contextlib.contextmanager
def aiohttp_logs_as_events() -> Iterator[None]:
    """Route aiohttp's server-side log records to structlog for the duration of the block.

    Nested and concurrent sandboxes share the routing; it ends with the last of them.
    """
    global _serving
    if _serving == 0:
        for name in AIOHTTP_SERVER_LOGGERS:
            logging.getLogger(name).addFilter(_FILTER)
    _serving += 1
    try:
        yield
    finally:
        _serving -= 1
        if _serving == 0:
            for name in AIOHTTP_SERVER_LOGGERS:
                logging.getLogger(name).removeFilter(_FILTER)
