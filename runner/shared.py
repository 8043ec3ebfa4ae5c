"""One run, several workers: what a worker does besides sending to share a PostgreSQL ledger.

`SharedRun` holds the worker's cards: it claims them from the ledger in small batches,
busiest first, renews their leases while the worker lives, and gives back what is unfinished
when the worker stops. A worker sends nothing once it cannot prove it still holds its cards:
it stops after `lease / 2` without a renewal, while another worker may take them only after
the whole lease. `SharedPacer` is the provider's rate limit shared by every worker: request
slots come from the run's timeline in the ledger, a tenth of a second's worth at a time.
"""

from __future__ import annotations

import math
import os
import secrets
import socket
from collections import deque
from collections.abc import Callable

import anyio
import structlog

from runner.errors import LeaseLost, LedgerError
from runner.ledger_pg import CardsLeft, CardWork, PostgresLedger
from runner.scheduler import Pacer, _prepaid

log = structlog.get_logger("runner.shared")

# Slots reserved per trip to the ledger: this many seconds' worth at the current rate.
SLOT_BLOCK_SECONDS = 0.1
# A slot more than this fraction of the spacing in the past is dropped, not used late: a late
# request would crowd the next slot, which may be another worker's.
LATE_SLOT_FRACTION = 0.5
# Reads of the database's clock before the first slot, to map it onto ours.
CALIBRATION_TRIPS = 5


def worker_name() -> str:
    """Who holds a lease: host, process and a random tag (a pid is reused after a crash)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class SharedPacer(Pacer):
    """`Pacer` whose slots come from the run's shared timeline in the ledger."""

    def __init__(
        self,
        rate: float | None,
        ledger: PostgresLedger,
        run_key: str,
        *,
        clock: Callable[[], float] = anyio.current_time,
    ) -> None:
        super().__init__(rate, clock=clock)
        self._ledger = ledger
        self._run_key = run_key
        self._slots: deque[float] = deque()
        self._refilling = anyio.Lock()
        self._pause_to_share = 0.0
        self._best_trip = math.inf
        self._offset = 0.0

    def _spacing(self) -> float:
        assert self.current_rate is not None
        return 1.0 / self.current_rate

    async def refill(self) -> None:
        """Make sure a slot is held (a trip to the ledger when none is)."""
        if self.rate is None:
            return
        self._drop_late()
        if self._slots:
            return
        async with self._refilling:
            if self._best_trip == math.inf:
                await self._calibrate()
            for _ in range(3):
                if self._slots:
                    return
                await self._reserve_block()
                last = self._slots[-1] if self._slots else None
                self._drop_late()
            if not self._slots and last is not None:
                # Three blocks all came too late to use (a very slow ledger): use the last
                # slot late rather than not at all.
                self._slots.append(last)

    async def _calibrate(self) -> None:
        """Read the database's clock a few times before the first slot: the first trips
        through a new thread and a new connection are slow, and say the offset badly."""
        ledger = self._ledger
        for _ in range(CALIBRATION_TRIPS):
            asked = self._clock()
            db_now = await ledger.coordinate(ledger.database_clock)
            self._note_trip(asked, self._clock(), db_now)

    def _note_trip(self, asked: float, answered: float, db_now: float) -> None:
        """The database's clock on ours, taken halfway through the round trip; from the
        quickest round trip so far, the one that says it best (a trip through a thread of a
        busy process can be slow one way only)."""
        trip = answered - asked
        if trip <= self._best_trip:
            self._best_trip = trip
            self._offset = (asked + answered) / 2 - db_now

    async def _reserve_block(self) -> None:
        ledger = self._ledger
        if self._pause_to_share > 0:
            pause, self._pause_to_share = self._pause_to_share, 0.0
            await ledger.coordinate(ledger.pause_slots, self._run_key, pause)
        spacing = self._spacing()
        count = max(1, math.ceil(SLOT_BLOCK_SECONDS / spacing))
        asked = self._clock()
        first, db_now = await ledger.coordinate(ledger.reserve_slots, self._run_key, count, spacing)
        self._note_trip(asked, self._clock(), db_now)
        start = first + self._offset
        self._slots.extend(start + n * spacing for n in range(count))

    def _drop_late(self) -> None:
        if not self._slots or self.current_rate is None:
            return
        late = max(self._clock() - LATE_SLOT_FRACTION * self._spacing(), self._paused_until)
        while self._slots and self._slots[0] < late:
            self._slots.popleft()

    def next_free(self) -> float:
        if self.rate is None:
            return super().next_free()
        self._drop_late()
        return self._slots[0] if self._slots else self._clock()

    def reserve(self) -> float:
        """The next slot held (call `refill()` first); a slot of ours, never a new one."""
        if self.rate is None:
            return super().reserve()
        self._drop_late()
        if not self._slots:
            raise RuntimeError("SharedPacer.reserve() without a slot: refill() first")
        self._recover()
        return self._slots.popleft()

    async def acquire(self) -> None:
        """Wait for this request's slot. A slot prepaid when its card was chosen is given up
        if the request comes too late for it (an intent that took long to commit): sent late,
        it would crowd the next slot, which may be another worker's."""
        if self.rate is None:
            await super().acquire()
            return
        slot = _prepaid.get()
        if slot is not None:
            _prepaid.set(None)
            if self._clock() - slot > LATE_SLOT_FRACTION * self._spacing():
                slot = None
        if slot is None:
            await self.refill()
            slot = self.reserve()
        delay = slot - self._clock()
        if delay > 0:
            await anyio.sleep(delay)

    def slow_down(self, retry_after: float | None) -> None:
        """A 429 pauses every worker: the slots held are dropped and the pause is shared."""
        super().slow_down(retry_after)
        self._slots.clear()
        self._pause_to_share = max(self._pause_to_share, retry_after or 1.0)


class SharedRun:
    """A worker's share of a run: its cards and their leases."""

    def __init__(
        self,
        ledger: PostgresLedger,
        run_key: str,
        *,
        lease: float,
        clock: Callable[[], float],
        owner: str | None = None,
    ) -> None:
        self.ledger = ledger
        self.run_key = run_key
        self.lease = lease
        self.owner = owner or worker_name()
        self.held: set[str] = set()
        self._finishing: set[str] = set()
        self._clock = clock
        self._renewed_at = clock()
        self.lost: LeaseLost | None = None

    async def claim(self, limit: int) -> list[str]:
        ledger = self.ledger
        before = self._clock()
        cards = await ledger.coordinate(
            ledger.claim_cards, self.run_key, self.owner, limit, self.lease
        )
        if cards and not self.held:
            self._renewed_at = before  # a claim is as good as a renewal for what it holds
        self.held.update(cards)
        if cards:
            log.debug("cards.claimed", cards=len(cards), owner=self.owner)
        return cards

    async def work_for(self, cards: list[str]) -> CardWork:
        ledger = self.ledger
        return await ledger.call(ledger.card_work, self.run_key, cards)

    async def cards_left(self) -> CardsLeft:
        ledger = self.ledger
        return await ledger.coordinate(ledger.cards_left, self.run_key, self.owner)

    def finished(self, card: str) -> None:
        """The card has nothing left to send; `commit_finished()` marks it done. It stays
        held (its lease renewed) until then, so nobody takes it while its rows' outcomes
        are still on their way to the ledger."""
        self._finishing.add(card)

    @property
    def in_hand(self) -> int:
        """Cards held with rows still to send."""
        return len(self.held) - len(self._finishing)

    async def commit_finished(self) -> None:
        """Mark the finished cards done, in a commit that also carries their rows' outcomes."""
        if not self._finishing:
            return
        cards, self._finishing = self._finishing, set()
        await self.ledger.write(
            [PostgresLedger.card_done(self.run_key, card, self.owner) for card in sorted(cards)]
        )
        self.held -= cards

    def check(self) -> None:
        """Raise LeaseLost unless the leases are certainly still ours (before each send)."""
        if self.lost is not None:
            raise self.lost
        if self.held and self._clock() - self._renewed_at > self.lease / 2:
            self.lost = LeaseLost(
                f"worker {self.owner}: no lease renewal for {self.lease / 2:g} s "
                "(is the database reachable?): stopping before another worker takes its cards"
            )
            raise self.lost

    async def keep_leases(self) -> None:
        """Renew the leases every `lease / 4` seconds, for as long as the run goes."""
        ledger = self.ledger
        while True:
            await anyio.sleep(self.lease / 4)
            if not self.held:
                self._renewed_at = self._clock()
                continue
            asked, asking = self._clock(), set(self.held)
            try:
                still = await ledger.coordinate(ledger.renew, self.run_key, self.owner, self.lease)
            except LedgerError as exc:
                log.warning("lease.renewal_failed", error=str(exc))
                continue
            # A card finished meanwhile is not lost (its done flag won), nor one claimed since.
            lost = (asking - still) & self.held
            if lost:
                self.lost = LeaseLost(
                    f"worker {self.owner}: lost the lease on {len(lost)} card(s) "
                    f"(e.g. {sorted(lost)[0]}): stopping"
                )
                return
            self._renewed_at = asked

    async def release(self) -> None:
        """Give back the cards not finished (a worker stopping), so others take them now."""
        ledger = self.ledger
        await self.commit_finished()
        if self.held:
            await ledger.flush()
            await ledger.coordinate(ledger.release_cards, self.run_key, self.owner)
            self.held.clear()
