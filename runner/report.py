"""Ledger rows out to the result spreadsheet: `Results` and `Summary` as xlsx, or as CSV files.

Rows are streamed in one pass (openpyxl write-only mode, the csv module) into a temporary file
beside the target, which replaces the target only once complete: a crash never leaves half a report.
"""

from __future__ import annotations

import contextlib
import csv
import os
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any, Final, Literal

from openpyxl import Workbook
from openpyxl.cell.cell import ERROR_CODES, ILLEGAL_CHARACTERS_RE, WriteOnlyCell
from openpyxl.styles import Font
from openpyxl.utils import get_column_letter

from runner.errors import ConfigError, RunnerError
from runner.money import format_amount
from runner.records import RowRecord, RowStatus, RunInfo

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

RESULTS_SHEET: Final = "Results"
SUMMARY_SHEET: Final = "Summary"
SANDBOX_NOTICE: Final = "SANDBOX — no real money moved"
MONEY_FORMAT: Final = "#,##0.00"
TIME_FORMAT: Final = "yyyy-mm-dd hh:mm:ss"

_CENT: Final = Decimal("0.01")
_ZERO: Final = Decimal("0.00")
_SUMMARY_HEADER: Final = ("item", "value")
_TIME_COLUMNS: Final = frozenset({"started_at", "finished_at"})
_BOLD: Final = Font(bold=True)
# OWASP's list for CSV injection: a cell starting with one of these may be run as a formula.
_FORMULA_TRIGGERS: Final = ("=", "+", "-", "@", "\t", "\r")
_COLUMN_WIDTHS: Final[dict[str, float]] = {
    "row": 8,
    "card_id": 38,
    "amount": 14,
    "reference": 20,
    "status": 14,
    "fee": 12,
    "total_charged": 14,
    "card_balance_before": 20,
    "card_balance_after": 20,
    "wallet_balance_after": 21,
    "transaction_id": 28,
    "invoice_id": 22,
    "attempts": 9,
    "error": 50,
    "started_at": 20,
    "finished_at": 20,
}

_Value = str | int | Decimal | datetime | None


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


@contextlib.contextmanager
def _replacing(target: Path) -> Iterator[Path]:
    """Yield a fresh temporary path beside `target`; on success move it onto `target`."""
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
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


@dataclass(slots=True)
class _Totals:
    """What the Summary needs, accumulated while the rows stream past."""

    rows: int = 0
    by_status: dict[RowStatus, int] = field(default_factory=lambda: dict.fromkeys(RowStatus, 0))
    amount: Decimal = Decimal("0.00")
    fee: Decimal = Decimal("0.00")
    charged: Decimal = Decimal("0.00")
    moved_amount: Decimal = Decimal("0.00")
    moved_fee: Decimal = Decimal("0.00")
    moved_charged: Decimal = Decimal("0.00")

    def add(self, record: RowRecord) -> None:
        # Totals add the cent-rounded values the report shows, so they match a sum of the column.
        amount = _cents(record.amount)
        fee = _ZERO if record.fee is None else _cents(record.fee)
        charged = _ZERO if record.total_charged is None else _cents(record.total_charged)
        self.rows += 1
        self.by_status[record.status] += 1
        self.amount += amount
        self.fee += fee
        self.charged += charged
        if record.status in (RowStatus.SUCCEEDED, RowStatus.PENDING):
            self.moved_amount += amount
            self.moved_fee += fee
            self.moved_charged += charged


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
    if sheets > 1:
        names = ", ".join(_results_sheet_title(n) for n in range(1, sheets + 1))
        lines.append(("Results sheets", f"{sheets} ({names}): more rows than one sheet holds"))
    lines += list(info.notes)
    return lines


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


def _xlsx_header(ws: Any, names: list[str]) -> list[Any]:
    cells = []
    for name in names:
        cell = WriteOnlyCell(ws, value=_xlsx_text(name))
        cell.font = _BOLD
        cells.append(cell)
    return cells


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
            _COLUMN_WIDTHS.get(name, min(max(12.0, len(name) + 4.0), 40.0)) for name in header
        ]
        self.count = 0
        self._open()

    def _open(self) -> None:
        self.count += 1
        self._ws = _new_sheet(self._workbook, _results_sheet_title(self.count), self._widths)
        self._ws.append(_xlsx_header(self._ws, self._header))
        self._rows = 1
        self._styled: dict[int, Any] = {}
        for index, name in enumerate(self._header[: len(RESULT_COLUMNS)]):
            if name in MONEY_COLUMNS or name in _TIME_COLUMNS:
                cell = WriteOnlyCell(self._ws)
                cell.number_format = MONEY_FORMAT if name in MONEY_COLUMNS else TIME_FORMAT
                self._styled[index] = cell

    def _finish(self) -> None:
        # The filter's range is known only now; write-only mode writes it when the sheet closes.
        last_column = get_column_letter(len(self._header))
        self._ws.auto_filter.ref = f"A1:{last_column}{self._rows}"

    def append(self, values: list[_Value]) -> None:
        if self._rows >= MAX_SHEET_ROWS:
            self._finish()
            self._open()
        cells = []
        for index, value in enumerate(values):
            cell = self._styled.get(index)
            if cell is None or value is None:
                cells.append(_xlsx_value(self._ws, value))
            else:
                cell.value = _utc(value) if isinstance(value, datetime) else value
                cells.append(cell)
        self._ws.append(cells)
        self._rows += 1

    def close(self) -> None:
        self._finish()


def _new_sheet(workbook: Any, title: str, widths: list[float]) -> Any:
    ws = workbook.create_sheet(title)
    # Write-only sheets take layout only before their first row is written.
    for index, width in enumerate(widths, start=1):
        ws.column_dimensions[get_column_letter(index)].width = width
    ws.freeze_panes = "A2"
    return ws


def _write_xlsx(tmp: Path, records: Iterable[RowRecord], info: RunInfo) -> None:
    workbook = Workbook(write_only=True)
    try:
        # Summary first, so that opening the file shows the totals and any SANDBOX notice.
        summary = _new_sheet(workbook, SUMMARY_SHEET, [36, 48])
        results = _ResultsSheets(workbook, _header(info))
        totals = _Totals()
        for record in records:
            totals.add(record)
            results.append(_values(record, info.extra_columns))
        results.close()

        summary.append(_xlsx_header(summary, list(_SUMMARY_HEADER)))
        for key, value in _summary_lines(info, totals, results.count):
            if key == SANDBOX_NOTICE:
                summary.append(_xlsx_header(summary, [key]))
            else:
                summary.append([_xlsx_value(summary, key), _xlsx_value(summary, value)])
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
