"""The xlsx report's `Summary` sheet: the run's lines as item | value (numbers as numbers,
money in the run's currency), the table of totals by status, and subtotals by a job column.
"""

from __future__ import annotations

from typing import Any, Final

from openpyxl.cell.cell import WriteOnlyCell
from openpyxl.styles import Border, Font, PatternFill, Side

from runner.domain import RowStatus, RunInfo
from runner.report.cells import (
    HEADER_FONT,
    TITLE_FONT,
    fitted,
    header_cells,
    money_format,
    text_cell,
    xlsx_value,
)
from runner.report.rows import (
    SANDBOX_NOTICE,
    SUBTOTAL_STATUS_ALL,
    SUMMARY_HEADER,
    Figures,
    Subtotals,
    Totals,
    summary_lines,
)
from runner.report.status import STATUS_ORDER, status_cell

# Money titles carry the currency ("total charged (USDT)"), so their columns are wider than
# 9,999,999.99 USDT needs. Portrait Letter holds these at 100 %.
SUMMARY_WIDTHS: Final = (33, 18, 17, 14, 21)
# With subtotals, one more column: the group's value comes before the status (landscape).
SUBTOTAL_WIDTHS: Final = (33, 18, 17, 17, 21, 21)
_SANDBOX_FONT: Final = Font(name="Calibri", size=14, bold=True, color="9C0006")
_SANDBOX_FILL: Final = PatternFill("solid", fgColor="FFC7CE")
_TOTAL_FONT: Final = HEADER_FONT
_TOTAL_BORDER: Final = Border(top=Side(style="thin"), bottom=Side(style="double"))
_BY_STATUS_TITLE: Final = "Totals by status"


def _money_header(name: str, currency: str) -> str:
    return f"{name} ({currency})" if currency else name


def write_summary(
    ws: Any,
    info: RunInfo,
    totals: Totals,
    sheets: int,
    figures: Figures,
    subtotals: Subtotals | None,
) -> None:
    """The run's lines as item | value, then the tables of totals by status and by group."""
    width = len(SUBTOTAL_WIDTHS if subtotals is not None else SUMMARY_WIDTHS)
    money = money_format(figures.currency)
    ws.append(header_cells(ws, SUMMARY_HEADER))
    for key, value in summary_lines(info, totals, sheets, figures, subtotals):
        if key == SANDBOX_NOTICE:
            # A banner across the whole sheet, in the first line under the header.
            banner = [WriteOnlyCell(ws, value=key), *(WriteOnlyCell(ws) for _ in range(width - 1))]
            for cell in banner:
                cell.font = _SANDBOX_FONT
                cell.fill = _SANDBOX_FILL
            ws.append(banner)
        else:
            fitted_key = fitted(key, sheet=ws.title, row=key[:80], column="item")
            if isinstance(value, str):
                value = fitted(value, sheet=ws.title, row=key[:80], column="value")
            ws.append([xlsx_value(ws, fitted_key), xlsx_value(ws, value, money)])
    currency = figures.currency
    ws.append([])
    _title(ws, _BY_STATUS_TITLE)
    names = ("amount", "fee", "total charged")
    ws.append(header_cells(ws, ("status", "rows", *(_money_header(n, currency) for n in names))))
    for status in STATUS_ORDER:
        ws.append(
            [
                status_cell(ws, status),
                totals.by_status[status],
                xlsx_value(ws, totals.amount_by_status[status], money),
                xlsx_value(ws, totals.fee_by_status[status], money),
                xlsx_value(ws, totals.charged_by_status[status], money),
            ]
        )
    ws.append(_total_line(ws, "all rows", totals.rows, totals, money))
    if subtotals is not None and not subtotals.overflow:
        _write_subtotals(ws, subtotals, money, currency)


def _title(ws: Any, text: str) -> None:
    title = text_cell(ws, text)
    title.font = TITLE_FONT
    ws.append([title])


def _total_line(ws: Any, label: str, rows: int, totals: Totals, money: str) -> list[Any]:
    line = [
        text_cell(ws, label),
        WriteOnlyCell(ws, value=rows),
        *(WriteOnlyCell(ws, value=v) for v in (totals.amount, totals.fee, totals.charged)),
    ]
    for index, cell in enumerate(line):
        cell.font = _TOTAL_FONT
        cell.border = _TOTAL_BORDER
        if index >= 2:
            cell.number_format = money
    return line


def _write_subtotals(ws: Any, subtotals: Subtotals, money: str, currency: str) -> None:
    ws.append([])
    _title(ws, f"Subtotals by {subtotals.column}")
    names = ("amount", "fee", "total charged")
    header = (subtotals.column, "status", "rows", *(_money_header(n, currency) for n in names))
    ws.append(header_cells(ws, header))
    for group, status, rows, amount, fee, charged in subtotals.lines():
        group = fitted(group, sheet=ws.title, row=group[:80], column=subtotals.column)
        if status == SUBTOTAL_STATUS_ALL:
            cells = [text_cell(ws, group), text_cell(ws, "all rows"), WriteOnlyCell(ws, rows)]
            for value in (amount, fee, charged):
                cell = WriteOnlyCell(ws, value=value)
                cell.number_format = money
                cells.append(cell)
            for cell in cells:
                cell.font = _TOTAL_FONT
                cell.border = _TOTAL_BORDER
            ws.append(cells)
        else:
            ws.append(
                [
                    text_cell(ws, group),
                    status_cell(ws, RowStatus(status)),
                    rows,
                    *(xlsx_value(ws, v, money) for v in (amount, fee, charged)),
                ]
            )
