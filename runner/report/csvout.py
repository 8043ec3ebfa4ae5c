"""The report as CSV: `Results` rows in one file, the Summary in `<stem>.summary.csv`, subtotals
by a job column in `<stem>.subtotals.csv`; every text cell safe from formula injection
(reversibly: see `rows.neutralise`), money from the Decimal itself.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from datetime import datetime
from decimal import Decimal
from pathlib import Path

from runner.domain import RowRecord
from runner.report.digest import ResultsDigest
from runner.report.rows import (
    SUMMARY_HEADER,
    Subtotals,
    Totals,
    Value,
    neutralise,
    utc,
    values,
)

# The subtotals file's columns after the group column's own.
SUBTOTALS_HEADER = ("status", "rows", "amount", "fee", "total_charged", "currency")


def csv_text(value: Value) -> str:
    if value is None:
        return ""
    if isinstance(value, Decimal):
        # Formatted from the Decimal itself: float would print 0.30000000000000004.
        return f"{value:f}"
    if isinstance(value, datetime):
        return utc(value).isoformat(timespec="seconds") + "Z"
    if isinstance(value, int):
        return str(value)
    return neutralise(value)


def write_csv(
    tmp: Path,
    header: list[str],
    records: Iterable[RowRecord],
    extra_columns: tuple[str, ...],
    currency: str,
    subtotals: Subtotals | None,
) -> Totals:
    totals = Totals()
    digest = ResultsDigest()  # of the texts as written: the Summary's results digest
    with tmp.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        texts = [neutralise(name) for name in header]
        digest.add(texts)
        writer.writerow(texts)
        for record in records:
            totals.add(record)
            if subtotals is not None:
                subtotals.add(record)
            texts = [csv_text(v) for v in values(record, extra_columns, currency)]
            digest.add(texts)
            writer.writerow(texts)
    totals.digest = digest.text()
    return totals


def write_csv_summary(tmp: Path, lines: list[tuple[str, Value]]) -> None:
    with tmp.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(SUMMARY_HEADER)
        for key, value in lines:
            writer.writerow([neutralise(key), csv_text(value)])


def write_csv_subtotals(tmp: Path, subtotals: Subtotals, currency: str) -> None:
    column = subtotals.column
    if column in SUBTOTALS_HEADER:
        column += " (job)"
    with tmp.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow([neutralise(column), *SUBTOTALS_HEADER])
        for group, status, rows, amount, fee, charged in subtotals.lines():
            money = (f"{amount:f}", f"{fee:f}", f"{charged:f}")
            writer.writerow([neutralise(group), status, rows, *money, currency])
