"""The shared pacer of workers on a PostgreSQL ledger, against a ledger whose round trips are
slower than a block of slots: the chooser's sequence (refill, next_free, reserve) always ends
with a slot, and never with "reserve() without a slot" (which ended a worker at 2,000/s)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import pytest

from runner.ledger.api import SharedLedger
from runner.ledger.leases import SharedPacer

pytestmark = pytest.mark.anyio


class SlowLedger:
    """Rate slots from a timeline, each trip taking `trip` seconds of the injected clock."""

    def __init__(self, now: list[float], trip: float) -> None:
        self.now, self.trip, self.next_at = now, trip, 0.0

    async def coordinate(self, func: Callable[..., Any], *args: Any) -> Any:
        return func(*args)

    def database_clock(self) -> float:
        self.now[0] += self.trip
        return self.now[0]

    def reserve_slots(self, run_key: str, count: int, spacing: float) -> tuple[float, float]:
        first = max(self.next_at, self.now[0])
        self.next_at = first + count * spacing
        self.now[0] += self.trip  # the answer arrives a trip later: the block is already late
        return first, self.now[0]

    def pause_slots(self, run_key: str, seconds: float) -> None:
        self.next_at = max(self.next_at, self.now[0] + seconds)


@pytest.mark.parametrize("trip", [0.0, 0.05, 0.3, 2.0])
async def test_the_choosers_sequence_always_ends_with_a_slot(trip: float) -> None:
    now = [1000.0]
    ledger = SlowLedger(now, trip)
    pacer = SharedPacer(2000.0, cast(SharedLedger, ledger), "run", clock=lambda: now[0])
    taken = []
    for _ in range(200):
        await pacer.refill()
        free_at = pacer.next_free()
        if free_at > now[0]:
            now[0] = free_at  # the chooser sleeps until the slot, then asks again
            continue
        taken.append(pacer.reserve())
    assert taken
    assert taken == sorted(taken)  # slots are used in their order, each once
    assert len(set(taken)) == len(taken)
