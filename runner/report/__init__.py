"""Ledger rows out to the result spreadsheet: `Results` and `Summary` as xlsx, or as CSV files.
What a row holds is in `rows`, each format in `csvout` and `xlsx`, safe file writing in `files`.

Rows are streamed in one pass (openpyxl write-only mode, the csv module) into a temporary file
beside the target, which replaces the target only once complete: a crash never leaves half a report.
A temporary file is removed when its write fails; one left by a writer that was killed (its name
carries the writer's host and pid) is removed by the next write of the same file.
An xlsx cell holds at most Excel's 32,767 characters: a longer text is cut there with a visible
marker and a `report.cell_cut` warning; the CSV keeps every character.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import structlog

from runner.domain import RowRecord, RowStatus, RunInfo
from runner.errors import ConfigError, RunnerError
from runner.money import format_amount
from runner.report.csvout import write_csv, write_csv_summary
from runner.report.files import replacing, temp_host
from runner.report.rows import (
    MONEY_COLUMNS,
    RESULT_COLUMNS,
    SANDBOX_NOTICE,
    header,
    summary_lines,
)
from runner.report.xlsx import (
    MAX_CELL_CHARS,
    MAX_SHEET_ROWS,
    MONEY_FORMAT,
    TIME_FORMAT,
    write_xlsx,
)

__all__ = [
    "MAX_CELL_CHARS",
    "MAX_SHEET_ROWS",
    "MONEY_COLUMNS",
    "MONEY_FORMAT",
    "RESULT_COLUMNS",
    "SANDBOX_NOTICE",
    "TIME_FORMAT",
    "failed_rows_path_for",
    "report_format",
    "summary_path_for",
    "temp_host",
    "write_failed_rows",
    "write_report",
]

log = structlog.get_logger("runner.report")


def write_report(path: Path, records: Iterable[RowRecord], info: RunInfo) -> Path:
    """Write `records` (in job order) and the run's summary to `path`, `.xlsx` or `.csv`.

    For CSV the summary goes to a sibling `<stem>.summary.csv`. Returns `path`.
    """
    kind = report_format(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "xlsx":
            with replacing(path) as tmp:
                write_xlsx(tmp, records, info)
        else:
            with replacing(path) as tmp, replacing(summary_path_for(path)) as summary_tmp:
                totals = write_csv(tmp, header(info), records, info.extra_columns)
                write_csv_summary(summary_tmp, summary_lines(info, totals, sheets=1))
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
    with replacing(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
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
