"""The report as the operator and the auditor meet it: formula-like text exact in xlsx and
reversibly guarded in CSV, Summary numbers as numbers, the run's currency, subtotals by a job
column, and a Print sheet readable on paper at 100 %."""

from __future__ import annotations

import csv
import zipfile
from decimal import Decimal
from pathlib import Path
from typing import Any

import openpyxl
import pytest
from hypothesis import given
from hypothesis import strategies as st

from runner.domain import RowStatus, RunInfo
from runner.errors import ConfigError
from runner.jobs import load_job
from runner.report import (
    RESULT_COLUMNS,
    Figures,
    Seconds,
    failed_rows_path_for,
    neutralise,
    restore,
    write_failed_rows,
    write_report,
)
from runner.report import printed as report_printed
from runner.report.cells import PRINTABLE_PIXELS, column_pixels
from tests.test_report import csv_rows, csv_summary, record, stream, xlsx_cells, xlsx_summary

EVIL = ("=cmd|' /C calc'!A0", "+1+2", "-3", "@SUM(A1)", "'=already quoted", "''+two", "plain")
INFO = RunInfo("k", "uncash", "job.csv", extra_columns=("department",))
USD = Figures(currency="USD")


def card_id(text: str, n: int) -> str:
    """A card id starting as `text` does, without the spaces a card id may not hold."""
    return f"{text[:2]}card-{n}"


def sheet_xml(path: Path, number: int) -> str:
    with zipfile.ZipFile(path) as archive:
        return archive.read(f"xl/worksheets/sheet{number}.xml").decode()


# --- 8: formula-like text -------------------------------------------------------------------


def test_xlsx_holds_formula_like_text_exactly_as_string_cells(tmp_path: Path) -> None:
    """In every sheet, "=cmd|calc" and the like are string cells with the job's exact text."""
    rows = [record(n, reference=text, card_id=text) for n, text in enumerate(EVIL, 1)]
    write_report(tmp_path / "r.xlsx", stream(*rows), INFO, USD)
    cells = xlsx_cells(tmp_path / "r.xlsx")
    assert [c["reference"].value for c in cells] == list(EVIL)
    assert {c["reference"].data_type for c in cells} == {"s"}
    printed = list(openpyxl.load_workbook(tmp_path / "r.xlsx")["Print"].iter_rows(min_row=2))
    assert [row[1].value for row in printed] == list(EVIL)
    for number in (1, 2, 3):
        xml = sheet_xml(tmp_path / "r.xlsx", number)
        assert "<f>" not in xml
        assert "'=cmd" not in xml


def test_failed_rows_job_is_guarded_and_reads_back_to_the_same_rows(tmp_path: Path) -> None:
    """`<report>.failed.csv` carries the CSV guard (no raw =cmd), and loading it as a job gives
    back exactly the card ids, references and extra values that failed."""
    rows = [
        record(n, status=RowStatus.FAILED, card_id=card_id(text, n), reference=text,
               extra=(("department", text),), error=text)
        for n, text in enumerate(EVIL, 1)
    ]  # fmt: skip
    path = failed_rows_path_for(tmp_path / "r.csv")
    assert write_failed_rows(path, stream(*rows), ("department",)) == len(EVIL)
    raw = path.read_text(encoding="utf-8")
    assert ",=cmd" not in raw
    assert "\n=cmd" not in raw
    job = load_job(path)
    assert [r.card_id for r in job.rows] == [card_id(t, n) for n, t in enumerate(EVIL, 1)]
    assert [r.reference for r in job.rows] == list(EVIL)
    assert [dict(r.extra)["department"] for r in job.rows] == list(EVIL)


@given(st.text(alphabet="'=+-@\tab1", max_size=8))
def test_the_csv_guard_is_reversible(text: str) -> None:
    """Whatever the text, taking the guard off gives it back, and a guarded text never starts
    with a formula trigger."""
    guarded = neutralise(text)
    assert restore(guarded) == text
    assert not guarded.startswith(("=", "+", "-", "@", "\t", "\r"))


# --- 9: numbers as numbers ------------------------------------------------------------------


def test_summary_figures_are_numbers_not_text(tmp_path: Path) -> None:
    """Counts are integers and durations decimal numbers in the Summary, with a number format."""
    figures = Figures(
        "USD", lines=(("topups sent (all processes)", 300), ("span (s)", Seconds("12.5")))
    )
    write_report(tmp_path / "r.xlsx", stream(record()), INFO, figures)
    summary = xlsx_summary(tmp_path / "r.xlsx")
    assert summary["topups sent (all processes)"] == 300
    assert summary["span (s)"] == 12.5
    sheet = openpyxl.load_workbook(tmp_path / "r.xlsx")["Summary"]
    span = next(row[1] for row in sheet.iter_rows() if row[0].value == "span (s)")
    assert span.data_type == "n"
    assert span.number_format == "#,##0.0"
    write_report(tmp_path / "r.csv", stream(record()), INFO, figures)
    assert csv_summary(tmp_path / "r.csv")["span (s)"] == "12.5"


# --- 10: currency ---------------------------------------------------------------------------


@pytest.mark.parametrize(("provider", "currency"), [("uncash", "USD"), ("alix", "USDT")])
def test_each_provider_has_its_currency(provider: str, currency: str) -> None:
    """Uncash (and the sandbox simulating it) count in USD, Alix in USDT."""
    from runner.providers.factory import rules_for

    assert rules_for(provider).currency == currency
    assert rules_for("sandbox").currency == "USD"


def test_currency_is_in_every_row_the_summary_and_its_money_formats(tmp_path: Path) -> None:
    """Results and CSV rows carry a currency column; the Summary names the currency and shows
    it after every sum; the by-status table's money titles carry it."""
    write_report(tmp_path / "r.xlsx", stream(record()), INFO, Figures("USDT"))
    write_report(tmp_path / "r.csv", stream(record()), INFO, Figures("USDT"))
    (row,) = xlsx_cells(tmp_path / "r.xlsx")
    assert row["currency"].value == "USDT"
    assert csv_rows(tmp_path / "r.csv")[0]["currency"] == "USDT"
    assert xlsx_summary(tmp_path / "r.xlsx")["currency"] == "USDT"
    assert csv_summary(tmp_path / "r.csv")["currency"] == "USDT"
    sheet = openpyxl.load_workbook(tmp_path / "r.xlsx")["Summary"]
    total = next(row[1] for row in sheet.iter_rows() if row[0].value == "amount, all rows")
    assert total.number_format == '#,##0.00 "USDT"'
    titles = {cell.value for row in sheet.iter_rows() for cell in row}
    assert {"amount (USDT)", "fee (USDT)", "total charged (USDT)"} <= titles


# --- subtotals by a job column --------------------------------------------------------------


def grouped() -> list[Any]:
    return [
        record(1, amount=Decimal("10.00"), fee=Decimal("1.00"), total_charged=Decimal("11.00"),
               extra=(("department", "Sales"),)),
        record(2, amount=Decimal("20.00"), fee=Decimal("2.00"), total_charged=Decimal("22.00"),
               extra=(("department", "Ops"),)),
        record(3, amount=Decimal("5.00"), fee=None, total_charged=None,
               status=RowStatus.FAILED, extra=(("department", "Sales"),)),
    ]  # fmt: skip


def test_group_by_adds_subtotals_by_status_to_the_xlsx_summary(tmp_path: Path) -> None:
    """Per department: rows, amount, fee and total charged by status, then the group's total."""
    write_report(tmp_path / "r.xlsx", stream(*grouped()), INFO, Figures("USD", "department"))
    rows = [
        [c.value for c in row] for row in openpyxl.load_workbook(tmp_path / "r.xlsx")["Summary"]
    ]
    (title,) = [n for n, row in enumerate(rows) if row[0] == "Subtotals by department"]
    table = [row[:6] for row in rows[title + 1 :]]
    assert table[0][:3] == ["department", "status", "rows"]
    assert table[1:] == [
        ["Ops", "succeeded", 1, 20, 2, 22],
        ["Ops", "all rows", 1, 20, 2, 22],
        ["Sales", "succeeded", 1, 10, 1, 11],
        ["Sales", "failed", 1, 5, 0, 0],
        ["Sales", "all rows", 2, 15, 1, 11],
    ]


def test_group_by_writes_a_subtotals_csv_beside_a_csv_report(tmp_path: Path) -> None:
    """With CSV, the subtotals go to `<stem>.subtotals.csv`, named in the summary; without
    --group-by an earlier one is removed."""
    write_report(tmp_path / "r.csv", stream(*grouped()), INFO, Figures("USD", "department"))
    with (tmp_path / "r.subtotals.csv").open(newline="", encoding="utf-8") as file:
        lines = list(csv.reader(file))
    assert lines[0] == ["department", "status", "rows", "amount", "fee", "total_charged",
                        "currency"]  # fmt: skip
    assert lines[1] == ["Ops", "succeeded", "1", "20.00", "2.00", "22.00", "USD"]
    assert csv_summary(tmp_path / "r.csv")["subtotals by department"] == "r.subtotals.csv"
    write_report(tmp_path / "r.csv", stream(*grouped()), INFO, USD)
    assert not (tmp_path / "r.subtotals.csv").exists()


def test_group_by_an_unknown_column_is_a_config_error_before_writing(tmp_path: Path) -> None:
    """A column the job does not have: ConfigError naming the columns it has; no file."""
    with pytest.raises(ConfigError, match=r"'team'.*department"):
        write_report(tmp_path / "r.xlsx", stream(record()), INFO, Figures("USD", "team"))
    assert not (tmp_path / "r.xlsx").exists()


# --- 7: printed ------------------------------------------------------------------------------


def print_sheet(tmp_path: Path, *records: Any, info: RunInfo = INFO) -> Any:
    write_report(tmp_path / "r.xlsx", stream(*records), info, USD)
    return openpyxl.load_workbook(tmp_path / "r.xlsx")["Print"]


def test_print_sheet_is_at_full_size_never_squeezed(tmp_path: Path) -> None:
    """Print: landscape at 100 %, no fit to a page (no squeeze), header and row repeated,
    grid lines on."""
    sheet = print_sheet(tmp_path, record())
    assert sheet.page_setup.orientation == "landscape"
    assert sheet.page_setup.scale == 100
    assert not sheet.sheet_properties.pageSetUpPr.fitToPage
    assert sheet.page_setup.fitToHeight in (None, 1)  # openpyxl's default, unused without fit
    assert sheet.print_title_rows == "$1:$1"
    assert sheet.print_title_cols == "$A:$A"
    assert sheet.print_options.gridLines


def test_print_sheet_has_human_titles_with_the_auditors_columns_first(tmp_path: Path) -> None:
    """Titles are words, money titles carry the currency; the auditor's columns come first."""
    sheet = print_sheet(tmp_path, record())
    titles = [cell.value for cell in sheet[1]]
    assert titles[:8] == [
        "Row", "Card", "Reference", "Status", "Amount (USD)", "Fee (USD)",
        "Total charged (USD)", "Error",
    ]  # fmt: skip
    assert titles[-1] == "department"
    assert not any("_" in str(title) for title in titles[:-1])
    assert all(cell.alignment.wrap_text for cell in sheet[1])


def test_print_sheet_pages_fit_a4_and_letter_at_100_percent(tmp_path: Path) -> None:
    """Each page's columns (column breaks, the repeated row number) fit the printable width of
    landscape Letter, the narrower of Letter and A4; the first page holds the auditor's."""
    info = RunInfo("k", "uncash", "job.csv", extra_columns=("department", "cost_centre", "note"))
    sheet = print_sheet(tmp_path, record(), info=info)
    widths = [sheet.column_dimensions[chr(65 + n)].width for n in range(sheet.max_column)]
    breaks = [b.id for b in sheet.col_breaks.brk]
    assert breaks[0] == 8
    starts = [0, *breaks]
    ends = [*breaks, len(widths)]
    for number, (start, end) in enumerate(zip(starts, ends, strict=True)):
        page = widths[start:end] if number == 0 else [widths[0], *widths[start:end]]
        assert sum(column_pixels(w) for w in page) <= PRINTABLE_PIXELS["landscape"], number
    assert PRINTABLE_PIXELS["landscape"] <= (11.0 - 0.6) * 96  # Letter; A4 is 11.69 in wide


def test_print_sheet_wraps_errors_in_taller_rows(tmp_path: Path) -> None:
    """A long error wraps in its column and its row is tall enough; other rows say they are
    one line tall (else LibreOffice grows rows whose wrapped text would fit)."""
    error = "gave up after 4 attempts: the card's deposit did not move: the topup was not applied"
    sheet = print_sheet(tmp_path, record(1, status=RowStatus.FAILED, error=error), record(2))
    titles = [cell.value for cell in sheet[1]]
    cell = sheet.cell(row=2, column=titles.index("Error") + 1)
    assert cell.value == error
    assert cell.alignment.wrap_text
    assert sheet.row_dimensions[2].height >= 45
    assert sheet.row_dimensions[3].height == 15


def test_print_sheet_stops_past_its_limit_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past PRINT_MAX_ROWS the sheet ends with a line saying Results holds every row, and the
    Summary says the Print sheet is partial."""
    monkeypatch.setattr(report_printed, "PRINT_MAX_ROWS", 2)
    sheet = print_sheet(tmp_path, *(record(n) for n in range(1, 5)))
    values = [[c.value for c in row] for row in sheet.iter_rows(min_row=2)]
    assert [row[0] for row in values[:2]] == [1, 2]
    assert "Results holds every row" in values[2][1]
    assert "Results holds every row" in xlsx_summary(tmp_path / "r.xlsx")["Print sheet"]
    assert len(RESULT_COLUMNS) == 17
