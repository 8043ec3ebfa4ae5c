"""Faults the sandbox injects on purpose: their kinds, and the plan that picks which topup gets one.

Random faults follow a rate and a seeded RNG; scripted faults (for tests) come first, in order.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass


class FaultKind(enum.StrEnum):
    """What goes wrong with one topup POST, and whether the topup is applied before it does."""

    DROP_BEFORE = "drop_before"  # connection closed without an answer; nothing applied
    DROP_AFTER = "drop_after"  # applied, then the connection closed without an answer
    ERROR_BEFORE = "error_before"  # a proxy's 502 HTML page; nothing applied
    ERROR_AFTER = "error_after"  # applied, then a 500 JSON envelope or a 502 HTML page
    SLOW = "slow"  # applied, the answer held back for `slow_seconds`
    RATE_LIMITED = "rate_limited"  # a spurious 429 with Retry-After; nothing applied
    COOLDOWN = "cooldown"  # a spurious "Please wait N seconds" refusal; nothing applied
    # Processed (and applied, if the rules allow) `slow_seconds` after arrival whether or not
    # the client is still there, as a backend that was busy does; answered then if anyone listens.
    LATE = "late"

    @property
    def applies_first(self) -> bool:
        """True when the request is processed (and may apply) before the fault shows."""
        return self in (FaultKind.DROP_AFTER, FaultKind.ERROR_AFTER, FaultKind.SLOW, FaultKind.LATE)


# The kinds drawn at random unless a config names others. `late` is left out: it holds a
# request for `slow_seconds` (5 s by default), so it is asked for by name, or scripted.
DEFAULT_FAULT_KINDS: tuple[FaultKind, ...] = tuple(
    kind for kind in FaultKind if kind is not FaultKind.LATE
)


def parse_fault_kind(value: str, allowed: Iterable[FaultKind] = tuple(FaultKind)) -> FaultKind:
    """The kind named `value` among `allowed`, or ValueError listing the allowed names."""
    allowed = tuple(allowed)
    try:
        kind = FaultKind(value)
    except ValueError:
        kind = None
    if kind is None or kind not in allowed:
        known = ", ".join(item.value for item in allowed)
        raise ValueError(f"unknown fault kind {value!r} (known: {known})") from None
    return kind


@dataclass(slots=True)
class ScriptedFault:
    """`remaining` more topup POSTs (for `card_id`, or any card when None) get `kind`."""

    kind: FaultKind
    card_id: str | None
    remaining: int


def _unchanged(card_id: str) -> str:
    return card_id


class FaultPlan:
    """Decides, for each topup POST in arrival order, which fault (if any) it gets.

    `canonical_id` maps a card id to the form the sandbox stores it under, so that a fault
    scripted for one spelling of a card id matches requests using another. `allowed` limits the
    kinds an API knows (Alix has no cooldown); `stream` names the RNG stream, so that two plans
    seeded alike do not draw the same faults.
    """

    def __init__(
        self,
        rate: float = 0.0,
        kinds: Iterable[FaultKind | str] = DEFAULT_FAULT_KINDS,
        *,
        seed: int | None = None,
        canonical_id: Callable[[str], str] = _unchanged,
        allowed: Iterable[FaultKind] = tuple(FaultKind),
        stream: str = "faults",
    ) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"fault rate must be between 0 and 1, got {rate}")
        self.rate = rate
        self.allowed = tuple(allowed)
        self.kinds = tuple(parse_fault_kind(kind, self.allowed) for kind in kinds)
        if rate > 0 and not self.kinds:
            raise ValueError("a fault rate above 0 needs at least one fault kind")
        # A string seed keeps this stream independent of the state's RNG seeded with the same int.
        self._rng = random.Random(None if seed is None else f"{stream}:{seed}")
        self._canonical_id = canonical_id
        self._scripts: list[ScriptedFault] = []

    def script(self, kind: FaultKind | str, card_id: str | None = None, count: int = 1) -> None:
        """Give the next `count` topup POSTs for `card_id` (any card when None) the fault `kind`."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be a positive integer, got {count!r}")
        target = None if card_id is None else self._canonical_id(card_id)
        self._scripts.append(ScriptedFault(parse_fault_kind(kind, self.allowed), target, count))

    def clear(self) -> None:
        """Forget every scripted fault that has not fired yet."""
        self._scripts.clear()

    @property
    def scripted(self) -> tuple[ScriptedFault, ...]:
        """Scripted faults still waiting to fire, in the order they will be considered."""
        return tuple(self._scripts)

    def draw(self, card_id: str) -> FaultKind | None:
        """The fault of the topup POST for `card_id` arriving now; scripted faults come first."""
        target = self._canonical_id(card_id)
        for scripted in self._scripts:
            if scripted.card_id is None or scripted.card_id == target:
                scripted.remaining -= 1
                if scripted.remaining == 0:
                    self._scripts.remove(scripted)
                return scripted.kind
        if self.rate > 0 and self._rng.random() < self.rate:
            return self._rng.choice(self.kinds)
        return None
