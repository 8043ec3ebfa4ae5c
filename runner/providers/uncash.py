"""The Uncash adapter: aiohttp requests out, the closed set of outcomes back.

Every answer Uncash can give is classified in `classify_topup()`, and every way a request
can fail in `UncashProvider.topup()`'s handlers: nowhere else decides what a status, a
message or a dropped connection means. Uncash documents its error messages but not the
HTTP statuses that carry them, so messages are read first; only the refusals it documents
are final, and an applied answer is checked against the card and amount sent.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import sys
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from decimal import Decimal
from typing import Any
from urllib.parse import quote

import aiohttp
import structlog

from runner.errors import AuthenticationFailed, ConfigError, ProviderError
from runner.money import format_amount, parse_provider_decimal, quantize_cents
from runner.providers.base import (
    Applied,
    CardState,
    CardStatus,
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
    charged_discrepancy,
    first,
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

log = structlog.get_logger("runner.providers.uncash")

PUBLIC_BASE_URL = "https://api.uncash.io/api/v1"
RULES = ProviderRules(
    min_amount=Decimal("5.00"),
    max_amount=Decimal("10000.00"),
    default_cooldown=120.0,
    supports_idempotency_key=False,
)

_COOLDOWN = re.compile(r"please wait\s+(\d+(?:\.\d+)?)\s+seconds?", re.IGNORECASE)
# The refusals Uncash documents (its topup page and docs/providers.md), each matched by
# the opening words of the envelope's `message`: only these are final. The docs call a topup
# atomic and these are its checks before anything moves (validation, card, limit, wallet).
# Any other refusal, in words or by status, is Unknown: money may have moved, so it is
# reconciled before anything else, never written off as failed and paid again.
_CARD_NOT_FOUND = re.compile(r"card not found or access denied\b", re.I)
_DOCUMENTED_REFUSALS: tuple[tuple[re.Pattern[str], RefusalCode], ...] = (
    (re.compile(r"insufficient wallet balance\b", re.I), RefusalCode.INSUFFICIENT_FUNDS),
    (re.compile(r"topup would exceed card limit\b", re.I), RefusalCode.CARD_LIMIT),
    (_CARD_NOT_FOUND, RefusalCode.CARD_NOT_FOUND),
    (re.compile(r"invalid input data\b", re.I), RefusalCode.INVALID_AMOUNT),
)
# A provider's message is kept to this many characters in outcomes, the ledger and logs.
_MESSAGE_CHARS = 300
# What an HTTP header can carry: the token goes in one, and a control character would be an
# injected header (aiohttp refuses it with a ValueError at every request).
_HEADER_SAFE = re.compile(r"[\x21-\x7e]+")
_GET_ATTEMPTS = 4
# An amount already written with exactly two decimals, and a card id quote() leaves as it is.
_CENTS_TEXT = re.compile(r"(?:0|[1-9][0-9]*)\.[0-9]{2}")
_UNRESERVED = re.compile(r"[A-Za-z0-9_.~-]+")


def _stated(payload: Any) -> str:
    """The envelope's own `message`, as the provider wrote it (documented refusals match it)."""
    if not isinstance(payload, Mapping):
        return ""
    message = payload.get("message")
    return " ".join(message.split()) if isinstance(message, str) else ""


def _message_of(payload: Any) -> str:
    """The message with the validation issues' messages, shortened to one line."""
    message = _stated(payload)
    issues = payload.get("error") if isinstance(payload, Mapping) else None
    if isinstance(issues, list):
        details = [str(i.get("message")) for i in issues[:20] if isinstance(i, Mapping)]
        if details:
            message = f"{message}: {'; '.join(details)}"
    return snippet(message, _MESSAGE_CHARS) if message else ""


def _decimal_field(data: Mapping[str, Any], *names: str) -> Decimal | None:
    for name in names:
        value = data.get(name)
        if value is not None:
            try:
                return parse_provider_decimal(value)
            except ValueError:
                return None
    return None


def _text_field(data: Mapping[str, Any], name: str) -> str | None:
    value = data.get(name)
    return None if value is None else str(value)


def parse_applied(data: Mapping[str, Any], card_id: str, amount: Decimal) -> Applied:
    """Both documented response versions of a successful topup's `data`, checked against the
    card and amount sent: both versions name the card (`card_id`), and `total_charged` is
    documented as amount + fee. An `amount`, undocumented, is checked when present."""
    fee = _decimal_field(data, "platform_fee_amount", "platform_fee")
    total = _decimal_field(data, "total_charged")
    return Applied(
        fee=fee,
        total_charged=total,
        card_balance_after=_decimal_field(data, "new_card_balance", "new_balance"),
        wallet_balance_after=_decimal_field(data, "wallet_balance"),
        transaction_id=_text_field(data, "transaction_id"),
        invoice_id=_text_field(data, "invoice_id"),
        discrepancy=first(
            card_discrepancy(data.get("card_id"), card_id),
            amount_discrepancy(data.get("amount"), amount),
            charged_discrepancy(total, fee, amount),
        ),
    )


def classify_topup(answer: HttpAnswer, card_id: str, amount: Decimal) -> Outcome:
    """Give an HTTP answer to the topup of `amount` on `card_id` its meaning; the only place
    that does.

    Messages are read before statuses because Uncash documents its messages but not the
    statuses that carry them. A 5xx may come from a proxy after the topup applied, so it
    is Unknown; so is a refusal Uncash does not document. A 401 stops the run (raised),
    since no row can succeed without credentials.
    """
    try:
        payload = loads_exact(answer.body)
    except ValueError:
        payload = None
    message = _message_of(payload)

    if answer.status == 401:
        raise AuthenticationFailed(
            "Uncash refused the API token (HTTP 401): check UNCASH_API_TOKEN"
        )
    if wait := _COOLDOWN.search(message):
        return RetryLater(RetryKind.COOLDOWN, message, after=float(wait.group(1)))
    if answer.status == 429:
        return RetryLater(
            RetryKind.RATE_LIMITED,
            message or "HTTP 429 Too Many Requests",
            after=parse_retry_after(answer.retry_after),
        )
    if 200 <= answer.status < 300:
        if isinstance(payload, Mapping) and payload.get("success") is True:
            data = payload.get("data")
            return parse_applied(data if isinstance(data, Mapping) else {}, card_id, amount)
        if isinstance(payload, Mapping) and payload.get("success") is False:
            return _refusal(answer.status, payload, message)
        return Unknown(f"HTTP {answer.status} with an unreadable body: {snippet(answer.body)}")
    if answer.status == 408:
        return RetryLater(RetryKind.TRANSIENT, "HTTP 408 Request Timeout")
    if 400 <= answer.status < 500:
        return _refusal(answer.status, payload, message or snippet(answer.body))
    return Unknown(f"HTTP {answer.status}: {message or snippet(answer.body)}")


def _refusal(status: int, payload: Any, message: str) -> Refused | Unknown:
    """A documented refusal is final; any other may have followed money that moved."""
    stated = _stated(payload)
    for pattern, code in _DOCUMENTED_REFUSALS:
        if pattern.match(stated):
            return Refused(code, message)
    return Unknown(f"HTTP {status}, a refusal Uncash does not document: {message or '(none)'}")


def _card_state(data: Mapping[str, Any]) -> CardState:
    status_text = str(data.get("status") or "").lower()
    try:
        status = CardStatus(status_text)
    except ValueError:
        status = CardStatus.UNKNOWN
    balance = _decimal_field(data, "balance")
    if balance is None:
        raise ValueError("card without a readable balance")
    return CardState(
        card_id=str(data.get("id") or data.get("card_id") or ""),
        status=status,
        balance=balance,
        deposit=_decimal_field(data, "deposit"),
        currency=str(data.get("currency") or "USD"),
    )


def _loads_card_list(body: str) -> Any:
    """The `GET /cards` answer, each card becoming a CardState as soon as it is parsed.

    The listing holds every card of the account in one answer (hundreds of thousands for a
    large job): as parsed dicts of eleven fields they took about 1 kB each, several hundred MB
    at once; this way each dict goes as soon as it is read. Cards with the same balance (by
    its exact text) share one Decimal. A card whose balance cannot be read stays a dict and is
    left out, as before.
    """
    shared: dict[str, Decimal] = {}
    statuses: dict[str, CardStatus] = {}

    def money(value: Decimal) -> Decimal:
        return shared.setdefault(str(value), value)

    def card(item: dict[str, Any]) -> Any:
        balance, deposit = item.get("balance"), item.get("deposit")
        card_id = item.get("id") or item.get("card_id")
        if card_id is None or balance is None:
            return item
        status, currency = item.get("status"), item.get("currency") or "USD"
        if (
            type(balance) is Decimal
            and (deposit is None or type(deposit) is Decimal)
            and type(status) is str
            and type(currency) is str
        ):
            # The shape every listed card has, parsed exactly with parse_float=Decimal:
            # what _card_state would make of it, at a third of the cost.
            known = statuses.get(status)
            if known is None:
                known = statuses[status] = _card_state({"status": status, "balance": 0}).status
            return CardState(
                card_id=str(card_id),
                status=known,
                balance=money(balance),
                deposit=None if deposit is None else money(deposit),
                currency=sys.intern(currency),
            )
        try:
            state = _card_state(item)
        except ValueError:
            return item
        return CardState(
            card_id=state.card_id,
            status=state.status,
            balance=money(state.balance),
            deposit=None if state.deposit is None else money(state.deposit),
            currency=sys.intern(state.currency),
        )

    try:
        return json.loads(body, parse_float=Decimal, object_hook=card)
    except RecursionError:
        raise ValueError("JSON nested too deeply to read") from None


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

    async def topup(
        self, card_id: str, amount: Decimal, *, idempotency_key: str | None = None
    ) -> Outcome:
        # Uncash takes no idempotency key; the argument exists for providers that do.
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
        except AnswerTooLarge as exc:
            return Unknown(f"HTTP {status}: {exc}")
        except aiohttp.ClientConnectorError as exc:
            # The TCP connection was never made: the request cannot have been seen.
            return RetryLater(RetryKind.TRANSIENT, f"cannot connect: {exc.os_error or exc}")
        except (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError) as exc:
            # Refused before any connection was made (check_base_url keeps this from happening).
            return RetryLater(RetryKind.TRANSIENT, f"not sent: {transport_message(exc)}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            return Unknown(transport_message(exc))
        except ValueError as exc:
            # aiohttp refuses some requests (a header it will not send) and answers with a
            # plain ValueError; without knowing where it stopped, the topup may have been sent.
            return Unknown(f"{type(exc).__name__}: {snippet(exc)}")
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
            except AnswerTooLarge as exc:
                raise ProviderError(f"Uncash GET {path}: {exc}") from None
            except (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError) as exc:
                raise ProviderError(f"Uncash GET {path}: {transport_message(exc)}") from None
            except aiohttp.ClientError as exc:
                last = transport_message(exc)
            except TimeoutError:
                last = "timed out"
            except ValueError as exc:
                raise ProviderError(f"Uncash GET {path}: {snippet(exc)}") from None
            else:
                if answer.status == 401:
                    raise AuthenticationFailed(
                        "Uncash refused the API token (HTTP 401): check UNCASH_API_TOKEN"
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
        raise ProviderError(f"Uncash GET {path} failed {_GET_ATTEMPTS} times: {last}")

    async def _get_data(
        self, path: str, loads: Callable[[str], Any] = loads_exact, *, limit: int = MAX_ANSWER_BYTES
    ) -> Any:
        status, payload = await self._get(path, loads, limit=limit)
        if status == 200 and isinstance(payload, Mapping) and payload.get("success") is True:
            return payload.get("data")
        raise ProviderError(f"Uncash GET {path}: HTTP {status}: {_message_of(payload) or payload}")

    async def wallet_balance(self) -> Decimal:
        data = await self._get_data("/wallet/balance")
        balance = _decimal_field(data, "balance") if isinstance(data, Mapping) else None
        if balance is None:
            raise ProviderError("Uncash GET /wallet/balance: no readable balance in the answer")
        return balance

    async def fee_estimates(self, amounts: Sequence[Decimal]) -> Mapping[Decimal, Decimal]:
        """Uncash quotes no fee in advance (only `platform_fee_amount` after the fact)."""
        return {}

    async def get_card(self, card_id: str) -> CardState | None:
        try:
            path = f"/cards/{quote(card_id, safe='')}"
        except UnicodeEncodeError:
            raise ProviderError("Uncash GET /cards/{id}: the card id is not valid text") from None
        status, payload = await self._get(path)
        message = _message_of(payload)
        if status < 500 and _CARD_NOT_FOUND.match(_stated(payload)):
            return None
        if status == 404:
            # Not the documented card refusal: most likely a wrong --base-url.
            raise ProviderError(
                f"Uncash GET {path}: HTTP 404 {message or 'without a message'}: check --base-url"
            )
        if status != 200 or not isinstance(payload, Mapping) or payload.get("success") is not True:
            raise ProviderError(f"Uncash GET {path}: HTTP {status}: {_message_of(payload)}")
        data = payload.get("data")
        try:
            return _card_state(data if isinstance(data, Mapping) else {})
        except ValueError as exc:
            raise ProviderError(f"Uncash GET {path}: {exc}") from None

    async def list_cards(self) -> Mapping[str, CardState]:
        # Every card of the account in one answer: the one read allowed past a MiB.
        data = await self._get_data("/cards", _loads_card_list, limit=MAX_CARD_LIST_BYTES)
        cards = data.get("cards") if isinstance(data, Mapping) else None
        if not isinstance(cards, list):
            raise ProviderError("Uncash GET /cards: no card list in the answer")
        return {item.card_id: item for item in cards if isinstance(item, CardState)}

    async def _latest_credit(self, card_id: str, amount: Decimal) -> str | None:
        """The id of the card's newest credit of `amount`, if the transactions list shows one.

        Only an enrichment for a topup already proven applied: the docs do not say whether
        topups appear in this list, so any failure here just leaves the id unknown.
        """
        path = f"/cards/transactions?card_id={quote(card_id, safe='')}&limit=10&page=1"
        try:
            items = _transaction_items(await self._get_data(path))
        except ProviderError:
            return None
        for item in items:
            if not isinstance(item, Mapping) or str(item.get("side", "Credit")) != "Credit":
                continue
            if _decimal_field(item, "amount") == amount and item.get("id") is not None:
                return str(item["id"])
        return None

    async def settle(
        self, card_id: str, amount: Decimal, provider_ref: str
    ) -> Applied | Refused | None:
        """Uncash applies topups at once: nothing is ever pending."""
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
                source="reconciled",
            )
        return Unknown(
            f"the card's deposit moved by {format_amount(moved)}, "
            f"neither 0 nor the amount {format_amount(amount)}"
        )


def _transaction_items(data: Any) -> list[Any]:
    """The list of a transactions page, whatever the container key (it is undocumented)."""
    if isinstance(data, list):
        return data
    if isinstance(data, Mapping):
        for key in ("transactions", "items", "data"):
            if isinstance(data.get(key), list):
                return list(data[key])
    return []
