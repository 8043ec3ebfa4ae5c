"""The run package's one door to the ledger: every read and write a run makes, by name.

Nothing else in `runner.run` calls the ledger's methods or builds its statements, so that a new
ledger API is one edit here. Intents are committed before their request goes; outcomes posted."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from runner.config import Settings
from runner.domain import AttemptOutcome, JobRow, RowRecord, RowStatus
from runner.ledger import (
    Ledger,
    OpenAttempt,
    PendingRow,
    ProviderEvent,
    RowProgress,
    RunFacts,
    RunSpec,
    is_postgres_url,
    open_ledger,
    utcnow,
)
from runner.metrics import StatusTotals
from runner.providers.base import Applied, CardState


def default_ledger_path(env: Mapping[str, str]) -> Path:
    state = env.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "topup-runner" / "ledger.sqlite"


def named_ledger(settings: Settings, env: Mapping[str, str]) -> str | Path | None:
    """The ledger the settings name: its path, or its URL when it is a database server's;
    None for a sandbox run given none (its ledger is a throwaway, see `ledger_where`)."""
    if settings.ledger:
        if is_postgres_url(settings.ledger):
            return settings.ledger
        return Path(settings.ledger).expanduser()
    return None if settings.is_sandbox else default_ledger_path(env)


def ledger_where(settings: Settings, env: Mapping[str, str], stack: ExitStack) -> str | Path:
    """The ledger's path, or its URL when it is a database server's."""
    named = named_ledger(settings, env)
    if named is not None:
        return named
    # A sandbox's state dies with the run, so its ledger does too unless asked to keep it.
    tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="topup-sandbox-"))
    return Path(tmp) / "ledger.sqlite"


def open_for(where: str | Path, stack: ExitStack, *, readonly: bool = False) -> Ledger:
    """Open the ledger at `where`, closed when `stack` ends; `readonly` for commands that only
    read it (check, report), which then work on an auditor's copy or a read-only mount."""
    ledger = open_ledger(where, readonly=readonly)
    stack.callback(ledger.close)
    return ledger


async def runs_with_digest(ledger: Ledger, job_digest: str) -> list[RunSpec]:
    return await ledger.call(ledger.runs_with_digest, job_digest)


async def fee_samples(ledger: Ledger, provider: str) -> list[tuple[Decimal, Decimal]]:
    return await ledger.call(ledger.fee_samples, provider)


# Today's ledger takes the outcome's text; looked up once, as every topup records it.
_APPLIED = AttemptOutcome.APPLIED.value


def _applied_fields(outcome: Applied) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "fee": outcome.fee,
        "total_charged": outcome.total_charged,
        "card_balance_after": outcome.card_balance_after,
        "wallet_balance_after": outcome.wallet_balance_after,
        "transaction_id": outcome.transaction_id,
        "invoice_id": outcome.invoice_id,
    }
    if outcome.card_balance_before is not None:
        fields["card_balance_before"] = outcome.card_balance_before
    if outcome.provider_ref is not None:
        fields["provider_ref"] = outcome.provider_ref
    return fields


class RunRecord:
    """One run's rows and attempts in the ledger."""

    __slots__ = ("ledger", "run_key")

    def __init__(self, ledger: Ledger, run_key: str) -> None:
        self.ledger = ledger
        self.run_key = run_key

    @property
    def shared(self) -> bool:
        return self.ledger.shared

    @property
    def name(self) -> str:
        return self.ledger.name

    def lock(self) -> None:
        self.ledger.lock(self.run_key)

    # -- an attempt ------------------------------------------------------------------------

    async def record_intent(
        self,
        row: int,
        attempt: int,
        card: str,
        amount: Decimal,
        before: CardState | None,
        sent_at: datetime,
        settle_by: datetime,
    ) -> None:
        """Commit that attempt `attempt` of `row` is about to go: from here until its
        outcome is recorded, the attempt is open and a later run reconciles it."""
        ledger = self.ledger
        await ledger.write(
            Ledger.intent(
                self.run_key, row, attempt, card, amount, before, sent_at, settle_by=settle_by
            )
        )

    def post_applied(self, row: int, attempt: int, status: RowStatus, outcome: Applied) -> None:
        """An applied answer: the attempt's outcome and the row's money, in one post (every
        topup comes here: no keyword plumbing)."""
        now = utcnow()
        run_key = self.run_key
        if outcome.card_balance_before is None and outcome.provider_ref is None:
            update = Ledger.row_update(
                run_key,
                row,
                status=status,
                finished_at=now,
                fee=outcome.fee,
                total_charged=outcome.total_charged,
                card_balance_after=outcome.card_balance_after,
                wallet_balance_after=outcome.wallet_balance_after,
                transaction_id=outcome.transaction_id,
                invoice_id=outcome.invoice_id,
                error=None,
            )
        else:
            fields = _applied_fields(outcome)
            update = Ledger.row_update(
                run_key, row, status=status, finished_at=now, **fields, error=None
            )
        self.ledger.post((Ledger.attempt_outcome(run_key, row, attempt, _APPLIED, "", now), update))

    def post_outcome(self, row: int, attempt: int, outcome: AttemptOutcome, detail: str) -> None:
        """Close an attempt (posted: lost in a crash, the attempt is reconciled instead)."""
        statement = Ledger.attempt_outcome(
            self.run_key, row, attempt, outcome.value, detail, utcnow()
        )
        self.ledger.post([statement])

    async def write_outcome(
        self, row: int, attempt: int, outcome: AttemptOutcome, detail: str
    ) -> None:
        """Close an attempt durably before going on (the run is about to stop)."""
        statement = Ledger.attempt_outcome(
            self.run_key, row, attempt, outcome.value, detail, utcnow()
        )
        await self.ledger.write([statement])

    def post_finish(
        self,
        row: int,
        status: RowStatus,
        error: str | None,
        applied: Applied | None = None,
        closing: tuple[int, AttemptOutcome, str] | None = None,
    ) -> None:
        """A row's final status, with the money an applied topup moved, and the outcome of the
        attempt it closes (`closing`: attempt, outcome, detail). Posted, not awaited: should
        the process die before the next commit, the attempt is still open and the next run
        reconciles it."""
        now = utcnow()
        statements = []
        if closing is not None:
            attempt, outcome, detail = closing
            statements.append(
                Ledger.attempt_outcome(self.run_key, row, attempt, outcome.value, detail, now)
            )
        fields = {} if applied is None else _applied_fields(applied)
        statements.append(
            Ledger.row_update(
                self.run_key, row, status=status, finished_at=now, **fields, error=error
            )
        )
        self.ledger.post(statements)

    async def write_row(self, row: int, status: RowStatus, error: str) -> None:
        statement = Ledger.row_update(
            self.run_key, row, status=status, finished_at=utcnow(), error=error
        )
        await self.ledger.write([statement])

    async def close_untouched(
        self, rows: Iterable[tuple[int, str]], status: RowStatus, at: datetime | None
    ) -> None:
        """Give rows a status and an error unless they left `not_attempted` meanwhile (on a
        shared ledger, another worker may have finished them)."""
        run_key = self.run_key
        statements = [
            Ledger.close_untouched_row(run_key, row, status, error, at) for row, error in rows
        ]
        if statements:
            await self.ledger.write(statements)

    # -- the run ---------------------------------------------------------------------------

    async def find_run(self) -> RunSpec | None:
        return await self.ledger.call(self.ledger.find_run, self.run_key)

    async def create_run(self, spec: RunSpec, rows: Sequence[JobRow]) -> None:
        await self.ledger.call(self.ledger.create_run, spec, rows)

    async def finish_run(self) -> None:
        await self.ledger.call(self.ledger.finish_run, self.run_key)

    async def last_attempts(self) -> dict[str, datetime]:
        return await self.ledger.call(self.ledger.last_attempts, self.run_key)

    async def progress(self) -> dict[int, RowProgress]:
        return await self.ledger.call(self.ledger.progress, self.run_key)

    async def open_attempts(self) -> list[OpenAttempt]:
        return await self.ledger.call(self.ledger.open_attempts, self.run_key)

    async def fee_samples(self, provider: str) -> list[tuple[Decimal, Decimal]]:
        return await fee_samples(self.ledger, provider)

    async def known_refs(self, card: str) -> set[str]:
        return await self.ledger.call(self.ledger.known_refs, card)

    async def status_counts(self) -> dict[RowStatus, int]:
        return await self.ledger.call(self.ledger.status_counts, self.run_key)

    async def totals(self) -> dict[RowStatus, StatusTotals]:
        return await self.ledger.call(self.ledger.totals, self.run_key)

    async def facts(self) -> RunFacts:
        return await self.ledger.call(self.ledger.run_facts, self.run_key)

    def records(self, status: RowStatus | None = None) -> Iterator[RowRecord]:
        """The rows as the report shows them (a generator: read on the report's thread)."""
        return self.ledger.records(self.run_key, status)

    # -- pending rows ----------------------------------------------------------------------

    async def settle_from_events(self, provider: str) -> None:
        await self.ledger.call(self.ledger.settle_from_events, self.run_key, provider)

    async def pending(self) -> list[PendingRow]:
        return await self.ledger.call(self.ledger.pending, self.run_key)

    async def apply_event(self, event: ProviderEvent) -> bool:
        """Settle a pending row from the provider's final word; True if it settled one."""
        settled, _ = await self.ledger.call(self.ledger.apply_event, event)
        return bool(settled)


def read_run(ledger: Ledger, run_key: str) -> tuple[RunSpec | None, RunFacts | None]:
    """A run's spec and facts, read at once (no event loop: the `report` command)."""
    spec = ledger.find_run(run_key)
    return spec, None if spec is None else ledger.run_facts(run_key)
