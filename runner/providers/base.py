"""The provider protocol and the closed set of outcomes every adapter maps its answers to.

A topup ends in exactly one of four outcomes, decided in one place per adapter:

    Applied      the money moved (or, `pending=True`, was accepted and will settle later);
                 with a `discrepancy` when the answer contradicts what was sent
    Refused      final refusal; the provider proves nothing was applied
    RetryLater   nothing was applied and it is safe to send again, `after` seconds from now
    Unknown      the answer was lost: money may have moved; reconcile before anything else

Reconciling an `Unknown` ends in `Applied`, `NotApplied`, `Refused` (the provider settled it
`Failed`: the same final word a webhook gives) or `Unknown` again (cannot tell).
Settling a pending topup ends in `Applied`, `Refused` or `StillPending` (ask again later).
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Applied:
    """The provider applied the topup (or accepted it, when `pending`)."""

    fee: Decimal | None = None
    total_charged: Decimal | None = None
    card_balance_before: Decimal | None = None
    card_balance_after: Decimal | None = None
    wallet_balance_after: Decimal | None = None
    transaction_id: str | None = None
    invoice_id: str | None = None
    pending: bool = False
    # What identifies the topup at the provider when it returns no id (Alix: createdAt),
    # kept so that a later webhook or transactions list can settle a pending row.
    provider_ref: str | None = None
    # One line saying how the answer contradicts what was sent (another card, another amount,
    # balances that did not move by the amount), or None when it does not. The provider says
    # the topup applied, so it is not retried; but what applied is in doubt: the row needs
    # review, with this text. Set only by the adapter, from the answer's own fields.
    discrepancy: str | None = None


class RefusalCode(enum.StrEnum):
    """Why a provider refused a topup for good."""

    INSUFFICIENT_FUNDS = "insufficient_funds"
    CARD_LIMIT = "card_limit"
    CARD_NOT_FOUND = "card_not_found"
    INVALID_AMOUNT = "invalid_amount"
    CARD_INACTIVE = "card_inactive"
    REJECTED = "rejected"  # any other refusal the provider states


@dataclass(frozen=True, slots=True)
class Refused:
    """A final refusal: nothing was applied and sending again would be refused again."""

    code: RefusalCode
    message: str


class RetryKind(enum.StrEnum):
    """Why a retry is safe, which decides whether it costs an attempt."""

    COOLDOWN = "cooldown"  # the card's cooldown: reschedule the card, no attempt spent
    RATE_LIMITED = "rate_limited"  # the provider's rate limit: slow the run, no attempt spent
    TRANSIENT = "transient"  # refused before applying (connection refused, 503 ...): costs one


@dataclass(frozen=True, slots=True)
class RetryLater:
    """Nothing was applied; send again no sooner than `after` seconds (None: our own backoff)."""

    kind: RetryKind
    message: str
    after: float | None = None


@dataclass(frozen=True, slots=True)
class Unknown:
    """The outcome is not known: money may have moved. Never retried before reconciling."""

    message: str


@dataclass(frozen=True, slots=True)
class NotApplied:
    """Reconciliation proved the topup was not applied: it is safe to send again."""

    message: str


@dataclass(frozen=True, slots=True)
class StillPending:
    """A pending topup has no final status yet (or none that can be trusted): ask again later."""

    reason: str = "still pending"


STILL_PENDING = StillPending()

Outcome = Applied | Refused | RetryLater | Unknown
Settlement = Applied | NotApplied | Refused | Unknown
FinalStatus = Applied | Refused | StillPending


class CardStatus(enum.StrEnum):
    ACTIVE = "active"
    FROZEN = "frozen"
    CLOSED = "closed"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class CardState:
    """What the provider says of a card at one moment; the snapshot reconciliation compares."""

    card_id: str
    status: CardStatus
    balance: Decimal
    deposit: Decimal | None = None
    currency: str = "USD"
    limit: Decimal | None = None


@dataclass(frozen=True, slots=True)
class ProviderRules:
    """What a provider documents about amounts and pacing."""

    min_amount: Decimal
    max_amount: Decimal
    default_cooldown: float = 0.0
    # What the provider documents a way to read: without it, preflight cannot check it.
    reads_cards: bool = True
    reads_wallet: bool = True
    # The currency of amounts, fees and balances (ISO 4217 code, or the token's ticker):
    # what the report shows beside every sum.
    currency: str = "USD"


class Throttle(Protocol):
    """The run's shared request pacing: every request to the provider goes through it."""

    async def acquire(self) -> None: ...

    def slow_down(self, retry_after: float | None) -> None: ...


class UnlimitedThrottle:
    """A throttle that never waits, for one-off calls outside a run."""

    async def acquire(self) -> None:
        return None

    def slow_down(self, retry_after: float | None) -> None:
        return None


class Provider(Protocol):
    """A card platform as the runner sees it."""

    name: str
    rules: ProviderRules

    async def wallet_balance(self) -> Decimal:
        """The wallet's balance; raises `ProviderError` (or `AuthenticationFailed`).
        Only called when `rules.reads_wallet`."""
        ...

    async def fee_estimates(self, amounts: Sequence[Decimal]) -> Mapping[Decimal, Decimal]:
        """Fees the provider quotes in advance for these amounts (empty: it quotes none)."""
        ...

    async def get_card(self, card_id: str) -> CardState | None:
        """The card's current state, None when the provider does not know it."""
        ...

    async def list_cards(self) -> Mapping[str, CardState]:
        """Every card the account can see, in as few requests as the API allows."""
        ...

    async def topup(self, card_id: str, amount: Decimal) -> Outcome:
        """Send one topup and classify the answer; never raises for a row's outcome."""
        ...

    async def reconcile(
        self,
        card_id: str,
        amount: Decimal,
        before: CardState | None,
        *,
        sent_at: datetime | None = None,
        known_refs: Collection[str] = (),
    ) -> Settlement:
        """Establish from provider state whether a topup of `amount` sent at `sent_at`, after
        the card stood at `before`, applied; `known_refs` are the provider references of this
        card's topups already accounted for, which cannot be the lost one."""
        ...

    async def settle(self, card_id: str, amount: Decimal, provider_ref: str) -> FinalStatus:
        """The final status of a pending topup: Applied, Refused (it failed), or StillPending
        (`STILL_PENDING`). Only providers that answer `pending` are ever asked."""
        ...

    async def aclose(self) -> None: ...
