"""The ledger's typed writes (record_intent, post_outcome, post_row, post_close,
post_card_done) on both backends: what they store, and that it is what the statements the
engine built before stored."""

from __future__ import annotations

import enum
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from runner.domain import JobRow, RowRecord, RowStatus
from runner.errors import LedgerError
from runner.ledger import Ledger, OpenAttempt, RunSpec, SqliteLedger, open_ledger
from runner.ledger.postgres import PostgresLedger
from runner.providers.base import Applied, CardState, CardStatus

pytestmark = pytest.mark.anyio

KEY = "typed"
SENT = datetime(2026, 12, 3, 12, 0, 5, 123000, tzinfo=UTC)
DONE = SENT + timedelta(seconds=2)
ROOT = Path(__file__).resolve().parents[1]


class Outcome(enum.StrEnum):
    """Stands for runner.domain.AttemptOutcome: a closed StrEnum of the stored strings."""

    APPLIED = "applied"
    REFUSED = "refused"


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ledger]:
    """A ledger of each backend holding one run of four rows, cards a to d."""
    if request.param == "sqlite":
        book: Ledger = SqliteLedger.open(tmp_path / "ledger.sqlite")
    else:
        book = PostgresLedger.open(request.getfixturevalue("pg_url"))
    try:
        rows = [JobRow(n, f"card-{'abcd'[n - 1]}", Decimal("10.00")) for n in range(1, 5)]
        book.create_run(RunSpec(KEY, "uncash", "u", "job.csv", "d", (), 4), rows)
        yield book
    finally:
        book.close()


def attempt(row: int, before: CardState | None = None) -> OpenAttempt:
    card = f"card-{'abcd'[row - 1]}"
    return OpenAttempt(row, 1, card, Decimal("10.00"), before, SENT, SENT + timedelta(minutes=5))


def record(ledger: Ledger, row: int) -> RowRecord:
    (found,) = [r for r in ledger.records(KEY) if r.row == row]
    return found


def outcomes(ledger: Ledger) -> dict[int, tuple[str, str]]:
    """row -> (outcome, detail) of its first attempt, as stored (both backends read it)."""
    assert isinstance(ledger, SqliteLedger | PostgresLedger)
    found = ledger._select("SELECT row, outcome, detail FROM attempts WHERE run_key = ?", (KEY,))
    return {row: (outcome, detail) for row, outcome, detail in found}


async def test_record_intent_commits_the_open_attempt_before_returning(ledger: Ledger) -> None:
    """The intent, with the card's state before and settle_by, is an open attempt at once."""
    before = CardState("card-a", CardStatus.ACTIVE, Decimal("5.00"), Decimal("1.50"))
    await ledger.record_intent(KEY, attempt(1, before))
    assert ledger.open_attempts(KEY) == [attempt(1, before)]
    progress = ledger.progress(KEY)[1]
    assert (progress.status, progress.attempts) == (RowStatus.NOT_ATTEMPTED, 1)
    assert record(ledger, 1).card_balance_before == Decimal("5.00")


async def test_posted_writes_wait_for_the_next_commit(ledger: Ledger) -> None:
    """post_* only queue: the row is unchanged until flush, then every write is there."""
    await ledger.record_intent(KEY, attempt(1))
    ledger.post_outcome(KEY, 1, 1, Outcome.REFUSED, "card_frozen: no", DONE)
    ledger.post_row(KEY, 1, RowStatus.FAILED, DONE, error="card_frozen: no")
    assert record(ledger, 1).status is RowStatus.NOT_ATTEMPTED
    await ledger.flush()
    assert (record(ledger, 1).status, record(ledger, 1).error) == (
        RowStatus.FAILED,
        "card_frozen: no",
    )
    assert ledger.open_attempts(KEY) == []


async def test_an_outcome_enum_is_stored_as_its_string(ledger: Ledger) -> None:
    """A StrEnum outcome is stored as its value, the same text as the plain string."""
    await ledger.record_intent(KEY, attempt(1))
    await ledger.record_intent(KEY, attempt(2))
    ledger.post_outcome(KEY, 1, 1, Outcome.APPLIED, "", DONE)
    ledger.post_outcome(KEY, 2, 1, "applied", "", DONE)
    await ledger.flush()
    assert outcomes(ledger) == {1: ("applied", ""), 2: ("applied", "")}


APPLIED = Applied(
    fee=Decimal("0.35"),
    total_charged=Decimal("10.35"),
    card_balance_after=Decimal("15.00"),
    wallet_balance_after=Decimal("989.65"),
    transaction_id="tx-1",
    invoice_id="inv-1",
)


@pytest.mark.parametrize(
    "applied",
    [
        APPLIED,
        replace(APPLIED, card_balance_before=Decimal("4.00"), provider_ref="2026-12-03T12:00Z"),
        replace(APPLIED, fee=None, total_charged=None, transaction_id=None),
    ],
    ids=["plain", "with-before-and-ref", "unknown-fee"],
)
async def test_post_row_stores_what_the_old_row_update_stored(
    ledger: Ledger, applied: Applied
) -> None:
    """An applied topup's row, written typed, reads back as the engine's statements left it
    (the balance the intent recorded kept unless the answer gives one)."""
    before = CardState("card-a", CardStatus.ACTIVE, Decimal("5.00"))
    for row in (1, 2):
        await ledger.record_intent(KEY, replace(attempt(row), before=before))
        ledger.post_row(KEY, row, RowStatus.FAILED, SENT, error="an earlier error")
    ledger.post_row(KEY, 1, RowStatus.SUCCEEDED, DONE, applied=applied)
    fields = {
        "fee": applied.fee,
        "total_charged": applied.total_charged,
        "card_balance_after": applied.card_balance_after,
        "wallet_balance_after": applied.wallet_balance_after,
        "transaction_id": applied.transaction_id,
        "invoice_id": applied.invoice_id,
    }
    if applied.card_balance_before is not None:
        fields["card_balance_before"] = applied.card_balance_before
    if applied.provider_ref is not None:
        fields["provider_ref"] = applied.provider_ref
    old = Ledger.row_update(
        KEY, 2, status=RowStatus.SUCCEEDED, finished_at=DONE, **fields, error=None
    )
    await ledger.write([old])
    typed, built = record(ledger, 1), record(ledger, 2)
    assert replace(typed, row=2, card_id="card-b") == built
    assert typed.error is None
    expected_before = applied.card_balance_before or Decimal("5.00")
    assert typed.card_balance_before == expected_before
    assert ledger.known_refs("card-a") == ({applied.provider_ref} - {None})


async def test_post_close_closes_only_rows_still_untouched(ledger: Ledger) -> None:
    """A row another worker finished meanwhile keeps its status; an untouched one closes."""
    ledger.post_row(KEY, 1, RowStatus.SUCCEEDED, DONE, applied=APPLIED)
    ledger.post_close(KEY, 1, RowStatus.NEEDS_REVIEW, "in doubt", DONE)
    ledger.post_close(KEY, 2, RowStatus.FAILED, "set aside", DONE)
    ledger.post_close(KEY, 3, RowStatus.FAILED, "set aside")
    await ledger.flush()
    assert [(r.status, r.error, r.finished_at) for r in ledger.records(KEY)] == [
        (RowStatus.SUCCEEDED, None, DONE),
        (RowStatus.FAILED, "set aside", DONE),
        (RowStatus.FAILED, "set aside", None),
        (RowStatus.NOT_ATTEMPTED, None, None),
    ]


async def test_a_read_only_ledger_refuses_every_typed_write(ledger: Ledger) -> None:
    """Opened read-only, record_intent and every post_* are refused at once: nothing is
    queued for a commit, nothing reaches the ledger."""
    assert isinstance(ledger, SqliteLedger | PostgresLedger)
    where = ledger.path if isinstance(ledger, SqliteLedger) else ledger.url
    reader = open_ledger(where, readonly=True)
    try:
        with pytest.raises(LedgerError, match="opened read-only"):
            await reader.record_intent(KEY, attempt(1))
        with pytest.raises(LedgerError, match="opened read-only"):
            reader.post_outcome(KEY, 1, 1, Outcome.APPLIED, "", DONE)
        with pytest.raises(LedgerError, match="opened read-only"):
            reader.post_row(KEY, 2, RowStatus.FAILED, DONE, error="x")
        with pytest.raises(LedgerError, match="opened read-only"):
            reader.post_close(KEY, 3, RowStatus.FAILED, "x", DONE)
        await reader.flush()  # nothing queued: no commit to refuse
    finally:
        reader.close()
    assert outcomes(ledger) == {}
    assert {r.status for r in ledger.records(KEY)} == {RowStatus.NOT_ATTEMPTED}


@pytest.mark.postgres
async def test_post_card_done_finishes_the_card_for_every_worker(pg_url: str) -> None:
    """A card marked done is neither free nor held: nobody claims it again."""
    ledger = PostgresLedger.open(pg_url)
    try:
        rows = [JobRow(1, "card-a", Decimal("10.00")), JobRow(2, "card-b", Decimal("10.00"))]
        ledger.create_run(RunSpec(KEY, "uncash", "u", "job.csv", "d", (), 2), rows)
        assert sorted(ledger.claim_cards(KEY, "w1", 5, 30.0)) == ["card-a", "card-b"]
        ledger.post_card_done(KEY, "card-a", "w1")
        await ledger.flush()
        ledger.release_cards(KEY, "w1")
        assert ledger.claim_cards(KEY, "w2", 5, 30.0) == ["card-b"]
    finally:
        ledger.close()


def test_importing_the_ledger_loads_no_driver_pandas_aiohttp_or_provider() -> None:
    """`import runner.ledger` stays light: the CLI's status and the engine's resume need it."""
    code = (
        "import sys, runner.ledger\n"
        "heavy = ('pandas', 'aiohttp', 'psycopg', 'openpyxl', 'runner.providers',"
        " 'runner.run')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or m.startswith(heavy)))"
    )
    found = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert found.stdout.strip() == "[]"
