"""Several workers, one run: the PostgreSQL ledger they share, judged by the sandbox's record.

The ledger tests drive `PostgresLedger` directly; the end-to-end tests start real
`topup-runner run` processes against a sandbox in the test's event loop, all given the same
job, run key and `--ledger postgresql://...`.
"""

from __future__ import annotations

import itertools
import signal
import subprocess
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import anyio
import anyio.abc
import pytest

from runner.domain import JobRow, RowStatus
from runner.errors import LeaseLost, LedgerError
from runner.ledger import Ledger, ProviderEvent, RunSpec, open_ledger, redact, utcnow
from runner.ledger.leases import SharedRun
from runner.ledger.postgres import PostgresLedger
from runner.sandbox.config import SandboxCard, SandboxConfig
from runner.sandbox.faults import FaultKind
from runner.sandbox.server import RunningSandbox, serve_sandbox
from runner.sandbox.state import Refusal
from tests.e2e import (
    TOKEN,
    clean_env,
    command,
    judge,
    read_csv_report,
    run_cli,
    unique_amount_job,
    until,
    write_job,
)

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

# Faults that hide or delay an answer; the sandbox's own 429 and cooldown refusals stay out,
# so that every refusal it counts is one the workers provoked.
HIDING_FAULTS = (
    FaultKind.DROP_BEFORE,
    FaultKind.DROP_AFTER,
    FaultKind.ERROR_BEFORE,
    FaultKind.ERROR_AFTER,
    FaultKind.SLOW,
)


def spec(run_key: str = "shared", rows: int = 4) -> RunSpec:
    return RunSpec(run_key, "uncash", "uncash:test", "job.csv", "digest", ("team",), rows)


def job_rows(cards: list[str], per_card: int, first: int = 2) -> list[JobRow]:
    rows = []
    for n in range(len(cards) * per_card):
        amount = Decimal("10.00") + Decimal(n) / 100
        card = cards[n % len(cards)]
        rows.append(JobRow(first + n, card, amount, f"R{n}", (("team", "ops"),)))
    return rows


# -- the ledger itself ------------------------------------------------------------------------


def test_migrations_apply_once_and_reopen(pg_url: str) -> None:
    first = open_ledger(pg_url)
    assert isinstance(first, PostgresLedger)
    assert first.shared
    first.close()
    again = open_ledger(pg_url)  # the second open finds every migration applied
    try:
        assert again.find_run("nothing") is None
    finally:
        again.close()


def test_a_bad_url_is_one_clear_error() -> None:
    with pytest.raises(LedgerError, match=r"cannot connect") as caught:
        PostgresLedger.open("postgresql://topup:hunter2@127.0.0.1:1/none")
    assert "hunter2" not in str(caught.value)
    assert redact("postgresql://u:secret@h:5/db") == "postgresql://u:***@h:5/db"


async def test_rows_money_and_times_round_trip_exactly(pg_url: str) -> None:
    ledger = PostgresLedger.open(pg_url)
    try:
        rows = job_rows(["card-a", "card-b"], 2)
        ledger.create_run(spec(), rows)
        ledger.create_run(spec(), rows)  # a second worker recording the same run: no-op
        intent = Ledger.intent("shared", 2, 1, "card-a", Decimal("10.00"), None, utcnow())
        await ledger.write(intent)
        ledger.post(
            [
                Ledger.attempt_outcome("shared", 2, 1, "applied", "", utcnow()),
                Ledger.row_update(
                    "shared",
                    2,
                    status=RowStatus.SUCCEEDED,
                    fee=Decimal("0.75"),
                    total_charged=Decimal("10.75"),
                    card_balance_after=Decimal("110.10"),
                    finished_at=utcnow(),
                ),
            ]
        )
        await ledger.flush()
        records = list(ledger.records("shared"))
        totals = ledger.totals("shared")
        counts = ledger.status_counts("shared")
    finally:
        ledger.close()
    assert [r.row for r in records] == [2, 3, 4, 5]
    first = records[0]
    assert first.status is RowStatus.SUCCEEDED
    assert (first.amount, first.fee, first.total_charged) == (
        Decimal("10.00"),
        Decimal("0.75"),
        Decimal("10.75"),
    )
    assert str(first.card_balance_after) == "110.10"
    assert first.extra == (("team", "ops"),)
    assert first.started_at is not None
    assert first.attempts == 1
    assert totals[RowStatus.SUCCEEDED].fee == Decimal("0.75")
    assert counts[RowStatus.NOT_ATTEMPTED] == 3


def test_cards_are_claimed_by_one_worker_at_a_time(pg_url: str) -> None:
    ledger = PostgresLedger.open(pg_url)
    try:
        cards = [f"card-{n}" for n in range(6)]
        rows = job_rows(cards, 1) + job_rows(["heavy"], 3, first=100)
        ledger.create_run(spec(rows=len(rows)), rows)
        first = ledger.claim_cards("shared", "w1", 3, 30.0)
        second = ledger.claim_cards("shared", "w2", 10, 30.0)
        third = ledger.claim_cards("shared", "w3", 10, 30.0)
        assert first[0] == "heavy"  # the busiest card first
        assert len(first) == 3
        assert len(second) == 4
        assert third == []
        assert not set(first) & set(second)
        assert ledger.renew("shared", "w1", 30.0) == set(first)
        left = ledger.cards_left("shared", "w3")
        assert (left.free, left.held_by_others) == (0, 7)
        # w2 stops cleanly: its cards are free again at once.
        ledger.release_cards("shared", "w2")
        assert sorted(ledger.claim_cards("shared", "w3", 10, 30.0)) == sorted(second)
    finally:
        ledger.close()


async def test_an_expired_lease_lets_another_worker_take_the_card(pg_url: str) -> None:
    ledger = PostgresLedger.open(pg_url)
    try:
        rows = job_rows(["card-a"], 2)
        ledger.create_run(spec(rows=2), rows)
        assert ledger.claim_cards("shared", "dead", 5, 0.2) == ["card-a"]
        sent = utcnow()
        await ledger.write(Ledger.intent("shared", 2, 1, "card-a", Decimal("10.00"), None, sent))
        assert ledger.claim_cards("shared", "alive", 5, 30.0) == []
        await anyio.sleep(0.3)
        assert ledger.claim_cards("shared", "alive", 5, 30.0) == ["card-a"]
        assert ledger.renew("shared", "dead", 30.0) == set()  # the dead worker knows it lost
        work = ledger.card_work("shared", ["card-a"])
        await ledger.write([PostgresLedger.card_done("shared", "card-a", "alive")])
        done_left = ledger.cards_left("shared", "alive")
    finally:
        ledger.close()
    # The open attempt comes with the card, to be reconciled before anything is resent.
    assert [(a.row, a.attempt) for a in work.open_attempts] == [(2, 1)]
    assert work.rows == {2: 1, 3: 0}
    assert abs((work.last_sent["card-a"] - sent).total_seconds()) < 0.01
    assert (done_left.free, done_left.held_by_others) == (0, 0)


def test_rate_slots_never_overlap_between_workers(pg_url: str) -> None:
    ledger = PostgresLedger.open(pg_url)
    try:
        blocks = [ledger.reserve_slots("paced", 5, 0.1) for _ in range(4)]
        ledger.pause_slots("paced", 5.0)
        after_pause, now = ledger.reserve_slots("paced", 1, 0.1)
    finally:
        ledger.close()
    starts = [first for first, _ in blocks]
    for earlier, later in itertools.pairwise(starts):
        assert later - earlier == pytest.approx(0.5, abs=1e-6)  # back to back, never overlapping
    assert after_pause >= now + 4.9


def test_webhook_events_settle_pending_rows_once(pg_url: str) -> None:
    ledger = PostgresLedger.open(pg_url)
    try:
        ledger.create_run(spec(rows=1), job_rows(["card-a"], 1))
        ledger._query(
            "UPDATE rows SET status = 'pending', provider_ref = 'ref-1' WHERE row = 2 RETURNING row"
        )
        event = ProviderEvent(
            "uncash", "card-a", Decimal("10.00"), "ref-1", RowStatus.SUCCEEDED, Decimal("0.5")
        )
        first = ledger.apply_event(event)
        again = ledger.apply_event(event)
        (record,) = ledger.records("shared")
    finally:
        ledger.close()
    assert first == (1, False)
    assert again == (0, True)
    assert record.status is RowStatus.SUCCEEDED
    assert record.fee == Decimal("0.5")


# -- workers against the sandbox ----------------------------------------------------------------


def worker_args(sb: RunningSandbox, tmp: Path, url: str, name: str, *more: str) -> list[str]:
    return [
        "--provider", "uncash", "--base-url", sb.base_url, "--ledger", url,
        "--output", str(tmp / f"{name}.csv"), "--log-format", "json", "--run-key", "shared",
        *more,
    ]  # fmt: skip


async def start_worker(
    job: Path, sb: RunningSandbox, tmp: Path, url: str, name: str, *more: str
) -> anyio.abc.Process:
    with (tmp / f"{name}.log").open("ab") as log:
        return await anyio.open_process(
            command("run", str(job), *worker_args(sb, tmp, url, name, *more)),
            cwd=tmp,
            env=clean_env(UNCASH_API_TOKEN=TOKEN),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )


def cooldown_gaps(sb: RunningSandbox) -> list[float]:
    """Seconds between consecutive applied topups of each card, as the sandbox saw them."""
    by_card: dict[str, list[float]] = defaultdict(list)
    for topup in sb.state.applied:
        by_card[topup.card_id].append(topup.at)
    return [b - a for ats in by_card.values() for a, b in itertools.pairwise(ats)]


async def sigkill_when(
    victim: anyio.abc.Process, progress: Callable[[], bool], limit: float
) -> None:
    """SIGKILL `victim` mid-run: once `progress` holds, and while it is still running."""
    await until(lambda: progress() or victim.returncode is not None, limit)
    assert victim.returncode is None, "the victim finished before it could be killed"
    victim.send_signal(signal.SIGKILL)
    assert await victim.wait() == -signal.SIGKILL


@pytest.mark.slow
async def test_three_workers_one_killed_every_row_paid_once(pg_url: str, tmp_path: Path) -> None:
    """Three workers, faults, one SIGKILLed mid-run: the other two take over its cards once
    its leases expire, reconcile what it left open, and finish the run. Judged by the
    sandbox: nothing paid twice or falsely reported, no cooldown or rate refusal."""
    job, amounts = unique_amount_job(tmp_path, rows=400, cards=150, seed=21)
    cooldown, rate = 0.3, 80.0
    config = SandboxConfig(
        token=TOKEN,
        cooldown=cooldown,
        rate_limit=rate,
        fault_rate=0.1,
        fault_kinds=HIDING_FAULTS,
        slow_seconds=1.0,
        seed=8,
    )
    more = ("--cooldown", str(cooldown), "--rate-limit", str(rate), "--concurrency", "8",
            "--timeout", "0.5", "--max-attempts", "10", "--lease", "1.5")  # fmt: skip
    async with serve_sandbox(config) as sb:
        for card in set(amounts.values()):  # listed, so that preflight reads them at once
            sb.state.put_card(SandboxCard(card))
        workers = [await start_worker(job, sb, tmp_path, pg_url, f"w{n}", *more) for n in range(3)]
        victim = workers[1]
        await sigkill_when(victim, lambda: len(sb.state.applied) >= 100, 60)
        killed_at = len(sb.state.applied)
        with anyio.fail_after(90):
            codes = [await workers[0].wait(), await workers[2].wait()]
        status = await run_cli("status", "--ledger", pg_url, cwd=tmp_path)
        rewritten = await run_cli(
            "report", "--ledger", pg_url, "--run-key", "shared",
            "--output", str(tmp_path / "rewritten.csv"), cwd=tmp_path,
        )  # fmt: skip
        refusals = dict(sb.state.refusals)
        arrivals = len(sb.state.topup_arrivals)
        gaps = cooldown_gaps(sb)
        faults = sum(sb.state.faults_injected.values())
        reports = [read_csv_report(tmp_path / f"w{n}.csv") for n in (0, 2)]
        judge(sb, reports[1], amounts)
        paid = Counter(a.amount for a in sb.state.applied)
    assert 0 < killed_at < 400
    assert faults > 15
    assert codes[0] in (0, 1)
    assert codes[1] in (0, 1)
    assert refusals.get(Refusal.COOLDOWN, 0) == 0, refusals
    # The limit is shared: three unshared workers at the full rate would see about two
    # requests in three refused. Not none at all: three workers, the sandbox, PostgreSQL and
    # another test on two cores, with a SIGKILL, can starve the sandbox's event loop, which
    # then takes two requests sent 12.5 ms apart at one instant. A 429 is safe (nothing moves,
    # every worker pauses). test_workers_share_the_rate_limit asserts none, at a rate that
    # leaves the sandbox room.
    assert refusals.get(Refusal.RATE_LIMITED, 0) <= arrivals // 100, (refusals, arrivals)
    assert min(gaps) >= cooldown
    report = reports[1]
    assert len(report) == 400
    assert {r["status"] for r in report} <= {"succeeded", "failed", "needs_review"}
    assert sum(r["status"] == "needs_review" for r in report) <= 4
    assert sum(paid.values()) == sum(r["status"] == "succeeded" for r in report)
    # The report is the same whichever worker writes it, or `report` from the ledger.
    assert reports[0] == reports[1]
    assert rewritten.code == 0, rewritten.stderr
    assert read_csv_report(tmp_path / "rewritten.csv") == report
    assert status.code == 0
    assert "shared" in status.stdout
    assert "uncash" in status.stdout


async def test_workers_share_the_rate_limit(pg_url: str, tmp_path: Path) -> None:
    """Three workers given the provider's rate together send no faster than it: the run
    takes at least (N-1)/R and the sandbox refuses nothing."""
    rows, rate = 120, 40.0
    cards = [str(uuid.uuid4()) for _ in range(rows)]
    job = write_job(tmp_path / "job.csv", [(c, "10.00", f"R{n}") for n, c in enumerate(cards)])
    config = SandboxConfig(token=TOKEN, cooldown=0.1, rate_limit=rate, rate_burst=2)
    more = ("--cooldown", "0.1", "--rate-limit", str(rate), "--concurrency", "4")
    async with serve_sandbox(config) as sb:
        for card in cards:  # listed, so that preflight reads them in one request
            sb.state.put_card(SandboxCard(card))
        workers = [await start_worker(job, sb, tmp_path, pg_url, f"w{n}", *more) for n in range(3)]
        with anyio.fail_after(60):
            codes = [await w.wait() for w in workers]
        ats = sorted(a.at for a in sb.state.applied)
        refusals = dict(sb.state.refusals)
    assert codes == [0, 0, 0]
    assert len(ats) == rows
    assert refusals.get(Refusal.RATE_LIMITED, 0) == 0, refusals
    assert ats[-1] - ats[0] >= (rows - 1) / rate * 0.97
    sent = [int(line.split('"sent": ')[1].split(",")[0]) for line in _summaries(tmp_path)]
    assert sum(sent) == rows
    assert all(n > 0 for n in sent)


def _summaries(tmp: Path) -> list[str]:
    return [
        line
        for n in range(3)
        for line in (tmp / f"w{n}.log").read_text().splitlines()
        if '"event": "run.summary"' in line
    ]


async def test_the_built_in_sandbox_cannot_be_shared(pg_url: str, tmp_path: Path) -> None:
    job = write_job(tmp_path / "job.csv", [(str(uuid.uuid4()), "10.00", "A")])
    done = await run_cli("run", str(job), "--ledger", pg_url, "--no-progress", cwd=tmp_path)
    assert done.code == 2
    assert "shared ledger" in done.stderr
    assert "Traceback" not in done.stderr


async def test_a_worker_stopped_by_sigterm_hands_its_cards_over_at_once(
    pg_url: str, tmp_path: Path
) -> None:
    """SIGTERM: the worker stops cleanly and gives its cards back, so the other finishes them
    without waiting out the (long) lease; every row is paid once."""
    job, amounts = unique_amount_job(tmp_path, rows=120, cards=30, seed=5)
    config = SandboxConfig(token=TOKEN, cooldown=0.2)
    more = ("--cooldown", "0.2", "--rate-limit", "200", "--concurrency", "4", "--lease", "60")
    async with serve_sandbox(config) as sb:
        for card in set(amounts.values()):
            sb.state.put_card(SandboxCard(card))
        stopped, other = [
            await start_worker(job, sb, tmp_path, pg_url, f"w{n}", *more) for n in range(2)
        ]
        # Once the worker to stop is dispatching (its signal handlers are in place by then).
        log = tmp_path / "w0.log"
        await until(lambda: "preflight.ok" in log.read_text())
        seen = len(sb.state.applied)
        await until(lambda: len(sb.state.applied) >= seen + 20)
        stopped.send_signal(signal.SIGTERM)
        with anyio.fail_after(30):
            codes = [await stopped.wait(), await other.wait()]
        report = read_csv_report(tmp_path / "w1.csv")
        judge(sb, report, amounts)
        paid = len(sb.state.applied)
    assert codes == [1, 0]
    assert paid == 120
    assert {r["status"] for r in report} == {"succeeded"}


async def test_a_worker_that_cannot_prove_its_leases_sends_nothing(pg_url: str) -> None:
    """A whole lease without a renewal, or a card taken by another worker after its lease ran
    out: `hold()` raises LeaseLost, and the worker stops before sending."""
    now = [0.0]
    ledger = PostgresLedger.open(pg_url)
    try:
        ledger.create_run(spec(rows=2), job_rows(["card-a", "card-b"], 1))
        silent = SharedRun(ledger, "shared", lease=2.0, clock=lambda: now[0], owner="silent")
        assert await silent.claim(1) == ["card-a"]
        await silent.hold()  # just claimed: fine
        now[0] = 2.1  # a whole lease without a renewal
        with pytest.raises(LeaseLost, match="no lease renewal for 2 s"):
            await silent.hold()

        robbed = SharedRun(ledger, "shared", lease=0.2, clock=lambda: now[0], owner="robbed")
        assert await robbed.claim(1) == ["card-b"]
        await anyio.sleep(0.3)  # its lease runs out in the database...
        assert ledger.claim_cards("shared", "thief", 5, 30.0) == ["card-b"]
        with anyio.fail_after(5):
            await robbed.keep_leases()  # ...and the next renewal finds the card gone
        with pytest.raises(LeaseLost, match="lost the lease"):
            await robbed.hold()
    finally:
        ledger.close()


async def test_a_late_renewal_is_waited_for_not_taken_for_a_lost_lease(pg_url: str) -> None:
    """Past lease/2 without a renewal (a process not scheduled for a moment), `hold()` sends
    nothing until the next renewal proves the cards still ours."""
    now = [0.0]
    ledger = PostgresLedger.open(pg_url)
    try:
        ledger.create_run(spec(rows=1), job_rows(["card-a"], 1))
        late = SharedRun(ledger, "shared", lease=2.0, clock=lambda: now[0], owner="late")
        assert await late.claim(1) == ["card-a"]
        now[0] = 1.1  # more than lease/2 without a renewal
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(late.keep_leases)
                await late.hold()  # returns at the next renewal, not before
                tg.cancel_scope.cancel()
        assert late._renewed_at == 1.1
        assert late.lost is None
    finally:
        ledger.close()


class _HeldBack(PostgresLedger):
    """A ledger whose flushes, once committed, return only when the test lets them."""

    committed: anyio.Event
    go_on: anyio.Event

    async def flush(self) -> None:
        await super().flush()
        self.committed.set()
        await self.go_on.wait()


async def test_a_card_marked_done_while_its_lease_is_renewed_is_not_lost(pg_url: str) -> None:
    """A renewal that runs after a card's done flag is committed, but before the worker hears
    back from that commit, misses the card (done cards are nobody's): not a lost lease."""
    ledger = _HeldBack.open(pg_url)
    assert isinstance(ledger, _HeldBack)
    ledger.committed, ledger.go_on = anyio.Event(), anyio.Event()
    try:
        ledger.create_run(spec(rows=2), job_rows(["card-a", "card-b"], 1))
        run = SharedRun(ledger, "shared", lease=0.4, clock=anyio.current_time, owner="w")
        assert sorted(await run.claim(2)) == ["card-a", "card-b"]
        run.finished("card-a")
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(run.commit_finished)
                await ledger.committed.wait()
                done_at = anyio.current_time()
                tg.start_soon(run.keep_leases)
                # A renewal asked after the done flag was committed, or the loss it reported.
                await until(lambda: run.lost is not None or run._renewed_at > done_at, 5)
                lost = run.lost
                ledger.go_on.set()
                await until(lambda: "card-a" not in run.held, 5)
                tg.cancel_scope.cancel()
        assert lost is None, lost
        await run.hold()  # still sending on card-b
        assert run.held == {"card-b"}
    finally:
        ledger.close()
