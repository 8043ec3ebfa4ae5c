"""Settings of the sandbox: the account it starts with, the pacing it enforces and the faults it
injects. Validated once in `__post_init__`; every problem is a ValueError naming the setting.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from decimal import Decimal, InvalidOperation
from typing import Literal, get_args

from runner.sandbox.faults import FaultKind, parse_fault_kind

ResponseVersion = Literal["new", "old", "mixed"]
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


def _check_seconds(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number of seconds, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be at least 0 seconds, got {value!r}")


@dataclass(frozen=True, slots=True)
class SandboxCard:
    """A card the sandbox knows from the start (any id); `limit` None: the default."""

    card_id: str
    status: str = "active"
    balance: Decimal = Decimal("0.00")
    deposit: Decimal = Decimal("0.00")
    limit: Decimal | None = None
    name: str = ""

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
        object.__setattr__(self, "card_id", canonical_card_id(self.card_id))
        for money_field in ("balance", "deposit"):
            value = to_money(f"card {self.card_id}: {money_field}", getattr(self, money_field))
            object.__setattr__(self, money_field, value)
        if self.limit is not None:
            object.__setattr__(self, "limit", to_money(f"card {self.card_id}: limit", self.limit))


@dataclass(frozen=True, slots=True, repr=False)
class SandboxConfig:
    """How the simulated Uncash account starts and behaves; see the module docstring of state.py
    for the rules it enforces and the assumptions made where the docs are silent.

    The cooldown is anchored on the card's last *applied* topup: refused attempts do not restart
    it (an assumption; the docs speak of "attempts" without saying what a refused one does).
    """

    token: str | None = None
    wallet_balance: Decimal = Decimal("1000000.00")
    fee_rate: Decimal = Decimal("0.025")
    fee_fixed: Decimal = Decimal("0.50")
    cooldown: float = 120.0
    cooldown_status: int = 400
    rate_limit: float | None = None
    rate_burst: int = 2
    default_card_limit: Decimal = Decimal("10000.00")
    auto_create_cards: bool = True
    cards: tuple[SandboxCard, ...] = ()
    missing_cards: frozenset[str] = frozenset()
    response_version: ResponseVersion = "new"
    latency: float = 0.0
    fault_rate: float = 0.0
    fault_kinds: tuple[str, ...] = tuple(FaultKind)
    slow_seconds: float = 5.0
    seed: int | None = None
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
        self._check_fee_rate()
        _check_seconds("cooldown", self.cooldown)
        _check_seconds("latency", self.latency)
        _check_seconds("slow_seconds", self.slow_seconds)
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
        if not callable(self.clock):
            raise ValueError("clock must be a callable returning seconds as a float")

    def _check_fee_rate(self) -> None:
        rate = self.fee_rate
        if isinstance(rate, bool) or not isinstance(rate, Decimal | int | str):
            raise ValueError(f"fee_rate must be a Decimal, got {rate!r}")
        try:
            rate = Decimal(rate)
        except InvalidOperation:
            raise ValueError(f"fee_rate is not a decimal number: {self.fee_rate!r}") from None
        if not rate.is_finite() or not 0 <= rate < 1:
            raise ValueError(f"fee_rate must be at least 0 and below 1, got {self.fee_rate!r}")
        object.__setattr__(self, "fee_rate", rate)

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
