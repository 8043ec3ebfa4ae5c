"""What a row's attempt and the provider's answer lead to: finish, requeue at a time, or reconcile.

Pure: times come in as arguments, nothing is read or written. Attempts, waits, backoff and giving
up are decided here and nowhere else (docs/providers.md: which answers are safe to retry)."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, assert_never

from runner.domain import AttemptOutcome, JobRow, RowStatus
from runner.ledger import OpenAttempt
from runner.providers.base import (
    Applied,
    NotApplied,
    Outcome,
    Refused,
    RetryKind,
    RetryLater,
    Settlement,
    Unknown,
)

# A provider that keeps answering "wait" for one row is not making progress: give up on
# the row after this many waits rather than loop for ever.
MAX_WAITS_PER_ROW = 50
# A refusal that says "wait N seconds" is honoured with a little slack for clock skew.
WAIT_SLACK = 0.05
# The least time after a lost answer before its card is read to reconcile it (s).
RECONCILE_GRACE = 1.0
# The first step of the exponential backoff after a transient failure (s).
BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0


def backoff_delay(
    attempt: int,
    *,
    base: float = BACKOFF_BASE,
    cap: float = BACKOFF_CAP,
    rand: Callable[[], float] = random.random,
) -> float:
    """Exponential backoff with jitter for the `attempt`-th failure (1-based).

    "Equal jitter": half the exponential step is kept, half is random, so retries of many
    rows that failed together spread out without ever retrying immediately.
    """
    step: float = min(cap, base * 2.0 ** max(0, attempt - 1))
    return step / 2 + rand() * step / 2


@dataclass(slots=True)
class RowState:
    """A row on its way: what this process knows of it between attempts."""

    job_row: JobRow
    sent: int = 0  # topup requests recorded for the row, by any process
    spent: int = 0  # of the retry budget (transient failures, proven non-applications)
    waits: int = 0  # cooldown and rate-limit refusals (cost no budget)
    unresolved: OpenAttempt | None = None  # an attempt whose outcome is not known yet
    # When (this process's clock) a reading first showed the unresolved attempt not applied
    # after the provider could no longer apply it: a second such reading proves it.
    not_applied_at: float | None = None


@dataclass(frozen=True, slots=True)
class Close:
    """An attempt's outcome, for the ledger (`detail`: the provider's words or the error)."""

    attempt: int
    outcome: AttemptOutcome
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Note:
    """The log event a decision is told by (a warning when the row's outcome is in doubt)."""

    event: str
    fields: dict[str, Any] = field(default_factory=dict)
    warning: bool = False


@dataclass(frozen=True, slots=True)
class Finish:
    """The row is done with `status`; its card may go next at `ready_at`. `applied` is the
    provider's account of money that moved, for the row's money fields."""

    status: RowStatus
    ready_at: float
    error: str | None = None
    close: Close | None = None
    applied: Applied | None = None
    note: Note | None = None


@dataclass(frozen=True, slots=True)
class Requeue:
    """Nothing is pending: the row goes back to the front of its card's queue, to be sent
    again no sooner than `ready_at` (a wait, a backoff, a reading to take again)."""

    ready_at: float
    close: Close | None = None
    note: Note | None = None


@dataclass(frozen=True, slots=True)
class Reconcile:
    """The answer was lost: money may have moved. The attempt stays open and the row goes
    back; when its card's turn comes (`ready_at`) it is reconciled from provider state,
    never sent again blindly."""

    ready_at: float
    note: Note | None = None


@dataclass(frozen=True, slots=True)
class SendAgain:
    """Provider state proved the lost attempt was not applied: send the row again now."""

    close: Close
    note: Note | None = None


Verdict = Finish | Requeue | Reconcile
Settled = Finish | Requeue | SendAgain


@dataclass(frozen=True, slots=True)
class Policy:
    """The run's rules for retrying, from its settings."""

    max_attempts: int
    cooldown: float
    # How long after it is sent a request may still be applied by the provider: its
    # timeout plus the grace the operator allows for a provider still processing it.
    apply_window: float
    # The gap between the two readings that must agree before "not applied" is believed.
    confirm_gap: float

    @classmethod
    def of(
        cls, *, max_attempts: int, cooldown: float, timeout: float, apply_grace: float
    ) -> Policy:
        return cls(
            max_attempts=max_attempts,
            cooldown=cooldown,
            apply_window=timeout + apply_grace,
            confirm_gap=min(1.0, max(0.05, apply_grace / 10)),
        )

    def settle_by(self, sent_at: datetime) -> datetime:
        """Until when the provider may still apply a request sent at `sent_at` (recorded
        with its intent, so that a later process keeps to it)."""
        return sent_at + timedelta(seconds=self.apply_window)

    def can_apply_until(self, attempt: OpenAttempt) -> datetime:
        """When the provider can no longer apply `attempt`: what its intent recorded, and
        never sooner than this process's own timeout and grace allow (a rerun may be given a
        longer --timeout than the process that sent it)."""
        own = self.settle_by(attempt.sent_at)
        recorded = attempt.settle_by
        return own if recorded is None else max(own, recorded)

    # -- after an answer -------------------------------------------------------------------

    def after_answer(
        self, state: RowState, outcome: Outcome, *, sent: float, received: float
    ) -> Verdict:
        """What the answer to attempt `state.sent` (sent at `sent`, answered at `received`,
        both on the run's clock) leads to. The card's next request waits a full cooldown
        after the answer: the provider saw the request no later than then."""
        attempt = state.sent
        cool = received + self.cooldown
        match outcome:
            case Applied():
                # The run's hot path records a clean Applied inline (attempt.py), to this rule.
                state.unresolved = None
                return Finish(
                    RowStatus.PENDING if outcome.pending else RowStatus.SUCCEEDED,
                    cool,
                    close=Close(attempt, AttemptOutcome.APPLIED),
                    applied=outcome,
                )
            case Refused():
                state.unresolved = None
                error = f"{outcome.code.value}: {outcome.message}"
                return Finish(
                    RowStatus.FAILED,
                    cool,
                    error=error,
                    close=Close(attempt, AttemptOutcome.REFUSED, error),
                    note=Note("topup.refused", {"attempt": attempt, "error": error}, True),
                )
            case RetryLater():
                state.unresolved = None
                return self._retry_later(state, outcome, received, cool)
            case Unknown():
                # Money may have moved. Reconciled, not resent, when the card's turn comes,
                # and no sooner than the grace a provider still processing it needs.
                return Reconcile(
                    max(cool, sent + RECONCILE_GRACE),
                    Note("topup.unknown", {"attempt": attempt, "error": outcome.message}, True),
                )
            case _:
                assert_never(outcome)

    def _retry_later(
        self, state: RowState, outcome: RetryLater, received: float, cool: float
    ) -> Verdict:
        close = Close(state.sent, AttemptOutcome(outcome.kind.value), outcome.message)
        match outcome.kind:
            case RetryKind.COOLDOWN | RetryKind.RATE_LIMITED:
                # The provider asked to wait: no attempt spent, but not for ever.
                state.waits += 1
                if state.waits > MAX_WAITS_PER_ROW:
                    why = f"gave up after {state.waits} refusals to wait: {outcome.message}"
                    return Finish(RowStatus.FAILED, cool, error=why, close=close)
                wait = outcome.after if outcome.after is not None else 1.0
                fields = {"kind": outcome.kind.value, "wait_s": round(wait, 3)}
                return Requeue(
                    received + wait * (1 + WAIT_SLACK) + WAIT_SLACK,
                    close,
                    Note("topup.wait", fields),
                )
            case RetryKind.TRANSIENT:
                state.spent += 1
                if state.spent >= self.max_attempts:
                    why = f"gave up after {state.spent} attempts: {outcome.message}"
                    return Finish(RowStatus.FAILED, cool, error=why, close=close)
                delay = backoff_delay(state.spent)
                fields = {
                    "attempt": state.sent,
                    "delay_s": round(delay, 3),
                    "error": outcome.message,
                }
                return Requeue(max(cool, received + delay), close, Note("topup.retry", fields))
            case _:
                assert_never(outcome.kind)

    def in_doubt(self, state: RowState, outcome: Applied, why: str, ready_at: float) -> Finish:
        """The provider says it applied a topup, but not the one that was sent, or not as the
        card's books show: believed neither way, never sent again."""
        state.unresolved = None
        error = f"the answer disagrees: {why}"
        return Finish(
            RowStatus.NEEDS_REVIEW,
            ready_at,
            error=error,
            close=Close(state.sent, AttemptOutcome.APPLIED_DISCREPANCY, error),
            applied=outcome,
            note=Note("topup.discrepancy", {"attempt": state.sent, "error": why}, True),
        )

    # -- after reconciling a lost answer ---------------------------------------------------

    def after_reading(
        self, state: RowState, settled: Settlement, *, now: float, wall: datetime
    ) -> Settled:
        """What a reading of provider state for the unresolved attempt leads to (`now` on the
        run's clock, `wall` the time of day).

        "Not applied" is a verdict about the future too: the provider may still be working on
        a request its client gave up on. So it is only believed once the provider can no
        longer apply the attempt and a second reading, taken after that, agrees. Until then
        the row waits, and its card with it.
        """
        pending = state.unresolved
        assert pending is not None
        attempt = pending.attempt
        match settled:
            case Applied():
                state.unresolved = None
                note = Note("reconcile.applied", {"attempt": attempt})
                if settled.discrepancy is not None:
                    error = f"the provider's record disagrees: {settled.discrepancy}"
                    close = Close(attempt, AttemptOutcome.APPLIED_DISCREPANCY, error)
                    return Finish(RowStatus.NEEDS_REVIEW, now, error, close, settled, note)
                status = RowStatus.PENDING if settled.pending else RowStatus.SUCCEEDED
                close = Close(attempt, AttemptOutcome.APPLIED_RECONCILED)
                return Finish(status, now, None, close, settled, note)
            case NotApplied():
                left = (self.can_apply_until(pending) - wall).total_seconds()
                if left > 0:
                    # Not yet: the provider may still apply it. Read again once it cannot.
                    state.not_applied_at = None
                    fields = {"attempt": attempt, "wait_s": round(left, 3)}
                    return Requeue(now + left, note=Note("reconcile.waiting", fields))
                if state.not_applied_at is None:
                    state.not_applied_at = now
                    return Requeue(now + self.confirm_gap)
                state.unresolved = None
                state.not_applied_at = None
                state.spent += 1
                close = Close(attempt, AttemptOutcome.NOT_APPLIED, settled.message)
                note = Note("reconcile.not_applied", {"attempt": attempt})
                if state.spent >= self.max_attempts:
                    why = f"gave up after {state.spent} attempts: {settled.message}"
                    return Finish(RowStatus.FAILED, now, why, close, note=note)
                return SendAgain(close, note)
            case Refused():
                # The provider's final word on the lost attempt: it failed. Not sent again,
                # as when a webhook says so (README, "A topup the provider settled Failed").
                state.unresolved = None
                error = f"{settled.code.value}: {settled.message}"
                close = Close(attempt, AttemptOutcome.REFUSED, error)
                note = Note("reconcile.failed", {"attempt": attempt, "error": error}, True)
                return Finish(RowStatus.FAILED, now, error, close, note=note)
            case Unknown():
                state.unresolved = None
                error = f"outcome could not be established: {settled.message}"
                return Finish(
                    RowStatus.NEEDS_REVIEW,
                    now,
                    error,
                    Close(attempt, AttemptOutcome.UNKNOWN, error),
                    note=Note(
                        "reconcile.unknown", {"attempt": attempt, "error": settled.message}, True
                    ),
                )
            case _:
                assert_never(settled)
