"""The values the simulated Alix account deals in: its topup records and results, tokens,
counters, webhook deliveries, error codes, and how amounts, times and signed texts are spelled.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from runner.sandbox.faults import FaultKind
from runner.sandbox.state import (
    CardInactive,
    CardNotFound,
    InsufficientFunds,
    InvalidAmount,
    decimal_places,
)

_AMOUNT_TEXT = re.compile(r"(?:0|[1-9][0-9]*)(?:\.([0-9]+))?")
_TIME_TEXT = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}")
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
OK_MESSAGE = "Your request has been successful"
TOPUP_TYPE = "TopupCard"
TOPUP_DESCRIPTION = "Topup card"


class TopupStatus(enum.StrEnum):
    PENDING = "Pending"
    SUCCESS = "Success"
    FAILED = "Failed"


class ErrorCode(enum.IntEnum):
    """The sandbox's `errorCode` values (Alix publishes no table; 0 is success)."""

    OK = 0
    INVALID_REQUEST = 1
    INVALID_AMOUNT = 2
    UNAUTHORIZED = 3
    TOKEN_EXPIRED = 4
    CARD_NOT_FOUND = 5
    CARD_INACTIVE = 6
    INSUFFICIENT_BALANCE = 7
    TOO_MANY_REQUESTS = 8
    INTERNAL_ERROR = 9
    ROUTE_NOT_FOUND = 10


def partner_message(partner_code: str, secret_key: str) -> str:
    """What the partner signs for the access-token and refresh-token calls."""
    return f"{partner_code}|{secret_key}"


def webhook_message(card_id: str, amount: str, status: str, created_at: int) -> str:
    """What Alix signs in a TopupCard webhook: `amount` as the partner sent it."""
    return f"{card_id}|{amount}|{status}|{created_at}"


def parse_amount(value: object, *, numbers: bool = False) -> Decimal | str:
    """`value` as an exact amount, or the message saying why it is not one.

    A string must be spelled as the module docstring says; a JSON number (int or Decimal) is
    accepted only with `numbers`, judged on its value. Bounds are checked elsewhere.
    """
    if isinstance(value, str):
        match = _AMOUNT_TEXT.fullmatch(value)
        if match is None:
            return f'Invalid amount: {value!r} is not a decimal amount such as "100.00"'
        if match.group(1) is not None and len(match.group(1)) > 2:
            return "Invalid amount: at most 2 decimal places"
        return Decimal(value)
    if numbers and isinstance(value, int | Decimal) and not isinstance(value, bool):
        amount = Decimal(value)
        if not amount.is_finite():
            return "Invalid amount: not a finite number"
        if decimal_places(amount) > 2:
            return "Invalid amount: at most 2 decimal places"
        return amount
    if value is None:
        return "Invalid amount: amount is required"
    return 'Invalid amount: amount must be a string such as "100.00"'


@dataclass(frozen=True, slots=True)
class AlixTopup:
    """One topup Alix accepted (the wallet was charged), as it stands now.

    The record tests and benchmarks judge the runner by: `status` moves from Pending to Success
    or Failed (refunded) when it settles; `accepted_at` and `settled_at` are injected-clock
    values; `fault` names the fault that hid the answer from the client, if any.
    """

    seq: int
    card_id: str
    amount: Decimal
    amount_text: str
    fee: Decimal
    total_charged: Decimal
    created_at: int
    accepted_at: float
    transaction_id: str
    status: TopupStatus
    balance_before: Decimal
    balance_after: Decimal
    wallet_balance_after: Decimal
    settled_at: float | None = None
    fault: FaultKind | None = None


@dataclass(frozen=True, slots=True)
class TopupAccepted:
    record: AlixTopup


AlixTopupResult = TopupAccepted | InvalidAmount | CardNotFound | CardInactive | InsufficientFunds


@dataclass(frozen=True, slots=True)
class Tokens:
    access_token: str
    refresh_token: str
    expires_in: float


class AuthFailure(enum.StrEnum):
    """Why an auth call or an access token was refused (every one is a 401)."""

    BAD_CREDENTIALS = "bad_credentials"
    UNKNOWN_TOKEN = "unknown_token"
    EXPIRED_TOKEN = "expired_token"

    @property
    def code(self) -> ErrorCode:
        expired = self is AuthFailure.EXPIRED_TOKEN
        return ErrorCode.TOKEN_EXPIRED if expired else ErrorCode.UNAUTHORIZED


@dataclass(slots=True)
class AlixCounters:
    """What the runner's token handling and webhook handling are judged by."""

    access_tokens_issued: int = 0
    refreshes: int = 0
    unauthorized: int = 0  # every 401 answered, auth calls included
    expired_tokens: int = 0  # the 401s answered to an access token past its lifetime
    webhooks_delivered: int = 0  # deliveries answered 2xx, duplicates included
    webhook_failures: int = 0  # delivery attempts that failed or got a non-2xx answer
    webhook_duplicates: int = 0  # events sent once more on purpose


@dataclass(frozen=True, slots=True)
class WebhookDelivery:
    """One attempt to POST a webhook: `status` None when no answer came (see `error`)."""

    seq: int
    url: str
    body: str
    status: int | None
    error: str | None
    attempt: int
    duplicate: bool
    card_id: str
    created_at: int
    topup_status: TopupStatus
    at: float

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def parse_time(value: str) -> int | None:
    """Unix seconds of a `YYYY-MM-DD HH:MM:SS` UTC time, or None if it is not one."""
    if _TIME_TEXT.fullmatch(value) is None:
        return None
    try:
        moment = datetime.strptime(value, TIME_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        return None
    return math.floor(moment.timestamp())
