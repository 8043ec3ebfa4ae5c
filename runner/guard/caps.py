"""Spending caps: a job whose total, or any row of which, is above the operator's cap is
refused before anything is sent, naming the rows and the totals."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal

from runner.domain import JobRow
from runner.money import format_amount

_LISTED = 50


def cap_problems(
    rows: Sequence[JobRow], max_total: Decimal | None, max_row: Decimal | None
) -> list[str]:
    """One line a reason: each row above `max_row` (up to 50), the total above `max_total`."""
    problems: list[str] = []
    if max_row is not None:
        above = [r for r in rows if r.amount > max_row]
        for r in above[:_LISTED]:
            problems.append(
                f"row {r.row} (card {r.card_id}) is {format_amount(r.amount)}, above "
                f"--max-row {format_amount(max_row)}"
            )
        if len(above) > _LISTED:
            problems.append(f"... and {len(above) - _LISTED} more rows above --max-row")
    if max_total is not None:
        total = sum((r.amount for r in rows), Decimal(0))
        if total > max_total:
            problems.append(
                f"the job totals {format_amount(total)} over {len(rows)} rows, above "
                f"--max-total {format_amount(max_total)}"
            )
    return problems
