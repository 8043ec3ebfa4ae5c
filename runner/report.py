"""Ledger rows out to the result spreadsheet: `Results` and `Summary` as xlsx, or as CSV files.

Rows are streamed in one pass (openpyxl write-only mode, the csv module) into a temporary file
beside the target, which replaces the target only once complete: a crash never leaves half a report.
A temporary file is removed when its write fails; one left by a writer that was killed (its name
carries the writer's host and pid) is removed by the next write of the same file.
An xlsx cell holds at most Excel's 32,767 characters: a longer text is cut there with a visible
marker and a `report.cell_cut` warning; the CSV keeps every character.
"""

from __future__ import annotations

import contextlib
import csv
import os
import re
import secrets
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any, Final, Literal

import structlog
from openpyxl import Workbook
from openpyxl.cell.cell import ERROR_CODES, ILLEGAL_CHARACTERS_RE, WriteOnlyCell
from openpyxl.formatting.rule import CellIsRule
from openpyxl.styles import Alignment, Border, Font, PatternFill, Side
from openpyxl.utils import get_column_letter
from openpyxl.worksheet.page import PageMargins
from openpyxl.worksheet.properties import PageSetupProperties

from runner.domain import RowRecord, RowStatus, RunInfo
from runner.errors import ConfigError, RunnerError
from runner.money import format_amount

RESULT_COLUMNS: Final[tuple[str, ...]] = (
    "row",
    "card_id",
    "amount",
    "reference",
    "status",
    "fee",
    "total_charged",
    "card_balance_before",
    "card_balance_after",
    "wallet_balance_after",
    "transaction_id",
    "invoice_id",
    "attempts",
    "error",
    "started_at",
    "finished_at",
)
MONEY_COLUMNS: Final = frozenset(
    {
        "amount",
        "fee",
        "total_charged",
        "card_balance_before",
        "card_balance_after",
        "wallet_balance_after",
    }
)

# Excel's hard limit per sheet, header row included. A module variable (not Final) so that
# tests can lower it instead of writing a million rows.
MAX_SHEET_ROWS = 1_048_576

# Excel's limit on the text of one cell, counted as Excel counts: in UTF-16 code units.
MAX_CELL_CHARS: Final = 32_767

RESULTS_SHEET: Final = "Results"
SUMMARY_SHEET: Final = "Summary"
SANDBOX_NOTICE: Final = "SANDBOX — no real money moved"
MONEY_FORMAT: Final = "#,##0.00"
TIME_FORMAT: Final = "yyyy-mm-dd hh:mm:ss"

_CENT: Final = Decimal("0.01")
_ZERO: Final = Decimal("0.00")
_SUMMARY_HEADER: Final = ("item", "value")
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
# OWASP's list for CSV injection: a cell starting with one of these may be run as a formula.
_FORMULA_TRIGGERS: Final = ("=", "+", "-", "@", "\t", "\r")
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

_Value = str | int | Decimal | datetime | None

log = structlog.get_logger("runner.report")


def write_report(path: Path, records: Iterable[RowRecord], info: RunInfo) -> Path:
    """Write `records` (in job order) and the run's summary to `path`, `.xlsx` or `.csv`.

    For CSV the summary goes to a sibling `<stem>.summary.csv`. Returns `path`.
    """
    kind = report_format(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "xlsx":
            with _replacing(path) as tmp:
                _write_xlsx(tmp, records, info)
        else:
            with _replacing(path) as tmp, _replacing(summary_path_for(path)) as summary_tmp:
                totals = _write_csv(tmp, _header(info), records, info.extra_columns)
                _write_csv_summary(summary_tmp, _summary_lines(info, totals, sheets=1))
    except OSError as exc:
        # Not ConfigError: by the time a run writes its report, money may have moved.
        raise RunnerError(f"{path}: cannot write the report: {exc.strerror or exc}") from exc
    return path


def failed_rows_path_for(path: Path) -> Path:
    """Where the rerunnable job of a report's failed rows goes: `<stem>.failed.csv` beside it."""
    return path.with_name(f"{path.stem}.failed.csv")


def write_failed_rows(
    path: Path, records: Iterable[RowRecord], extra_columns: tuple[str, ...]
) -> int:
    """Write the `failed` rows as a job file ready to rerun under a new run key.

    Only `failed` rows: nothing of theirs was applied. `needs_review` rows are left out on
    purpose, since their money may have moved. Returns how many rows were written; with
    none, no file is left behind (a stale one from an earlier attempt is removed).
    """
    written = 0
    with _replacing(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        out = csv.writer(handle)
        out.writerow(
            ["card_id", "amount", "reference", *extra_columns, "original_row", "original_error"]
        )
        for record in records:
            if record.status is not RowStatus.FAILED:
                continue
            extras = dict(record.extra)
            out.writerow(
                [
                    record.card_id,
                    format_amount(record.amount),
                    record.reference,
                    *(extras.get(name, "") for name in extra_columns),
                    record.row,
                    record.error or "",
                ]
            )
            written += 1
    if not written:
        path.unlink()  # no failed rows: no rerun file, not even a stale one
    return written


def report_format(path: Path) -> Literal["xlsx", "csv"]:
    """The report format `path` asks for, by suffix; ConfigError if neither.

    Meant to be called up front too, so a bad `--output` stops a run before anything is sent.
    """
    suffix = path.suffix.lower()
    if suffix == ".xlsx":
        return "xlsx"
    if suffix == ".csv":
        return "csv"
    raise ConfigError(f"{path}: unknown report format; the output must end in .xlsx or .csv")


def summary_path_for(path: Path) -> Path:
    """Where a CSV report's summary goes: `<stem>.summary.csv` beside it."""
    return path.with_name(f"{path.stem}.summary{path.suffix}")


def _neutralise(text: str) -> str:
    """Make `text` safe from formula injection: a leading trigger character gets a `'` first."""
    return "'" + text if text.startswith(_FORMULA_TRIGGERS) else text


def temp_host() -> str:
    """This machine's name as temporary file names carry it: letters, digits and hyphens."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:63] or "host"


def _pid_alive(pid: int) -> bool:
    """False only when no process `pid` exists here (a pid reused since counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # not ours to signal, or not a pid at all: keep its file
        return True
    return True


def _remove_stale_temps(target: Path) -> None:
    """Remove temporary files of `target` left by writers on this host that no longer run.

    A writer killed outright (SIGKILL, a power cut) never runs its cleanup; without this its
    half-written file would sit beside the report for good.
    """
    own = re.compile(
        rf"\.{re.escape(target.name)}\.{re.escape(temp_host())}\.(\d{{1,10}})\.[0-9a-f]{{12}}\.tmp"
    )
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return  # an unreadable folder: the write itself will say what is wrong
    for entry in entries:
        match = own.fullmatch(entry.name)
        if match is None or int(match[1]) == os.getpid() or _pid_alive(int(match[1])):
            continue
        with contextlib.suppress(OSError):
            os.unlink(entry.path)


@contextlib.contextmanager
def _replacing(target: Path) -> Iterator[Path]:
    """Yield a fresh temporary path beside `target`; on success move it onto `target`.

    The temporary file is removed however the block ends (an error, a cancellation); its name
    carries this host and pid, so that the next write can remove one a killed writer left.
    """
    _remove_stale_temps(target)
    tmp = target.with_name(f".{target.name}.{temp_host()}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
    # os.open with 0o666 honours the umask, unlike mkstemp's 0o600: the report is shared.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        # Flushed to disk before the rename, or a power cut could leave an empty report.
        with tmp.open("rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _zero_by_status() -> dict[RowStatus, Decimal]:
    return dict.fromkeys(RowStatus, _ZERO)


@dataclass(slots=True)
class _Totals:
    """What the Summary needs, accumulated while the rows stream past."""

    rows: int = 0
    by_status: dict[RowStatus, int] = field(default_factory=lambda: dict.fromkeys(RowStatus, 0))
    # Money is summed per status only; the overall and moved totals add those up at the end.
    amount_by_status: dict[RowStatus, Decimal] = field(default_factory=_zero_by_status)
    fee_by_status: dict[RowStatus, Decimal] = field(default_factory=_zero_by_status)
    charged_by_status: dict[RowStatus, Decimal] = field(default_factory=_zero_by_status)
    # Rows that moved money (succeeded, pending) whose fee or total charged the provider did
    # not tell (Alix never reports a total charged; a reconciled Uncash topup has no fee): the
    # sums leave them out, and the Summary must say so rather than let 0.00 read as "free".
    fee_unknown: int = 0
    charged_unknown: int = 0

    def add(self, record: RowRecord) -> None:
        # Totals add the cent-rounded values the report shows, so they match a sum of the column.
        status = record.status
        self.rows += 1
        self.by_status[status] += 1
        self.amount_by_status[status] += _cents(record.amount)
        moved = status is RowStatus.SUCCEEDED or status is RowStatus.PENDING
        if record.fee is not None:
            self.fee_by_status[status] += _cents(record.fee)
        elif moved:
            self.fee_unknown += 1
        if record.total_charged is not None:
            self.charged_by_status[status] += _cents(record.total_charged)
        elif moved:
            self.charged_unknown += 1

    @property
    def amount(self) -> Decimal:
        return sum(self.amount_by_status.values(), _ZERO)

    @property
    def fee(self) -> Decimal:
        return sum(self.fee_by_status.values(), _ZERO)

    @property
    def charged(self) -> Decimal:
        return sum(self.charged_by_status.values(), _ZERO)

    @property
    def moved_amount(self) -> Decimal:
        return self.amount_by_status[RowStatus.SUCCEEDED] + self.amount_by_status[RowStatus.PENDING]

    @property
    def moved_fee(self) -> Decimal:
        return self.fee_by_status[RowStatus.SUCCEEDED] + self.fee_by_status[RowStatus.PENDING]

    @property
    def moved_charged(self) -> Decimal:
        return (
            self.charged_by_status[RowStatus.SUCCEEDED] + self.charged_by_status[RowStatus.PENDING]
        )


def _cents(value: Decimal) -> Decimal:
    return value.quantize(_CENT, rounding=ROUND_HALF_UP)


def _utc(value: datetime) -> datetime:
    # A naive datetime is taken to be UTC already, which is what the ledger stores.
    return value if value.tzinfo is None else value.astimezone(UTC).replace(tzinfo=None)


def _header(info: RunInfo) -> list[str]:
    # An extra job column named like a contract column would make the header ambiguous.
    extras = [f"{name} (job)" if name in RESULT_COLUMNS else name for name in info.extra_columns]
    return [*RESULT_COLUMNS, *extras]


def _values(record: RowRecord, extra_columns: tuple[str, ...]) -> list[_Value]:
    """The record's values in column order, still typed (money Decimal, times datetime)."""
    values: list[_Value] = [
        record.row,
        record.card_id,
        _cents(record.amount),
        record.reference,
        record.status.value,
        None if record.fee is None else _cents(record.fee),
        None if record.total_charged is None else _cents(record.total_charged),
        None if record.card_balance_before is None else _cents(record.card_balance_before),
        None if record.card_balance_after is None else _cents(record.card_balance_after),
        None if record.wallet_balance_after is None else _cents(record.wallet_balance_after),
        record.transaction_id,
        record.invoice_id,
        record.attempts,
        record.error,
        record.started_at,
        record.finished_at,
    ]
    if extra_columns:
        extra = dict(record.extra)
        values.extend(extra.get(name) for name in extra_columns)
    return values


def _summary_lines(info: RunInfo, totals: _Totals, sheets: int) -> list[tuple[str, _Value]]:
    lines: list[tuple[str, _Value]] = []
    if info.is_sandbox:
        lines.append((SANDBOX_NOTICE, None))
    lines += [
        ("provider", info.provider),
        ("run key", info.run_key),
        ("job file", info.job_file),
        ("times", "UTC"),
        ("started (UTC)", info.started_at),
        ("finished (UTC)", info.finished_at),
        ("rows", totals.rows),
    ]
    lines += [(f"rows {status.value}", count) for status, count in totals.by_status.items()]
    lines += [
        ("amount, all rows", totals.amount),
        ("fee, all rows", totals.fee),
        ("total charged, all rows", totals.charged),
        ("amount, succeeded + pending", totals.moved_amount),
        ("fee, succeeded + pending", totals.moved_fee),
        ("total charged, succeeded + pending", totals.moved_charged),
    ]
    for what, unknown in (("fee", totals.fee_unknown), ("total charged", totals.charged_unknown)):
        if unknown:
            lines.append((f"{what} not known", _unknown_note(what, unknown)))
    if sheets > 1:
        names = ", ".join(_results_sheet_title(n) for n in range(1, sheets + 1))
        lines.append(("Results sheets", f"{sheets} ({names}): more rows than one sheet holds"))
    lines += list(info.notes)
    return lines


def _unknown_note(what: str, rows: int) -> str:
    rows_text = "1 succeeded or pending row" if rows == 1 else f"{rows} succeeded or pending rows"
    return f"for {rows_text}: the provider did not report it; the {what} totals leave them out"


# --- CSV ------------------------------------------------------------------------------------


def _csv_text(value: _Value) -> str:
    if value is None:
        return ""
    if isinstance(value, Decimal):
        # Formatted from the Decimal itself: float would print 0.30000000000000004.
        return f"{value:f}"
    if isinstance(value, datetime):
        return _utc(value).isoformat(timespec="seconds") + "Z"
    if isinstance(value, int):
        return str(value)
    return _neutralise(value)


def _write_csv(
    tmp: Path, header: list[str], records: Iterable[RowRecord], extra_columns: tuple[str, ...]
) -> _Totals:
    totals = _Totals()
    with tmp.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow([_neutralise(name) for name in header])
        for record in records:
            totals.add(record)
            writer.writerow([_csv_text(v) for v in _values(record, extra_columns)])
    return totals


def _write_csv_summary(tmp: Path, lines: list[tuple[str, _Value]]) -> None:
    with tmp.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(_SUMMARY_HEADER)
        for key, value in lines:
            writer.writerow([_neutralise(key), _csv_text(value)])


# --- xlsx -----------------------------------------------------------------------------------


def _results_sheet_title(number: int) -> str:
    return RESULTS_SHEET if number == 1 else f"{RESULTS_SHEET} {number}"


def _xlsx_text(text: str) -> str:
    # openpyxl refuses control characters outright; a provider's error text may carry some.
    return _neutralise(ILLEGAL_CHARACTERS_RE.sub("", text))


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


def _xlsx_value(ws: Any, value: _Value) -> Any:
    if value is None or value == "":
        return None
    if isinstance(value, Decimal):
        # openpyxl writes Decimal as a number ("%.16g"), exact for cent amounts below 1e14.
        cell = WriteOnlyCell(ws, value=value)
        cell.number_format = MONEY_FORMAT
        return cell
    if isinstance(value, datetime):
        cell = WriteOnlyCell(ws, value=_utc(value))
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
        self._header = header
        self._widths = [
            # A job's extra column (a name, a department) gets room for typical text.
            _COLUMN_WIDTHS.get(name, min(max(20.0, len(name) + 4.0), 40.0))
            for name in header
        ]
        self.count = 0
        self._open()

    def _open(self) -> None:
        self.count += 1
        self._ws = _new_sheet(self._workbook, _results_sheet_title(self.count), self._widths)
        # On paper there are no cell borders: without grid lines, 2,233,851.23 runs into the id.
        self._ws.print_options.gridLines = True
        self._ws.append(_xlsx_header(self._ws, self._header))
        self._rows = 1
        self._styled: dict[int, Any] = {}
        for index, name in enumerate(self._header[: len(RESULT_COLUMNS)]):
            if name in MONEY_COLUMNS or name in _TIME_COLUMNS:
                cell = WriteOnlyCell(self._ws)
                cell.number_format = MONEY_FORMAT if name in MONEY_COLUMNS else TIME_FORMAT
                self._styled[index] = cell
        # Error texts are long: they wrap in their column. Only rows with an error use this cell.
        self._error = WriteOnlyCell(self._ws)
        self._error.alignment = _WRAP

    def _finish(self) -> None:
        # The filter's range is known only now; write-only mode writes it when the sheet closes.
        last_column = get_column_letter(len(self._header))
        self._ws.auto_filter.ref = f"A1:{last_column}{self._rows}"
        if self._rows > 1:
            column = get_column_letter(_STATUS_INDEX + 1)
            for status in _STATUS_COLOURS:
                self._ws.conditional_formatting.add(
                    f"{column}2:{column}{self._rows}", _status_rule(status)
                )

    def append(self, values: list[_Value]) -> None:
        if self._rows >= MAX_SHEET_ROWS:
            self._finish()
            self._open()
        cells = []
        for index, value in enumerate(values):
            cell = self._styled.get(index)
            if cell is None or value is None:
                if isinstance(value, str) and len(value) > MAX_CELL_CHARS // 2:
                    value = _fitted(
                        value, sheet=self._ws.title, row=values[0], column=self._header[index]
                    )
                cells.append(_xlsx_value(self._ws, value))
            else:
                cell.value = _utc(value) if isinstance(value, datetime) else value
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


def _write_summary(ws: Any, info: RunInfo, totals: _Totals, sheets: int) -> None:
    """The run's lines as item | value, then the table of totals by status."""
    width = len(_SUMMARY_WIDTHS)
    ws.append(_xlsx_header(ws, _SUMMARY_HEADER))
    for key, value in _summary_lines(info, totals, sheets):
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


def _write_xlsx(tmp: Path, records: Iterable[RowRecord], info: RunInfo) -> None:
    workbook = Workbook(write_only=True)
    try:
        # Summary first, so that opening the file shows the totals and any SANDBOX notice.
        summary = _new_sheet(workbook, SUMMARY_SHEET, _SUMMARY_WIDTHS, landscape=False)
        results = _ResultsSheets(workbook, _header(info))
        totals = _Totals()
        for record in records:
            totals.add(record)
            results.append(_values(record, info.extra_columns))
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
