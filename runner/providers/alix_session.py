"""The Alix Pay session: one aiohttp session, the access token on every request (renewed once
on a 401), reads retried while the failure is transient, and what a request that got no answer
means (`map_transport_error`, the one place that decides it for the Alix adapter).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, overload

import aiohttp
import anyio

from runner.errors import AccessTokenRejected, AuthenticationFailed, ConfigError, ProviderError
from runner.providers.alix_answers import ReadData, classify_read
from runner.providers.alix_auth import AccessToken, AlixCredentials, TokenManager, token_rejected
from runner.providers.base import RetryKind, RetryLater, Throttle, Unknown, UnlimitedThrottle
from runner.providers.http import (
    MAX_ANSWER_BYTES,
    AnswerTooLarge,
    HttpAnswer,
    check_base_url,
    read_bounded,
    snippet,
    transport_message,
)

T = TypeVar("T")

_READ_ATTEMPTS = 4
_TOKEN_SENDS = 3  # a request sent with at most this many tokens before credentials are blamed
# Transport failures the helper below can be given.
TransportFailure = aiohttp.ClientError | TimeoutError | ValueError | AnswerTooLarge


@dataclass(frozen=True, slots=True)
class _TryAgain:
    """A read that failed in a way worth repeating (reads move no money)."""

    message: str


@overload
def map_transport_error(
    exc: TransportFailure, *, topup: Literal[True], what: str = "", provider: str = "alix"
) -> RetryLater | Unknown: ...


@overload
def map_transport_error(
    exc: TransportFailure, *, topup: Literal[False], what: str = "", provider: str = "alix"
) -> ProviderError | _TryAgain: ...


def map_transport_error(
    exc: TransportFailure, *, topup: bool, what: str = "", provider: str = "alix"
) -> RetryLater | Unknown | ProviderError | _TryAgain:
    """What a request that got no usable answer means; the only place that decides it.

    For a topup (`topup=True`): RetryLater when the request cannot have been seen, else
    Unknown (money may have moved). For a read (`what` names it, e.g. "GET /cards/x"): a
    ProviderError to raise when trying again would fail the same way, else `_TryAgain`.
    (The token calls, which must keep secrets out of messages, map theirs in alix_auth.)
    """
    if isinstance(exc, AnswerTooLarge):
        if topup:
            return Unknown(str(exc))
        return ProviderError(f"Alix {what}: {exc}", provider=provider)
    if isinstance(exc, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError):
        # Refused before any connection was made (check_base_url keeps this from happening).
        if topup:
            return RetryLater(RetryKind.TRANSIENT, f"not sent: {transport_message(exc)}")
        return ProviderError(f"Alix {what}: {transport_message(exc)}", provider=provider)
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError) and topup:
        # The TCP connection was never made: the request cannot have been seen.
        return RetryLater(RetryKind.TRANSIENT, f"cannot connect: {transport_message(exc)}")
    if isinstance(exc, aiohttp.ClientError | TimeoutError):
        return Unknown(transport_message(exc)) if topup else _TryAgain(transport_message(exc))
    # A plain ValueError: aiohttp refuses some requests (a header it will not send); without
    # knowing where it stopped, a topup may have been sent, and a read would fail again.
    if topup:
        return Unknown(f"{type(exc).__name__}: {snippet(exc)}")
    return ProviderError(f"Alix {what}: {snippet(exc)}", provider=provider)


class AlixSession:
    """Requests to the Alix API with a live access token; closed with `aclose()`."""

    name = "alix"

    def __init__(
        self,
        credentials: AlixCredentials,
        *,
        base_url: str,
        timeout: float = 30.0,
        concurrency: int = 4,
        throttle: Throttle | None = None,
        clock: Callable[[], float] = time.monotonic,
        retry_delay: float = 0.2,
        name: str = "alix",
    ) -> None:
        if not base_url.strip():
            raise ConfigError("Alix publishes no API URL: give --base-url (ending in /api/v2)")
        self.name = name
        self._base = check_base_url(base_url, "Alix")
        self._throttle: Throttle = throttle or UnlimitedThrottle()
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._connector_limit = max(1, concurrency) + 4
        self._retry_delay = retry_delay
        self._session: aiohttp.ClientSession | None = None
        self.tokens = TokenManager(
            credentials, self._post_unauthenticated, clock=clock, retry_delay=retry_delay
        )

    def __repr__(self) -> str:  # never show credentials or tokens
        return f"{type(self).__name__}(base_url={self._base!r})"

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers={"Content-Type": "application/json", "Accept": "application/json"},
                timeout=self._timeout,
                connector=aiohttp.TCPConnector(limit=self._connector_limit),
                raise_for_status=False,
                # The API sets no cookies: no jar to store them in or filter at every request.
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _send(
        self, method: str, path: str, body: str | None, token: AccessToken | None
    ) -> HttpAnswer:
        """One request; raises aiohttp's errors, TimeoutError, AnswerTooLarge past
        MAX_ANSWER_BYTES (every Alix answer is one object or one page), or ValueError for a
        request aiohttp will not send. The callers give each its meaning."""
        await self._throttle.acquire()
        headers = {} if token is None else {"access-token": token.value}
        async with self._client().request(
            method, self._base + path, data=body, headers=headers, allow_redirects=False
        ) as response:
            # JSON is UTF-8; anything else only ends up in a message.
            text = (await read_bounded(response, MAX_ANSWER_BYTES)).decode("utf-8", "replace")
            return HttpAnswer(response.status, text, response.headers.get("Retry-After"))

    async def _post_unauthenticated(self, path: str, body: str) -> HttpAnswer:
        return await self._send("POST", path, body, None)

    async def _with_token(self, send: Callable[[AccessToken], Awaitable[T]]) -> T:
        """Run `send` with the current token; on 401, once more with a renewed one.

        A 401 is a refusal at the door, so sending again cannot apply anything twice. A second
        401 blames the credentials, unless another caller renewed the token meanwhile.
        """
        token = await self.tokens.current()
        renewed = False
        for _ in range(_TOKEN_SENDS):
            try:
                return await send(token)
            except AccessTokenRejected:
                if renewed and self.tokens.is_current(token):
                    break
                token = await self.tokens.after_rejection(token)
                renewed = True
        raise AuthenticationFailed(
            "Alix refused a freshly renewed access token (HTTP 401): check the Alix credentials",
            provider=self.name,
            status=401,
        )

    async def _read(self, method: str, path: str, body: str | None = None) -> Any:
        """The `data` of a call that moves no money, retried while the failure is transient."""

        async def send(token: AccessToken) -> HttpAnswer:
            answer = await self._send(method, path, body, token)
            if token_rejected(answer.status):
                raise AccessTokenRejected("Alix refused the access token (HTTP 401)")
            return answer

        delay = self._retry_delay
        last = ""
        for attempt in range(1, _READ_ATTEMPTS + 1):
            wait = delay * 2 ** (attempt - 1)
            try:
                answer = await self._with_token(send)
            except (AnswerTooLarge, aiohttp.ClientError, TimeoutError, ValueError) as exc:
                failure = map_transport_error(
                    exc, topup=False, what=f"{method} {path}", provider=self.name
                )
                if isinstance(failure, ProviderError):
                    raise failure from None
                last = failure.message
            else:
                verdict = classify_read(answer, f"{method} {path}", provider=self.name)
                if isinstance(verdict, ReadData):
                    return verdict.data
                if verdict.rate_limited:
                    self._throttle.slow_down(verdict.after)
                    wait = wait if verdict.after is None else verdict.after
                last = verdict.message
            if attempt < _READ_ATTEMPTS:
                await anyio.sleep(wait)
        raise ProviderError(
            f"Alix {method} {path} failed {_READ_ATTEMPTS} times: {last}", provider=self.name
        )
