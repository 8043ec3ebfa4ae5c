"""Ledger rows out to the result spreadsheet: `Summary`, `Results` and `Print` as xlsx, or as
CSV files. What a row holds is in `rows`, each format in `csvout` and `xlsx` (its sheets in
`summary` and `printed`, shared cell styles in `cells`), safe file writing in `files`.

Rows are streamed in one pass (openpyxl write-only mode, the csv module) into a temporary file
beside the target, which replaces the target only once complete: a crash never leaves half a report.
A temporary file is removed when its write fails; one left by a writer that was killed (its name
carries the writer's host and pid) is removed by the next write of the same file.
An xlsx cell holds at most Excel's 32,767 characters: a longer text is cut there with a visible
marker and a `report.cell_cut` warning; the CSV keeps every character.
Text that a spreadsheet could take for a formula is an explicit string cell in xlsx, exactly
the job's text; in CSV (the report and the failed-rows job) it gets a guard quote that
`restore` takes off again (the CSV job reader does, so a failed-rows job reads back the same).
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
from runner.report.chunks import chunks_path_for, write_chunks_csv
from runner.report.csvout import write_csv, write_csv_subtotals, write_csv_summary
from runner.report.files import replacing, temp_host
from runner.report.rows import (
    MONEY_COLUMNS,
    RESULT_COLUMNS,
    SANDBOX_NOTICE,
    Figures,
    Seconds,
    check_group_by,
    header,
    neutralise,
    restore,
    subtotals_for,
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
    "Figures",
    "Seconds",
    "check_group_by",
    "failed_rows_path_for",
    "neutralise",
    "report_format",
    "restore",
    "subtotals_path_for",
    "summary_path_for",
    "temp_host",
    "write_failed_rows",
    "write_report",
]

log = structlog.get_logger("runner.report")


def write_report(
    path: Path,
    records: Iterable[RowRecord],
    info: RunInfo,
    figures: Figures | None = None,
    chunks: Iterable[RowRecord] | None = None,
) -> Path:
    """Write `records` (in job order) and the run's summary to `path`, `.xlsx` or `.csv`.

    For CSV the summary goes to a sibling `<stem>.summary.csv`, subtotals by
    `figures.group_by` to `<stem>.subtotals.csv`. The `chunks` of a split run (its ledger
    rows) go to a `Chunks` sheet, or `<stem>.chunks.csv`. Returns `path`. ConfigError, before
    anything is written, when `figures.group_by` is no extra column of the job.
    """
    kind = report_format(path)
    figures = figures or Figures()
    if figures.group_by is not None:
        check_group_by(figures.group_by, info.extra_columns)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "xlsx":
            with replacing(path) as tmp:
                write_xlsx(tmp, records, info, figures, chunks)
        else:
            _write_csv_report(path, records, info, figures)
            if chunks is not None:
                with replacing(chunks_path_for(path)) as tmp:
                    write_chunks_csv(tmp, chunks, figures.currency)
    except OSError as exc:
        # Not ConfigError: by the time a run writes its report, money may have moved.
        raise RunnerError(f"{path}: cannot write the report: {exc.strerror or exc}") from exc
    return path


def _write_csv_report(
    path: Path, records: Iterable[RowRecord], info: RunInfo, figures: Figures
) -> None:
    subtotals = subtotals_for(figures, info.extra_columns)
    groups_path = subtotals_path_for(path)
    with replacing(path) as tmp, replacing(summary_path_for(path)) as summary_tmp:
        totals = write_csv(
            tmp, header(info), records, info.extra_columns, figures.currency, subtotals
        )
        lines = summary_lines(info, totals, 1, figures, subtotals)
        if subtotals is not None and not subtotals.overflow:
            lines.append((f"subtotals by {subtotals.column}", groups_path.name))
            with replacing(groups_path) as groups_tmp:
                write_csv_subtotals(groups_tmp, subtotals, figures.currency)
        write_csv_summary(summary_tmp, lines)
    if subtotals is None or subtotals.overflow:
        groups_path.unlink(missing_ok=True)  # an earlier report's subtotals are not this one's


def subtotals_path_for(path: Path) -> Path:
    """Where a CSV report's subtotals by a job column go: `<stem>.subtotals.csv` beside it."""
    return path.with_name(f"{path.stem}.subtotals{path.suffix}")


def failed_rows_path_for(path: Path) -> Path:
    """Where the rerunnable job of a report's failed rows goes: `<stem>.failed.csv` beside it."""
    return path.with_name(f"{path.stem}.failed.csv")


def write_failed_rows(
    path: Path,
    records: Iterable[RowRecord],
    extra_columns: tuple[str, ...],
    currency: str | None = None,
) -> int:
    """Write the `failed` rows as a job file ready to rerun under a new run key.

    Only `failed` rows: nothing of theirs was applied. `needs_review` rows are left out on
    purpose, since their money may have moved. Returns how many rows were written; with
    none, no file is left behind (a stale one from an earlier attempt is removed). Text
    cells carry the CSV formula guard, which the CSV job reader takes off again. A job that
    declared a `currency` passes it on, so the rerun's preflight checks the cards again.
    """
    declared = () if currency is None else ("currency",)
    declares = () if currency is None else (currency,)
    written = 0
    with replacing(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        out = csv.writer(handle)
        names = ["card_id", "amount", "reference", *declared, *extra_columns, "original_row",
                 "original_error"]  # fmt: skip
        out.writerow([neutralise(name) for name in names])
        for record in records:
            if record.status is not RowStatus.FAILED:
                continue
            extras = dict(record.extra)
            texts = [
                record.card_id,
                format_amount(record.amount),
                record.reference or "",
                *declares,
                *(extras.get(name) or "" for name in extra_columns),
                str(record.row),
                record.error or "",
            ]
            out.writerow([neutralise(text) for text in texts])
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
