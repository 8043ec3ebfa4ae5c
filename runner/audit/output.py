"""An audit written out: the `Audit` sheet of an .xlsx report, or `<report stem>.audit.csv`
beside a .csv one; and the lines the report's Summary and the console say of it."""

from __future__ import annotations

import csv
import os
import tempfile
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from pathlib import Path

from runner.audit.values import AuditResult, Line, Proof
from runner.money import format_amount
from runner.report.rows import Value

AUDIT_SHEET = "Audit"
HEADER = (
    "row", "card_id", "status", "amount", "provider_amount", "transaction_id", "provider_at",
    "verdict", "proof", "detail",
)  # fmt: skip


def verdict_text(result: AuditResult) -> str:
    bad = len(result.discrepancies)
    if bad == 0:
        return "every row matched the provider's record"
    return f"{bad} discrepanc{'y' if bad == 1 else 'ies'} with the provider's record"


def summary_lines(result: AuditResult) -> tuple[tuple[str, Value], ...]:
    """The Summary's lines of an audit (numbers as numbers)."""
    return (
        ("audit", verdict_text(result)),
        ("audit: rows matched", result.count("matched")),
        ("audit: rows proven by the transactions list", result.by_proof(Proof.LIST)),
        ("audit: rows proven by the card deposit", result.by_proof(Proof.DEPOSIT)),
        ("audit: discrepancies", len(result.discrepancies)),
        ("audit: rows filled in from the provider", len(result.fills)),
    )


def console_lines(result: AuditResult) -> list[str]:
    """What the command says: the verdict, then one line per discrepancy naming its card."""
    lines = [f"audit {result.run_key}: {verdict_text(result)}"]
    for line in result.discrepancies:
        row = f"row {line.row}" if line.row is not None else "no row"
        amount = line.amount if line.amount is not None else line.provider_amount
        money = "" if amount is None else f" {format_amount(amount)}"
        txn = f" (transaction {line.transaction_id})" if line.transaction_id else ""
        lines.append(
            f"  {line.verdict}: card {line.card_id}, {row}{money}{txn}: {line.detail}".rstrip(": ")
        )
    return lines


def _cells(line: Line) -> list[Value]:
    return [
        line.row,
        line.card_id,
        line.status,
        line.amount,
        line.provider_amount,
        line.transaction_id,
        line.provider_at,
        line.verdict,
        line.proof.value,
        line.detail,
    ]


def audit_path(report: Path) -> Path:
    """Where a CSV report's audit goes: `<stem>.audit.csv` beside it."""
    return report.with_name(f"{report.stem}.audit.csv")


def write_audit(report: Path, result: AuditResult) -> Path:
    """Add the Audit sheet to the .xlsx `report` (replacing an earlier one), or write the
    CSV beside a .csv one; atomically. Returns the path written."""
    if report.suffix.lower() == ".xlsx":
        _write_sheet(report, result)
        return report
    target = audit_path(report)
    _atomic(target, lambda tmp: _write_csv(tmp, result))
    return target


def _write_csv(tmp: Path, result: AuditResult) -> None:
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(HEADER)
        for line in result.lines:
            writer.writerow([_text(value) for value in _cells(line)])


def _text(value: Value) -> str:
    if value is None:
        return ""
    if isinstance(value, Decimal):
        return format_amount(value)
    if isinstance(value, datetime):
        return value.isoformat(timespec="milliseconds")
    return str(value)


def _write_sheet(report: Path, result: AuditResult) -> None:
    from openpyxl import load_workbook

    workbook = load_workbook(report)
    if AUDIT_SHEET in workbook.sheetnames:
        del workbook[AUDIT_SHEET]
    sheet = workbook.create_sheet(AUDIT_SHEET)
    sheet.append(list(HEADER))
    for line in result.lines:
        values = _cells(line)
        if isinstance(values[6], datetime):
            values[6] = values[6].replace(tzinfo=None)  # Excel holds no time zone: UTC
        sheet.append(values)
        for column in (4, 5):
            sheet.cell(row=sheet.max_row, column=column).number_format = "0.00"
    sheet.freeze_panes = "A2"
    _atomic(report, workbook.save)


def _atomic(target: Path, write: Callable[[Path], object]) -> None:
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(handle)
    tmp = Path(name)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
