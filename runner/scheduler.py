"""Who goes next: per-card cooldowns and the global request rate (retry timing: run/policy.py).

`Dispatcher` is pure bookkeeping with time passed in, so that its policy can be tested and
simulated without an event loop: among cards whose cooldown has passed and that have no
request in flight, the card with the most rows left goes first (ties: earliest row), which
starts heavy cards early and fills the gaps with light ones. Each step is O(log cards).
`Pacer` spaces every request to the provider evenly at the allowed rate, slowing down
when the provider says so.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Hashable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Generic, TypeVar, cast

import anyio

from runner.rate import RateController

T = TypeVar("T")


@dataclass(slots=True)
class _Card(Generic[T]):
    """A card's queued items in order, from `head` on, with each one's order in the job.

    Two plain lists and a head index rather than a deque of (order, item) tuples: a deque
    costs over 600 bytes however few items it holds, and a tuple 56 bytes an item, which for
    a million rows of 200,000 cards was a fifth of the run's memory.
    """

    key: Hashable
    orders: list[int] = field(default_factory=list)
    items: list[T | None] = field(default_factory=list)
    head: int = 0
    busy: bool = False
    ready_at: float = -math.inf

    def left(self) -> int:
        return len(self.items) - self.head

    def first_order(self) -> int:
        return self.orders[self.head]

    def push(self, order: int, item: T) -> None:
        self.orders.append(order)
        self.items.append(item)

    def push_front(self, order: int, item: T) -> None:
        if self.head:
            self.head -= 1
            self.orders[self.head] = order
            self.items[self.head] = item
        else:
            self.orders.insert(0, order)
            self.items.insert(0, item)

    def pop(self) -> T:
        head = self.head
        item = self.items[head]
        self.items[head] = None  # the item is the caller's now: do not keep it alive
        if head + 1 == len(self.items):
            self.orders.clear()
            self.items.clear()
            self.head = 0
        else:
            self.head = head + 1
        return cast(T, item)

    def queued(self) -> list[T]:
        return cast(list[T], self.items[self.head :])


class Dispatcher(Generic[T]):
    """Queues of work items per card; hands out the next item that may be sent now.

    Items of one card go out in the order they were added (job order), one at a time:
    a card is `busy` from `take()` until `release()`.
    """

    def __init__(self, cooldown: float = 0.0) -> None:
        self.cooldown = cooldown
        self._cards: dict[Hashable, _Card[T]] = {}
        # (-rows left, first row's order, tiebreak, card) for idle cards whose cooldown passed
        self._ready: list[tuple[int, int, int, Hashable]] = []
        # (ready_at, tiebreak, card) for idle cards waiting out a cooldown
        self._cooling: list[tuple[float, int, Hashable]] = []
        self._tiebreak = 0
        self._queued = 0
        self._busy = 0

    def add(self, card: Hashable, item: T, order: int, not_before: float = -math.inf) -> None:
        """Queue `item` for `card`; `order` is its position in the job (ties go to the lower).

        `not_before` holds a card that is new to the dispatcher (a resumed run's cooldown).
        """
        entry = self._cards.get(card)
        if entry is None:
            entry = self._cards[card] = _Card(card, ready_at=not_before)
        was_empty = not entry.left()
        entry.push(order, item)
        self._queued += 1
        if was_empty and not entry.busy:
            self._schedule(entry, entry.ready_at)

    def extend(self, items: Iterable[tuple[Hashable, T, int]]) -> None:
        for card, item, order in items:
            self.add(card, item, order)

    @property
    def queued(self) -> int:
        """Items not yet taken (including ones put back)."""
        return self._queued

    @property
    def busy(self) -> int:
        """Cards with an item taken and not yet released."""
        return self._busy

    def __len__(self) -> int:
        return self._queued + self._busy

    def _schedule(self, entry: _Card[T], ready_at: float) -> None:
        self._tiebreak += 1
        entry.ready_at = ready_at
        heapq.heappush(self._cooling, (ready_at, self._tiebreak, entry.key))

    def _promote(self, now: float) -> None:
        while self._cooling and self._cooling[0][0] <= now:
            _, _, key = heapq.heappop(self._cooling)
            entry = self._cards[key]
            if entry.busy or not entry.left():
                continue
            self._tiebreak += 1
            heapq.heappush(self._ready, (-entry.left(), entry.first_order(), self._tiebreak, key))

    def take(self, now: float, slot: float = 0.0) -> tuple[Hashable, T] | None:
        """The next (card, item) that may go now, or None; the card becomes busy.

        `slot` is the time between two requests at the current rate. When the rate and a
        heavy card's cooldown both bind, giving this slot to a light card would make the
        heavy card wait for the next slot on every cycle; so if a heavier card comes out of
        its cooldown before the next slot and its chain of cooldowns, not the rate, decides
        when the job ends, the slot is left for it (None: wait until `next_ready_at()`).
        """
        self._promote(now)
        if slot > 0 and self._waits_for_critical_card(now, slot):
            return None
        while self._ready:
            _, _, _, key = heapq.heappop(self._ready)
            entry = self._cards[key]
            if entry.busy or not entry.left():
                continue
            item = entry.pop()
            entry.busy = True
            self._queued -= 1
            self._busy += 1
            return key, item
        return None

    def _waits_for_critical_card(self, now: float, slot: float) -> bool:
        ready_at = self.next_ready_at()
        if ready_at is None or ready_at >= now + slot:
            return False
        coming = self._cards[self._cooling[0][2]]
        best_ready = -self._ready[0][0] if self._ready else 0
        if coming.left() <= best_ready:
            return False
        chain_end = ready_at + (coming.left() - 1) * self.cooldown
        rate_end = now + (self._queued - 1) * slot
        return chain_end >= rate_end

    def next_ready_at(self) -> float | None:
        """When the earliest cooling card becomes ready (None: nothing is cooling)."""
        while self._cooling:
            ready_at, _, key = self._cooling[0]
            entry = self._cards[key]
            if entry.busy or not entry.left() or entry.ready_at != ready_at:
                heapq.heappop(self._cooling)
                continue
            return ready_at
        return None

    def release(
        self, card: Hashable, ready_at: float, *, put_back: T | None = None, order: int = 0
    ) -> None:
        """End the card's busy spell; its next item may go at `ready_at`.

        `put_back` returns the taken item to the front of the card's queue (a retry).
        """
        entry = self._cards[card]
        if not entry.busy:
            raise RuntimeError(f"release of card {card!r} that was not taken")
        entry.busy = False
        self._busy -= 1
        if put_back is not None:
            entry.push_front(order, put_back)
            self._queued += 1
        if entry.left():
            self._schedule(entry, ready_at)
        else:
            del self._cards[card]

    def holds(self, card: Hashable) -> bool:
        """Whether `card` has an item queued or taken."""
        return card in self._cards

    def drain(self) -> list[T]:
        """Remove and return every queued item (the run is stopping)."""
        left = [item for entry in self._cards.values() for item in entry.queued()]
        for entry in self._cards.values():
            entry.orders.clear()
            entry.items.clear()
            entry.head = 0
        self._queued = 0
        self._ready.clear()
        self._cooling.clear()
        return left


def lower_bound(rows: int, busiest_card_rows: int, rate: float | None, cooldown: float) -> float:
    """The shortest possible time from first to last topup: max((N-1)/R, (k-1)*c)."""
    by_rate = (rows - 1) / rate if rate else 0.0
    by_cooldown = max(0, busiest_card_rows - 1) * cooldown
    return max(0.0, by_rate, by_cooldown)


def tight_lower_bound(rows_per_card: Iterable[int], rate: float | None, cooldown: float) -> float:
    """LB refined for several heavy cards: the i-th heaviest card (0-based) with k rows
    cannot finish before (k-1)*c + i/R, since its first row waited for i slots."""
    counts = sorted(rows_per_card, reverse=True)
    slot = 1.0 / rate if rate else 0.0
    by_cards = max(((k - 1) * cooldown + i * slot for i, k in enumerate(counts)), default=0.0)
    return max(lower_bound(sum(counts), counts[0] if counts else 0, rate, cooldown), by_cards)


Clock = Callable[[], float]
_prepaid: ContextVar[float | None] = ContextVar("prepaid_slot", default=None)
# (number in send order, slot) of the request this task sent last: what a 429 answers.
_sent: ContextVar[tuple[int, float] | None] = ContextVar("sent_slot", default=None)
# A timer coarser than one slot must not cost slots: when slots are closer than this, a slot
# due within this much of now is paid at once (a small burst) rather than slept for. Slots are
# absolute times, so a late wake-up is caught up on by the next slots, not lost.
TIMER_GRAIN = 0.002
# Within this many seconds of the run's end (rows left at the current rate), the rate no
# longer probes past a refused rate: a 429 there delays its row by a whole-second Retry-After.
SETTLE_SECONDS = 3.0


class Pacer:
    """Spaces requests at most `current_rate` per second, evenly, for every caller together.

    Each `acquire()` reserves the next free slot (FIFO) and sleeps until it. The rate is the
    `RateController`'s (runner.rate): the configured one, or with `auto` one learned from the
    provider's 429s. A 429 (`slow_down`) lowers it; only the refused request waits its
    Retry-After, unless the controller's rule says the provider wants the whole run paused.
    """

    def __init__(
        self,
        rate: float | None,
        *,
        clock: Clock = anyio.current_time,
        auto: bool = False,
        ceiling: float | None = None,
    ) -> None:
        if rate is not None and rate <= 0:
            raise ValueError("rate must be positive (or None for unlimited)")
        self.rate = rate
        self.auto = auto and rate is not None
        self.ceiling = (ceiling or math.inf) if self.auto else rate
        self.control = (
            None
            if rate is None
            else RateController(rate, self.ceiling or math.inf, probe=self.auto)
        )
        self.learned: float | None = None  # the rate an earlier run learned, if started at it
        self._clock = clock
        self._next_at = -math.inf
        self._paused_until = -math.inf
        self._sent_count = 0
        self._last_send = -math.inf
        self.slowdowns = 0

    @property
    def current_rate(self) -> float | None:
        return None if self.control is None else self.control.rate

    def start_from(self, learned: float | None) -> None:
        """With `auto`, start at the rate an earlier run learned, not at the bottom."""
        if not self.auto or learned is None or not learned > 0 or self.ceiling is None:
            return
        self.learned = min(learned, self.ceiling)
        self.control = RateController(self.learned, self.ceiling, probe=False)

    def used(self) -> str:
        """The rate this run paced at, for its last log line and its report."""
        rate = self.current_rate
        if rate is None:
            return "unlimited"
        if not self.auto:
            return f"configured {self.rate:g}/s"
        return f"learned {rate:.3g}/s (auto)"

    def near_end(self, rows_left: int | None) -> None:
        """Tell the rate how much is left (None: unknown, more may come): within
        `SETTLE_SECONDS` of the end at the current rate, the controller stops probing."""
        control = self.control
        if control is not None:
            control.settle = rows_left is not None and rows_left < control.rate * SETTLE_SECONDS

    def slack(self) -> float:
        """How early a slot may be paid: `TIMER_GRAIN` when slots are closer than it."""
        rate = self.current_rate
        return TIMER_GRAIN if rate is not None and rate * TIMER_GRAIN > 1.0 else 0.0

    def reserve(self) -> float:
        """Take the next slot and return when it is (no sleeping): the pure part of acquire."""
        now = self._clock()
        at = max(now, self._next_at, self._paused_until)
        control = self.control
        if control is not None:
            control.sent(at)
            self._next_at = at + 1.0 / control.rate
        return at

    async def refill(self) -> None:
        """Make sure `reserve()` has a slot to give: always so here (see SharedPacer)."""

    def next_free(self) -> float:
        """When a request could go if nobody else asked first (a past time means now)."""
        return max(self._next_at, self._paused_until)

    def _mark_sent(self, slot: float) -> None:
        self._sent_count += 1
        _sent.set((self._sent_count, slot))

    async def acquire(self) -> None:
        """Wait for this request's slot: the one prepaid for it, or the next free one."""
        slot = _prepaid.get()
        if slot is not None:
            _prepaid.set(None)
        else:
            slot = self.reserve()
        self._mark_sent(slot)
        now = self._clock()
        rate = self.current_rate
        if rate is not None and rate * TIMER_GRAIN <= 1.0:
            # Never closer to the request sent before than one slot, however late that one
            # went (its intent took long to commit): a strict limiter refuses the second of
            # two requests closer than its interval. The delay is the largest lateness so far,
            # once, not one per request.
            slot = max(slot, self._last_send + 1.0 / rate)
            self._last_send = max(slot, now)
        delay = slot - now
        if delay > self.slack():
            await anyio.sleep(delay)

    @contextmanager
    def prepaid(self, slot: float) -> Iterator[None]:
        """The next `acquire()` in this task uses `slot`, reserved earlier with `reserve()`.

        The dispatch loop reserves a slot when it chooses a card, so that the choice is made
        when the request can go, not several slots ahead of it.
        """
        token = _prepaid.set(slot)
        try:
            yield
        finally:
            _prepaid.reset(token)

    def slow_down(self, retry_after: float | None) -> None:
        """The provider said 429 to this task's last request."""
        self._refused(retry_after)

    def _refused(self, retry_after: float | None) -> float:
        """Teach the controller; pause everyone only when its rule says so. The pause."""
        now = self._clock()
        self.slowdowns += 1
        sent = _sent.get()
        seq, sent_at = sent if sent is not None else (None, now)
        if self.control is None:
            pause = retry_after if retry_after is not None else 1.0
        else:
            pause = self.control.refused(sent_at=sent_at, now=now, seq=seq, after=retry_after)
        if pause > 0:
            self._paused_until = max(self._paused_until, now + pause)
        return pause
