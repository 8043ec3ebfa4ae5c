"""The digest of a report's own Results rows, on its Summary (`results digest`), and the report
read back for `topup-runner verify`.

Canonical form, so that anyone can recompute the digest from the file alone: each row of the
Results sheet(s), the header row of the first sheet included and no other header, becomes a
list of cell texts with trailing empty cells dropped, written as compact JSON (ASCII, `[..]`,
no spaces) and a newline; the digest is `sha256:` and the SHA-256 of those lines. A cell's text:

- CSV: the cell exactly as the file holds it (formula guard quote included);
- xlsx: empty for an empty cell; text as is; a number as its shortest plain decimal (`12.3`,
  `100`, never an exponent); a time as ISO 8601 to the millisecond, no zone (cells are UTC).
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal

from runner.errors import ConfigError

DIGEST_LINE = "results digest"
CHAIN_LINE = "ledger chain head"


def millis(value: datetime) -> datetime:
    """A time rounded to the millisecond: what an xlsx cell gives back exactly."""
    rounded = value.replace(microsecond=0) + timedelta(milliseconds=round(value.microsecond / 1000))
    return rounded


def xlsx_text(value: Any) -> str:
    """An xlsx cell's value (as written, or as openpyxl reads it back) in canonical text."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float | Decimal):
        number = Decimal(str(value))
        if number == number.to_integral_value():
            return str(int(number))
        return format(number.normalize(), "f")
    if isinstance(value, datetime):
        return millis(value.replace(tzinfo=None)).isoformat(timespec="milliseconds")
    return str(value)


def _line(cells: Sequence[str]) -> bytes:
    cells = list(cells)
    while cells and cells[-1] == "":
        cells.pop()
    return json.dumps(cells, separators=(",", ":"), ensure_ascii=True).encode() + b"\n"


class ResultsDigest:
    """The digest of Results rows as they are written, one row of cell texts at a time."""

    __slots__ = ("_hash",)

    def __init__(self) -> None:
        self._hash = hashlib.sha256()

    def add(self, cells: Sequence[str]) -> None:
        self._hash.update(_line(cells))

    def add_xlsx(self, values: Sequence[Any]) -> None:
        self._hash.update(_line([xlsx_text(v) for v in values]))

    def text(self) -> str:
        return f"sha256:{self._hash.hexdigest()}"


@dataclass(frozen=True, slots=True)
class ReportFile:
    """A report as read back: its Summary lines (item -> value text), its Results header, and
    its data rows (canonical cell texts, the sheet row numbers they came from)."""

    kind: Literal["xlsx", "csv"]
    summary: dict[str, str]
    header: list[str]
    rows: list[tuple[str, list[str]]]  # (where: "Results row 5", cells)
    digest: str  # recomputed from the rows as read


def read_report(path: Path) -> ReportFile:
    """The report at `path` (.xlsx, or .csv with its `<stem>.summary.csv`); ConfigError,
    one line, if it cannot be read as one."""
    suffix = path.suffix.lower()
    summary = _summary_path(path)
    for needed in (path, summary) if suffix == ".csv" else (path,):
        if not needed.is_file():
            what = "not a file" if needed.exists() else "no such file"
            beside = " (a CSV report's Summary is kept beside it)" if needed is summary else ""
            raise ConfigError(f"{needed}: cannot read the report: {what}{beside}")
    try:
        if suffix == ".xlsx":
            return _read_xlsx(path)
        if suffix == ".csv":
            return _read_csv(path)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the report: {exc.strerror or exc}") from None
    except (ValueError, KeyError, EOFError, csv.Error, InvalidOperation) as exc:
        raise ConfigError(f"{path}: not a report this program can read: {exc}") from None
    raise ConfigError(f"{path}: unknown report format; a report ends in .xlsx or .csv")


def _summary_path(path: Path) -> Path:
    return path.with_name(f"{path.stem}.summary{path.suffix}")  # as report.summary_path_for


def _read_csv(path: Path) -> ReportFile:
    with _summary_path(path).open(newline="", encoding="utf-8") as handle:
        summary = {line[0]: line[1] for line in csv.reader(handle) if len(line) >= 2}
    digest = ResultsDigest()
    header: list[str] = []
    rows: list[tuple[str, list[str]]] = []
    with path.open(newline="", encoding="utf-8") as handle:
        for number, cells in enumerate(csv.reader(handle), start=1):
            digest.add(cells)
            if number == 1:
                header = cells
            else:
                rows.append((f"line {number}", cells))
    return ReportFile("csv", summary, header, rows, digest.text())


def _read_xlsx(path: Path) -> ReportFile:
    from openpyxl import load_workbook  # only verify reads workbooks

    from runner.report.rows import SUMMARY_SHEET, results_sheet_title

    try:
        book = load_workbook(path, read_only=True, data_only=True)
    except Exception as exc:  # openpyxl raises zipfile's, KeyError, its own: all mean "not xlsx"
        raise ValueError(f"not an xlsx workbook ({type(exc).__name__})") from None
    try:
        if SUMMARY_SHEET not in book.sheetnames:
            raise ValueError(f"no {SUMMARY_SHEET} sheet")
        summary: dict[str, str] = {}
        for line in book[SUMMARY_SHEET].iter_rows(max_col=2, values_only=True):
            if line and isinstance(line[0], str):
                summary.setdefault(line[0], xlsx_text(line[1] if len(line) > 1 else None))
        digest = ResultsDigest()
        header: list[str] = []
        rows: list[tuple[str, list[str]]] = []
        for title in _results_titles(book.sheetnames, results_sheet_title):
            for number, values in enumerate(book[title].iter_rows(values_only=True), start=1):
                cells = [xlsx_text(v) for v in values]
                if number == 1:
                    if not header:
                        header = cells
                        digest.add(cells)
                    continue
                digest.add(cells)
                rows.append((f"{title} row {number}", cells))
        if not header:
            raise ValueError("no Results sheet")
        return ReportFile("xlsx", summary, header, rows, digest.text())
    finally:
        book.close()


def _results_titles(names: list[str], title: Any) -> Iterator[str]:
    number = 1
    while title(number) in names:
        yield title(number)
        number += 1
