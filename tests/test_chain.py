"""The ledger's hash chain: every row and attempt record of a run chained in commit order,
keyed or not, and `check_chain` naming the first record that does not fit."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import pytest

import runner.ledger.statements as build
from runner.domain import JobRow, RowStatus
from runner.errors import ConfigError, LedgerError
from runner.ledger import Ledger, ProviderEvent, RunSpec, SqliteLedger, open_ledger, utcnow
from runner.ledger.chain import KEY_ENV, parse_head, touched

KEY = "chain-test-key-9f8e7d"


def spec(run_key: str = "run-1", rows: int = 3) -> RunSpec:
    return RunSpec(run_key, "uncash", "uncash:test", "job.csv", "digest", (), rows)


def job_rows(count: int = 3) -> list[JobRow]:
    return [JobRow(n, f"card-{n}", Decimal("10.00") + n, f"R{n}", ()) for n in range(1, count + 1)]


async def pay(ledger: Ledger, run_key: str, row: int, attempt: int = 1) -> None:
    """One topup of `row` recorded as a run records it: intent, then outcome and row."""
    now = utcnow()
    amount = Decimal("10.00") + row
    await ledger.write(Ledger.intent(run_key, row, attempt, f"card-{row}", amount, None, now))
    ledger.post(
        [
            Ledger.attempt_outcome(run_key, row, attempt, "applied", "", now),
            Ledger.row_update(
                run_key,
                row,
                status=RowStatus.SUCCEEDED,
                fee=Decimal("0.50"),
                transaction_id=f"tx-{row}-{attempt}",
                finished_at=now,
            ),
        ]
    )
    await ledger.flush()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "ledger.sqlite"


@pytest.fixture
def no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)


def paid_ledger(path: Path, rows: int = 3) -> None:
    ledger = SqliteLedger.open(path)
    try:
        ledger.create_run(spec(rows=rows), job_rows(rows))
        for row in range(1, rows + 1):
            anyio.run(pay, ledger, "run-1", row)
    finally:
        ledger.close()


def problems(path: Path, key: bytes | None = None, run_key: str = "run-1") -> list[str]:
    ledger = open_ledger(path, readonly=True)
    try:
        return ledger.check_chain(run_key, key).problems
    finally:
        ledger.close()


def sql(path: Path, statement: str, *params: object) -> None:
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(statement, params)
    conn.close()


def chain_rows(path: Path) -> list[tuple[int, str, int | None, int | None, str]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(
            "SELECT seq, kind, row, attempt, algo FROM chain ORDER BY seq"
        ).fetchall()
    finally:
        conn.close()


# -- what is chained ---------------------------------------------------------------------------


def test_every_statement_of_a_row_or_attempt_is_seen() -> None:
    """Each statement builder that writes rows or attempts names what it writes; others none."""
    now = utcnow()
    batch = [
        *build.intent("k", 2, 1, "c", Decimal("5.00"), None, now),
        build.attempt_outcome("k", 2, 1, "applied", "", now),
        build.row_finish("k", 3, RowStatus.FAILED, now, "no", None),
        build.row_update("k", 4, status=RowStatus.NEEDS_REVIEW),
        build.close_untouched_row("k", 5, RowStatus.NOT_ATTEMPTED, "stopped", None),
        build.card_done("k", "c", "me"),
    ]
    assert touched(batch) == [
        ("attempt", "k", 2, 1),
        ("row", "k", 2, None),
        ("row", "k", 3, None),
        ("row", "k", 4, None),
        ("row", "k", 5, None),
    ]


def test_a_run_chains_its_start_then_each_attempt_and_row_in_commit_order(
    path: Path, no_key: None
) -> None:
    """The run's start is record 1; each topup adds its attempt and its row, twice (intent,
    then outcome); every record is plain SHA-256 without a key."""
    paid_ledger(path, rows=2)
    records = chain_rows(path)
    assert [r[:4] for r in records] == [
        (1, "run", None, None),
        (2, "attempt", 1, 1),
        (3, "row", 1, None),
        (4, "attempt", 1, 1),
        (5, "row", 1, None),
        (6, "attempt", 2, 1),
        (7, "row", 2, None),
        (8, "attempt", 2, 1),
        (9, "row", 2, None),
    ]
    assert {r[4] for r in records} == {"sha256"}
    assert problems(path) == []


def test_the_head_is_the_last_record(path: Path, no_key: None) -> None:
    """The head the report and status show is the chain's last record."""
    paid_ledger(path, rows=2)
    ledger = open_ledger(path, readonly=True)
    try:
        head = ledger.chain_head("run-1")
        facts = ledger.run_facts("run-1")
    finally:
        ledger.close()
    assert head is not None
    assert facts.chain_head == head
    algo, seq, _ = parse_head(head) or ("", 0, "")
    assert (algo, seq) == ("sha256", 9)


def test_a_settling_webhook_is_chained(path: Path, no_key: None) -> None:
    """A pending row settled by a provider event gets a record like any other write."""
    ledger = SqliteLedger.open(path)
    try:
        ledger.create_run(spec(rows=1), job_rows(1))
        ledger.post([build.row_update("run-1", 1, status=RowStatus.PENDING, provider_ref="ref")])
        anyio.run(ledger.flush)
        event = ProviderEvent("uncash", "card-1", Decimal("11.00"), "ref", RowStatus.SUCCEEDED)
        assert ledger.apply_event(event) == (1, False)
    finally:
        ledger.close()
    assert chain_rows(path)[-1][:3] == (3, "row", 1)
    assert problems(path) == []


# -- keyed chains --------------------------------------------------------------------------------


def test_a_key_makes_the_chain_hmac_and_only_that_key_verifies_it(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With TOPUP_LEDGER_KEY the records say hmac-sha256; the same key verifies, another does
    not (the first record already fails), and none cannot verify at all."""
    monkeypatch.setenv(KEY_ENV, KEY)
    paid_ledger(path)
    assert {r[4] for r in chain_rows(path)} == {"hmac-sha256"}
    assert problems(path, KEY.encode()) == []
    wrong = problems(path, b"another key")
    assert wrong[0].startswith("record #1 (the run's start) does not fit the chain")
    with pytest.raises(ConfigError, match=KEY_ENV):
        problems(path, None)


def test_the_key_is_never_stored(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither the key nor any part of it is in the ledger's files."""
    monkeypatch.setenv(KEY_ENV, KEY)
    paid_ledger(path)
    stored = b"".join(p.read_bytes() for p in path.parent.iterdir() if p.is_file())
    assert KEY.encode() not in stored
    assert KEY[:8].encode() not in stored


@pytest.mark.parametrize(
    ("first", "then", "says"),
    [
        (KEY, "another key", "is not the key"),
        (KEY, None, "is keyed"),
        (None, KEY, "begun without a key"),
    ],
)
def test_a_run_goes_on_only_with_the_key_it_began_with(
    path: Path, monkeypatch: pytest.MonkeyPatch, first: str | None, then: str | None, says: str
) -> None:
    """Resuming a run with another key, none, or one where it had none is refused before
    anything is written: its chain would not be one chain."""
    if first is not None:
        monkeypatch.setenv(KEY_ENV, first)
    ledger = SqliteLedger.open(path)
    ledger.create_run(spec(), job_rows())
    anyio.run(pay, ledger, "run-1", 1)
    ledger.close()
    monkeypatch.delenv(KEY_ENV, raising=False)
    if then is not None:
        monkeypatch.setenv(KEY_ENV, then)
    ledger = SqliteLedger.open(path)
    try:
        with pytest.raises(LedgerError, match=says):
            anyio.run(pay, ledger, "run-1", 2)
    finally:
        ledger.close()
    assert len(chain_rows(path)) == 5  # nothing of row 2


# -- tampering -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("statement", "names"),
    [
        ("UPDATE rows SET amount = '99.00' WHERE row = 2", "row 2 differs from its record #9"),
        ("UPDATE rows SET status = 'failed' WHERE row = 3", "row 3 differs from its record #13"),
        ("UPDATE rows SET fee = '0.05' WHERE row = 1", "row 1 differs from its record #5"),
        ("UPDATE attempts SET outcome = 'refused' WHERE row = 2", "row 2, attempt 1 differs"),
        ("DELETE FROM attempts WHERE row = 3", "row 3, attempt 1 has a record but is not"),
        (
            "INSERT INTO attempts (run_key, row, attempt, card_id, amount, sent_at) "
            "VALUES ('run-1', 1, 2, 'card-1', '11.00', '2026-01-01T00:00:00.000+00:00')",
            "row 1, attempt 2 has no record",
        ),
        ("UPDATE chain SET body = replace(body, '12.00', '92.00') WHERE seq = 6",
         "record #6 (row 2, attempt 1) does not fit"),
        ("DELETE FROM chain WHERE seq = 4", "record #5 (row 1) does not fit"),
        ("DELETE FROM chain WHERE seq = 13", "the chain's head says record #13"),
        ("UPDATE rows SET amount = 'abc' WHERE row = 2", "row 2 differs from its record #9"),
        ("UPDATE chain SET seq = 'x' WHERE seq = 3", "hold what the runner never writes"),
        ("UPDATE chain_heads SET seq = 'x'", "hold what the runner never writes"),
    ],
)  # fmt: skip
def test_a_change_made_outside_the_runner_names_the_first_record_that_does_not_fit(
    path: Path, no_key: None, statement: str, names: str
) -> None:
    """One change by SQL: the first problem names the row, attempt or record it broke."""
    paid_ledger(path)
    assert problems(path) == []
    sql(path, statement)
    found = problems(path)
    assert found, statement
    assert names in found[0], found


def test_a_row_never_touched_since_the_run_began_is_covered_by_its_start(
    path: Path, no_key: None
) -> None:
    """An amount changed on a row not yet attempted: the run's first record no longer fits."""
    ledger = SqliteLedger.open(path)
    ledger.create_run(spec(), job_rows())
    ledger.close()
    sql(path, "UPDATE rows SET amount = '50.00' WHERE row = 2")
    assert "differ from record #1 (the run's start)" in problems(path)[0]
    sql(path, "UPDATE rows SET amount = '12.00', status = 'succeeded' WHERE row = 2")
    assert "row 2 has no record since the run began but holds status succeeded" in problems(path)[0]


# -- runs from before the chain ----------------------------------------------------------------


@pytest.fixture
def old_ledger(path: Path, no_key: None) -> Path:
    """A ledger at schema 2 with one run, upgraded to this version on the next open."""
    paid_ledger(path, rows=2)
    conn = sqlite3.connect(path)
    with conn:
        # Everything schema 3 and later made: a ledger as version 2 left it.
        for table in ("chain", "chain_heads", "approvals", "learned_rates"):
            conn.execute(f"DROP TABLE {table}")
        conn.execute("DROP INDEX rows_by_card")
        conn.execute("PRAGMA user_version = 2")
    conn.close()
    return path


def test_a_run_from_before_the_chain_is_unchained_not_broken(old_ledger: Path) -> None:
    """Read as it is, then after the upgrade and more writes: unchained, no problem claimed,
    and no chain begun halfway through it."""
    readonly = open_ledger(old_ledger, readonly=True)
    try:
        before = readonly.check_chain("run-1", None)
    finally:
        readonly.close()
    assert (before.chained, before.problems) == (False, [])
    ledger = SqliteLedger.open(old_ledger)
    try:
        anyio.run(pay, ledger, "run-1", 1, 2)
        after = ledger.check_chain("run-1", None)
        ledger.create_run(spec("run-2", 1), job_rows(1))
        new = ledger.check_chain("run-2", None)
    finally:
        ledger.close()
    assert (after.chained, after.problems, chain_rows(old_ledger)[0][0]) == (False, [], 1)
    assert (new.chained, new.problems) == (True, [])


# -- several workers on PostgreSQL ---------------------------------------------------------------


@pytest.mark.anyio
async def test_two_workers_on_postgresql_extend_one_chain_in_commit_order(
    pg_url: str, no_key: None
) -> None:
    """Two connections writing one run at once: one chain, every record in place."""
    first, second = open_ledger(pg_url), open_ledger(pg_url)
    try:
        rows = job_rows(40)
        first.create_run(spec(rows=40), rows)
        second.create_run(spec(rows=40), rows)  # the second worker finds it recorded

        async def worker(ledger: Ledger, parity: int) -> None:
            for row in range(1 + parity, 41, 2):
                await pay(ledger, "run-1", row)

        async with anyio.create_task_group() as group:
            group.start_soon(worker, first, 0)
            group.start_soon(worker, second, 1)
        verdict = first.check_chain("run-1", None)
    finally:
        first.close()
        second.close()
    assert verdict.problems == []
    assert verdict.records == 1 + 40 * 4


def test_a_commit_made_while_the_chain_is_read_is_seen_whole_or_not_at_all(
    path: Path, no_key: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run paying a row while verify reads: the chain, rows and attempts are read from one
    snapshot, so the new records and the new row state are both missing, not half there."""
    ledger = SqliteLedger.open(path)
    ledger.create_run(spec(), job_rows())
    anyio.run(pay, ledger, "run-1", 1)
    ledger.close()
    assert problems(path) == []
    reader, writer = SqliteLedger.open(path, readonly=True), SqliteLedger.open(path)
    read = reader._listed
    calls: list[str] = []

    def listed(query: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        found = read(query, params)
        calls.append(query)
        if len(calls) == 2:  # the chain is read: now another process pays row 2
            anyio.run(pay, writer, "run-1", 2)
        return found

    monkeypatch.setattr(reader, "_listed", listed)
    try:
        verdict = reader.check_chain("run-1", None)
    finally:
        reader.close()
        writer.close()
    assert "FROM chain WHERE" in calls[1]
    assert (verdict.records, verdict.problems) == (5, [])
    assert problems(path) == []


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("statement", "names"),
    [
        ("UPDATE rows SET amount = 99 WHERE row = 2", "row 2 differs from its record #9"),
        ("UPDATE rows SET status = 'failed' WHERE row = 1", "row 1 differs from its record #5"),
    ],
)
async def test_a_change_by_sql_on_postgresql_is_named(
    pg_url: str, no_key: None, statement: str, names: str
) -> None:
    """The shared ledger as the SQLite one: one amount or status changed by SQL is named."""
    ledger = open_ledger(pg_url)
    try:
        ledger.create_run(spec(), job_rows())
        for row in (1, 2):
            await pay(ledger, "run-1", row)
        clean = ledger.check_chain("run-1", None).problems
    finally:
        ledger.close()
    psycopg = pytest.importorskip("psycopg")
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(statement)
    reader = open_ledger(pg_url, readonly=True)
    try:
        found = reader.check_chain("run-1", None).problems
    finally:
        reader.close()
    assert clean == []
    assert names in found[0], found
