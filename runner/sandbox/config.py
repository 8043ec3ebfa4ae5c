"""Settings of the sandbox: the account it starts with, the pacing it enforces, the faults it
injects and, when partner credentials are given, how its Alix side behaves. Validated once in
`__post_init__`; every problem is a ValueError naming the setting.
"""

from __future__ import annotations

import ipaddress
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from decimal import Decimal, InvalidOperation
from typing import Literal, get_args
from urllib.parse import urlsplit

from runner.sandbox.faults import DEFAULT_FAULT_KINDS, parse_fault_kind
from runner.sandbox.signing import load_private_key, load_public_key

ResponseVersion = Literal["new", "old", "mixed"]
# How the Alix side answers a refusal: HTTP 4xx, HTTP 200 with success:false, or either at random.
FailureStyle = Literal["http", "ok", "mixed"]
CARD_STATUSES = ("active", "frozen", "closed")
CENT = Decimal("0.01")
# Far above any real balance, and low enough that every amount fits Decimal's 28 digits.
MAX_MONEY = Decimal("1000000000000000.00")

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE)
_TOKEN = re.compile(r"uc_[A-Za-z0-9]{40}")


def is_uuid_shaped(card_id: str) -> bool:
    """True for 8-4-4-4-12 hex ids, in either case."""
    return _UUID.fullmatch(card_id) is not None


def canonical_card_id(card_id: str) -> str:
    """The id a card is stored under: UUIDs compare case-insensitively, as PostgreSQL's do."""
    return card_id.lower() if is_uuid_shaped(card_id) else card_id


def is_well_formed_token(token: str) -> bool:
    """True for a token of the documented shape `uc_` + 40 letters or digits."""
    return _TOKEN.fullmatch(token) is not None


def to_money(name: str, value: object) -> Decimal:
    """`value` as a non-negative amount with at most two decimals, rendered with exactly two.

    Floats are refused: a float has already lost the amount the caller meant.
    """
    if isinstance(value, bool) or not isinstance(value, Decimal | int | str):
        raise ValueError(f"{name} must be a Decimal, an int or a decimal string, got {value!r}")
    try:
        amount = Decimal(value.strip() if isinstance(value, str) else value)
    except InvalidOperation:
        raise ValueError(f"{name} is not a decimal number: {value!r}") from None
    if not amount.is_finite() or amount < 0:
        raise ValueError(f"{name} must be a finite amount of at least 0, got {value!r}")
    if amount > MAX_MONEY:
        raise ValueError(f"{name} must be at most {MAX_MONEY}, got {value!r}")
    if amount != amount.quantize(CENT):
        raise ValueError(f"{name} must have at most 2 decimal places, got {value!r}")
    return amount.quantize(CENT)


def check_fee_rate(name: str, value: object) -> Decimal:
    """`value` as a fee rate: a decimal fraction, at least 0 and below 1."""
    if isinstance(value, bool) or not isinstance(value, Decimal | int | str):
        raise ValueError(f"{name} must be a Decimal, got {value!r}")
    try:
        rate = Decimal(value)
    except InvalidOperation:
        raise ValueError(f"{name} is not a decimal number: {value!r}") from None
    if not rate.is_finite() or not 0 <= rate < 1:
        raise ValueError(f"{name} must be at least 0 and below 1, got {value!r}")
    return rate


def _check_seconds(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number of seconds, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be at least 0 seconds, got {value!r}")


_CURRENCY = re.compile(r"[A-Za-z]{3,5}", re.ASCII)


@dataclass(frozen=True, slots=True)
class SandboxCard:
    """A card the sandbox knows from the start (any id); `limit` None: the default."""

    card_id: str
    status: str = "active"
    balance: Decimal = Decimal("0.00")
    deposit: Decimal = Decimal("0.00")
    limit: Decimal | None = None
    name: str = ""
    # What GET /cards answers as the card's currency; a job declaring another is refused.
    currency: str = "USD"

    def __post_init__(self) -> None:
        if not isinstance(self.card_id, str) or not self.card_id.strip():
            raise ValueError(f"card_id must be a non-empty string, got {self.card_id!r}")
        if "/" in self.card_id or self.card_id != self.card_id.strip():
            raise ValueError(f"card_id cannot hold '/' or surrounding spaces: {self.card_id!r}")
        if self.status not in CARD_STATUSES:
            raise ValueError(
                f"card {self.card_id}: status must be one of {', '.join(CARD_STATUSES)}, "
                f"got {self.status!r}"
            )
        if not isinstance(self.name, str):
            raise ValueError(f"card {self.card_id}: name must be a string, got {self.name!r}")
        if not isinstance(self.currency, str) or not _CURRENCY.fullmatch(self.currency):
            raise ValueError(
                f"card {self.card_id}: currency must be 3 to 5 letters, got {self.currency!r}"
            )
        object.__setattr__(self, "currency", self.currency.upper())
        object.__setattr__(self, "card_id", canonical_card_id(self.card_id))
        for money_field in ("balance", "deposit"):
            value = to_money(f"card {self.card_id}: {money_field}", getattr(self, money_field))
            object.__setattr__(self, money_field, value)
        if self.limit is not None:
            object.__setattr__(self, "limit", to_money(f"card {self.card_id}: limit", self.limit))


def _check_rate(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be between 0 and 1, got {value!r}")


def _check_text(name: str, value: object) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string")


def check_loopback_url(name: str, url: object) -> str:
    """`url` if it is an http(s) URL on this machine; ValueError otherwise.

    The sandbox POSTs webhooks only to loopback: a simulator must not reach out to the world.
    """
    if not isinstance(url, str):
        raise ValueError(f"{name} must be a URL string, got {url!r}")
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if parts.scheme not in ("http", "https") or not loopback:
        raise ValueError(
            f"{name} must be an http(s) URL on loopback (127.0.0.1, ::1 or localhost), got {url!r}"
        )
    return url


@dataclass(frozen=True, slots=True, repr=False)
class AlixConfig:
    """The Alix Pay side of the sandbox (served under /api/v2 only when this is given).

    The partner's credentials are what the sandbox checks signatures against; `alix_private_key_pem`
    is the key it signs webhooks with (None: a fresh one at startup, whose public half the running
    sandbox exposes). The rules these settings feed are listed in alix_state.py's docstring.
    """

    partner_code: str
    secret_key: str
    user_email: str
    partner_public_key_pem: str
    alix_private_key_pem: str | None = None
    webhook_url: str | None = None
    access_token_ttl: float = 2.0
    refresh_token_ttl: float = 600.0
    settle_delay: float = 1.0
    settle_failure_rate: float = 0.0
    webhook_duplicate_rate: float = 0.0
    webhook_attempts: int = 4
    webhook_backoff: float = 0.25
    min_amount: Decimal = Decimal("10.00")
    max_amount: Decimal = Decimal("10000.00")
    fee_rate: Decimal = Decimal("0.01")
    fee_fixed: Decimal = Decimal("0.00")
    failure_style: FailureStyle = "mixed"

    def __post_init__(self) -> None:
        for name in ("partner_code", "secret_key", "user_email"):
            _check_text(name, getattr(self, name))
        load_public_key("partner_public_key_pem", self.partner_public_key_pem)
        if self.alix_private_key_pem is not None:
            load_private_key("alix_private_key_pem", self.alix_private_key_pem)
        if self.webhook_url is not None:
            check_loopback_url("webhook_url", self.webhook_url)
        for name in ("access_token_ttl", "refresh_token_ttl"):
            _check_seconds(name, getattr(self, name))
            if getattr(self, name) == 0:
                raise ValueError(f"{name} must be above 0 seconds")
        if self.refresh_token_ttl < self.access_token_ttl:
            raise ValueError(
                f"refresh_token_ttl ({self.refresh_token_ttl!r}) cannot be shorter than "
                f"access_token_ttl ({self.access_token_ttl!r})"
            )
        _check_seconds("settle_delay", self.settle_delay)
        _check_seconds("webhook_backoff", self.webhook_backoff)
        _check_rate("settle_failure_rate", self.settle_failure_rate)
        _check_rate("webhook_duplicate_rate", self.webhook_duplicate_rate)
        attempts = self.webhook_attempts
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise ValueError(f"webhook_attempts must be a positive integer, got {attempts!r}")
        for name in ("min_amount", "max_amount", "fee_fixed"):
            object.__setattr__(self, name, to_money(name, getattr(self, name)))
        if self.min_amount <= 0:
            raise ValueError(f"min_amount must be above 0, got {self.min_amount}")
        if self.max_amount < self.min_amount:
            raise ValueError(
                f"max_amount ({self.max_amount}) cannot be below min_amount ({self.min_amount})"
            )
        object.__setattr__(self, "fee_rate", check_fee_rate("fee_rate", self.fee_rate))
        if self.failure_style not in get_args(FailureStyle):
            raise ValueError(
                f"failure_style must be one of http, ok, mixed, got {self.failure_style!r}"
            )

    def __repr__(self) -> str:
        shown = []
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name == "secret_key":
                shown.append("secret_key='***'")  # a repr ends up in logs; secrets must not
            elif item.name == "alix_private_key_pem":
                hidden = "None" if value is None else "'***'"
                shown.append(f"alix_private_key_pem={hidden}")
            elif item.name == "partner_public_key_pem":
                shown.append("partner_public_key_pem='<PEM>'")
            else:
                shown.append(f"{item.name}={value!r}")
        return f"AlixConfig({', '.join(shown)})"


@dataclass(frozen=True, slots=True, repr=False)
class SandboxConfig:
    """How the simulated Uncash account starts and behaves; see the module docstring of state.py
    for the rules it enforces and the assumptions made where the docs are silent.

    The cooldown is anchored on the card's last *applied* topup: refused attempts do not restart
    it (an assumption; the docs speak of "attempts" without saying what a refused one does).

    `apply_delay`: a busy backend. Each topup (Uncash and Alix) is validated and applied that many
    seconds after it arrives, whether or not its client is still connected, and answered after
    that (plus `latency`); a client that times out first may find the money moved later.
    """

    token: str | None = None
    wallet_balance: Decimal = Decimal("1000000.00")
    fee_rate: Decimal = Decimal("0.025")
    fee_fixed: Decimal = Decimal("0.50")
    cooldown: float = 120.0
    cooldown_status: int = 400
    rate_limit: float | None = None
    rate_burst: int = 2
    # The limit changes during a run: (seconds after the first topup arrived, new rate).
    rate_schedule: tuple[tuple[float, float], ...] = ()
    # A 429's Retry-After in whole seconds, as HTTP's delta-seconds are (else to 0.01 s).
    retry_after_whole: bool = False
    default_card_limit: Decimal = Decimal("10000.00")
    auto_create_cards: bool = True
    cards: tuple[SandboxCard, ...] = ()
    missing_cards: frozenset[str] = frozenset()
    response_version: ResponseVersion = "new"
    latency: float = 0.0
    apply_delay: float = 0.0
    fault_rate: float = 0.0
    fault_kinds: tuple[str, ...] = DEFAULT_FAULT_KINDS
    slow_seconds: float = 5.0
    seed: int | None = None
    alix: AlixConfig | None = None
    # Seconds before an applied topup shows in the transactions list (a lagging statement).
    list_lag: float = 0.0
    clock: Callable[[], float] = field(default=time.monotonic, compare=False)

    def __post_init__(self) -> None:
        if self.token is not None and not (
            isinstance(self.token, str) and is_well_formed_token(self.token)
        ):
            raise ValueError("token must be 'uc_' followed by 40 letters or digits")
        object.__setattr__(self, "wallet_balance", to_money("wallet_balance", self.wallet_balance))
        object.__setattr__(self, "fee_fixed", to_money("fee_fixed", self.fee_fixed))
        object.__setattr__(
            self, "default_card_limit", to_money("default_card_limit", self.default_card_limit)
        )
        object.__setattr__(self, "fee_rate", check_fee_rate("fee_rate", self.fee_rate))
        _check_seconds("cooldown", self.cooldown)
        _check_seconds("latency", self.latency)
        _check_seconds("apply_delay", self.apply_delay)
        _check_seconds("slow_seconds", self.slow_seconds)
        _check_seconds("list_lag", self.list_lag)
        if (
            isinstance(self.cooldown_status, bool)
            or not isinstance(self.cooldown_status, int)
            or not 400 <= self.cooldown_status <= 599
        ):
            status = self.cooldown_status
            raise ValueError(
                f"cooldown_status must be an HTTP error status, 400-599, got {status!r}"
            )
        self._check_rate_limit()
        self._check_cards()
        if self.response_version not in get_args(ResponseVersion):
            raise ValueError(
                f"response_version must be one of new, old, mixed, got {self.response_version!r}"
            )
        if (
            isinstance(self.fault_rate, bool)
            or not isinstance(self.fault_rate, int | float)
            or not 0.0 <= self.fault_rate <= 1.0
        ):
            raise ValueError(f"fault_rate must be between 0 and 1, got {self.fault_rate!r}")
        kinds = tuple(dict.fromkeys(parse_fault_kind(kind) for kind in self.fault_kinds))
        if self.fault_rate > 0 and not kinds:
            raise ValueError("fault_rate above 0 needs at least one fault kind")
        object.__setattr__(self, "fault_kinds", kinds)
        seed = self.seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if self.alix is not None and not isinstance(self.alix, AlixConfig):
            raise ValueError(f"alix must be an AlixConfig or None, got {self.alix!r}")
        if not callable(self.clock):
            raise ValueError("clock must be a callable returning seconds as a float")

    def _check_rate_limit(self) -> None:
        rate = self.rate_limit
        if rate is not None and (
            isinstance(rate, bool)
            or not isinstance(rate, int | float)
            or not math.isfinite(rate)
            or rate <= 0
        ):
            raise ValueError(f"rate_limit must be a positive number per second, got {rate!r}")
        burst = self.rate_burst
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ValueError(f"rate_burst must be a positive integer, got {burst!r}")
        schedule = tuple((float(at), float(r)) for at, r in self.rate_schedule)
        if any(
            not (math.isfinite(at) and at >= 0 and math.isfinite(r) and r > 0) for at, r in schedule
        ) or list(schedule) != sorted(schedule):
            raise ValueError(
                "rate_schedule must be (seconds from start, positive rate) pairs in time order"
            )
        if schedule and rate is None:
            raise ValueError("rate_schedule changes a rate limit: give rate_limit too")
        object.__setattr__(self, "rate_schedule", schedule)

    def _check_cards(self) -> None:
        cards = tuple(self.cards)
        for card in cards:
            if not isinstance(card, SandboxCard):
                raise ValueError(f"cards must hold SandboxCard values, got {card!r}")
        ids = [card.card_id for card in cards]
        duplicates = sorted({card_id for card_id in ids if ids.count(card_id) > 1})
        if duplicates:
            raise ValueError(f"cards lists the same card more than once: {', '.join(duplicates)}")
        missing = frozenset(canonical_card_id(card_id) for card_id in _strings(self.missing_cards))
        both = sorted(missing.intersection(ids))
        if both:
            raise ValueError(f"cards and missing_cards both name: {', '.join(both)}")
        object.__setattr__(self, "cards", cards)
        object.__setattr__(self, "missing_cards", missing)

    def card_limit(self, card: SandboxCard) -> Decimal:
        """The limit of `card`: its own, or the default."""
        return self.default_card_limit if card.limit is None else card.limit

    def __repr__(self) -> str:
        shown = []
        for item in fields(self):
            if item.name == "clock":
                continue
            value = getattr(self, item.name)
            if item.name == "token" and value is not None:
                shown.append("token='uc_***'")  # a repr ends up in logs; the token must not
            elif item.name == "fault_kinds":
                shown.append(f"fault_kinds={tuple(str(kind) for kind in value)!r}")
            else:
                shown.append(f"{item.name}={value!r}")
        return f"SandboxConfig({', '.join(shown)})"


def _strings(values: Iterable[object]) -> Iterable[str]:
    for value in values:
        if not isinstance(value, str):
            raise ValueError(f"missing_cards must hold card ids as strings, got {value!r}")
        yield value
