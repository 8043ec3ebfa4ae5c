"""The retry policy, pure: a row's attempt state and the provider's answer give one verdict."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runner.domain import AttemptOutcome, JobRow, RowStatus
from runner.ledger import OpenAttempt
from runner.providers.base import (
    Applied,
    NotApplied,
    Outcome,
    RefusalCode,
    Refused,
    RetryKind,
    RetryLater,
    Unknown,
)
from runner.run.policy import (
    MAX_WAITS_PER_ROW,
    RECONCILE_GRACE,
    WAIT_SLACK,
    Close,
    Finish,
    Policy,
    Reconcile,
    Requeue,
    RowState,
    SendAgain,
    backoff_delay,
)

SENT_AT = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)
COOLDOWN = 2.0


def policy(max_attempts: int = 3, apply_grace: float = 5.0, cooldown: float = COOLDOWN) -> Policy:
    return Policy.of(
        max_attempts=max_attempts, cooldown=cooldown, timeout=10.0, apply_grace=apply_grace
    )


def sent_state(attempt: int = 1) -> RowState:
    """A row whose attempt `attempt` was just sent (its intent recorded, still open)."""
    row = JobRow(7, "card-1", Decimal("25.00"))
    state = RowState(row, sent=attempt)
    state.unresolved = OpenAttempt(7, attempt, "card-1", row.amount, None, SENT_AT)
    return state


# -- the attempt outcomes the ledger stores -------------------------------------------------


def test_attempt_outcomes_are_the_strings_the_ledger_holds() -> None:
    """The enum's values are exactly the texts earlier runs stored: old ledgers still read."""
    assert {o.value for o in AttemptOutcome} == {
        "applied",
        "applied (reconciled)",
        "applied (discrepancy)",
        "refused",
        "unauthorized",
        "not_applied",
        "unknown",
        "cooldown",
        "rate_limited",
        "transient",
    }


def test_every_retry_kind_is_an_attempt_outcome() -> None:
    """A retry-later answer closes its attempt with its kind: each kind has an outcome."""
    for kind in RetryKind:
        assert AttemptOutcome(kind.value).value == kind.value


# -- after an answer -------------------------------------------------------------------------


def test_refusal_fails_the_row_and_closes_the_attempt() -> None:
    """A final refusal: failed, with the provider's code and words, attempt closed refused."""
    state = sent_state()
    verdict = policy().after_answer(
        state, Refused(RefusalCode.CARD_LIMIT, "over the limit"), sent=100.0, received=100.5
    )
    assert verdict == Finish(
        RowStatus.FAILED,
        100.5 + COOLDOWN,
        error="card_limit: over the limit",
        close=Close(1, AttemptOutcome.REFUSED, "card_limit: over the limit"),
        note=verdict.note,
    )
    assert state.unresolved is None


def test_applied_pending_is_pending() -> None:
    """An answer that says accepted, final status later, leaves the row pending."""
    state = sent_state()
    verdict = policy().after_answer(state, Applied(pending=True), sent=0.0, received=1.0)
    assert isinstance(verdict, Finish)
    assert verdict.status is RowStatus.PENDING
    assert verdict.close == Close(1, AttemptOutcome.APPLIED)


def test_cooldown_refusal_waits_as_told_and_costs_no_attempt() -> None:
    """'Wait N seconds' is honoured (with slack) and spends nothing of the retry budget."""
    state = sent_state()
    outcome = RetryLater(RetryKind.COOLDOWN, "Please wait 87 seconds", after=87.0)
    verdict = policy().after_answer(state, outcome, sent=10.0, received=11.0)
    assert isinstance(verdict, Requeue)
    assert verdict.ready_at == pytest.approx(11.0 + 87.0 * (1 + WAIT_SLACK) + WAIT_SLACK)
    assert verdict.close == Close(1, AttemptOutcome.COOLDOWN, "Please wait 87 seconds")
    assert (state.spent, state.waits, state.unresolved) == (0, 1, None)


def test_endless_waits_give_up() -> None:
    """A provider that never stops saying 'wait' fails the row instead of looping for ever."""
    state = sent_state()
    state.waits = MAX_WAITS_PER_ROW
    outcome = RetryLater(RetryKind.RATE_LIMITED, "slow down", after=1.0)
    verdict = policy().after_answer(state, outcome, sent=0.0, received=0.0)
    assert isinstance(verdict, Finish)
    assert verdict.status is RowStatus.FAILED
    assert verdict.error == f"gave up after {MAX_WAITS_PER_ROW + 1} refusals to wait: slow down"
    assert verdict.close == Close(1, AttemptOutcome.RATE_LIMITED, "slow down")


def test_transient_failures_back_off_then_give_up() -> None:
    """Transient failures cost an attempt each; the last one allowed fails the row."""
    p = policy(max_attempts=2)
    state = sent_state()
    first = p.after_answer(state, RetryLater(RetryKind.TRANSIENT, "503"), sent=0.0, received=1.0)
    assert isinstance(first, Requeue)
    assert first.ready_at >= 1.0 + COOLDOWN
    state.sent = 2
    second = p.after_answer(state, RetryLater(RetryKind.TRANSIENT, "503"), sent=5.0, received=6.0)
    assert isinstance(second, Finish)
    assert second.error == "gave up after 2 attempts: 503"
    assert second.close == Close(2, AttemptOutcome.TRANSIENT, "503")


def test_lost_answer_is_reconciled_never_failed() -> None:
    """Unknown keeps the attempt open and sends the row to reconciliation, after the grace."""
    state = sent_state()
    verdict = policy().after_answer(state, Unknown("connection reset"), sent=50.0, received=50.1)
    assert verdict == Reconcile(50.1 + COOLDOWN, verdict.note)
    assert state.unresolved is not None
    # With no cooldown, a provider still processing the request gets the reconcile grace.
    quick = policy(cooldown=0.0).after_answer(state, Unknown("reset"), sent=50.0, received=50.1)
    assert quick == Reconcile(50.0 + RECONCILE_GRACE, quick.note)


def test_discrepancy_is_for_review_and_never_resent() -> None:
    """An applied answer that contradicts what was sent goes to review, attempt closed."""
    state = sent_state()
    verdict = policy().in_doubt(state, Applied(fee=Decimal("1.00")), "another card", 3.0)
    assert verdict.status is RowStatus.NEEDS_REVIEW
    assert verdict.close is not None
    assert verdict.close.outcome is AttemptOutcome.APPLIED_DISCREPANCY
    assert state.unresolved is None


# -- after reading provider state -------------------------------------------------------------


def test_not_applied_is_not_believed_while_the_provider_may_still_apply() -> None:
    """Before sent + timeout + grace, 'not applied' only makes the row wait until then."""
    p = policy(apply_grace=5.0)
    state = sent_state()
    wall = SENT_AT + timedelta(seconds=3)
    verdict = p.after_reading(state, NotApplied("no deposit"), now=100.0, wall=wall)
    assert isinstance(verdict, Requeue)
    assert verdict.ready_at == pytest.approx(100.0 + 15.0 - 3.0)
    assert state.unresolved is not None


def test_not_applied_needs_a_second_reading_then_sends_again() -> None:
    """After the window, one reading is not enough; the second one sends the row again."""
    p = policy()
    state = sent_state()
    late = SENT_AT + timedelta(seconds=60)
    first = p.after_reading(state, NotApplied("no deposit"), now=100.0, wall=late)
    assert first == Requeue(100.0 + p.confirm_gap)
    second = p.after_reading(state, NotApplied("no deposit"), now=101.0, wall=late)
    assert isinstance(second, SendAgain)
    assert second.close == Close(1, AttemptOutcome.NOT_APPLIED, "no deposit")
    assert (state.unresolved, state.spent) == (None, 1)


def test_not_applied_spends_the_budget() -> None:
    """A proven non-application costs an attempt: the last one allowed fails the row."""
    p = policy(max_attempts=1)
    state = sent_state()
    state.not_applied_at = 90.0
    late = SENT_AT + timedelta(seconds=60)
    verdict = p.after_reading(state, NotApplied("no deposit"), now=100.0, wall=late)
    assert isinstance(verdict, Finish)
    assert verdict.status is RowStatus.FAILED


def test_a_lost_topup_the_provider_settled_failed_fails_the_row_at_once() -> None:
    """Reconciliation finds the lost attempt settled Failed: the row fails, as a Failed
    webhook makes it, and is not sent again (no SendAgain, no second reading)."""
    state = sent_state()
    refused = Refused(RefusalCode.REJECTED, "the provider reported the topup Failed")
    verdict = policy().after_reading(state, refused, now=100.0, wall=SENT_AT)
    assert isinstance(verdict, Finish)
    assert verdict.status is RowStatus.FAILED
    assert verdict.close is not None
    assert verdict.close.outcome is AttemptOutcome.REFUSED
    assert state.unresolved is None


def test_recorded_window_is_kept_by_a_later_process() -> None:
    """A settle_by recorded with the intent wins over a shorter window of this process."""
    p = policy(apply_grace=0.0)
    state = sent_state()
    assert state.unresolved is not None
    recorded = SENT_AT + timedelta(seconds=100)
    state.unresolved = OpenAttempt(7, 1, "card-1", Decimal("25.00"), None, SENT_AT, recorded)
    wall = SENT_AT + timedelta(seconds=50)
    verdict = p.after_reading(state, NotApplied("no deposit"), now=0.0, wall=wall)
    assert verdict == Requeue(50.0, note=verdict.note)


@pytest.mark.parametrize(
    ("settled", "status", "outcome"),
    [
        (Applied(), RowStatus.SUCCEEDED, AttemptOutcome.APPLIED_RECONCILED),
        (Applied(pending=True), RowStatus.PENDING, AttemptOutcome.APPLIED_RECONCILED),
        (Applied(discrepancy="x"), RowStatus.NEEDS_REVIEW, AttemptOutcome.APPLIED_DISCREPANCY),
        (Unknown("cannot tell"), RowStatus.NEEDS_REVIEW, AttemptOutcome.UNKNOWN),
    ],
)
def test_reading_settles_the_row(
    settled: Applied | Unknown, status: RowStatus, outcome: AttemptOutcome
) -> None:
    """A reading that shows the money, or cannot tell, finishes the row without a resend."""
    state = sent_state()
    verdict = policy().after_reading(state, settled, now=5.0, wall=SENT_AT)
    assert isinstance(verdict, Finish)
    assert (verdict.status, verdict.close and verdict.close.outcome) == (status, outcome)
    assert state.unresolved is None


# -- properties -------------------------------------------------------------------------------


@given(attempt=st.integers(1, 60), r=st.floats(0, 1))
def test_backoff_grows_and_is_capped(attempt: int, r: float) -> None:
    """Never immediate, never beyond the cap, and half of each step is kept."""
    delay = backoff_delay(attempt, base=0.5, cap=30.0, rand=lambda: r)
    step = min(30.0, 0.5 * 2 ** (attempt - 1))
    assert step / 2 <= delay <= step


answers = st.one_of(
    st.builds(RetryLater, st.sampled_from(list(RetryKind)), st.just("m"), st.floats(0, 100)),
    st.builds(Unknown, st.just("lost")),
    st.builds(Refused, st.sampled_from(list(RefusalCode)), st.just("no")),
)


@given(seq=st.lists(answers, min_size=1, max_size=200), max_attempts=st.integers(1, 6))
def test_a_row_is_never_given_up_blindly(seq: list[Outcome], max_attempts: int) -> None:
    """Whatever the answers: a lost answer is always reconciled, never failed; transient
    failures are retried at most max_attempts times; waits cost no attempt; a requeue is
    never sooner than the answer; nothing goes on after the row is finished."""
    p = policy(max_attempts=max_attempts)
    state = sent_state()
    now = 0.0
    for outcome in seq:
        state.unresolved = state.unresolved or sent_state(state.sent).unresolved
        verdict = p.after_answer(state, outcome, sent=now, received=now + 0.5)
        if isinstance(outcome, Unknown):
            assert isinstance(verdict, Reconcile)
            assert state.unresolved is not None
        else:
            assert state.unresolved is None
        if isinstance(verdict, Requeue | Reconcile):
            assert verdict.ready_at >= now + 0.5
        assert state.spent <= max_attempts
        if isinstance(verdict, Finish):
            assert verdict.status is RowStatus.FAILED
            transient = isinstance(outcome, RetryLater) and outcome.kind is RetryKind.TRANSIENT
            if transient:
                assert state.spent == max_attempts
            break
        now += 1.0
        state.sent += 1
