"""Spending caps: a job whose total, or any row of which, is above the operator's cap is
refused before anything is sent, naming the rows and the totals."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal

from runner.domain import JobRow
from runner.jobs.split import chunk_of
from runner.money import format_amount

_LISTED = 50


def _job_rows(rows: Sequence[JobRow]) -> list[tuple[int, str, Decimal]]:
    """The job's own rows as (row, card, amount): the chunks of a row split over the
    provider's maximum (--split-over-max) joined back, so a cap judges what the file says
    to pay a card, never a chunk of it."""
    joined: dict[int, tuple[str, Decimal]] = {}
    for row in rows:
        chunk = chunk_of(row)
        number = row.row if chunk is None else chunk.job_row
        card, amount = joined.get(number, (row.card_id, Decimal(0)))
        joined[number] = (card, amount + row.amount)
    return [(number, card, amount) for number, (card, amount) in joined.items()]


def cap_problems(
    rows: Sequence[JobRow], max_total: Decimal | None, max_row: Decimal | None
) -> list[str]:
    """One line a reason: each row above `max_row` (up to 50), the total above `max_total`."""
    problems: list[str] = []
    whole = _job_rows(rows)
    if max_row is not None:
        above = [(n, card, amount) for n, card, amount in whole if amount > max_row]
        for number, card, amount in above[:_LISTED]:
            problems.append(
                f"row {number} (card {card}) is {format_amount(amount)}, above "
                f"--max-row {format_amount(max_row)}"
            )
        if len(above) > _LISTED:
            problems.append(f"... and {len(above) - _LISTED} more rows above --max-row")
    if max_total is not None:
        total = sum((amount for _, _, amount in whole), Decimal(0))
        if total > max_total:
            problems.append(
                f"the job totals {format_amount(total)} over {len(whole)} rows, above "
                f"--max-total {format_amount(max_total)}"
            )
    return problems
