"""Rows above the provider's maximum paid in chunks (`--split-over-max`), each exactly once.

The chunking is a property (fewest chunks, each within the bounds, sum exact); the report's
joining of chunks into job rows is checked on records; the end-to-end test runs the real
command under faults and a SIGKILL, judged by the sandbox's own record.
"""

from __future__ import annotations

import random
import signal
import subprocess
import uuid
from collections import defaultdict
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import anyio
import anyio.abc
import openpyxl
import pytest
from hypothesis import given
from hypothesis import strategies as st

from runner.domain import JobRow, RowRecord, RowStatus, RunInfo
from runner.errors import JobInvalid, LedgerError
from runner.jobs import load_job
from runner.jobs.split import (
    MAX_CHUNKS,
    SPLIT_KEY,
    card_limit_problems,
    chunk_of,
    split_amount,
    split_job,
    without_split,
)
from runner.ledger import RunSpec
from runner.providers.base import CardState, CardStatus
from runner.providers.uncash import RULES as UNCASH_RULES
from runner.report import Figures
from runner.report.chunks import job_rows, row_status, write_run_report
from runner.run.record import RunRecord
from runner.run.resume import same_run_or_refuse
from runner.sandbox.config import SandboxConfig
from runner.sandbox.server import RunningSandbox, serve_sandbox
from tests.e2e import TOKEN, clean_env, command, read_csv_report, run_cli, until, write_job

CENT = Decimal("0.01")
COOLDOWN = 0.3


# -- how an amount is divided --------------------------------------------------------------


@given(
    cents=st.integers(min_value=1, max_value=10**13),
    low=st.integers(min_value=1, max_value=10**6),
    span=st.integers(min_value=0, max_value=10**7),
)
def test_chunks_are_the_fewest_within_the_bounds_and_sum_exactly(
    cents: int, low: int, span: int
) -> None:
    """Sum exact, count minimal, each chunk within [min, max], at most a cent apart."""
    amount, minimum, maximum = cents * CENT, low * CENT, (low + span) * CENT
    fewest = -(-cents // (low + span))
    try:
        chunks = split_amount(amount, minimum, maximum)
    except ValueError:
        # Refused only when even the fewest chunks cannot each reach the minimum, or they
        # are more than a row may become.
        assert fewest * low > cents or fewest > MAX_CHUNKS
        return
    assert sum(chunks) == amount
    assert len(chunks) == fewest
    assert all(minimum <= c <= maximum and c == c.quantize(CENT) for c in chunks)
    assert max(chunks) - min(chunks) <= CENT
    assert list(chunks) == sorted(chunks, reverse=True)  # the remainder cents come first


def test_the_documented_examples() -> None:
    """25,000.00 and 10,000.01 under Uncash's 5.00-10,000.00, as the README shows them."""
    low, high = UNCASH_RULES.min_amount, UNCASH_RULES.max_amount
    assert split_amount(Decimal("25000.00"), low, high) == (
        Decimal("8333.34"),
        Decimal("8333.33"),
        Decimal("8333.33"),
    )
    assert split_amount(Decimal("10000.01"), low, high) == (Decimal("5000.01"), Decimal("5000.00"))
    assert split_amount(Decimal("10000.00"), low, high) == (Decimal("10000.00"),)


# -- the job as ledger rows ----------------------------------------------------------------


def test_a_job_with_no_row_above_the_maximum_is_left_as_it_is(tmp_path: Path) -> None:
    """Nothing to split: the very same job (so runs with and without the option are one)."""
    job = load_job(write_job(tmp_path / "j.csv", [("c1", "10000.00", "A"), ("c2", "5.00", "")]))
    assert split_job(job, UNCASH_RULES) is job


def test_split_rows_become_numbered_chunks_and_the_digest_stays_the_files(
    tmp_path: Path,
) -> None:
    """Ledger rows 1..N in job order, each naming its job row; the content digest unchanged."""
    rows = [("c1", "25000.00", "A"), ("c2", "100.00", "B"), ("c1", "10000.01", "C")]
    job = load_job(write_job(tmp_path / "j.csv", rows))
    split = split_job(job, UNCASH_RULES)
    assert split.content_digest == job.content_digest
    assert [r.row for r in split.rows] == list(range(1, 7))
    where = [(c.job_row, c.index, c.count) for r in split.rows if (c := chunk_of(r))]
    assert where == [(1, 1, 3), (1, 2, 3), (1, 3, 3), (2, 1, 1), (3, 1, 2), (3, 2, 2)]
    assert sum(r.amount for r in split.rows) == Decimal("35100.01")


def test_a_row_below_the_minimum_is_named_by_its_row_in_the_file(tmp_path: Path) -> None:
    """Splitting renumbers rows; a refusal still names the row the operator wrote."""
    rows = [("c1", "25000.00", "A"), ("c2", "1.00", "B")]
    job = load_job(write_job(tmp_path / "j.csv", rows))
    with pytest.raises(JobInvalid) as caught:
        split_job(job, UNCASH_RULES)
    assert caught.value.problems[0].row == 2
    assert "below the minimum" in str(caught.value)


# -- the report: chunks joined back into job rows ------------------------------------------


def chunk(job_row: int, index: int, count: int, amount: str, status: RowStatus) -> RowRecord:
    applied = status in (RowStatus.SUCCEEDED, RowStatus.PENDING)
    return RowRecord(
        row=index,
        card_id="c1",
        amount=Decimal(amount),
        extra=((SPLIT_KEY, f"{job_row}:{index}/{count}"),),
        status=status,
        fee=Decimal("1.00") if applied else None,
        total_charged=Decimal(amount) + 1 if applied else None,
        transaction_id=f"t{index}" if applied else None,
        error=None if applied else "refused",
    )


def test_some_chunks_paid_and_the_rest_failed_is_needs_review_with_the_paid_part() -> None:
    """Money moved: never `failed`; the paid part and each chunk's id are on the line."""
    records = [
        chunk(1, 1, 3, "8333.34", RowStatus.SUCCEEDED),
        chunk(1, 2, 3, "8333.33", RowStatus.SUCCEEDED),
        chunk(1, 3, 3, "8333.33", RowStatus.FAILED),
    ]
    (row,) = job_rows(records)
    assert row.status is RowStatus.NEEDS_REVIEW
    assert row.amount == Decimal("25000.00")
    assert dict(row.extra)["split_paid"] == "16666.67"
    assert dict(row.extra)["split_chunks"] == "2/3"
    assert row.fee == Decimal("2.00")
    assert row.transaction_id == "t1 t2"
    assert row.error is not None
    assert "paid 16666.67 of 25000.00" in row.error


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        ("S S S", RowStatus.SUCCEEDED),
        ("S P S", RowStatus.PENDING),
        ("F F F", RowStatus.FAILED),
        ("S F F", RowStatus.NEEDS_REVIEW),
        ("P F S", RowStatus.NEEDS_REVIEW),
        ("S N F", RowStatus.NEEDS_REVIEW),
        ("S S -", RowStatus.NOT_ATTEMPTED),
        ("- - -", RowStatus.NOT_ATTEMPTED),
    ],
)
def test_a_rows_status_from_its_chunks(statuses: str, expected: RowStatus) -> None:
    """`succeeded` only when every chunk is; `failed` only when nothing moved."""
    names = {
        "S": RowStatus.SUCCEEDED,
        "P": RowStatus.PENDING,
        "F": RowStatus.FAILED,
        "N": RowStatus.NEEDS_REVIEW,
        "-": RowStatus.NOT_ATTEMPTED,
    }
    assert row_status([names[s] for s in statuses.split()]) is expected


# -- end to end ----------------------------------------------------------------------------


def args(sb: RunningSandbox, tmp: Path, *more: str) -> list[str]:
    return [
        "--provider", "uncash", "--base-url", sb.base_url,
        "--ledger", str(tmp / "ledger.sqlite"), "--output", str(tmp / "report.csv"),
        "--log-format", "json", "--cooldown", str(COOLDOWN), *more,
    ]  # fmt: skip


async def start(job: Path, sb: RunningSandbox, tmp: Path, *more: str) -> anyio.abc.Process:
    with (tmp / "runner.log").open("ab") as log:  # the child keeps its own descriptor
        return await anyio.open_process(
            command("run", str(job), *args(sb, tmp, *more)),
            cwd=tmp,
            env=clean_env(UNCASH_API_TOKEN=TOKEN),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )


@pytest.mark.anyio
async def test_a_row_above_the_maximum_is_refused_without_the_option(tmp_path: Path) -> None:
    """Exit 2, nothing sent, and the message names --split-over-max."""
    job = write_job(tmp_path / "j.csv", [(str(uuid.uuid4()), "25000.00", "A")])
    async with serve_sandbox(SandboxConfig(token=TOKEN, cooldown=COOLDOWN)) as sb:
        done = await run_cli("run", str(job), *args(sb, tmp_path), cwd=tmp_path,
                             env=clean_env(UNCASH_API_TOKEN=TOKEN))  # fmt: skip
        arrivals = len(sb.state.topup_arrivals)
    assert done.code == 2, done.stderr
    assert arrivals == 0
    assert "--split-over-max" in done.stderr
    assert "row 1" in done.stderr


def test_preflight_refuses_a_row_whose_whole_amount_passes_the_cards_limit() -> None:
    """Each chunk would fit the limit, the row does not: every chunk of it set aside."""
    rows = split_job_rows([("c1", "25000.00"), ("c2", "25000.00")])
    cards = {
        "c1": CardState(
            "c1", CardStatus.ACTIVE, Decimal(0), Decimal("1000.00"), limit=Decimal("25000")
        ),
        "c2": CardState(
            "c2", CardStatus.ACTIVE, Decimal(0), Decimal("0.00"), limit=Decimal("25000")
        ),
    }
    aside: dict[int, str] = {}
    problems = card_limit_problems(rows, cards, aside)
    assert len(problems) == 1
    assert problems[0].startswith("row 1: 25000.00")
    assert sorted(aside) == [1, 2, 3]


def split_job_rows(rows: list[tuple[str, str]]) -> tuple[JobRow, ...]:
    jobs = [JobRow(n, card, Decimal(amount)) for n, (card, amount) in enumerate(rows, 1)]
    out: list[JobRow] = []
    for row in jobs:
        parts = split_amount(row.amount, UNCASH_RULES.min_amount, UNCASH_RULES.max_amount)
        for index, amount in enumerate(parts, 1):
            marker = (SPLIT_KEY, f"{row.row}:{index}/{len(parts)}")
            out.append(JobRow(len(out) + 1, row.card_id, amount, extra=(marker,)))
    return tuple(out)


@pytest.mark.anyio
async def test_a_row_paid_in_part_before_a_refusal_is_needs_review_not_failed(
    tmp_path: Path,
) -> None:
    """The card's limit (unreadable in advance at Uncash) stops the third chunk: the row is
    needs_review with the paid part shown, and is left out of the failed-rows job."""
    card = str(uuid.uuid4())
    job = write_job(tmp_path / "j.csv", [(card, "25000.00", "A")])
    config = SandboxConfig(token=TOKEN, cooldown=COOLDOWN, default_card_limit=Decimal("20000"))
    async with serve_sandbox(config) as sb:
        done = await run_cli("run", str(job), *args(sb, tmp_path, "--split-over-max"),
                             cwd=tmp_path, env=clean_env(UNCASH_API_TOKEN=TOKEN))  # fmt: skip
        paid = sum(t.amount for t in sb.state.applied)
    assert done.code == 1, done.stderr
    (row,) = read_csv_report(tmp_path / "report.csv")
    assert row["status"] == "needs_review"
    assert Decimal(row["split_paid"]) == paid == Decimal("16666.67")
    assert row["split_chunks"] == "2/3"
    chunks = read_csv_report(tmp_path / "report.chunks.csv")
    assert [c["status"] for c in chunks] == ["succeeded", "succeeded", "failed"]
    assert not (tmp_path / "report.failed.csv").exists()


@pytest.mark.anyio
@pytest.mark.slow
async def test_split_rows_under_faults_and_a_sigkill_are_each_chunk_paid_once(
    tmp_path: Path,
) -> None:
    """25,000.00 and 10,000.01 in chunks, faults, SIGKILL, rerun: by the sandbox's record every
    chunk once, a cooldown apart per card, each row's sum exact, and the report agrees."""
    card_a, card_b = str(uuid.uuid4()), str(uuid.uuid4())
    rows = [(card_a, "25000.00", "EMP-1"), (card_b, "10000.01", "EMP-2"),
            (card_a, "100.00", "EMP-3")]  # fmt: skip
    job = write_job(tmp_path / "j.csv", rows)
    config = SandboxConfig(
        token=TOKEN, cooldown=COOLDOWN, fault_rate=0.3, slow_seconds=1.0, seed=4,
        default_card_limit=Decimal("100000.00"),
    )  # fmt: skip
    more = ("--split-over-max", "--timeout", "0.5", "--max-attempts", "20",
            "--apply-grace", "0.5")  # fmt: skip
    async with serve_sandbox(config) as sb:
        process = await start(job, sb, tmp_path, *more)
        target = random.Random(2).randint(1, 3)
        await until(lambda: len(sb.state.applied) >= target or process.returncode is not None)
        process.send_signal(signal.SIGKILL)
        await process.wait()
        killed_with = len(sb.state.applied)
        final = await run_cli("run", str(job), *args(sb, tmp_path, *more), cwd=tmp_path,
                              env=clean_env(UNCASH_API_TOKEN=TOKEN))  # fmt: skip
        applied = list(sb.state.applied)
        faults = sum(sb.state.faults_injected.values())
    assert final.code == 0, final.stderr
    assert 0 < killed_with < 6
    assert faults > 0
    per_card: dict[str, list[Decimal]] = defaultdict(list)
    times: dict[str, list[float]] = defaultdict(list)
    for topup in applied:
        per_card[topup.card_id].append(topup.amount)
        times[topup.card_id].append(topup.at)
    assert sorted(per_card[card_a]) == sorted(
        Decimal(a) for a in ("8333.34", "8333.33", "8333.33", "100.00")
    )
    assert sorted(per_card[card_b]) == [Decimal("5000.00"), Decimal("5000.01")]
    for at in times.values():
        gaps = [b - a for a, b in zip(sorted(at), sorted(at)[1:], strict=False)]
        assert min(gaps) >= COOLDOWN - 1e-6
    report = read_csv_report(tmp_path / "report.csv")
    assert [r["status"] for r in report] == ["succeeded"] * 3
    assert [Decimal(r["split_paid"]) for r in report] == [Decimal(a) for _, a, _ in rows]
    assert sum(Decimal(r["amount"]) for r in report) == sum(t.amount for t in applied)
    chunks = read_csv_report(tmp_path / "report.chunks.csv")
    assert len(chunks) == len(applied) == 6
    assert {c["status"] for c in chunks} == {"succeeded"}
    assert sum(Decimal(c["amount"]) for c in chunks) == sum(t.amount for t in applied)
    # A chunk whose answer was lost is reconciled from the card's books: applied, but its
    # transaction id and fee were never told. Every one that was told is the sandbox's.
    by_id = {t.transaction_id: t for t in applied}
    for c in chunks:
        if c["transaction_id"]:
            topup = by_id[c["transaction_id"]]
            assert Decimal(c["amount"]) == topup.amount
            assert c["fee"] == "" or Decimal(c["fee"]) == topup.fee
    told = [r for r in report if r["fee"]]
    assert sum(Decimal(r["fee"]) for r in told) == sum(
        by_id[t].fee for r in told for t in r["transaction_id"].split()
    )


def test_chunks_keep_their_rows_reference_and_columns(tmp_path: Path) -> None:
    """A chunk carries the row's card, reference and extra columns into the ledger."""
    job = load_job(write_job(tmp_path / "j.csv", [("c1", "20000.00", "A")], extra="team"))
    first = split_job(job, UNCASH_RULES).rows[0]
    assert (first.card_id, first.reference, first.amount) == ("c1", "A", Decimal("10000.00"))
    assert replace(first, extra=without_split(first.extra)).extra == (("team", "value-0"),)


def test_a_split_runs_workbook_has_one_results_line_per_row_and_a_chunks_sheet(
    tmp_path: Path,
) -> None:
    """Results joins the chunks; Chunks lists each with its own transaction id and fee."""
    records = [
        chunk(1, 1, 2, "5000.01", RowStatus.SUCCEEDED),
        chunk(1, 2, 2, "5000.00", RowStatus.SUCCEEDED),
    ]
    info = RunInfo("k", "uncash", "j.csv")
    split = write_run_report(tmp_path / "r.xlsx", lambda: iter(records), info, Figures("USD"))
    workbook = openpyxl.load_workbook(tmp_path / "r.xlsx", read_only=True)
    results = list(workbook["Results"].iter_rows(values_only=True))
    chunks = list(workbook["Chunks"].iter_rows(values_only=True))
    assert split
    assert len(results) == 2
    assert results[1][:3] == (1, "c1", 10000.01)
    assert [(c[1], c[5], c[7], c[10]) for c in chunks[1:]] == [
        (1, 5000.01, 1.0, "t1"),
        (2, 5000.0, 1.0, "t2"),
    ]


def test_a_run_recorded_with_other_ledger_rows_is_not_resumed() -> None:
    """Same job, same target, other chunks: refused, never mixed into one run."""
    recorded = RunSpec("k", "uncash", "uncash:x", "j.csv", "digest", (), 3)
    now = replace(recorded, row_count=6)
    record = cast(RunRecord, SimpleNamespace(run_key="k", name="ledger.sqlite"))
    same_run_or_refuse(record, recorded, recorded, "")
    with pytest.raises(LedgerError, match="--split-over-max"):
        same_run_or_refuse(record, recorded, now, "")


@pytest.mark.anyio
@pytest.mark.slow
@pytest.mark.postgres
async def test_two_workers_on_a_shared_ledger_pay_each_chunk_once(
    pg_url: str, tmp_path: Path
) -> None:
    """Two workers, one split job, one PostgreSQL ledger: each chunk paid once, the reports
    of both workers and `report` from the ledger alike."""
    cards = [str(uuid.uuid4()) for _ in range(4)]
    rows = [(card, "25000.00", f"E{n}") for n, card in enumerate(cards)]
    rows += [(cards[0], "10000.01", "X")]
    job = write_job(tmp_path / "j.csv", rows)
    config = SandboxConfig(
        token=TOKEN, cooldown=COOLDOWN, fault_rate=0.2, slow_seconds=1.0, seed=6,
        default_card_limit=Decimal("100000.00"),
    )  # fmt: skip
    async with serve_sandbox(config) as sb:
        workers = []
        for name in ("w0", "w1"):
            more = ("--ledger", pg_url, "--run-key", "shared", "--output", f"{name}.csv",
                    "--split-over-max", "--timeout", "0.5", "--max-attempts", "20",
                    "--apply-grace", "0.5", "--lease", "1.5")  # fmt: skip
            workers.append(await start(job, sb, tmp_path, *more))
        with anyio.fail_after(90):
            codes = [await w.wait() for w in workers]
        rewritten = await run_cli(
            "report", "--ledger", pg_url, "--run-key", "shared",
            "--output", str(tmp_path / "again.csv"), cwd=tmp_path,
        )  # fmt: skip
        applied = list(sb.state.applied)
    assert rewritten.code == 0, rewritten.stderr
    assert codes == [0, 0], (tmp_path / "runner.log").read_text()[-2000:]
    amounts = sorted(t.amount for t in applied)
    assert len(amounts) == 14
    assert sum(amounts) == Decimal("110000.01")
    assert amounts.count(Decimal("8333.34")) == 4
    reports = [read_csv_report(tmp_path / f"{name}.csv") for name in ("w0", "w1")]
    assert reports[0] == reports[1] == read_csv_report(tmp_path / "again.csv")
    assert [r["status"] for r in reports[0]] == ["succeeded"] * 5
    chunks = read_csv_report(tmp_path / "again.chunks.csv")
    assert len({c["ledger_row"] for c in chunks}) == len(applied)
