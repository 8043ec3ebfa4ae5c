"""What every simulated API needs on the wire: JSON with exact decimals, connections dropped
without an answer, a proxy's error page, and simulated waits that shutdown cuts short.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from decimal import Decimal
from typing import Any, TypeAlias, TypeVar

from aiohttp import web

from runner.sandbox.config import CENT

T = TypeVar("T")

JSON: TypeAlias = (
    bool | int | float | str | Decimal | Sequence["JSON"] | Mapping[str, "JSON"] | None
)


def dumps(value: JSON, *, js_numbers: bool = False) -> str:
    """JSON text of `value`, each Decimal written as a number with exactly two decimals.

    json.dumps would need a float for that, and a float is not the amount. With `js_numbers`,
    a Decimal is written as JavaScript writes a number instead: 100, 3.5, 103.25.
    """
    if isinstance(value, Decimal):
        return js_number_text(value) if js_numbers else f"{value.quantize(CENT):f}"
    if isinstance(value, str):
        return json.dumps(value)
    if value is None or isinstance(value, bool | int | float):
        return json.dumps(value)
    if isinstance(value, Mapping):
        items = (
            f"{json.dumps(str(key))}:{dumps(item, js_numbers=js_numbers)}"
            for key, item in value.items()
        )
        return "{" + ",".join(items) + "}"
    return "[" + ",".join(dumps(item, js_numbers=js_numbers) for item in value) + "]"


def js_number_text(value: Decimal) -> str:
    """`value` without trailing zeros, as JSON.stringify writes a number: 100, 3.5, 0."""
    text = f"{value.normalize():f}"
    return "0" if text == "-0" else text


def json_response(
    payload: JSON,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
    *,
    js_numbers: bool = False,
) -> web.Response:
    return web.Response(
        text=dumps(payload, js_numbers=js_numbers),
        status=status,
        headers=headers,
        content_type="application/json",
    )


def seconds_text(seconds: float, *, whole: bool) -> str:
    """Seconds rounded up, so that waiting that long is always enough: "87", or "0.15"."""
    if whole:
        return str(max(1, math.ceil(seconds - 1e-9)))
    hundredths = max(1, math.ceil(seconds * 100 - 1e-6))
    return f"{hundredths // 100}.{hundredths % 100:02d}"


# nginx's code for "closed without a response": what the access log shows; nothing is sent.
DROPPED_STATUS = 444


def drop_connection(request: web.BaseRequest) -> web.Response:
    """Close the connection so that the client gets no answer at all.

    Return the result from the handler: aiohttp then fails to write it to the closed transport,
    takes that for a client that went away and logs at debug level only. Raising instead would
    make aiohttp log an error and try to send a 500.
    """
    if request.transport is not None:
        request.transport.close()
    return web.Response(status=DROPPED_STATUS)


_PROXY_PAGE = """<html>
<head><title>{status} {reason}</title></head>
<body>
<center><h1>{status} {reason}</h1></center>
<hr><center>nginx</center>
</body>
</html>
"""


def proxy_error_page(status: int = 502, reason: str = "Bad Gateway") -> web.Response:
    """The HTML page a reverse proxy answers when the API behind it fails: not JSON at all."""
    text = _PROXY_PAGE.format(status=status, reason=reason)
    return web.Response(text=text, status=status, content_type="text/html")


class Delays:
    """Simulated waits (latency, slow answers, late application) that end at once when the server
    shuts down.

    aiohttp does not wait for handlers whose client has gone, so `close` waits for the tracked
    ones itself: stopping the sandbox then leaves no handler sleeping behind it.
    """

    def __init__(self) -> None:
        self._closing = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._active = 0
        self._detached: set[asyncio.Task[Any]] = set()

    def _enter(self) -> None:
        self._active += 1
        self._idle.clear()

    def _leave(self) -> None:
        self._active -= 1
        if self._active == 0:
            self._idle.set()

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Count a handler as in flight until the block exits."""
        self._enter()
        try:
            yield
        finally:
            self._leave()

    async def pause(self, seconds: float) -> None:
        """Wait `seconds`, or less if the server is shutting down."""
        if seconds <= 0 or self._closing.is_set():
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._closing.wait()

    async def later(self, seconds: float, work: Callable[[], T]) -> T:
        """`work()` done `seconds` from now, whatever becomes of the request that asked for it.

        A backend goes on processing a request whose client has gone. aiohttp may cancel a
        handler when its client disconnects (`handler_cancellation`), so the wait and the work
        run in a task of their own, which the handler awaits shielded: cancelling the handler
        leaves the task running. Shutdown cuts the wait short and the work is done at once, so
        that no request the sandbox received is lost; `close` waits for it.
        """
        if seconds <= 0:
            return work()
        self._enter()  # counted now, not when the task starts: close must not miss it
        task = asyncio.get_running_loop().create_task(self._after(seconds, work))
        self._detached.add(task)
        task.add_done_callback(self._finished)
        return await asyncio.shield(task)

    async def _after(self, seconds: float, work: Callable[[], T]) -> T:
        await self.pause(seconds)
        return work()

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._detached.discard(task)
        self._leave()
        if not task.cancelled():
            task.exception()  # retrieved: a handler that went away cannot, and asyncio would warn

    async def close(self, grace: float = 2.0) -> None:
        """End every pause and wait (up to `grace` seconds) for tracked work to finish; cancel
        any detached work still running after that."""
        self._closing.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self._idle.wait()
        leftovers = list(self._detached)
        for task in leftovers:
            task.cancel()
        if leftovers:
            await asyncio.gather(*leftovers, return_exceptions=True)
