"""The run's workers: `--concurrency` long-lived tasks in one task group taking turns to choose
what goes next (`runner.scheduler`), SIGINT/SIGTERM handling, and the graceful stop."""

from __future__ import annotations

import asyncio
import math
import signal
from collections.abc import Callable, Iterable

import anyio
import anyio.abc
import structlog

from runner.domain import JobRow
from runner.errors import RunnerError
from runner.run.attempt import Attempts
from runner.run.cards import Cards
from runner.run.finish import Tally
from runner.run.policy import RowState
from runner.scheduler import Dispatcher

log = structlog.get_logger("runner.run")

# How often a run logs `run.progress` (per-row success events are debug in JSON mode).
PROGRESS_EVERY = 10.0


class Workers:
    """Sends a run's rows: one worker per request allowed in flight, no task per request."""

    def __init__(
        self,
        cards: Cards,
        attempts: Attempts,
        tally: Tally,
        *,
        cooldown: float,
        concurrency: int,
        rows: int,
        stop_grace: float,
        clock: Callable[[], float],
    ) -> None:
        self.cards = cards
        self.attempts = attempts
        self.tally = tally
        self.concurrency = concurrency
        self.rows = rows
        self.stop_grace = stop_grace
        self.clock = clock
        self.pacer = cards.pacer
        self.dispatcher: Dispatcher[JobRow | RowState] = Dispatcher(cooldown)
        self.stopping: str | None = None
        self.fatal: RunnerError | None = None
        self.in_flight = 0
        # Rows whose last answer was lost and that are not back in the queue: in doubt.
        self.in_doubt: dict[int, RowState] = {}
        # What was still queued when the run stopped (rows taken before come as RowStates).
        self.unsent: list[JobRow | RowState] = []
        self._changed: anyio.Event | None = None  # set when the waiting chooser should look
        # asyncio's lock, not anyio's: taken once a topup, and anyio's looks the current task
        # up twice each time (a few percent of an unlimited run's CPU).
        self._choosing = asyncio.Lock()
        self._workers: anyio.abc.TaskGroup | None = None

    # -- what card sources feed ------------------------------------------------------------

    def queue(self, row: JobRow, not_before: float) -> None:
        self.dispatcher.add(row.card_id, row, row.row, not_before)

    def wake(self) -> None:
        if self._changed is not None:
            self._changed.set()

    def mark_stale(self, cards: Iterable[str]) -> None:
        self.attempts.stale.update(cards)

    def fail(self, exc: RunnerError) -> None:
        """The provider or the ledger cannot be used at all: stop cleanly."""
        self.fatal = self.fatal or exc
        self.stop(f"error: {exc}")

    # -- the run ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Send every row queued (and every row the card source brings) until none is left
        or the run stops; what is still queued then was never sent."""
        async with anyio.create_task_group() as outer:
            outer.start_soon(self._watch_signals)
            outer.start_soon(self._log_progress)
            self.cards.start(self, outer)
            async with anyio.create_task_group() as workers:
                self._workers = workers
                for _ in range(self.concurrency):
                    workers.start_soon(self._work_loop)
            outer.cancel_scope.cancel()
        # Whatever is still queued was not sent again: the end of the run marks it.
        self.unsent = self.dispatcher.drain()
        await self.cards.release()

    def stop(self, reason: str) -> None:
        """Send nothing more; requests in flight get `stop_grace` to finish."""
        if self.stopping is None:
            self.stopping = reason
            log.warning(
                "run.stopping", reason=reason, in_flight=self.in_flight, grace_s=self.stop_grace
            )
            if self._workers is not None:
                scope = self._workers.cancel_scope
                # The task group's deadline is on anyio's clock, whatever clock the run uses.
                scope.deadline = min(scope.deadline, anyio.current_time() + self.stop_grace)
        self.wake()
        self.cards.wake()

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if self.stopping:
                    log.warning("run.stop_now", signal=name)
                    if self._workers is not None:
                        self._workers.cancel_scope.cancel()
                else:
                    self.stop(f"{name} received")

    async def _log_progress(self) -> None:
        """Every PROGRESS_EVERY seconds, what the run has done so far (info, in every mode)."""
        tally = self.tally
        started = last_at = self.clock()
        last_sent = tally.sent
        while True:
            await anyio.sleep(PROGRESS_EVERY)
            now = self.clock()
            log.info(
                "run.progress",
                rows=self.rows,
                rows_left=self.dispatcher.queued,
                in_flight=self.in_flight,
                sent=tally.sent,
                topups_per_s=round((tally.sent - last_sent) / max(now - last_at, 1e-9), 1),
                elapsed_s=round(now - started, 1),
                **{f"rows_{status.value}": n for status, n in tally.final.items()},
            )
            last_at, last_sent = now, tally.sent

    # -- each worker -----------------------------------------------------------------------

    async def _work_loop(self) -> None:
        """Take the next row that may go, take it one step, again, until none is left."""
        while True:
            # One worker at a time chooses, as one dispatch loop would: the others queue
            # behind it, so a rate slot wakes one worker, not all of them.
            async with self._choosing:
                taken = await self._choose()
            if taken is None:
                return
            await self._serve(*taken)

    async def _choose(self) -> tuple[str, RowState, float] | None:
        """The next (card, row, rate slot), waiting for the slot first so that the card is
        chosen at send time; None once nothing is left or the run is stopping."""
        dispatcher, pacer, cards = self.dispatcher, self.pacer, self.cards
        while not self.stopping and (len(dispatcher) or cards.feeding):
            now = self.clock()
            wake_at = math.inf
            if dispatcher.queued:
                pacer.near_end(None if cards.feeding else len(dispatcher))
                await pacer.refill()  # slots of a shared rate limit, when none are held
                now = self.clock()
                free_at = pacer.next_free()
                if free_at - now > pacer.slack():  # slots closer than the timer: a burst
                    await anyio.sleep(free_at - now)
                    continue
                rate = pacer.current_rate
                taken = dispatcher.take(now, 1.0 / rate if rate else 0.0)
                if taken is not None:
                    card, item = taken
                    self.in_flight += 1
                    return str(card), cards.left.row_state(item), pacer.reserve()
                wake_at = dispatcher.next_ready_at() or math.inf
            # Nothing may go now: wait for a row to come back or a card to be ready.
            self._changed = changed = anyio.Event()
            with anyio.move_on_after(max(0.0, wake_at - now) if wake_at < math.inf else None):
                await changed.wait()
            self._changed = None
        return None

    async def _serve(self, card: str, state: RowState, slot: float) -> None:
        ready_at = self.clock()
        put_back = False
        try:
            if self.pacer.rate is None:
                # Unlimited: the slot is "now" (or the end of a 429's pause), whoever asks.
                ready_at, put_back = await self.attempts.step(card, state)
            else:
                # The slot reserved when the card was chosen goes to this step's first request.
                with self.pacer.prepaid(slot):
                    ready_at, put_back = await self.attempts.step(card, state)
        except RunnerError as exc:
            # The provider or the ledger cannot be used at all: stop cleanly, keep the row.
            put_back = state.unresolved is None
            self.fail(exc)
        finally:
            if state.unresolved is not None:
                self.in_doubt[state.job_row.row] = state
            else:
                self.in_doubt.pop(state.job_row.row, None)
            dispatcher = self.dispatcher
            dispatcher.release(
                card, ready_at, put_back=state if put_back else None, order=state.job_row.row
            )
            self.in_flight -= 1
            if not dispatcher.holds(card):
                self.cards.idle(card, self.stopping is not None)
            self.wake()
