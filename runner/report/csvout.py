"""The report as CSV: `Results` rows in one file, the Summary in `<stem>.summary.csv`; every
text cell safe from formula injection, money from the Decimal itself.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from datetime import datetime
from decimal import Decimal
from pathlib import Path

from runner.domain import RowRecord
from runner.report.rows import (
    SUMMARY_HEADER,
    Totals,
    Value,
    neutralise,
    utc,
    values,
)

# --- CSV ------------------------------------------------------------------------------------


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
    tmp: Path, header: list[str], records: Iterable[RowRecord], extra_columns: tuple[str, ...]
) -> Totals:
    totals = Totals()
    with tmp.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow([neutralise(name) for name in header])
        for record in records:
            totals.add(record)
            writer.writerow([csv_text(v) for v in values(record, extra_columns)])
    return totals


def write_csv_summary(tmp: Path, lines: list[tuple[str, Value]]) -> None:
    with tmp.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(SUMMARY_HEADER)
        for key, value in lines:
            writer.writerow([neutralise(key), csv_text(value)])
