"""What the engine asks of both ledgers alike (SQLite and PostgreSQL): an attempt's
`settle_by`, and the runs recorded with a job's content digest."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest

from runner.domain import JobRow
from runner.errors import LedgerError
from runner.ledger import Ledger, RunSpec, SqliteLedger
from runner.ledger.postgres import PostgresLedger

pytestmark = pytest.mark.anyio

SENT = datetime(2026, 12, 3, 12, 0, 5, 123000, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Ledger]:
    """An empty ledger of each backend."""
    if request.param == "sqlite":
        # SQLite's created_at is the runner's clock: a new millisecond for every run.
        ticks = itertools.count()
        monkeypatch.setattr(
            "runner.ledger.sqlite.utcnow", lambda: SENT + timedelta(seconds=next(ticks))
        )
        book: Ledger = SqliteLedger.open(tmp_path / "ledger.sqlite")
    else:
        book = PostgresLedger.open(request.getfixturevalue("pg_url"))
    try:
        yield book
    finally:
        book.close()


def record_run(ledger: Ledger, key: str, digest: str = "digest", base_url: str = "u") -> RunSpec:
    spec = RunSpec(key, "uncash", base_url, f"{key}.csv", digest, ("team",), 2)
    rows = [JobRow(1, "card-a", Decimal("10.00")), JobRow(2, "card-b", Decimal("12.50"))]
    ledger.create_run(spec, rows)
    return spec


async def test_settle_by_is_kept_with_the_attempt_and_read_back(ledger: Ledger) -> None:
    """An intent's settle_by comes back, to the millisecond, on the open attempt; an intent
    without one reads back None."""
    record_run(ledger, "run")
    settle_by = SENT + timedelta(minutes=30)
    await ledger.write(
        Ledger.intent("run", 1, 1, "card-a", Decimal("10.00"), None, SENT, settle_by=settle_by)
    )
    await ledger.write(Ledger.intent("run", 2, 1, "card-b", Decimal("12.50"), None, SENT))
    found = await ledger.call(ledger.open_attempts, "run")
    assert [(a.row, a.sent_at, a.settle_by) for a in found] == [
        (1, SENT, settle_by),
        (2, SENT, None),
    ]
    if isinstance(ledger, PostgresLedger):
        work = await ledger.call(ledger.card_work, "run", ["card-a", "card-b"])
        assert {a.row: a.settle_by for a in work.open_attempts} == {1: settle_by, 2: None}


async def test_runs_with_digest_gives_every_run_of_the_content_newest_first(
    ledger: Ledger,
) -> None:
    """Runs of one digest, each whole (base_url as stored, created_at filled), newest first;
    other digests left out."""
    first = record_run(ledger, "b-first", base_url="https://api.example/v1")
    record_run(ledger, "other", digest="another")
    second = record_run(ledger, "a-second", base_url="uncash:test")
    found = await ledger.call(ledger.runs_with_digest, "digest")
    assert found == [second, first]  # created_at is not compared
    assert [r.base_url for r in found] == ["uncash:test", "https://api.example/v1"]
    newest, oldest = (r.created_at for r in found)
    assert newest is not None
    assert oldest is not None
    assert newest > oldest
    assert await ledger.call(ledger.runs_with_digest, "nothing") == []


async def test_find_run_still_equals_the_spec_it_was_recorded_with(ledger: Ledger) -> None:
    """created_at, now read back, does not make a resumed run look like another job."""
    spec = record_run(ledger, "run")
    found = await ledger.call(ledger.find_run, "run")
    assert found == spec
    assert found is not None
    assert found.created_at is not None


@pytest.mark.postgres
def test_a_postgresql_ledger_of_the_first_schema_gains_settle_by(pg_url: str) -> None:
    """A database migrated before settle_by existed gets the column at the next open."""
    first = PostgresLedger.open(pg_url)
    first.close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE attempts DROP COLUMN settle_by")
        conn.execute("DELETE FROM topup_migrations WHERE name = '0002_settle_by.sql'")
    again = PostgresLedger.open(pg_url)
    again.close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        columns = {
            name
            for (name,) in conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'attempts'"
            )
        }
    assert "settle_by" in columns


@pytest.mark.postgres
def test_a_postgresql_connection_lost_while_streaming_records_is_a_ledger_error(
    pg_url: str,
) -> None:
    """records() is a generator: the error comes while iterating, and is a LedgerError."""
    ledger = PostgresLedger.open(pg_url)
    try:
        spec = RunSpec("big", "uncash", "u", "big.csv", "d", (), 12000)
        rows = [JobRow(n, f"card-{n}", Decimal("10.00")) for n in range(1, 12001)]
        ledger.create_run(spec, rows)
        records = ledger.records("big")
        next(records)  # the first of several fetches of 5000
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        with pytest.raises(LedgerError, match="read failed"):
            list(records)
    finally:
        ledger.close()
