"""The report of a run whose rows above the maximum were paid in chunks (`runner.jobs.split`):
the ledger's chunk rows joined back into one `Results` line per job row, and every chunk on
its own line in a `Chunks` sheet (xlsx) or `<report>.chunks.csv`.

A job row's status from its chunks': `succeeded` only when every chunk is; `pending` when every
chunk is succeeded or pending; `failed` only when every chunk failed (nothing moved);
`needs_review` when any chunk needs review, or when some chunks moved money and others failed
(the paid part is shown: never `failed`, because money moved); `not_attempted` while any
chunk is still to send (a rerun sends it). `split_paid` holds the amount of the chunks that
succeeded or are pending, `split_chunks` how many of them ("2/3"); fee, total charged and
attempts are the chunks' sums, the transaction ids the chunks' joined by spaces.
"""

from __future__ import annotations

import csv
import itertools
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

from runner.domain import RowRecord, RowStatus, RunInfo
from runner.jobs.split import (
    CHUNKS_COLUMN,
    PAID_COLUMN,
    SPLIT_COLUMNS,
    SPLIT_KEY,
    ChunkOf,
    parse_chunk,
    without_split,
)
from runner.money import format_amount
from runner.report.cells import header_cells, new_sheet, xlsx_value
from runner.report.rows import Figures, Value, cents, neutralise

CHUNKS_SHEET: Final = "Chunks"
CHUNK_COLUMNS: Final = (
    "row",
    "chunk",
    "chunks",
    "ledger_row",
    "card_id",
    "amount",
    "status",
    "fee",
    "total_charged",
    "card_balance_after",
    "transaction_id",
    "invoice_id",
    "attempts",
    "error",
    "finished_at",
    "currency",
)
_WIDTHS: Final = (7, 7, 7, 11, 38, 14, 15, 13, 15, 20, 38, 16, 10, 50, 20, 10)
_MOVED: Final = (RowStatus.SUCCEEDED, RowStatus.PENDING)


def chunk_of_record(record: RowRecord) -> ChunkOf | None:
    for name, value in record.extra:
        if name == SPLIT_KEY:
            return parse_chunk(value)
    return None


def is_split(records: Iterable[RowRecord]) -> bool:
    """Whether the run's ledger rows are chunks: a split run marks every one of them."""
    first = next(iter(records), None)
    return first is not None and chunk_of_record(first) is not None


def split_info(info: RunInfo) -> RunInfo:
    """The Results header of a split run: the job's columns, then what each row has paid."""
    return replace(info, extra_columns=(*info.extra_columns, *SPLIT_COLUMNS))


def job_rows(records: Iterable[RowRecord]) -> Iterator[RowRecord]:
    """One record per job row from the ledger's chunk records (in ledger order, so a row's
    chunks come together); records of an unsplit run pass as they are."""
    for job_row, group in itertools.groupby(records, _job_row_of):
        chunks = list(group)
        if job_row is None:
            yield from chunks
        else:
            yield joined(job_row, chunks)


def _job_row_of(record: RowRecord) -> int | None:
    chunk = chunk_of_record(record)
    return None if chunk is None else chunk.job_row


def row_status(statuses: list[RowStatus]) -> RowStatus:
    """A job row's status from its chunks' (see the module's docstring)."""
    if all(s is RowStatus.SUCCEEDED for s in statuses):
        return RowStatus.SUCCEEDED
    if RowStatus.NEEDS_REVIEW in statuses:
        return RowStatus.NEEDS_REVIEW
    if RowStatus.NOT_ATTEMPTED in statuses:
        return RowStatus.NOT_ATTEMPTED
    if all(s in _MOVED for s in statuses):
        return RowStatus.PENDING
    if all(s is RowStatus.FAILED for s in statuses):
        return RowStatus.FAILED
    return RowStatus.NEEDS_REVIEW  # some chunks moved money, the others failed


def _sum(values: list[Decimal | None]) -> Decimal | None:
    known = [v for v in values if v is not None]
    return sum(known, Decimal(0)) if known else None


def joined(job_row: int, chunks: list[RowRecord]) -> RowRecord:
    """The job row's record from its chunks'."""
    first, count = chunks[0], len(chunks)
    extra = without_split(first.extra)
    moved = [c for c in chunks if c.status in _MOVED]
    paid = sum((c.amount for c in moved), Decimal(0))
    extra += ((PAID_COLUMN, format_amount(paid)), (CHUNKS_COLUMN, f"{len(moved)}/{count}"))
    if count == 1:
        return replace(first, row=job_row, extra=extra)
    status = row_status([c.status for c in chunks])
    amount = sum((c.amount for c in chunks), Decimal(0))
    # A fee the provider did not tell for a chunk that moved money leaves the row's unknown.
    unknown_fee = any(c.fee is None for c in moved)
    unknown_charge = any(c.total_charged is None for c in moved)
    errors = [f"chunk {n}/{count}: {c.error}" for n, c in enumerate(chunks, 1) if c.error]
    what = f"split into {count} chunks; paid {format_amount(paid)} of {format_amount(amount)}"
    if status is RowStatus.NEEDS_REVIEW and moved:
        what += f" ({len(moved)} of {count} chunks applied, the others did not)"
    last = next((c for c in reversed(chunks) if c.card_balance_after is not None), None)
    started = [c.started_at for c in chunks if c.started_at is not None]
    finished = [c.finished_at for c in chunks if c.finished_at is not None]
    return RowRecord(
        row=job_row,
        card_id=first.card_id,
        amount=amount,
        reference=first.reference,
        extra=extra,
        status=status,
        fee=None if unknown_fee else _sum([c.fee for c in chunks]),
        total_charged=None if unknown_charge else _sum([c.total_charged for c in chunks]),
        card_balance_before=first.card_balance_before,
        card_balance_after=None if last is None else last.card_balance_after,
        wallet_balance_after=next(
            (c.wallet_balance_after for c in reversed(chunks) if c.wallet_balance_after), None
        ),
        transaction_id=" ".join(c.transaction_id for c in chunks if c.transaction_id) or None,
        invoice_id=" ".join(c.invoice_id for c in chunks if c.invoice_id) or None,
        attempts=sum(c.attempts for c in chunks),
        error=None if status in _MOVED and not errors else "; ".join([what, *errors]),
        started_at=min(started) if started else None,
        finished_at=max(finished) if finished else None,
    )


def chunk_values(record: RowRecord, currency: str) -> list[Value]:
    chunk = chunk_of_record(record) or ChunkOf(record.row, 1, 1)

    def money(value: Decimal | None) -> Decimal | None:
        return None if value is None else cents(value)

    return [
        chunk.job_row,
        chunk.index,
        chunk.count,
        record.row,
        record.card_id,
        cents(record.amount),
        record.status.value,
        money(record.fee),
        money(record.total_charged),
        money(record.card_balance_after),
        record.transaction_id,
        record.invoice_id,
        record.attempts,
        record.error,
        record.finished_at,
        currency,
    ]


def chunks_path_for(path: Path) -> Path:
    """Where a CSV report's chunks go: `<stem>.chunks.csv` beside it."""
    return path.with_name(f"{path.stem}.chunks{path.suffix}")


def write_chunks_csv(tmp: Path, records: Iterable[RowRecord], currency: str) -> None:
    from runner.report.csvout import csv_text

    with tmp.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow([neutralise(name) for name in CHUNK_COLUMNS])
        for record in records:
            writer.writerow([csv_text(v) for v in chunk_values(record, currency)])


def write_chunks_sheet(workbook: Any, records: Iterable[RowRecord], currency: str) -> None:
    ws = new_sheet(workbook, CHUNKS_SHEET, _WIDTHS)
    ws.append(header_cells(ws, CHUNK_COLUMNS))
    for record in records:
        ws.append([xlsx_value(ws, value) for value in chunk_values(record, currency)])


ChunkRecords = Callable[[], Iterator[RowRecord]]


def write_run_report(path: Path, records: ChunkRecords, info: RunInfo, figures: Figures) -> bool:
    """Write the run's report from `records` (the ledger's rows, read anew at each call):
    joined into job rows with a Chunks sheet when the run was split. Whether it was."""
    from runner.report import write_report

    probe = records()
    try:
        split = is_split(probe)
    finally:
        if isinstance(probe, Generator):
            probe.close()  # the ledger's reading connection, opened for one row
    if not split:
        write_report(path, records(), info, figures)
        return False
    chunks = paid = Decimal(0)
    for record in records():
        chunks += 1
        if record.status in _MOVED:
            paid += cents(record.amount)
    lines = (("chunks (rows split by --split-over-max)", int(chunks)),
             ("amount paid, all chunks", paid))  # fmt: skip
    figures = replace(figures, lines=(*figures.lines, *lines))
    write_report(path, job_rows(records()), split_info(info), figures, records())
    return True
