"""The values the ledger hands out and takes in: a run's identity, an open attempt, a row's
progress, a provider's event, what a report or `status` says of a run, a worker's cards.

Frozen, slotted dataclasses of plain values; nothing here touches a database.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING

from runner.domain import RowStatus

if TYPE_CHECKING:  # the value only: importing the ledger loads no provider code
    from runner.providers.base import CardState


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class RunSpec:
    """What identifies a run: a run key may only ever be resumed with the same job and target."""

    run_key: str
    provider: str
    base_url: str
    job_file: str
    job_digest: str
    extra_columns: tuple[str, ...]
    row_count: int
    # When the run was first recorded (filled by the ledger's reads; not part of what
    # identifies the run, so a spec built from a job still equals the one read back).
    created_at: datetime | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class OpenAttempt:
    """An attempt whose intent was recorded but whose outcome never was (a killed process);
    also what `Ledger.record_intent` records."""

    row: int
    attempt: int
    card_id: str
    amount: Decimal
    before: CardState | None
    sent_at: datetime
    # Until when the provider may still apply it (None: not recorded, as before there was
    # a way to say it).
    settle_by: datetime | None = None


@dataclass(frozen=True, slots=True)
class AttemptEntry:
    """One attempt as the ledger recorded it, open or closed (an audit's view of it)."""

    row: int
    attempt: int
    card_id: str
    amount: Decimal
    before_deposit: Decimal | None
    sent_at: datetime
    finished_at: datetime | None
    settle_by: datetime | None
    outcome: str | None


@dataclass(frozen=True, slots=True)
class RowProgress:
    """Where a row stands when a run (re)starts."""

    status: RowStatus
    attempts: int


@dataclass(frozen=True, slots=True)
class PendingRow:
    """A row the provider accepted and has not settled yet."""

    run_key: str
    row: int
    card_id: str
    amount: Decimal
    provider_ref: str


@dataclass(frozen=True, slots=True)
class ProviderEvent:
    """A verified final status from the provider for the topup (card, amount, ref)."""

    provider: str
    card_id: str
    amount: Decimal
    provider_ref: str
    status: RowStatus  # succeeded or failed
    fee: Decimal | None = None
    balance_after: Decimal | None = None


@dataclass(frozen=True, slots=True)
class RunFacts:
    """The run as the ledger has it, whoever did it: what a report's Summary says of it."""

    created_at: datetime
    last_finished_at: datetime | None
    sent: int  # topup requests recorded, by every process
    first_applied_at: datetime | None
    last_applied_at: datetime | None
    chain_head: str | None = None  # `algo:seq:hash`; None: a run from before hash chains


@dataclass(frozen=True, slots=True)
class RunOverview:
    """One line of `topup-runner status`."""

    run_key: str
    provider: str
    job_file: str
    row_count: int
    created_at: datetime
    finished_at: datetime | None
    by_status: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class CardWork:
    """What is left to do on a set of claimed cards, as the ledger has it now."""

    rows: dict[int, int]  # row -> topup requests recorded for it so far, rows to send
    open_attempts: list[OpenAttempt]  # attempts sent whose outcome was never recorded
    last_sent: dict[str, datetime]  # when each card's latest attempt was sent


@dataclass(frozen=True, slots=True)
class CardsLeft:
    """Whether a worker without cards should wait: cards free to claim, cards others hold."""

    free: int
    held_by_others: int
    soonest_expiry: float | None  # seconds until the first of the others' leases runs out
