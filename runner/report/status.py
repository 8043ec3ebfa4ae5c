"""How a row status looks in the xlsx report: Excel's good/neutral/bad palette, the same in
Results (by conditional formatting, so rows carry no style) and in the Summary's tables."""

from __future__ import annotations

from typing import Any, Final

from openpyxl.cell.cell import WriteOnlyCell
from openpyxl.formatting.rule import CellIsRule
from openpyxl.styles import Font, PatternFill

from runner.domain import RowStatus
from runner.report.rows import STATUS_ORDER

__all__ = ["STATUS_COLOURS", "STATUS_ORDER", "status_cell", "status_rule"]

# Status colours (text, fill, bold): problems stand out, succeeded stays quiet.
STATUS_COLOURS: Final[dict[RowStatus, tuple[str, str | None, bool]]] = {
    RowStatus.SUCCEEDED: ("006100", None, False),
    RowStatus.PENDING: ("9C5700", "FFEB9C", False),
    RowStatus.FAILED: ("9C0006", "FFC7CE", True),
    RowStatus.NEEDS_REVIEW: ("843C0C", "F8CBAD", True),
    RowStatus.NOT_ATTEMPTED: ("595959", "E7E6E6", False),
}


def _fill(colour: str) -> PatternFill:
    # Both colours: a cell's solid fill reads fgColor, a conditional format's reads bgColor.
    return PatternFill("solid", fgColor=colour, bgColor=colour)


def status_rule(status: RowStatus) -> Any:
    text, fill, bold = STATUS_COLOURS[status]
    # A conditional format's font gives colour and weight only, never a name or size.
    return CellIsRule(
        operator="equal",
        formula=[f'"{status.value}"'],
        font=Font(color=text, bold=bold),
        fill=None if fill is None else _fill(fill),
    )


def status_cell(ws: Any, status: RowStatus) -> Any:
    text, fill, bold = STATUS_COLOURS[status]
    cell = WriteOnlyCell(ws, value=status.value)
    cell.font = Font(name="Calibri", size=11, color=text, bold=bold)
    if fill is not None:
        cell.fill = _fill(fill)
    return cell
