"""The Uncash adapter: aiohttp requests out, the closed set of outcomes back.

What an answer means is decided in `uncash_answers.py` (`classify_topup()`), and what a
request that got no answer means in `_map_transport_error()`: nowhere else decides what a
status, a message or a dropped connection means.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal, overload
from urllib.parse import quote

import aiohttp
import structlog

from runner.errors import AuthenticationFailed, ConfigError, ProviderError
from runner.money import format_amount, quantize_cents
from runner.providers.base import (
    STILL_PENDING,
    Applied,
    CardState,
    NotApplied,
    Outcome,
    ProviderRules,
    RefusalCode,
    Refused,
    RetryKind,
    RetryLater,
    Settlement,
    StillPending,
    Throttle,
    Unknown,
    UnlimitedThrottle,
)
from runner.providers.http import (
    MAX_ANSWER_BYTES,
    MAX_CARD_LIST_BYTES,
    AnswerTooLarge,
    HttpAnswer,
    check_base_url,
    loads_exact,
    parse_retry_after,
    read_bounded,
    snippet,
    transport_message,
)
from runner.providers.uncash_answers import (
    CARD_NOT_FOUND,
    card_state,
    classify_topup,
    decimal_field,
    loads_card_list,
    message_of,
    stated_message,
    transaction_items,
)

log = structlog.get_logger("runner.providers.uncash")

PUBLIC_BASE_URL = "https://api.uncash.io/api/v1"
RULES = ProviderRules(
    min_amount=Decimal("5.00"),
    max_amount=Decimal("10000.00"),
    default_cooldown=120.0,
    currency="USD",  # the wallet's and the cards' currency in the docs
)

# What an HTTP header can carry: the token goes in one, and a control character would be an
# injected header (aiohttp refuses it with a ValueError at every request).
_HEADER_SAFE = re.compile(r"[\x21-\x7e]+")
_GET_ATTEMPTS = 4
# An amount already written with exactly two decimals, and a card id quote() leaves as it is.
_CENTS_TEXT = re.compile(r"(?:0|[1-9][0-9]*)\.[0-9]{2}")
_UNRESERVED = re.compile(r"[A-Za-z0-9_.~-]+")
# Transport failures the helper below can be given.
TransportFailure = aiohttp.ClientError | TimeoutError | ValueError | AnswerTooLarge


@dataclass(frozen=True, slots=True)
class _TryAgain:
    """A read that failed in a way worth repeating (reads move no money)."""

    message: str


@overload
def _map_transport_error(
    exc: TransportFailure,
    *,
    topup: Literal[True],
    status: int | None = None,
    what: str = "",
    provider: str = "uncash",
) -> RetryLater | Unknown: ...


@overload
def _map_transport_error(
    exc: TransportFailure,
    *,
    topup: Literal[False],
    status: int | None = None,
    what: str = "",
    provider: str = "uncash",
) -> ProviderError | _TryAgain: ...


def _map_transport_error(
    exc: TransportFailure,
    *,
    topup: bool,
    status: int | None = None,
    what: str = "",
    provider: str = "uncash",
) -> RetryLater | Unknown | ProviderError | _TryAgain:
    """What a request that got no usable answer means; the only place that decides it.

    For a topup (`topup=True`): RetryLater when the request cannot have been seen, else
    Unknown (money may have moved). For a read (`what` names it, e.g. "GET /cards"): a
    ProviderError to raise when trying again would fail the same way, else `_TryAgain`.
    `status` is the HTTP status when the answer began but could not be read.
    """
    if isinstance(exc, AnswerTooLarge):
        if topup:
            return Unknown(f"HTTP {status}: {exc}")
        return ProviderError(f"Uncash {what}: {exc}", provider=provider, status=status)
    if isinstance(exc, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError):
        # Refused before any connection was made (check_base_url keeps this from happening).
        if topup:
            return RetryLater(RetryKind.TRANSIENT, f"not sent: {transport_message(exc)}")
        return ProviderError(f"Uncash {what}: {transport_message(exc)}", provider=provider)
    if isinstance(exc, aiohttp.ClientConnectorError) and topup:
        # The TCP connection was never made: the request cannot have been seen.
        return RetryLater(RetryKind.TRANSIENT, f"cannot connect: {exc.os_error or exc}")
    if isinstance(exc, aiohttp.ClientError):
        return Unknown(transport_message(exc)) if topup else _TryAgain(transport_message(exc))
    if isinstance(exc, TimeoutError):
        return Unknown(transport_message(exc)) if topup else _TryAgain("timed out")
    # A plain ValueError: aiohttp refuses some requests (a header it will not send); without
    # knowing where it stopped, a topup may have been sent, and a read would fail again.
    if topup:
        return Unknown(f"{type(exc).__name__}: {snippet(exc)}")
    return ProviderError(f"Uncash {what}: {snippet(exc)}", provider=provider)


class UncashProvider:
    """Uncash over aiohttp; one instance per run, closed with `aclose()`."""

    name = "uncash"
    rules = RULES

    def __init__(
        self,
        token: str,
        *,
        base_url: str = PUBLIC_BASE_URL,
        timeout: float = 30.0,
        concurrency: int = 8,
        throttle: Throttle | None = None,
        name: str = "uncash",
    ) -> None:
        if not _HEADER_SAFE.fullmatch(token):
            # Never quoted: it is a secret, whatever is wrong with it.
            raise ConfigError(
                "UNCASH_API_TOKEN holds a space or a character an HTTP header cannot carry"
            )
        self.name = name
        self._base = check_base_url(base_url, "Uncash")
        self._throttle: Throttle = throttle or UnlimitedThrottle()
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._headers = {
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/json",
            "Accept": "application/json",
        }
        self._connector_limit = max(1, concurrency) + 4
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:  # never show the token
        return f"UncashProvider(base_url={self._base!r})"

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers=self._headers,
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

    @asynccontextmanager
    async def _request(
        self, method: str, path: str, body: str | None = None, *, limit: int = MAX_ANSWER_BYTES
    ) -> AsyncIterator[HttpAnswer]:
        await self._throttle.acquire()
        async with self._client().request(
            method, self._base + path, data=body, allow_redirects=False
        ) as response:
            # Uncash answers JSON, which is UTF-8; anything else only ends up in a message.
            text = (await read_bounded(response, limit)).decode("utf-8", "replace")
            yield HttpAnswer(response.status, text, response.headers.get("Retry-After"))

    async def topup(self, card_id: str, amount: Decimal) -> Outcome:
        text = str(amount)
        if not _CENTS_TEXT.fullmatch(text):  # else it is already what format_amount gives
            if amount != quantize_cents(amount):
                return Refused(
                    RefusalCode.INVALID_AMOUNT, f"{amount} has more than two decimals: not sent"
                )
            text = format_amount(amount)
        try:
            card = card_id if _UNRESERVED.fullmatch(card_id) else quote(card_id, safe="")
        except UnicodeEncodeError:
            return Refused(RefusalCode.CARD_NOT_FOUND, "the card id is not valid text: not sent")
        url = f"{self._base}/cards/{card}/topup"
        # Bytes: a str body is re-encoded through a charset lookup at every request.
        body = b'{"amount": ' + text.encode() + b"}"
        status: int | None = None
        try:
            # The request inline rather than through _request: this runs once a topup, and a
            # run's CPU per topup decides how fast an unlimited provider can be fed.
            await self._throttle.acquire()
            async with self._client().post(url, data=body, allow_redirects=False) as response:
                status = response.status
                # Uncash answers JSON, which is UTF-8; anything else only ends up in a message.
                raw = await read_bounded(response, MAX_ANSWER_BYTES)
                answer = raw.decode("utf-8", "replace")
                retry_after = response.headers.get("Retry-After") if status == 429 else None
        except (AnswerTooLarge, aiohttp.ClientError, TimeoutError, ValueError) as exc:
            return _map_transport_error(exc, topup=True, status=status)
        outcome = classify_topup(HttpAnswer(status, answer, retry_after), card_id, amount)
        if isinstance(outcome, RetryLater) and outcome.kind is RetryKind.RATE_LIMITED:
            self._throttle.slow_down(outcome.after)
        return outcome

    async def _get(
        self,
        path: str,
        loads: Callable[[str], Any] = loads_exact,
        *,
        limit: int = MAX_ANSWER_BYTES,
    ) -> tuple[int, Any]:
        """GET with bounded retries: reads are safe to repeat, unlike topups. An answer past
        `limit` bytes, or a request aiohttp will not send, is not retried: it would recur."""
        delay = 0.2
        last = ""
        for attempt in range(1, _GET_ATTEMPTS + 1):
            try:
                async with self._request("GET", path, limit=limit) as answer:
                    pass  # read in full; the body is parsed once the response is let go of
            except (AnswerTooLarge, aiohttp.ClientError, TimeoutError, ValueError) as exc:
                failure = _map_transport_error(
                    exc, topup=False, what=f"GET {path}", provider=self.name
                )
                if isinstance(failure, ProviderError):
                    raise failure from None
                last = failure.message
            else:
                if answer.status == 401:
                    raise AuthenticationFailed(
                        "Uncash refused the API token (HTTP 401): check UNCASH_API_TOKEN",
                        provider=self.name,
                        status=401,
                    )
                if answer.status == 429:
                    after = parse_retry_after(answer.retry_after)
                    self._throttle.slow_down(after)
                    last = "HTTP 429"
                    await asyncio.sleep(after if after is not None else delay)
                    continue
                if answer.status >= 500:
                    last = f"HTTP {answer.status}"
                else:
                    try:
                        return answer.status, loads(answer.body)
                    except ValueError:
                        last = f"HTTP {answer.status} with a body that is not JSON"
            if attempt < _GET_ATTEMPTS:
                await asyncio.sleep(delay * (1 + random.random()))
                delay *= 2
        raise ProviderError(
            f"Uncash GET {path} failed {_GET_ATTEMPTS} times: {last}", provider=self.name
        )

    async def _get_data(
        self, path: str, loads: Callable[[str], Any] = loads_exact, *, limit: int = MAX_ANSWER_BYTES
    ) -> Any:
        status, payload = await self._get(path, loads, limit=limit)
        if status == 200 and isinstance(payload, Mapping) and payload.get("success") is True:
            return payload.get("data")
        raise ProviderError(
            f"Uncash GET {path}: HTTP {status}: {message_of(payload) or payload}",
            provider=self.name,
            status=status,
        )

    async def wallet_balance(self) -> Decimal:
        data = await self._get_data("/wallet/balance")
        balance = decimal_field(data, "balance") if isinstance(data, Mapping) else None
        if balance is None:
            raise ProviderError(
                "Uncash GET /wallet/balance: no readable balance in the answer", provider=self.name
            )
        return balance

    async def fee_estimates(self, amounts: Sequence[Decimal]) -> Mapping[Decimal, Decimal]:
        """Uncash quotes no fee in advance (only `platform_fee_amount` after the fact)."""
        return {}

    async def get_card(self, card_id: str) -> CardState | None:
        try:
            path = f"/cards/{quote(card_id, safe='')}"
        except UnicodeEncodeError:
            raise ProviderError(
                "Uncash GET /cards/{id}: the card id is not valid text",
                provider=self.name,
                card_id=card_id,
            ) from None
        status, payload = await self._get(path)
        message = message_of(payload)
        if status < 500 and CARD_NOT_FOUND.match(stated_message(payload)):
            return None
        if status == 404:
            # Not the documented card refusal: most likely a wrong --base-url.
            raise ProviderError(
                f"Uncash GET {path}: HTTP 404 {message or 'without a message'}: check --base-url",
                provider=self.name,
                card_id=card_id,
                status=404,
            )
        if status != 200 or not isinstance(payload, Mapping) or payload.get("success") is not True:
            raise ProviderError(
                f"Uncash GET {path}: HTTP {status}: {message}",
                provider=self.name,
                card_id=card_id,
                status=status,
            )
        data = payload.get("data")
        try:
            return card_state(data if isinstance(data, Mapping) else {})
        except ValueError as exc:
            raise ProviderError(
                f"Uncash GET {path}: {exc}", provider=self.name, card_id=card_id, status=status
            ) from None

    async def list_cards(self) -> Mapping[str, CardState]:
        # Every card of the account in one answer: the one read allowed past a MiB.
        data = await self._get_data("/cards", loads_card_list, limit=MAX_CARD_LIST_BYTES)
        cards = data.get("cards") if isinstance(data, Mapping) else None
        if not isinstance(cards, list):
            raise ProviderError("Uncash GET /cards: no card list in the answer", provider=self.name)
        return {item.card_id: item for item in cards if isinstance(item, CardState)}

    async def transactions_page(self, card_id: str, page: int, limit: int = 100) -> Any:
        """One page of `GET /cards/transactions` for the card, as answered (`data`): the
        audit's reading of the provider's own books (runner.audit.uncash_book). Raises
        ProviderError when it cannot be read."""
        query = f"card_id={quote(card_id, safe='')}&limit={limit}&page={page}"
        return await self._get_data(f"/cards/transactions?{query}")

    async def _latest_credit(self, card_id: str, amount: Decimal) -> str | None:
        """The id of the card's newest credit of `amount`, if the transactions list shows one.

        Only an enrichment for a topup already proven applied: the docs do not say whether
        topups appear in this list, so any failure here just leaves the id unknown.
        """
        path = f"/cards/transactions?card_id={quote(card_id, safe='')}&limit=10&page=1"
        try:
            items = transaction_items(await self._get_data(path))
        except ProviderError:
            return None
        for item in items:
            if not isinstance(item, Mapping) or str(item.get("side", "Credit")) != "Credit":
                continue
            if decimal_field(item, "amount") == amount and item.get("id") is not None:
                return str(item["id"])
        return None

    async def settle(
        self, card_id: str, amount: Decimal, provider_ref: str
    ) -> Applied | Refused | StillPending:
        """Uncash applies topups at once: nothing is ever pending, so nothing is settled."""
        return STILL_PENDING

    async def reconcile(
        self,
        card_id: str,
        amount: Decimal,
        before: CardState | None,
        *,
        sent_at: datetime | None = None,
        known_refs: Collection[str] = (),
    ) -> Settlement:
        """Compare the card with its snapshot from before the attempt.

        We hold the only request in flight for this card, so its `deposit` (which spending
        does not lower) moved by exactly `amount` or by nothing; anything else cannot be told.
        """
        if before is None:
            return Unknown("no snapshot of the card from before the attempt")
        try:
            now = await self.get_card(card_id)
        except AuthenticationFailed:
            raise
        except ProviderError as exc:
            return Unknown(f"could not read the card to reconcile: {exc}")
        if now is None:
            return Unknown("the card is no longer visible to reconcile against")
        if before.deposit is not None and now.deposit is not None:
            moved = now.deposit - before.deposit
        else:
            moved = now.balance - before.balance
        if moved == 0:
            return NotApplied("the card's deposit did not move: the topup was not applied")
        if moved == amount:
            return Applied(
                card_balance_after=now.balance,
                transaction_id=await self._latest_credit(card_id, amount),
            )
        return Unknown(
            f"the card's deposit moved by {format_amount(moved)}, "
            f"neither 0 nor the amount {format_amount(amount)}"
        )
