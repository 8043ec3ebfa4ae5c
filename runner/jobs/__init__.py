"""Job files in, validated rows out: a CSV, YAML or workbook job becomes a `Job` of
`JobRow`s, or a `JobInvalid` listing every problem found, each with its file, row and column.

Reading bytes (`source`), CSV (`csvfile`), YAML (`yamlfile`), workbooks (`xlsxfile`), the
column mapping (`columns`), judging the cells (`validate`), the declared currency
(`currency`) and the content digest (`digest`) each have a module; this one puts them together.
Provider limits, wallet balance and duplicate rows are preflight's business, not this package's.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from runner.domain import JobRow
from runner.errors import ConfigError
from runner.jobs.columns import JobReading, Located
from runner.jobs.csvfile import read_csv
from runner.jobs.source import MAX_JOB_BYTES, read_bytes, read_text
from runner.jobs.table import KNOWN_COLUMNS, MAX_PROBLEMS, REQUIRED_COLUMNS
from runner.jobs.validate import MAX_CARD_ID_LENGTH, MAX_REFERENCE_LENGTH, validate
from runner.jobs.xlsxfile import read_xlsx
from runner.jobs.yamlfile import MAX_YAML_DEPTH, YAML_KEYS, read_yaml

__all__ = [
    "KNOWN_COLUMNS",
    "MAX_CARD_ID_LENGTH",
    "MAX_JOB_BYTES",
    "MAX_PROBLEMS",
    "MAX_REFERENCE_LENGTH",
    "MAX_YAML_DEPTH",
    "REQUIRED_COLUMNS",
    "YAML_KEYS",
    "Job",
    "JobReading",
    "load_job",
]


@dataclass(frozen=True, slots=True)
class Job:
    """A validated job: its rows in file order and what the file says about the run."""

    path: Path
    rows: tuple[JobRow, ...] = field(repr=False)
    run_key: str | None
    provider: str | None
    settings: Mapping[str, object]
    extra_columns: tuple[str, ...]
    # sha256 of the rows' canonical form: the same rows give the same digest whatever the
    # file format, line endings or byte-order mark. Row numbers are implied by the order.
    content_digest: str
    # The currency the job declares its cards hold (a `currency` column or YAML setting),
    # upper-cased; None: no declaration, nothing to check. It also rides on each row's
    # `extra` as ("currency", code), where preflight reads it, but is not one of the
    # `extra_columns` the report echoes: the report has a currency column of its own.
    currency: str | None = None
    # What `check` should point out that is not wrong (a workbook's hidden rows, read).
    notes: tuple[str, ...] = ()


def load_job(path: str | Path, reading: JobReading | None = None) -> Job:
    """Read and validate the job at `path` (.csv, .yaml, .yml or .xlsx), as `reading` asks
    (sheet, column mapping); raise JobInvalid if it is unusable."""
    job_path = Path(path)
    reading = reading or JobReading()
    problems = Located(str(job_path))
    suffix = job_path.suffix.lower()
    if suffix not in (".csv", ".yaml", ".yml", ".xlsx"):
        kind = f'is a "{suffix}" file' if suffix else "has no suffix"
        hint = " (save it as an Excel Workbook, .xlsx)" if suffix in _OTHER_SHEETS else ""
        problems.fail(f"{kind}: a job file must be .csv, .yaml, .yml or .xlsx{hint}")
    if reading.sheet is not None and suffix != ".xlsx":
        raise ConfigError(f"sheet: {job_path} is not a workbook (.xlsx): it has no sheets")
    notes: list[str] = []
    run_key: str | None = None
    provider: str | None = None
    settings: Mapping[str, object] = MappingProxyType({})
    with _collector_paused():
        if suffix == ".csv":
            # No reference to the text is kept here: read_csv lets go of it before parsing,
            # so that a large file is not held three times over (text, body, bytes).
            table = read_csv(read_text(job_path, problems), problems, reading.columns)
        elif suffix == ".xlsx":
            table, notes = read_xlsx(read_bytes(job_path, problems), problems, reading)
        else:
            table, run_key, provider, settings = read_yaml(
                read_text(job_path, problems), problems, reading.columns
            )
        extra_columns = tuple(name for name, _ in table.extras) if table is not None else ()
        # validate takes the table over: it drops the parsed columns before it builds rows.
        holder = [table] if table is not None else []
        del table
        result = validate(holder, problems) if holder else None
    problems.raise_if_any()
    # Every None above came with a problem, so raise_if_any has raised.
    assert result is not None
    rows, digest, currency = result
    return Job(
        path=job_path,
        rows=rows,
        run_key=run_key,
        provider=provider,
        settings=settings,
        extra_columns=extra_columns,
        content_digest=digest,
        currency=currency,
        notes=tuple(notes),
    )


_OTHER_SHEETS = (".xls", ".xlsm", ".xlsb", ".ods", ".numbers")


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause CPython's cyclic garbage collector while a job is built.

    A million rows are millions of small container objects, none in a cycle; the collector
    would rescan the growing heap over and over (measured: 22 s instead of 4 s).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
