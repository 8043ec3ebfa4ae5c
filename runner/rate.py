"""The request rate to use now, learned from the provider's rate-limit refusals (429s) alone.

`RateController` is additive-increase / multiplicative-decrease (AIMD), with a slow start
while nothing is known, and pure: time comes in as arguments. Why AIMD rather than a model of
the provider's limiter: neither provider documents its limiter (GCRA, token bucket, fixed
window: each reads a 429 pattern differently), and a whole-second Retry-After says next to
nothing about the limiter's interval. AIMD needs no model, only the signal every limiter
gives, and its costs are set by two figures chosen for the run's budget: a 429 costs the rate
`1 - DECREASE` (5 %); the rate climbs back within a few requests to PLATEAU (97 %) of the
rate that was refused, stays there for HOLD requests, then probes past it by SLOW_STEP a
request (the plateau of TCP CUBIC, much simplified). So a steady stream sees about one 429
per two hundred requests and averages about 97-98 % of the provider's rate, and a limit that
moved is found again without many 429s.

Only a 429 is a signal: a 5xx, a timeout or a dropped connection changes nothing here.

When a 429 stops the whole run (`refused` returns a pause): the provider's Retry-After is
longer than `LONG_RETRY_AFTER` (a quota is spent: every request would be refused), or
`RUN_OF_REFUSALS` requests in a row, in the order they were sent, were all refused (whatever
is sent is refused: sending more only earns more 429s). Otherwise only the refused request
waits as the provider asked; the rest of the run goes on at the lowered rate.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

# Slow start: the rate doubles every this many seconds of sending, until the first 429.
DOUBLING = 0.35
# ... or by this when the refusal before it came within DENSE requests (a limit that fell).
DENSE_DECREASE = 0.75
DENSE = 4
# Slow start: by at most 2**MAX_PROBE_STEP a request (a slow rate's slot is long).
MAX_PROBE_STEP = 0.25
# A request that went this many slots or more after the one before was not held back by
# the rate: it is no evidence that the provider takes more (RFC 7661's idea, for a rate).
PACED_GAP = 1.5
# A 429 multiplies the rate by this (once per rate: 429s of requests sent before the cut
# was made are answers to the rate that was already cut, and cut nothing more).
DECREASE = 0.95
# After a cut, the rate climbs back to PLATEAU x the refused rate by FAST_STEP per request,
# then past it by SLOW_STEP per request (about 1 % every 20 requests).
PLATEAU = 0.97
# A cut believes the rate the provider took down to this fraction of the refused rate (an
# estimate over a window that began slower says less than the provider took).
TRUST = 0.85
# Requests sent at that plateau before probing past it: a limiter that refuses a client at its
# exact rate (network jitter against a strict limiter) is asked about once per few hundred.
HOLD = 50
FAST_STEP = 0.01
SLOW_STEP = 0.0003
# ... and by at least this fraction a second (a slow provider's requests are few), doubled
# every ACCEL_SECONDS (or ACCEL_REQUESTS, if longer: a slow provider's 429 comes late) without
# a 429, up to 2**ACCEL_MAX times (the convex probe of TCP CUBIC):
# a plateau set too low (two 429s of one slow-start overshoot) is left in seconds, not minutes,
# while near a refused rate the probe stays slow.
SLOW_PER_SECOND = 0.01
ACCEL_SECONDS = 5.0
ACCEL_REQUESTS = 100
ACCEL_MAX = 4.0
# A cut goes to the rate the provider took over this many requests, if lower (see refused).
WINDOW = 24
MIN_SENDS = 6
# A Retry-After longer than this asks for a pause of the whole run (s).
LONG_RETRY_AFTER = 2.0
# This many requests in a row refused (in the order they were sent) pause the whole run.
RUN_OF_REFUSALS = 5
# The lowest rate the controller goes to, as a fraction of where it started, and absolute.
FLOOR_FRACTION = 0.02
MIN_RATE = 0.05
# What a run keeps of the rate it ended at, for the next run to start near (not above it).
KEEP_FRACTION = 0.97


@dataclass(slots=True)
class RateController:
    """The rate to pace requests at: `rate` per second, never above `ceiling`.

    `probe`: nothing is known yet, so slow start (the rate doubles every `DOUBLING` seconds
    of sending) until the first 429 or the ceiling. Otherwise the rate starts where it is
    told (the configured rate, or the rate an earlier run learned) and only AIMD moves it.
    A fixed `--rate-limit N` is a controller with `ceiling = start = N`: it never goes above
    the operator's figure, and goes below it only while the provider refuses it.
    """

    rate: float
    ceiling: float = math.inf
    probe: bool = False
    floor: float = MIN_RATE
    refusals: int = 0
    cuts: int = 0
    pauses: int = 0
    _grown_at: float | None = None
    _cut_at: float = -math.inf
    _cut_gap: float = 0.0  # one interval at the rate the last cut set
    _refused_rate: float | None = None
    _run_end: int = -2
    _run_length: int = 0
    _held: int = 0
    _sends: deque[float] = field(default_factory=lambda: deque(maxlen=4 * WINDOW))
    _refused_sends: deque[float] = field(default_factory=lambda: deque(maxlen=4 * WINDOW))
    _calm_since: float | None = None  # the last cut, else the first request
    # The run's end is near (`Pacer.near_end`): hold under the refused rate, probe no further.
    # A probe's gain there is a few requests; its 429 costs the refused row a whole-second
    # Retry-After, which at the end of a run is the run's own time.
    settle: bool = False

    def __post_init__(self) -> None:
        if not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError(f"rate must be a positive number per second, got {self.rate!r}")
        if not self.ceiling > 0:
            raise ValueError(f"ceiling must be positive, got {self.ceiling!r}")
        self.rate = min(self.rate, self.ceiling)
        self.floor = max(MIN_RATE, min(self.floor, self.rate * FLOOR_FRACTION))

    def sent(self, now: float) -> None:
        """A request goes now: the rate grows (nothing refused it so far)."""
        last, self._grown_at = self._grown_at, now
        self._sends.append(now)
        if self._calm_since is None:
            self._calm_since = now
        if self.rate >= self.ceiling:
            self.rate = self.ceiling
            return
        if last is None or now - last > PACED_GAP / self.rate:
            # The rate did not hold this request back (the run waits on cooldowns, or has
            # little left): whether the provider takes more is not being tested, so no rise.
            return
        if self.probe:
            step = min(max(0.0, now - last) / DOUBLING, MAX_PROBE_STEP)
            self.rate = min(self.ceiling, self.rate * 2.0**step)
            return
        refused = self._refused_rate
        fast = refused is not None and self.rate < PLATEAU * refused
        if not fast and refused is not None and self.settle:
            return
        if not fast and refused is not None and self._held < HOLD:
            self._held += 1  # just under the refused rate: stay a while before probing past it
            if self._held == HOLD:
                self._calm_since = now  # the probe past it starts slow
            return
        doubling = max(ACCEL_SECONDS, ACCEL_REQUESTS / self.rate)
        accel = 2.0 ** min(ACCEL_MAX, max(0.0, now - self._calm_since) / doubling)
        step = FAST_STEP if fast else max(SLOW_STEP, accel * SLOW_PER_SECOND / self.rate)
        grown = self.rate * (1.0 + step)
        if fast and refused is not None:
            grown = min(grown, PLATEAU * refused)
        self.rate = min(self.ceiling, grown)

    def refused(
        self, *, sent_at: float, now: float, seq: int | None = None, after: float | None = None
    ) -> float:
        """A request sent at `sent_at` (number `seq` in send order, when known) was refused
        with a 429 and a Retry-After of `after` seconds. The rate is cut (once per rate);
        returns how long the whole run should pause (0: only the refused request waits)."""
        self.refusals += 1
        # A request sent within one new interval of the cut was paced by the rate before it
        # (its slot was taken already): its 429 is the old rate's, like those sent before.
        if sent_at >= self._cut_at + self._cut_gap:
            # Down to what the provider took, if lower (a slow start that overshot), but never
            # below half at once; back quickly to just under the refused rate (see `sent`).
            taken = self._taken_rate(sent_at)
            cut = self.rate * (DENSE_DECREASE if self._dense(sent_at) else DECREASE)
            limit = self.rate
            if taken is not None and taken < limit:
                limit = max(taken, self.rate * TRUST)  # what the provider took, within reason
                cut = min(cut, max(taken, self.rate / 2))
            self._refused_rate = limit
            self._held = 0
            self.rate = max(self.floor, cut)
            self._cut_at = self._calm_since = now
            self._cut_gap = 1.0 / self.rate
            self.cuts += 1
        self._refused_sends.append(sent_at)
        self.probe = False
        if seq is not None:
            self._run_length = self._run_length + 1 if seq == self._run_end + 1 else 1
            self._run_end = seq
        wait = 1.0 if after is None else after
        if (after is not None and after > LONG_RETRY_AFTER) or (
            self._run_length >= RUN_OF_REFUSALS
        ):
            self._run_length = 0
            self.pauses += 1
            return wait
        return 0.0

    def _dense(self, sent_at: float) -> bool:
        """Whether the refusal before this one was of one of the DENSE requests sent before
        it: a limit well below the rate (one that just dropped), not an early request."""
        if not self._refused_sends:
            return False
        before = self._refused_sends[-1]
        between = sum(1 for t in self._sends if before < t <= sent_at)
        return between <= DENSE

    def _taken_rate(self, until: float) -> float | None:
        """The rate the provider took over the last `WINDOW` requests sent up to `until`:
        sent minus refused, over their span (a limiter in overload takes exactly its rate).
        None when those requests were not paced by the rate (the estimate would be low)."""
        sends = [t for t in self._sends if t <= until][-WINDOW:]
        if len(sends) < MIN_SENDS:
            return None
        span = until - sends[0]
        if span <= 0 or (not self.probe and span * self.rate > PACED_GAP * len(sends)):
            return None
        refused = 1 + sum(1 for t in self._refused_sends if sends[0] <= t <= until)
        return max(1, len(sends) - refused) / span

    def adopt(self, rate: float) -> None:
        """Another worker of the run moved the shared rate: this one paces at it too."""
        if rate > 0 and math.isfinite(rate):
            if rate < self.rate:
                self.probe = False
            self.rate = max(self.floor, min(self.ceiling, rate))

    def keep(self) -> float:
        """The rate worth starting the next run at: a little under where this one ended."""
        return self.rate * KEEP_FRACTION if self.refusals else self.rate
