"""What the adapters share about HTTP: the raw answer read within a bound, exact JSON,
Retry-After, and how a failed request is described. Meaning is given to answers in each
adapter, not here."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import yarl

from runner.errors import ConfigError

# -- how much of an answer is read ------------------------------------------------------------

# Every answer but the card listing: a topup answer, one card, the wallet, a fee quote, a token
# call, a page of transactions. Each is a few hundred bytes to a few kB; a MiB is room for any
# honest one and small enough that a hostile or broken one cannot exhaust memory.
MAX_ANSWER_BYTES = 1 << 20  # 1 MiB
# Uncash `GET /cards`: every card of the account in one answer, read once by preflight. A card
# takes 311 bytes in the sandbox's answer (340 in the older version, with `spent` and
# `withdraw`); at three times that, for longer names, extra fields or pretty-printing, 256 MiB
# still holds over 260,000 cards (over 790,000 at the sandbox's size), beyond the largest job
# shape measured (200,000 cards). The body and its text are both held while it is parsed.
MAX_CARD_LIST_BYTES = 256 << 20  # 256 MiB


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    """What came back over HTTP, before any meaning is given to it."""

    status: int
    body: str
    retry_after: str | None = None


class AnswerTooLarge(Exception):
    """An answer longer than the bound its call allows; not read further.

    Not a RunnerError: each adapter decides what it means (a topup's may follow money that
    moved: Unknown; a read's is a ProviderError)."""

    def __init__(self, limit: int, declared: int | None = None) -> None:
        self.limit = limit
        self.declared = declared
        said = f" (Content-Length {declared})" if declared is not None else ""
        super().__init__(f"the answer is larger than {_size(limit)}{said}: not read")


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} bytes"


_DIGITS = re.compile(r"[0-9]{1,19}")


def _declared_length(response: aiohttp.ClientResponse) -> int | None:
    """The body's length as the headers state it, when that bounds what `read()` returns."""
    headers = response.headers
    encoding = headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity") or "Transfer-Encoding" in headers:
        return None  # the decoded body may be any length, whatever Content-Length says
    value = headers.get("Content-Length", "").strip()
    return int(value) if _DIGITS.fullmatch(value) else None


async def read_bounded(response: aiohttp.ClientResponse, limit: int) -> bytes | bytearray:
    """The body, or AnswerTooLarge once it is known to exceed `limit` bytes.

    A stated Content-Length is checked before reading (the parser then reads exactly that
    many bytes); otherwise (chunked, compressed, or ended by closing) the body is read in
    pieces and reading stops at `limit + 1` bytes. Decompressed bytes are what is counted.
    """
    declared = _declared_length(response)
    if declared is not None:
        if declared > limit:
            raise AnswerTooLarge(limit, declared)
        return await response.read()
    body = bytearray()
    while chunk := await response.content.read(limit + 1 - len(body)):
        body += chunk
        if len(body) > limit:
            raise AnswerTooLarge(limit)
    return body


def check_base_url(base_url: str, provider: str) -> str:
    """`base_url` without its trailing slash, or ConfigError if no request could be sent to it."""
    text = base_url.strip().rstrip("/")
    try:
        url = yarl.URL(text)
        port = url.port
    except ValueError as exc:
        raise ConfigError(f"the {provider} base URL {text!r} is not a URL: {exc}") from None
    if url.scheme not in ("http", "https") or not url.host or port == 0:
        raise ConfigError(f"the {provider} base URL {text!r} is not an http(s) URL with a host")
    return text


# One decoder for every answer: json.loads(..., parse_float=...) builds a new one each call.
_EXACT = json.JSONDecoder(parse_float=Decimal)


def loads_exact(body: str) -> Any:
    """JSON with every non-integer number as a Decimal: money never passes through float.

    ValueError for anything that is not JSON, including nesting too deep to parse."""
    try:
        return _EXACT.decode(body)
    except RecursionError:
        raise ValueError("JSON nested too deeply to read") from None


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
