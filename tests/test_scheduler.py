"""The scheduler's policy under a simulated clock: cooldowns, rate, and closeness to LB."""

from __future__ import annotations

import heapq
import itertools
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.run.policy import backoff_delay
from runner.scheduler import Dispatcher, Pacer, lower_bound, tight_lower_bound


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def simulate(
    cards: list[str], rate: float, cooldown: float, concurrency: int, latency: float
) -> tuple[list[tuple[float, str]], float]:
    """Drive Dispatcher and Pacer the way the engine does, with requests taking `latency`.

    Returns the sends as (time, card) and the simulated time at which everything was done.
    """
    clock = FakeClock()
    pacer = Pacer(rate, clock=clock)
    dispatcher: Dispatcher[int] = Dispatcher(cooldown + latency)
    for order, card in enumerate(cards):
        dispatcher.add(card, order, order)
    sends: list[tuple[float, str]] = []
    in_flight: list[tuple[float, int, str]] = []  # (answer time, tiebreak, card)
    tiebreak = 0
    while len(dispatcher):
        # Complete everything answered by now: the card may go a cooldown after its answer.
        while in_flight and in_flight[0][0] <= clock.now:
            answered, _, card = heapq.heappop(in_flight)
            dispatcher.release(card, answered + cooldown)
        if not len(dispatcher):
            break
        if len(in_flight) < concurrency and dispatcher.queued:
            free_at = pacer.next_free()
            if free_at > clock.now:
                clock.now = free_at
                continue
            taken = dispatcher.take(clock.now, 1 / pacer.current_rate if pacer.current_rate else 0)
            if taken is not None:
                card = str(taken[0])
                pacer.reserve()
                sends.append((clock.now, card))
                tiebreak += 1
                heapq.heappush(in_flight, (clock.now + latency, tiebreak, card))
                continue
        wakeups = []
        ready_at = dispatcher.next_ready_at()
        if ready_at is not None and len(in_flight) < concurrency:
            wakeups.append(ready_at)
        if in_flight:
            wakeups.append(in_flight[0][0])
        clock.now = max(clock.now, min(wakeups))
    return sends, clock.now


def job_shapes() -> st.SearchStrategy[list[str]]:
    """Random jobs: a few heavy cards among many light ones, in random file order."""

    @st.composite
    def build(draw: st.DrawFn) -> list[str]:
        light = draw(st.integers(min_value=0, max_value=60))
        heavy = draw(st.lists(st.integers(min_value=1, max_value=12), max_size=4))
        cards = [f"light-{i}" for i in range(light)]
        for n, size in enumerate(heavy):
            cards += [f"heavy-{n}"] * size
        if not cards:
            cards = ["only"]
        seed = draw(st.integers(min_value=0, max_value=2**16))
        random.Random(seed).shuffle(cards)
        return cards

    return build()


@settings(max_examples=150, deadline=None)
@given(
    cards=job_shapes(),
    rate=st.sampled_from([2.0, 5.0, 10.0, 50.0]),
    cooldown=st.sampled_from([0.5, 1.0, 3.0]),
    concurrency=st.integers(min_value=1, max_value=8),
)
def test_no_cooldown_or_rate_violation_and_every_row_sent(
    cards: list[str], rate: float, cooldown: float, concurrency: int
) -> None:
    """Every row goes out once; one card's sends are a cooldown apart; the rate holds."""
    latency = 0.02
    sends, _ = simulate(cards, rate, cooldown, concurrency, latency)
    assert sorted(c for _, c in sends) == sorted(cards)
    last: dict[str, float] = {}
    for at, card in sends:
        if card in last:
            assert at - last[card] >= cooldown + latency - 1e-9
        last[card] = at
    times = [at for at, _ in sends]
    for earlier, later in itertools.pairwise(times):
        assert later - earlier >= 1 / rate - 1e-9


@settings(max_examples=150, deadline=None)
@given(
    cards=job_shapes(),
    rate=st.sampled_from([2.0, 5.0, 10.0, 50.0]),
    cooldown=st.sampled_from([1.0, 3.0]),
)
def test_makespan_close_to_lower_bound(cards: list[str], rate: float, cooldown: float) -> None:
    """With enough concurrency, first to last send stays within 5 % of the bound (plus latency)."""
    latency = 0.005
    counts: dict[str, int] = {}
    for card in cards:
        counts[card] = counts.get(card, 0) + 1
    k = max(counts.values())
    # LB's refinement for several equally heavy cards: no schedule can beat it either.
    lb = tight_lower_bound(counts.values(), rate, cooldown)
    assert lb >= lower_bound(len(cards), k, rate, cooldown)
    sends, _ = simulate(cards, rate, cooldown, concurrency=16, latency=latency)
    makespan = sends[-1][0] - sends[0][0]
    # Each cooldown gap is measured from the answer, so latency adds once per gap.
    allowance = (k - 1) * latency + 1 / rate
    assert makespan <= lb * 1.05 + allowance


def test_heavy_card_last_in_file_starts_first() -> None:
    """A card with many rows at the end of the file is served before the light rows."""
    cards = [f"light-{i}" for i in range(20)] + ["heavy"] * 5
    sends, _ = simulate(cards, rate=10.0, cooldown=1.0, concurrency=4, latency=0.01)
    assert sends[0][1] == "heavy"


def test_file_order_within_a_card() -> None:
    """Rows of one card go out in the order of the file."""
    dispatcher: Dispatcher[str] = Dispatcher()
    for n, item in enumerate(["a1", "a2", "a3"]):
        dispatcher.add("a", item, n)
    got = []
    now = 0.0
    while len(dispatcher):
        taken = dispatcher.take(now)
        assert taken is not None
        got.append(taken[1])
        dispatcher.release("a", now)
    assert got == ["a1", "a2", "a3"]


def test_busy_card_is_not_taken_twice() -> None:
    """At most one request in flight per card: a taken card is not handed out again."""
    dispatcher: Dispatcher[int] = Dispatcher()
    dispatcher.add("a", 1, 1)
    dispatcher.add("a", 2, 2)
    assert dispatcher.take(0.0) == ("a", 1)
    assert dispatcher.take(100.0) is None
    dispatcher.release("a", 5.0)
    assert dispatcher.take(4.9) is None
    assert dispatcher.next_ready_at() == 5.0
    assert dispatcher.take(5.0) == ("a", 2)


def test_put_back_goes_to_the_front() -> None:
    """A retried row keeps its place ahead of the card's later rows."""
    dispatcher: Dispatcher[str] = Dispatcher()
    dispatcher.add("a", "first", 1)
    dispatcher.add("a", "second", 2)
    taken = dispatcher.take(0.0)
    assert taken == ("a", "first")
    dispatcher.release("a", 1.0, put_back="first", order=1)
    assert dispatcher.take(1.0) == ("a", "first")


def test_release_of_an_idle_card_is_an_error() -> None:
    """Releasing a card that was not taken is a bug, caught loudly."""
    dispatcher: Dispatcher[int] = Dispatcher()
    dispatcher.add("a", 1, 1)
    with pytest.raises(RuntimeError):
        dispatcher.release("a", 0.0)


def test_dispatch_cost_does_not_grow_with_queue() -> None:
    """Taking from a queue of 200,000 rows does heap work, not a scan: a bounded op count."""
    dispatcher: Dispatcher[int] = Dispatcher()
    for n in range(200_000):
        dispatcher.add(f"card-{n}", n, n)
    # The heap of ready cards gets built once; every take afterwards pops in O(log n).
    taken = [dispatcher.take(0.0) for _ in range(1000)]
    assert all(t is not None for t in taken)
    assert dispatcher.queued == 200_000 - 1000


def test_pacer_spaces_requests_evenly() -> None:
    """Reservations are exactly 1/R apart, however many arrive at once."""
    clock = FakeClock()
    pacer = Pacer(4.0, clock=clock)
    slots = [pacer.reserve() for _ in range(5)]
    assert slots == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_pacer_slows_after_429_and_recovers() -> None:
    """A 429 lowers the rate (pausing nobody: test_ratecontrol); paced requests win it back."""
    clock = FakeClock()
    pacer = Pacer(10.0, clock=clock)
    pacer.reserve()
    pacer.slow_down(1.0)
    assert pacer.current_rate is not None
    assert pacer.current_rate < 10.0
    for _ in range(2000):
        pacer.reserve()
    assert pacer.current_rate == 10.0


def test_pacer_unlimited_never_waits() -> None:
    """Without a rate limit, every reservation is now."""
    clock = FakeClock()
    pacer = Pacer(None, clock=clock)
    assert [pacer.reserve() for _ in range(3)] == [0.0, 0.0, 0.0]


def test_lower_bound_is_the_larger_of_rate_and_cooldown() -> None:
    """LB = max((N-1)/R, (k-1)*c)."""
    assert lower_bound(101, 1, 10.0, 120.0) == pytest.approx(10.0)
    assert lower_bound(10, 4, 10.0, 120.0) == pytest.approx(360.0)
    assert lower_bound(1, 1, None, 5.0) == 0.0


@given(attempt=st.integers(min_value=1, max_value=30), r=st.floats(min_value=0, max_value=1))
def test_backoff_grows_and_is_capped(attempt: int, r: float) -> None:
    """Backoff is at least half its exponential step and never above the cap."""
    delay = backoff_delay(attempt, base=0.5, cap=30.0, rand=lambda: r)
    step = min(30.0, 0.5 * 2 ** (attempt - 1))
    assert step / 2 <= delay <= step
    assert not math.isnan(delay)


@pytest.mark.anyio
async def test_prepaid_slot_serves_the_first_request_only() -> None:
    """A slot reserved when the card was chosen is used by the task's first request only."""
    clock = FakeClock()
    pacer = Pacer(4.0, clock=clock)
    slot = pacer.reserve()
    clock.now = 10.0  # every slot below is in the past: nothing sleeps
    with pacer.prepaid(slot):
        await pacer.acquire()  # uses the prepaid slot: reserves nothing new
        assert pacer.next_free() == pytest.approx(0.25)
        await pacer.acquire()  # a second request in the same step reserves its own
    assert pacer.next_free() == pytest.approx(10.25)
