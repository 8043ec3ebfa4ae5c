"""The xlsx report's `Print` sheet: the Results rows laid out for paper, readable at 100 %.

Results keeps the contract's column names in its header row (CSV and xlsx readers rely on
them) and every column on one screen. Printed, that meant 18 columns at a third of their size.
`Print` holds the same rows with human titles, the columns an auditor checks first on the first
page width (row, card, reference, status, amount, fee, total charged, error, wrapped), and the
rest on the pages that follow (the row number repeated at the left of each). Money titles carry
the run's currency. Past `PRINT_MAX_ROWS` rows nobody prints: the sheet stops there and says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from openpyxl.cell.cell import WriteOnlyCell
from openpyxl.styles import Alignment
from openpyxl.utils import get_column_letter
from openpyxl.worksheet.pagebreak import Break

from runner.domain import RowStatus
from runner.report.cells import (
    HEADER_BORDER,
    HEADER_FILL,
    HEADER_FONT,
    MONEY_FORMAT,
    PRINTABLE_PIXELS,
    TIME_FORMAT,
    column_pixels,
    fitted,
    needs_text_cell,
    new_sheet,
    text_cell,
)
from runner.report.rows import MONEY_COLUMNS, RESULT_COLUMNS, Value, utc
from runner.report.status import STATUS_COLOURS, status_rule

PRINT_SHEET: Final = "Print"
# About 150 pages. Writing Print costs as much per row as Results (5,000 rows: about a
# second), so a million-row report stops paying for it here. A module variable (not Final)
# so that tests can lower it.
PRINT_MAX_ROWS = 5_000
_LINE_HEIGHT: Final = 15.0  # points: Calibri 11's row
_MAX_LINES: Final = 8
_HEADER_WRAP: Final = Alignment(wrap_text=True, vertical="bottom")
_HEADER_WRAP_RIGHT: Final = Alignment(wrap_text=True, vertical="bottom", horizontal="right")
_WRAP_TOP: Final = Alignment(wrap_text=True, vertical="top")
_TOP: Final = Alignment(vertical="top")
# LibreOffice and Excel round column widths differently: each page keeps this many pixels spare.
_SLACK: Final = 24


@dataclass(frozen=True, slots=True)
class PrintColumn:
    key: str  # the Results column it shows
    title: str
    width: float
    wrap: bool = False


# The first page width: what an auditor checks row by row. Sized so that with the error column
# they fill a landscape Letter page (the narrower of Letter and A4) at 100 %.
_FIRST: Final = (
    PrintColumn("row", "Row", 5),
    PrintColumn("card_id", "Card", 37),
    PrintColumn("reference", "Reference", 14, wrap=True),
    PrintColumn("status", "Status", 13),
    PrintColumn("amount", "Amount", 12),
    PrintColumn("fee", "Fee", 10),
    PrintColumn("total_charged", "Total charged", 12),
    PrintColumn("error", "Error", 30, wrap=True),
)
_REST: Final = (
    PrintColumn("transaction_id", "Transaction", 37, wrap=True),
    PrintColumn("invoice_id", "Invoice", 14, wrap=True),
    PrintColumn("card_balance_before", "Card balance before", 13),
    PrintColumn("card_balance_after", "Card balance after", 13),
    PrintColumn("wallet_balance_after", "Wallet balance after", 14),
    PrintColumn("attempts", "Attempts", 9),
    PrintColumn("started_at", "Started (UTC)", 19),
    PrintColumn("finished_at", "Finished (UTC)", 19),
)
_RIGHT_KEYS: Final = frozenset({"row", "attempts", "started_at", "finished_at", *MONEY_COLUMNS})


def print_columns(extra_columns: tuple[str, ...], currency: str) -> list[PrintColumn]:
    """The Print sheet's columns in order: the auditor's, the rest, then the job's extras."""
    suffix = f" ({currency})" if currency else ""
    columns = [
        PrintColumn(c.key, c.title + suffix, c.width, c.wrap) if c.key in MONEY_COLUMNS else c
        for c in (*_FIRST, *_REST)
    ]
    for index, name in enumerate(extra_columns):
        width = min(max(18.0, len(name) + 2.0), 30.0)
        columns.append(PrintColumn(f"extra:{index}", name, width, wrap=True))
    return columns


def page_groups(columns: list[PrintColumn]) -> list[list[PrintColumn]]:
    """Columns packed into page widths: the auditor's first, then as many as fit each next
    page beside the repeated row number."""
    budget = PRINTABLE_PIXELS["landscape"] - _SLACK
    repeated = column_pixels(columns[0].width)
    first = columns[: len(_FIRST)]
    groups = [first]
    used = repeated
    current: list[PrintColumn] = []
    for column in columns[len(_FIRST) :]:
        pixels = column_pixels(column.width)
        if current and used + pixels > budget:
            groups.append(current)
            current, used = [], repeated
        current.append(column)
        used += pixels
    if current:
        groups.append(current)
    return groups


class PrintSheet:
    """The Print sheet, appended row by row beside Results."""

    def __init__(self, workbook: Any, extra_columns: tuple[str, ...], currency: str) -> None:
        self.columns = print_columns(extra_columns, currency)
        self._source = [self._index(c.key) for c in self.columns]
        widths = [c.width for c in self.columns]
        ws = self._ws = new_sheet(workbook, PRINT_SHEET, widths, fit_width=False)
        ws.print_title_cols = "A:A"
        ws.print_options.gridLines = True
        ws.page_setup.pageOrder = "downThenOver"
        done = 0
        for group in page_groups(self.columns)[:-1]:
            done += len(group)
            ws.col_breaks.append(Break(id=done))
        ws.row_dimensions[1].height = 2 * _LINE_HEIGHT
        ws.append([self._title(c) for c in self.columns])
        self.rows = 0
        self.cut = False
        self._status = next(i for i, c in enumerate(self.columns) if c.key == "status")
        # One styled cell per column, its value set for each row in turn (write-only mode
        # serialises a row when it is appended).
        self._cells = [self._styled(c) for c in self.columns]

    @staticmethod
    def _index(key: str) -> int:
        if key.startswith("extra:"):
            return len(RESULT_COLUMNS) + int(key.removeprefix("extra:"))
        return RESULT_COLUMNS.index(key)

    def _title(self, column: PrintColumn) -> Any:
        cell = text_cell(self._ws, column.title)
        cell.font = HEADER_FONT
        cell.fill = HEADER_FILL
        cell.border = HEADER_BORDER
        cell.alignment = _HEADER_WRAP_RIGHT if column.key in _RIGHT_KEYS else _HEADER_WRAP
        return cell

    def _styled(self, column: PrintColumn) -> Any:
        cell = WriteOnlyCell(self._ws)
        cell.alignment = _WRAP_TOP if column.wrap else _TOP
        if column.key in MONEY_COLUMNS:
            cell.number_format = MONEY_FORMAT
        elif column.key in ("started_at", "finished_at"):
            cell.number_format = TIME_FORMAT
        return cell

    def append(self, values: list[Value]) -> None:
        if self.rows >= PRINT_MAX_ROWS:
            self.cut = True
            return
        cells: list[Any] = []
        lines = 1
        for column, source, styled in zip(self.columns, self._source, self._cells, strict=True):
            value = values[source] if source < len(values) else None
            if value is None or value == "":
                cells.append(None)
                continue
            if isinstance(value, str):
                value = fitted(value, sheet="", row=None, column="", quiet=True)
                if column.wrap:
                    lines = max(lines, _lines(value, column.width))
                if needs_text_cell(value):
                    cell = text_cell(self._ws, value)
                    cell.alignment = _WRAP_TOP if column.wrap else _TOP
                    cells.append(cell)
                    continue
            styled.value = utc(value) if isinstance(value, datetime) else value
            cells.append(styled)
        self.rows += 1
        # Every row says its height: Excel does not grow a row for wrapped text when opening a
        # file, and LibreOffice grows rows whose text would fit. Dropped once written.
        index = self.rows + 1
        self._ws.row_dimensions[index].height = _LINE_HEIGHT * min(lines, _MAX_LINES)
        self._ws.append(cells)
        del self._ws.row_dimensions[index]

    def close(self) -> None:
        if self.cut:
            note = (
                f"… rows after the first {PRINT_MAX_ROWS:,} are not on this sheet: "
                "Results holds every row"
            )
            self._ws.append([None, text_cell(self._ws, note)])
        if self.rows:
            column = get_column_letter(self._status + 1)
            for status in STATUS_COLOURS:
                self._ws.conditional_formatting.add(
                    f"{column}2:{column}{self.rows + 1}", status_rule(RowStatus(status))
                )


def _lines(text: str, width: float) -> int:
    """How many lines `text` takes wrapped in a column `width` digits wide (most letters are
    narrower than a digit, capitals and a few others wider: about even over a line)."""
    per_line = max(1, int(width))
    return sum(len(part) // per_line + 1 for part in text.splitlines() or [""])


def print_note(sheet: PrintSheet) -> tuple[str, Value] | None:
    """The Summary's line about the Print sheet, when it does not hold every row."""
    if not sheet.cut:
        return None
    return ("Print sheet", f"the first {PRINT_MAX_ROWS:,} rows; Results holds every row")
