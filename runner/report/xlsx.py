"""The report as an xlsx workbook, streamed in openpyxl's write-only mode: `Results` sheets
(split past Excel's row limit, statuses coloured) and a `Summary` sheet with totals by status.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

import structlog
from openpyxl import Workbook
from openpyxl.cell.cell import ERROR_CODES, ILLEGAL_CHARACTERS_RE, WriteOnlyCell
from openpyxl.formatting.rule import CellIsRule
from openpyxl.styles import Alignment, Border, Font, PatternFill, Side
from openpyxl.utils import get_column_letter
from openpyxl.worksheet.page import PageMargins
from openpyxl.worksheet.properties import PageSetupProperties

from runner.domain import RowRecord, RowStatus, RunInfo
from runner.report.rows import (
    MONEY_COLUMNS,
    RESULT_COLUMNS,
    SANDBOX_NOTICE,
    SUMMARY_HEADER,
    SUMMARY_SHEET,
    Totals,
    Value,
    header,
    neutralise,
    results_sheet_title,
    summary_lines,
    utc,
    values,
)

log = structlog.get_logger("runner.report")

# Excel's hard limit per sheet, header row included. A module variable (not Final) so that
# tests can lower it instead of writing a million rows.
MAX_SHEET_ROWS = 1_048_576

# Excel's limit on the text of one cell, counted as Excel counts: in UTF-16 code units.
MAX_CELL_CHARS: Final = 32_767

MONEY_FORMAT: Final = "#,##0.00"
TIME_FORMAT: Final = "yyyy-mm-dd hh:mm:ss"

_TIME_COLUMNS: Final = frozenset({"started_at", "finished_at"})
# Styles are made once and shared: a cell only points at them. A font always names Calibri, the
# workbook's default, or LibreOffice falls back to a serif for the header.
_HEADER_FONT: Final = Font(name="Calibri", size=11, bold=True)
_HEADER_FILL: Final = PatternFill("solid", fgColor="D9E1F2")
_HEADER_BORDER: Final = Border(bottom=Side(style="thin", color="8EA9DB"))
_TITLE_FONT: Final = Font(name="Calibri", size=13, bold=True)
_SANDBOX_FONT: Final = Font(name="Calibri", size=14, bold=True, color="9C0006")
_SANDBOX_FILL: Final = PatternFill("solid", fgColor="FFC7CE")
_TOTAL_BORDER: Final = Border(top=Side(style="thin"), bottom=Side(style="double"))
_RIGHT: Final = Alignment(horizontal="right")
_WRAP: Final = Alignment(wrap_text=True)
# Headers of columns holding numbers sit right, over their values.
_NUMERIC_HEADERS: Final = frozenset(
    {"row", "attempts", "started_at", "finished_at", "rows", "total charged", *MONEY_COLUMNS}
)
# Status colours (text, fill, bold), Excel's good/neutral/bad palette: problems stand out,
# succeeded stays quiet. Shown by conditional formatting in Results, so rows carry no style.
_STATUS_COLOURS: Final[dict[RowStatus, tuple[str, str | None, bool]]] = {
    RowStatus.SUCCEEDED: ("006100", None, False),
    RowStatus.PENDING: ("9C5700", "FFEB9C", False),
    RowStatus.FAILED: ("9C0006", "FFC7CE", True),
    RowStatus.NEEDS_REVIEW: ("843C0C", "F8CBAD", True),
    RowStatus.NOT_ATTEMPTED: ("595959", "E7E6E6", False),
}
# The order finance reads them in: money that moved, then problems, then what never ran.
_STATUS_ORDER: Final = (
    RowStatus.SUCCEEDED,
    RowStatus.PENDING,
    RowStatus.FAILED,
    RowStatus.NEEDS_REVIEW,
    RowStatus.NOT_ATTEMPTED,
)
_STATUS_INDEX: Final = RESULT_COLUMNS.index("status")
_ERROR_INDEX: Final = RESULT_COLUMNS.index("error")
# How many characters of error text fit one line of its column (width 50), conservatively.
_ERROR_LINE_CHARS: Final = 55
_ERROR_MAX_LINES: Final = 8
_LINE_HEIGHT: Final = 15.0  # points: Calibri 11's row
_BY_STATUS_TITLE: Final = "Totals by status"
_BY_STATUS_HEADER: Final = ("status", "rows", "amount", "fee", "total charged")

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
}
_SUMMARY_WIDTHS: Final = (36, 22, 14, 14, 15)


def _xlsx_text(text: str) -> str:
    # openpyxl refuses control characters outright; a provider's error text may carry some.
    return neutralise(ILLEGAL_CHARACTERS_RE.sub("", text))


def _cut_marker(characters: int) -> str:
    return f"… [cut: {characters} characters; a CSV report and the ledger hold all]"


def _fitted(text: str, *, sheet: str, row: object, column: str) -> str:
    """`text` ready for a cell (see `_xlsx_text`), cut to Excel's limit with a visible marker
    if it is longer, and the cut logged. Excel would refuse to open the file otherwise, and
    openpyxl does not check."""
    cleaned = _xlsx_text(text)
    if len(cleaned) <= MAX_CELL_CHARS // 2:  # fits even if every character takes two units
        return cleaned
    encoded = cleaned.encode("utf-16-le")
    if len(encoded) // 2 <= MAX_CELL_CHARS:
        return cleaned
    marker = _cut_marker(len(text))
    room = MAX_CELL_CHARS - len(marker.encode("utf-16-le")) // 2
    # Cut on a code unit; "ignore" drops half a surrogate pair rather than leave it broken.
    head = encoded[: room * 2].decode("utf-16-le", errors="ignore")
    log.warning("report.cell_cut", sheet=sheet, row=row, column=column, characters=len(text))
    return head + marker


def _xlsx_header(ws: Any, names: list[str] | tuple[str, ...]) -> list[Any]:
    cells = []
    for index, name in enumerate(names, start=1):
        text = _fitted(name, sheet=ws.title, row=1, column=get_column_letter(index))
        cell = WriteOnlyCell(ws, value=text)
        cell.font = _HEADER_FONT
        cell.fill = _HEADER_FILL
        cell.border = _HEADER_BORDER
        if name in _NUMERIC_HEADERS:
            cell.alignment = _RIGHT
        cells.append(cell)
    return cells


def _fill(colour: str) -> PatternFill:
    # Both colours: a cell's solid fill reads fgColor, a conditional format's reads bgColor.
    return PatternFill("solid", fgColor=colour, bgColor=colour)


def _status_rule(status: RowStatus) -> Any:
    text, fill, bold = _STATUS_COLOURS[status]
    # A conditional format's font gives colour and weight only, never a name or size.
    return CellIsRule(
        operator="equal",
        formula=[f'"{status.value}"'],
        font=Font(color=text, bold=bold),
        fill=None if fill is None else _fill(fill),
    )


def _status_cell(ws: Any, status: RowStatus) -> Any:
    text, fill, bold = _STATUS_COLOURS[status]
    cell = WriteOnlyCell(ws, value=status.value)
    cell.font = Font(name="Calibri", size=11, color=text, bold=bold)
    if fill is not None:
        cell.fill = _fill(fill)
    return cell


def _xlsx_value(ws: Any, value: Value) -> Any:
    if value is None or value == "":
        return None
    if isinstance(value, Decimal):
        # openpyxl writes Decimal as a number ("%.16g"), exact for cent amounts below 1e14.
        cell = WriteOnlyCell(ws, value=value)
        cell.number_format = MONEY_FORMAT
        return cell
    if isinstance(value, datetime):
        cell = WriteOnlyCell(ws, value=utc(value))
        cell.number_format = TIME_FORMAT
        return cell
    if isinstance(value, int):
        return value
    text = _xlsx_text(value)
    if text in ERROR_CODES:
        # openpyxl would store "#N/A" and the like as an error value, not the text it is.
        cell = WriteOnlyCell(ws, value=text)
        cell.data_type = "s"
        return cell
    return text


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
        self._open()

    def _open(self) -> None:
        self.count += 1
        self._ws = _new_sheet(self._workbook, results_sheet_title(self.count), self._widths)
        # On paper there are no cell borders: without grid lines, 2,233,851.23 runs into the id.
        self._ws.print_options.gridLines = True
        self._ws.append(_xlsx_header(self._ws, self.header))
        self._rows = 1
        self._styled: dict[int, Any] = {}
        for index, name in enumerate(self.header[: len(RESULT_COLUMNS)]):
            if name in MONEY_COLUMNS or name in _TIME_COLUMNS:
                cell = WriteOnlyCell(self._ws)
                cell.number_format = MONEY_FORMAT if name in MONEY_COLUMNS else TIME_FORMAT
                self._styled[index] = cell
        # Error texts are long: they wrap in their column. Only rows with an error use this cell.
        self._error = WriteOnlyCell(self._ws)
        self._error.alignment = _WRAP

    def _finish(self) -> None:
        # The filter's range is known only now; write-only mode writes it when the sheet closes.
        last_column = get_column_letter(len(self.header))
        self._ws.auto_filter.ref = f"A1:{last_column}{self._rows}"
        if self._rows > 1:
            column = get_column_letter(_STATUS_INDEX + 1)
            for status in _STATUS_COLOURS:
                self._ws.conditional_formatting.add(
                    f"{column}2:{column}{self._rows}", _status_rule(status)
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
                    value = _fitted(
                        value, sheet=self._ws.title, row=values[0], column=self.header[index]
                    )
                cells.append(_xlsx_value(self._ws, value))
            else:
                cell.value = utc(value) if isinstance(value, datetime) else value
                cells.append(cell)
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
        else:  # a cell made for an error-code word such as "#N/A"
            error.alignment = _WRAP
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


def _new_sheet(
    workbook: Any, title: str, widths: list[float] | tuple[float, ...], *, landscape: bool = True
) -> Any:
    ws = workbook.create_sheet(title)
    # Write-only sheets take layout only before their first row is written.
    for index, width in enumerate(widths, start=1):
        ws.column_dimensions[get_column_letter(index)].width = width
    ws.freeze_panes = "A2"
    # Printed (or saved as PDF), every column fits across one page and the header row repeats
    # on each page, instead of a sheet cut into strips of two or three columns.
    ws.page_setup.orientation = "landscape" if landscape else "portrait"
    ws.page_setup.fitToWidth = 1
    ws.page_setup.fitToHeight = 0
    ws.sheet_properties.pageSetUpPr = PageSetupProperties(fitToPage=True)
    ws.page_margins = PageMargins(left=0.4, right=0.4, top=0.7, bottom=0.6, header=0.3, footer=0.3)
    ws.print_title_rows = "1:1"
    return ws


def _running_heads(ws: Any, info: RunInfo) -> None:
    """Page header and footer of a printed sheet: which run, which page, and SANDBOX if so."""
    # In header and footer text "&" starts a code; the run key's own must be doubled.
    ws.oddHeader.left.text = f"{info.provider} · {info.run_key[:80]}".replace("&", "&&")
    ws.oddHeader.right.text = "&A"
    if info.is_sandbox:
        ws.oddHeader.center.text = SANDBOX_NOTICE
        ws.oddHeader.center.font = "Calibri,Bold"
        ws.oddHeader.center.color = "C00000"
    ws.oddFooter.center.text = "Page &P of &N"


def _write_summary(ws: Any, info: RunInfo, totals: Totals, sheets: int) -> None:
    """The run's lines as item | value, then the table of totals by status."""
    width = len(_SUMMARY_WIDTHS)
    ws.append(_xlsx_header(ws, SUMMARY_HEADER))
    for key, value in summary_lines(info, totals, sheets):
        if key == SANDBOX_NOTICE:
            # A banner across the whole sheet, in the first line under the header.
            banner = [WriteOnlyCell(ws, value=key), *(WriteOnlyCell(ws) for _ in range(width - 1))]
            for cell in banner:
                cell.font = _SANDBOX_FONT
                cell.fill = _SANDBOX_FILL
            ws.append(banner)
        else:
            fitted_key = _fitted(key, sheet=ws.title, row=key[:80], column="item")
            if isinstance(value, str):
                value = _fitted(value, sheet=ws.title, row=key[:80], column="value")
            ws.append([_xlsx_value(ws, fitted_key), _xlsx_value(ws, value)])
    ws.append([])
    title = WriteOnlyCell(ws, value=_BY_STATUS_TITLE)
    title.font = _TITLE_FONT
    ws.append([title])
    ws.append(_xlsx_header(ws, _BY_STATUS_HEADER))
    for status in _STATUS_ORDER:
        ws.append(
            [
                _status_cell(ws, status),
                totals.by_status[status],
                _xlsx_value(ws, totals.amount_by_status[status]),
                _xlsx_value(ws, totals.fee_by_status[status]),
                _xlsx_value(ws, totals.charged_by_status[status]),
            ]
        )
    line = [
        WriteOnlyCell(ws, value="all rows"),
        WriteOnlyCell(ws, value=totals.rows),
        *(WriteOnlyCell(ws, value=v) for v in (totals.amount, totals.fee, totals.charged)),
    ]
    for index, cell in enumerate(line):
        cell.font = _HEADER_FONT
        cell.border = _TOTAL_BORDER
        if index >= 2:
            cell.number_format = MONEY_FORMAT
    ws.append(line)


def write_xlsx(tmp: Path, records: Iterable[RowRecord], info: RunInfo) -> None:
    workbook = Workbook(write_only=True)
    try:
        # Summary first, so that opening the file shows the totals and any SANDBOX notice.
        summary = _new_sheet(workbook, SUMMARY_SHEET, _SUMMARY_WIDTHS, landscape=False)
        results = _ResultsSheets(workbook, header(info))
        totals = Totals()
        for record in records:
            totals.add(record)
            results.append(values(record, info.extra_columns))
        results.close()

        _write_summary(summary, info, totals, results.count)
        for ws in workbook.worksheets:
            _running_heads(ws, info)
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
