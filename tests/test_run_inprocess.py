"""`run_job` driven in this process against the in-process sandbox, on an injected clock."""

from __future__ import annotations

import itertools
import os
import signal
import sqlite3
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog

from runner.config import Settings
from runner.domain import RowStatus
from runner.jobs import load_job
from runner.run import run_job
from runner.sandbox.config import SandboxConfig
from runner.sandbox.faults import FaultKind
from runner.sandbox.server import RunningSandbox, serve_sandbox
from tests.e2e import TOKEN, read_csv_report, write_job

pytestmark = pytest.mark.anyio

COOLDOWN = 0.2


class ShiftedClock:
    """The run's and the sandbox's clock: the loop's, a day ahead, so that a time taken from
    any other clock would be a day off and show."""

    def __init__(self) -> None:
        self.offset = 86_400.0

    def __call__(self) -> float:
        return anyio.current_time() + self.offset


@dataclass
class Harness:
    sb: RunningSandbox
    clock: ShiftedClock
    tmp: Path

    def settings(self, **more: Any) -> Settings:
        values: dict[str, Any] = {
            "provider": "uncash",
            "base_url": self.sb.base_url,
            "ledger": str(self.tmp / "ledger.sqlite"),
            "output": self.tmp / "report.csv",
            "cooldown": COOLDOWN,
            "rate_limit": 200.0,
            "concurrency": 4,
            "timeout": 5.0,
            "apply_grace": 0.2,
            "run_key": "inprocess",
        }
        values.update(more)
        return Settings(**values)

    def job(self, rows: list[tuple[str, str]]) -> Path:
        return write_job(self.tmp / "job.csv", [(c, a, f"R{n}") for n, (c, a) in enumerate(rows)])

    def outcomes(self) -> list[str]:
        with sqlite3.connect(self.tmp / "ledger.sqlite") as conn:
            return [r[0] for r in conn.execute("SELECT outcome FROM attempts ORDER BY sent_at")]


@asynccontextmanager
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    clock = ShiftedClock()
    config = SandboxConfig(token=TOKEN, cooldown=COOLDOWN, clock=clock)
    async with serve_sandbox(config) as sb:
        yield Harness(sb, clock, tmp_path)


ENV = {"UNCASH_API_TOKEN": TOKEN}


def cards(n: int) -> list[str]:
    return [str(uuid.uuid4()) for _ in range(n)]


async def test_rows_of_one_card_keep_the_cooldown_on_the_injected_clock(tmp_path: Path) -> None:
    """Every row paid once; one card's topups are a cooldown apart on the run's clock, so
    the sandbox (on the same clock) never had to refuse one."""
    ids = cards(3)
    async with harness(tmp_path) as h:
        job = load_job(
            str(
                h.job(
                    [
                        (ids[0], "10.00"),
                        (ids[1], "11.00"),
                        (ids[0], "12.00"),
                        (ids[2], "13.00"),
                        (ids[0], "14.00"),
                    ]
                )
            )
        )
        result = await run_job(job, h.settings(), env=ENV, clock=h.clock)
        applied = list(h.sb.state.applied)
        refusals = dict(h.sb.state.refusals)
    assert result.exit_code == 0
    assert result.counts[RowStatus.SUCCEEDED] == 5
    assert sorted(a.amount for a in applied) == [Decimal(f"{n}.00") for n in range(10, 15)]
    heavy = sorted(a.at for a in applied if a.card_id == ids[0])
    assert all(b - a >= COOLDOWN for a, b in itertools.pairwise(heavy)), heavy
    assert not refusals
    assert h.outcomes() == ["applied"] * 5


async def test_lost_answer_is_reconciled_not_paid_twice(tmp_path: Path) -> None:
    """An answer dropped after the topup applied is settled from the card: succeeded, once."""
    ids = cards(2)
    async with harness(tmp_path) as h:
        h.sb.faults.script(FaultKind.DROP_AFTER, card_id=ids[0])
        job = load_job(str(h.job([(ids[0], "20.00"), (ids[1], "21.00")])))
        with structlog.testing.capture_logs() as logs:
            result = await run_job(job, h.settings(), env=ENV, clock=h.clock)
        applied = Counter(a.card_id for a in h.sb.state.applied)
    assert result.exit_code == 0
    assert applied == {ids[0]: 1, ids[1]: 1}
    events = [e["event"] for e in logs]
    assert events.index("topup.unknown") < events.index("reconcile.applied")
    assert sorted(h.outcomes()) == ["applied", "applied (reconciled)"]
    report = {r["card_id"]: r for r in read_csv_report(tmp_path / "report.csv")}
    assert report[ids[0]]["status"] == "succeeded"
    assert report[ids[0]]["attempts"] == "1"


async def test_a_429_is_honoured(tmp_path: Path) -> None:
    """A 429 costs no attempt and the row goes again no sooner than its Retry-After."""
    ids = cards(1)
    async with harness(tmp_path) as h:
        h.sb.faults.script(FaultKind.RATE_LIMITED, card_id=ids[0])
        job = load_job(str(h.job([(ids[0], "30.00")])))
        with structlog.testing.capture_logs() as logs:
            result = await run_job(job, h.settings(max_attempts=1), env=ENV, clock=h.clock)
        arrivals = list(h.sb.state.topup_arrivals)
        applied = len(h.sb.state.applied)
    assert result.exit_code == 0
    assert applied == 1
    wait = next(e for e in logs if e["event"] == "topup.wait")
    assert wait["kind"] == "rate_limited"
    assert len(arrivals) == 2
    assert arrivals[1] - arrivals[0] >= 1.0  # the sandbox's Retry-After: 1
    assert h.outcomes() == ["rate_limited", "applied"]


class StopAfterFirst:
    """A progress watcher that sends this process SIGTERM when the first row is final."""

    def __init__(self) -> None:
        self.finals = 0

    def start(self, total: int, done: int) -> None:
        return None

    def row_final(self, status: RowStatus) -> None:
        self.finals += 1
        if self.finals == 1:
            os.kill(os.getpid(), signal.SIGTERM)


async def test_sigterm_stops_cleanly_and_the_rerun_finishes(tmp_path: Path) -> None:
    """SIGTERM: nothing more is sent, unsent rows stay not_attempted (exit 1); the rerun of
    the same key sends only those, and no row is ever paid twice."""
    ids = cards(8)
    rows = [(c, f"{40 + n}.00") for n, c in enumerate(ids)]
    async with harness(tmp_path) as h:
        job = load_job(str(h.job(rows)))
        slow = h.settings(rate_limit=4.0, concurrency=1)
        first = await run_job(job, slow, StopAfterFirst(), env=ENV, clock=h.clock)
        paid_first = len(h.sb.state.applied)
        second = await run_job(job, h.settings(), env=ENV, clock=h.clock)
        applied = Counter(a.card_id for a in h.sb.state.applied)
    assert first.stopped == "SIGTERM received"
    assert first.exit_code == 1
    assert first.counts[RowStatus.NOT_ATTEMPTED] == len(ids) - paid_first > 0
    assert first.counts[RowStatus.SUCCEEDED] == paid_first
    assert second.exit_code == 0
    assert second.sent == len(ids) - paid_first
    assert applied == dict.fromkeys(ids, 1)
