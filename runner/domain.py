"""The values every layer shares: a job row to pay, its status, its record, the run it is in.

Plain frozen dataclasses and enums, importing nothing of the runner: the ledger, the report and
the engine read them without loading pandas, aiohttp or a provider."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal


@dataclass(frozen=True, slots=True)
class JobRow:
    """One topup to make; `row` is its 1-based position among the job's data rows."""

    row: int
    card_id: str
    amount: Decimal
    reference: str = ""
    extra: tuple[tuple[str, str], ...] = ()


class RowStatus(enum.StrEnum):
    """A row's status as the contract names it; the last three are final for a run."""

    NOT_ATTEMPTED = "not_attempted"  # nothing sent (yet, or the run stopped / preflight refused)
    PENDING = "pending"  # accepted by the provider, final status awaited (Alix)
    SUCCEEDED = "succeeded"  # applied and confirmed
    FAILED = "failed"  # refused or given up: nothing applied
    NEEDS_REVIEW = "needs_review"  # the outcome could not be established: never retried blindly

    @property
    def is_final(self) -> bool:
        return self in (RowStatus.SUCCEEDED, RowStatus.FAILED, RowStatus.NEEDS_REVIEW)


class AttemptOutcome(enum.StrEnum):
    """How one attempt ended, as the ledger stores it (`attempts.outcome`); no value: still open."""

    APPLIED = "applied"  # the answer said applied
    APPLIED_RECONCILED = "applied (reconciled)"  # the answer was lost; provider state shows it
    APPLIED_DISCREPANCY = "applied (discrepancy)"  # applied, but not as sent: needs review
    REFUSED = "refused"  # a final refusal: nothing applied
    UNAUTHORIZED = "unauthorized"  # refused at the door: nothing applied, the run stops
    NOT_APPLIED = "not_applied"  # the answer was lost; provider state proves nothing applied
    UNKNOWN = "unknown"  # the answer was lost and provider state could not tell
    COOLDOWN = "cooldown"  # refused for the card's cooldown: nothing applied (RetryKind)
    RATE_LIMITED = "rate_limited"  # refused for the rate limit: nothing applied (RetryKind)
    TRANSIENT = "transient"  # failed before applying (503, connection refused): (RetryKind)


@dataclass(frozen=True, slots=True)
class RowRecord:
    """One job row with everything known about its outcome; the report's `Results` line."""

    row: int
    card_id: str
    amount: Decimal
    reference: str = ""
    extra: tuple[tuple[str, str], ...] = ()
    status: RowStatus = RowStatus.NOT_ATTEMPTED
    fee: Decimal | None = None
    total_charged: Decimal | None = None
    card_balance_before: Decimal | None = None
    card_balance_after: Decimal | None = None
    wallet_balance_after: Decimal | None = None
    transaction_id: str | None = None
    invoice_id: str | None = None
    attempts: int = 0
    error: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class RunInfo:
    """What the report's Summary sheet says about the run as a whole."""

    run_key: str
    provider: str
    job_file: str
    started_at: datetime | None = None
    finished_at: datetime | None = None
    extra_columns: tuple[str, ...] = ()
    notes: tuple[tuple[str, str], ...] = field(default=())

    @property
    def is_sandbox(self) -> bool:
        return self.provider == "sandbox"
