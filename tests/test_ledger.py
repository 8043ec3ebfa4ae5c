"""The ledger's group commit: what `write` promises, what `post` defers, what a failure does."""

from __future__ import annotations

import sqlite3
from decimal import Decimal
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from runner.domain import JobRow, RowStatus
from runner.errors import LedgerError
from runner.ledger import RunSpec, utcnow
from runner.ledger import SqliteLedger as Ledger

KEY = "ledger-test"


def open_run(path: Path, rows: int) -> Ledger:
    ledger = Ledger.open(path)
    job = [JobRow(n, f"card-{n}", Decimal("10.00")) for n in range(1, rows + 1)]
    ledger.create_run(RunSpec(KEY, "sandbox", "x", "job.csv", "d", (), rows), job)
    return ledger


def attempts_on_disk(path: Path) -> set[int]:
    """Rows with an attempt, as another connection (another process) sees the file."""
    conn = sqlite3.connect(path)
    try:
        return {row for (row,) in conn.execute("SELECT row FROM attempts")}
    finally:
        conn.close()


@pytest.mark.anyio
async def test_every_concurrent_write_is_on_disk_when_it_returns(tmp_path: Path) -> None:
    """A write returns only once its statements are committed, however many share a commit."""
    path = tmp_path / "ledger.sqlite"
    ledger = open_run(path, 200)
    missing: list[int] = []

    async def writer(row: int) -> None:
        for _ in range(row % 3):
            await anyio.lowlevel.checkpoint()
        await ledger.write(
            Ledger.intent(KEY, row, 1, f"card-{row}", Decimal("10.00"), None, utcnow())
        )
        if row not in attempts_on_disk(path):
            missing.append(row)

    try:
        async with anyio.create_task_group() as tg:
            for row in range(1, 201):
                tg.start_soon(writer, row)
    finally:
        ledger.close()
    assert missing == []


@pytest.mark.anyio
async def test_posted_statements_go_with_the_next_write_and_are_read_back(tmp_path: Path) -> None:
    """A post is not committed by itself; the next write carries it, and reads see it."""
    path = tmp_path / "ledger.sqlite"
    ledger = open_run(path, 2)
    try:
        ledger.post([Ledger.row_update(KEY, 1, status=RowStatus.FAILED, error="x")])
        assert (await ledger.call(ledger.status_counts, KEY))[RowStatus.FAILED] == 1
        ledger.post([Ledger.row_update(KEY, 2, status=RowStatus.FAILED, error="y")])
        await ledger.write(Ledger.intent(KEY, 1, 1, "card-1", Decimal("10.00"), None, utcnow()))
        conn = sqlite3.connect(path)
        failed = conn.execute("SELECT COUNT(*) FROM rows WHERE status = 'failed'").fetchone()[0]
        conn.close()
        assert failed == 2
    finally:
        ledger.close()


@pytest.mark.anyio
async def test_a_failed_commit_never_lets_a_writer_return_as_if_durable(tmp_path: Path) -> None:
    """A writer returns with its statements on disk or raises; after a failure, all raise."""
    path = tmp_path / "ledger.sqlite"
    ledger = open_run(path, 50)
    returned: list[int] = []
    failed: list[int] = []

    async def writer(row: int) -> None:
        # Row 20 repeats attempt 1 of row 1: the primary key refuses the commit carrying it.
        target = 1 if row == 20 else row
        intent = Ledger.intent(KEY, target, 1, "c", Decimal("10.00"), None, utcnow())
        try:
            await ledger.write(intent)
        except LedgerError:
            failed.append(row)
        else:
            returned.append(row)

    try:
        await ledger.write(Ledger.intent(KEY, 1, 1, "c", Decimal("10.00"), None, utcnow()))
        async with anyio.create_task_group() as tg:
            for row in range(2, 40):
                tg.start_soon(writer, row)
        with pytest.raises(LedgerError):
            await ledger.write([Ledger.row_update(KEY, 45, error="later")])
        with pytest.raises(LedgerError):
            ledger.post([Ledger.row_update(KEY, 46, error="later")])
    finally:
        ledger.close()
    assert 20 in failed
    assert set(returned) <= attempts_on_disk(path)
    assert not set(failed) & attempts_on_disk(path)
    assert sorted(returned + failed) == list(range(2, 40))


@pytest.mark.anyio
async def test_a_writer_cancelled_while_waiting_does_not_strand_the_others(
    tmp_path: Path,
) -> None:
    """Cancelling the caller due to make the next commit leaves another one to make it."""
    path = tmp_path / "ledger.sqlite"
    ledger = open_run(path, 40)
    done: list[int] = []

    async def writer(row: int) -> None:
        await ledger.write(
            Ledger.intent(KEY, row, 1, f"card-{row}", Decimal("10.00"), None, utcnow())
        )
        done.append(row)

    try:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(writer, 1)  # starts a commit
                await anyio.lowlevel.checkpoint()
                async with anyio.create_task_group() as doomed:
                    doomed.start_soon(writer, 2)  # first to need the next commit
                    await anyio.lowlevel.checkpoint()
                    assert ledger._next is not None  # it is due to make the next commit
                    doomed.cancel_scope.cancel()
                for row in range(3, 41):
                    tg.start_soon(writer, row)
    finally:
        ledger.close()
    assert sorted(done) == [1, *range(3, 41)]
    assert attempts_on_disk(path) >= {1, *range(3, 41)}


# -- read-only opens -----------------------------------------------------------------------


def test_a_read_only_reader_sees_what_a_run_commits_meanwhile(tmp_path: Path) -> None:
    """A reader open while a run writes (status during a run) reads each commit, -wal
    included: it is a reader like any other, not a snapshot of the file."""
    path = tmp_path / "ledger.sqlite"
    writer = open_run(path, 3)
    try:
        reader = Ledger.open(path, readonly=True)
        try:
            assert [r.error for r in reader.records(KEY)] == [None, None, None]
            anyio.run(writer.write, [Ledger.row_update(KEY, 2, error="late")])
            assert [r.error for r in reader.records(KEY)] == [None, "late", None]
            anyio.run(writer.write, [Ledger.row_update(KEY, 3, status="failed")])
            assert reader.status_counts(KEY)[RowStatus.FAILED] == 1
        finally:
            reader.close()
    finally:
        writer.close()


def test_a_read_only_postgres_ledger_reads_and_refuses_writes(pg_url: str) -> None:
    """On PostgreSQL: no migration, a database without a ledger refused, every write refused
    by the server (a read-only session), no run lock."""
    from runner.ledger import open_ledger

    with pytest.raises(LedgerError, match="no topup-runner ledger"):
        open_ledger(pg_url, readonly=True)
    with pytest.raises(LedgerError, match="no topup-runner ledger"):
        open_ledger(pg_url, readonly=True)  # the first made no tables either
    writer = open_ledger(pg_url)
    try:
        job = [JobRow(n, f"card-{n}", Decimal("10.00")) for n in (1, 2)]
        writer.create_run(RunSpec(KEY, "sandbox", "x", "job.csv", "d", (), 2), job)
    finally:
        writer.close()
    reader = open_ledger(pg_url, readonly=True)
    try:
        assert [r.run_key for r in reader.overview()] == [KEY]
        assert [r.row for r in reader.records(KEY)] == [1, 2]
        with pytest.raises(LedgerError, match="read-only"):
            reader.finish_run(KEY)
        with pytest.raises(LedgerError, match="read-only"):
            reader.lock(KEY)
        with pytest.raises(LedgerError, match="read-only"):
            reader.post([Ledger.row_update(KEY, 1, error="x")])
    finally:
        reader.close()
