"""One run, several workers: what a worker does besides sending to share a PostgreSQL ledger.

`SharedRun` holds the worker's cards: it claims them from the ledger in small batches,
busiest first, renews their leases while the worker lives, and gives back what is unfinished
when the worker stops. A worker sends nothing once it cannot prove it still holds its cards:
past `lease / 2` without a renewal it waits for the next one, and it stops after a whole lease
without one, when another worker may take them. `SharedPacer` is the provider's rate limit
shared by every worker: request slots come from the run's timeline in the ledger, a tenth of a
second's worth at a time.

`CardLeases` is the SQL of both, which `PostgresLedger` runs on a connection of its own so
that a renewal never waits behind a commit.
"""

from __future__ import annotations

import math
import os
import secrets
import socket
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import structlog

from runner.errors import LeaseLost, LedgerError
from runner.ledger.api import SharedLedger
from runner.ledger.statements import Statement, card_done
from runner.ledger.values import CardsLeft, CardWork, OpenAttempt
from runner.scheduler import Pacer, _prepaid

log = structlog.get_logger("runner.ledger.leases")

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


class CardLeases:
    """The SQL of card leases and rate slots, for `PostgresLedger` (which supplies `_query`
    and, through `post`, the commit that marks a card done)."""

    if TYPE_CHECKING:

        def _query(
            self, sql: str, params: Sequence[Any] = (), *, coordination: bool = False
        ) -> list[tuple[Any, ...]]: ...

        def _open_attempts(self, where: str, params: Sequence[Any]) -> list[OpenAttempt]: ...

        def post(self, statements: Sequence[Statement]) -> None: ...

    def claim_cards(self, run_key: str, owner: str, limit: int, lease: float) -> list[str]:
        """Up to `limit` cards nobody holds (or whose holder's lease ran out), busiest first,
        now `owner`'s until `lease` seconds from now unless renewed."""
        found = self._query(
            "WITH free AS (SELECT card_id FROM run_cards "
            "WHERE run_key = %s AND NOT done AND (owner IS NULL OR lease_until < now()) "
            "ORDER BY rows_total DESC, card_id LIMIT %s FOR UPDATE SKIP LOCKED) "
            "UPDATE run_cards c SET owner = %s, lease_until = now() + make_interval(secs => %s) "
            "FROM free WHERE c.run_key = %s AND c.card_id = free.card_id "
            "RETURNING c.card_id, c.rows_total",
            (run_key, limit, owner, lease, run_key),
            coordination=True,
        )
        found.sort(key=lambda claimed: (-claimed[1], claimed[0]))
        return [card for card, _ in found]

    def card_work(self, run_key: str, cards: Sequence[str]) -> CardWork:
        """The rows of `cards` still to send (not attempted, or with an attempt left open),
        with the requests already recorded for each."""
        cards = list(cards)
        open_attempts = self._open_attempts(
            "WHERE run_key = ? AND card_id = ANY(?) AND outcome IS NULL ORDER BY row, attempt",
            (run_key, cards),
        )
        in_doubt = [a.row for a in open_attempts]
        rows = dict(
            self._query(
                "SELECT row, attempts FROM rows WHERE run_key = %s AND card_id = ANY(%s) "
                "AND (status = 'not_attempted' OR row = ANY(%s))",
                (run_key, cards, in_doubt),
            )
        )
        for attempt in open_attempts:
            rows[attempt.row] = max(rows.get(attempt.row, 0), attempt.attempt)
        last_sent = dict(
            self._query(
                "SELECT card_id, MAX(sent_at) FROM attempts WHERE run_key = %s "
                "AND card_id = ANY(%s) GROUP BY card_id",
                (run_key, cards),
            )
        )
        return CardWork(rows, open_attempts, last_sent)

    def renew(self, run_key: str, owner: str, lease: float) -> set[str]:
        """Extend `owner`'s leases; the cards it still holds (a card missing was lost)."""
        found = self._query(
            # Locked in card order, as a commit marking cards done locks them: the two
            # never wait on each other in a circle.
            "WITH mine AS (SELECT card_id FROM run_cards WHERE run_key = %s AND owner = %s "
            "AND NOT done AND lease_until >= now() ORDER BY card_id FOR UPDATE) "
            "UPDATE run_cards c SET lease_until = now() + make_interval(secs => %s) "
            "FROM mine WHERE c.run_key = %s AND c.card_id = mine.card_id RETURNING c.card_id",
            (run_key, owner, lease, run_key),
            coordination=True,
        )
        return {card for (card,) in found}

    def release_cards(self, run_key: str, owner: str) -> None:
        """Hand `owner`'s unfinished cards back at once (a worker stopping cleanly)."""
        self._query(
            "WITH mine AS (SELECT card_id FROM run_cards WHERE run_key = %s AND owner = %s "
            "AND NOT done ORDER BY card_id FOR UPDATE) "
            "UPDATE run_cards c SET owner = NULL, lease_until = NULL "
            "FROM mine WHERE c.run_key = %s AND c.card_id = mine.card_id RETURNING c.card_id",
            (run_key, owner, run_key),
            coordination=True,
        )

    # The statement alone, for callers that commit it themselves (transition: `write`).
    card_done = staticmethod(card_done)

    def post_card_done(self, run_key: str, card_id: str, owner: str) -> None:
        """Queue marking a card finished: committed after its rows' outcomes, posted before."""
        self.post([card_done(run_key, card_id, owner)])

    def cards_left(self, run_key: str, owner: str) -> CardsLeft:
        free, held, soonest = self._query(
            "SELECT COUNT(*) FILTER (WHERE owner IS NULL OR lease_until < now()), "
            "COUNT(*) FILTER (WHERE owner <> %s AND lease_until >= now()), "
            "EXTRACT(EPOCH FROM MIN(lease_until) FILTER "
            "(WHERE owner <> %s AND lease_until >= now()) - now()) "
            "FROM run_cards WHERE run_key = %s AND NOT done",
            (owner, owner, run_key),
            coordination=True,
        )[0]
        return CardsLeft(free, held, None if soonest is None else float(soonest))

    def reserve_slots(self, run_key: str, count: int, spacing: float) -> tuple[float, float]:
        """`count` request slots `spacing` apart from the run's shared timeline: (the first
        slot, the database's clock now), both in seconds since the epoch."""
        block = count * spacing
        first, now = self._query(
            "WITH clock AS (SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8 AS now) "
            "INSERT INTO run_pace AS p (run_key, next_at) SELECT %s, clock.now + %s FROM clock "
            "ON CONFLICT (run_key) DO UPDATE SET next_at = GREATEST(p.next_at + %s, "
            "EXCLUDED.next_at) RETURNING p.next_at - %s, (SELECT now FROM clock)",
            (run_key, block, block, block),
            coordination=True,
        )[0]
        return float(first), float(now)

    def database_clock(self) -> float:
        """The database's clock, in seconds since the epoch."""
        ((now,),) = self._query(
            "SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8", coordination=True
        )
        return float(now)

    def share_rate(self, run_key: str, seen: float | None, proposed: float, lowered: bool) -> float:
        """The run's shared request rate (`--rate-limit auto`), after this worker's word: a
        cut (`lowered`) lowers it to `proposed` at most; a rise is taken only if nobody moved
        it since this worker read `seen` (so that no worker undoes another's cut)."""
        ((rate,),) = self._query(
            "INSERT INTO run_pace AS p (run_key, next_at, rate) "
            "VALUES (%s, EXTRACT(EPOCH FROM clock_timestamp())::float8, %s) "
            "ON CONFLICT (run_key) DO UPDATE SET rate = CASE "
            "WHEN p.rate IS NULL THEN EXCLUDED.rate "
            "WHEN %s THEN LEAST(p.rate, EXCLUDED.rate) "
            "WHEN p.rate = %s THEN EXCLUDED.rate ELSE p.rate END RETURNING p.rate",
            (run_key, proposed, lowered, seen),
            coordination=True,
        )
        return float(rate)

    def pause_slots(self, run_key: str, seconds: float) -> None:
        """Nobody's next request before `seconds` from now (the provider said 429)."""
        self._query(
            "UPDATE run_pace SET next_at = GREATEST(next_at, "
            "EXTRACT(EPOCH FROM clock_timestamp())::float8 + %s) WHERE run_key = %s "
            "RETURNING next_at",
            (seconds, run_key),
            coordination=True,
        )


class SharedPacer(Pacer):
    """`Pacer` whose slots come from the run's shared timeline in the ledger."""

    def __init__(
        self,
        rate: float | None,
        ledger: SharedLedger,
        run_key: str,
        *,
        clock: Callable[[], float] = anyio.current_time,
        auto: bool = False,
        ceiling: float | None = None,
    ) -> None:
        super().__init__(rate, clock=clock, auto=auto, ceiling=ceiling)
        self._ledger = ledger
        self._run_key = run_key
        self._slots: deque[float] = deque()
        self._refilling = anyio.Lock()
        self._pause_to_share = 0.0
        self._lowered = False  # a 429 cut the rate since the last trip to the ledger
        self._shared_rate: float | None = None  # the run's rate as last read from the ledger
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
        if self.auto and self.control is not None:
            # One rate for every worker: a cut is everyone's; a rise only from the shared rate.
            lowered, self._lowered = self._lowered, False
            shared = await ledger.coordinate(
                ledger.share_rate, self._run_key, self._shared_rate, self.control.rate, lowered
            )
            self._shared_rate = shared
            self.control.adopt(shared)
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
        last = self._slots[-1] if self._slots else None
        self._drop_late()
        if not self._slots and last is not None:
            # Every slot held is late (a ledger slower than a block of slots): the chooser
            # reserves right after this, so the last one is used late rather than leave it
            # none, which ended a worker with "reserve() without a slot" at 2,000/s.
            self._slots.append(last)
        return self._slots[0] if self._slots else self._clock()

    def reserve(self) -> float:
        """The next slot held (call `refill()` or `next_free()` first); a slot of ours, never a
        new one. Late slots are not dropped here: the one just offered may have crossed the
        lateness line since, and is used a moment late rather than leave the caller with none
        (which ended a worker with "unhandled errors in a TaskGroup")."""
        if self.rate is None:
            return super().reserve()
        if not self._slots:
            raise RuntimeError("SharedPacer.reserve() without a slot: refill() first")
        slot = self._slots.popleft()
        if self.control is not None:
            self.control.sent(slot)
        return slot

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
        self._mark_sent(slot)
        delay = slot - self._clock()
        if delay > self.slack():
            await anyio.sleep(delay)

    def slow_down(self, retry_after: float | None) -> None:
        """A 429 lowers the rate every worker shares (`auto`: at the next trip to the ledger);
        when the controller asks for a whole-run pause, the slots held are dropped and the
        pause is shared."""
        rate = self.current_rate
        pause = self._refused(retry_after)
        if self.current_rate != rate:
            self._lowered = True
        if pause > 0:
            self._slots.clear()
            self._pause_to_share = max(self._pause_to_share, pause)


class SharedRun:
    """A worker's share of a run: its cards and their leases."""

    def __init__(
        self,
        ledger: SharedLedger,
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
        # Cards whose done flag is being committed: a renewal may already miss them (a done
        # card is nobody's) before the commit returns and they leave `held`.
        self._marking_done: set[str] = set()
        self._clock = clock
        self._renewed_at = clock()
        self._renewal: anyio.Event | None = None  # set at the next renewal, for `hold()`
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
        self._marking_done |= cards
        try:
            for card in sorted(cards):
                self.ledger.post_card_done(self.run_key, card, self.owner)
            await self.ledger.flush()
        finally:
            self._marking_done -= cards
        self.held -= cards

    async def hold(self) -> None:
        """Return once the leases are certainly still ours (before each send). A renewal
        late past lease/2 (a process not scheduled for a moment, a slow round trip) is waited
        for, sending nothing meanwhile: the renewal says whether the cards are still ours.
        LeaseLost when one was taken, or when no renewal came for a whole lease (by then
        another worker may hold the cards)."""
        while self.lost is None and self.held:
            waited = self._clock() - self._renewed_at
            if waited <= self.lease / 2:
                return
            if self._renewal is None:
                self._renewal = anyio.Event()
            with anyio.move_on_after(self.lease - waited) as waiting:
                await self._renewal.wait()
            if waiting.cancelled_caught and self.lost is None:
                self.lost = LeaseLost(
                    f"worker {self.owner}: no lease renewal for {self.lease:g} s "
                    "(is the database reachable?): stopping, another worker may take its cards"
                )
        if self.lost is not None:
            raise self.lost

    def _renewed(self, at: float) -> None:
        """The leases hold from `at` on: whoever waits in `hold()` looks again."""
        self._renewed_at = max(self._renewed_at, at)
        self._wake()

    def _wake(self) -> None:
        if self._renewal is not None:
            self._renewal.set()
            self._renewal = None

    async def keep_leases(self) -> None:
        """Renew the leases every `lease / 4` seconds, for as long as the run goes."""
        ledger = self.ledger
        while True:
            await anyio.sleep(self.lease / 4)
            if not self.held:
                self._renewed(self._clock())
                continue
            asked, asking = self._clock(), set(self.held)
            try:
                still = await ledger.coordinate(ledger.renew, self.run_key, self.owner, self.lease)
            except LedgerError as exc:
                log.warning("lease.renewal_failed", error=str(exc))
                continue
            # A card finished meanwhile is not lost (its done flag won), nor one claimed since.
            lost = (asking - still) & (self.held - self._marking_done)
            if lost:
                self.lost = LeaseLost(
                    f"worker {self.owner}: lost the lease on {len(lost)} card(s) "
                    f"(e.g. {sorted(lost)[0]}): stopping"
                )
                self._wake()
                return
            self._renewed(asked)

    async def release(self) -> None:
        """Give back the cards not finished (a worker stopping), so others take them now."""
        ledger = self.ledger
        await self.commit_finished()
        if self.held:
            await ledger.flush()
            await ledger.coordinate(ledger.release_cards, self.run_key, self.owner)
            self.held.clear()
