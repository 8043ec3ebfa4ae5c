"""The Alix Pay adapter: string amounts, expiring tokens, topups that answer `Pending`.

What an answer means is decided in `alix_answers.py` (`classify_topup()`, and the ASSUMPTIONS
the docs leave open), what a request that got no answer means in `map_transport_error()`, and
what the transactions list says of one topup in `alix_settle.py`. This module only sends.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import TypeVar
from urllib.parse import quote, urlencode

import aiohttp
import anyio
import structlog

from runner.errors import (
    AuthenticationFailed,
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
)
from runner.providers.alix_session import AlixSession, map_transport_error
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
)
from runner.providers.checks import same_card_id
from runner.providers.http import (
    AnswerTooLarge,
)

log = structlog.get_logger("runner.providers.alix")

T = TypeVar("T")

TOPUP_PATH = "/cards/topup"
TOPUP_CHECK_PATH = "/cards/topup-check"
_MAX_PAGES = 100  # 5,000 topups since the window opened: beyond that, something is wrong
_QUOTE_CONCURRENCY = 4
_LIST_TIME = "%Y-%m-%d %H:%M:%S"


class AlixProvider(AlixSession):
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
        super().__init__(
            credentials,
            base_url=base_url,
            timeout=timeout,
            concurrency=concurrency,
            throttle=throttle,
            clock=clock,
            retry_delay=retry_delay,
            name=name,
        )
        self._card_type = card_type

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
            return map_transport_error(exc, topup=True, provider=self.name)
        if isinstance(outcome, RetryLater) and outcome.kind is RetryKind.RATE_LIMITED:
            self._throttle.slow_down(outcome.after)
        return outcome

    async def topup_check(self, card_type: str, amount: Decimal) -> tuple[Decimal, Decimal]:
        """(netAmount, fee) Alix quotes for a topup of `amount` on a card of `card_type`."""
        body = json.dumps({"cardType": card_type, "amount": format_amount(amount)})
        data = await self._read("POST", TOPUP_CHECK_PATH, body)
        if not isinstance(data, Mapping):
            raise ProviderError(
                f"Alix POST {TOPUP_CHECK_PATH}: no data in the answer", provider=self.name
            )
        try:
            return parse_provider_decimal(data.get("netAmount")), parse_provider_decimal(
                data.get("fee")
            )
        except ValueError as exc:
            raise ProviderError(
                f"Alix POST {TOPUP_CHECK_PATH}: {exc}", provider=self.name
            ) from None

    # -- reads ------------------------------------------------------------------------------

    # -- reads ------------------------------------------------------------------------------

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
            raise ProviderError(
                "Alix GET transactions: the card id is not valid text",
                provider=self.name,
                card_id=card_id,
            ) from None
        records: dict[str, AlixTopupRecord] = {}
        page, total = 1, 1
        while page <= total:
            if page > _MAX_PAGES:
                raise ProviderError(
                    f"Alix GET {base_path}: more than {_MAX_PAGES} pages",
                    provider=self.name,
                    card_id=card_id,
                )
            query = urlencode(
                {**params, "page": str(page), "pageSize": str(PAGE_SIZE)}, quote_via=quote
            )
            data = await self._read("GET", f"{base_path}?{query}")
            items, total = page_items(data, base_path, page)
            for item in items:
                try:
                    record = parse_transaction(item)
                except ValueError as exc:
                    raise ProviderError(
                        f"Alix GET {base_path}: {exc}", provider=self.name, card_id=card_id
                    ) from None
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
        # The token first, and not as advice: with no other documented read, this is where
        # preflight learns whether Alix can be used at all (unreachable: exit 69, nothing
        # sent; credentials refused: exit 2), rather than from every row failing to connect.
        await self.tokens.current()
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
