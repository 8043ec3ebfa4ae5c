"""What an Uncash answer means: every topup answer classified in `classify_topup()`, and the
card, card-list and transactions bodies read exactly. No I/O here: `uncash.py` sends.

Uncash documents its error messages but not the HTTP statuses that carry them, so messages are
read first; only the refusals it documents are final, and an applied answer is checked against
the card and amount sent.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from runner.errors import AuthenticationFailed
from runner.money import parse_provider_decimal
from runner.providers.base import (
    Applied,
    CardState,
    CardStatus,
    Outcome,
    RefusalCode,
    Refused,
    RetryKind,
    RetryLater,
    Unknown,
)
from runner.providers.checks import (
    amount_discrepancy,
    card_discrepancy,
    charged_discrepancy,
    first,
)
from runner.providers.http import HttpAnswer, loads_exact, parse_retry_after, snippet

_COOLDOWN = re.compile(r"please wait\s+(\d+(?:\.\d+)?)\s+seconds?", re.IGNORECASE)
# The refusals Uncash documents (its topup page and docs/providers.md), each matched by
# the opening words of the envelope's `message`: only these are final. The docs call a topup
# atomic and these are its checks before anything moves (validation, card, limit, wallet).
# Any other refusal, in words or by status, is Unknown: money may have moved, so it is
# reconciled before anything else, never written off as failed and paid again.
CARD_NOT_FOUND = re.compile(r"card not found or access denied\b", re.I)
_DOCUMENTED_REFUSALS: tuple[tuple[re.Pattern[str], RefusalCode], ...] = (
    (re.compile(r"insufficient wallet balance\b", re.I), RefusalCode.INSUFFICIENT_FUNDS),
    (re.compile(r"topup would exceed card limit\b", re.I), RefusalCode.CARD_LIMIT),
    (CARD_NOT_FOUND, RefusalCode.CARD_NOT_FOUND),
    (re.compile(r"invalid input data\b", re.I), RefusalCode.INVALID_AMOUNT),
)
# A provider's message is kept to this many characters in outcomes, the ledger and logs.
_MESSAGE_CHARS = 300


def stated_message(payload: Any) -> str:
    """The envelope's own `message`, as the provider wrote it (documented refusals match it)."""
    if not isinstance(payload, Mapping):
        return ""
    message = payload.get("message")
    return " ".join(message.split()) if isinstance(message, str) else ""


def message_of(payload: Any) -> str:
    """The message with the validation issues' messages, shortened to one line."""
    message = stated_message(payload)
    issues = payload.get("error") if isinstance(payload, Mapping) else None
    if isinstance(issues, list):
        details = [str(i.get("message")) for i in issues[:20] if isinstance(i, Mapping)]
        if details:
            message = f"{message}: {'; '.join(details)}"
    return snippet(message, _MESSAGE_CHARS) if message else ""


def decimal_field(data: Mapping[str, Any], *names: str) -> Decimal | None:
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
    fee = decimal_field(data, "platform_fee_amount", "platform_fee")
    total = decimal_field(data, "total_charged")
    return Applied(
        fee=fee,
        total_charged=total,
        card_balance_after=decimal_field(data, "new_card_balance", "new_balance"),
        wallet_balance_after=decimal_field(data, "wallet_balance"),
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
    message = message_of(payload)

    if answer.status == 401:
        raise AuthenticationFailed(
            "Uncash refused the API token (HTTP 401): check UNCASH_API_TOKEN",
            provider="uncash",
            card_id=card_id,
            status=401,
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
    stated = stated_message(payload)
    for pattern, code in _DOCUMENTED_REFUSALS:
        if pattern.match(stated):
            return Refused(code, message)
    return Unknown(f"HTTP {status}, a refusal Uncash does not document: {message or '(none)'}")


def card_state(data: Mapping[str, Any]) -> CardState:
    status_text = str(data.get("status") or "").lower()
    try:
        status = CardStatus(status_text)
    except ValueError:
        status = CardStatus.UNKNOWN
    balance = decimal_field(data, "balance")
    if balance is None:
        raise ValueError("card without a readable balance")
    return CardState(
        card_id=str(data.get("id") or data.get("card_id") or ""),
        status=status,
        balance=balance,
        deposit=decimal_field(data, "deposit"),
        currency=str(data.get("currency") or "USD"),
    )


def loads_card_list(body: str) -> Any:
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
            # what card_state would make of it, at a third of the cost.
            known = statuses.get(status)
            if known is None:
                known = statuses[status] = card_state({"status": status, "balance": 0}).status
            return CardState(
                card_id=str(card_id),
                status=known,
                balance=money(balance),
                deposit=None if deposit is None else money(deposit),
                currency=sys.intern(currency),
            )
        try:
            state = card_state(item)
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


def transaction_items(data: Any) -> list[Any]:
    """The list of a transactions page, whatever the container key (it is undocumented)."""
    if isinstance(data, list):
        return data
    if isinstance(data, Mapping):
        for key in ("transactions", "items", "data"):
            if isinstance(data.get(key), list):
                return list(data[key])
    return []
