"""What the adapters share about HTTP: the raw answer, exact JSON, Retry-After, and how a
failed request is described. Meaning is given to answers in each adapter, not here."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    """What came back over HTTP, before any meaning is given to it."""

    status: int
    body: str
    retry_after: str | None = None


# One decoder for every answer: json.loads(..., parse_float=...) builds a new one each call.
_EXACT = json.JSONDecoder(parse_float=Decimal)


def loads_exact(body: str) -> Any:
    """JSON with every non-integer number as a Decimal: money never passes through float."""
    return _EXACT.decode(body)


_RETRY_AFTER_SECONDS = re.compile(r"\d{1,9}(?:\.\d{1,6})?")
# A Retry-After longer than this is not believed: the run would stall on a typo.
MAX_RETRY_AFTER = 3600.0


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if unreadable."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    if _RETRY_AFTER_SECONDS.fullmatch(text):
        return min(MAX_RETRY_AFTER, float(text))
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)  # HTTP dates are GMT, whatever their spelling
    return min(MAX_RETRY_AFTER, max(0.0, (when - datetime.now(UTC)).total_seconds()))


def snippet(value: object, limit: int = 120) -> str:
    """A body or value shortened to one line for an error message."""
    flat = " ".join(str(value).split())
    return flat[:limit] + ("…" if len(flat) > limit else "") if flat else "(empty body)"


def transport_message(exc: BaseException) -> str:
    """How a request that got no usable answer failed, in words."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "no connection before the timeout"
    if isinstance(exc, TimeoutError):
        return "no answer before the timeout"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the connection was closed before an answer"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return str(exc.os_error or exc)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
