"""Rows above the provider's per-topup maximum paid in chunks (`--split-over-max`).

How the cents are divided: a row of A above the maximum M becomes n = ceil(A / M) chunks, the
fewest that can carry it, of equal cents with the remainder cents one each on the first
chunks (25,000.00: 8,333.34 + 8,333.33 + 8,333.33; 10,000.01: 5,000.01 + 5,000.00). Every
chunk is then floor(A/n) or ceil(A/n) cents: never above M (A <= nM), and never below the
minimum m when n*m <= A. When n*m > A no count of chunks fits (more chunks need more), and
the row is refused, as is a row that would take more than `MAX_CHUNKS` chunks.

Each chunk is a row of the ledger: its own intent, attempts and exactly-once bookkeeping,
its own place in the card's cooldown queue. The job's rows become ledger rows 1..N in job
order, each carrying `SPLIT_KEY` = "job_row:index/count" among its extras (stored with the
row, so `report` and every worker of a shared ledger read the split back from the ledger
alone). The job's content digest stays the file's, so the run key does not change; a job with
no row above the maximum is left exactly as it is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING

from runner.domain import JobRow
from runner.errors import JobInvalid, Problem
from runner.money import format_amount

if TYPE_CHECKING:
    from runner.jobs import Job
    from runner.providers.base import CardState, ProviderRules

# Not a name a payroll export uses; a job column of that name is refused when splitting.
SPLIT_KEY = "topup-runner:split"
# The Results columns a split run adds after the job's own (text: amount paid, chunks paid).
PAID_COLUMN = "split_paid"
CHUNKS_COLUMN = "split_chunks"
SPLIT_COLUMNS = (PAID_COLUMN, CHUNKS_COLUMN)
_CENT = Decimal("0.01")
# The most chunks one row may become (10,000,000.00 at Uncash's maximum).
MAX_CHUNKS = 1_000
_MAX_LISTED = 50


@dataclass(frozen=True, slots=True)
class ChunkOf:
    """Where a ledger row comes from: the job's row, its 1-based chunk index, the count."""

    job_row: int
    index: int
    count: int


def split_amount(amount: Decimal, minimum: Decimal, maximum: Decimal) -> tuple[Decimal, ...]:
    """`amount` as the fewest chunks each within [minimum, maximum], as equal as cents allow
    (the remainder one cent each on the first); ValueError when no count of chunks fits."""
    cents, low, high = (int(value / _CENT) for value in (amount, minimum, maximum))
    if cents <= 0 or low <= 0 or high < low:
        raise ValueError(f"cannot split {amount} within {minimum}..{maximum}")
    count = -(-cents // high)  # ceil
    if count > MAX_CHUNKS:
        # A typo (a missing decimal point) would otherwise queue a card for days of cooldowns.
        raise ValueError(
            f"{format_amount(amount)} would take {count:,} topups of at most "
            f"{format_amount(maximum)}: more than the {MAX_CHUNKS:,} a row may be split into"
        )
    base, extra = divmod(cents, count)
    if base < low:
        raise ValueError(
            f"{format_amount(amount)} cannot be split into chunks of "
            f"{format_amount(minimum)} to {format_amount(maximum)}"
        )
    return tuple((base + (1 if n < extra else 0)) * _CENT for n in range(count))


def chunk_of(row: JobRow) -> ChunkOf | None:
    """The chunk `row` is, if it is one of a split job's ledger rows."""
    for name, value in row.extra:
        if name == SPLIT_KEY:
            return parse_chunk(value)
    return None


def parse_chunk(value: str) -> ChunkOf:
    job_row, _, position = value.partition(":")
    index, _, count = position.partition("/")
    return ChunkOf(int(job_row), int(index), int(count))


def without_split(extra: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    return tuple(pair for pair in extra if pair[0] != SPLIT_KEY)


def split_job(job: Job, rules: ProviderRules) -> Job:
    """`job` with every row above `rules.max_amount` split into chunk rows, or `job` itself
    when no row is above it. JobInvalid (exit 2, nothing sent) for a row below the minimum or
    one no chunks can carry, named by its row in the job file."""
    low, high = rules.min_amount, rules.max_amount
    if all(row.amount <= high for row in job.rows):
        return job
    problems: list[Problem] = []
    taken = [name for name in (SPLIT_KEY, *SPLIT_COLUMNS) if name in job.extra_columns]
    if taken:
        problems.append(
            Problem(str(job.path), f"column {taken[0]!r} is reserved by --split-over-max")
        )
    rows: list[JobRow] = []
    for row in job.rows:
        amounts: tuple[Decimal, ...] = (row.amount,)
        if row.amount < low:
            why = f"{format_amount(row.amount)} is below the minimum {low}"
            problems.append(Problem(str(job.path), why, row.row, "amount"))
        elif row.amount > high:
            try:
                amounts = split_amount(row.amount, low, high)
            except ValueError as exc:
                problems.append(Problem(str(job.path), str(exc), row.row, "amount"))
        for index, amount in enumerate(amounts, start=1):
            marker = (SPLIT_KEY, f"{row.row}:{index}/{len(amounts)}")
            rows.append(
                JobRow(len(rows) + 1, row.card_id, amount, row.reference, (*row.extra, marker))
            )
    if problems:
        raise JobInvalid(problems[:_MAX_LISTED], truncated=max(0, len(problems) - _MAX_LISTED))
    return dataclasses.replace(job, rows=tuple(rows))


def over_max_advice(amount: Decimal, maximum: Decimal) -> str:
    """What a refusal of a row above the maximum says, without --split-over-max."""
    count = -(-int(amount / _CENT) // int(maximum / _CENT))
    return (
        f"{format_amount(amount)} is above the maximum {maximum}: --split-over-max pays it "
        f"in {count} topups"
    )


def whole_rows(rows: Iterable[JobRow]) -> dict[int, tuple[str, Decimal]]:
    """The job rows the split ones among `rows` come from: card and the sum of their chunks
    among `rows` (the whole amount on a new run; what is left of it on a resumed one)."""
    found: dict[int, tuple[str, Decimal]] = {}
    for row in rows:
        chunk = chunk_of(row)
        if chunk is None or chunk.count == 1:
            continue
        card, amount = found.get(chunk.job_row, (row.card_id, Decimal(0)))
        found[chunk.job_row] = (card, amount + row.amount)
    return found


def card_limit_problems(
    rows: Sequence[JobRow], cards: Mapping[str, CardState], set_aside: dict[int, str]
) -> list[str]:
    """Split rows whose card cannot take the row's whole amount (deposit + amount above its
    limit): every chunk of theirs goes aside, so that no row is paid in part for a limit that
    preflight could see. Rows without a readable limit or deposit are not judged."""
    refused: dict[int, str] = {}
    for job_row, (card, amount) in whole_rows(rows).items():
        state = cards.get(card)
        if state is None or state.limit is None or state.deposit is None:
            continue
        if state.deposit + amount > state.limit:
            refused[job_row] = (
                f"row {job_row}: {format_amount(amount)} in chunks would exceed card {card}'s "
                f"limit {format_amount(state.limit)} (deposit {format_amount(state.deposit)})"
            )
    for row in rows:
        chunk = chunk_of(row)
        if chunk is not None and chunk.job_row in refused:
            set_aside[row.row] = "preflight: " + refused[chunk.job_row].split(": ", 1)[1]
    return list(refused.values())[:_MAX_LISTED]


def duplicate_key(row: JobRow) -> tuple[tuple[int, int] | None, int]:
    """What tells the equal chunks of one row apart when looking for rows pasted twice (their
    index and count; None for an unsplit row), and the job row to name."""
    chunk = chunk_of(row)
    return (None, row.row) if chunk is None else ((chunk.index, chunk.count), chunk.job_row)


def split_if_asked(job: Job, provider: str, asked: bool) -> Job:
    """The job a run or check works on: `job` split for `provider` when `asked`
    (--split-over-max), else `job` itself, whose rows above the maximum preflight refuses."""
    if not asked:
        return job
    from runner.providers.factory import rules_for

    return split_job(job, rules_for(provider))
