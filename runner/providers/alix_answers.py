"""What an Alix answer means: the ASSUMPTIONS the docs leave open, one name each, the topup
answer classified in `classify_topup()`, and a transactions list read into exact records.

No I/O here (`alix.py` sends). Only refusals named in FINAL_REFUSALS are final, and an accepted
answer is checked against what was sent.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import Any

from runner.errors import AccessTokenRejected, ProviderError
from runner.money import parse_provider_decimal
from runner.providers.alix_auth import envelope_message, token_rejected
from runner.providers.base import (
    Applied,
    Outcome,
    ProviderRules,
    RefusalCode,
    Refused,
    RetryKind,
    RetryLater,
    Unknown,
)
from runner.providers.checks import (
    amount_discrepancy,
    card_discrepancy,
    first,
    moved_discrepancy,
    same_card_id,
)
from runner.providers.http import HttpAnswer, loads_exact, parse_retry_after, snippet

TOPUP_TYPE = "TopupCard"
PAGE_SIZE = 50

# -- ASSUMPTIONS: what the Alix docs leave unsaid, each named once (docs/providers.md) ------

# ASSUMPTION (amount rules): Alix publishes no minimum, maximum or cooldown for a topup.
# Documented: no wallet, card or card-list read.
RULES = ProviderRules(
    min_amount=Decimal("10.00"),
    max_amount=Decimal("10000.00"),
    default_cooldown=0.0,
    reads_cards=False,
    reads_wallet=False,
    currency="USDT",  # the topup page: "amount ... in USDT"
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
            fee=optional_decimal(item, "fee"),
            status=status,
            balance_before=optional_decimal(item, "balanceBefore"),
            balance_after=optional_decimal(item, "balanceAfter"),
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


def optional_decimal(data: Mapping[str, Any], name: str) -> Decimal | None:
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
        raise AccessTokenRejected(
            "Alix refused the access token (HTTP 401)", provider="alix", card_id=card_id, status=401
        )
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


@dataclass(frozen=True, slots=True)
class ReadData:
    """A read answered: the envelope's `data`."""

    data: Any


@dataclass(frozen=True, slots=True)
class ReadAgain:
    """A read worth asking again (408, 429, 5xx, a body that is not an envelope): reads move
    no money. `after` is a 429's Retry-After, which `rate_limited` says to honour."""

    message: str
    rate_limited: bool = False
    after: float | None = None


def classify_read(answer: HttpAnswer, what: str, *, provider: str = "alix") -> ReadData | ReadAgain:
    """Give the answer to a call that moves no money (`what`: "GET /path") its meaning; raises
    ProviderError for a refusal that asking again would not change."""
    try:
        payload = loads_exact(answer.body)
    except ValueError:
        payload = None
    status = answer.status
    said = f"HTTP {status}"
    if message := envelope_message(payload):
        said = f"{said}: {message}"
    if status == 429:
        return ReadAgain(said, rate_limited=True, after=parse_retry_after(answer.retry_after))
    if status == 408 or status >= 500:
        return ReadAgain(said)
    if not 200 <= status < 300:
        raise ProviderError(f"Alix {what}: {said}", provider=provider, status=status)
    if not isinstance(payload, Mapping):
        return ReadAgain(f"HTTP {status} with a body that is not a JSON envelope")
    if payload.get("success") is True:
        return ReadData(payload.get("data"))
    raise ProviderError(f"Alix {what}: {said}", provider=provider, status=status)


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
    before = optional_decimal(data, "balanceBefore")
    after = optional_decimal(data, "balanceAfter")
    return Applied(
        fee=optional_decimal(data, "fee"),
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


def applied_from_record(record: AlixTopupRecord, amount: Decimal, *, pending: bool) -> Applied:
    """The listed topup as an outcome; the record matched the card and amount (same_topup),
    so only its balance pair is left to check (ASSUMPTION "what an accepted answer says")."""
    return Applied(
        fee=record.fee,
        card_balance_before=record.balance_before,
        card_balance_after=record.balance_after,
        transaction_id=record.transaction_id,
        pending=pending,
        provider_ref=str(record.created_at),
        discrepancy=moved_discrepancy(
            record.balance_before, record.balance_after, amount, may_not_have_moved=pending
        ),
    )


def page_items(data: Any, path: str, page: int) -> tuple[list[Any], int]:
    """A page's items and the page count it states; ProviderError if either is unreadable."""
    if not isinstance(data, Mapping) or not isinstance(data.get("items"), list):
        raise ProviderError(f"Alix GET {path}: page {page} has no items list", provider="alix")
    items: list[Any] = data["items"]
    total = data.get("totalPage")
    if isinstance(total, int) and not isinstance(total, bool) and total >= 0:
        return items, total
    if total is None and len(items) < PAGE_SIZE:
        return items, page  # a short page is the last one, count or no count
    raise ProviderError(f"Alix GET {path}: page {page} has no readable totalPage", provider="alix")
