"""What the rest of the runner may ask of a ledger, whichever backend holds it: `Ledger`, and
`SharedLedger` for the PostgreSQL ledger several workers share.

Writes are typed: an intent is recorded and committed before its request goes; an outcome,
a row's fields, a row closed untouched are posted and go out with the next group commit
(`flush` waits for it). Reads are blocking: run them through `call`, off the event loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import runner.ledger.statements as _build
from runner.domain import JobRow, RowRecord, RowStatus
from runner.ledger.chain_check import ChainVerdict
from runner.ledger.files import RunLock
from runner.ledger.guards import Approval, PaidRow
from runner.ledger.statements import Charged, Statement
from runner.ledger.values import (
    AttemptEntry,
    CardsLeft,
    CardWork,
    OpenAttempt,
    PendingRow,
    ProviderEvent,
    RowProgress,
    RunFacts,
    RunOverview,
    RunSpec,
)
from runner.metrics import StatusTotals

if TYPE_CHECKING:
    from runner.providers.base import CardState

R = TypeVar("R")


class Ledger(Protocol):
    """The durable record of every run, row and attempt (SQLite or PostgreSQL)."""

    name: str  # what messages call the ledger (a URL without its password)
    shared: bool  # whether several processes work on one run together
    readonly: bool  # opened only to read (status, report, check): no run, no write

    def lock(self, run_key: str) -> RunLock | None:
        """Hold `run_key` for this process (LedgerLocked if another holds it); None where
        the workers of a run share it (PostgreSQL: card leases instead)."""
        ...

    def close(self) -> None: ...

    async def call(self, func: Callable[..., R], *args: Any) -> R:
        """`func(*args)` (a read) off the event loop, after what was posted is committed."""
        ...

    async def flush(self) -> None:
        """Return once everything posted so far is committed."""
        ...

    # -- typed writes ------------------------------------------------------------------------

    async def record_intent(self, run_key: str, attempt: OpenAttempt) -> None:
        """Commit that `attempt` is about to be sent, before returning."""
        ...

    def post_outcome(
        self, run_key: str, row: int, attempt: int, outcome: str, detail: str, at: datetime
    ) -> None:
        """Queue how an attempt ended (`outcome`: an AttemptOutcome; any str is stored as is)."""
        ...

    def post_row(
        self,
        run_key: str,
        row: int,
        status: RowStatus,
        at: datetime,
        *,
        error: str | None = None,
        applied: Charged | None = None,
    ) -> None:
        """Queue a row's status, finish time and error (None clears one), with what the
        provider said of an `applied` topup (its fee, balances, ids)."""
        ...

    def post_close(
        self, run_key: str, row: int, status: RowStatus, error: str, at: datetime | None = None
    ) -> None:
        """Queue closing a row still `not_attempted` with `status` and `error`."""
        ...

    # -- runs --------------------------------------------------------------------------------

    def create_run(self, spec: RunSpec, rows: Sequence[JobRow]) -> None: ...
    def find_run(self, run_key: str) -> RunSpec | None: ...
    def runs_with_digest(self, job_digest: str) -> list[RunSpec]: ...
    def finish_run(self, run_key: str) -> None: ...
    def apply_event(self, event: ProviderEvent) -> tuple[int, bool]: ...
    def settle_from_events(self, run_key: str, provider: str) -> int: ...

    # -- resume reads --------------------------------------------------------------------------

    def progress(self, run_key: str) -> dict[int, RowProgress]: ...
    def open_attempts(self, run_key: str) -> list[OpenAttempt]: ...
    def last_attempts(self, run_key: str) -> dict[str, datetime]: ...
    def attempt_log(self, run_key: str) -> list[AttemptEntry]: ...
    def pending(self, run_key: str) -> list[PendingRow]: ...
    def known_refs(self, card_id: str) -> set[str]: ...
    def fee_samples(self, provider: str, limit: int = 2000) -> list[tuple[Decimal, Decimal]]: ...
    def learned_rate(self, target: str) -> float | None: ...

    # -- guardrails (runner.guard; the SQL in ledger/guards.py) --------------------------------

    def approvals(self, digest: str, job_file: str, run_key: str) -> list[Approval]: ...
    def paid_elsewhere(
        self, cards: Sequence[str], run_key: str, provider: str, since: datetime
    ) -> list[PaidRow]: ...

    # -- what reports and `status` show ------------------------------------------------------

    def records(self, run_key: str, status: RowStatus | None = None) -> Iterator[RowRecord]:
        """Every row of the run (or those with `status`) in job order, streamed."""
        ...

    def totals(self, run_key: str) -> dict[RowStatus, StatusTotals]: ...
    def status_counts(self, run_key: str) -> dict[RowStatus, int]: ...
    def run_facts(self, run_key: str) -> RunFacts: ...
    def overview(self) -> list[RunOverview]: ...
    def chain_head(self, run_key: str) -> str | None: ...
    def check_chain(self, run_key: str, key: bytes | None) -> ChainVerdict: ...

    # -- transition: statements built outside the ledger ---------------------------------------
    # The engine built statements with these and committed them with `write` or queued them
    # with `post`; the typed writes above replace them. Kept until the engine calls those.

    async def write(self, statements: Sequence[Statement]) -> None: ...
    def post(self, statements: Sequence[Statement]) -> None: ...

    if TYPE_CHECKING:  # their signatures; at run time, the builders themselves (no extra call)

        @staticmethod
        def intent(
            run_key: str,
            row: int,
            attempt: int,
            card_id: str,
            amount: Decimal,
            before: CardState | None,
            sent_at: datetime,
            *,
            settle_by: datetime | None = None,
        ) -> list[Statement]:
            return _build.intent(
                run_key, row, attempt, card_id, amount, before, sent_at, settle_by=settle_by
            )

        @staticmethod
        def attempt_outcome(
            run_key: str, row: int, attempt: int, outcome: str, detail: str, at: datetime
        ) -> Statement:
            return _build.attempt_outcome(run_key, row, attempt, outcome, detail, at)

        @staticmethod
        def row_update(run_key: str, row: int, **values: Any) -> Statement:
            return _build.row_update(run_key, row, **values)

        @staticmethod
        def close_untouched_row(
            run_key: str, row: int, status: RowStatus, error: str, at: datetime | None
        ) -> Statement:
            return _build.close_untouched_row(run_key, row, status, error, at)

    else:
        intent = staticmethod(_build.intent)
        attempt_outcome = staticmethod(_build.attempt_outcome)
        row_update = staticmethod(_build.row_update)
        close_untouched_row = staticmethod(_build.close_untouched_row)


class SharedLedger(Ledger, Protocol):
    """A ledger several workers share: card leases and the run's shared rate slots."""

    async def coordinate(self, func: Callable[..., R], *args: Any) -> R:
        """A lease or rate-slot call off the event loop, not waiting for the next commit."""
        ...

    def post_card_done(self, run_key: str, card_id: str, owner: str) -> None:
        """Queue marking a card finished: committed after its rows' outcomes."""
        ...

    def claim_cards(self, run_key: str, owner: str, limit: int, lease: float) -> list[str]: ...
    def card_work(self, run_key: str, cards: Sequence[str]) -> CardWork: ...
    def renew(self, run_key: str, owner: str, lease: float) -> set[str]: ...
    def release_cards(self, run_key: str, owner: str) -> None: ...
    def cards_left(self, run_key: str, owner: str) -> CardsLeft: ...
    def reserve_slots(self, run_key: str, count: int, spacing: float) -> tuple[float, float]: ...
    def database_clock(self) -> float: ...
    def pause_slots(self, run_key: str, seconds: float) -> None: ...
    def share_rate(
        self, run_key: str, seen: float | None, proposed: float, lowered: bool
    ) -> float: ...
