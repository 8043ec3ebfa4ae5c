"""What an audit reads and what it finds: the provider's record of one topup, a ledger row with
the windows of its attempts, one line of the Audit sheet, and what the match fills in."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from runner.domain import RowStatus


class Kind(enum.StrEnum):
    """A discrepancy between the ledger and the provider's books."""

    PAID_NO_RECORD = "paid_no_provider_record"  # a row says paid; the provider shows nothing
    UNACCOUNTED = "provider_topup_unaccounted"  # paid twice, or moved outside the run
    AMOUNT_DIFFERS = "amount_differs"
    UNPAID_BUT_PAID = "unpaid_row_provider_paid"  # failed/not_attempted, yet the provider paid


class Proof(enum.StrEnum):
    """How a row's verdict was reached."""

    LIST = "transactions list"
    DEPOSIT = "card deposit"
    NONE = "none"


class EntryState(enum.StrEnum):
    PAID = "paid"
    PENDING = "pending"  # accepted, not settled (Alix), or a status nobody documented
    FAILED = "failed"  # listed, but moved no money

    @property
    def is_money(self) -> bool:
        return self is not EntryState.FAILED


@dataclass(frozen=True, slots=True)
class BookEntry:
    """One topup in the provider's own record of a card."""

    card_id: str
    amount: Decimal
    at: datetime | None  # when the provider says it happened (None: it does not say)
    transaction_id: str | None
    state: EntryState
    fee: Decimal | None = None
    invoice_id: str | None = None


@dataclass(frozen=True, slots=True)
class CardBook:
    """What the provider showed of one card: its listed topups and its deposit now."""

    card_id: str
    entries: tuple[BookEntry, ...] = ()
    deposit_now: Decimal | None = None
    error: str | None = None  # the list could not be read: every row falls back or fails


Window = tuple[datetime, datetime]


@dataclass(frozen=True, slots=True)
class AuditRow:
    """A ledger row with the windows its attempts could have been applied in."""

    row: int
    card_id: str
    amount: Decimal
    status: RowStatus
    transaction_id: str | None
    fee: Decimal | None
    total_charged: Decimal | None
    invoice_id: str | None
    windows: tuple[Window, ...]

    @property
    def claims_paid(self) -> bool:
        return self.status in (RowStatus.SUCCEEDED, RowStatus.PENDING)

    @property
    def claims_unpaid(self) -> bool:
        return self.status in (RowStatus.FAILED, RowStatus.NOT_ATTEMPTED)


@dataclass(frozen=True, slots=True)
class Line:
    """One line of the Audit sheet: a row and its match, or a provider topup no row claims."""

    card_id: str
    verdict: str  # "matched", a Kind, or "review: ..." for a needs_review row
    proof: Proof
    row: int | None = None
    status: str = ""
    amount: Decimal | None = None
    provider_amount: Decimal | None = None
    transaction_id: str | None = None
    provider_at: datetime | None = None
    detail: str = ""

    @property
    def kind(self) -> Kind | None:
        try:
            return Kind(self.verdict)
        except ValueError:
            return None


@dataclass(frozen=True, slots=True)
class Fill:
    """What the match learned of a row the ledger left incomplete."""

    row: int
    transaction_id: str | None = None
    fee: Decimal | None = None
    total_charged: Decimal | None = None
    invoice_id: str | None = None


@dataclass(slots=True)
class AuditResult:
    """The audit of one run: a line per row and per unclaimed provider topup."""

    run_key: str
    window: Window | None
    lines: list[Line] = field(default_factory=list)
    fills: list[Fill] = field(default_factory=list)

    @property
    def discrepancies(self) -> list[Line]:
        return [line for line in self.lines if line.kind is not None]

    @property
    def ok(self) -> bool:
        return not self.discrepancies

    def count(self, verdict: str) -> int:
        return sum(line.verdict == verdict for line in self.lines)

    def by_proof(self, proof: Proof) -> int:
        return sum(line.proof is proof and line.row is not None for line in self.lines)
