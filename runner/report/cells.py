"""Cells and sheets of the xlsx report, whatever the sheet: shared styles, number formats,
text made safe for a cell (explicit string cells, cut to Excel's limit), page setup and heads.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any, Final

import structlog
from openpyxl.cell.cell import ERROR_CODES, ILLEGAL_CHARACTERS_RE, WriteOnlyCell
from openpyxl.styles import Alignment, Border, Font, PatternFill, Side
from openpyxl.utils import get_column_letter
from openpyxl.worksheet.page import PageMargins
from openpyxl.worksheet.properties import PageSetupProperties

from runner.domain import RunInfo
from runner.report.rows import MONEY_COLUMNS, SANDBOX_NOTICE, Seconds, Value, utc

log = structlog.get_logger("runner.report")

# Excel's limit on the text of one cell, counted as Excel counts: in UTF-16 code units.
MAX_CELL_CHARS: Final = 32_767

MONEY_FORMAT: Final = "#,##0.00"
TIME_FORMAT: Final = "yyyy-mm-dd hh:mm:ss"
SECONDS_FORMAT: Final = "#,##0.0"

# Styles are made once and shared: a cell only points at them. A font always names Calibri, the
# workbook's default, or LibreOffice falls back to a serif for the header.
HEADER_FONT: Final = Font(name="Calibri", size=11, bold=True)
HEADER_FILL: Final = PatternFill("solid", fgColor="D9E1F2")
HEADER_BORDER: Final = Border(bottom=Side(style="thin", color="8EA9DB"))
TITLE_FONT: Final = Font(name="Calibri", size=13, bold=True)
RIGHT: Final = Alignment(horizontal="right")
WRAP: Final = Alignment(wrap_text=True, vertical="top")
# Headers of columns holding numbers sit right, over their values.
NUMERIC_HEADERS: Final = frozenset(
    {"row", "attempts", "started_at", "finished_at", "rows", "fee", "total charged", *MONEY_COLUMNS}
)
# Paper: A4 and US Letter alike. The printable width at 100 % is the narrower paper's (Letter,
# 11 in landscape, 8.5 in portrait) less the margins; a column of width w takes 7w + 5 pixels
# at 96 per inch (Calibri 11's digit is 7 pixels wide).
SIDE_MARGIN: Final = 0.3  # inches
PRINTABLE_PIXELS: Final = {
    "landscape": int((11.0 - 2 * SIDE_MARGIN) * 96),
    "portrait": int((8.5 - 2 * SIDE_MARGIN) * 96),
}


def column_pixels(width: float) -> int:
    """The pixels a column of `width` characters takes on screen and, at 100 %, on paper."""
    return int(width * 7 + 5)


def money_format(currency: str) -> str:
    """Two decimals, with the currency code after the number where it is known."""
    return f'{MONEY_FORMAT} "{currency}"' if currency.isalnum() else MONEY_FORMAT


def _xlsx_text(text: str) -> str:
    # openpyxl refuses control characters outright; a provider's error text may carry some.
    return str(ILLEGAL_CHARACTERS_RE.sub("", text))


def _cut_marker(characters: int) -> str:
    return f"… [cut: {characters} characters; a CSV report and the ledger hold all]"


def fitted(text: str, *, sheet: str, row: object, column: str, quiet: bool = False) -> str:
    """`text` ready for a cell (control characters dropped), cut to Excel's limit with a
    visible marker if it is longer, and the cut logged. Excel would refuse to open the file
    otherwise, and openpyxl does not check. `quiet`: a cut already logged for another sheet."""
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
    if not quiet:
        log.warning("report.cell_cut", sheet=sheet, row=row, column=column, characters=len(text))
    return head + marker


def text_cell(ws: Any, text: str) -> Any:
    """A cell holding `text` as a string whatever it looks like: openpyxl would make a formula
    of "=..." and an error value of "#N/A"; a string cell (t="inlineStr") is never either,
    so no guard character is needed and the text stays exactly the job's."""
    cell = WriteOnlyCell(ws, value=text)
    cell.data_type = "s"
    return cell


def needs_text_cell(text: str) -> bool:
    """Whether openpyxl would store `text` as anything but a string."""
    return text.startswith("=") or text in ERROR_CODES


def header_cells(ws: Any, names: list[str] | tuple[str, ...]) -> list[Any]:
    cells = []
    for index, name in enumerate(names, start=1):
        cell = text_cell(ws, fitted(name, sheet=ws.title, row=1, column=get_column_letter(index)))
        cell.font = HEADER_FONT
        cell.fill = HEADER_FILL
        cell.border = HEADER_BORDER
        # A money title may carry its currency: "amount (USD)".
        if name in NUMERIC_HEADERS or name.split(" (")[0] in NUMERIC_HEADERS:
            cell.alignment = RIGHT
        cells.append(cell)
    return cells


def xlsx_value(ws: Any, value: Value, money: str = MONEY_FORMAT) -> Any:
    if value is None or value == "":
        return None
    if isinstance(value, Decimal):
        # openpyxl writes Decimal as a number ("%.16g"), exact for cent amounts below 1e14.
        cell = WriteOnlyCell(ws, value=value)
        cell.number_format = SECONDS_FORMAT if isinstance(value, Seconds) else money
        return cell
    if isinstance(value, datetime):
        cell = WriteOnlyCell(ws, value=utc(value))
        cell.number_format = TIME_FORMAT
        return cell
    if isinstance(value, int):
        return value
    text = _xlsx_text(value)
    return text_cell(ws, text) if needs_text_cell(text) else text


def new_sheet(
    workbook: Any,
    title: str,
    widths: list[float] | tuple[float, ...],
    *,
    landscape: bool = True,
    fit_width: bool = True,
) -> Any:
    ws = workbook.create_sheet(title)
    # Write-only sheets take layout only before their first row is written.
    for index, width in enumerate(widths, start=1):
        ws.column_dimensions[get_column_letter(index)].width = width
    ws.freeze_panes = "A2"
    ws.page_setup.orientation = "landscape" if landscape else "portrait"
    if fit_width:
        # A sheet laid out to fit its paper: one page wide, as many tall as needed.
        ws.page_setup.fitToWidth = 1
        ws.page_setup.fitToHeight = 0
        ws.sheet_properties.pageSetUpPr = PageSetupProperties(fitToPage=True)
    else:
        ws.page_setup.scale = 100
        ws.sheet_properties.pageSetUpPr = PageSetupProperties(fitToPage=False)
    ws.page_margins = PageMargins(
        left=SIDE_MARGIN, right=SIDE_MARGIN, top=0.7, bottom=0.6, header=0.3, footer=0.3
    )
    ws.print_title_rows = "1:1"
    return ws


def running_heads(ws: Any, info: RunInfo) -> None:
    """Page header and footer of a printed sheet: which run, which page, and SANDBOX if so."""
    # In header and footer text "&" starts a code; the run key's own must be doubled.
    ws.oddHeader.left.text = f"{info.provider} · {info.run_key[:80]}".replace("&", "&&")
    ws.oddHeader.right.text = "&A"
    if info.is_sandbox:
        ws.oddHeader.center.text = SANDBOX_NOTICE
        ws.oddHeader.center.font = "Calibri,Bold"
        ws.oddHeader.center.color = "C00000"
    ws.oddFooter.center.text = "Page &P of &N"
