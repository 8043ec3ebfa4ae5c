"""A workbook job (`.xlsx`) into the same table of text cells a CSV job gives, streamed with
openpyxl's read-only parser: what Excel stores in a cell (binary doubles, numbers for ids,
formulas, dates, merged and hidden cells) judged here, each problem at its sheet and cell.

The cells come out as the text the same rows would have in a CSV (an amount of 250.1 is
"250.10"), so that a workbook and the CSV of its rows are one job with one digest.
"""

from __future__ import annotations

import io
import math
import warnings
import zipfile
from datetime import date, datetime, time, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

import openpyxl
import pandas as pd
from openpyxl.utils import get_column_letter, range_boundaries
from openpyxl.worksheet._read_only import ReadOnlyWorksheet
from openpyxl.worksheet._reader import FORMULA_TAG, WorkSheetParser

from runner.errors import JobInvalid
from runner.jobs.columns import JobReading, Located, rename_headers
from runner.jobs.table import KNOWN_COLUMNS, REQUIRED_COLUMNS, Table

# Excel's own limits: a sheet has at most 1,048,576 rows and a cell at most 32,767 characters.
MAX_SHEET_ROWS = 1_048_576
MAX_CELL_CHARS = 32_767
# A job's header: far above any payroll export, and each column is a list of a row's cells.
MAX_HEADER_COLUMNS = 1_000
# Any one part of the archive, uncompressed (zipfile never inflates past the declared size).
MAX_PART_BYTES = 1024 * 1024 * 1024
# An amount cell is a binary double: taken only within this of a whole cent (250.1 is
# 250.09999999999999431566..., 0.1 + 0.2 is 0.30000000000000004), then as that exact cent.
CENT_TOLERANCE = Decimal("1e-9")
# Integers a double holds exactly, digit for digit, as Excel shows them (15 digits).
_EXACT_DIGITS = 15
_OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
_TRUE = ("1", "true")


class _SheetParser(WorkSheetParser):  # type: ignore[misc]
    """openpyxl's streaming sheet parser, told to keep what read-only mode drops: whether a
    cell holds a formula (its cached value is what is read) and whether a row is hidden."""

    def parse_cell(self, element: Any) -> dict[str, Any]:
        cell: dict[str, Any] = super().parse_cell(element)
        if element.find(FORMULA_TAG) is not None:
            cell["formula"] = True
        return cell

    def parse_row(self, row: Any) -> tuple[int, bool, list[dict[str, Any]]]:
        written = row.get("r")
        previous = int(getattr(self, "row_counter", 0))
        number = int(float(written)) if written is not None else previous + 1
        if number > MAX_SHEET_ROWS or number < 1:
            raise _TooLarge(f"has a row numbered {number:,}")
        self.row_counter, self.col_counter = number, 0
        hidden = row.get("hidden", "").lower() in _TRUE
        return number, hidden, [self.parse_cell(element) for element in row]


class _TooLarge(Exception):
    """The sheet goes past what a job may hold."""


def read_xlsx(
    data: bytes, problems: Located, reading: JobReading
) -> tuple[Table | None, list[str]]:
    """The chosen sheet's table, and notes for `check` (hidden rows read)."""
    if data.startswith(_OLE_MAGIC):
        problems.fail(
            "is a password-protected workbook or an old .xls file: save it as an unprotected "
            "Excel Workbook (.xlsx)"
        )
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        large = [info for info in archive.infolist() if info.file_size > MAX_PART_BYTES]
    except (zipfile.BadZipFile, OSError, ValueError):
        problems.fail("is not an .xlsx workbook (not a zip archive): save it as .xlsx or CSV")
    if large:
        problems.fail(
            f"has a part ({large[0].filename}) of {large[0].file_size:,} bytes uncompressed: "
            f"a workbook part may be at most {MAX_PART_BYTES // 2**20} MiB"
        )
    with warnings.catch_warnings():
        # openpyxl warns of styles and extensions it drops; none of them touches a value.
        warnings.simplefilter("ignore")
        try:
            book = openpyxl.load_workbook(
                io.BytesIO(data), read_only=True, data_only=True, keep_links=False
            )
        except Exception as exc:  # any failure of a third-party parser on a hostile file
            problems.fail(f"cannot be read as an .xlsx workbook ({type(exc).__name__}: {exc})")
        try:
            return _read_sheet(book, problems, reading)
        finally:
            book.close()


def _read_sheet(
    book: openpyxl.Workbook, problems: Located, reading: JobReading
) -> tuple[Table | None, list[str]]:
    names: list[str] = book.sheetnames
    if not names:
        problems.fail("has no sheets")
    if reading.sheet is None:
        name = names[0]
    else:
        found = [n for n in names if n.strip().lower() == reading.sheet.lower()]
        if not found:
            listed = ", ".join(f'"{n}"' for n in names)
            problems.fail(f'has no sheet "{reading.sheet}" (its sheets: {listed})')
        name = found[0]
    sheet = book[name]
    problems.file = f'{problems.file}, sheet "{name}"'
    if not isinstance(sheet, ReadOnlyWorksheet):
        problems.fail("is a chart sheet, not a table: name the sheet to read with --sheet")
    if reading.sheet is None and sheet.sheet_state != "visible":
        problems.fail("is the first sheet but hidden: name the sheet to read with --sheet")
    others = [n for n in names if n != name]
    hint = f" (other sheets: {', '.join(others)}; name one with --sheet)" if others else ""
    reader = _Rows(problems, reading, hint)
    try:
        with sheet._get_source() as source:
            parser = _SheetParser(
                source,
                sheet._shared_strings,
                data_only=True,
                epoch=book.epoch,
                date_formats=book._date_formats,
                timedelta_formats=book._timedelta_formats,
            )
            for number, hidden, cells in parser.parse():
                reader.row(number, hidden, cells)
    except _TooLarge as exc:
        problems.fail(f"{exc}: a sheet holds at most {MAX_SHEET_ROWS:,} rows")
    except JobInvalid:
        raise
    except Exception as exc:  # a malformed sheet: any error of the XML or cell parser
        problems.fail(f"cannot be read ({type(exc).__name__}: {exc})")
    return reader.table(parser.merged_cells, parser.column_dimensions)


class _Rows:
    """The sheet's rows as they stream by: the header first, then one text per cell."""

    def __init__(self, problems: Located, reading: JobReading, hint: str) -> None:
        self.problems = problems
        self.reading = reading
        self.hint = hint  # where else a job may be, for a sheet that holds none
        self.header_row = 0
        self.width = 0
        self.keys: list[str] = []
        self.names: list[str] = []
        self.columns: list[list[str] | None] = []
        self.sheet_rows: list[int] = []
        self.hidden: list[int] = []
        self.noted: dict[int, list[tuple[str | None, str]]] = {}
        self.judged: set[tuple[int, str]] = set()
        self.stray: dict[int, int] = {}  # column number -> first row with a value, no header

    def row(self, number: int, hidden: bool, cells: list[dict[str, Any]]) -> None:
        if not self.header_row:
            if any(not _blank(cell) for cell in cells):
                self._header(number, cells)
            return
        texts: dict[int, str] = {}
        notes: list[tuple[str, str]] = []
        for cell in cells:
            column = cell["column"]
            if column > self.width or self.columns[column - 1] is None:
                if not _blank(cell):
                    self.stray.setdefault(column, number)
                continue
            key = self.keys[column - 1]
            text, message = _cell_text(cell, key, self.reading.numeric_card_ids)
            if message is not None:
                notes.append((key, message))
            elif text.strip():
                texts[column] = text
        if not texts and not notes:
            return  # a blank row, wherever it is
        position = len(self.sheet_rows)
        self.sheet_rows.append(number)
        if hidden:
            self.hidden.append(number)
        for column, values in enumerate(self.columns, start=1):
            if values is not None:
                values.append(texts.get(column, ""))
        if notes:
            self.noted[position] = list(notes)
            self.judged.update((position, key) for key, _ in notes)

    def _header(self, number: int, cells: list[dict[str, Any]]) -> None:
        self.header_row = number
        named = [cell for cell in cells if not _blank(cell)]
        self.width = max(cell["column"] for cell in named)
        if self.width > MAX_HEADER_COLUMNS:
            self.problems.fail(
                f"its header (row {number}) runs to column {get_column_letter(self.width)}: "
                f"a job may have at most {MAX_HEADER_COLUMNS:,} columns"
            )
        names = [""] * self.width
        for cell in named:
            names[cell["column"] - 1] = _cell_text(cell, "", False)[0].strip()
        names = rename_headers(names, self.reading.columns, self.problems)
        self.keys = [name.lower() for name in names]
        self.names = names
        blocking = False
        for key in dict.fromkeys(k for k in self.keys if k):
            count = self.keys.count(key)
            if count > 1:
                self.problems.add(
                    f'column "{key}" appears {count} times in the header (row {number}): keep one',
                    column=key,
                )
                blocking = blocking or key in KNOWN_COLUMNS
        for key in REQUIRED_COLUMNS:
            if key not in self.keys:
                found = ", ".join(n for n in names if n) or "nothing"
                self.problems.add(
                    f'missing required column "{key}" in the header, row {number} '
                    f"(found: {found}){self.hint}",
                    column=key,
                )
                blocking = True
        if blocking:
            self.problems.raise_if_any()
        for position, key in enumerate(self.keys):
            first = key and self.keys.index(key) == position
            self.columns.append([] if first else None)
            if first and key in KNOWN_COLUMNS:
                self.problems.letters[key] = get_column_letter(position + 1)

    def table(self, merged: Any, dimensions: dict[str, dict[str, str]]) -> tuple[Table, list[str]]:
        if not self.header_row:
            self.problems.fail(f"is empty: a job sheet needs a header row and rows{self.hint}")
        last = self.sheet_rows[-1] if self.sheet_rows else self.header_row
        for cell in getattr(merged, "mergeCell", None) or ():
            low_column, low_row, _, high_row = range_boundaries(cell.ref)
            if low_row <= last and high_row >= self.header_row and low_column <= self.width:
                self.problems.add(
                    f"cells {cell.ref} are merged: a merged cell keeps one value for several "
                    "rows or columns; unmerge them and give each row its own values"
                )
        for stray, number in sorted(self.stray.items()):
            letter = get_column_letter(stray)
            self.problems.add(
                f"column {letter} has values (first: cell {letter}{number}) but no name in "
                f"the header (row {self.header_row})"
            )
        self.problems.sheet_rows = self.sheet_rows
        notes = []
        if self.hidden:
            more = ", ..." if len(self.hidden) > 10 else ""
            shown = ", ".join(map(str, self.hidden[:10])) + more
            notes.append(
                f"{len(self.hidden):,} hidden row(s) were read and will be paid like the "
                f"others (sheet rows {shown}); unhide them to see what is paid"
            )
        hidden_columns = _hidden_columns(dimensions, self.width)
        if hidden_columns:
            notes.append(f"hidden column(s) {', '.join(hidden_columns)} were read")

        def column(key: str) -> pd.Series[str] | None:
            if key not in self.keys:
                return None
            values = self.columns[self.keys.index(key)]
            return pd.Series(values, dtype=str)

        card_id, amount = column("card_id"), column("amount")
        # Required columns: the header was checked.
        assert card_id is not None
        assert amount is not None
        extras = [
            (self.names[position], pd.Series(values, dtype=str))
            for position, values in enumerate(self.columns)
            if values is not None and self.keys[position] not in KNOWN_COLUMNS
        ]
        table = Table(
            card_id=card_id,
            amount=amount,
            reference=column("reference"),
            currency=column("currency"),
            extras=extras,
            noted=self.noted,
            judged=self.judged,
        )
        return table, notes


def _hidden_columns(dimensions: dict[str, dict[str, str]], width: int) -> list[str]:
    hidden: list[str] = []
    for attrs in dimensions.values():
        if attrs.get("hidden", "").lower() in _TRUE:
            low, high = int(attrs.get("min", 0)), min(int(attrs.get("max", 0)), width)
            hidden.extend(get_column_letter(n) for n in range(max(low, 1), high + 1))
    return hidden


def _blank(cell: dict[str, Any]) -> bool:
    value = cell["value"]
    if value is None:
        return not cell.get("formula")
    return isinstance(value, str) and not value.strip()


def _cell_text(cell: dict[str, Any], key: str, numeric_ids: bool) -> tuple[str, str | None]:
    """The text of one cell for column `key`, or "" and why it cannot be used."""
    value, kind = cell["value"], cell["data_type"]
    if value is None:
        if cell.get("formula"):
            return "", (
                "is a formula with no saved result (the program that wrote the file did not "
                "calculate it): open and save the workbook in Excel or LibreOffice"
            )
        return "", None
    if kind == "s" or (isinstance(value, str) and kind not in ("e", "n")):
        text = str(value)
        if len(text) > MAX_CELL_CHARS:
            return "", f"holds {len(text):,} characters: a cell holds at most {MAX_CELL_CHARS:,}"
        return text, None
    if kind == "e":
        if key in KNOWN_COLUMNS:
            return "", f"holds the error {value}: correct the formula or the value"
        return str(value), None
    if isinstance(value, bool):
        shown = "TRUE" if value else "FALSE"
        if key in ("card_id", "amount"):
            return "", f"holds {shown}, a true/false value, not {_what(key)}"
        return shown, None
    if isinstance(value, datetime | date | time | timedelta):
        shown = _date_text(value)
        if key in ("card_id", "amount"):
            return "", f"holds a date or time ({shown}), not {_what(key)}: format it as a number"
        return shown, None
    if isinstance(value, int | float):
        if key == "amount":
            return _amount_text(value)
        if key == "card_id":
            return _card_id_text(value, numeric_ids)
        return _number_text(value), None
    return str(value), None


def _what(key: str) -> str:
    return "an amount" if key == "amount" else "a card id"


def _date_text(value: datetime | date | time | timedelta) -> str:
    if isinstance(value, datetime) and value.time() == time():
        return value.date().isoformat()
    return str(value) if isinstance(value, timedelta) else value.isoformat()


def _amount_text(value: float) -> tuple[str, str | None]:
    """An amount cell's number as the exact two-place text it stands for, if it is one."""
    if isinstance(value, int):
        return str(value), None
    if not math.isfinite(value):
        return "", f"holds {value}, not an amount"
    exact = Decimal(value)
    cents = (exact * 100).to_integral_value(ROUND_HALF_EVEN)
    if abs(exact - cents / 100) > CENT_TOLERANCE:
        return "", (
            f"holds {value!r}, which is not a whole number of cents: round it to cents in the "
            "sheet (ROUND) or type the amount"
        )
    return f"{cents / 100:.2f}", None


def _card_id_text(value: float, numeric_ids: bool) -> tuple[str, str | None]:
    """A card id stored as a number: only an exact integer, and only where ids are numbers."""
    shown = _number_text(value)
    integral = isinstance(value, int) or (math.isfinite(value) and value.is_integer())
    if numeric_ids and integral and 0 <= value < 10**_EXACT_DIGITS:
        return str(int(value)), None
    if numeric_ids:
        why = "a number Excel cannot hold exactly (more than 15 digits, or a fraction)"
    else:
        why = "a number: leading zeros are lost and long ids rounded"
    return "", (f"holds {shown}, {why}; format the column as Text and type or paste the ids again")


def _number_text(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isfinite(value) and value.is_integer() and abs(value) < 10**_EXACT_DIGITS:
        return str(int(value))
    return repr(value)
