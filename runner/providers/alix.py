"""The Alix Pay adapter: string amounts, expiring tokens, topups that answer `Pending`.

What an answer means is decided in `alix_answers.py` (`classify_topup()`, and the ASSUMPTIONS
the docs leave open), what a request that got no answer means in `_map_transport_error()`, and
what the transactions list says of one topup in `alix_settle.py`. This module only sends.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal, TypeVar, overload
from urllib.parse import quote, urlencode

import aiohttp
import anyio
import structlog

from runner.errors import (
    AccessTokenRejected,
    AuthenticationFailed,
    ConfigError,
    NotDocumented,
    ProviderError,
)
from runner.money import format_amount, parse_provider_decimal, quantize_cents
from runner.providers.alix_answers import (
    CLOCK_SKEW,
    LIST_WINDOW_MARGIN,
    PAGE_SIZE,
    RULES,
    TOPUP_CHECK_CARD_TYPE,
    TOPUP_TYPE,
    AlixTopupRecord,
    classify_topup,
    page_items,
    parse_transaction,
    unix_seconds,
)
from runner.providers.alix_auth import (
    AccessToken,
    AlixCredentials,
    TokenManager,
    envelope_message,
    token_rejected,
)
from runner.providers.alix_settle import reconcile_from, settle_from
from runner.providers.base import (
    Applied,
    CardState,
    Outcome,
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
from runner.providers.checks import same_card_id
from runner.providers.http import (
    MAX_ANSWER_BYTES,
    AnswerTooLarge,
    HttpAnswer,
    check_base_url,
    loads_exact,
    parse_retry_after,
    read_bounded,
    snippet,
    transport_message,
)

log = structlog.get_logger("runner.providers.alix")

T = TypeVar("T")

TOPUP_PATH = "/cards/topup"
TOPUP_CHECK_PATH = "/cards/topup-check"
_MAX_PAGES = 100  # 5,000 topups since the window opened: beyond that, something is wrong
_READ_ATTEMPTS = 4
_QUOTE_CONCURRENCY = 4
_TOKEN_SENDS = 3  # a request sent with at most this many tokens before credentials are blamed
_LIST_TIME = "%Y-%m-%d %H:%M:%S"
# Transport failures the helper below can be given.
TransportFailure = aiohttp.ClientError | TimeoutError | ValueError | AnswerTooLarge


@dataclass(frozen=True, slots=True)
class _TryAgain:
    """A read that failed in a way worth repeating (reads move no money)."""

    message: str


@overload
def _map_transport_error(
    exc: TransportFailure, *, topup: Literal[True], what: str = "", provider: str = "alix"
) -> RetryLater | Unknown: ...


@overload
def _map_transport_error(
    exc: TransportFailure, *, topup: Literal[False], what: str = "", provider: str = "alix"
) -> ProviderError | _TryAgain: ...


def _map_transport_error(
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


class AlixProvider:
    """Alix Pay over aiohttp; one instance per run, closed with `aclose()`."""

    name = "alix"
    rules = RULES

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
        card_type: str = TOPUP_CHECK_CARD_TYPE,
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
        self._card_type = card_type
        self._session: aiohttp.ClientSession | None = None
        self.tokens = TokenManager(
            credentials, self._post_unauthenticated, clock=clock, retry_delay=retry_delay
        )

    def __repr__(self) -> str:  # never show credentials or tokens
        return f"AlixProvider(base_url={self._base!r})"

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
            "Alix refused a freshly renewed access token (HTTP 401): check the Alix credentials"
        )

    # -- topups -----------------------------------------------------------------------------

    async def topup(self, card_id: str, amount: Decimal) -> Outcome:
        if amount != quantize_cents(amount):
            return Refused(
                RefusalCode.INVALID_AMOUNT, f"{amount} has more than two decimals: not sent"
            )
        body = json.dumps({"cardId": card_id, "amount": format_amount(amount)})

        async def send(token: AccessToken) -> Outcome:
            answer = await self._send("POST", TOPUP_PATH, body, token)
            return classify_topup(answer, card_id, amount)

        try:
            outcome = await self._with_token(send)
        except AuthenticationFailed:
            raise
        except ProviderError as exc:
            # No token could be had (the token calls map every failure to this), so the
            # topup was never sent.
            return RetryLater(RetryKind.TRANSIENT, f"no access token: {exc}")
        except (AnswerTooLarge, aiohttp.ClientError, TimeoutError, ValueError) as exc:
            return _map_transport_error(exc, topup=True, provider=self.name)
        if isinstance(outcome, RetryLater) and outcome.kind is RetryKind.RATE_LIMITED:
            self._throttle.slow_down(outcome.after)
        return outcome

    async def topup_check(self, card_type: str, amount: Decimal) -> tuple[Decimal, Decimal]:
        """(netAmount, fee) Alix quotes for a topup of `amount` on a card of `card_type`."""
        body = json.dumps({"cardType": card_type, "amount": format_amount(amount)})
        data = await self._read("POST", TOPUP_CHECK_PATH, body)
        if not isinstance(data, Mapping):
            raise ProviderError(f"Alix POST {TOPUP_CHECK_PATH}: no data in the answer")
        try:
            return parse_provider_decimal(data.get("netAmount")), parse_provider_decimal(
                data.get("fee")
            )
        except ValueError as exc:
            raise ProviderError(f"Alix POST {TOPUP_CHECK_PATH}: {exc}") from None

    # -- reads ------------------------------------------------------------------------------

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
                failure = _map_transport_error(
                    exc, topup=False, what=f"{method} {path}", provider=self.name
                )
                if isinstance(failure, ProviderError):
                    raise failure from None
                last = failure.message
            else:
                try:
                    payload = loads_exact(answer.body)
                except ValueError:
                    payload = None
                said = f"HTTP {answer.status}"
                if message := envelope_message(payload):
                    said = f"{said}: {message}"
                if answer.status == 429:
                    after = parse_retry_after(answer.retry_after)
                    self._throttle.slow_down(after)
                    wait = wait if after is None else after
                    last = said
                elif answer.status == 408 or answer.status >= 500:
                    last = said
                elif not 200 <= answer.status < 300:
                    raise ProviderError(f"Alix {method} {path}: {said}")
                elif not isinstance(payload, Mapping):
                    last = f"HTTP {answer.status} with a body that is not a JSON envelope"
                elif payload.get("success") is True:
                    return payload.get("data")
                else:
                    raise ProviderError(f"Alix {method} {path}: {said}")
            if attempt < _READ_ATTEMPTS:
                await anyio.sleep(wait)
        raise ProviderError(f"Alix {method} {path} failed {_READ_ATTEMPTS} times: {last}")

    async def transactions(
        self, card_id: str, *, since: datetime | None = None, status: str | None = None
    ) -> list[AlixTopupRecord]:
        """The card's TopupCard transactions created at or after `since`, newest first.

        Every page is read (`totalPage`); an item seen twice because a new topup shifted the
        pages is kept once. Raises ProviderError when the list cannot be read in full.
        """
        params = {"type": TOPUP_TYPE}
        if status is not None:
            params["status"] = status
        floor: int | None = None
        if since is not None:
            if since.tzinfo is None:
                raise ValueError("since must be timezone-aware")
            floor = math.floor(since.timestamp())
            params["from"] = (since - LIST_WINDOW_MARGIN).astimezone(UTC).strftime(_LIST_TIME)
        try:
            base_path = f"/cards/{quote(card_id, safe='')}/transactions"
        except UnicodeEncodeError:
            raise ProviderError("Alix GET transactions: the card id is not valid text") from None
        records: dict[str, AlixTopupRecord] = {}
        page, total = 1, 1
        while page <= total:
            if page > _MAX_PAGES:
                raise ProviderError(f"Alix GET {base_path}: more than {_MAX_PAGES} pages")
            query = urlencode(
                {**params, "page": str(page), "pageSize": str(PAGE_SIZE)}, quote_via=quote
            )
            data = await self._read("GET", f"{base_path}?{query}")
            items, total = page_items(data, base_path, page)
            for item in items:
                try:
                    record = parse_transaction(item)
                except ValueError as exc:
                    raise ProviderError(f"Alix GET {base_path}: {exc}") from None
                if record is None:
                    continue
                if record.card_id is not None and not same_card_id(record.card_id, card_id):
                    # The list is not the one asked for: nothing in it can be trusted.
                    raise ProviderError(
                        f"Alix GET {base_path}: the list holds card {record.card_id}'s topups"
                    )
                if floor is not None and record.created_at < floor:
                    continue
                if status is not None and record.status != status:
                    continue
                records.setdefault(record.transaction_id, record)
            page += 1
        return sorted(records.values(), key=lambda r: r.created_at, reverse=True)

    # -- settling and reconciling ------------------------------------------------------------

    # -- settling and reconciling ------------------------------------------------------------

    async def settle(
        self, card_id: str, amount: Decimal, provider_ref: str
    ) -> Applied | Refused | StillPending:
        """The final status of the pending topup (card, amount, createdAt) from the list;
        `provider_ref` is the createdAt its answer carried (`Applied.provider_ref`).

        StillPending while it is pending, not yet listed, ambiguous or in a status nobody
        documented (`alix_settle.settle_from`). Raises ProviderError when the list cannot be
        read.
        """
        try:
            created_at = unix_seconds(provider_ref)
        except ValueError:
            log.warning("alix.settle.bad_ref", card_id=card_id, provider_ref=provider_ref)
            return StillPending("the provider reference is not a createdAt")
        since = datetime.fromtimestamp(created_at, UTC)
        records = await self.transactions(card_id, since=since)
        return settle_from(records, card_id, amount, created_at)

    async def reconcile(
        self,
        card_id: str,
        amount: Decimal,
        before: CardState | None,
        *,
        sent_at: datetime | None = None,
        known_refs: Collection[str] = (),
    ) -> Settlement:
        """Whether a topup whose answer was lost reached Alix, from the card's transactions.

        `before` is accepted for the protocol and unused (Alix documents no card read).
        `sent_at` is when the request left; `known_refs` holds the createdAt of this
        card's topups the ledger already records, which can therefore not be the lost one.
        """
        if sent_at is None:
            return Unknown("no send time for the lost topup: the transactions cannot be searched")
        try:
            # `transactions` leaves out what was created before `since`.
            records = await self.transactions(card_id, since=sent_at - CLOCK_SKEW)
        except AuthenticationFailed:
            raise
        except ProviderError as exc:
            return Unknown(f"could not read the card's transactions to reconcile: {exc}")
        return reconcile_from(records, card_id, amount, known_refs)

    async def fee_estimates(self, amounts: Sequence[Decimal]) -> Mapping[Decimal, Decimal]:
        """The fee topup-check quotes for each amount. A quote is advice for preflight: one
        that fails is logged and left out rather than stopping the run."""
        fees: dict[Decimal, Decimal] = {}
        refused: list[AuthenticationFailed] = []
        limiter = anyio.CapacityLimiter(_QUOTE_CONCURRENCY)

        async def quote_one(amount: Decimal, scope: anyio.CancelScope) -> None:
            async with limiter:
                try:
                    _, fee = await self.topup_check(self._card_type, amount)
                except AuthenticationFailed as exc:
                    # Raised below, as itself: out of a task group it would be an ExceptionGroup.
                    refused.append(exc)
                    scope.cancel()
                    return
                except ProviderError as exc:
                    log.warning(
                        "alix.fee_quote.failed", amount=format_amount(amount), error=str(exc)
                    )
                    return
            fees[amount] = fee

        async with anyio.create_task_group() as tg:
            for amount in amounts:
                tg.start_soon(quote_one, amount, tg.cancel_scope)
        if refused:
            raise refused[0]
        return fees

    # -- what Alix does not document ----------------------------------------------------------

    async def wallet_balance(self) -> Decimal:
        raise NotDocumented("wallet-balance")

    async def get_card(self, card_id: str) -> CardState | None:
        raise NotDocumented("card-read")

    async def list_cards(self) -> Mapping[str, CardState]:
        raise NotDocumented("card-list")
