"""One row, one step: reconcile its open attempt, or read its card, commit the intent, send, and
do with the answer what the policy says; every outcome into the record. Rows never fail here."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import assert_never

import structlog

from runner.domain import AttemptOutcome, RowStatus
from runner.errors import AuthenticationFailed, ProviderError
from runner.ledger import OpenAttempt, utcnow
from runner.logs import row_logger
from runner.money import format_amount
from runner.providers.base import Applied, CardState, CardStatus, Provider
from runner.run.finish import Tally
from runner.run.policy import (
    Finish,
    Note,
    Policy,
    Reconcile,
    Requeue,
    RowState,
    SendAgain,
    Verdict,
)
from runner.run.record import RunRecord

log = structlog.get_logger("runner.run")


class Attempts:
    """Takes rows one step each against one provider, keeping what is known of their cards."""

    def __init__(
        self,
        provider: Provider,
        record: RunRecord,
        policy: Policy,
        tally: Tally,
        snapshots: dict[str, CardState],
        *,
        clock: Callable[[], float],
        hold: Callable[[], Awaitable[None]],
    ) -> None:
        self.provider = provider
        self.record = record
        self.policy = policy
        self.tally = tally
        # The card states preflight read, then each answer's: a send needs no read first.
        self.snapshots = snapshots
        self.stale: set[str] = set()  # cards whose snapshot may be out of date
        self.clock = clock
        self._hold = hold
        self._reads_cards = provider.rules.reads_cards
        self._log_row, self._rows_logged = row_logger(log)

    async def step(self, card: str, state: RowState) -> tuple[float, bool]:
        """Take the row one step further; returns when its card may go next and whether
        the row goes back in the queue."""
        row = state.job_row
        if state.unresolved is not None:
            done = await self._reconcile(card, state)
            if done is not None:
                return done
        before: CardState | None = None
        if self._reads_cards:
            # The snapshot preflight or the last answer left, without a coroutine to get it.
            before = self.snapshots.get(card)
            if before is None or card in self.stale:
                before = await self._snapshot(card)
            if before is None:
                error = "card_not_found: the card is no longer visible"
                return self._apply(card, state, Finish(RowStatus.FAILED, self.clock(), error))
            if before.status in (CardStatus.FROZEN, CardStatus.CLOSED):
                # Read again since preflight (after a lost answer, say) and no longer active:
                # a topup would be refused, and sending one only to learn that costs a wait.
                error = f"card_inactive: the card is {before.status.value}: not sent"
                return self._apply(card, state, Finish(RowStatus.FAILED, self.clock(), error))

        await self._hold()
        policy, record = self.policy, self.record
        attempt = state.sent + 1
        sent_at = utcnow()
        settle_by = policy.settle_by(sent_at)
        await record.record_intent(row.row, attempt, card, row.amount, before, sent_at, settle_by)
        # From here until the outcome is recorded, the attempt is open in the ledger.
        state.sent = attempt
        state.not_applied_at = None
        state.unresolved = OpenAttempt(
            row.row, attempt, card, row.amount, before, sent_at, settle_by=settle_by
        )
        self.tally.sent += 1
        sent = self.clock()
        try:
            outcome = await self.provider.topup(card, row.amount)
        except AuthenticationFailed as exc:
            # Refused at the door: nothing was applied, so the attempt is closed, not in doubt.
            state.unresolved = None
            await record.write_outcome(row.row, attempt, AttemptOutcome.UNAUTHORIZED, str(exc))
            raise
        received = self.clock()

        if type(outcome) is Applied:
            if outcome.discrepancy is not None or (
                before is not None
                and outcome.card_balance_after is not None
                and outcome.card_balance_after != before.balance + row.amount
            ):
                why = outcome.discrepancy
                if why is None:
                    assert before is not None
                    why = await self._balance_doubt(card, before, row.amount, outcome)
                if why:
                    self.stale.add(card)
                    doubt = policy.in_doubt(state, outcome, why, received + policy.cooldown)
                    return self._apply(card, state, doubt)
            # `Policy.after_answer`'s Applied case, inlined: this is every topup.
            state.unresolved = None
            tally = self.tally
            if tally.first_applied is None:
                tally.first_applied = received
            if received > tally.last_applied:
                tally.last_applied = received
            if before is not None:
                self.snapshots[card] = _after(before, row.amount, outcome.card_balance_after)
            status = RowStatus.PENDING if outcome.pending else RowStatus.SUCCEEDED
            if self._rows_logged:
                self._log_row(
                    "topup.applied",
                    row=row.row,
                    card_id=card,
                    amount=format_amount(row.amount),
                    fee=None if outcome.fee is None else format_amount(outcome.fee),
                    attempt=attempt,
                    pending=outcome.pending,
                )
            record.post_applied(row.row, attempt, status, outcome)
            tally.row_final(status)
            return received + policy.cooldown, False

        verdict = policy.after_answer(state, outcome, sent=sent, received=received)
        if isinstance(verdict, Reconcile):
            self.stale.add(card)
        return self._apply(card, state, verdict)

    async def _reconcile(self, card: str, state: RowState) -> tuple[float, bool] | None:
        """Settle an attempt whose answer was lost. None: proven not applied, send it again
        now; else when the card may go next and whether the row goes back in the queue."""
        pending = state.unresolved
        assert pending is not None
        row = state.job_row
        known = await self.record.known_refs(card)
        settled = await self.provider.reconcile(
            card, row.amount, pending.before, sent_at=pending.sent_at, known_refs=known
        )
        self.stale.add(card)
        now = self.clock()
        if isinstance(settled, Applied):
            self.tally.applied_at(now)
        verdict = self.policy.after_reading(state, settled, now=now, wall=utcnow())
        if isinstance(verdict, SendAgain):
            _tell(verdict.note, state.job_row.row, card)
            close = verdict.close
            self.record.post_outcome(state.job_row.row, close.attempt, close.outcome, close.detail)
            return None
        return self._apply(card, state, verdict)

    def _apply(self, card: str, state: RowState, verdict: Verdict) -> tuple[float, bool]:
        """Record and log what the policy decided; when the card may go next and whether the
        row goes back in the queue."""
        row = state.job_row.row
        _tell(verdict.note, row, card)
        match verdict:
            case Finish():
                close = verdict.close
                self.record.post_finish(
                    row,
                    verdict.status,
                    verdict.error,
                    verdict.applied,
                    None if close is None else (close.attempt, close.outcome, close.detail),
                )
                self.tally.row_final(verdict.status)
                return verdict.ready_at, False
            case Requeue():
                if verdict.close is not None:
                    close = verdict.close
                    self.record.post_outcome(row, close.attempt, close.outcome, close.detail)
                return verdict.ready_at, True
            case Reconcile():
                return verdict.ready_at, True
            case _:
                assert_never(verdict)

    async def _balance_doubt(
        self, card: str, before: CardState, amount: Decimal, outcome: Applied
    ) -> str:
        """Why an applied answer whose balance did not move by the amount is in doubt, or ""
        when the card's deposit (which spending does not lower) shows exactly this topup:
        the card was spent from meanwhile, which is no discrepancy."""
        said = outcome.card_balance_after
        assert said is not None
        try:
            now = await self.provider.get_card(card)
        except AuthenticationFailed:
            raise
        except ProviderError:
            now = None
        if now is not None:
            self.snapshots[card] = now
            self.stale.discard(card)
            if before.deposit is not None and now.deposit is not None:
                deposit_moved = now.deposit - before.deposit
                if deposit_moved == amount:
                    return ""
                return (
                    f"the card's balance went from {format_amount(before.balance)} to "
                    f"{format_amount(said)} and its deposit moved by "
                    f"{format_amount(deposit_moved)}, for a topup of {format_amount(amount)}"
                )
        return (
            f"the card's balance went from {format_amount(before.balance)} to "
            f"{format_amount(said)}, not by the topup's {format_amount(amount)}"
        )

    async def _snapshot(self, card: str) -> CardState | None:
        if card in self.snapshots and card not in self.stale:
            return self.snapshots[card]
        state = await self.provider.get_card(card)
        self.stale.discard(card)
        if state is None:
            self.snapshots.pop(card, None)
        else:
            self.snapshots[card] = state
        return state


def _tell(note: Note | None, row: int, card: str) -> None:
    if note is None:
        return
    if note.warning:
        log.warning(note.event, row=row, card_id=card, **note.fields)
    else:
        log.info(note.event, row=row, card_id=card, **note.fields)


def _after(before: CardState, amount: Decimal, balance_after: Decimal | None) -> CardState:
    balance = balance_after if balance_after is not None else before.balance + amount
    return CardState(
        before.card_id,
        before.status,
        _shared_money(balance),
        None if before.deposit is None else _shared_money(before.deposit + amount),
        before.currency,
        before.limit,
    )


_SHARED_MONEY: dict[str, Decimal] = {}


def _shared_money(value: Decimal) -> Decimal:
    """One Decimal for equal amounts (by exact text) across cards' snapshots: 200,000 cards
    topped up alike otherwise hold 400,000 Decimals (80 MB) after their first topup."""
    text = str(value)
    shared = _SHARED_MONEY.get(text)
    if shared is not None:
        return shared
    if len(_SHARED_MONEY) < 4_096:
        _SHARED_MONEY[text] = value
    return value
