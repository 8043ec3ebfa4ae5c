"""Where a run's cards come from: all of the job's at once (this process alone sends), or claimed
a few at a time under leases from a shared PostgreSQL ledger, as every worker of the run does."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

import anyio
import anyio.abc
import structlog

from runner.config import Settings
from runner.domain import JobRow
from runner.errors import RunnerError
from runner.run.record import RunRecord
from runner.run.resume import WorkLeft, cooldowns_left
from runner.scheduler import Pacer

log = structlog.get_logger("runner.run")

# How often a worker of a shared run with no card left looks at the cards others hold (s).
IDLE_POLL = 0.5


class Queue(Protocol):
    """What a card source feeds: the run's workers."""

    @property
    def stopping(self) -> str | None: ...

    def queue(self, row: JobRow, not_before: float) -> None: ...

    def wake(self) -> None: ...

    def mark_stale(self, cards: Iterable[str]) -> None: ...

    def fail(self, exc: RunnerError) -> None: ...


class Cards(Protocol):
    """A run's source of cards, seen by its workers."""

    # The rows taken so far and what earlier processes left of them (`WorkLeft.row_state`).
    left: WorkLeft
    # Requests to the provider are paced by this (shared by every worker, or this process's).
    pacer: Pacer
    # Whether more rows may still come (while True, a worker with nothing to do waits).
    feeding: bool

    def begin(self, queue: Queue, left: WorkLeft, set_aside: Mapping[int, str]) -> None:
        """Queue what is to be sent now: `left` is the work the ledger shows, `set_aside` the
        rows preflight refused."""

    def start(self, queue: Queue, tg: anyio.abc.TaskGroup) -> None:
        """Start what runs beside the workers (claiming cards, keeping leases)."""

    async def hold(self) -> None:
        """Return once this process may send on its cards (before every send); raise when
        it may not any more."""

    def idle(self, card: str, stopping: bool) -> None:
        """Nothing of `card` is queued or in flight any more."""

    def wake(self) -> None:
        """Something changed (a card went idle, the run is stopping): look again."""

    async def release(self) -> None:
        """The run stops: give back what was not finished."""


class AllCards:
    """Every card of the job, queued at once; a SQLite ledger's lock keeps others out."""

    feeding = False

    def __init__(self, settings: Settings, hold: float, clock: Callable[[], float]) -> None:
        self.left = WorkLeft(())
        self.pacer = Pacer(
            settings.rate_limit, clock=clock, auto=settings.rate_auto, ceiling=settings.rate_ceiling
        )
        self._hold = hold
        self._clock = clock

    def begin(self, queue: Queue, left: WorkLeft, set_aside: Mapping[int, str]) -> None:
        self.left = left
        hold = cooldowns_left(left.last_sent, self._hold, self._clock)
        for r in left.rows:
            if r.row not in set_aside:
                queue.queue(r, hold.get(r.card_id, -math.inf))

    def start(self, queue: Queue, tg: anyio.abc.TaskGroup) -> None:
        return None

    async def hold(self) -> None:
        return None

    def idle(self, card: str, stopping: bool) -> None:
        return None

    def wake(self) -> None:
        return None

    async def release(self) -> None:
        return None


class LeasedCards:
    """Cards claimed from a shared ledger, the busiest free ones first, a few at a time; their
    rows queued as a resumed run's are (what other workers sent counts, attempts they left open
    are reconciled first, cooldowns are honoured)."""

    def __init__(
        self,
        record: RunRecord,
        settings: Settings,
        rows: Sequence[JobRow],
        hold: float,
        clock: Callable[[], float],
    ) -> None:
        from runner.ledger.leases import SharedPacer, SharedRun
        from runner.ledger.postgres import PostgresLedger

        ledger = record.ledger
        assert isinstance(ledger, PostgresLedger)
        self.left = WorkLeft(())
        self.feeding = False
        self.pacer: Pacer = SharedPacer(
            settings.rate_limit,
            ledger,
            record.run_key,
            clock=clock,
            auto=settings.rate_auto,
            ceiling=settings.rate_ceiling,
        )
        self._shared = SharedRun(ledger, record.run_key, lease=settings.lease, clock=clock)
        log.info("worker.joined", worker=self._shared.owner, ledger=ledger.name)
        self._settings = settings
        self._rows = rows
        self._hold = hold
        self._clock = clock
        self._by_number: dict[int, JobRow] = {}
        self._set_aside: Mapping[int, str] = {}
        self._wake: anyio.Event | None = None

    def begin(self, queue: Queue, left: WorkLeft, set_aside: Mapping[int, str]) -> None:
        # Rows come as this worker claims their cards, not from what the ledger showed.
        self._set_aside = set_aside
        self._by_number = {r.row: r for r in self._rows}
        self.feeding = True

    def start(self, queue: Queue, tg: anyio.abc.TaskGroup) -> None:
        tg.start_soon(self._feed, queue)
        tg.start_soon(self._keep_leases, queue)

    async def hold(self) -> None:
        await self._shared.hold()  # never send on a card another worker may hold by now

    def idle(self, card: str, stopping: bool) -> None:
        if not stopping:
            self._shared.finished(card)
        self.wake()

    def wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def release(self) -> None:
        # Cards not finished go back at once: another worker takes them (and reconciles
        # what is in doubt) without waiting for the leases to run out.
        with anyio.CancelScope(shield=True):
            await self._shared.release()

    async def _feed(self, queue: Queue) -> None:
        """Claim cards while any are left; on a ledger that cannot be used, stop cleanly as a
        worker does: what was not committed stays open, to be reconciled by whoever takes
        the cards."""
        try:
            await self._claim_cards(queue)
        except RunnerError as exc:
            queue.fail(exc)
        finally:
            self.feeding = False
            queue.wake()

    async def _claim_cards(self, queue: Queue) -> None:
        """The busiest free cards first, enough in hand to fill every request slot across a
        cooldown. Then wait while other workers hold cards: should one die, its leases run
        out and its cards come here."""
        settings, shared = self._settings, self._shared
        target = min(
            1000,
            2 * settings.concurrency + math.ceil((settings.rate_limit or 0) * settings.cooldown),
        )
        idle_poll = min(settings.lease / 4, IDLE_POLL)
        while not queue.stopping:
            await shared.commit_finished()
            if shared.in_hand <= target // 2:
                cards = await shared.claim(target - shared.in_hand)
                if cards:
                    await self._take(queue, cards)
                    continue
                if not shared.held:
                    left = await shared.cards_left()
                    if left.free == 0 and left.held_by_others == 0:
                        return
                    wait = idle_poll
                    if left.soonest_expiry is not None:
                        wait = min(wait, left.soonest_expiry + 0.05)
                    if left.free:
                        wait = 0.05  # freed meanwhile, or taken by a faster worker
                    await self._sleep(max(wait, 0.01))
                    continue
            await self._sleep(settings.lease / 4)

    async def _sleep(self, seconds: float) -> None:
        self._wake = wake = anyio.Event()
        with anyio.move_on_after(seconds):
            await wake.wait()
        self._wake = None

    async def _take(self, queue: Queue, cards: list[str]) -> None:
        shared = self._shared
        work = await shared.work_for(cards)
        hold = cooldowns_left(work.last_sent, self._hold, self._clock)
        opened = {a.row: a for a in work.open_attempts}
        queued: set[str] = set()
        for number in sorted(work.rows):
            row = self._by_number.get(number)
            if row is None or number in self._set_aside:
                continue
            if work.rows[number]:
                self.left.sent_before[number] = work.rows[number]
            if number in opened:
                self.left.open_before[number] = opened[number]
            queue.queue(row, hold.get(row.card_id, -math.inf))
            queued.add(row.card_id)
        # Another worker topped these up: what this one read at preflight is out of date.
        queue.mark_stale(work.last_sent)
        for card in cards:
            if card not in queued:
                shared.finished(card)
        queue.wake()

    async def _keep_leases(self, queue: Queue) -> None:
        shared = self._shared
        await shared.keep_leases()
        if shared.lost is not None:
            queue.fail(shared.lost)


def open_cards(
    record: RunRecord,
    settings: Settings,
    rows: Sequence[JobRow],
    hold: float,
    clock: Callable[[], float],
) -> Cards:
    """The run's cards: leased from a shared ledger, else all of them. `hold` is how long
    after an earlier send a card waits (its cooldown, and the grace before a reconcile)."""
    if record.shared:
        return LeasedCards(record, settings, rows, hold, clock)
    return AllCards(settings, hold, clock)
