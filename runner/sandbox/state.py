"""The simulated Uncash account: cards, wallet, the documented topup rules and the exact record of
every topup it applied. Pure logic on an injectable clock; the HTTP layer (uncash.py) renders it.

Assumptions, where the Uncash docs are silent (the sandbox's choices, each changeable here):

- Cooldown: anchored on the card's last *applied* topup; refused attempts do not restart it.
  Its refusal carries `cooldown_status` (default 400; the real status is undocumented).
- Checks run in this order: token, rate limit, card exists, body valid, card active, cooldown,
  card limit, wallet. Statuses: 401 token, 429 rate limit, 404 card not found, 400 for the rest.
- A frozen or closed card refuses topups with 400 "Card is not active".
- Card limit: the card's cumulative `deposit` plus the amount must not exceed its limit;
  "Available" in the message never goes below 0.
- Fee: round_half_up(amount x fee_rate + fee_fixed, 2 places), as one number per topup.
- Amounts are exact decimals; "at most 2 decimals" is judged on the value, so 5.100 is 5.10.
- UUID-shaped card ids are case-insensitive and answered in lower case (as a PostgreSQL uuid).
- Rate limit: one GCRA budget over every authenticated API request (GET and POST); refused
  requests do not spend it; unauthenticated requests and /health are not counted against it.
- Faults are drawn for a topup POST once it has passed the token and rate-limit checks; an
  "after" fault on a topup the rules refuse hides that refusal (nothing applied). Spurious
  429/cooldown answers are counted as faults, not as refusals.
- Timestamps answered by the API are wall-clock time moved along by the injected clock, so a
  fake clock moves them too.
- The transactions list shows applied topups only, as Approved Credit items of type "Topup"
  (with `platform_fee_amount` and `invoice_id`), under `data.transactions` beside
  `data.pagination`; page size 10 unless `limit` says; each `list_lag` seconds after it applied.
- A topup body that is not JSON is validated as an empty object ("amount": Required).
- A request fully received is processed even if its client has gone (as a real server does).
- Invoice ids count up from 100001; card `category`, `masked_PAN`, `bin_id` are made up.
"""

from __future__ import annotations

import enum
import random
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import ClassVar

from runner.sandbox.config import (
    CENT,
    SandboxCard,
    SandboxConfig,
    canonical_card_id,
    is_uuid_shaped,
    to_money,
)
from runner.sandbox.faults import FaultKind

MIN_AMOUNT = Decimal("5.00")
MAX_AMOUNT = Decimal("10000.00")
FIRST_INVOICE_ID = 100001
# Float arithmetic on clock values must not refuse a request that is on time to the microsecond.
_EPSILON = 1e-9


class Refusal(enum.StrEnum):
    """Why the sandbox refused a request; the keys of `SandboxState.refusals`."""

    COOLDOWN = "cooldown"
    RATE_LIMITED = "rate_limited"
    INSUFFICIENT_FUNDS = "insufficient_funds"
    CARD_LIMIT = "card_limit"
    NOT_FOUND = "not_found"
    INVALID = "invalid"
    INACTIVE = "inactive"
    UNAUTHORIZED = "unauthorized"


class AmountProblem(enum.StrEnum):
    """How an amount that is a number breaks the documented rules."""

    TOO_SMALL = "too_small"
    TOO_BIG = "too_big"
    TOO_PRECISE = "too_precise"


@dataclass(frozen=True, slots=True)
class AppliedTopup:
    """One topup the sandbox applied: the record tests and benchmarks judge the runner by.

    `at` is the injected clock's value when it was applied; `fault` names the fault that hid
    the answer from the client, if any (the money moved all the same).
    """

    seq: int
    card_id: str
    amount: Decimal
    fee: Decimal
    total_charged: Decimal
    at: float
    transaction_id: str
    invoice_id: int
    card_balance_after: Decimal
    wallet_balance_after: Decimal
    fault: FaultKind | None = None


@dataclass(slots=True)
class CardAccount:
    """A card as the sandbox holds it; `last_applied_at` anchors its cooldown."""

    card_id: str
    name: str
    status: str
    balance: Decimal
    deposit: Decimal
    limit: Decimal
    created_at: float
    updated_at: float
    last_applied_at: float | None = None
    currency: str = "USD"


@dataclass(frozen=True, slots=True)
class TopupApplied:
    record: AppliedTopup


@dataclass(frozen=True, slots=True)
class CardNotFound:
    reason: ClassVar[Refusal] = Refusal.NOT_FOUND


@dataclass(frozen=True, slots=True)
class InvalidAmount:
    problems: tuple[AmountProblem, ...]
    reason: ClassVar[Refusal] = Refusal.INVALID


@dataclass(frozen=True, slots=True)
class CardInactive:
    status: str
    reason: ClassVar[Refusal] = Refusal.INACTIVE


@dataclass(frozen=True, slots=True)
class CoolingDown:
    remaining: float  # seconds until the card takes a topup again
    reason: ClassVar[Refusal] = Refusal.COOLDOWN


@dataclass(frozen=True, slots=True)
class OverCardLimit:
    deposit: Decimal
    limit: Decimal
    available: Decimal
    reason: ClassVar[Refusal] = Refusal.CARD_LIMIT


@dataclass(frozen=True, slots=True)
class InsufficientFunds:
    amount: Decimal
    fee: Decimal
    required: Decimal
    available: Decimal
    reason: ClassVar[Refusal] = Refusal.INSUFFICIENT_FUNDS


TopupRefusal = (
    CardNotFound | InvalidAmount | CardInactive | CoolingDown | OverCardLimit | InsufficientFunds
)
TopupResult = TopupApplied | TopupRefusal


def amount_problems(amount: Decimal) -> tuple[AmountProblem, ...]:
    """Every documented rule `amount` breaks, in the order the API lists them."""
    problems = []
    if amount < MIN_AMOUNT:
        problems.append(AmountProblem.TOO_SMALL)
    if amount > MAX_AMOUNT:
        problems.append(AmountProblem.TOO_BIG)
    if decimal_places(amount) > 2:
        problems.append(AmountProblem.TOO_PRECISE)
    return tuple(problems)


def decimal_places(amount: Decimal) -> int:
    """Decimals the value needs (5.100 needs 1); exact for any exponent, unlike quantize."""
    _, digits, exponent = amount.as_tuple()
    if not isinstance(exponent, int) or exponent >= 0 or not any(digits):
        return 0
    places = -exponent
    for digit in reversed(digits):
        if digit != 0 or places == 0:
            break
        places -= 1
    return places


class Gcra:
    """Generic cell rate algorithm: `rate` per second on average, `burst` at once."""

    def __init__(self, rate: float, burst: int) -> None:
        self._interval = 1.0 / rate
        self._tolerance = self._interval * (burst - 1)
        self._tat = float("-inf")  # theoretical arrival time of the next conforming request

    def admit(self, now: float) -> float | None:
        """None if a request at `now` conforms (and spend it); else seconds until one would."""
        tat = max(self._tat, now)
        early = tat - now - self._tolerance
        if early > _EPSILON:
            return early
        self._tat = tat + self._interval
        return None


class SandboxState:
    """The account the sandbox serves, with counters of everything it saw.

    Every decision is synchronous: nothing awaits between checking a topup and applying it.
    """

    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self._clock = config.clock
        self._clock_origin = config.clock()
        self._wall_origin = datetime.now(UTC)
        self._rng = random.Random(config.seed)
        self.wallet = config.wallet_balance
        self.wallet_updated_at = self._clock_origin
        self._cards: dict[str, CardAccount] = {}
        self._missing = set(config.missing_cards)
        for card in config.cards:
            self.put_card(card)
        self._limiter = (
            None if config.rate_limit is None else Gcra(config.rate_limit, config.rate_burst)
        )
        self._schedule = list(config.rate_schedule)
        self.applied: list[AppliedTopup] = []
        self.requests: Counter[str] = Counter()
        self.refusals: Counter[Refusal] = Counter()
        self.faults_injected: Counter[FaultKind] = Counter()
        self.topup_arrivals: list[float] = []

    # -- time -------------------------------------------------------------------------------

    def now(self) -> float:
        return self._clock()

    def wall(self, at: float) -> datetime:
        """The wall-clock time of the clock value `at`."""
        return self._wall_origin + timedelta(seconds=at - self._clock_origin)

    # -- cards and wallet -------------------------------------------------------------------

    def card(self, card_id: str) -> CardAccount | None:
        """The card `card_id`, created on first reference when UUID-shaped; None if unknown."""
        key = canonical_card_id(card_id)
        card = self._cards.get(key)
        auto = self.config.auto_create_cards and key not in self._missing and is_uuid_shaped(key)
        if card is None and auto:
            card = self.put_card(SandboxCard(key))
        return card

    def known_cards(self) -> list[CardAccount]:
        """Every card that exists so far, in the order it came to exist."""
        return list(self._cards.values())

    def merged_card(
        self,
        card_id: str,
        *,
        status: str | None = None,
        balance: Decimal | None = None,
        deposit: Decimal | None = None,
        limit: Decimal | None = None,
        name: str | None = None,
        currency: str | None = None,
    ) -> SandboxCard:
        """The validated spec of `card_id` with the given changes (ValueError if invalid)."""
        current = self._cards.get(canonical_card_id(card_id))
        base = (
            SandboxCard(card_id)
            if current is None
            else SandboxCard(
                current.card_id,
                current.status,
                current.balance,
                current.deposit,
                current.limit,
                current.name,
                current.currency,
            )
        )
        return SandboxCard(
            base.card_id,
            base.status if status is None else status,
            base.balance if balance is None else balance,
            base.deposit if deposit is None else deposit,
            base.limit if limit is None else limit,
            base.name if name is None else name,
            base.currency if currency is None else currency,
        )

    def put_card(self, spec: SandboxCard) -> CardAccount:
        """Create the card of `spec`, or set an existing one's fields to it."""
        now = self.now()
        limit = self.config.card_limit(spec)
        card = self._cards.get(spec.card_id)
        if card is None:
            card = CardAccount(
                spec.card_id, spec.name, spec.status, spec.balance, spec.deposit, limit, now, now,
                currency=spec.currency,
            )  # fmt: skip
            self._cards[spec.card_id] = card
            self._missing.discard(spec.card_id)
        else:
            card.name, card.status, card.limit = spec.name, spec.status, limit
            card.currency = spec.currency
            card.balance, card.deposit, card.updated_at = spec.balance, spec.deposit, now
        return card

    def set_wallet(self, balance: Decimal) -> None:
        self.wallet = to_money("wallet balance", balance)
        self.wallet_updated_at = self.now()

    def fee_for(self, amount: Decimal) -> Decimal:
        raw = amount * self.config.fee_rate + self.config.fee_fixed
        return raw.quantize(CENT, rounding=ROUND_HALF_UP)

    # -- counting ---------------------------------------------------------------------------

    def note_request(self, route: str) -> None:
        self.requests[route] += 1

    def note_topup_arrival(self) -> None:
        self.topup_arrivals.append(self.now())

    def note_refusal(self, reason: Refusal) -> None:
        self.refusals[reason] += 1

    def note_fault(self, kind: FaultKind) -> None:
        self.faults_injected[kind] += 1

    @property
    def first_applied_at(self) -> float | None:
        return self.applied[0].at if self.applied else None

    @property
    def last_applied_at(self) -> float | None:
        return self.applied[-1].at if self.applied else None

    def transactions(self, card_id: str | None = None) -> list[AppliedTopup]:
        """Applied topups, newest first, of one card or of all."""
        key = None if card_id is None else canonical_card_id(card_id)
        return [t for t in reversed(self.applied) if key is None or t.card_id == key]

    # -- decisions --------------------------------------------------------------------------

    def admit(self) -> float | None:
        """Spend one request of the rate limit: None if admitted, else seconds to wait."""
        if self._limiter is None:
            return None
        now = self.now()
        schedule, arrivals = self._schedule, self.topup_arrivals
        # The schedule counts from the first topup: a run's start, whatever preceded it.
        while schedule and arrivals and now - arrivals[0] >= schedule[0][0]:
            # The limit changes (--rate-schedule): a new budget at the new rate.
            self._limiter = Gcra(schedule.pop(0)[1], self.config.rate_burst)
        wait = self._limiter.admit(now)
        if wait is not None:
            self.note_refusal(Refusal.RATE_LIMITED)
        return wait

    def spurious_cooldown(self) -> float:
        """The short wait a spurious cooldown refusal (a fault) announces."""
        if self.config.cooldown >= 1:
            return float(self._rng.randint(1, 3))
        return self.config.cooldown

    def topup(
        self, card_id: str, amount: Decimal, *, fault: FaultKind | None = None
    ) -> TopupResult:
        """Decide a topup of `amount` on `card_id` and, if every rule holds, apply it.

        `fault` labels the record when an "after" fault will hide the answer.
        """
        result = self._decide(card_id, amount, fault)
        if not isinstance(result, TopupApplied):
            self.note_refusal(result.reason)
        return result

    def _decide(self, card_id: str, amount: Decimal, fault: FaultKind | None) -> TopupResult:
        card = self.card(card_id)
        if card is None:
            return CardNotFound()
        problems = amount_problems(amount)
        if problems:
            return InvalidAmount(problems)
        if card.status != "active":
            return CardInactive(card.status)
        now = self.now()
        if card.last_applied_at is not None and self.config.cooldown > 0:
            remaining = card.last_applied_at + self.config.cooldown - now
            if remaining > _EPSILON:
                return CoolingDown(remaining)
        amount = amount.quantize(CENT)
        if card.deposit + amount > card.limit:
            available = max(card.limit - card.deposit, Decimal("0.00"))
            return OverCardLimit(card.deposit, card.limit, available)
        fee = self.fee_for(amount)
        total = amount + fee
        if total > self.wallet:
            return InsufficientFunds(amount, fee, total, self.wallet)
        return TopupApplied(self._apply(card, amount, fee, now, fault))

    def _apply(
        self, card: CardAccount, amount: Decimal, fee: Decimal, now: float, fault: FaultKind | None
    ) -> AppliedTopup:
        total = amount + fee
        self.wallet -= total
        self.wallet_updated_at = now
        card.balance += amount
        card.deposit += amount
        card.last_applied_at = card.updated_at = now
        record = AppliedTopup(
            seq=len(self.applied) + 1,
            card_id=card.card_id,
            amount=amount,
            fee=fee,
            total_charged=total,
            at=now,
            transaction_id=str(uuid.UUID(int=self._rng.getrandbits(128), version=4)),
            invoice_id=FIRST_INVOICE_ID + len(self.applied),
            card_balance_after=card.balance,
            wallet_balance_after=self.wallet,
            fault=fault,
        )
        self.applied.append(record)
        return record
