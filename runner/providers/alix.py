"""The Alix Pay adapter: string amounts, expiring tokens, topups that answer `Pending`.

`classify_topup()` alone gives a topup answer its meaning and `topup()`'s handlers alone map a
failed request; what the docs leave unsaid is in the ASSUMPTIONS block, one name each. Only
refusals named there are final, and an accepted answer is checked against what was sent.
"""

from __future__ import annotations

import enum
import json
import math
import re
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar
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
from runner.providers.alix_auth import (
    AccessToken,
    AlixCredentials,
    TokenManager,
    envelope_message,
    token_rejected,
)
from runner.providers.base import (
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
    Throttle,
    Unknown,
    UnlimitedThrottle,
)
from runner.providers.checks import (
    amount_discrepancy,
    card_discrepancy,
    first,
    moved_discrepancy,
    same_card_id,
)
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

TOPUP_TYPE = "TopupCard"
TOPUP_PATH = "/cards/topup"
TOPUP_CHECK_PATH = "/cards/topup-check"
_PAGE_SIZE = 50
_MAX_PAGES = 100  # 5,000 topups since the window opened: beyond that, something is wrong
_READ_ATTEMPTS = 4
_QUOTE_CONCURRENCY = 4
_TOKEN_SENDS = 3  # a request sent with at most this many tokens before credentials are blamed
_LIST_TIME = "%Y-%m-%d %H:%M:%S"

# -- ASSUMPTIONS: what the Alix docs leave unsaid, each named once (docs/providers.md) ------

# ASSUMPTION (amount rules): Alix publishes no minimum, maximum or cooldown for a topup.
# Documented: no idempotency key, and no wallet, card or card-list read.
RULES = ProviderRules(
    min_amount=Decimal("10.00"),
    max_amount=Decimal("10000.00"),
    default_cooldown=0.0,
    supports_idempotency_key=False,
    reads_cards=False,
    reads_wallet=False,
)
# ASSUMPTION (topup-check card type): the fee quote needs a `cardType` the job does not carry;
# the docs' own example value is used unless the provider is built with another.
TOPUP_CHECK_CARD_TYPE = "GEC"


class TopupStatus(enum.StrEnum):
    """ASSUMPTION "TopupCard webhook": a topup is `Pending`, then `Success` or `Failed`.

    Any other value is UNKNOWN: kept visible in messages and logs, never read as either.
    """

    PENDING = "Pending"
    SUCCESS = "Success"
    FAILED = "Failed"
    UNKNOWN = "(unknown)"


def topup_status(value: object) -> TopupStatus:
    """The status a topup answer, transaction or webhook carries; exact spelling only."""
    for status in (TopupStatus.PENDING, TopupStatus.SUCCESS, TopupStatus.FAILED):
        if value == status.value:
            return status
    return TopupStatus.UNKNOWN


def same_topup(
    record: AlixTopupRecord, card_id: str, amount: Decimal, created_at: int | None
) -> bool:
    """ASSUMPTION "Matching": the answer's `createdAt` is the one the webhook and the list carry,
    and with one request in flight per card, (cardId, amount, createdAt) names one topup.
    `created_at` None (a lost answer's) matches any."""
    return (
        (record.card_id is None or _same_card(record.card_id, card_id))
        and record.amount == amount
        and (created_at is None or record.created_at == created_at)
    )


def parse_transaction(item: object) -> AlixTopupRecord | None:
    """ASSUMPTION "Transactions list": items `{id, type, cardId, amount, fee, status,
    balanceBefore, balanceAfter, createdAt}`, newest first. None for another type; ValueError
    for a topup that cannot be read (never skipped: it might be the one being looked for)."""
    if not isinstance(item, Mapping):
        raise ValueError("an item is not an object")
    kind = item.get("type", TOPUP_TYPE)  # we asked for type=TopupCard: absent means that
    if kind != TOPUP_TYPE:
        return None
    ident = item.get("id")
    if isinstance(ident, bool) or not isinstance(ident, str | int) or str(ident).strip() == "":
        raise ValueError(f"a topup without a readable id: {snippet(item)}")
    status = item.get("status")
    if not isinstance(status, str):
        raise ValueError(f"topup {ident} has no readable status")
    card = item.get("cardId")
    try:
        return AlixTopupRecord(
            transaction_id=str(ident),
            card_id=None if card is None else str(card),
            amount=parse_provider_decimal(item.get("amount")),
            fee=_optional_decimal(item, "fee"),
            status=status,
            balance_before=_optional_decimal(item, "balanceBefore"),
            balance_after=_optional_decimal(item, "balanceAfter"),
            created_at=unix_seconds(item.get("createdAt")),
        )
    except ValueError as exc:
        raise ValueError(f"topup {ident}: {exc}") from None


# ASSUMPTION (clock skew): Alix's `createdAt` for a topup is at most this much earlier than our
# clock read just before sending it. A lost answer is looked for from `sent_at` minus this.
CLOCK_SKEW = timedelta(seconds=5)
# ASSUMPTION (time zone of from/to): undocumented. We send UTC, widened by the largest offset
# any zone has, so a server reading it as local time still returns everything; `createdAt`
# (unix seconds, zone-free) then filters exactly.
LIST_WINDOW_MARGIN = timedelta(hours=14)
# ASSUMPTION (list is current): an accepted topup is in the transactions list as soon as its
# answer is sent. Only then does "not in the list" prove "not applied"; set False and a lost
# answer that left no trace becomes Unknown (needs review) instead of NotApplied (resent).
LIST_SHOWS_ACCEPTED_TOPUPS_AT_ONCE = True
# ASSUMPTION (final refusals): Alix publishes no error table, and a refusal it did not mean as
# final may follow money that moved. A refusal is final only when its message opens with the
# words of a check made before anything moves: the wallet, the card, the amount (the words the
# sandbox uses, and the docs' one example, the topup page's 400). Any other refusal, by
# `success: false` or by a 4xx, is Unknown and reconciled from the transactions list.
FINAL_REFUSALS: tuple[tuple[re.Pattern[str], RefusalCode], ...] = (
    (
        re.compile(
            r"(insufficient (wallet |account )?(balance|funds?)|not enough (balance|funds?))\b",
            re.I,
        ),
        RefusalCode.INSUFFICIENT_FUNDS,
    ),
    (re.compile(r"card (not found|does not exist)\b", re.I), RefusalCode.CARD_NOT_FOUND),
    (
        re.compile(r"card is (not active|inactive|frozen|locked|blocked|suspended|closed)\b", re.I),
        RefusalCode.CARD_INACTIVE,
    ),
    (
        re.compile(r"(invalid amount|(minimum|maximum) topup amount is)\b", re.I),
        RefusalCode.INVALID_AMOUNT,
    ),
    (re.compile(r"the qr code is invalid\b", re.I), RefusalCode.REJECTED),
)
# ASSUMPTION (what an accepted answer says): `data.amount` echoes the amount sent (the docs'
# example: "100" sent, 100 answered), a `cardId`, when present, names the card sent, and
# `balanceBefore`/`balanceAfter` are the card's balance around this topup: apart by exactly the
# amount once it is `Success`; while `Pending` they may not have moved yet (the example: 0, 0).
# An answer that says otherwise is still Applied (the provider took it), with a discrepancy.

# -- end of assumptions -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AlixTopupRecord:
    """One TopupCard item of a card's transactions list, money exact."""

    transaction_id: str
    card_id: str | None
    amount: Decimal
    fee: Decimal | None
    status: str
    balance_before: Decimal | None
    balance_after: Decimal | None
    created_at: int


def unix_seconds(value: object) -> int:
    """A `createdAt`: whole unix seconds as a JSON integer or a string of digits."""
    if isinstance(value, bool):
        raise ValueError("createdAt is a boolean")
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    raise ValueError(f"createdAt {repr(value)[:40]} is not whole unix seconds")


def _optional_decimal(data: Mapping[str, Any], name: str) -> Decimal | None:
    """A money field that only enriches an outcome: absent or unreadable is None."""
    try:
        return None if data.get(name) is None else parse_provider_decimal(data[name])
    except ValueError:
        return None


def _same_card(a: str, b: str) -> bool:
    # Card ids that are UUIDs may come back in another spelling (case) than the job wrote.
    return same_card_id(a, b)


# A rate-limit refusal in words: its retry is safe, since Alix turned the request away.
_RATE_LIMITED = re.compile(r"too many requests|rate.?limit", re.I)


def _refusal(status: int, payload: Any, message: str) -> Outcome:
    if _RATE_LIMITED.search(message):
        return RetryLater(RetryKind.RATE_LIMITED, message)
    stated = payload.get("message") if isinstance(payload, Mapping) else None
    stated = " ".join(stated.split()) if isinstance(stated, str) else ""
    for pattern, code in FINAL_REFUSALS:
        if pattern.match(stated):
            return Refused(code, message)
    return Unknown(f"HTTP {status}, a refusal not known to be final: {message}")


def classify_topup(answer: HttpAnswer, card_id: str, amount: Decimal) -> Outcome:
    """Give an HTTP answer to the topup of `amount` on `card_id` its meaning; the only place
    that does.

    Alix refuses either with HTTP 4xx or inside HTTP 200 with `success: false`; only the
    refusals in FINAL_REFUSALS prove nothing was applied, any other is Unknown. A 401 raises
    `AccessTokenRejected` so that the caller renews the token and sends again. A 5xx or an
    unreadable 200 may follow an applied topup: Unknown.
    """
    if token_rejected(answer.status):
        raise AccessTokenRejected("Alix refused the access token (HTTP 401)")
    try:
        payload = loads_exact(answer.body)
    except ValueError:
        payload = None
    message = envelope_message(payload)
    status = answer.status
    if status == 429:
        return RetryLater(
            RetryKind.RATE_LIMITED,
            message or "HTTP 429 Too Many Requests",
            after=parse_retry_after(answer.retry_after),
        )
    if 200 <= status < 300:
        if not isinstance(payload, Mapping):
            return Unknown(f"HTTP {status} with an unreadable body: {snippet(answer.body)}")
        if payload.get("success") is True:
            return _accepted(payload.get("data"), card_id, amount)
        if payload.get("success") is False:
            return _refusal(status, payload, message or "success=false")
        return Unknown(f"HTTP {status} without a success flag: {snippet(answer.body)}")
    if status == 408:
        return RetryLater(RetryKind.TRANSIENT, "HTTP 408 Request Timeout")
    if 400 <= status < 500:
        return _refusal(status, payload, message or snippet(answer.body))
    return Unknown(f"HTTP {status}: {message or snippet(answer.body)}")


def _accepted(data: object, card_id: str, amount: Decimal) -> Outcome:
    """`success: true`: the topup's own status says whether it is pending, settled or failed."""
    if not isinstance(data, Mapping):
        return Unknown(f"accepted (success=true) without a data object: {snippet(data)}")
    status = topup_status(data.get("status"))
    if status is TopupStatus.FAILED:
        return Refused(RefusalCode.REJECTED, "Alix answered the topup with status Failed")
    if status is TopupStatus.UNKNOWN:
        return Unknown(f"accepted with status {data.get('status')!r}, which is not known")
    try:
        created_at: int | None = unix_seconds(data.get("createdAt"))
    except ValueError:
        created_at = None
    if created_at is None and status is TopupStatus.PENDING:
        # Accepted, but nothing could ever settle it: the transactions list, searched by
        # reconciling, finds it and its createdAt.
        return Unknown(
            f"accepted as Pending without a readable createdAt ({data.get('createdAt')!r})"
        )
    pending = status is TopupStatus.PENDING
    before = _optional_decimal(data, "balanceBefore")
    after = _optional_decimal(data, "balanceAfter")
    return Applied(
        fee=_optional_decimal(data, "fee"),
        card_balance_before=before,
        card_balance_after=after,
        pending=pending,
        provider_ref=None if created_at is None else str(created_at),
        # ASSUMPTION "what an accepted answer says".
        discrepancy=first(
            card_discrepancy(data.get("cardId"), card_id),
            amount_discrepancy(data.get("amount"), amount),
            moved_discrepancy(before, after, amount, may_not_have_moved=pending),
        ),
    )


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

    async def topup(
        self, card_id: str, amount: Decimal, *, idempotency_key: str | None = None
    ) -> Outcome:
        # Alix takes no idempotency key; the argument exists for providers that do.
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
        except AnswerTooLarge as exc:
            return Unknown(str(exc))
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            # The TCP connection was never made: the request cannot have been seen.
            return RetryLater(RetryKind.TRANSIENT, f"cannot connect: {transport_message(exc)}")
        except (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError) as exc:
            # Refused before any connection was made (check_base_url keeps this from happening).
            return RetryLater(RetryKind.TRANSIENT, f"not sent: {transport_message(exc)}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            return Unknown(transport_message(exc))
        except ValueError as exc:
            # aiohttp refuses some requests (a header it will not send) with a plain
            # ValueError; without knowing where it stopped, the topup may have been sent.
            return Unknown(f"{type(exc).__name__}: {snippet(exc)}")
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
            except AnswerTooLarge as exc:
                raise ProviderError(f"Alix {method} {path}: {exc}") from None
            except (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError) as exc:
                raise ProviderError(f"Alix {method} {path}: {transport_message(exc)}") from None
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = transport_message(exc)
            except ValueError as exc:
                raise ProviderError(f"Alix {method} {path}: {snippet(exc)}") from None
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
                {**params, "page": str(page), "pageSize": str(_PAGE_SIZE)}, quote_via=quote
            )
            data = await self._read("GET", f"{base_path}?{query}")
            items, total = _page(data, base_path, page)
            for item in items:
                try:
                    record = parse_transaction(item)
                except ValueError as exc:
                    raise ProviderError(f"Alix GET {base_path}: {exc}") from None
                if record is None:
                    continue
                if record.card_id is not None and not _same_card(record.card_id, card_id):
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

    async def settle(
        self, card_id: str, amount: Decimal, provider_ref: str
    ) -> Applied | Refused | None:
        """The final status of the pending topup (card, amount, createdAt) from the list;
        `provider_ref` is the createdAt its answer carried (`Applied.provider_ref`).

        None while it is pending, not yet listed, ambiguous or in a status nobody documented
        (logged as `alix.status.unknown`). Raises ProviderError when the list cannot be read.
        """
        try:
            created_at = unix_seconds(provider_ref)
        except ValueError:
            log.warning("alix.settle.bad_ref", card_id=card_id, provider_ref=provider_ref)
            return None
        since = datetime.fromtimestamp(created_at, UTC)
        records = await self.transactions(card_id, since=since)
        matches = [r for r in records if same_topup(r, card_id, amount, created_at)]
        if len(matches) != 1:
            if matches:
                log.warning(
                    "alix.settle.ambiguous",
                    card_id=card_id,
                    amount=format_amount(amount),
                    created_at=created_at,
                    transaction_ids=[r.transaction_id for r in matches],
                )
            return None
        record = matches[0]
        status = topup_status(record.status)
        if status is TopupStatus.SUCCESS:
            return _applied(record, amount, pending=False)
        if status is TopupStatus.FAILED:
            return Refused(RefusalCode.REJECTED, "the provider reported the topup Failed")
        if status is TopupStatus.UNKNOWN:
            log.warning(
                "alix.status.unknown",
                card_id=card_id,
                created_at=created_at,
                transaction_id=record.transaction_id,
                status=record.status,
            )
        return None

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
        since = sent_at - CLOCK_SKEW
        try:
            records = await self.transactions(card_id, since=since)
        except AuthenticationFailed:
            raise
        except ProviderError as exc:
            return Unknown(f"could not read the card's transactions to reconcile: {exc}")
        # `transactions` already left out what was created before `since`.
        candidates = [
            r
            for r in records
            if same_topup(r, card_id, amount, None) and str(r.created_at) not in known_refs
        ]
        # A Failed topup applied nothing: it may be this attempt's or an earlier one's.
        live = [r for r in candidates if topup_status(r.status) is not TopupStatus.FAILED]
        if len(live) > 1:
            return Unknown(
                f"{len(live)} topups of {format_amount(amount)} since the attempt "
                f"({', '.join(r.transaction_id for r in live)}): cannot tell which is ours"
            )
        if live:
            record = live[0]
            status = topup_status(record.status)
            if status is TopupStatus.UNKNOWN:
                log.warning(
                    "alix.status.unknown",
                    card_id=card_id,
                    created_at=record.created_at,
                    transaction_id=record.transaction_id,
                    status=record.status,
                )
                return Unknown(
                    f"topup {record.transaction_id} has status {record.status!r}, "
                    "which is not known"
                )
            return _applied(record, amount, pending=status is TopupStatus.PENDING)
        if candidates:
            return NotApplied("the topup is listed with status Failed: nothing was applied")
        if not LIST_SHOWS_ACCEPTED_TOPUPS_AT_ONCE:
            return Unknown("no topup listed yet, and the list may lag behind")
        return NotApplied(
            f"no topup of {format_amount(amount)} listed since the attempt: it was not applied"
        )

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


def _applied(record: AlixTopupRecord, amount: Decimal, *, pending: bool) -> Applied:
    """The listed topup as an outcome; the record matched the card and amount (same_topup),
    so only its balance pair is left to check (ASSUMPTION "what an accepted answer says")."""
    return Applied(
        fee=record.fee,
        card_balance_before=record.balance_before,
        card_balance_after=record.balance_after,
        transaction_id=record.transaction_id,
        pending=pending,
        source="reconciled",
        provider_ref=str(record.created_at),
        discrepancy=moved_discrepancy(
            record.balance_before, record.balance_after, amount, may_not_have_moved=pending
        ),
    )


def _page(data: Any, path: str, page: int) -> tuple[list[Any], int]:
    """A page's items and the page count it states; ProviderError if either is unreadable."""
    if not isinstance(data, Mapping) or not isinstance(data.get("items"), list):
        raise ProviderError(f"Alix GET {path}: page {page} has no items list")
    items: list[Any] = data["items"]
    total = data.get("totalPage")
    if isinstance(total, int) and not isinstance(total, bool) and total >= 0:
        return items, total
    if total is None and len(items) < _PAGE_SIZE:
        return items, page  # a short page is the last one, count or no count
    raise ProviderError(f"Alix GET {path}: page {page} has no readable totalPage")
