"""The report as an xlsx workbook, streamed in openpyxl's write-only mode: `Summary` (see
`summary`), `Results` sheets (split past Excel's row limit, statuses coloured) and `Print`,
the same rows laid out for paper (see `printed`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from openpyxl import Workbook
from openpyxl.cell.cell import WriteOnlyCell
from openpyxl.utils import get_column_letter

from runner.domain import RowRecord, RunInfo
from runner.report.cells import (
    MAX_CELL_CHARS,
    MONEY_FORMAT,
    TIME_FORMAT,
    WRAP,
    fitted,
    header_cells,
    new_sheet,
    running_heads,
    xlsx_value,
)
from runner.report.chunks import write_chunks_sheet
from runner.report.digest import ResultsDigest, millis
from runner.report.printed import PRINT_SHEET, PrintSheet, print_note
from runner.report.rows import (
    MONEY_COLUMNS,
    RESULT_COLUMNS,
    SUMMARY_SHEET,
    Figures,
    Totals,
    Value,
    header,
    results_sheet_title,
    subtotals_for,
    utc,
    values,
)
from runner.report.status import STATUS_COLOURS, status_rule
from runner.report.summary import SUBTOTAL_WIDTHS, SUMMARY_WIDTHS, write_summary

__all__ = ["MAX_CELL_CHARS", "MAX_SHEET_ROWS", "MONEY_FORMAT", "TIME_FORMAT", "write_xlsx"]

# Excel's hard limit per sheet, header row included. A module variable (not Final) so that
# tests can lower it instead of writing a million rows.
MAX_SHEET_ROWS = 1_048_576

_TIME_COLUMNS: Final = frozenset({"started_at", "finished_at"})
_STATUS_INDEX: Final = RESULT_COLUMNS.index("status")
_ERROR_INDEX: Final = RESULT_COLUMNS.index("error")
# How many characters of error text fit one line of its column (width 50), conservatively.
_ERROR_LINE_CHARS: Final = 55
_ERROR_MAX_LINES: Final = 8
_LINE_HEIGHT: Final = 15.0  # points: Calibri 11's row

# Wide enough for a UUID (card and transaction ids), 9,999,999.99 and a whole timestamp, so that
# nothing shows as ##### or cut; errors wrap inside theirs.
_COLUMN_WIDTHS: Final[dict[str, float]] = {
    "row": 7,
    "card_id": 38,
    "amount": 14,
    "reference": 20,
    "status": 15,
    "fee": 13,
    "total_charged": 15,
    "card_balance_before": 21,
    "card_balance_after": 20,
    "wallet_balance_after": 22,
    "transaction_id": 38,
    "invoice_id": 16,
    "attempts": 10,
    "error": 50,
    "started_at": 20,
    "finished_at": 20,
    "currency": 10,
}


class _ResultsSheets:
    """The `Results` sheets of a workbook: the current one, and a new one when it is full.

    Write-only mode serialises each row as it is appended, so one styled cell per money or time
    column can carry every row's value in turn, saving an eighth of the time that making and
    styling 8 fresh cells a row would take.
    """

    def __init__(self, workbook: Any, header: list[str]) -> None:
        self._workbook = workbook
        self.header = header
        self._widths = [
            # A job's extra column (a name, a department) gets room for typical text.
            _COLUMN_WIDTHS.get(name, min(max(20.0, len(name) + 4.0), 40.0))
            for name in header
        ]
        self.count = 0
        self.digest = ResultsDigest()  # of the cells as written: the Summary's results digest
        self._open()

    def _open(self) -> None:
        self.count += 1
        # Printed, Results is the screen's sheet on paper: landscape at 100 %, in strips of
        # columns with the header row and the row number repeated; `Print` is the one laid
        # out for paper.
        self._ws = new_sheet(
            self._workbook, results_sheet_title(self.count), self._widths, fit_width=False
        )
        self._ws.print_title_cols = "A:A"
        # On paper there are no cell borders: without grid lines, 2,233,851.23 runs into the id.
        self._ws.print_options.gridLines = True
        cells = header_cells(self._ws, self.header)
        if self.count == 1:  # the digest has the header once, however many sheets follow
            self.digest.add_xlsx([cell.value for cell in cells])
        self._ws.append(cells)
        self._rows = 1
        self._styled: dict[int, Any] = {}
        for index, name in enumerate(self.header[: len(RESULT_COLUMNS)]):
            if name in MONEY_COLUMNS or name in _TIME_COLUMNS:
                cell = WriteOnlyCell(self._ws)
                cell.number_format = MONEY_FORMAT if name in MONEY_COLUMNS else TIME_FORMAT
                self._styled[index] = cell
        # Error texts are long: they wrap in their column. Only rows with an error use this cell.
        self._error = WriteOnlyCell(self._ws)
        self._error.alignment = WRAP

    def _finish(self) -> None:
        # The filter's range is known only now; write-only mode writes it when the sheet closes.
        last_column = get_column_letter(len(self.header))
        self._ws.auto_filter.ref = f"A1:{last_column}{self._rows}"
        if self._rows > 1:
            column = get_column_letter(_STATUS_INDEX + 1)
            for status in STATUS_COLOURS:
                self._ws.conditional_formatting.add(
                    f"{column}2:{column}{self._rows}", status_rule(status)
                )

    def append(self, values: list[Value]) -> None:
        if self._rows >= MAX_SHEET_ROWS:
            self._finish()
            self._open()
        cells = []
        for index, value in enumerate(values):
            cell = self._styled.get(index)
            if cell is None or value is None:
                if isinstance(value, str) and len(value) > MAX_CELL_CHARS // 2:
                    value = fitted(
                        value, sheet=self._ws.title, row=values[0], column=self.header[index]
                    )
                cells.append(xlsx_value(self._ws, value))
            else:
                # Times to the millisecond: what the file gives back exactly (the digest's).
                cell.value = millis(utc(value)) if isinstance(value, datetime) else value
                cells.append(cell)
        self.digest.add_xlsx([getattr(cell, "value", cell) for cell in cells])
        if cells[_ERROR_INDEX] is None:
            self._ws.append(cells)
        else:
            self._append_with_error(cells)
        self._rows += 1

    def _append_with_error(self, cells: list[Any]) -> None:
        """Append a row whose error text wraps in its column, the row tall enough to show it."""
        error = cells[_ERROR_INDEX]
        if isinstance(error, str):
            self._error.value = text = error
            cells[_ERROR_INDEX] = self._error
        else:  # a string cell made for text openpyxl would not store as one ("=...", "#N/A")
            error.alignment = WRAP
            text = error.value
        lines = sum(len(part) // _ERROR_LINE_CHARS + 1 for part in text.splitlines())
        if lines < 2:
            self._ws.append(cells)
            return
        # Neither LibreOffice nor every Excel grows a row for wrapped text when opening a file:
        # the row says its height. Dropped once written, so a million errors hold no memory.
        index = self._rows + 1
        self._ws.row_dimensions[index].height = _LINE_HEIGHT * min(lines, _ERROR_MAX_LINES)
        self._ws.append(cells)
        del self._ws.row_dimensions[index]

    def close(self) -> None:
        self._finish()


def write_xlsx(
    tmp: Path,
    records: Iterable[RowRecord],
    info: RunInfo,
    figures: Figures,
    chunks: Iterable[RowRecord] | None = None,
) -> None:
    workbook = Workbook(write_only=True)
    try:
        subtotals = subtotals_for(figures, info.extra_columns)
        # Summary first, so that opening the file shows the totals and any SANDBOX notice.
        summary = new_sheet(
            workbook,
            SUMMARY_SHEET,
            SUMMARY_WIDTHS if subtotals is None else SUBTOTAL_WIDTHS,
            landscape=subtotals is not None,
        )
        results = _ResultsSheets(workbook, header(info))
        printed = PrintSheet(workbook, info.extra_columns, figures.currency)
        totals = Totals()
        for record in records:
            totals.add(record)
            if subtotals is not None:
                subtotals.add(record)
            row = values(record, info.extra_columns, figures.currency)
            results.append(row)
            printed.append(row)
        results.close()
        totals.digest = results.digest.text()
        printed.close()
        # Print was made before any `Results 2`: it goes last, after every Results sheet.
        position = workbook.sheetnames.index(PRINT_SHEET)
        workbook.move_sheet(PRINT_SHEET, len(workbook.sheetnames) - 1 - position)
        if chunks is not None:
            write_chunks_sheet(workbook, chunks, figures.currency)  # a split run's, last

        note = print_note(printed)
        if note is not None:
            figures = Figures(figures.currency, figures.group_by, (*figures.lines, note))
        write_summary(summary, info, totals, results.count, figures, subtotals)
        for ws in workbook.worksheets:
            running_heads(ws, info)
        workbook.save(tmp)
    except BaseException:
        _discard(workbook)
        raise


def _discard(workbook: Any) -> None:
    """Close an abandoned workbook's sheets and delete the scratch files openpyxl streams to.

    Otherwise a failed million-row report leaves hundreds of MB in the temp folder until exit.
    """
    for ws in workbook.worksheets:
        writer = ws._writer
        if writer is None:
            continue
        with contextlib.suppress(Exception):
            if not ws.closed:
                ws.close()
        with contextlib.suppress(OSError, ValueError):
            writer.cleanup()
